"""`make demo` is one of the README's two commands: it must keep working."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.netns import is_root


@pytest.mark.netns
@pytest.mark.clients
def test_demo_runs_end_to_end() -> None:
    if not is_root():
        pytest.skip("needs root")
    proc = subprocess.run(
        [sys.executable, "-m", "cocoon_net.sandbox", "--vms", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== demo OK" in proc.stdout
    assert proc.stdout.count("(its own address)") == 3
    assert "cocoon-net teardown complete (static)" in proc.stdout
    match = re.search(r"== node (cnt-[0-9a-f]{6})n", proc.stdout)
    assert match, proc.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert match.group(1) not in left.stdout  # every namespace the demo made is gone

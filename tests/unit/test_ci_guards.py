"""The run-level guards of tests/conftest.py, each tried on a small inner pytest run: under
CI a skip outside the allow-list fails the run, and any change to the network state of the
namespace a run lives in fails it (the inner run lives in a namespace made for it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ALLOWED_SKIPS
from tests.support.netns import Netns

REPO = Path(__file__).resolve().parents[2]


def inner_run(
    tmp_path: Path, body: str, *, ci: bool, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci:
        env["CI"] = "true"
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*(prefix or []), *argv, "-c", os.devnull, "--rootdir", str(tmp_path), "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


SKIPS = "import pytest\n\ndef test_one() -> None:\n    pytest.skip('not today')\n"
PASSES = "def test_one() -> None:\n    pass\n"


def test_a_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    run = inner_run(tmp_path, SKIPS, ci=True)
    assert run.returncode == 1, run.stdout
    assert "FAILED (skipped) test_inner.py::test_one" in run.stdout


def test_a_skip_is_only_reported_outside_ci(tmp_path: Path) -> None:
    assert inner_run(tmp_path, SKIPS, ci=False).returncode == 0
    assert inner_run(tmp_path, PASSES, ci=True).returncode == 0


def test_every_allowed_skip_names_a_test_and_gives_its_reason() -> None:
    for prefix, reason in ALLOWED_SKIPS.items():
        path = REPO / prefix.split("::")[0]
        assert path.is_file(), prefix
        assert prefix.split("::")[1] in path.read_text(), prefix
        assert len(reason) > 20, prefix


LEAKS = """import subprocess

def test_leaks() -> None:
    subprocess.run(["ip", "link", "add", "leak0", "type", "veth", "peer", "name", "leak1"],
                   check=True)
"""


def test_a_change_to_the_network_state_fails_the_run(
    tmp_path: Path, make_netns: Callable[[str], Netns]
) -> None:
    # The inner run's "host" is a namespace of its own, so the leak leaks nowhere real.
    ns = make_netns("guard")
    run = inner_run(tmp_path, LEAKS, ci=False, prefix=ns.prefix)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "the run changed the host's network state" in run.stdout
    assert "leak1@leak0" in run.stdout
    clean = make_netns("guard")
    assert inner_run(tmp_path, PASSES, ci=False, prefix=clean.prefix).returncode == 0


def test_ci_refuses_to_run_without_root() -> None:
    run = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(REPO / ".ci" / "run")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 1
    assert "ci: must run as root" in run.stderr

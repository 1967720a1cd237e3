from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.netns import Netns, is_root, netns

# Variables that would let a developer's shell (or a real cloud) leak into a test.
_ENV_PREFIXES = ("COCOON_NET_", "VOLCENGINE_", "GCE_", "GOOGLE_")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(key)


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """Factory of namespaces that are all deleted when the test ends."""
    if not is_root():
        pytest.skip("needs root to create network namespaces")
    with ExitStack() as stack:

        def make(tag: str = "") -> Netns:
            return stack.enter_context(netns(tag))

        yield make


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """Private state, run and CNI directories for one test (never the host's)."""
    out = {
        "state": tmp_path / "state",
        "run": tmp_path / "run",
        "cni": tmp_path / "cni",
    }
    return out


def cocoon_argv() -> list[str]:
    return [sys.executable, "-m", "cocoon_net"]

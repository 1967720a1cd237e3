from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.emulators.aws import MotoServer
from tests.support import hoststate
from tests.support.netns import Netns, is_root, netns

# Under CI (CI=true) a skipped test fails the run unless it is listed here, with the reason
# it may be skipped there: a green CI run must mean every test ran. Keys are node-id prefixes.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/unit/test_dhcp_store.py::test_failed_write_behind_keeps_the_journal": (
        "needs the immutable attribute (chattr +i) on the temporary directory's file system, "
        "which overlayfs and tmpfs lack"
    ),
}


def _allowed(nodeid: str) -> bool:
    return any(nodeid.startswith(prefix) for prefix in ALLOWED_SKIPS)


_SKIPPED: list[str] = []  # node ids skipped outside the allow-list, in this session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not _allowed(report.nodeid):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    failed = bool(_host_changes()) or (os.environ.get("CI") == "true" and bool(_SKIPPED))
    if failed and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if os.environ.get("CI") == "true" and _SKIPPED:
        terminalreporter.section("skipped under CI (not in ALLOWED_SKIPS of tests/conftest.py)")
        for nodeid in _SKIPPED:
            terminalreporter.line(f"FAILED (skipped) {nodeid}")
    changes = _host_changes()
    if changes:
        terminalreporter.section("the run changed the host's network state", red=True)
        for line in changes:
            terminalreporter.line(line)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Tests change links, routes and firewall rules only inside namespaces they create: the
    # network state of the namespace the run lives in must be the same at its end. Not under
    # mutation testing: it runs only the pure unit tests, thousands of times.
    if "MUTANT_UNDER_TEST" not in os.environ:
        _HOST.append(hoststate.snapshot())


def _host_changes() -> list[str]:
    if not _HOST:
        return []
    if len(_HOST) == 1:
        _HOST.append(hoststate.snapshot())
    return hoststate.differences(_HOST[0], _HOST[1])


_HOST: list[dict[str, str]] = []  # the snapshots before and after the run


# Variables that would let a developer's shell (or a real cloud) leak into a test.
_ENV_PREFIXES = ("COCOON_NET_", "VOLCENGINE_", "GCE_", "GOOGLE_", "AWS_")


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


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's EC2 in server mode on 127.0.0.1, one per test session (tests reset it)."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


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

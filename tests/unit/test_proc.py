"""proc.run_unless: a host command run for as long as its answer is still wanted."""

from __future__ import annotations

import threading

import pytest

from cocoon_net import proc
from cocoon_net.errors import HostSetupError


def test_a_command_whose_answer_stays_wanted_runs_to_its_end_with_all_it_printed() -> None:
    asked: list[bool] = []

    def outdated() -> bool:
        asked.append(True)
        return False

    # More than a pipe holds, printed after a pause: read on while outdated() is asked.
    script = "sleep 0.2; head -c 1000000 /dev/zero | tr '\\0' a"
    done = proc.run_unless(["sh", "-c", script], outdated, 0.01)
    assert done is not None and done.stdout == "a" * 1_000_000
    assert asked


def test_a_command_whose_answer_is_outdated_is_stopped() -> None:
    said: list[object] = []
    call = threading.Thread(
        target=lambda: said.append(proc.run_unless(["sleep", "120"], lambda: True, 0.01))
    )
    call.start()
    call.join(60)  # not the two minutes the command would take
    assert not call.is_alive() and said == [None]


def test_a_failed_command_says_what_it_printed() -> None:
    with pytest.raises(HostSetupError, match=r"^sh -c echo no such table >&2; exit 1: no such"):
        proc.run_unless(["sh", "-c", "echo no such table >&2; exit 1"], lambda: False, 0.01)
    with pytest.raises(HostSetupError, match="no-such-command: command not found"):
        proc.run_unless(["no-such-command"], lambda: False, 0.01)


def test_a_command_still_running_after_the_timeout_is_killed_and_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proc, "TIMEOUT", 0.3)
    said: list[object] = []

    def call() -> None:
        try:
            proc.run_unless(["sleep", "120"], lambda: False, 0.01)
        except HostSetupError as exc:
            said.append(str(exc))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)  # not the two minutes the command would take
    assert not thread.is_alive() and said == ["sleep 120: timed out after 0.3 s"]

"""The bench's py-spy summary: shares by thread, own and inclusive, from raw samples."""

from __future__ import annotations

from bench.spy import frame_name, parse, report

RAW = [
    "thread (11): MainThread;0x7f00 (libc.so.6);run (daemon.py:10);"
    "handle (server.py:20);decide (policy.py:30) 6",
    "thread (11): MainThread;0x7f00 (libc.so.6);run (daemon.py:10);"
    "handle (server.py:21);sendto (libc.so.6) 2",
    "thread (12): store-writer;Thread.run (threading.py:982);_run (store.py:5);"
    "fdatasync (libc.so.6) 2",
    "not a sample line",
]


def test_frames_lose_their_line_numbers_and_addresses_become_their_library() -> None:
    assert frame_name("handle (server.py:20)") == "handle (server.py)"
    assert frame_name("0x7fc03bca71f5 (libc.so.6)") == "? (libc.so.6)"
    assert frame_name("sendto (libc.so.6)") == "sendto (libc.so.6)"


def test_parse_reads_thread_frames_and_count() -> None:
    stacks = parse(RAW)
    assert len(stacks) == 3
    assert stacks[0].thread == "MainThread" and stacks[0].samples == 6
    assert stacks[0].frames[-1] == "decide (policy.py)"
    assert stacks[2].thread == "store-writer"


def test_report_shares() -> None:
    lines = report(parse(RAW))
    assert lines[0].startswith("10 samples")
    text = "\n".join(lines)
    assert "80.0 %  MainThread" in text and "20.0 %  store-writer" in text
    assert "60.0 %  decide (policy.py)" in text  # running: own samples only
    # Inclusive: handle() is on the stack of 8 samples, counted once per stack.
    assert "80.0 %  handle (server.py)" in text
    assert "threading" not in text.split("inclusive")[1]
    assert report([]) == ["no samples"]

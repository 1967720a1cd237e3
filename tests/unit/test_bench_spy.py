"""The bench's py-spy summary: shares by thread, own and inclusive, from raw samples."""

from __future__ import annotations

from bench.spy import cpu_lines, frame_name, parse, report

RAW = [
    "thread (11): MainThread;0x7f00 (libc.so.6);run (daemon.py:10);"
    "handle (server.py:20);decide (policy.py:30) 6",
    "thread (11): MainThread;0x7f00 (libc.so.6);run (daemon.py:10);"
    "handle (server.py:21);sendto (libc.so.6) 2",
    "thread (12): store-writer;Thread.run (threading.py:982);_run (store.py:5);"
    "fdatasync (libc.so.6) 2",
    "thread (13): asyncio_0;Thread.run (threading.py:982);0x7f01 (libc.so.6);"
    "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7f02 (libc.so.6) 5",
    "thread (11): MainThread;run (daemon.py:10);epoll_wait (libc.so.6) 7",
    "not a sample line",
]


def test_frames_lose_their_line_numbers_and_addresses_become_their_library() -> None:
    assert frame_name("handle (server.py:20)") == "handle (server.py)"
    assert frame_name("0x7fc03bca71f5 (libc.so.6)") == "? (libc.so.6)"
    assert frame_name("sendto (libc.so.6)") == "sendto (libc.so.6)"


def test_parse_reads_thread_frames_and_count() -> None:
    # py-spy leaves the name out for a thread that ended meanwhile.
    unnamed = "thread (14);Thread.run (threading.py:982);_write_snapshot (store.py:7) 1"
    stacks = parse([*RAW, unnamed])
    assert len(stacks) == 6
    assert stacks[5].thread == "thread (14)" and stacks[5].tid == 14
    assert stacks[5].frames == ("Thread.run (threading.py)", "_write_snapshot (store.py)")
    assert stacks[0].thread == "MainThread" and stacks[0].samples == 6
    assert stacks[0].frames[-1] == "decide (policy.py)"
    assert stacks[2].thread == "store-writer" and stacks[2].tid == 12


def test_report_shares() -> None:
    lines = report(parse(RAW))
    assert lines[0].startswith("10 samples at 100 Hz on CPU (12 more waiting")
    text = "\n".join(lines)
    assert "80.0 %  MainThread" in text and "20.0 %  store-writer" in text
    assert "60.0 %  decide (policy.py)" in text  # running: own samples only
    # Inclusive: handle() is on the stack of 8 samples, counted once per stack.
    assert "80.0 %  handle (server.py)" in text
    assert "threading" not in text.split("inclusive")[1]
    assert "asyncio_0" not in text and "epoll_wait" not in text
    assert report([]) == ["no samples"]


def test_cpu_lines_name_threads_by_the_samples_tid() -> None:
    lines = cpu_lines({11: (1.0, 0.5), 12: (0.2, 0.3), 99: (0.0, 0.1)}, parse(RAW))
    assert lines[1].split() == ["1.50", "s", "(1.00", "+", "0.50)", "MainThread"]
    assert lines[2].endswith("store-writer") and lines[3].endswith("thread 99")
    assert cpu_lines({}, []) == []

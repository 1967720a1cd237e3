"""Read pacing: when the server reads its socket again after a read."""

from __future__ import annotations

import pytest

from cocoon_net.config import parse_milliseconds
from cocoon_net.dhcp.server import next_read_at
from cocoon_net.errors import UsageError


def test_a_read_that_took_frames_and_emptied_the_queue_waits_one_interval_from_its_start() -> None:
    assert next_read_at(100.0, 1, True, 0.002) == 100.002
    assert next_read_at(100.0, 63, True, 0.5) == 100.5


def test_a_read_that_found_nothing_reads_again_as_soon_as_a_frame_comes() -> None:
    """After a quiet interval the first request is read at once."""
    assert next_read_at(100.0, 0, True, 0.002) is None


def test_a_read_that_stopped_at_a_full_batch_reads_on_at_once() -> None:
    """More is queued: waiting would only lengthen the queue under load."""
    assert next_read_at(100.0, 64, False, 0.002) is None


def test_no_interval_is_no_pacing() -> None:
    assert next_read_at(100.0, 5, True, 0) is None
    assert next_read_at(100.0, 5, True, -1.0) is None


def test_the_flag_reads_milliseconds() -> None:
    flag = "--read-interval"
    assert parse_milliseconds("2ms", flag=flag, maximum=50) == 0.002
    assert parse_milliseconds(" 1.5 ", flag=flag, maximum=50) == 0.0015
    assert parse_milliseconds("0", flag=flag, maximum=50) == 0
    assert parse_milliseconds("50ms", flag=flag, maximum=50) == 0.05


@pytest.mark.parametrize("text", ["51ms", "2s", "-1", "fast", "", "ms"])
def test_the_flag_refuses_what_is_not_a_short_interval(text: str) -> None:
    with pytest.raises(UsageError, match="--read-interval"):
        parse_milliseconds(text, flag="--read-interval", maximum=50)

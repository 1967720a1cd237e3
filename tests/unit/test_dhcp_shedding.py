"""Load shedding: which late requests the server drops unread, decided from the frame's age
in the receive queue and, for a late one, its option 53 alone."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from cocoon_net.dhcp import frames
from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.packet import encode, peek_message_type
from cocoon_net.dhcp.server import (
    STALE_DISCOVER_SECONDS,
    STALE_REQUEST_SECONDS,
    gate_closes,
    gate_opens,
    shed_reason,
)

MAC = bytes.fromhex("02aabbccddee")
ALL = IPv4Address("255.255.255.255")


def frame(options: dict[int, bytes]) -> bytes:
    msg = DhcpMessage(op=Op.BOOTREQUEST, xid=7, chaddr=MAC, options=options)
    payload = encode(msg)
    return frames.build_frame(MAC, b"\xff" * 6, ZERO_IP, ALL, 68, 67, payload)


def typed(mtype: MessageType) -> bytes:
    return frame({Opt.MESSAGE_TYPE: bytes([mtype]), Opt.CLIENT_ID: b"\x01" + MAC})


UDP_PAYLOAD = frames.ETH_HEADER_SIZE + 20 + frames.UDP_HEADER_SIZE


@pytest.mark.parametrize("mtype", list(MessageType))
def test_peek_reads_option_53_wherever_it_is(mtype: MessageType) -> None:
    data = frame({Opt.CLIENT_ID: b"\x01" + MAC, Opt.MESSAGE_TYPE: bytes([mtype])})
    # encode() puts option 53 first; move it behind option 61 to make the scan walk.
    at = UDP_PAYLOAD + 240
    first = data[at : at + 3]
    rest = data[at + 3 : at + 3 + 9]
    moved = data[:at] + rest + first + data[at + 12 :]
    assert peek_message_type(moved, UDP_PAYLOAD) == mtype
    assert peek_message_type(data, UDP_PAYLOAD) == mtype


def test_peek_finds_nothing_without_option_53_or_cookie() -> None:
    assert peek_message_type(frame({Opt.CLIENT_ID: b"\x01" + MAC}), UDP_PAYLOAD) is None
    data = bytearray(typed(MessageType.DISCOVER))
    data[UDP_PAYLOAD + 236] ^= 0xFF  # break the magic cookie
    assert peek_message_type(bytes(data), UDP_PAYLOAD) is None
    assert peek_message_type(typed(MessageType.DISCOVER)[: UDP_PAYLOAD + 241], UDP_PAYLOAD) is None


def test_fresh_requests_are_served_whatever_their_type() -> None:
    for mtype in MessageType:
        assert shed_reason(0.0, typed(mtype)) is None
        assert shed_reason(STALE_DISCOVER_SECONDS * 0.99, typed(mtype)) is None


def test_a_late_discover_is_shed_but_a_late_request_completes_its_exchange() -> None:
    age = (STALE_DISCOVER_SECONDS + STALE_REQUEST_SECONDS) / 2
    assert shed_reason(age, typed(MessageType.DISCOVER)) == "stale_discover"
    for mtype in (MessageType.REQUEST, MessageType.RELEASE, MessageType.INFORM):
        assert shed_reason(age, typed(mtype)) is None
    # Unreadable type: served, and decode() then says what is wrong with it.
    assert shed_reason(age, frame({Opt.CLIENT_ID: b"\x01" + MAC})) is None


def test_anything_older_than_a_client_waits_is_shed() -> None:
    for mtype in MessageType:
        assert shed_reason(STALE_REQUEST_SECONDS, typed(mtype)) == "stale_request"


def test_the_gate_closes_at_half_a_queue_or_on_a_late_discover() -> None:
    limit = 8 << 20
    assert not gate_closes(0, limit, 0)
    assert not gate_closes(limit // 2 - 1, limit, 0)
    assert gate_closes(limit // 2, limit, 0)
    assert gate_closes(1, limit, 1)
    assert not gate_closes(0, limit, 1)  # nothing queued would wake the server to open it


def test_the_gate_opens_once_the_queue_is_down_to_a_quarter() -> None:
    limit = 8 << 20
    assert not gate_opens(limit // 4, limit)
    assert gate_opens(limit // 4 - 1, limit)
    assert gate_opens(0, limit)

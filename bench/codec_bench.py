"""Microseconds per packet for the DHCP codec and framing (the server's per-packet CPU floor).

    .venv/bin/python bench/codec_bench.py [--number N]

The workload matches the one research/deps.md measured throwaway codecs with: parse a REQUEST
carrying options 53, 61, 50, 54, 57, 12, 55, and build an ACK carrying 53, 54, 51, 1, 3, 6.
Each figure is the best of five runs, since this machine's timings are noisy.
"""

from __future__ import annotations

import argparse
import timeit
from ipaddress import IPv4Address

from cocoon_net.dhcp.frames import BROADCAST_MAC, build_frame, parse_frame
from cocoon_net.dhcp.model import DhcpMessage, MessageType, Op, Opt
from cocoon_net.dhcp.packet import decode, encode

MAC = bytes.fromhex("020000aabb01")
SERVER_MAC = bytes.fromhex("0200000000fe")
GATEWAY = IPv4Address("10.0.0.1")
LEASED = IPv4Address("10.0.0.50")

REQUEST = DhcpMessage(
    op=Op.BOOTREQUEST,
    xid=0x4CAE706A,
    chaddr=MAC,
    options={
        Opt.MESSAGE_TYPE: bytes([MessageType.REQUEST]),
        Opt.CLIENT_ID: b"\x01" + MAC,
        Opt.REQUESTED_IP: LEASED.packed,
        Opt.SERVER_ID: GATEWAY.packed,
        Opt.MAX_MESSAGE_SIZE: (576).to_bytes(2, "big"),
        Opt.HOSTNAME: b"vm-0001",
        Opt.PARAM_REQUEST_LIST: bytes([1, 3, 6, 12, 15, 26, 28, 42, 119, 121]),
    },
)
ACK = DhcpMessage(
    op=Op.BOOTREPLY,
    xid=REQUEST.xid,
    chaddr=MAC,
    yiaddr=LEASED,
    siaddr=GATEWAY,
    options={
        Opt.MESSAGE_TYPE: bytes([MessageType.ACK]),
        Opt.SERVER_ID: GATEWAY.packed,
        Opt.LEASE_TIME: (86400).to_bytes(4, "big"),
        Opt.SUBNET_MASK: bytes([255, 255, 255, 0]),
        Opt.ROUTER: GATEWAY.packed,
        Opt.DNS: bytes([8, 8, 8, 8, 1, 1, 1, 1]),
    },
)


def round_trip(frame: bytes) -> bytes:
    """What the server does per packet, minus the policy: unwrap, decode, encode, wrap."""
    udp = parse_frame(frame)
    assert udp is not None
    decode(udp.payload)
    return build_frame(SERVER_MAC, MAC, GATEWAY, LEASED, 67, 68, encode(ACK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per run")
    number = parser.parse_args().number

    request_bytes = encode(REQUEST)
    ack_bytes = encode(ACK)
    request_frame = build_frame(
        MAC, BROADCAST_MAC, IPv4Address(0), IPv4Address("255.255.255.255"), 68, 67, request_bytes
    )
    assert decode(request_bytes) == REQUEST
    parsed = parse_frame(request_frame)
    assert parsed is not None
    assert parsed.payload == request_bytes

    cases = {
        "decode REQUEST": lambda: decode(request_bytes),
        "encode ACK": lambda: encode(ACK),
        "parse_frame": lambda: parse_frame(request_frame),
        "build_frame ACK": lambda: build_frame(SERVER_MAC, MAC, GATEWAY, LEASED, 67, 68, ack_bytes),
        "frame -> message -> frame": lambda: round_trip(request_frame),
    }
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        print(f"{name:28s} {best * 1e6:7.2f} µs")


if __name__ == "__main__":
    main()

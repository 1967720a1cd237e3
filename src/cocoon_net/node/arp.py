"""Which addresses answer on the bridge: ARP requests from the gateway, replies collected.

The daemon asks this once at start-up, for pool addresses that have a route but no lease (a
lease file lost or written by another program): an address whose VM answers is in use, so its
route is taken over as ours, and the VM guard lets the MAC that answered keep using it.
Frame building and parsing are pure; `probe` is the only I/O.

A request is the one the bridge itself would send (RFC 826): from the bridge's MAC and the
gateway address, broadcast. Only replies (op 2) count, and only from the addresses asked.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterable
from ipaddress import IPv4Address

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST = b"\xff" * 6
# htype Ethernet, ptype IPv4, hlen 6, plen 4, op
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_ETH_HEADER = 14


def request_frame(mac: bytes, sender: IPv4Address, target: IPv4Address) -> bytes:
    """An Ethernet broadcast 'who has target? tell sender' from mac."""
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, ARP_REQUEST, mac, sender.packed, b"\0" * 6, target.packed)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def replier(frame: bytes) -> tuple[IPv4Address, str] | None:
    """The sender address and MAC of an ARP reply frame; None for anything else."""
    if len(frame) < _ETH_HEADER + _ARP.size:
        return None
    if struct.unpack_from("!H", frame, 12)[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _tha, _tpa = _ARP.unpack_from(frame, _ETH_HEADER)
    if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, ARP_REPLY):
        return None
    return IPv4Address(spa), sha.hex(":")


def probe(
    ifname: str,
    sender: IPv4Address,
    targets: Iterable[IPv4Address],
    *,
    rounds: int = 3,
    wait: float = 0.25,
) -> dict[IPv4Address, str]:
    """The targets that answer an ARP request on ifname within `rounds` tries of `wait` s,
    with the MAC that answered.

    Blocking (the daemon runs it in a thread). Raises OSError when ifname cannot be used.
    """
    pending = set(targets)
    answered: dict[IPv4Address, str] = {}
    if not pending:
        return answered
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        mac = sock.getsockname()[4]
        for _ in range(rounds):
            for target in sorted(pending, key=int):
                sock.send(request_frame(mac, sender, target))
            deadline = time.monotonic() + wait
            while pending and (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                answer = replier(sock.recv(2048))
                if answer is not None and answer[0] in pending:
                    pending.discard(answer[0])
                    answered[answer[0]] = answer[1]
            if not pending:
                break
    return answered

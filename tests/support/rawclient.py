"""A small raw-frame DHCP client: hand-made requests sent as Ethernet frames from a VM.

Real clients only ever speak for themselves; a hostile VM does not. This one writes whatever
chaddr, ciaddr and options a test asks for, from the VM's own MAC and through its own eth0,
using the product's codec (dhcp/packet.py) and framing (dhcp/frames.py), and collects the
replies that carry its transaction ids.

The functions run inside the VM's namespace: `Netns(vm.netns).call(exchange, ...)`.
"""

from __future__ import annotations

import secrets
import select
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

from cocoon_net.dhcp import frames, packet
from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, MessageType, Op, Opt

ALL = IPv4Address("255.255.255.255")
_ETH_P_ALL = 0x0003


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def random_mac() -> str:
    """A random locally administered unicast MAC (a chaddr no VM has)."""
    first = (secrets.randbelow(64) << 2) | 0x02
    return ":".join(f"{b:02x}" for b in bytes([first, *secrets.token_bytes(5)]))


def request(
    mtype: MessageType,
    chaddr: str,
    *,
    ciaddr: IPv4Address = ZERO_IP,
    giaddr: IPv4Address = ZERO_IP,
    requested: IPv4Address | None = None,
    server_id: IPv4Address | None = None,
) -> DhcpMessage:
    """A BOOTREQUEST of type mtype with a fresh xid; options 50/54 only when given."""
    options = {Opt.MESSAGE_TYPE.value: bytes([mtype])}
    if requested is not None:
        options[Opt.REQUESTED_IP.value] = requested.packed
    if server_id is not None:
        options[Opt.SERVER_ID.value] = server_id.packed
    return DhcpMessage(
        op=Op.BOOTREQUEST,
        xid=secrets.randbits(32),
        chaddr=mac_bytes(chaddr),
        ciaddr=ciaddr,
        giaddr=giaddr,
        options=options,
    )


def exchange(
    ifname: str,
    src_mac: str,
    messages: Sequence[DhcpMessage],
    *,
    src_ip: IPv4Address = ZERO_IP,
    listen: float = 0.0,
    enough: int = 0,
    gap: float = 0.0,
) -> list[DhcpMessage]:
    """Broadcast each message as one frame from src_mac on ifname, `gap` seconds apart; for
    `listen` seconds after the last, collect the replies whose xid is one we sent, stopping
    early once there are `enough` (when not 0). Run inside the sender's netns."""
    xids = {m.xid for m in messages}
    replies: list[DhcpMessage] = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL)) as sock:
        sock.bind((ifname, _ETH_P_ALL))
        for i, message in enumerate(messages):
            if i and gap:
                time.sleep(gap)
            sock.send(
                frames.build_frame(
                    mac_bytes(src_mac), frames.BROADCAST_MAC, src_ip, ALL,
                    frames.CLIENT_PORT, frames.SERVER_PORT, packet.encode(message),
                )
            )  # fmt: skip
        deadline = time.monotonic() + listen
        while (left := deadline - time.monotonic()) > 0 and not 0 < enough <= len(replies):
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            frame = frames.parse_frame(sock.recv(4096), port=frames.CLIENT_PORT)
            if frame is None:
                continue
            reply = packet.decode(frame.payload)
            if reply.op == Op.BOOTREPLY and reply.xid in xids:
                replies.append(reply)
    return replies

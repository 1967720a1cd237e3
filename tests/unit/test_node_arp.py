from __future__ import annotations

from ipaddress import IPv4Address

from cocoon_net.node import arp

MAC = bytes.fromhex("02c0ac146401")
VM_MAC = bytes.fromhex("02cc00000001")
GW, VM = IPv4Address("172.20.100.1"), IPv4Address("172.20.100.7")


def reply(sender: IPv4Address, op: int = arp.ARP_REPLY, ethertype: int = arp.ETH_P_ARP) -> bytes:
    body = arp._ARP.pack(1, arp.ETH_P_IP, 6, 4, op, VM_MAC, sender.packed, MAC, GW.packed)
    return MAC + VM_MAC + ethertype.to_bytes(2, "big") + body


def test_request_is_a_broadcast_who_has_from_the_gateway() -> None:
    frame = arp.request_frame(MAC, GW, VM)
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == MAC
    assert frame[12:14] == b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4, request
    assert frame[22:28] == MAC and frame[28:32] == GW.packed
    assert frame[38:42] == VM.packed
    assert arp.replier(frame) is None  # our own request is not an answer


def test_only_arp_replies_name_their_sender() -> None:
    assert arp.replier(reply(VM)) == (VM, VM_MAC.hex(":"))
    assert arp.replier(reply(VM, op=arp.ARP_REQUEST)) is None
    assert arp.replier(reply(VM, ethertype=arp.ETH_P_IP)) is None
    assert arp.replier(reply(VM)[:30]) is None

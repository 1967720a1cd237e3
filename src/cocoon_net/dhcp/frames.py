"""Ethernet II / IPv4 / UDP framing for the server's AF_PACKET socket on the bridge.

The server reads requests as layer-2 frames and writes replies as layer-2 frames: a client that
has no address yet can then be answered by unicast to its MAC and offered address (RFC 2131
§4.1), without the ARP-cache injection that caps dnsmasq at the neighbour-table size.

    Ethernet: dst(6) src(6) type(2) | IPv4: 20-60 octets | UDP: 8 octets | DHCP payload

parse_frame() ignores what is not IPv4/UDP to our port (returns None) and raises MalformedPacket
for broken IPv4/UDP framing. build_frame() writes a reply frame with both checksums.
A classic BPF program lets the kernel drop everything else before it reaches Python.

802.1Q: cni0 carries untagged traffic only. The kernel strips a VLAN tag before a packet socket
sees the frame, so parse_frame never meets one; the filter drops frames that carried a VLAN ID
(see BPF_DHCP_SERVER) rather than serving a client on a VLAN we do not route.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address
from typing import NamedTuple

from cocoon_net import bpf
from cocoon_net.bpf import attach_filter
from cocoon_net.dhcp.packet import MalformedPacket

ETH_P_IP = 0x0800
ETH_HEADER_SIZE = 14
IP_MIN_HEADER_SIZE = 20
UDP_HEADER_SIZE = 8
IPPROTO_UDP = 17
SERVER_PORT = 67  # RFC 2131 §4.1
CLIENT_PORT = 68
BROADCAST_MAC = b"\xff" * 6
_IP_FLAG_MF = 0x2000
_IP_FRAG_OFFSET = 0x1FFF
_DEFAULT_TTL = 64

_ETH = struct.Struct("!6s6sH")
# version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol, checksum, src, dst
_IPV4 = struct.Struct("!BBHHHBBHII")
_UDP = struct.Struct("!HHHH")
_PSEUDO = struct.Struct("!IIxBH")  # RFC 768 pseudo-header: src, dst, zero, protocol, UDP length


class UdpFrame(NamedTuple):
    """One received or sent IPv4/UDP frame. `payload` is the UDP data (the DHCP message).

    A named tuple, not a frozen dataclass: one is built per request, and a tuple is built in
    a single step instead of one object.__setattr__ per field."""

    src_mac: bytes
    dst_mac: bytes
    src_ip: IPv4Address
    dst_ip: IPv4Address
    src_port: int
    dst_port: int
    payload: bytes


def _ones_complement_sum(data: bytes) -> int:
    """RFC 1071 sum of 16-bit words, folded to 16 bits.

    2**16 is 1 modulo 0xFFFF, so the end-around-carry sum of the words equals the whole string
    read as one big integer, modulo 0xFFFF; CPython does that in C, far faster than a word loop.
    The only ambiguity is 0 versus 0xFFFF (the two ones'-complement zeros): a non-zero string
    sums to 0xFFFF.
    """
    if len(data) & 1:
        data += b"\0"  # RFC 768: pad an odd length with a zero octet for the sum
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and data.count(0) != len(data):
        return 0xFFFF
    return total


def _checksum(data: bytes) -> int:
    return ~_ones_complement_sum(data) & 0xFFFF


def udp_checksum(src_ip: IPv4Address, dst_ip: IPv4Address, segment: bytes) -> int:
    """UDP checksum over the pseudo-header and `segment` (header with checksum 0, then data).

    A computed 0 is sent as 0xFFFF, since 0 on the wire means "no checksum" (RFC 768).
    """
    pseudo = _PSEUDO.pack(int(src_ip), int(dst_ip), IPPROTO_UDP, len(segment))
    return _checksum(pseudo + segment) or 0xFFFF


def parse_frame(frame: bytes, port: int = SERVER_PORT) -> UdpFrame | None:
    """Return the UDP datagram to `port` that `frame` carries, or None if it carries none.

    Raises MalformedPacket (reasons too_short, bad_ip_header, bad_ip_checksum, fragment,
    bad_udp_length) for an IPv4/UDP frame whose framing is broken. The UDP checksum is not
    verified: a frame from a local veth may still carry the partial checksum of
    CHECKSUM_PARTIAL offload, which would make a correct packet look corrupt.
    """
    size = len(frame)
    if size < ETH_HEADER_SIZE:
        raise MalformedPacket("too_short", f"{size}-octet frame has no Ethernet header")
    dst_mac, src_mac, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_IP:
        return None
    if size < ETH_HEADER_SIZE + IP_MIN_HEADER_SIZE:
        raise MalformedPacket("bad_ip_header", f"{size}-octet frame cannot hold an IPv4 header")
    (ver_ihl, _tos, total, _ident, frag, _ttl, proto, _csum, src_ip, dst_ip) = _IPV4.unpack_from(
        frame, ETH_HEADER_SIZE
    )
    ihl = (ver_ihl & 0x0F) * 4
    # RFC 791 §3.1: version 4, header 5-15 words, total length covers the header. Frames may
    # be longer than the datagram (Ethernet pads to 60 octets), never shorter.
    if ver_ihl >> 4 != 4 or ihl < IP_MIN_HEADER_SIZE:
        raise MalformedPacket("bad_ip_header", f"version/IHL octet {ver_ihl:#04x}")
    if not ihl <= total <= size - ETH_HEADER_SIZE:
        raise MalformedPacket(
            "bad_ip_header",
            f"total length {total}, header {ihl}, frame {size} octets",
        )
    if proto != IPPROTO_UDP:
        return None
    # DHCP messages are never fragmented by a client (RFC 2131 §2: 576 fits every link);
    # reassembly is the kernel's job on a UDP socket and we do not redo it here.
    if frag & (_IP_FLAG_MF | _IP_FRAG_OFFSET):
        raise MalformedPacket("fragment", f"IPv4 fragment (flags/offset {frag:#06x})")
    ip_end = ETH_HEADER_SIZE + ihl
    if _ones_complement_sum(frame[ETH_HEADER_SIZE:ip_end]) != 0xFFFF:
        raise MalformedPacket("bad_ip_checksum", "IPv4 header checksum does not match")
    if total < ihl + UDP_HEADER_SIZE:
        raise MalformedPacket("bad_udp_length", f"IPv4 total length {total} leaves no UDP header")
    src_port, dst_port, udp_len, _ucsum = _UDP.unpack_from(frame, ip_end)
    if dst_port != port:
        return None
    # RFC 768: the UDP length counts header and data and must fit in the IP datagram.
    if not UDP_HEADER_SIZE <= udp_len <= total - ihl:
        raise MalformedPacket(
            "bad_udp_length", f"UDP length {udp_len} in a {total - ihl}-octet IP payload"
        )
    data_start = ip_end + UDP_HEADER_SIZE
    return UdpFrame(
        src_mac,
        dst_mac,
        _COMMON_IPS.get(src_ip) or IPv4Address(src_ip),
        _COMMON_IPS.get(dst_ip) or IPv4Address(dst_ip),
        src_port,
        dst_port,
        frame[data_start : ip_end + udp_len],
    )


# A client without an address sends from 0.0.0.0 to 255.255.255.255: shared, not built anew.
_COMMON_IPS = {0: IPv4Address(0), 0xFFFFFFFF: IPv4Address(0xFFFFFFFF)}


# Ethernet, IPv4 (no options) and UDP headers of a reply, packed at once: dst MAC, src MAC, type,
# version/IHL, TOS, total length, id, flags/fragment, TTL, protocol, checksum, src, dst, then
# UDP ports, length, checksum.
_REPLY_HEADERS = struct.Struct("!6s6sHBBHHHBBHIIHHHH")


class Framer:
    """Frames for one sender (MAC, IPv4 address, UDP port): what build_frame makes, with the
    sender's share of both checksums summed once instead of per frame.

    Checksums by parts (RFC 1071 §2(B)): the ones'-complement sum is associative, so the
    fixed header words are added up front and only total length, destination and payload are
    added per frame. TTL 64, DF clear, identification 0 (the datagram is never fragmented, so
    the id is unused, RFC 6864 §4.1). No Ethernet padding: the kernel pads short frames.
    """

    def __init__(self, src_mac: bytes, src_ip: IPv4Address, src_port: int) -> None:
        self.src_mac, self.src_ip, self.src_port = src_mac, int(src_ip), src_port
        ip_words = (self.src_ip >> 16) + (self.src_ip & 0xFFFF)
        # Version/IHL/TOS and TTL/protocol words, then the source address.
        self._ip_sum = 0x4500 + (_DEFAULT_TTL << 8 | IPPROTO_UDP) + ip_words
        # Pseudo-header source and protocol (RFC 768), and the source port.
        self._udp_sum = ip_words + IPPROTO_UDP + src_port

    def frame(self, dst_mac: bytes, dst_ip: int, dst_port: int, payload: bytes) -> bytes:
        """An Ethernet II frame carrying one UDP datagram to dst_ip (an int), checksums set."""
        udp_len = UDP_HEADER_SIZE + len(payload)
        total = IP_MIN_HEADER_SIZE + udp_len
        if total > 0xFFFF:
            raise ValueError(f"UDP payload of {len(payload)} octets does not fit in one datagram")
        dst_words = (dst_ip >> 16) + (dst_ip & 0xFFFF)
        ip_csum = ~_fold(self._ip_sum + total + dst_words) & 0xFFFF
        padded = payload + b"\0" if len(payload) & 1 else payload  # RFC 768: pad with a zero
        # The pseudo-header and the UDP header both carry the UDP length.
        udp_sum = self._udp_sum + dst_words + dst_port + 2 * udp_len
        udp_sum += int.from_bytes(padded, "big") % 0xFFFF
        # Nonzero words (the protocol) are in the sum, so a multiple of 0xFFFF stands for 0xFFFF,
        # whose complement 0 goes out as 0xFFFF: 0 means "no checksum" (RFC 768).
        udp_csum = ~_fold(udp_sum) & 0xFFFF or 0xFFFF
        headers = _REPLY_HEADERS.pack(
            dst_mac, self.src_mac, ETH_P_IP,
            0x45, 0, total, 0, 0, _DEFAULT_TTL, IPPROTO_UDP, ip_csum, self.src_ip, dst_ip,
            self.src_port, dst_port, udp_len, udp_csum,
        )  # fmt: skip
        return headers + payload


def _fold(total: int) -> int:
    """A nonzero sum of 16-bit words, folded to its 16-bit ones'-complement form (1..0xFFFF)."""
    return total % 0xFFFF or 0xFFFF


def build_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: IPv4Address,
    dst_ip: IPv4Address,
    src_port: int,
    dst_port: int,
    payload: bytes,
) -> bytes:
    """An Ethernet II frame carrying one UDP datagram, with IPv4 and UDP checksums filled in
    (see Framer, which a sender of many frames keeps)."""
    return Framer(src_mac, src_ip, src_port).frame(dst_mac, int(dst_ip), dst_port, payload)


# --- Kernel-side filter (classic BPF, see Documentation/networking/filter.rst) ---------------

_SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # ancillary load SKF_AD_OFF + SKF_AD_PKTTYPE (linux/filter.h)
_PACKET_BROADCAST = 1  # PACKET_HOST is 0 (linux/if_packet.h)

# Accept IPv4 UDP to port 67 that is not a fragment and was sent to us: to the bridge's MAC or
# to broadcast. That leaves out our own transmissions (PACKET_OUTGOING), frames flooded to
# other MACs, and frames with an 802.1Q VLAN ID, which reach an ETH_P_IP packet socket untagged
# but marked PACKET_OTHERHOST (net/core/dev.c). Jump offsets count from the next instruction;
# instruction 11 accepts, 12 drops.
BPF_DHCP_SERVER: bpf.Program = (
    (bpf.LD_W_ABS, 0, 0, _SKF_AD_PKTTYPE),  # 0
    (bpf.JGT_K, 10, 0, _PACKET_BROADCAST),  # 1  not HOST or BROADCAST: drop
    (bpf.LD_H_ABS, 0, 0, 12),  # 2  ethertype
    (bpf.JEQ_K, 0, 8, ETH_P_IP),  # 3
    (bpf.LD_B_ABS, 0, 0, 23),  # 4  IPv4 protocol
    (bpf.JEQ_K, 0, 6, IPPROTO_UDP),  # 5
    (bpf.LD_H_ABS, 0, 0, 20),  # 6  IPv4 flags and fragment offset
    (bpf.JSET_K, 4, 0, _IP_FLAG_MF | _IP_FRAG_OFFSET),  # 7
    (bpf.LDX_B_MSH, 0, 0, ETH_HEADER_SIZE),  # 8
    (bpf.LD_H_IND, 0, 0, ETH_HEADER_SIZE + 2),  # 9  UDP destination port
    (bpf.JEQ_K, 0, 1, SERVER_PORT),  # 10
    (bpf.RET_K, 0, 0, bpf.ACCEPT),  # 11 accept
    (bpf.RET_K, 0, 0, 0),  # 12 drop
)

# The same, without DISCOVERs: what the server's socket takes while it is overloaded, so that
# the kernel drops new exchanges for free and the queue keeps its room for the REQUESTs that
# complete exchanges already under way (DhcpServer, the DISCOVER gate). A DISCOVER is known
# by its first option, 53 of length 1 holding 1, where every client we know puts it; one that
# has it elsewhere passes, to be handled or shed as any other. X is loaded here for the
# options' offset (Ethernet, IPv4 header, UDP header, 236 fixed bytes and the magic cookie);
# BPF_DHCP_SERVER loads it again for itself. A frame too short for these loads is dropped by
# the kernel, as is anything shorter than BOOTP's 300 bytes' worth of DHCP.
_OPTIONS = ETH_HEADER_SIZE + UDP_HEADER_SIZE + 240
BPF_DHCP_SERVER_NO_DISCOVER: bpf.Program = (
    (bpf.LDX_B_MSH, 0, 0, ETH_HEADER_SIZE),  # 0
    (bpf.LD_B_IND, 0, 0, _OPTIONS),  # 1  first option's code
    (bpf.JEQ_K, 0, 3, 53),  # 2  not 53: on to BPF_DHCP_SERVER
    (bpf.LD_H_IND, 0, 0, _OPTIONS + 1),  # 3  its length and first byte
    (bpf.JEQ_K, 0, 1, 0x0101),  # 4  not DISCOVER: on to BPF_DHCP_SERVER
    (bpf.RET_K, 0, 0, 0),  # 5  a DISCOVER: drop
    *BPF_DHCP_SERVER,
)


def set_filter(sock: socket.socket, *, discovers: bool) -> None:
    """Swap the server socket's filter: with or without DISCOVERs. The kernel replaces the
    old one at once for every frame not yet queued; those queued stay."""
    attach_filter(sock, BPF_DHCP_SERVER if discovers else BPF_DHCP_SERVER_NO_DISCOVER)


def open_server_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` that receives only DHCP-server traffic and can send frames.

    The socket is created with protocol 0, which receives nothing, and bound to IPv4 only after
    the filter is attached: otherwise frames queued in between would bypass the filter.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        attach_filter(sock, BPF_DHCP_SERVER)
        sock.bind((ifname, ETH_P_IP))
    except BaseException:
        sock.close()
        raise
    return sock

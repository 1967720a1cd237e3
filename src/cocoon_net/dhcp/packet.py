"""DHCPv4 wire format: bytes <-> DhcpMessage (RFC 2131 §2, RFC 2132, RFC 3396).

    op htype hlen hops | xid | secs flags | ciaddr | yiaddr | siaddr | giaddr   (28 octets)
    chaddr (16) | sname (64) | file (128)                                        (236 octets)
    magic cookie 99.130.83.99 | options: code, length, value ... END             (RFC 2131 §3)

decode() is the trust boundary of the DHCP server: any byte string either becomes a DhcpMessage
that the policy may believe without further checks, or raises MalformedPacket, whose `reason` is
a short constant the server counts drops by. It never raises anything else.

encode() is the inverse for replies. It knows nothing about what a reply should say; the policy
builds the DhcpMessage and chooses the options and their order.

Both run once per packet on the server's hot path, so they use one precompiled struct for the
fixed header and touch each option once, without per-option objects beyond the dict entries.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from cocoon_net.dhcp.model import ZERO_IP, DhcpMessage, Op, Opt

# op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file.
# Addresses travel as integers: IPv4Address(int) and int(IPv4Address) are the cheapest ways in
# and out of the ipaddress type.
_HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")
HEADER_SIZE = _HEADER.size  # 236
# The same header for decode(), which skips sname and file: nearly every request leaves both
# empty, and they are read from the message only when their first octet is not NUL.
_REQUEST_HEADER = struct.Struct("!BBBBIHHIIII6s")
MAGIC_COOKIE = b"\x63\x82\x53\x63"  # 99.130.83.99, RFC 2131 §3
# Plain ints: comparing them costs less than comparing IntEnum members, in a per-octet loop.
_PAD, _END, _MESSAGE_TYPE = int(Opt.PAD), int(Opt.END), int(Opt.MESSAGE_TYPE)
_OVERLOAD = int(Opt.OVERLOAD)
# Codes encode() writes as they come: not framing (PAD, END), not option 52 (the sname and
# file it would point into are written as fields), and not 53, which goes first.
_PLAIN_CODES = frozenset(range(1, 255)) - {_OVERLOAD, _MESSAGE_TYPE}
OPTIONS_OFFSET = HEADER_SIZE + len(MAGIC_COOKIE)  # 240
_SNAME = slice(44, 108)
_FILE = slice(108, 236)

HTYPE_ETHERNET = 1  # RFC 1700 hardware type; the only link cocoon-net serves
HLEN_ETHERNET = 6

# Largest request decode() accepts. Bigger than any real client request; the same 4096-octet read
# buffer bounded what the Go server could receive, and it bounds the work one packet can cost.
MAX_MESSAGE_SIZE = 4096
# A BOOTP message with its 64-octet vendor field is 300 octets (RFC 951); RFC 1542 §2.1 notes
# that some clients and relays drop anything shorter, so every reply is padded to this size.
MIN_REPLY_SIZE = 300
# RFC 2131 §2: every client accepts a 576-octet IP datagram, which leaves 576 - 20 (IP) - 8 (UDP)
# octets for the DHCP message. The policy raises this from the client's option 57
# (options.budget); encode() only enforces the number it is given.
DEFAULT_MAX_SIZE = 548

# Options whose length RFC 2132 fixes and which the policy reads; a wrong length here means the
# packet is malformed, not that the option is absent: §9.6 (53), §9.1 (50), §9.7 (54),
# §9.2 (51), §9.10 (57). Option 52 (§9.3) is checked where it is read.
_FIXED_LENGTHS = tuple(
    (int(code), length)
    for code, length in (
        (Opt.MESSAGE_TYPE, 1),
        (Opt.REQUESTED_IP, 4),
        (Opt.SERVER_ID, 4),
        (Opt.LEASE_TIME, 4),
        (Opt.MAX_MESSAGE_SIZE, 2),
    )
)
_OPS = (None, Op.BOOTREQUEST, Op.BOOTREPLY)


class MalformedPacket(Exception):
    """The peer sent something that is not a well-formed message we serve.

    `reason` is a short constant for metrics (one label value per kind of defect); the message
    text says what was wrong, for logs.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason

    def __reduce__(self) -> tuple[type[MalformedPacket], tuple[str, str]]:
        # Keep the two-argument constructor picklable (errors cross process boundaries in tests).
        return (type(self), (self.reason, str(self).partition(": ")[2]))


class MessageTooLarge(ValueError):
    """encode() could not fit the reply in the size the client accepts.

    The policy chose the options, so it is the one that knows which to leave out; encode() never
    drops options silently.
    """


def _cstring(data: bytes, field: slice) -> bytes:
    """sname and file are NUL-terminated strings (RFC 2131 §2); most requests leave them empty,
    and the test of their first octet spares those the copy."""
    return b"" if data[field.start] == 0 else data[field].partition(b"\0")[0]


def _parse_options(data: bytes, pos: int, end: int, options: dict[int, bytes], where: str) -> bool:
    """Read TLVs from data[pos:end] into `options`; return True if an END option was seen.

    PAD (0) is a single octet and END (255) stops the field (RFC 2132 §3.1, §3.2). A code that
    appears again is appended to its earlier parts (RFC 3396 §5), across fields too, in the order
    options, file, sname that RFC 2131 §4.1 prescribes.
    """
    while pos < end:
        code = data[pos]
        if code == 0:
            pos += 1
            continue
        if code == 255:
            return True
        if pos + 1 >= end:
            raise MalformedPacket("truncated_option", f"option {code} has no length in {where}")
        stop = pos + 2 + data[pos + 1]
        if stop > end:
            raise MalformedPacket("truncated_option", f"option {code} runs past the end of {where}")
        value = data[pos + 2 : stop]
        earlier = options.get(code)
        options[code] = value if earlier is None else earlier + value
        pos = stop
    return False


def decode(data: bytes) -> DhcpMessage:
    """Parse one DHCP message (the UDP payload). Raise MalformedPacket on any defect."""
    size = len(data)
    if size < OPTIONS_OFFSET:
        raise MalformedPacket("too_short", f"{size} octets, a DHCP message has at least 240")
    if size > MAX_MESSAGE_SIZE:
        raise MalformedPacket("too_long", f"{size} octets, the limit is {MAX_MESSAGE_SIZE}")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, mac) = (
        _REQUEST_HEADER.unpack_from(data)
    )
    if op not in {1, 2}:  # a constant frozenset: no allocation per packet
        raise MalformedPacket("bad_op", f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    # §9.1 #6 of the reference review: the Go server keyed clients on chaddr[:hlen] without
    # checking htype/hlen, so hlen 0 made every such client share the identity "". We serve
    # Ethernet clients only, and their identity is always six octets.
    if htype != HTYPE_ETHERNET:
        raise MalformedPacket("bad_htype", f"hardware type {htype}, only Ethernet (1) is served")
    if hlen != HLEN_ETHERNET:
        raise MalformedPacket("bad_hlen", f"hardware address length {hlen}, Ethernet needs 6")
    # A NIC address is never all-zero and never a group address (IEEE 802 I/G bit): such a
    # chaddr names no single client and would be another shared identity.
    if mac[0] & 1 or mac == b"\0\0\0\0\0\0":
        raise MalformedPacket("bad_chaddr", f"chaddr {mac.hex(':')} is not a unicast MAC")
    if data[HEADER_SIZE:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise MalformedPacket("bad_cookie", f"magic cookie {data[236:240].hex()} is not 63825363")

    sname_text = _cstring(data, _SNAME)
    file_text = _cstring(data, _FILE)

    options: dict[int, bytes] = {}
    # RFC 2131 §4.1 / RFC 2132 §3.2: the options field ends with END.
    if not _parse_options(data, OPTIONS_OFFSET, size, options, "options"):
        raise MalformedPacket("no_end", "options field has no END option")

    overload = options.pop(_OVERLOAD, None)
    if overload is not None:
        # RFC 2132 §9.3: 1 = file, 2 = sname, 3 = both hold options; RFC 2131 §4.1: read file
        # before sname. The fields are fixed-size, so their end also ends them when a sender
        # left out END there. The names they would have held are empty.
        if len(overload) != 1 or not 1 <= overload[0] <= 3:
            raise MalformedPacket("bad_overload", f"option 52 value {overload.hex()} is not 1-3")
        if overload[0] & 1:
            _parse_options(data, _FILE.start, _FILE.stop, options, "file")
            file_text = b""
        if overload[0] & 2:
            _parse_options(data, _SNAME.start, _SNAME.stop, options, "sname")
            sname_text = b""
        if Opt.OVERLOAD in options:
            raise MalformedPacket("bad_overload", "option 52 inside an overloaded field")

    for code, length in _FIXED_LENGTHS:
        value = options.get(code)
        if value is not None and len(value) != length:
            raise MalformedPacket(
                "bad_option_length",
                f"option {code} has {len(value)} octets, not {length}",
            )

    return DhcpMessage(
        op=_OPS[op],  # type: ignore[arg-type]  # op is 1 or 2, checked above
        xid=xid,
        chaddr=mac,
        htype=htype,
        hops=hops,
        secs=secs,
        flags=flags,
        ciaddr=ZERO_IP if ciaddr == 0 else IPv4Address(ciaddr),
        yiaddr=ZERO_IP if yiaddr == 0 else IPv4Address(yiaddr),
        siaddr=ZERO_IP if siaddr == 0 else IPv4Address(siaddr),
        giaddr=ZERO_IP if giaddr == 0 else IPv4Address(giaddr),
        sname=sname_text,
        file=file_text,
        options=options,
    )


def _put_option(out: bytearray, code: int, value: bytes) -> None:
    """Append one option; values over 255 octets become consecutive instances (RFC 3396 §7)."""
    size = len(value)
    if size <= 255:
        out.append(code)
        out.append(size)
        out += value
        return
    for start in range(0, size, 255):
        chunk = value[start : start + 255]
        out.append(code)
        out.append(len(chunk))
        out += chunk


def peek_message_type(data: bytes, start: int) -> int | None:
    """Option 53 of the DHCP message at data[start:], read without decoding the rest, or None
    when it is not found in the options field. For shedding load only: a message that is
    served still goes through decode(), which checks everything this skips (an option 53 in
    an overloaded sname or file field is not seen here)."""
    pos, end = start + OPTIONS_OFFSET, len(data)
    if data[start + HEADER_SIZE : start + OPTIONS_OFFSET] != MAGIC_COOKIE:
        return None
    while pos + 2 < end:
        code = data[pos]
        if code == _PAD:
            pos += 1
        elif code == _END:
            return None
        elif code == _MESSAGE_TYPE:
            return data[pos + 2] if data[pos + 1] == 1 else None
        else:
            pos += 2 + data[pos + 1]
    return None


def encode(msg: DhcpMessage, *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Serialise a message: header, cookie, options, END, padding to 300 octets.

    Options go out in the dict's order, except that option 53 always goes first: RFC 2131 does
    not require it, but some client stacks look for the message type at the start of the field.
    `max_size` is the largest DHCP message (UDP payload) the client accepts: its option 57
    less the IP and UDP headers, as options.budget() computes it. Raises MessageTooLarge when
    the message does not fit, ValueError for fields that cannot be encoded.
    """
    if len(msg.chaddr) > 16 or len(msg.sname) > 64 or len(msg.file) > 128:
        # struct would silently truncate these.
        raise ValueError("chaddr, sname or file longer than its BOOTP field")
    ciaddr, yiaddr, siaddr, giaddr = msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr
    out = bytearray(
        _HEADER.pack(
            msg.op,
            msg.htype,
            len(msg.chaddr),
            msg.hops,
            msg.xid,
            msg.secs,
            msg.flags,
            # Most replies leave ciaddr, siaddr and giaddr zero: the shared ZERO_IP needs no
            # conversion.
            0 if ciaddr is ZERO_IP else int(ciaddr),
            0 if yiaddr is ZERO_IP else int(yiaddr),
            0 if siaddr is ZERO_IP else int(siaddr),
            0 if giaddr is ZERO_IP else int(giaddr),
            msg.chaddr,
            msg.sname,
            msg.file,
        )
    )
    out += MAGIC_COOKIE
    options = msg.options
    first = options.get(_MESSAGE_TYPE)
    if first is not None:
        _put_option(out, _MESSAGE_TYPE, first)
    # Written inline, not through _put_option: one call per option was half of the cost of
    # encoding a typical reply. A long value takes the call (RFC 3396 split).
    for code, value in options.items():
        size = len(value)
        if size <= 255 and code in _PLAIN_CODES:
            out.append(code)
            out.append(size)
            out += value
        elif code != _MESSAGE_TYPE:
            if code not in _PLAIN_CODES:
                # PAD and END are framing, and overload would contradict the sname/file we
                # write.
                raise ValueError(f"option code {code} cannot be encoded as an option")
            _put_option(out, code, value)
    out.append(_END)
    if len(out) < MIN_REPLY_SIZE:
        out += bytes(MIN_REPLY_SIZE - len(out))
    if len(out) > max_size:
        raise MessageTooLarge(f"reply is {len(out)} octets, the client accepts {max_size}")
    return bytes(out)

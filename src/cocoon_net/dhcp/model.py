"""Plain data shared by the DHCP codec, policy, lease table and store.

Nothing here does I/O. DhcpMessage is what packet.decode() returns and packet.encode() takes;
Lease is one row of the lease table and one record of the journal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address

ZERO_IP = IPv4Address(0)
BROADCAST_FLAG = 0x8000


class Op(enum.IntEnum):
    BOOTREQUEST = 1
    BOOTREPLY = 2


class MessageType(enum.IntEnum):
    """Option 53 values (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(enum.IntEnum):
    """Option codes cocoon-net reads or writes (RFC 2132, 3046, 3397, 3442, 4702)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    BROADCAST_ADDRESS = 28
    NTP = 42
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAM_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    CLIENT_FQDN = 81
    RELAY_AGENT_INFO = 82
    DOMAIN_SEARCH = 119
    CLASSLESS_ROUTES = 121
    MS_CLASSLESS_ROUTES = 249
    INTERFACE_MTU = 26
    END = 255


@dataclass(frozen=True, init=False)
class DhcpMessage:
    """One BOOTP/DHCP message (RFC 2131 §2). Options keep their raw bytes, in wire order.

    `options` maps code -> value bytes; a code that appeared several times has its parts
    concatenated (RFC 3396). `chaddr` holds the first `hlen` bytes of the 16-byte field.
    """

    op: Op
    xid: int
    chaddr: bytes
    htype: int = 1
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = ZERO_IP
    yiaddr: IPv4Address = ZERO_IP
    siaddr: IPv4Address = ZERO_IP
    giaddr: IPv4Address = ZERO_IP
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)
    # chaddr as lower-case colon hex, the client's identity (leases.json "mac"): derived, set
    # once here because the policy reads it several times per request.
    mac: str = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        op: Op,
        xid: int,
        chaddr: bytes,
        htype: int = 1,
        hops: int = 0,
        secs: int = 0,
        flags: int = 0,
        ciaddr: IPv4Address = ZERO_IP,
        yiaddr: IPv4Address = ZERO_IP,
        siaddr: IPv4Address = ZERO_IP,
        giaddr: IPv4Address = ZERO_IP,
        sname: bytes = b"",
        file: bytes = b"",
        options: dict[int, bytes] | None = None,
    ) -> None:
        # Two messages per packet are built on the server's hot path. The generated frozen
        # __init__ sets the fields one object.__setattr__ at a time (about 3 us); one update
        # of the instance dict sets the same fields and leaves the instance as frozen.
        self.__dict__.update(
            op=op, xid=xid, chaddr=chaddr, htype=htype, hops=hops, secs=secs, flags=flags,
            ciaddr=ciaddr, yiaddr=yiaddr, siaddr=siaddr, giaddr=giaddr, sname=sname, file=file,
            options={} if options is None else options, mac=chaddr.hex(":"),
        )  # fmt: skip

    @property
    def message_type(self) -> MessageType | None:
        return _MESSAGE_TYPES.get(self.options.get(_MESSAGE_TYPE))

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> IPv4Address | None:
        raw = self.options.get(code)
        if raw is None or len(raw) != 4:
            return None
        return IPv4Address(raw)


# Option 53's value -> its type; a wrong length or an unknown value is no type at all.
_MESSAGE_TYPES: dict[bytes | None, MessageType] = {bytes([t]): t for t in MessageType}
# Read per packet: a module name, not an Enum class attribute (~0.1 us a read in Python 3.11,
# whose EnumType.__getattr__ puts every class attribute lookup on a slow path).
_MESSAGE_TYPE = Opt.MESSAGE_TYPE


@dataclass(frozen=True, init=False)
class Lease:
    """A granted address. `expires` is a UNIX timestamp (seconds, float)."""

    mac: str
    ip: IPv4Address
    expires: float
    hostname: str = ""
    client_id: str = ""  # option 61 as hex, recorded and echoed, never an identity

    def __init__(
        self, mac: str, ip: IPv4Address, expires: float, hostname: str = "", client_id: str = ""
    ) -> None:
        # Built for every grant on the server's hot path: one update of the instance dict
        # instead of the generated frozen __init__'s object.__setattr__ per field.
        self.__dict__.update(
            mac=mac, ip=ip, expires=expires, hostname=hostname, client_id=client_id
        )

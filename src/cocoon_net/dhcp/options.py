"""Option values and the options chain: what goes into an OFFER, ACK or NAK, and in what order.

Value builders turn settings into option bytes (RFC 2132 §2 TLV values; the codec adds code,
length, RFC 3396 splitting and END). Each chain step owns one group of options, so "where is the
MTU set?" has a one-word answer: the step named `mtu`. Steps add candidates; `select` then
keeps what the client asked for in option 55, in the client's order, plus what RFC 2131 says
every reply carries, and `fit` trims to the client's option 57 budget.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network

from cocoon_net.dhcp.model import DhcpMessage, MessageType, Opt
from cocoon_net.dhcp.settings import DhcpSettings

# ---------------------------------------------------------------------------- value builders


def ip_list(addresses: Iterable[IPv4Address]) -> bytes:
    return b"".join(ip.packed for ip in addresses)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def domain_string(name: str) -> bytes:
    """Option 15 (RFC 2132 §3.17): the name as ASCII, no trailing dot, no NUL."""
    return name.rstrip(".").encode("ascii")


def search_list(names: Iterable[str]) -> bytes:
    """Option 119 (RFC 3397 §2): RFC 1035 §3.1 names with §4.1.4 compression.

    Pointers are offsets from the start of the option value (RFC 3397 §2), so a suffix that
    was already written (e.g. "apple.com" after "eng.apple.com") becomes a 2-byte pointer.
    """
    out = bytearray()
    seen: dict[tuple[str, ...], int] = {}
    for name in names:
        labels = tuple(label.lower() for label in name.rstrip(".").split(".") if label)
        for i in range(len(labels)):
            suffix = labels[i:]
            if suffix in seen:
                out += u16(0xC000 | seen[suffix])
                break
            if len(out) < 0x4000:  # a pointer has 14 bits of offset
                seen[suffix] = len(out)
            label = labels[i].encode("ascii")
            out += bytes([len(label)]) + label
        else:
            out.append(0)
    return bytes(out)


def classless_routes(routes: Iterable[tuple[IPv4Network, IPv4Address]]) -> bytes:
    """Options 121 and 249 (RFC 3442 §3): width, significant octets of the destination, router."""
    out = bytearray()
    for dest, router in routes:
        width = dest.prefixlen
        significant = (width + 7) // 8
        out.append(width)
        out += dest.network_address.packed[:significant]
        out += router.packed
    return bytes(out)


def routes_with_default(settings: DhcpSettings) -> tuple[tuple[IPv4Network, IPv4Address], ...]:
    """The configured routes, plus 0.0.0.0/0 via the router unless one is configured.

    RFC 3442 §1: a client that receives option 121 MUST ignore option 3, so the default
    route has to travel inside 121 too.
    """
    routes = settings.classless_routes
    if any(dest.prefixlen == 0 for dest, _ in routes):
        return routes
    return (*routes, (IPv4Network("0.0.0.0/0"), settings.router))


# ---------------------------------------------------------------------------- the chain

Options = dict[int, bytes]
# A step reads the settings and whether the reply hands out a lease (`leased`), never the
# request; only `echo` copies from the request. for_reply() caches on exactly that.
Step = Callable[[DhcpMessage, Options, DhcpSettings, bool], None]


def server_id(request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool) -> None:
    # RFC 2131 table 3: option 54 MUST be in every OFFER, ACK and NAK.
    reply[Opt.SERVER_ID] = settings.server_id.packed


def lease_times(request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool) -> None:
    # RFC 2131 table 3: 51 MUST be in OFFER and ACK-to-REQUEST, MUST NOT in ACK-to-INFORM
    # (which is the call without a lease). T1/T2 per §4.4.5.
    if not leased:
        return
    reply[Opt.LEASE_TIME] = u32(settings.lease_time)
    reply[Opt.RENEWAL_TIME] = u32(settings.t1)
    reply[Opt.REBINDING_TIME] = u32(settings.t2)


def subnet_and_router(
    request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool
) -> None:
    reply[Opt.SUBNET_MASK] = settings.subnet.netmask.packed
    reply[Opt.ROUTER] = settings.router.packed


def mtu(request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool) -> None:
    if settings.mtu is not None:
        reply[Opt.INTERFACE_MTU] = u16(settings.mtu)


def dns_and_domain(
    request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool
) -> None:
    # RFC 2132 §3.8: option 6 has at least one address; with none we send no option 6 at all.
    if settings.dns:
        reply[Opt.DNS] = ip_list(settings.dns)
    if settings.domain_name:
        reply[Opt.DOMAIN_NAME] = domain_string(settings.domain_name)
    if settings.search:
        reply[Opt.DOMAIN_SEARCH] = search_list(settings.search)


def ntp(request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool) -> None:
    if settings.ntp:
        reply[Opt.NTP] = ip_list(settings.ntp)


def classless_route_options(
    request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool
) -> None:
    # 249 is Microsoft's pre-standard code for the same format; Windows guests ask for it.
    if settings.classless_routes:
        value = classless_routes(routes_with_default(settings))
        reply[Opt.CLASSLESS_ROUTES] = value
        reply[Opt.MS_CLASSLESS_ROUTES] = value


def echo(request: DhcpMessage, reply: Options, settings: DhcpSettings, leased: bool) -> None:
    # RFC 6842 §3: the server MUST echo the client identifier; RFC 3046 §2.2: the server
    # MUST copy option 82 into its reply (only relayed packets carry it).
    for code in (Opt.CLIENT_ID, Opt.RELAY_AGENT_INFO):
        if code in request.options:
            reply[code] = request.options[code]


CHAIN: tuple[Step, ...] = (
    server_id,
    lease_times,
    subnet_and_router,
    mtu,
    dns_and_domain,
    ntp,
    classless_route_options,
    echo,
)
# NAKs carry only what identifies the server and the client (RFC 2131 table 3).
NAK_CHAIN: tuple[Step, ...] = (server_id, echo)

# Placed first, before anything the client asked for: the type, who answers, how long.
_HEAD = (Opt.MESSAGE_TYPE, Opt.SERVER_ID, Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME)
# Sent whether or not option 55 lists them: RFC 2131 §4.3.1 lets a server send parameters a
# client did not ask for, and clients without option 55 need at least an address plan.
_ALWAYS = (Opt.SUBNET_MASK, Opt.ROUTER, Opt.DNS)
# RFC 3442 §1: only sent when asked for (a client that takes 121 ignores option 3).
_ONLY_IF_ASKED = frozenset({Opt.CLASSLESS_ROUTES, Opt.MS_CLASSLESS_ROUTES})
# Echoed options go last; RFC 3046 §2.1 wants option 82 last of all.
_TAIL = (Opt.CLIENT_ID, Opt.RELAY_AGENT_INFO)
# Never trimmed by fit(): without these the reply is not a valid answer.
_PROTECTED = frozenset({Opt.MESSAGE_TYPE, Opt.SERVER_ID, Opt.LEASE_TIME, *_TAIL})
# Read per packet: module names, not Enum class attributes (~0.1 us a read in Python 3.11,
# whose EnumType.__getattr__ puts every class attribute lookup on a slow path).
_CLIENT_ID, _AGENT = _TAIL
_PARAM_REQUEST_LIST, _MAX_MESSAGE_SIZE = Opt.PARAM_REQUEST_LIST, Opt.MAX_MESSAGE_SIZE
_HOSTNAME, _CLIENT_FQDN = Opt.HOSTNAME, Opt.CLIENT_FQDN


def requested(request: DhcpMessage) -> tuple[int, ...] | None:
    """Option 55 as the client listed it, or None when the client sent no list."""
    raw = request.options.get(Opt.PARAM_REQUEST_LIST)
    return None if raw is None else tuple(raw)


def select(request: DhcpMessage, msg_type: MessageType, candidates: Options) -> Options:
    """The reply's options in wire order: head, asked-for (client's order), defaults, echoes."""
    out: Options = {Opt.MESSAGE_TYPE: bytes([msg_type])}
    asked = requested(request)
    order: list[int] = list(_HEAD)
    if asked is None:
        order += [code for code in candidates if code not in _ONLY_IF_ASKED]
    else:
        # RFC 2131 §4.3.1: supply the requested parameters, in the order the client gave;
        # some clients read only the first of overlapping options.
        order += [*asked, *_ALWAYS]
    # Echoes go at the very end whatever the client's list said about them.
    order = [code for code in order if code not in _TAIL] + list(_TAIL)
    for code in order:
        if code in candidates and code not in out:
            out[int(code)] = candidates[code]
    return out


def build(
    request: DhcpMessage,
    msg_type: MessageType,
    settings: DhcpSettings,
    leased: bool,
    chain: tuple[Step, ...] = CHAIN,
) -> Options:
    candidates: Options = {}
    for step in chain:
        step(request, candidates, settings, leased)
    return select(request, msg_type, candidates)


# ---------------------------------------------------------------------------- size budget

# RFC 2131 §2: a client accepts at least a 576-byte IP datagram; 20 IP + 8 UDP header bytes
# of that are not DHCP message.
MIN_DATAGRAM = 576
IP_UDP_HEADERS = 28
# The fixed BOOTP header (236) plus the magic cookie (4), and END.
FIXED_BYTES = 240
END_BYTES = 1


def budget(request: DhcpMessage, settings: DhcpSettings) -> int:
    """The largest DHCP message (UDP payload) this client takes.

    Option 57 (RFC 2132 §9.10, minimum 576) counts the whole IP datagram; values below 576
    are illegal and read as 576. The link MTU caps it: we never rely on fragmentation.
    """
    raw = request.options.get(_MAX_MESSAGE_SIZE)
    asked = struct.unpack("!H", raw)[0] if raw is not None and len(raw) == 2 else MIN_DATAGRAM
    link = settings.mtu if settings.mtu is not None else 1500
    return max(MIN_DATAGRAM, min(asked, link)) - IP_UDP_HEADERS


def encoded_size(options: Options) -> int:
    """Bytes the options take on the wire, long values split in 255-byte parts (RFC 3396)."""
    total = FIXED_BYTES + END_BYTES
    for value in options.values():
        parts = max(1, -(-len(value) // 255))
        total += 2 * parts + len(value)
    return total


def fit(options: Options, limit: int) -> Options:
    """Drop unprotected options from the end (least wanted first) until the message fits."""
    out = dict(options)
    for code in reversed(list(options)):
        if encoded_size(out) <= limit:
            break
        if code not in _PROTECTED:
            del out[code]
    return out


_REPLY_CACHE: dict[tuple[object, ...], tuple[DhcpSettings, Options]] = {}
_REPLY_CACHE_SIZE = 4096  # distinct client kinds; a flood of odd ones only empties it


def for_reply(
    request: DhcpMessage,
    msg_type: MessageType,
    settings: DhcpSettings,
    leased: bool,
    chain: tuple[Step, ...],
    limit: int,
) -> Options:
    """fit(build(...), limit), built once per kind of client and patched after.

    The result depends on the request only through option 55, the budget and the echoed
    options (whose lengths decide what fits, and whose values are copied in), so the same
    VM image asking again gets a copy of the options built for the first one, with its own
    echoes put in. The settings are part of the key by identity: a reload makes new ones.
    """
    given = request.options
    client = given.get(_CLIENT_ID)
    agent = given.get(_AGENT)
    key = (
        id(settings),
        chain,
        msg_type,
        leased,
        given.get(_PARAM_REQUEST_LIST),
        limit,
        None if client is None else len(client),
        None if agent is None else len(agent),
    )
    hit = _REPLY_CACHE.get(key)
    if hit is None or hit[0] is not settings:
        built = fit(build(request, msg_type, settings, leased, chain), limit)
        if len(_REPLY_CACHE) >= _REPLY_CACHE_SIZE:
            _REPLY_CACHE.clear()
        _REPLY_CACHE[key] = (settings, built)
        return dict(built)
    out = hit[1].copy()
    # Echoes present in the request are in the cached copy (same length, always kept by
    # fit()), so each value takes its place there.
    if client is not None:
        out[_CLIENT_ID] = client
    if agent is not None:
        out[_AGENT] = agent
    return out


# ---------------------------------------------------------------------------- client facts


def client_hostname(request: DhcpMessage) -> str:
    """The client's name from option 12, else the name in option 81 (RFC 4702 §2.3).

    Recorded in the lease for operators; anything that is not a plausible host name is
    ignored rather than stored.
    """
    raw = request.options.get(_HOSTNAME)
    if raw is not None:
        return _clean_name(raw.rstrip(b"\0"))
    raw = request.options.get(_CLIENT_FQDN)
    if raw is None or len(raw) < 3:
        return ""
    flags, name = raw[0], raw[3:]
    if flags & 0x04:  # E bit: the name is in RFC 1035 wire format
        labels: list[bytes] = []
        i = 0
        while i < len(name) and name[i] != 0:
            length = name[i]
            if length > 63 or i + 1 + length > len(name):
                return ""
            labels.append(name[i + 1 : i + 1 + length])
            i += 1 + length
        name = b".".join(labels)
    return _clean_name(name)


def _clean_name(raw: bytes) -> str:
    try:
        text = raw.decode("ascii").rstrip(".")
    except UnicodeDecodeError:
        return ""
    if not text or len(text) > 253 or not all(c.isalnum() or c in "-._" for c in text):
        return ""
    return text


def client_id(request: DhcpMessage) -> str:
    """Option 61 as hex: recorded and echoed, never an identity (cloned VMs share it)."""
    raw = request.options.get(_CLIENT_ID)
    return raw.hex() if raw is not None else ""

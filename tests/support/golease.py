"""leases.json read the way the Go tool reads it at start-up, written apart from the product.

The Go tool unmarshals the file into a list of {mac, ip, expiry} strings (other keys are
ignored; Go matches key names case-insensitively) and gives up on the whole file when that
fails: then it starts with no leases at all. `null` is an empty list. Each entry is then kept
or skipped on its own:

- mac: must parse with Go's net.ParseMAC: 6, 8 or 20 bytes as hex pairs joined by ':' or by
  '-' (one separator throughout), or as dot-separated groups of four hex digits;
- ip: must be IPv4 (dotted quad, or an IPv4-mapped IPv6 address, which Go treats as IPv4);
- expiry: must parse as RFC 3339, and lie in the future.

This module shares no code with cocoon_net's own decoder, so an encoder that writes something
the Go tool would not accept cannot be confirmed by a decoder that makes the same mistake.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import AddressValueError, IPv4Address, IPv6Address
from typing import Any

_HEX = frozenset("0123456789abcdefABCDEF")
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|([+-])(\d{2}):(\d{2}))$"
)
_GO_KEYS = ("mac", "ip", "expiry")


@dataclass(frozen=True)
class GoLease:
    mac: str  # lower-case colon hex, as Go's HardwareAddr.String() prints it
    ip: IPv4Address
    expiry: float  # UNIX time


@dataclass(frozen=True)
class GoRead:
    leases: tuple[GoLease, ...]  # the entries the Go tool would restore, in file order
    skipped: tuple[str, ...]  # why each other entry was skipped


def parse_mac(text: str) -> bytes | None:
    """Go's net.ParseMAC: the address bytes, or None where Go returns an error."""
    if len(text) < 14:
        return None
    if text[2] in ":-":
        sep, group = text[2], 2
    elif text[4] == ".":
        sep, group = ".", 4
    else:
        return None
    if (len(text) + 1) % (group + 1):
        return None
    parts = text.split(sep)
    if any(len(part) != group or not set(part) <= _HEX for part in parts):
        return None
    raw = bytes.fromhex("".join(parts))
    return raw if len(raw) in (6, 8, 20) else None


def parse_ipv4(text: str) -> IPv4Address | None:
    """What net.ParseIP(text).To4() accepts (dotted quads without leading zeros)."""
    try:
        return IPv4Address(text)
    except AddressValueError:
        pass
    try:
        return IPv6Address(text).ipv4_mapped
    except AddressValueError:
        return None


def parse_rfc3339(text: str) -> float | None:
    """time.Parse(time.RFC3339, text) as a UNIX time, or None where Go returns an error."""
    m = _RFC3339.match(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    offset: timezone = UTC
    if m.group(8) != "Z":
        hours, minutes = int(m.group(10)), int(m.group(11))
        if hours > 23 or minutes > 59:
            return None
        sign = -1 if m.group(9) == "-" else 1
        offset = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=offset)
    except ValueError:
        return None
    fraction = float(m.group(7)) if m.group(7) else 0.0
    return moment.timestamp() + fraction


def _field(entry: dict[str, Any], name: str) -> str:
    """The string Go would put in the field `name`; ValueError where Unmarshal fails."""
    value: Any = ""
    for key, raw in entry.items():  # the last of several case-variants wins, as in Go
        if key.lower() == name:
            value = raw
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} {value!r} is not a JSON string")
    return value


def read(data: bytes, now: float) -> GoRead:
    """The leases the Go tool restores from `data` at time `now`.

    ValueError when the Go tool would reject the whole file (and start with no leases).
    """
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if raw is None:
        return GoRead((), ())
    if not isinstance(raw, list):
        raise ValueError(f"not a JSON array but {type(raw).__name__}")
    leases: list[GoLease] = []
    skipped: list[str] = []
    for item in raw:
        entry = {} if item is None else item  # null decodes to an all-empty entry
        if not isinstance(entry, dict):
            raise ValueError(f"entry {entry!r} is not a JSON object")
        mac, ip, expiry = (_field(entry, key) for key in _GO_KEYS)
        hw = parse_mac(mac)
        address = parse_ipv4(ip)
        until = parse_rfc3339(expiry)
        if hw is None:
            skipped.append(f"mac {mac!r}")
        elif address is None:
            skipped.append(f"ip {ip!r}")
        elif until is None:
            skipped.append(f"expiry {expiry!r}")
        elif until <= now:
            skipped.append(f"expired {expiry}")
        else:
            leases.append(GoLease(hw.hex(":"), address, until))
    return GoRead(tuple(leases), tuple(skipped))


# ---------------------------------------------------------------- pool.json

_POOL_STRINGS = ("platform", "nodeName", "subnet", "gateway", "primaryNIC", "subnetID",
                 "aliasRangeName")  # fmt: skip
_POOL_LISTS = ("secondaryNICs", "ips", "eniIDs", "dnsServers", "dropCIDRs")


@dataclass(frozen=True)
class GoPool:
    subnet: str
    gateway: IPv4Address
    ips: tuple[IPv4Address, ...]  # the pool the Go daemon serves


def read_pool(data: bytes) -> GoPool:
    """pool.json as the Go daemon loads and validates it; ValueError where it exits 1.

    Keys it does not know are ignored; the ones it knows must have its types (strings, lists
    of strings or null, a bool, an RFC 3339 updatedAt).
    """
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("pool.json is not a JSON object")
    for key in _POOL_STRINGS:
        _field(raw, key.lower())
    lists: dict[str, list[str]] = {}
    for key in _POOL_LISTS:
        value = raw.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{key} {value!r} is not a list of strings")
        lists[key] = value or []
    if not isinstance(raw.get("dropInternalAccess", False), bool):
        raise ValueError("dropInternalAccess is not a bool")
    if parse_rfc3339(_field(raw, "updatedat")) is None:
        raise ValueError("updatedAt is not RFC 3339")
    gateway = parse_ipv4(_field(raw, "gateway"))
    if gateway is None:
        raise ValueError("invalid gateway")
    subnet = _field(raw, "subnet")
    address, _, prefix = subnet.partition("/")
    if parse_ipv4(address) is None or not prefix.isdigit() or int(prefix) > 32:
        raise ValueError(f"invalid subnet: {subnet}")
    ips = tuple(ip for ip in map(parse_ipv4, lists["ips"]) if ip is not None)
    if not ips:
        raise ValueError("no valid IPs in pool")
    return GoPool(subnet, gateway, ips)

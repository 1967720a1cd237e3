"""The lease store's pure half: the Go-compatible snapshot, journal lines, the sidecar, replay.

Bytes in, records and tables out, and back; no I/O. The file dance lives in store.py.

leases.json (the snapshot) stays what the Go tool reads: a JSON array of objects
with "mac", "ip" and "expiry" (RFC 3339, whole seconds). We add "hostname" and "clientId",
which Go's decoder ignores. We read what Go wrote: local-time offsets, `null` for no leases,
and MACs of any length its parser accepts, of which we keep only 6-byte Ethernet ones.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import operator
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from ipaddress import IPv4Address
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps' escaper (C)
from typing import Any

from cocoon_net.config import ipv4_int
from cocoon_net.dhcp.model import Lease

# Forms of a 6-byte MAC that Go's net.ParseMAC accepts (colon, hyphen, Cisco dotted).
_MAC_SEP = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")
_MAC_DOT = re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$")
_CANONICAL_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


def parse_mac(text: str) -> str | None:
    """A 6-byte MAC as lower-case colon hex, or None for anything else (8/20-byte forms too)."""
    if _MAC_SEP.match(text):
        return text.lower().replace("-", ":")
    if _MAC_DOT.match(text):
        return bytes.fromhex(text.replace(".", "")).hex(":")
    return None


def is_canonical_mac(text: str) -> bool:
    return bool(_CANONICAL_MAC.match(text))


def format_expiry(ts: float) -> str:
    # Go's format has whole seconds; round up so a reloaded lease never ends before the
    # client's does.
    return _format_second(math.ceil(ts))


@functools.lru_cache(maxsize=4096)
def _format_second(second: int) -> str:
    # Leases granted in the same second end in the same second: a snapshot of a boot storm
    # formats each such second once, not once per lease.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def parse_expiry(text: str) -> float:
    """RFC 3339 with any offset (the Go tool writes local time) to a UNIX timestamp."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"expiry {text!r} has no time zone")
    return moment.timestamp()


def _ipv4(value: Any) -> IPv4Address:
    if not isinstance(value, str):
        raise ValueError(f"ip {value!r} is not a string")
    try:
        return IPv4Address(ipv4_int(value))  # strict and fast: snapshots hold 60,000 entries
    except ValueError:
        raise ValueError(f"ip {value!r} is not IPv4") from None


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"{key} {value!r} is not a string")
    return value


# ---------------------------------------------------------------- snapshot (leases.json)


def lease_to_json(lease: Lease) -> dict[str, str]:
    return {
        "mac": lease.mac,
        "ip": str(lease.ip),
        "expiry": format_expiry(lease.expires),
        "hostname": lease.hostname,
        "clientId": lease.client_id,
    }


def lease_from_json(raw: Any, expiries: dict[str, float] | None = None) -> Lease:
    """One snapshot entry; ValueError names what is wrong with it. `expiries` remembers the
    expiry strings already parsed (whole seconds: thousands of leases share each one)."""
    if not isinstance(raw, dict):
        raise ValueError(f"entry {raw!r} is not an object")
    mac = parse_mac(_str(raw, "mac"))
    if mac is None:
        raise ValueError(f"mac {raw.get('mac')!r} is not a 6-byte Ethernet address")
    ip = _ipv4(raw.get("ip"))
    text = _str(raw, "expiry")
    expires = None if expiries is None else expiries.get(text)
    if expires is None:
        expires = parse_expiry(text)
        if expiries is not None:
            expiries[text] = expires
    return Lease(mac, ip, expires, _str(raw, "hostname"), _str(raw, "clientId"))


def encode_snapshot(leases: Iterable[Lease]) -> bytes:
    return SnapshotEncoder().encode(leases)


def snapshot_line(lease: Lease) -> str:
    """One entry of leases.json: byte for byte `json.dumps(lease_to_json(lease))`, built
    without the encoder's walk of a dict. Text from outside (MAC, hostname, client id) goes
    through json's own string escaper; the address and the expiry are ASCII digits and
    punctuation."""
    return (
        f'{{"mac": {_json_str(lease.mac)}, "ip": "{lease.ip}", '
        f'"expiry": "{format_expiry(lease.expires)}", "hostname": {_json_str(lease.hostname)}, '
        f'"clientId": {_json_str(lease.client_id)}}}'
    )


_BY_ADDRESS = operator.itemgetter(2)


class SnapshotEncoder:
    """Encodes leases.json, re-encoding only the leases that changed since its last call.

    The file is a JSON array with one object per line, sorted by IP: as easy to read and diff
    as an indented file, each line what json.dumps writes for the entry (snapshot_line).
    Encoding every entry costs about 0.15 s for 60,000 leases; a snapshot taken seconds
    after the previous one changes a fraction of them, so the other lines are reused (a
    lease is immutable: the same object gives the same line).
    """

    def __init__(self) -> None:
        # MAC -> (lease, its line, its address as an int: the sort key, read in C)
        self._lines: dict[str, tuple[Lease, str, int]] = {}

    def adopt(self, leases: Iterable[Lease], written: bytes) -> int:
        """Reuse the lines of a snapshot we wrote and decoded into exactly `leases`, so a
        store reopened on its own files does not re-encode them all. A line that is not
        where the sort puts its lease is left out (encoded when next needed). How many
        were taken."""
        ordered = sorted(leases, key=lambda lease: int(lease.ip))
        lines = written.decode(errors="replace").split("\n")[1:-2]  # between "[" and "]\n"
        if len(lines) != len(ordered):
            return 0
        taken = 0
        for lease, line in zip(ordered, lines, strict=True):
            if line.startswith(f'{{"mac": "{lease.mac}", "ip": "{lease.ip}", '):
                self._lines[lease.mac] = (lease, line.removesuffix(","), int(lease.ip))
                taken += 1
        return taken

    def encode(self, leases: Iterable[Lease]) -> bytes:
        previous, current = self._lines, {}
        for lease in leases:
            hit = previous.get(lease.mac)
            if hit is None or hit[0] is not lease:
                hit = (lease, snapshot_line(lease), int(lease.ip))
            current[lease.mac] = hit
        self._lines = current
        if not current:
            return b"[]\n"
        ordered = sorted(current.values(), key=_BY_ADDRESS)
        return ("[\n" + ",\n".join([hit[1] for hit in ordered]) + "\n]\n").encode()


@dataclass(frozen=True)
class SnapshotRead:
    leases: tuple[Lease, ...]
    skipped: tuple[str, ...]  # one reason per entry left out


def decode_snapshot(data: bytes) -> SnapshotRead:
    """Parse leases.json. ValueError when the file as a whole is not a lease array.

    Entries Go would skip are skipped and named. Two entries on one IP or one MAC (the Go tool
    never de-duplicated) keep the one that expires last.
    """
    raw = json.loads(data)
    if raw is None:
        return SnapshotRead((), ())
    if not isinstance(raw, list):
        raise ValueError(f"expected a JSON array, found {type(raw).__name__}")
    skipped: list[str] = []
    by_mac: dict[str, Lease] = {}
    expiries: dict[str, float] = {}
    for entry in raw:
        try:
            lease = lease_from_json(entry, expiries)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        held = by_mac.get(lease.mac)
        if held is not None:
            loser, by_mac[lease.mac] = sorted((held, lease), key=lambda x: x.expires)
            skipped.append(f"mac {lease.mac}: duplicate entry for {loser.ip}")
            continue
        by_mac[lease.mac] = lease
    by_ip: dict[IPv4Address, Lease] = {}
    for lease in by_mac.values():
        held = by_ip.get(lease.ip)
        if held is None:
            by_ip[lease.ip] = lease
            continue
        loser, by_ip[lease.ip] = sorted((held, lease), key=lambda x: x.expires)
        skipped.append(f"ip {lease.ip}: also leased to {loser.mac}, kept the later expiry")
    return SnapshotRead(tuple(by_ip.values()), tuple(skipped))


# ---------------------------------------------------------------- journal lines


class Op(enum.StrEnum):
    """What a journal record does; each sets or deletes whole entries, so replay is idempotent."""

    GRANT = "grant"  # new lease or renewal: replaces the MAC's lease and any lease on the IP
    RELEASE = "release"  # DHCPRELEASE: deletes the MAC's lease if it is on that IP
    EXPIRE = "expire"  # sweep: same effect as release, kept apart for the audit trail
    QUARANTINE = "quarantine"  # DHCPDECLINE (RFC 2131 §4.3.3): the IP is unusable until `expires`
    UNQUARANTINE = "unquarantine"  # probation over, or lifted by the operator
    # An address in use per the kernel (its route) with no lease left after a lost lease file:
    # held for its VM until `expires`, a deadline that later restarts keep.
    HOLD = "hold"


@dataclass(frozen=True)
class Record:
    """One change to the lease table, as the table decided it and the journal stores it."""

    op: Op
    ip: IPv4Address
    mac: str = ""
    expires: float = 0.0  # GRANT: lease end; QUARANTINE: end of probation
    hostname: str = ""
    client_id: str = ""

    @classmethod
    def grant(cls, lease: Lease) -> Record:
        return cls(Op.GRANT, lease.ip, lease.mac, lease.expires, lease.hostname, lease.client_id)

    @classmethod
    def release(cls, lease: Lease) -> Record:
        """`lease.expires` is when the binding ended: history keeps it for the reuse order."""
        return cls(Op.RELEASE, lease.ip, lease.mac, lease.expires)

    @classmethod
    def expire(cls, lease: Lease) -> Record:
        return cls(Op.EXPIRE, lease.ip, lease.mac, lease.expires)

    @classmethod
    def quarantine(cls, ip: IPv4Address, until: float, mac: str = "") -> Record:
        return cls(Op.QUARANTINE, ip, mac, until)

    @classmethod
    def unquarantine(cls, ip: IPv4Address) -> Record:
        return cls(Op.UNQUARANTINE, ip)

    @classmethod
    def hold(cls, ip: IPv4Address, until: float) -> Record:
        return cls(Op.HOLD, ip, "", until)

    def lease(self) -> Lease:
        return Lease(self.mac, self.ip, self.expires, self.hostname, self.client_id)


_NEEDS_MAC = frozenset({Op.GRANT, Op.RELEASE, Op.EXPIRE})


def check_record(record: Record) -> None:
    """Reject a record replay could not read back (a caller bug, not a disk problem)."""
    if record.op in _NEEDS_MAC and not is_canonical_mac(record.mac):
        raise ValueError(f"{record.op} record needs a lower-case 6-byte MAC, got {record.mac!r}")
    if not math.isfinite(record.expires):
        raise ValueError(f"{record.op} record has a non-finite time {record.expires!r}")


# json.dumps with separators builds an encoder per call: a third of a journal line's cost.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def encode_record(record: Record, seq: int) -> bytes:
    """One journal line: byte for byte what _COMPACT writes for the record's object, built
    without the encoder's walk of a dict (most of a commit's Python cost). Text that comes
    from outside (MAC, hostname, client id) goes through json's own string escaper; numbers
    are written as json writes them (repr)."""
    line = f'{{"seq":{seq!r},"op":"{record.op.value}","ip":"{record.ip}"'
    if record.mac:
        line += ',"mac":' + _json_str(record.mac)
    if record.op is not Op.UNQUARANTINE and record.expires:
        line += f',"expires":{record.expires!r}'
    if record.hostname:
        line += ',"hostname":' + _json_str(record.hostname)
    if record.client_id:
        line += ',"clientId":' + _json_str(record.client_id)
    return (line + "}\n").encode()


def decode_record(line: bytes) -> tuple[int, Record]:
    """One journal line (without its newline) to (seq, record); ValueError if it is not one."""
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError("journal line is not an object")
    seq = raw.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError(f"bad seq {seq!r}")
    expires = raw.get("expires", 0.0)
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise ValueError(f"bad expires {expires!r}")
    mac = _str(raw, "mac")
    record = Record(
        op=Op(str(raw.get("op"))),
        ip=_ipv4(raw.get("ip")),
        mac=mac,
        expires=float(expires),
        hostname=_str(raw, "hostname"),
        client_id=_str(raw, "clientId"),
    )
    check_record(record)
    return seq, record


# ---------------------------------------------------------------- sidecar (leases.json.meta)


@dataclass(frozen=True)
class Meta:
    """What leases.json cannot carry without confusing the Go tool.

    `snapshot` is the sha256 of the leases.json this sidecar was written with and `previous`
    that of the one it replaced (empty: there was none); see store.py for why both.
    """

    seq: int  # last journal sequence number folded into the snapshot
    snapshot: str
    previous: str
    history: tuple[Lease, ...]  # last lease granted to each MAC, kept after release/expiry
    quarantine: Mapping[IPv4Address, float]
    holds: Mapping[IPv4Address, float] = field(default_factory=dict)  # Op.HOLD deadlines


def encode_meta(meta: Meta) -> bytes:
    out = {
        "version": 1,
        "seq": meta.seq,
        "snapshot": meta.snapshot,
        "previous": meta.previous,
        "history": [lease_to_json(h) for h in sorted(meta.history, key=lambda h: h.mac)],
        "quarantine": [
            {"ip": str(ip), "until": format_expiry(until)}
            for ip, until in sorted(meta.quarantine.items(), key=lambda item: int(item[0]))
        ],
        "holds": [
            {"ip": str(ip), "until": format_expiry(until)}
            for ip, until in sorted(meta.holds.items(), key=lambda item: int(item[0]))
        ],
    }
    return _COMPACT.encode(out).encode() + b"\n"


def decode_meta(data: bytes) -> Meta:
    raw = json.loads(data)
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise ValueError("not a version 1 lease sidecar")
    seq = raw.get("seq")
    if not isinstance(seq, int) or seq < 0:
        raise ValueError(f"bad seq {seq!r}")
    quarantine, holds = _deadlines(raw, "quarantine"), _deadlines(raw, "holds")
    return Meta(
        seq=seq,
        snapshot=_str(raw, "snapshot"),
        previous=_str(raw, "previous"),
        history=tuple(lease_from_json(h) for h in raw.get("history") or []),
        quarantine=quarantine,
        holds=holds,
    )


def _deadlines(raw: dict[str, Any], key: str) -> dict[IPv4Address, float]:
    out: dict[IPv4Address, float] = {}
    for entry in raw.get(key) or []:
        if not isinstance(entry, dict):
            raise ValueError(f"{key} entry {entry!r} is not an object")
        out[_ipv4(entry.get("ip"))] = parse_expiry(_str(entry, "until"))
    return out


# ---------------------------------------------------------------- replay


@dataclass
class LeaseState:
    """What replay builds: leases by MAC, with each IP held by at most one MAC."""

    leases: dict[str, Lease] = field(default_factory=dict)
    history: dict[str, Lease] = field(default_factory=dict)  # last grant per MAC
    quarantine: dict[IPv4Address, float] = field(default_factory=dict)
    owners: dict[IPv4Address, str] = field(default_factory=dict)  # index of `leases` by IP
    holds: dict[IPv4Address, float] = field(default_factory=dict)  # Op.HOLD deadlines

    def apply(self, record: Record) -> bool:
        """Apply one record; False when a release or unquarantine found nothing to remove."""
        match record.op:
            case Op.GRANT:
                self.grant(record.lease())
            case Op.RELEASE | Op.EXPIRE:
                held = self.leases.get(record.mac)
                if held is None or held.ip != record.ip:
                    return False
                self._drop(held)
                # History remembers when the binding really ended (journals written before
                # records carried the time fall back to the lease's own end).
                if record.expires:
                    self.history[held.mac] = replace(held, expires=record.expires)
            case Op.QUARANTINE:
                self.quarantine[record.ip] = record.expires
            case Op.UNQUARANTINE:
                return self.quarantine.pop(record.ip, None) is not None
            case Op.HOLD:
                self.holds[record.ip] = record.expires
        return True

    def grant(self, lease: Lease) -> None:
        """A GRANT record's effect, from the lease itself (the snapshot's leases at load)."""
        self._drop(self.leases.get(lease.mac))
        owner = self.owners.get(lease.ip)
        self._drop(self.leases.get(owner) if owner else None)
        self.leases[lease.mac] = lease
        self.owners[lease.ip] = lease.mac
        self.history[lease.mac] = lease
        self.holds.pop(lease.ip, None)  # its VM claimed it: an ordinary lease now

    def _drop(self, lease: Lease | None) -> None:
        if lease is not None:
            del self.leases[lease.mac]
            del self.owners[lease.ip]

    def copy(self) -> LeaseState:
        return LeaseState(
            dict(self.leases),
            dict(self.history),
            dict(self.quarantine),
            dict(self.owners),
            dict(self.holds),
        )

    def prune_history(self, before: float) -> int:
        """Forget MACs whose last lease ended before `before` and that hold none now."""
        stale = [m for m, h in self.history.items() if h.expires < before and m not in self.leases]
        for mac in stale:
            del self.history[mac]
        return len(stale)


@dataclass(frozen=True)
class ReplayReport:
    records: int = 0  # complete lines applied
    noops: int = 0  # releases/expiries that matched no lease (normal after a crash replay)
    corrupt: int = 0  # complete lines that did not decode
    torn_tail: bool = False  # the last line had no newline: a write cut short by a crash
    out_of_order: int = 0  # lines whose seq did not increase (file order still wins)
    last_seq: int = 0
    end: int = 0  # offset just past the last complete line: where the next record goes


def replay(snapshot: LeaseState, journal: bytes) -> tuple[LeaseState, ReplayReport]:
    """Pure: the table after applying the journal's complete lines to a copy of snapshot.

    The journal may end in NUL bytes: zeros written ahead of the next record (the store keeps
    its file extended, so that a commit's fdatasync need not update its size). They are not
    a line; a record cut short by a crash before them is a torn tail like one at the end of
    the file. A NUL inside a complete line makes that line corrupt: it is never padding.
    """
    state = snapshot.copy()
    data = journal.rstrip(b"\0")
    *lines, tail = data.split(b"\n")
    applied = noops = corrupt = out_of_order = last_seq = 0
    for line in lines:
        try:
            seq, record = decode_record(line)
        except ValueError:
            corrupt += 1
            continue
        applied += 1
        if not state.apply(record):
            noops += 1
        if seq <= last_seq:
            out_of_order += 1
        last_seq = max(last_seq, seq)
    end = len(data) - len(tail)
    report = ReplayReport(applied, noops, corrupt, bool(tail), out_of_order, last_seq, end)
    return state, report

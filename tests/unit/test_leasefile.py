"""The pure half of the lease store: Go-compatible snapshot, journal lines and replay."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.dhcp.leasefile import (
    LeaseState,
    Meta,
    Op,
    Record,
    SnapshotEncoder,
    check_record,
    decode_meta,
    decode_record,
    decode_snapshot,
    encode_meta,
    encode_record,
    encode_snapshot,
    format_expiry,
    lease_to_json,
    parse_expiry,
    parse_mac,
    replay,
    snapshot_line,
)
from cocoon_net.dhcp.model import Lease

# As the Go daemon wrote it on a host in UTC+8, with the MAC forms its parser accepts.
GO_LEASES = b"""[
  {
    "mac": "52:54:00:aa:bb:01",
    "ip": "172.20.100.7",
    "expiry": "2026-04-05T14:00:00+08:00"
  },
  {
    "mac": "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01",
    "ip": "172.20.100.8",
    "expiry": "2026-04-05T14:00:00+08:00"
  },
  {
    "mac": "02:00:5e:10:00:00:00:01",
    "ip": "172.20.100.9",
    "expiry": "2026-04-05T14:00:00+08:00"
  },
  {
    "mac": "52:54:00:aa:bb:02",
    "ip": "fe80::1",
    "expiry": "2026-04-05T14:00:00+08:00"
  },
  {
    "mac": "52:54:00:aa:bb:03",
    "ip": "172.20.100.10",
    "expiry": "2026-04-05T06:00:00Z"
  }
]"""
T0 = datetime(2026, 4, 5, 6, 0, tzinfo=UTC).timestamp()


def test_mac_forms_go_accepts_are_normalised_and_only_ethernet_kept() -> None:
    assert parse_mac("52:54:00:AA:BB:01") == "52:54:00:aa:bb:01"
    assert parse_mac("52-54-00-aa-bb-01") == "52:54:00:aa:bb:01"
    assert parse_mac("5254.00aa.bb01") == "52:54:00:aa:bb:01"
    assert parse_mac("02:00:5e:10:00:00:00:01") is None  # EUI-64
    assert parse_mac("52:54:00-aa:bb:01") is None  # mixed separators
    assert parse_mac("") is None


def test_expiry_reads_any_offset_and_writes_utc_whole_seconds() -> None:
    assert parse_expiry("2026-04-05T14:00:00+08:00") == T0
    assert parse_expiry("2026-04-05T06:00:00.250Z") == T0 + 0.25
    assert format_expiry(T0) == "2026-04-05T06:00:00Z"
    assert format_expiry(T0 + 0.1) == "2026-04-05T06:00:01Z"  # never ends early
    with pytest.raises(ValueError):
        parse_expiry("2026-04-05T06:00:00")


def test_go_written_file_loads_and_names_what_it_skipped() -> None:
    read = decode_snapshot(GO_LEASES)
    assert {(lease.mac, str(lease.ip), lease.expires) for lease in read.leases} == {
        ("52:54:00:aa:bb:01", "172.20.100.7", T0),
        ("52:54:00:aa:bb:03", "172.20.100.10", T0),
    }
    assert len(read.skipped) == 3
    assert any("fe80::1" in reason for reason in read.skipped)


def test_go_null_means_no_leases_and_other_shapes_are_corrupt() -> None:
    assert decode_snapshot(b"null").leases == ()
    for bad in (b"", b"{}", b'[{"mac": "52:54:00:aa:bb:01"', b"\x00\x00\x00"):
        with pytest.raises(ValueError):
            decode_snapshot(bad)


def test_duplicates_keep_the_later_expiry() -> None:
    rows = [
        {"mac": "52:54:00:00:00:01", "ip": "10.0.0.2", "expiry": "2026-04-05T06:00:00Z"},
        {"mac": "52:54:00:00:00:02", "ip": "10.0.0.2", "expiry": "2026-04-05T07:00:00Z"},
        {"mac": "52:54:00:00:00:03", "ip": "10.0.0.3", "expiry": "2026-04-05T06:00:00Z"},
        {"mac": "52:54:00:00:00:03", "ip": "10.0.0.4", "expiry": "2026-04-05T08:00:00Z"},
    ]
    read = decode_snapshot(json.dumps(rows).encode())
    assert sorted((lease.mac, str(lease.ip)) for lease in read.leases) == [
        ("52:54:00:00:00:02", "10.0.0.2"),
        ("52:54:00:00:00:03", "10.0.0.4"),
    ]
    assert len(read.skipped) == 2


def test_snapshot_is_a_plain_array_with_go_keys() -> None:
    lease = Lease("52:54:00:aa:bb:01", IPv4Address("10.0.0.7"), T0, "vm1", "01525400aabb01")
    raw = json.loads(encode_snapshot([lease]))
    assert raw == [
        {
            "mac": "52:54:00:aa:bb:01",
            "ip": "10.0.0.7",
            "expiry": "2026-04-05T06:00:00Z",
            "hostname": "vm1",
            "clientId": "01525400aabb01",
        }
    ]
    assert decode_snapshot(encode_snapshot([lease])).leases == (lease,)
    assert json.loads(encode_snapshot([])) == []


def test_meta_round_trip() -> None:
    meta = Meta(
        seq=42,
        snapshot="ab",
        previous="",
        history=(Lease("52:54:00:aa:bb:01", IPv4Address("10.0.0.7"), T0),),
        quarantine={IPv4Address("10.0.0.9"): T0},
    )
    assert decode_meta(encode_meta(meta)) == meta


def test_journal_line_rejects_what_it_cannot_replay() -> None:
    good = encode_record(Record.grant(Lease("52:54:00:aa:bb:01", IPv4Address("10.0.0.7"), T0)), 7)
    assert decode_record(good.rstrip(b"\n"))[0] == 7
    for bad in (
        b'{"seq":1,"op":"grant","ip":"10.0.0.7","mac":"52:54:00:aa:bb","expires":1}',
        b'{"seq":1,"op":"steal","ip":"10.0.0.7","mac":"52:54:00:aa:bb:01"}',
        b'{"seq":0,"op":"release","ip":"10.0.0.7","mac":"52:54:00:aa:bb:01"}',
        b'{"seq":1,"op":"release","ip":"::1","mac":"52:54:00:aa:bb:01"}',
        b'{"seq":1,"op":"grant","ip":"10.0.0.7","mac":"52:54:00:aa:bb:01","expires":"x"}',
        b"[1]",
    ):
        with pytest.raises(ValueError):
            decode_record(bad)


@given(
    st.sampled_from(list(Op)),
    st.integers(0, 2**32 - 1),
    st.one_of(st.just("52:54:00:aa:bb:01"), st.text()),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**60), 2**60)),
    st.text(),
    st.text(),
    st.integers(1, 2**63),
)
def test_a_journal_line_is_what_json_writes_and_reads_back(
    op: Op, ip: int, mac: str, expires: float, hostname: str, client_id: str, seq: int
) -> None:
    """The line is built by hand for speed: it must stay what json's encoder writes for the
    record's object (any text, escaped; any number), and read back as the same record."""
    record = Record(op, IPv4Address(ip), mac, expires, hostname, client_id)
    out: dict[str, object] = {"seq": seq, "op": op.value, "ip": str(record.ip)}
    if mac:
        out["mac"] = mac
    if op is not Op.UNQUARANTINE and expires:
        out["expires"] = expires
    if hostname:
        out["hostname"] = hostname
    if client_id:
        out["clientId"] = client_id
    line = encode_record(record, seq)
    assert line == json.dumps(out, separators=(",", ":")).encode() + b"\n"
    try:
        check_record(record)
    except ValueError:
        return  # refused before it is written
    got_seq, got = decode_record(line.rstrip(b"\n"))
    written = expires if op is not Op.UNQUARANTINE else 0.0
    assert (got_seq, got) == (seq, replace(record, expires=float(written)))


# ---------------------------------------------------------------- replay against a model

MACS = [f"52:54:00:00:00:{i:02x}" for i in range(6)]
IPS = [IPv4Address(f"10.0.0.{i}") for i in range(2, 7)]


@st.composite
def records(draw: st.DrawFn) -> Record:
    op = draw(st.sampled_from(list(Op)))
    ip = draw(st.sampled_from(IPS))
    mac = draw(st.sampled_from(MACS))
    when = float(draw(st.integers(0, 10**6)))
    if op is Op.GRANT:
        host = draw(st.sampled_from(["", "vm-a", "vm-b"]))
        return Record.grant(Lease(mac, ip, when, host))
    if op in (Op.RELEASE, Op.EXPIRE):  # with or without the end time (older journals)
        return Record(op, ip, mac, draw(st.sampled_from([0.0, when])))
    if op is Op.QUARANTINE:
        return Record.quarantine(ip, when, mac)
    return Record.unquarantine(ip)


def model(recs: list[Record]) -> tuple[set[Lease], dict[str, Lease], dict[IPv4Address, float]]:
    """The rules stated plainly: a grant evicts its MAC's and its IP's leases, last wins."""
    leases: set[Lease] = set()
    history: dict[str, Lease] = {}
    quarantine: dict[IPv4Address, float] = {}
    for r in recs:
        if r.op is Op.GRANT:
            leases = {x for x in leases if x.mac != r.mac and x.ip != r.ip} | {r.lease()}
            history[r.mac] = r.lease()
        elif r.op in (Op.RELEASE, Op.EXPIRE):
            ended = {x for x in leases if x.mac == r.mac and x.ip == r.ip}
            leases -= ended
            for x in ended:
                if r.expires:  # history keeps when the binding ended
                    history[r.mac] = Lease(x.mac, x.ip, r.expires, x.hostname, x.client_id)
        elif r.op is Op.QUARANTINE:
            quarantine[r.ip] = r.expires
        else:
            quarantine.pop(r.ip, None)
    return leases, history, quarantine


def journal(recs: list[Record]) -> bytes:
    return b"".join(encode_record(r, seq) for seq, r in enumerate(recs, 1))


def view(state: LeaseState) -> tuple[set[Lease], dict[str, Lease], dict[IPv4Address, float]]:
    assert state.owners == {lease.ip: mac for mac, lease in state.leases.items()}
    return set(state.leases.values()), state.history, state.quarantine


@given(st.lists(records(), max_size=60))
def test_replay_equals_the_model(recs: list[Record]) -> None:
    state, report = replay(LeaseState(), journal(recs))
    assert view(state) == model(recs)
    assert report.records == len(recs)
    assert report.last_seq == len(recs)
    assert (report.corrupt, report.torn_tail, report.out_of_order) == (0, False, 0)


@given(st.lists(records(), max_size=40), st.data())
def test_replaying_over_a_snapshot_that_holds_a_prefix_changes_nothing(
    recs: list[Record], data: st.DataObject
) -> None:
    """Why a crash between writing the snapshot and truncating the journal is harmless."""
    cut = data.draw(st.integers(0, len(recs)))
    folded, _ = replay(LeaseState(), journal(recs[:cut]))
    again, _ = replay(folded, journal(recs))
    assert view(again) == model(recs)


@given(st.lists(records(), max_size=60), st.data())
def test_an_encoder_reusing_its_lines_writes_what_a_fresh_one_writes(
    recs: list[Record], data: st.DataObject
) -> None:
    """The write-behind keeps one encoder across snapshots; renewals, moves and releases
    in between must all show up."""
    encoder, state = SnapshotEncoder(), LeaseState()
    for record in recs:
        state.apply(record)
        if data.draw(st.booleans()):
            assert encoder.encode(state.leases.values()) == encode_snapshot(state.leases.values())
    assert encoder.encode(state.leases.values()) == encode_snapshot(state.leases.values())


@given(st.lists(records(), max_size=60))
def test_an_encoder_adopts_the_lines_of_a_snapshot_it_wrote(recs: list[Record]) -> None:
    state, _ = replay(LeaseState(), journal(recs))
    written = encode_snapshot(state.leases.values())
    leases = decode_snapshot(written).leases
    encoder = SnapshotEncoder()
    assert encoder.adopt(leases, written) == len(leases)
    assert encoder.encode(leases) == written


def test_an_encoder_adopts_no_line_that_is_not_its_lease() -> None:
    leases = [Lease(f"52:54:00:00:00:0{n}", IPv4Address(f"10.0.0.{n}"), T0) for n in range(1, 5)]
    written = encode_snapshot(leases)
    moved = [*leases[1:], Lease(leases[0].mac, IPv4Address("10.0.0.9"), T0)]  # 1 moved to .9
    encoder = SnapshotEncoder()
    assert encoder.adopt(moved, written) == 0  # every line is out of place now
    assert encoder.encode(moved) == encode_snapshot(moved)
    assert SnapshotEncoder().adopt(leases[1:], written) == 0  # a line too many


@given(st.lists(records(), min_size=1, max_size=30), st.data())
def test_torn_tail_is_ignored_and_corrupt_lines_are_counted(
    recs: list[Record], data: st.DataObject
) -> None:
    whole = journal(recs)
    last = encode_record(recs[-1], len(recs) + 1)
    torn = last[: data.draw(st.integers(1, len(last) - 1))]
    state, report = replay(LeaseState(), whole + torn)
    assert view(state) == model(recs)
    assert report.torn_tail

    lines = whole.splitlines(keepends=True)
    at = data.draw(st.integers(0, len(lines)))
    garbage = data.draw(st.sampled_from([b"\x00\x00\x00\n", b"{not json\n", b"\n"]))
    state, report = replay(LeaseState(), b"".join([*lines[:at], garbage, *lines[at:]]))
    assert view(state) == model(recs)
    assert (report.corrupt, report.torn_tail) == (1, False)


@given(st.lists(records(), max_size=30), records(), st.data())
def test_zeros_after_the_records_are_padding_and_a_record_cut_before_them_is_torn(
    recs: list[Record], cut: Record, data: st.DataObject
) -> None:
    """The store writes zeros ahead of its next record; replay takes them for no line, and
    a record a crash cut short before them (parts of it zeros: pages that did not reach
    the disk) for a torn tail. `end` is where the next record goes."""
    whole = journal(recs)
    pad = b"\0" * data.draw(st.integers(0, 5000))
    state, report = replay(LeaseState(), whole + pad)
    assert view(state) == model(recs)
    assert (report.records, report.corrupt, report.torn_tail) == (len(recs), 0, False)
    assert report.end == len(whole)

    line = encode_record(cut, len(recs) + 1)
    torn = bytearray(line[: data.draw(st.integers(1, len(line) - 1))])
    start = data.draw(st.integers(0, len(torn) - 1))
    stop = data.draw(st.integers(start, len(torn) - 1))  # the fragment's last byte stays
    torn[start:stop] = bytes(stop - start)
    state, report = replay(LeaseState(), whole + torn + b"\0" + pad)
    assert view(state) == model(recs)
    assert (report.records, report.corrupt, report.torn_tail) == (len(recs), 0, True)
    assert report.end == len(whole)


def test_stale_release_is_a_noop_and_seq_order_is_checked() -> None:
    lease = Lease(MACS[0], IPS[0], 100.0)
    recs = [Record.grant(lease), Record.release(Lease(MACS[0], IPS[1], 0.0))]
    data = encode_record(recs[0], 5) + encode_record(recs[1], 3)
    state, report = replay(LeaseState(), data)
    assert state.leases == {MACS[0]: lease}
    assert (report.noops, report.out_of_order, report.last_seq) == (1, 1, 5)


@given(
    st.from_regex(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z"),
    st.integers(0, 2**32 - 1),
    st.floats(0, 4e9, allow_nan=False),
    st.text(),
    st.text(),
)
def test_a_snapshot_line_is_what_json_writes_for_the_lease(
    mac: str, ip: int, expires: float, hostname: str, client_id: str
) -> None:
    """Lines are built by hand for speed; json's encoder is the oracle, escapes and all."""
    lease = Lease(mac, IPv4Address(ip), expires, hostname, client_id)
    assert snapshot_line(lease) == json.dumps(lease_to_json(lease))

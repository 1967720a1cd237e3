"""The tests' stand-in for the Go tool's lease loader reads what Go reads and skips what Go
skips, so a test that trusts it is as strict as the Go tool after a rollback."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.support import golease

T0 = datetime(2026, 4, 5, 6, 0, tzinfo=UTC).timestamp()


def entry(
    mac: str = "52:54:00:aa:bb:01", ip: str = "10.0.0.7", expiry: str = "2026-04-05T06:00:00Z"
) -> dict[str, str]:
    return {"mac": mac, "ip": ip, "expiry": expiry}


def read(*entries: Any, now: float = T0 - 1) -> golease.GoRead:
    return golease.read(json.dumps(list(entries)).encode(), now)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("52:54:00:AA:bb:01", "52:54:00:aa:bb:01"),
        ("52-54-00-aa-bb-01", "52:54:00:aa:bb:01"),
        ("5254.00aa.bb01", "52:54:00:aa:bb:01"),
        ("00:00:00:00:fe:80:00:00", "00:00:00:00:fe:80:00:00"),
        (":".join(["02"] * 20), ":".join(["02"] * 20)),
        ("52:54-00:aa:bb:01", None),  # one separator throughout
        ("52:54:00:aa:bb:01:02", None),  # 7 bytes
        ("5254:00aa:bb01", None),
        ("52:54:00:aa:bb:0g", None),
        ("52:54:00:aa:bb", None),
        ("", None),
    ],
)
def test_mac_forms_are_go_net_parsemac(text: str, parsed: str | None) -> None:
    got = golease.parse_mac(text)
    assert (got.hex(":") if got is not None else None) == parsed


def test_entries_go_would_skip_are_skipped() -> None:
    got = read(
        entry(),
        entry(mac="5254.00aa.bb02", ip="::ffff:10.0.0.8", expiry="2026-04-05T14:00:01+08:00"),
        entry(mac="52:54:00:aa:bb"),
        entry(ip="fe80::1"),
        entry(ip="010.0.0.7"),
        entry(expiry="2026-04-05 06:00:00Z"),
        entry(expiry="2026-04-05T06:00:00"),
        entry(expiry="2026-04-05T05:59:58Z"),  # expired
        None,
    )
    assert [(x.mac, x.ip, x.expiry) for x in got.leases] == [
        ("52:54:00:aa:bb:01", IPv4Address("10.0.0.7"), T0),
        ("52:54:00:aa:bb:02", IPv4Address("10.0.0.8"), T0 + 1),
    ]
    assert len(got.skipped) == 7


def test_key_case_and_extra_keys_are_ignored_null_is_empty() -> None:
    got = read(
        {
            "MAC": "52:54:00:aa:bb:01",
            "Ip": "10.0.0.7",
            "expiry": "2026-04-05T06:00:00Z",
            "hostname": "vm",
        }
    )
    assert [x.mac for x in got.leases] == ["52:54:00:aa:bb:01"]
    assert golease.read(b"null", T0) == golease.GoRead((), ())


@pytest.mark.parametrize(
    "data", [b"", b"{}", b'{"mac": "x"}', b"[1]", b'[{"mac": 5}]', b"[{", b"\xff"]
)
def test_files_go_would_reject_whole_are_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        golease.read(data, T0)


GO_POOL = b"""{
  "platform": "gke",
  "nodeName": "cocoon-pool",
  "subnet": "172.20.100.0/24",
  "gateway": "172.20.100.1",
  "primaryNIC": "ens4",
  "ips": ["172.20.100.2", "fe80::1", "172.20.100.3"],
  "aliasRangeName": "cocoon-pods",
  "dnsServers": ["8.8.8.8", "1.1.1.1"],
  "updatedAt": "2026-04-05T06:00:00.123456789Z"
}"""


def test_pool_as_the_go_daemon_loads_it() -> None:
    pool = golease.read_pool(GO_POOL)
    assert pool.ips == (IPv4Address("172.20.100.2"), IPv4Address("172.20.100.3"))
    assert pool.gateway == IPv4Address("172.20.100.1")
    raw = json.loads(GO_POOL)
    # A key Go does not know is ignored, whatever its type.
    assert golease.read_pool(json.dumps({**raw, "mtu": {"x": 1}}).encode()) == pool
    wrong = [
        ("ips", "172.20.100.2"),
        ("ips", ["fe80::1"]),
        ("gateway", "x"),
        ("updatedAt", "today"),
        ("dropInternalAccess", "yes"),
    ]
    for key, bad in wrong:
        with pytest.raises(ValueError):
            golease.read_pool(json.dumps({**raw, key: bad}).encode())

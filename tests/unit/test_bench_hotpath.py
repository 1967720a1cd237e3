"""The in-process hot-path bench runs every exchange to its ACK on a real store, or says which
did not: its figures are then for DORAs that really happened."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from bench import hotpath_bench
from bench.loadgen import request_frame

from cocoon_net.dhcp.store import LeaseStore


def test_every_exchange_ends_in_an_ack_with_its_grant_on_disk(tmp_path: Path) -> None:
    discover, request = asyncio.run(hotpath_bench.run(40, tmp_path, 0.0))
    assert discover > 0 and request > 0
    store = LeaseStore(tmp_path / "leases.json")
    recovered = store.open()
    store.close(compact=False)
    assert len(recovered.leases) == 40


def test_a_reply_that_is_no_ack_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def for_another_address(mac: bytes, xid: int, offered: IPv4Address, server: bytes) -> bytes:
        return request_frame(mac, xid, offered + 1, server)

    monkeypatch.setattr(hotpath_bench, "request_frame", for_another_address)
    with pytest.raises(RuntimeError, match="client 0"):
        asyncio.run(hotpath_bench.run(3, tmp_path, 0.0))

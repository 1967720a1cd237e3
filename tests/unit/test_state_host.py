"""pool.json's host record: what host setup changed, as teardown reads it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cocoon_net import state
from cocoon_net.errors import StateError
from cocoon_net.state import HostRecord

POOL = {"platform": "static", "nodeName": "n1", "subnet": "10.66.0.0/24", "gateway": "10.66.0.1"}


def _load(tmp_path: Path, host: Any) -> state.PoolState:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({**POOL, "host": host}))
    return state.load(path)


def test_the_values_we_set_survive_a_save_and_load(tmp_path: Path) -> None:
    record = HostRecord(
        bridge_created=True,
        bridge_address="10.66.0.1/24",
        sysctls_before={"net.ipv4.ip_forward": "0"},
        sysctls_set={"net.ipv4.ip_forward": "1"},
    )
    pool = _load(tmp_path, record.to_json())
    assert pool.host == record
    state.save(tmp_path / "again.json", pool)
    assert json.loads((tmp_path / "again.json").read_text())["host"]["sysctlsSet"] == {
        "net.ipv4.ip_forward": "1"
    }


def test_a_record_written_before_sysctls_set_existed_loads_without_it(tmp_path: Path) -> None:
    old = {"bridgeCreated": True, "sysctlsBefore": {"net.ipv4.ip_forward": "0"}}
    host = _load(tmp_path, old).host
    assert host.sysctls_before == {"net.ipv4.ip_forward": "0"}
    assert host.sysctls_set == {}


@pytest.mark.parametrize("key", ["sysctlsBefore", "sysctlsSet"])
def test_a_sysctl_map_that_is_not_an_object_is_a_clear_error(tmp_path: Path, key: str) -> None:
    with pytest.raises(StateError, match=rf"pool.json: host.{key} must be an object"):
        _load(tmp_path, {key: ["net.ipv4.ip_forward"]})

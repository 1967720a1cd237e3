"""The VM guard's plans: the nftables text it sends and which elements a lease table means."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net.dhcp import effects
from cocoon_net.dhcp.leases import LeaseTable
from cocoon_net.node import cni, guard
from cocoon_net.state import GuardRecord, PoolState

A, B, C = (IPv4Address(f"10.0.0.{i}") for i in (2, 3, 4))
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
POLICY = guard.GuardPolicy("cni0", IPv4Address("10.0.0.1"))


def test_one_lease_change_is_one_element_change() -> None:
    current = {A: MAC_A}
    assert guard.element_changes(current, {A: MAC_A}) == ([], [])  # a renewal: nothing
    assert guard.element_changes(current, {B: MAC_B}) == ([], [(B, MAC_B)])
    assert guard.element_changes(current, {A: None}) == ([(A, MAC_A)], [])
    assert guard.element_changes(current, {C: None}) == ([], [])  # nothing there to delete
    # the address moved to another MAC: out with the old pair, in with the new
    assert guard.element_changes(current, {A: MAC_B}) == ([(A, MAC_A)], [(A, MAC_B)])


def test_an_unchanged_address_in_a_batch_does_not_hold_up_the_others() -> None:
    current = {A: MAC_A, C: MAC_A}
    wanted = {A: MAC_A, B: MAC_B, C: None}  # one wake-up: A renewed, B granted, C released
    assert guard.element_changes(current, wanted) == ([(C, MAC_A)], [(B, MAC_B)])


def test_element_key_pads_the_mac_to_four_byte_words() -> None:
    key = guard.element_key(A, MAC_A)
    assert key == bytes.fromhex("02000000000a00000a000002")


def test_render_replaces_both_tables_in_one_transaction() -> None:
    text = guard.render(POLICY, ["veth1", "veth0"], {B: MAC_B, A: MAC_A})
    lines = text.splitlines()
    assert lines[:4] == [
        "add table bridge cocoon-net",
        "delete table bridge cocoon-net",
        "add table inet cocoon-net",
        "delete table inet cocoon-net",
    ]
    assert 'elements = { "veth0", "veth1" }' in text
    assert f"elements = {{ {MAC_A} . {A}, {MAC_B} . {B} }}" in text
    assert "ip daddr { 10.0.0.1, 255.255.255.255 }" in text
    assert "counter name ipv6 drop" in text
    assert 'iifname "cni0" oifname "cni0" meta pkttype host counter name vm_to_vm drop' in text


def test_empty_sets_have_no_elements_line() -> None:
    assert "elements" not in guard.render(POLICY, [], {})


def test_policy_flags_open_ipv6_and_vm_to_vm() -> None:
    open_policy = guard.GuardPolicy(
        "cni0", IPv4Address("10.0.0.1"), allow_vm_to_vm=True, allow_ipv6=True
    )
    text = guard.render(open_policy, [], {})
    assert "counter name ipv6 drop" not in text
    assert "router_advert" in text  # router advertisements stay dropped
    assert "vm_to_vm drop" not in text
    assert guard.expected_rules(open_policy)["inet/forward"] == 0
    assert guard.expected_rules(POLICY)["inet/forward"] == 1


def test_port_commands() -> None:
    assert guard.port_commands({"veth0", "veth1"}, {"veth1", "veth2"}) == [
        'delete element bridge cocoon-net ports { "veth0" }',
        'add element bridge cocoon-net ports { "veth2" }',
    ]


def test_elements_follow_the_lease_table() -> None:
    table = LeaseTable([A, B, C])
    now = 1000.0
    touched = effects.touched(table.grant(MAC_A, A, now, 60))
    assert effects.guard_elements(table, {}, touched, now) == {A: MAC_A}
    assert effects.guarded(table, {}, now) == {A: MAC_A}
    touched = effects.touched(table.release(MAC_A, A, now + 1))
    assert effects.guard_elements(table, {A: MAC_A}, touched, now + 1) == {A: None}
    table.grant(MAC_B, B, now, 60)
    assert effects.guarded(table, {}, now + 61) == {}  # expired: nobody may use it


def test_an_address_held_after_a_lost_lease_file_keeps_the_kernels_mac() -> None:
    table = LeaseTable([A, B, C])
    now = 1000.0
    table.load([], [], {}, now, in_use={A: "", B: ""}, recovery_hold=60.0)
    kernel = {A: MAC_A, C: MAC_B}  # C: not held any more, so not kept
    assert effects.guarded(table, kernel, now) == {A: MAC_A}
    assert effects.guard_elements(table, kernel, {A, B}, now) == {A: MAC_A, B: None}
    # once the VM asks and gets its lease, the element is its lease's
    table.grant(MAC_B, A, now, 60)
    assert effects.guard_elements(table, kernel, {A}, now) == {A: MAC_B}


def test_an_unsettled_address_keeps_the_element_the_guard_holds() -> None:
    # A granted to MAC_B (the guard still holds MAC_A's lease before it), B granted anew, C
    # released: none of them on disk yet; the guard takes them as it holds them.
    table = LeaseTable([A, B, C])
    now = 1000.0
    table.grant(MAC_A, C, now, 60)
    table.release(MAC_A, C, now)
    table.grant(MAC_B, A, now, 60)
    table.grant(MAC_A, B, now, 60)
    held = {A: MAC_A, C: MAC_A}
    assert effects.guarded(table, held, now, unsettled={A, B, C}) == held
    assert effects.guarded(table, held, now, unsettled={A}) == {A: MAC_A, B: MAC_A}
    assert effects.guarded(table, held, now) == {A: MAC_B, B: MAC_A}
    # C released, and no element for it yet: it has none
    assert effects.guarded(table, {}, now, unsettled={C}) == {A: MAC_B, B: MAC_A}


def test_pool_json_guard_key_round_trips(tmp_path: Path) -> None:
    pool = PoolState(platform="static", node_name="n", subnet="10.0.0.0/24", gateway="10.0.0.1")
    assert pool.to_json()["guard"] == {
        "allowVmToVm": False,
        "allowIPv6": False,
        "installed": False,
    }
    pool.guard = GuardRecord(allow_vm_to_vm=True, installed=True)
    again = PoolState.from_json(json.loads(json.dumps(pool.to_json())), source=tmp_path)
    assert again.guard == pool.guard
    go_written = {k: v for k, v in pool.to_json().items() if k != "guard"}
    assert PoolState.from_json(go_written, source=tmp_path).guard == GuardRecord()
    with pytest.raises(Exception, match="guard must be an object"):
        PoolState.from_json({**go_written, "guard": []}, source=tmp_path)


def test_conflist_port_isolation_follows_allow_vm_to_vm() -> None:
    assert json.loads(cni.render_conflist("cni0"))["plugins"][0]["portIsolation"] is True
    opened = json.loads(cni.render_conflist("cni0", port_isolation=False))
    assert opened["plugins"][0]["portIsolation"] is False

"""What host setup made is made again when someone else changes it, with a VM being served.

Each breakage is what another program or an operator does on a real host (a firewall reload,
`ip addr flush`, a changed sysctl). The repair must come back within the bound the operator is
promised (2 s for the firewall, 1 s for the bridge, the periodic check for sysctls and the
conflist), appear once in the log as a repair and raise cocoon_net_repairs_total; the VM's
traffic to the VPC peer keeps its own address.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from cocoon_net import proc
from cocoon_net.daemon import HOST_CHECK_SECONDS
from cocoon_net.sandbox import Sandbox, Udhcpc
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

REPAIRS = "cocoon_net_repairs_total"
FIREWALL_BOUND = 2.0
BRIDGE_BOUND = 1.0


def repaired_within(
    daemon: NodeDaemon, kind: str, before: float, bound: float, restored: object
) -> None:
    """The repair counter of kind rises and `restored()` holds again, within bound seconds of
    now (the breakage was just made)."""
    started = time.monotonic()
    wait_for(
        lambda: (daemon.metric(REPAIRS, what=kind) > before and restored()) or None,  # type: ignore[operator]
        f"the {kind} repair",
        timeout=bound + 5,  # a generous wait, then the bound is checked: a clearer failure
    )
    took = time.monotonic() - started
    assert took <= bound, f"{kind} repaired after {took:.2f} s (bound {bound} s)"


def rules(sandbox: Sandbox) -> list[str]:
    """Our iptables rules and jumps, as iptables-save lists them (order kept)."""
    text = proc.run(["ip", "netns", "exec", sandbox.node, "iptables-save"]).stdout
    return [line for line in text.splitlines() if "COCOON" in line]


def node(sandbox: Sandbox, argv: Sequence[str]) -> None:
    sandbox.run(sandbox.node, list(argv))


def repair_lines(daemon: NodeDaemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if " repaired: " in line]


def test_firewall_flushed_or_its_jump_deleted_comes_back(tmp_path: Path) -> None:
    with node_with_daemon(1, tmp_path) as (sandbox, daemon):
        vm = sandbox.vms[0]
        ip = Udhcpc(sandbox, vm).start()
        assert sandbox.source_seen_by_peer(vm.netns) == ip
        ours = rules(sandbox)
        jump = next(r for r in ours if r.startswith("-A POSTROUTING") and "COCOON" in r)

        for breakage in (
            ["iptables", "-F", "COCOON-FORWARD"],
            ["iptables", "-t", "nat", *shlex.split(jump.replace("-A", "-D", 1))],
            ["nft", "flush", "ruleset"],
        ):
            before = daemon.metric(REPAIRS, what="firewall")
            lines = len(repair_lines(daemon))
            node(sandbox, breakage)
            assert rules(sandbox) != ours, f"{breakage} changed nothing"
            repaired_within(
                daemon, "firewall", before, FIREWALL_BOUND, lambda: rules(sandbox) == ours
            )
            assert sandbox.source_seen_by_peer(vm.netns) == ip
            new = repair_lines(daemon)[lines:]
            assert len(new) == 1 and "firewall:" in new[0], new
        assert not daemon.errors()


def forward_chain(sandbox: Sandbox) -> list[str]:
    text = proc.run(["ip", "netns", "exec", sandbox.node, "iptables", "-S", "FORWARD"]).stdout
    return [line for line in text.splitlines() if line.startswith("-A FORWARD")]


def test_a_rule_inserted_above_our_jump_is_passed_and_kept(tmp_path: Path) -> None:
    """Another program's DROP put first in FORWARD cuts the VMs off: our jump goes first
    again, and the other program's rule stays where we found it, below ours."""
    with node_with_daemon(1, tmp_path) as (sandbox, daemon):
        vm = sandbox.vms[0]
        ip = Udhcpc(sandbox, vm).start()
        assert sandbox.source_seen_by_peer(vm.netns) == ip
        before = daemon.metric(REPAIRS, what="firewall")
        lines = len(repair_lines(daemon))
        theirs = ["-i", "cni0", "-m", "comment", "--comment", "someone else", "-j", "DROP"]
        node(sandbox, ["iptables", "-I", "FORWARD", "1", *theirs])
        assert "someone else" in forward_chain(sandbox)[0]
        repaired_within(
            daemon,
            "firewall",
            before,
            FIREWALL_BOUND,
            lambda: "COCOON-FORWARD" in forward_chain(sandbox)[0],
        )
        assert "someone else" in forward_chain(sandbox)[1]
        assert sandbox.source_seen_by_peer(vm.netns) == ip
        new = repair_lines(daemon)[lines:]
        assert len(new) == 1 and "put our jump first again in FORWARD" in new[0], new
        assert not daemon.errors()


def bridge(sandbox: Sandbox) -> dict[str, object]:
    link = proc.run_json(["ip", "-n", sandbox.node, "-json", "addr", "show", "dev", "cni0"])[0]
    return {
        "up": "UP" in link["flags"],
        "mtu": link["mtu"],
        "mac": link["address"],
        "addrs": sorted(a["local"] for a in link["addr_info"] if a["family"] == "inet"),
    }


def test_bridge_address_state_mtu_and_mac_come_back(tmp_path: Path) -> None:
    with node_with_daemon(1, tmp_path) as (sandbox, daemon):
        vm = sandbox.vms[0]
        ip = Udhcpc(sandbox, vm).start()
        good = bridge(sandbox)
        gateway = f"{sandbox.gateway}/{sandbox.subnet.prefixlen}"
        for breakage in (
            ["ip", "addr", "del", gateway, "dev", "cni0"],
            ["ip", "link", "set", "cni0", "down"],
            ["ip", "link", "set", "cni0", "mtu", "1400"],
            ["ip", "link", "set", "cni0", "address", "02:00:00:00:00:99"],
        ):
            before = daemon.metric(REPAIRS, what="bridge")
            node(sandbox, breakage)
            assert bridge(sandbox) != good, f"{breakage} changed nothing"
            repaired_within(daemon, "bridge", before, BRIDGE_BOUND, lambda: bridge(sandbox) == good)
        # Setting the bridge down took the lease's route: it is back, and so is the traffic.
        wait_for(lambda: daemon.routes() == {ip} or None, "the lease route")
        assert sandbox.source_seen_by_peer(vm.netns) == ip
        assert not daemon.errors()


def test_sysctl_and_conflist_come_back_within_the_periodic_check(tmp_path: Path) -> None:
    with node_with_daemon(1, tmp_path) as (sandbox, daemon):
        conflist = next(daemon.paths.cni_conf_dir.glob("*.conflist"))
        ours = conflist.read_bytes()
        before = daemon.metric(REPAIRS, what="sysctl")
        node(sandbox, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
        repaired_within(
            daemon, "sysctl", before, HOST_CHECK_SECONDS + 1,
            lambda: proc.run(["ip", "netns", "exec", sandbox.node, "cat",
                              "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1",
        )  # fmt: skip

        before = daemon.metric(REPAIRS, what="conflist")
        conflist.write_text('{"cniVersion": "1.0.0", "name": "someone-else", "plugins": []}\n')
        repaired_within(
            daemon, "conflist", before, HOST_CHECK_SECONDS + 1,
            lambda: conflist.read_bytes() == ours,
        )  # fmt: skip
        assert not daemon.errors()

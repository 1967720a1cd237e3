"""The data path with each real DHCP client: lease, /32 route, VPC reachability, renew, release.

One node runs the daemon (adopt --platform static in a sandbox); each client runs on a VM of
its own. What is asserted is what an operator sees: the address the VM's kernel carries, the
node's proto-203 routes, the source address the VPC peer sees, and the daemon's lease list.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from cocoon_net import state
from cocoon_net.sandbox import Dhclient, Dhcpcd, DhcpClient, Sandbox, Udhcpc
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import is_root

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

CLIENTS: tuple[type[DhcpClient], ...] = (Udhcpc, Dhclient, Dhcpcd)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    with node_with_daemon(len(CLIENTS), tmp_path_factory.mktemp("clients")) as pair:
        yield pair


def route_count(node: NodeDaemon, ip: IPv4Address) -> int:
    return node.route_list().count(ip)


@pytest.mark.parametrize("index", range(len(CLIENTS)), ids=[c.program for c in CLIENTS])
def test_client_lease_route_reach_renew_release(
    node: tuple[Sandbox, NodeDaemon], index: int
) -> None:
    sandbox, daemon = node
    vm = sandbox.vms[index]
    client = CLIENTS[index](sandbox, vm, hostname=f"vm{index}")
    pool = set(state.load(daemon.paths.pool_file).pool_ips)

    ip = client.start()
    assert ip in pool
    # The route is installed before the ACK leaves, so it is there the moment the VM is bound.
    assert route_count(daemon, ip) == 1
    lease = daemon.leases()[vm.mac]
    assert lease.ip == ip
    assert lease.route
    assert lease.hostname == f"vm{index}"

    # The VPC reaches the VM at its own address: the node routes, it does not masquerade.
    sandbox.run(vm.netns, ["ping", "-c", "1", "-W", "3", str(sandbox.peer_ip)])
    assert sandbox.source_seen_by_peer(vm.netns) == ip

    before = lease.expires
    assert client.renew() == ip
    renewed = daemon.leases()[vm.mac]
    assert renewed.ip == ip
    assert renewed.expires >= before
    assert route_count(daemon, ip) == 1

    client.release()
    # The RELEASE is made durable before the route goes; poll briefly for both.
    wait_for(
        lambda: (vm.mac not in daemon.leases() and ip not in daemon.routes()) or None,
        f"{client.program}'s release to end the lease and remove the route of {ip}",
    )
    assert daemon.routes() == {row.ip for row in daemon.leases().values()}


def test_release_command_ends_a_lease_at_once(node: tuple[Sandbox, NodeDaemon]) -> None:
    """The VM manager's `cocoon-net release --mac`: the lease and its route go, and the next
    DISCOVER from that MAC gets the same address back (sticky allocation)."""
    sandbox, daemon = node
    vm = sandbox.vms[0]
    client = Udhcpc(sandbox, vm)
    ip = client.start()
    client.stop()  # the VM is deleted without a word to the server
    assert daemon.leases()[vm.mac].ip == ip

    assert daemon.release(vm.mac) == [str(ip)]
    assert vm.mac not in daemon.leases()
    assert ip not in daemon.routes()

    assert client.start() == ip
    assert route_count(daemon, ip) == 1
    client.release()

"""What init and adopt may change under a running daemon, and what a shrink takes away."""

from __future__ import annotations

from ipaddress import IPv4Address

from cocoon_net import poolchange
from cocoon_net.platform import volcengine
from cocoon_net.state import PoolState


def _pool(**changes: object) -> PoolState:
    pool = PoolState(
        platform="static",
        node_name="n1",
        subnet="172.20.100.0/24",
        gateway="172.20.100.1",
        ips=["172.20.100.2", "172.20.100.3"],
        primary_nic="eth0",
        dns_servers=["8.8.8.8"],
        vpc_cidrs=["10.0.0.0/8"],
        lease_file="/var/lib/cocoon/net/leases.json",
        cni_conflist="/etc/cni/net.d/30-cocoon-dhcp.conflist",
    )
    for key, value in changes.items():
        setattr(pool, key, value)
    return pool


def test_pool_size_and_dns_are_online_changes() -> None:
    wanted = _pool(ips=[f"172.20.100.{i}" for i in range(2, 12)], dns_servers=["9.9.9.9"])
    assert poolchange.offline_changes(_pool(), wanted) == []


def test_every_other_change_is_named() -> None:
    wanted = _pool(
        subnet="172.20.200.0/24",
        gateway="172.20.200.1",
        bridge="br1",
        mtu=1400,
        drop_internal_access=True,
        manage_iptables=False,
    )
    assert poolchange.offline_changes(_pool(), wanted) == [
        "subnet 172.20.100.0/24 -> 172.20.200.0/24",
        "gateway 172.20.100.1 -> 172.20.200.1",
        "bridge cni0 -> br1",
        "mtu (default) -> 1400",
        "drop-internal-access false -> true",
        "manage-iptables true -> false",
    ]


def test_a_go_pool_file_without_our_paths_means_the_defaults() -> None:
    assert poolchange.offline_changes(_pool(lease_file="", cni_conflist=""), _pool()) == []


def test_settings_init_finds_by_itself_are_kept_unless_named() -> None:
    pending = _pool(primary_nic="", mtu=1400, vpc_cidrs=[])
    poolchange.keep_unset(pending, _pool(mtu=1460), given=["mtu"])
    assert (pending.primary_nic, pending.mtu, pending.vpc_cidrs) == ("eth0", 1400, ["10.0.0.0/8"])


def test_only_leases_in_the_removed_part_block_a_shrink() -> None:
    ips = [IPv4Address(f"10.0.0.{i}") for i in range(2, 8)]
    kept = ips[:3]
    assert poolchange.leased_in_removed(ips, kept, [ips[0], ips[5], ips[4]]) == [ips[4], ips[5]]
    assert poolchange.leased_in_removed(ips, kept, ips[:3]) == []


def test_volcengine_shrink_keeps_the_lowest_addresses_of_each_slot() -> None:
    one = [IPv4Address(f"172.20.100.{i}") for i in range(10, 30)]  # 20 on slot 1
    two = [IPv4Address(f"172.20.100.{i}") for i in range(100, 110)]  # 10 on slot 2
    other = [IPv4Address("172.20.100.200")]  # an ENI outside the slots
    records = [
        {"name": "n1-eni-2", "ips": [str(ip) for ip in reversed(two)]},
        {"name": "n1-eni-1", "ips": [str(ip) for ip in one]},
        {"name": "operator-eni", "ips": [str(ip) for ip in other]},
    ]
    pool = one + two + other
    assert volcengine.kept_ips(records, "n1", pool, 25) == set(one) | set(two[:5])
    assert volcengine.kept_ips(records, "n1", pool, 15) == set(one[:15])
    assert volcengine.kept_ips(records, "n1", pool, 40) == set(one) | set(two)

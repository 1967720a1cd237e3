"""Egress by the owning ENI: every VM address leaves by the secondary ENI it belongs to.

Clouds drop a packet whose source address is not assigned to the interface it leaves by, so
a VM whose address sits on a secondary ENI cannot use the host's routes to the VPC (they
leave by the primary NIC). For each secondary ENI we keep a routing table of our own
(TABLE_BASE + its position) routing the VPC's CIDRs out of that ENI, and `ip rule`s
selecting what the ENI owns: one per delegated prefix, kept as long as the ENI lists it, and
one per secondary address that holds a /32 route, added and removed with that route in the
same netlink batch (the route socket carries both), so a VM's rule is in place before its
ACK and gone with its lease. Traffic to anywhere else finds no route in the ENI's table and
falls through to the main table: it is masqueraded to the primary NIC's address and leaves
by that NIC, as before.

The VPC gateway of the ENI's subnet is usually the bridge's own address (the ENIs sit in the
VM subnet), and the kernel refuses a local address as a next hop. The routes go instead via
NEXTHOP, a link-local address that stands for the gateway on that ENI, with a permanent
neighbour entry holding the MAC the gateway answers with on the ENI (asked by ARP from an
address of that ENI). Traffic to the VM subnet itself keeps the main table (one rule ahead
of the per-address ones), so VM-to-VM and VM-to-host traffic is untouched.

Ours: rules with protocol ROUTE_PROTO at priorities PRIO_SUBNET and PRIO_ENI, routes with
protocol ROUTE_PROTO in tables TABLE_BASE..+TABLE_SPAN, the NEXTHOP neighbour entries on the
ENIs those routes use. Reconcile and teardown remove only those. A node whose pool.json lists
no secondary ENI, and that holds no rule of ours, runs no command for egress at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net import config, proc
from cocoon_net.errors import HostSetupError
from cocoon_net.node import arp, nic, rtnl
from cocoon_net.node.rtnl import Rule
from cocoon_net.state import PoolState

TABLE_BASE = 0x6300  # tables 25344.. (one per secondary ENI, at most 64)
TABLE_SPAN = 64
PRIO_SUBNET = 20000  # `to <vm subnet> lookup main`
PRIO_ENI = 20001  # `from <owned> lookup <eni table>`
PRIORITIES = (PRIO_SUBNET, PRIO_ENI)
NEXTHOP = IPv4Address("169.254.0.1")
MAIN = rtnl.RT_TABLE_MAIN


@dataclass(frozen=True)
class Eni:
    ifname: str
    gateway: IPv4Address
    owned: tuple[IPv4Network, ...]  # its secondary IPs (/32) and delegated prefixes


@dataclass(frozen=True)
class Plan:
    """The per-ENI tables (each routes `vpc` out of its ENI), the rules kept as long as the
    ENIs are (the VM subnet's, one per prefix), and the rule each secondary address gets
    while it holds a route."""

    rules: frozenset[Rule]
    tables: Mapping[int, Eni]
    by_address: Mapping[IPv4Address, Rule] = field(default_factory=dict)
    vpc: tuple[IPv4Network, ...] = ()

    def wanted(self, routed: Iterable[IPv4Address]) -> frozenset[Rule]:
        """Every rule that should exist while `routed` hold their /32 routes."""
        by_address = self.by_address
        return self.rules | {by_address[ip] for ip in routed if ip in by_address}

    def wants(self, rule: Rule, routed: Callable[[IPv4Address], bool]) -> bool:
        """Whether rule should exist (routed: whether an address holds its route)."""
        if rule in self.rules:
            return True
        ip = rule.src.network_address if rule.src and rule.src.prefixlen == 32 else None
        return ip is not None and self.by_address.get(ip) == rule and routed(ip)


EMPTY = Plan(frozenset(), {})


def enis_from_cloud(
    cloud: Mapping[str, Any], gateway: IPv4Address, primary: str | None
) -> list[Eni]:
    """The secondary ENIs pool.json's cloud record lists, with the addresses each owns.

    An entry names its MAC (its interface is looked up now) or its interface (`ifname`), and
    may name its subnet's gateway (else the pool's). The primary NIC and ENIs whose
    interface is not on this host are left out: the main table already serves the one,
    nothing can reach the other.
    """
    out: list[Eni] = []
    records = [raw for raw in cloud.get("enis") or () if isinstance(raw, Mapping)]
    links = nic.links() if any(raw.get("mac") for raw in records) else []
    for raw in records:
        # By MAC where known: interface names can change across reboots, MACs do not.
        mac = str(raw.get("mac") or "")
        ifname = (nic.pick_by_mac(links, mac) if mac else str(raw.get("ifname") or "")) or ""
        if not ifname or ifname == primary:
            continue
        owned = [IPv4Network(f"{ip}/32") for ip in raw.get("ips") or ()]
        owned += [IPv4Network(str(p)) for p in raw.get("prefixes") or ()]
        gw = IPv4Address(str(raw["gateway"])) if raw.get("gateway") else gateway
        if owned:
            out.append(Eni(ifname, gw, tuple(sorted(set(owned)))))
    return sorted(out, key=lambda e: e.ifname)


def plan(enis: Iterable[Eni], subnet: IPv4Network, vpc: Iterable[IPv4Network]) -> Plan:
    """Pure: the rules and tables for enis (VM subnet `subnet` stays on the main table).

    Without VPC CIDRs every VM packet leaving the node is masqueraded to the primary NIC's
    address, so the main table is right for all of them: nothing to do.
    """
    vpc = tuple(sorted(set(vpc), key=str))
    enis = sorted(enis, key=lambda e: e.ifname) if vpc else []
    if len(enis) > TABLE_SPAN:
        raise HostSetupError(f"{len(enis)} ENIs: egress supports at most {TABLE_SPAN}")
    tables = {TABLE_BASE + i: eni for i, eni in enumerate(enis)}
    owned = [(Rule(PRIO_ENI, t, src=net), net) for t, eni in tables.items() for net in eni.owned]
    rules = {rule for rule, net in owned if net.prefixlen < 32}
    if tables:
        rules.add(Rule(PRIO_SUBNET, MAIN, dst=subnet))
    by_address = {net.network_address: rule for rule, net in owned if net.prefixlen == 32}
    return Plan(frozenset(rules), tables, by_address, vpc if tables else ())


def plan_for(pool: PoolState) -> Plan:
    enis = enis_from_cloud(pool.cloud, pool.gateway_ip, pool.primary_nic or None)
    return plan(enis, pool.network, map(IPv4Network, pool.vpc_cidrs))


# --- tables (iproute2) ---------------------------------------------------------------------


def _json(argv: list[str]) -> list[dict[str, Any]]:
    out = proc.run(argv).stdout.strip()
    return list(json.loads(out)) if out else []


def _table_routes(table: int) -> list[dict[str, Any]]:
    """Our routes in table (a table that does not exist holds none)."""
    argv = ["ip", "-json", "-4", "route", "show", "table", str(table)]
    result = proc.run(argv, ok_codes=(0, 1, 2))
    if result.returncode != 0:
        if "does not exist" in result.stderr:
            return []
        raise HostSetupError(f"{' '.join(argv)}: {result.stderr.strip() or 'failed'}")
    out = result.stdout.strip()
    return [r for r in (json.loads(out) if out else []) if _is_ours(r)]


def _is_ours(route: Mapping[str, Any]) -> bool:
    return str(route.get("protocol")) == str(config.ROUTE_PROTO)


def _resolved() -> dict[str, str]:
    """The interfaces holding a permanent NEXTHOP entry, with its MAC."""
    found = _json(["ip", "-json", "-4", "neigh", "show", str(NEXTHOP)])
    return {
        str(n.get("dev")): str(n.get("lladdr") or "")
        for n in found
        if "PERMANENT" in (n.get("state") or ())
    }


def _route_keys(routes: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    return {(str(r.get("dst")), str(r.get("gateway")), str(r.get("dev"))) for r in routes}


def _wanted_keys(want: Plan, eni: Eni) -> set[tuple[str, str, str]]:
    return {(str(net), str(NEXTHOP), eni.ifname) for net in want.vpc}


def gateway_mac(eni: Eni) -> str:
    """The MAC the ENI's gateway answers with on the ENI, asked from an address it owns."""
    sender = eni.owned[0].network_address
    try:
        found = arp.probe(eni.ifname, sender, [eni.gateway])
    except OSError as exc:
        raise HostSetupError(f"ARP for gateway {eni.gateway} on {eni.ifname}: {exc}") from exc
    if eni.gateway not in found:
        raise HostSetupError(f"gateway {eni.gateway} does not answer ARP on {eni.ifname}")
    return found[eni.gateway]


def _batch(lines: list[str]) -> None:
    if lines:
        proc.run(["ip", "-force", "-batch", "-"], stdin="\n".join(lines) + "\n", ok_codes=(0, 1))


def _del_routes(table: int, routes: Iterable[Mapping[str, Any]]) -> None:
    """Delete routes (ours, of table); one already gone is no error."""
    proto = config.ROUTE_PROTO
    _batch([f"route del {r['dst']} table {table} proto {proto}" for r in routes])


def _fix_table(want: Plan, table: int, eni: Eni, routes: list[dict[str, Any]]) -> str:
    mac = gateway_mac(eni)
    proc.run(["ip", "neigh", "replace", str(NEXTHOP), "lladdr", mac, "dev", eni.ifname,
              "nud", "permanent"])  # fmt: skip
    wanted = _wanted_keys(want, eni)
    _del_routes(table, [r for r in routes if next(iter(_route_keys([r]))) not in wanted])
    _batch([f"route replace {net} via {NEXTHOP} dev {eni.ifname} onlink proto "
            f"{config.ROUTE_PROTO} table {table}" for net in want.vpc])  # fmt: skip
    return f"table {table}: the VPC out of {eni.ifname} (gateway {eni.gateway} is {mac})"


def sync_tables(
    want: Plan, referenced: Iterable[int], *, scan_all: bool = False
) -> tuple[list[str], list[str]]:
    """Make want's tables and next-hop entries right, and empty ours it no longer has: those
    rules of ours point to (`referenced`) and, scan_all, every table of our range (teardown).
    Returns what changed and what failed: an ENI whose gateway does not answer does not hold
    up the others."""
    candidates = set(want.tables) | (set(referenced) - {MAIN})
    if scan_all:
        candidates |= set(range(TABLE_BASE, TABLE_BASE + TABLE_SPAN))
    tables = {t: _table_routes(t) for t in sorted(candidates)}
    resolved = _resolved() if want.tables else {}
    changes: list[str] = []
    failures: list[str] = []
    for table, eni in sorted(want.tables.items()):
        routes = tables.get(table, [])
        if _route_keys(routes) == _wanted_keys(want, eni) and eni.ifname in resolved:
            continue
        try:
            changes.append(_fix_table(want, table, eni, routes))
        except HostSetupError as exc:
            failures.append(str(exc))
    in_use = {eni.ifname for eni in want.tables.values()}
    for table, routes in tables.items():
        if table in want.tables or not routes:
            continue
        _del_routes(table, routes)
        for dev in sorted({str(r.get("dev")) for r in routes} - in_use):
            proc.run(["ip", "neigh", "del", str(NEXTHOP), "dev", dev], ok_codes=(0, 1, 2))
        changes.append(f"table {table} emptied")
    return changes, failures


# --- rules (netlink) -----------------------------------------------------------------------


def plan_rules(want: frozenset[Rule], present: set[Rule]) -> tuple[list[Rule], list[Rule]]:
    """Pure: the rules to add and to remove (each in a stable order) so ours equal want."""
    return sorted(want - present, key=Rule.spec), sorted(present - want, key=Rule.spec)


def rules_outcome(
    add: Iterable[Rule], remove: Iterable[Rule], failed: Mapping[Rule, str]
) -> tuple[list[str], list[str]]:
    """Pure: what changed (removals first, as they were sent) and what failed, the failures
    in one line however many VMs they concern."""
    changes = [f"rule removed: {r.spec()}" for r in remove if r not in failed]
    changes += [f"rule added: {r.spec()}" for r in add if r not in failed]
    failures = [f"rule {r.spec()}: {why}" for r, why in sorted(failed.items(), key=str)]
    if len(failures) > 1:
        failures = [f"{failures[0]} (and {len(failures) - 1} more)"]
    return changes, failures


def sync_rules(
    sock: rtnl.RouteSocket, want: frozenset[Rule], present: set[Rule]
) -> tuple[list[str], list[str]]:
    """Make our rules equal want, in one netlink batch (removals first: a rule whose table
    moved is re-added with its new table). Returns what changed and what failed."""
    add, remove = plan_rules(want, present)
    if not add and not remove:
        return [], []
    return rules_outcome(add, remove, sock.apply_rules(add, remove))


class Reconciler:
    """The daemon's egress. A secondary address's rule travels with its route (the route
    socket sends both, see configure); reconcile makes the tables and rules match pool.json
    and the routed addresses, repairing what someone else changed."""

    def __init__(self, sock: rtnl.RouteSocket) -> None:
        self.sock = sock
        self.plan = EMPTY

    def configure(self, pool: PoolState) -> None:
        """Take the ENIs from pool.json: from now on the route of each of their secondary
        addresses brings its rule (nothing more is sent on a node without ENIs)."""
        self.plan = plan_for(pool)
        self.sock.rules = self.plan.by_address

    async def reconcile(
        self, pool: PoolState, routed: Callable[[], Iterable[IPv4Address]]
    ) -> list[str]:
        """Tables (in a thread: ARP, iproute2), then rules; what changed. A node without
        secondary ENIs and without rules of ours returns at once, having run no command."""
        import asyncio  # here: `status` imports this module, and asyncio only costs it time

        self.configure(pool)
        present = self.sock.dump_rules(PRIORITIES)
        if not self.plan.tables and not present:
            return []
        # Stale tables are emptied before the rules that point to them go: a crash in
        # between leaves rules, which point the next run to those tables.
        referenced = {r.table for r in present}
        changes, failures = await asyncio.to_thread(sync_tables, self.plan, referenced)
        # No await from here on: a lease granted or ended meanwhile cannot slip between
        # what is wanted and what is changed.
        want = self.plan.wanted(routed())
        done, failed = sync_rules(self.sock, want, self.sock.dump_rules(PRIORITIES))
        if failures or failed:
            raise HostSetupError("egress: " + "; ".join(failures + failed))
        return changes + done


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EniReport:
    """One ENI's egress as the kernel holds it, against what pool.json and the leases ask."""

    ifname: str
    table: int
    gateway: IPv4Address
    gateway_mac: str  # of the NEXTHOP entry on the ENI; empty when it is missing
    table_ok: bool  # the table routes the VPC out of the ENI
    rules_wanted: int
    rules_present: int
    missing: tuple[Rule, ...]

    @property
    def next_hop(self) -> IPv4Address:
        return NEXTHOP

    def to_json(self) -> dict[str, Any]:
        return {
            "ifname": self.ifname,
            "table": self.table,
            "gateway": str(self.gateway),
            "nextHop": str(self.next_hop),
            "gatewayMAC": self.gateway_mac,
            "tableOK": self.table_ok,
            "rulesWanted": self.rules_wanted,
            "rulesPresent": self.rules_present,
            "missingRules": [r.spec() for r in self.missing],
        }


@dataclass(frozen=True)
class Report:
    enis: tuple[EniReport, ...] = ()
    missing: tuple[Rule, ...] = ()  # missing rules of no ENI: the VM subnet's

    def to_json(self) -> dict[str, Any]:
        return {
            "enis": [eni.to_json() for eni in self.enis],
            "missingRules": [r.spec() for r in self.missing],
        }


def report(pool: PoolState, leased: Iterable[IPv4Address]) -> Report:
    """Each ENI's table, next hop and rules (those of its prefixes and of leased addresses);
    empty, having run no command, when pool.json lists no secondary ENI."""
    want = plan_for(pool)
    if not want.tables:
        return Report()
    sock = rtnl.RouteSocket()
    try:
        present = sock.dump_rules(PRIORITIES)
    finally:
        sock.close()
    wanted = want.wanted(leased)
    resolved = _resolved()
    out = []
    for table, eni in sorted(want.tables.items()):
        mine = {r for r in wanted if r.table == table}
        out.append(
            EniReport(
                ifname=eni.ifname,
                table=table,
                gateway=eni.gateway,
                gateway_mac=resolved.get(eni.ifname, ""),
                table_ok=_route_keys(_table_routes(table)) == _wanted_keys(want, eni),
                rules_wanted=len(mine),
                rules_present=len(mine & present),
                missing=tuple(sorted(mine - present, key=Rule.spec)),
            )
        )
    elsewhere = {r for r in wanted - present if r.table not in want.tables}
    return Report(tuple(out), tuple(sorted(elsewhere, key=Rule.spec)))


# --- teardown ------------------------------------------------------------------------------


def plan_flush() -> list[str]:
    """What flush would remove (teardown --dry-run)."""
    sock = rtnl.RouteSocket()
    try:
        rules = sock.dump_rules(PRIORITIES)
    finally:
        sock.close()
    span = range(TABLE_BASE, TABLE_BASE + TABLE_SPAN)
    tables = [t for t in span if _table_routes(t)]
    out = [f"remove {len(rules)} egress rules (protocol {config.ROUTE_PROTO})"] if rules else []
    return out + [f"empty egress table {t}" for t in tables]


def flush() -> list[str]:
    """Remove every rule, table route and next-hop entry of ours (teardown)."""
    sock = rtnl.RouteSocket()
    try:
        changes, failures = sync_tables(EMPTY, (), scan_all=True)
        done, failed = sync_rules(sock, frozenset(), sock.dump_rules(PRIORITIES))
    finally:
        sock.close()
    if failures or failed:
        raise HostSetupError("egress: " + "; ".join(failures + failed))
    return changes + done

"""Egress by the owning ENI: every VM address leaves by the secondary ENI it belongs to.

Clouds drop a packet whose source address is not assigned to the interface it leaves by, so
a VM whose address sits on a secondary ENI cannot use the host's routes to the VPC (they
leave by the primary NIC). For each secondary ENI we keep a routing table of our own
(TABLE_BASE + its position) routing the VPC's CIDRs out of that ENI, and one `ip rule` per
address or prefix the ENI owns selecting it. Traffic to anywhere else finds no route there
and falls through to the main table: it is masqueraded to the primary NIC's address and
leaves by that NIC, as before. Rules are installed for every owned address, leased or not:
a rule for an address no VM holds matches no traffic, and it is in place before the first
packet of the VM that gets the address.

The VPC gateway of the ENI's subnet is usually the bridge's own address (the ENIs sit in the
VM subnet), and the kernel refuses a local address as a next hop. The routes go instead via
NEXTHOP, a link-local address that stands for the gateway on that ENI, with a permanent
neighbour entry holding the MAC the gateway answers with on the ENI (asked by ARP from an
address of that ENI). Traffic to the VM subnet itself keeps the main table (one rule ahead
of the per-address ones), so VM-to-VM and VM-to-host traffic is untouched.

Ours: rules with protocol ROUTE_PROTO at priorities PRIO_SUBNET and PRIO_ENI, routes with
protocol ROUTE_PROTO in tables TABLE_BASE..+TABLE_SPAN, the NEXTHOP neighbour entries on the
ENIs those routes use. Reconcile and teardown remove only those.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cocoon_net import config, proc
from cocoon_net.errors import HostSetupError
from cocoon_net.node import arp, nic

TABLE_BASE = 0x6300  # tables 25344.. (one per secondary ENI, at most 64)
TABLE_SPAN = 64
PRIO_SUBNET = 20000  # `to <vm subnet> lookup main`
PRIO_ENI = 20001  # `from <owned> lookup <eni table>`
NEXTHOP = IPv4Address("169.254.0.1")
MAIN = 254  # the kernel's main table


@dataclass(frozen=True)
class Eni:
    ifname: str
    gateway: IPv4Address
    owned: tuple[IPv4Network, ...]  # its secondary IPs (/32) and delegated prefixes


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    src: IPv4Network | None = None
    dst: IPv4Network | None = None

    def spec(self) -> str:
        where = f"from {self.src}" if self.src else f"to {self.dst}"
        table = "main" if self.table == MAIN else str(self.table)
        return f"{where} lookup {table} priority {self.priority} protocol {config.ROUTE_PROTO}"


@dataclass(frozen=True)
class Plan:
    """The rules and per-ENI tables that should exist; each table routes `vpc` out of its
    ENI."""

    rules: frozenset[Rule]
    tables: Mapping[int, Eni]
    vpc: tuple[IPv4Network, ...] = ()


@dataclass(frozen=True)
class Diff:
    add: tuple[Rule, ...] = ()
    remove: tuple[Rule, ...] = ()
    stale_tables: tuple[int, ...] = ()


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
    rules = {Rule(PRIO_ENI, t, src=net) for t, eni in tables.items() for net in eni.owned}
    if rules:
        rules.add(Rule(PRIO_SUBNET, MAIN, dst=subnet))
    return Plan(frozenset(rules), tables, vpc if tables else ())


def diff_rules(want: Plan, present_rules: Iterable[Rule], present_tables: Iterable[int]) -> Diff:
    have = set(present_rules)
    return Diff(
        add=tuple(sorted(want.rules - have, key=str)),
        remove=tuple(sorted(have - want.rules, key=str)),
        stale_tables=tuple(sorted(set(present_tables) - set(want.tables))),
    )


def parse_rule(raw: Mapping[str, Any]) -> Rule | None:
    """One of our rules from `ip -json rule show` (protocol and priority ours); else None."""
    if str(raw.get("protocol")) != str(config.ROUTE_PROTO):
        return None
    prio = raw.get("priority")
    if prio not in (PRIO_SUBNET, PRIO_ENI):
        return None
    table = raw.get("table")
    table_id = MAIN if table == "main" else int(str(table))

    def net(key: str, bits: str) -> IPv4Network | None:
        value = raw.get(key)
        if value in (None, "all"):
            return None
        return IPv4Network(f"{value}/{raw.get(bits, 32)}")

    return Rule(int(str(prio)), table_id, src=net("src", "srclen"), dst=net("dst", "dstlen"))


# --- I/O -----------------------------------------------------------------------------------


def _json(argv: list[str]) -> list[dict[str, Any]]:
    out = proc.run(argv).stdout.strip()
    return list(json.loads(out)) if out else []


def present_rules() -> set[Rule]:
    found = (parse_rule(r) for r in _json(["ip", "-json", "-4", "rule", "show"]))
    return {r for r in found if r is not None}


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


def _resolved() -> set[str]:
    """The interfaces holding a permanent NEXTHOP entry."""
    found = _json(["ip", "-json", "-4", "neigh", "show", str(NEXTHOP)])
    return {str(n.get("dev")) for n in found if "PERMANENT" in (n.get("state") or ())}


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


def apply(want: Plan, *, scan_all: bool = False) -> list[str]:
    """Make the kernel match want; returns what changed (empty when nothing did).

    The tables looked at are want's and those our rules point to (scan_all: every table of
    our range, for teardown). An ENI whose table cannot be set up (its gateway does not
    answer) does not hold up the others; its failure is raised after every other change.
    """
    rules = present_rules()
    candidates = set(want.tables) | {r.table for r in rules if r.table != MAIN}
    if scan_all:
        candidates |= set(range(TABLE_BASE, TABLE_BASE + TABLE_SPAN))
    tables = {t: _table_routes(t) for t in sorted(candidates)}
    resolved = _resolved()
    diff = diff_rules(want, rules, (t for t, routes in tables.items() if routes))
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
    # Tables before rules: a crash in between leaves rules, which point the next run here.
    in_use = {eni.ifname for eni in want.tables.values()}
    for table in diff.stale_tables:
        _del_routes(table, tables[table])
        for dev in sorted({str(r.get("dev")) for r in tables[table]} - in_use):
            proc.run(["ip", "neigh", "del", str(NEXTHOP), "dev", dev], ok_codes=(0, 1, 2))
        changes.append(f"table {table} emptied")
    # Removals first: a rule whose table moved is re-added with its new table.
    _batch([f"rule del {r.spec()}" for r in diff.remove])
    _batch([f"rule add {r.spec()}" for r in diff.add])
    changes += [f"rule removed: {r.spec()}" for r in diff.remove]
    changes += [f"rule added: {r.spec()}" for r in diff.add]
    now = present_rules()
    missing = [r for r in want.rules if r not in now]
    if missing:
        failures.append(f"ip rule add failed for {len(missing)} rules: {missing[0].spec()}")
    if failures:
        raise HostSetupError("egress: " + "; ".join(failures))
    return changes


def plan_flush() -> list[str]:
    """What flush would remove (teardown --dry-run)."""
    rules = present_rules()
    span = range(TABLE_BASE, TABLE_BASE + TABLE_SPAN)
    tables = [t for t in span if _table_routes(t)]
    out = [f"remove {len(rules)} egress rules (protocol {config.ROUTE_PROTO})"] if rules else []
    return out + [f"empty egress table {t}" for t in tables]


def flush() -> list[str]:
    """Remove every rule, table route and next-hop entry of ours (teardown)."""
    return apply(Plan(frozenset(), {}), scan_all=True)

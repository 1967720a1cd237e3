"""Egress by the owning ENI: every VM address leaves by the secondary ENI it belongs to.

Clouds drop a packet whose source address is not assigned to the interface it leaves by, so
a VM whose address sits on a secondary ENI cannot use the host's default route (the primary
NIC). For each secondary ENI we keep a routing table of our own (TABLE_BASE + its position)
with a default route out of that ENI, and one `ip rule` per address or prefix the ENI owns
selecting it. Rules are installed for every owned address, leased or not: a rule for an
address no VM holds matches no traffic, and it is in place before the first packet of the
VM that gets it.

The VPC gateway of the ENI's subnet is usually the bridge's own address (the ENIs sit in the
VM subnet), so the kernel refuses it as a next hop. The default route goes instead via
NEXTHOP, a link-local address that stands for the gateway on that ENI, with a permanent
neighbour entry holding the MAC the gateway answers with on the ENI (asked by ARP from an
address of that ENI). Traffic to the VM subnet itself keeps using the main table (one rule
ahead of the per-address ones), so VM-to-VM and host-to-VM traffic is untouched.

Ours: rules with protocol ROUTE_PROTO in the priority range below, routes with protocol
ROUTE_PROTO in tables TABLE_BASE.., the NEXTHOP neighbour entries on our ENIs. Reconcile
removes only those; anyone else's rules and tables are read, never changed.
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


@dataclass(frozen=True)
class Eni:
    ifname: str
    gateway: IPv4Address
    owned: tuple[IPv4Network, ...]  # its secondary IPs (/32) and delegated prefixes


@dataclass(frozen=True, order=True)
class Rule:
    priority: int
    table: int
    src: IPv4Network | None = None
    dst: IPv4Network | None = None

    def spec(self) -> str:
        where = f"from {self.src}" if self.src else f"to {self.dst}"
        table = "main" if self.table == MAIN else str(self.table)
        return f"{where} lookup {table} priority {self.priority} protocol {config.ROUTE_PROTO}"


MAIN = 254


@dataclass(frozen=True)
class Plan:
    """The rules and per-ENI tables that should exist: table -> (ENI, gateway)."""

    rules: frozenset[Rule]
    tables: Mapping[int, Eni]


@dataclass(frozen=True)
class Diff:
    add: tuple[Rule, ...] = ()
    remove: tuple[Rule, ...] = ()
    stale_tables: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.stale_tables)


def enis_from_cloud(
    cloud: Mapping[str, Any], gateway: IPv4Address, primary: str | None
) -> list[Eni]:
    """The secondary ENIs pool.json's cloud record lists, with the addresses each owns.

    An entry names its interface (`ifname`) or its MAC (found on the host now) and may name
    its subnet's gateway (else the pool's). The primary NIC and ENIs whose interface is not
    on this host are left out: the main table already serves the one, nothing can reach the
    other.
    """
    out: list[Eni] = []
    for raw in cloud.get("enis") or ():
        if not isinstance(raw, Mapping):
            continue
        ifname = str(raw.get("ifname") or "") or (nic.link_by_mac(str(raw.get("mac") or "")) or "")
        if not ifname or ifname == primary:
            continue
        owned = [IPv4Network(f"{ip}/32") for ip in raw.get("ips") or ()]
        owned += [IPv4Network(str(p)) for p in raw.get("prefixes") or ()]
        gw = IPv4Address(str(raw["gateway"])) if raw.get("gateway") else gateway
        if owned:
            out.append(Eni(ifname, gw, tuple(sorted(set(owned)))))
    return sorted(out, key=lambda e: e.ifname)


def plan(enis: Iterable[Eni], subnet: IPv4Network) -> Plan:
    """Pure: the rules and tables for enis (VM subnet `subnet` stays on the main table)."""
    enis = sorted(enis, key=lambda e: e.ifname)
    if len(enis) > TABLE_SPAN:
        raise HostSetupError(f"{len(enis)} ENIs: egress supports at most {TABLE_SPAN}")
    tables = {TABLE_BASE + i: eni for i, eni in enumerate(enis)}
    rules = {Rule(PRIO_ENI, t, src=net) for t, eni in tables.items() for net in eni.owned}
    if rules:
        rules.add(Rule(PRIO_SUBNET, MAIN, dst=subnet))
    return Plan(frozenset(rules), tables)


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


def _our_table_routes() -> dict[int, list[dict[str, Any]]]:
    """The default routes of the tables in our range, by table; the only routes we put there.
    (Only defaults are dumped: the main table may hold tens of thousands of lease routes.)"""
    out: dict[int, list[dict[str, Any]]] = {}
    argv = ["ip", "-json", "-4", "route", "show", "table", "all", "exact", "0.0.0.0/0"]
    for route in _json(argv):
        table = str(route.get("table", ""))
        if table.isdigit() and TABLE_BASE <= int(table) < TABLE_BASE + TABLE_SPAN:
            out.setdefault(int(table), []).append(route)
    return out


def _is_ours(route: Mapping[str, Any]) -> bool:
    return str(route.get("protocol")) == str(config.ROUTE_PROTO)


def _table_ok(routes: list[dict[str, Any]], eni: Eni) -> bool:
    """The table's default route is ours, out of eni, and its next hop is resolved."""
    neigh = nic.show_dev(["ip", "-json", "-4", "neigh", "show", str(NEXTHOP)], eni.ifname)
    return (
        len(routes) == 1
        and routes[0].get("dst") == "default"
        and routes[0].get("gateway") == str(NEXTHOP)
        and routes[0].get("dev") == eni.ifname
        and any("PERMANENT" in (n.get("state") or ()) for n in neigh)
    )


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


def _del_routes(table: int, routes: list[dict[str, Any]]) -> None:
    """Delete our routes among routes (of table); one already gone is no error."""
    proto = config.ROUTE_PROTO
    _batch([f"route del {r['dst']} table {table} proto {proto}" for r in routes if _is_ours(r)])


def _fix_table(table: int, eni: Eni) -> str:
    mac = gateway_mac(eni)
    proc.run(["ip", "neigh", "replace", str(NEXTHOP), "lladdr", mac, "dev", eni.ifname,
              "nud", "permanent"])  # fmt: skip
    proc.run(["ip", "route", "replace", "default", "via", str(NEXTHOP), "dev", eni.ifname,
              "onlink", "proto", str(config.ROUTE_PROTO), "table", str(table)])  # fmt: skip
    return f"table {table}: default out of {eni.ifname} (gateway {eni.gateway} is {mac})"


def _drop_table(table: int, routes: list[dict[str, Any]]) -> str:
    """Flush our routes of a table no ENI uses now, and the next-hop entries they used."""
    _del_routes(table, routes)
    for dev in sorted({str(r["dev"]) for r in routes if _is_ours(r) and r.get("dev")}):
        proc.run(["ip", "neigh", "del", str(NEXTHOP), "dev", dev], ok_codes=(0, 1, 2))
    return f"table {table} flushed"


def apply(want: Plan) -> list[str]:
    """Make the kernel match want; returns what changed (empty when nothing did).

    An ENI whose table cannot be set up (its gateway does not answer) does not hold up the
    others; its failure is raised after every other change is made.
    """
    tables = _our_table_routes()
    ours = {t for t, routes in tables.items() if any(_is_ours(r) for r in routes)}
    diff = diff_rules(want, present_rules(), ours)
    changes: list[str] = []
    failures: list[str] = []
    for table, eni in sorted(want.tables.items()):
        routes = [r for r in tables.get(table, []) if _is_ours(r)]
        if _table_ok(routes, eni):
            continue
        try:
            changes.append(_fix_table(table, eni))
        except HostSetupError as exc:
            failures.append(str(exc))
    # Removals first: a rule whose table moved is re-added with its new table.
    _batch([f"rule del {r.spec()}" for r in diff.remove])
    _batch([f"rule add {r.spec()}" for r in diff.add])
    changes += [f"rule removed: {r.spec()}" for r in diff.remove]
    changes += [f"rule added: {r.spec()}" for r in diff.add]
    changes += [_drop_table(t, tables[t]) for t in diff.stale_tables]
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
    tables = sorted(t for t, routes in _our_table_routes().items() if any(map(_is_ours, routes)))
    out = [f"remove {len(rules)} egress rules (protocol {config.ROUTE_PROTO})"] if rules else []
    return out + [f"flush egress table {t}" for t in tables]


def flush() -> list[str]:
    """Remove every rule, table route and next-hop entry of ours (teardown)."""
    return apply(Plan(frozenset(), {}))

"""The VM guard: each VM port may use only the address leased to its MAC.

What a managed switch does with DHCP snooping, IP source guard and dynamic ARP inspection,
in two nftables tables of our own named `cocoon-net`:

    table bridge cocoon-net                     every frame entering the bridge from a port
      prerouting: iifname @ports -> from_vm     (the bridge's ports: the VMs' taps)
      from_vm:    ether type ip, arp, ip6 -> vm_ipv4, vm_arp, vm_ipv6; the rest dropped
      vm_ipv4:    DHCP server replies (udp sport 67) dropped; DHCP to the server accepted
                  (from 0.0.0.0 too); else ether saddr . ip saddr must be in @leased
      vm_arp:     probes (sender 0.0.0.0) accepted; else sender MAC and address in @leased
      vm_ipv6:    router advertisements dropped; the rest dropped unless IPv6 is allowed
    table inet cocoon-net
      forward:    bridge -> bridge dropped (VM to VM through the gateway) unless allowed

@leased holds one `MAC . address` element per lease: a grant adds one, a release or expiry
deletes one, before the ACK leaves, so the cost per packet and per lease change does not
depend on the number of VMs. Every drop is counted by a named counter, one per reason.

The bridge's ports are named in @ports rather than matched by bridge name (`meta ibrname`),
which kernels without the bridge meta module cannot do; the daemon adds a port the moment
netlink reports it (a container runtime attaches a tap before its VM boots).

The MAC itself is pinned to its port by the CNI bridge plugin (`macspoofchk` in the
conflist); the guard pins the address to the MAC.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from cocoon_net import proc
from cocoon_net.errors import HostSetupError
from cocoon_net.node import rtnl
from cocoon_net.node.nft import (
    NFPROTO_BRIDGE,
    NFPROTO_INET,
    ElementSocket,
    Nft,
    StaleGeneration,
    next_generation,
)

log = logging.getLogger("cocoon_net.guard")

TABLE = "cocoon-net"
BRIDGE_TABLE = f"bridge {TABLE}"
INET_TABLE = f"inet {TABLE}"
# Drop reasons, each a named counter (the metric's label).
BRIDGE_REASONS = ("ip_spoof", "arp_spoof", "dhcp_server", "router_advert", "ipv6", "other")
INET_REASONS = ("vm_to_vm",)


@dataclass(frozen=True)
class GuardPolicy:
    bridge: str
    gateway: IPv4Address
    allow_vm_to_vm: bool = False
    allow_ipv6: bool = False


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str  # "" for a regular chain
    rules: tuple[str, ...]


def bridge_chains(policy: GuardPolicy) -> tuple[Chain, ...]:
    drop = "counter name {} drop".format
    ipv6_tail = "accept" if policy.allow_ipv6 else drop("ipv6")
    return (
        Chain(
            "prerouting",
            "type filter hook prerouting priority -200; policy accept;",
            ("iifname @ports jump from_vm",),
        ),
        Chain(
            "from_vm",
            "",
            (
                "ether type vmap { ip : jump vm_ipv4, arp : jump vm_arp, ip6 : jump vm_ipv6 }",
                drop("other"),
            ),
        ),
        Chain(
            "vm_ipv4",
            "",
            (
                f"udp sport 67 {drop('dhcp_server')}",
                # To the server only, so a renewal from an address the daemon holds without
                # knowing the MAC (a lost lease file) still reaches it.
                f"udp sport 68 udp dport 67 ip daddr {{ {policy.gateway}, 255.255.255.255 }} "
                "accept",
                "ether saddr . ip saddr @leased accept",
                drop("ip_spoof"),
            ),
        ),
        Chain(
            "vm_arp",
            "",
            (
                "arp saddr ip 0.0.0.0 accept",  # RFC 5227 probes claim no address
                "ether saddr . arp saddr ip @leased arp saddr ether . arp saddr ip @leased accept",
                drop("arp_spoof"),
            ),
        ),
        Chain(
            "vm_ipv6",
            "",
            (
                f"icmpv6 type nd-router-advert {drop('router_advert')}",
                f"udp sport 547 {drop('dhcp_server')}",
                ipv6_tail,
            ),
        ),
    )


def inet_chains(policy: GuardPolicy) -> tuple[Chain, ...]:
    rules: tuple[str, ...] = ()
    if not policy.allow_vm_to_vm:
        bridge = _quote(policy.bridge)
        # Routed only (addressed to the gateway's MAC): with br_netfilter on, frames bridged
        # between two ports pass this hook too, as broadcast or otherhost.
        rules = (f"iifname {bridge} oifname {bridge} meta pkttype host counter name vm_to_vm drop",)
    return (Chain("forward", "type filter hook forward priority -200; policy accept;", rules),)


def _quote(name: str) -> str:
    return f'"{name}"'


def _mac_ip(ip: IPv4Address, mac: str) -> str:
    return f"{mac} . {ip}"


def _table(family_table: str, body: list[str], chains: Iterable[Chain]) -> list[str]:
    out = [f"table {family_table} {{", *body]
    for chain in chains:
        out.append(f"  chain {chain.name} {{")
        if chain.hook:
            out.append(f"    {chain.hook}")
        out += [f"    {rule}" for rule in chain.rules]
        out.append("  }")
    out.append("}")
    return out


def render(policy: GuardPolicy, ports: Iterable[str], elements: Mapping[IPv4Address, str]) -> str:
    """The whole guard as one transaction that replaces whatever our tables hold now, so
    there is no moment without it (the `add` first makes the `delete` safe when absent)."""
    port_list = ", ".join(_quote(p) for p in sorted(ports))
    element_list = ", ".join(_mac_ip(ip, mac) for ip, mac in sorted(elements.items()))
    body = ["  set ports {", "    type ifname"]
    if port_list:
        body.append(f"    elements = {{ {port_list} }}")
    body += ["  }", "  set leased {", "    type ether_addr . ipv4_addr"]
    if element_list:
        body.append(f"    elements = {{ {element_list} }}")
    body.append("  }")
    body += [f"  counter {name} {{ }}" for name in BRIDGE_REASONS]
    inet_body = [f"  counter {name} {{ }}" for name in INET_REASONS]
    lines = [f"add table {t}\ndelete table {t}" for t in (BRIDGE_TABLE, INET_TABLE)]
    lines += _table(BRIDGE_TABLE, body, bridge_chains(policy))
    lines += _table(INET_TABLE, inet_body, inet_chains(policy))
    return "\n".join(lines) + "\n"


Pair = tuple[IPv4Address, str]


def element_changes(
    current: Mapping[IPv4Address, str], wanted: Mapping[IPv4Address, str | None]
) -> tuple[list[Pair], list[Pair]]:
    """The (deletes, adds) that make @leased say wanted (None: no element) for its addresses."""
    deletes: list[Pair] = []
    adds: list[Pair] = []
    for ip, mac in sorted(wanted.items()):
        old = current.get(ip)
        if old == mac:
            continue
        if old is not None:
            deletes.append((ip, old))
        if mac is not None:
            adds.append((ip, mac))
    return deletes, adds


def element_key(ip: IPv4Address, mac: str) -> bytes:
    """The set key of `mac . ip` as the kernel stores it: each field padded to 4 bytes."""
    return bytes.fromhex(mac.replace(":", "")) + b"\0\0" + ip.packed


def port_commands(current: Iterable[str], wanted: Iterable[str]) -> list[str]:
    have, want = set(current), set(wanted)
    out = [f"delete element {BRIDGE_TABLE} ports {{ {_quote(p)} }}" for p in sorted(have - want)]
    out += [f"add element {BRIDGE_TABLE} ports {{ {_quote(p)} }}" for p in sorted(want - have)]
    return out


def bridge_ports(bridge: str) -> set[str]:
    """The bridge's ports now (none when the bridge is gone)."""
    result = proc.run(["ip", "-json", "link", "show", "master", bridge], ok_codes=(0, 1, 255))
    if result.returncode != 0:
        if rtnl.ifindex(bridge) is None:
            return set()
        raise HostSetupError(f"ip link show master {bridge}: {result.stderr.strip()}")
    return {str(link["ifname"]) for link in json.loads(result.stdout or "[]")}


@dataclass(frozen=True)
class KernelGuard:
    """What our tables hold now, as far as the guard cares."""

    ports: frozenset[str]
    elements: dict[IPv4Address, str]
    rules: dict[str, int]  # "bridge/vm_ipv4" -> number of rules
    generation: int | None = None  # the ruleset generation this was read at, when known


def our_tables(nft: Nft) -> list[str]:
    """Which of our two tables exist ("bridge cocoon-net", "inet cocoon-net")."""
    found = []
    for item in nft.json("list tables"):
        table = item.get("table")
        if table and table.get("name") == TABLE and table.get("family") in ("bridge", "inet"):
            found.append(f"{table['family']} {TABLE}")
    return sorted(found)


def read_kernel(nft: Nft) -> KernelGuard | None:
    """Our tables as the kernel has them; None when either is missing."""
    if len(our_tables(nft)) != 2:
        return None
    return parse_tables(
        item for table in (BRIDGE_TABLE, INET_TABLE) for item in nft.json(f"list table {table}")
    )


def parse_tables(items: Iterable[Mapping[str, Any]]) -> KernelGuard:
    """Our two tables from what `nft -j list table` prints for each."""
    ports: set[str] = set()
    elements: dict[IPv4Address, str] = {}
    rules: dict[str, int] = {}
    for item in items:
        if "set" in item:
            s = item["set"]
            for elem in s.get("elem", ()):
                if s["name"] == "ports":
                    ports.add(str(elem))
                elif s["name"] == "leased" and isinstance(elem, dict) and "concat" in elem:
                    mac, ip = elem["concat"]
                    elements[IPv4Address(ip)] = str(mac)
        elif "chain" in item:
            chain = item["chain"]
            rules.setdefault(f"{chain['family']}/{chain['name']}", 0)
        elif "rule" in item:
            rule = item["rule"]
            key = f"{rule['family']}/{rule['chain']}"
            rules[key] = rules.get(key, 0) + 1
    return KernelGuard(frozenset(ports), elements, rules)


def expected_rules(policy: GuardPolicy) -> dict[str, int]:
    out = {f"bridge/{c.name}": len(c.rules) for c in bridge_chains(policy)}
    out.update({f"inet/{c.name}": len(c.rules) for c in inet_chains(policy)})
    return out


class Guard:
    """The daemon's handle on the guard; `elements` and `ports` mirror the kernel's sets."""

    def __init__(self, policy: GuardPolicy, nft: Nft | None = None) -> None:
        self.policy = policy
        self.nft = nft or Nft()
        self.writer = ElementSocket(NFPROTO_BRIDGE, TABLE, "leased")
        self.elements: dict[IPv4Address, str] = {}
        self.ports: set[str] = set()
        self.generation = 0  # changes made so far: a kernel snapshot older than one is stale
        # The nftables ruleset generation our own last change left, for as long as we know
        # that nobody else has committed since (None: not known). While the kernel still
        # reports it, the kernel holds exactly what `elements` and `ports` say.
        self.ruleset: int | None = None

    def install(self, elements: Mapping[IPv4Address, str], ports: Iterable[str]) -> None:
        """Replace our tables with the whole guard, in one transaction."""
        self._run(render(self.policy, ports, elements), whole=True)
        self.elements, self.ports = dict(elements), set(ports)
        self.generation += 1

    def _run(self, commands: str, *, whole: bool) -> None:
        """Commit commands through libnftables, which does not say at which generation.
        When the ruleset moved by exactly one commit around the call, that commit was ours,
        and the kernel holds what we say if the commands replaced our tables `whole`, or if
        it already did just before them: a change to one part cannot vouch for the rest.
        Otherwise only a listing (reconcile) can tell again. Under load, right after a
        start, that listing would be stopped round after round by the grants' commits."""
        known, self.ruleset = self.ruleset, None
        before = self._generation_now()
        self.nft.run(commands)
        after = self._generation_now()
        if before is not None and after == next_generation(before) and (whole or known == before):
            self.ruleset = after

    def _generation_now(self) -> int | None:
        try:
            return self.writer.generation()
        except HostSetupError as exc:  # not knowing it costs a listing, never a change
            log.debug("nftables generation: %s", exc)
            return None

    def update(self, wanted: Mapping[IPv4Address, str | None]) -> None:
        """Put these addresses' elements in line, in one transaction (nothing if in line)."""
        deletes, adds = element_changes(self.elements, wanted)
        if deletes or adds:
            self._apply(
                [element_key(ip, mac) for ip, mac in deletes],
                [element_key(ip, mac) for ip, mac in adds],
            )
        self.generation += 1
        for ip, mac in wanted.items():
            if mac is None:
                self.elements.pop(ip, None)
            else:
                self.elements[ip] = mac

    def _apply(self, deletes: list[bytes], adds: list[bytes]) -> None:
        # Sent for the generation we know, the kernel refuses the transaction if anyone else
        # committed since; then it goes again unchecked, and the generation is no longer known.
        known, self.ruleset = self.ruleset, None
        if known is not None:
            try:
                self.writer.apply(deletes, adds, known)
            except StaleGeneration:
                pass
            else:
                self.ruleset = next_generation(known)
                return
        self.writer.apply(deletes, adds)

    def close(self) -> None:
        self.writer.close()
        self.nft.close()

    def in_line(self, elements: Mapping[IPv4Address, str], ports: Iterable[str]) -> bool:
        """Whether the kernel holds `elements` and `ports` and nothing else changed our tables,
        without listing them: what we last wrote is what is wanted, and the ruleset is still
        at the generation our last change left, so nobody has committed anything since."""
        if self.ruleset is None or self.elements != elements or self.ports != set(ports):
            return False
        return self.writer.generation() == self.ruleset

    def set_ports(self, ports: Iterable[str]) -> list[str]:
        """Make @ports the bridge's ports; the ports added and removed, as log lines."""
        want = set(ports)
        commands = port_commands(self.ports, want)
        if commands:
            self._run("\n".join(commands) + "\n", whole=False)
            self.generation += 1
        changes = [f"guard port {p} added" for p in sorted(want - self.ports)]
        changes += [f"guard port {p} removed" for p in sorted(self.ports - want)]
        self.ports = want
        return changes

    def present(self) -> bool:
        """Both tables exist (cheap: asked every second)."""
        return both_tables(self.writer)

    def reconcile(
        self,
        elements: Mapping[IPv4Address, str],
        ports: Iterable[str],
        kernel: KernelGuard | None,
    ) -> str:
        """Check a snapshot of the kernel (read_kernel, taken at this generation) against
        what it should hold; rebuild the tables whole when it differs. Returns what was
        wrong ("" when nothing)."""
        want_ports = set(ports)
        if kernel is None:
            problem = "tables missing"
        elif kernel.rules != expected_rules(self.policy):
            problem = "rules changed"
        elif kernel.elements != dict(elements):
            problem = "leased addresses differ"
        elif kernel.ports != want_ports:
            problem = "ports differ"
        else:
            self.elements, self.ports = dict(elements), want_ports
            self.ruleset = kernel.generation
            return ""
        self.install(elements, want_ports)
        return problem


def remove(nft: Nft, *, dry_run: bool = False) -> list[str]:
    """Delete our tables (teardown and --no-guard); the lines saying what went."""
    found = our_tables(nft)
    if found and not dry_run:
        nft.run("".join(f"delete table {t}\n" for t in found))
    verb = "would remove" if dry_run else "removed"
    return [f"{verb} nftables table {t}" for t in found]


def both_tables(sock: ElementSocket) -> bool:
    """Our bridge and inet tables both exist (one netlink round trip each)."""
    return sock.has_table(NFPROTO_BRIDGE, TABLE) and sock.has_table(NFPROTO_INET, TABLE)


# How often a listing of our tables asks whether the ruleset has moved (one netlink round
# trip): once it has, what the listing would return is outdated, and it is stopped.
LISTING_POLL = 0.02


class Outdated(HostSetupError):
    """The ruleset changed while our tables were listed: the listing says nothing sure."""


class GuardReader:
    """Reads the guard's tables from other threads (metrics, the reconcile's listing): a
    netlink socket of their own, one reader at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: ElementSocket | None = None

    def _socket(self) -> ElementSocket:
        if self._sock is None:
            self._sock = ElementSocket(NFPROTO_BRIDGE, TABLE, "leased")
        return self._sock

    def read(self) -> dict[str, int]:
        """Packets dropped so far, by reason (empty when the guard is not installed)."""
        with self._lock:
            sock = self._socket()
            try:
                found = sock.counters(NFPROTO_BRIDGE, TABLE)
                found.update(sock.counters(NFPROTO_INET, TABLE))
            except HostSetupError as exc:
                log.debug("guard counters: %s", exc)
                return {}
            return found

    def snapshot(self) -> KernelGuard | None:
        """Our tables now (None when either is missing), with the ruleset generation they
        were read at; Outdated once anyone commits before the listing is done.

        Listed by `nft` in a process of its own, stopped at the first commit: libnftables
        starts a listing again from scratch whenever the ruleset moves under it, and with
        the guard committing a grant every millisecond or so it never finishes (seconds of
        CPU), while nothing can stop it in this process."""
        with self._lock:
            sock = self._socket()
            before = sock.generation()
            if not both_tables(sock):
                return None

            def moved() -> bool:
                return sock.generation() != before

            items: list[dict[str, Any]] = []
            for table in (BRIDGE_TABLE, INET_TABLE):
                listed = proc.run_unless(["nft", "-j", "list", "table", *table.split()], moved,
                                         LISTING_POLL)  # fmt: skip
                if listed is None or moved():
                    raise Outdated(f"the ruleset moved past generation {before} while listed")
                try:
                    items += json.loads(listed.stdout or '{"nftables": []}')["nftables"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise HostSetupError(f"nft list table {table}: unreadable output") from None
            return dataclasses.replace(parse_tables(items), generation=before)

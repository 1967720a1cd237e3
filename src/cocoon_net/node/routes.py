"""Host routes for leased addresses: `<ip>/32 dev <bridge> proto 203 scope link`.

The protocol number marks a route as ours (`ip route show proto 203` lists them): every
delete names it, and the kernel only deletes a route whose protocol matches, so a route an
operator added on the bridge (proto static, boot, ...) is never removed by us. The Go tool
used proto 3 ("boot", also the default of a plain `ip route add`) and scope global; a
`route replace` of ours takes over its entry for the same address in place, so traffic to
the VM never lacks a route. Because proto boot is also every operator's, a boot route is taken
over only for a pool address that a lease or an answer on the bridge proves is a VM's
(`plan_reconcile`); every other boot route is left as it is. Our own deletes are limited to
the pool's subnet: a proto-203 route elsewhere is not one we made.

Bulk changes go through one `ip -force -batch -` (about 1000 routes in 15 ms): `replace` makes
adds idempotent, and -force carries on past deletes of routes that are already gone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from cocoon_net import config, proc
from cocoon_net.errors import HostSetupError
from cocoon_net.node import nic

# What `ip -force -batch` prints for a delete of a route that is already gone (ESRCH), and
# the line it adds after every failed command; everything else it prints is a real failure.
_GONE = "RTNETLINK answers: No such process"
_FAILED_LINE = "Command failed "


@dataclass(frozen=True)
class RouteDiff:
    add: tuple[IPv4Address, ...] = ()
    remove: tuple[IPv4Address, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def plan_routes(desired: Iterable[IPv4Address], present: Iterable[IPv4Address]) -> RouteDiff:
    """Add what is desired and missing, remove what is present and not desired (sorted)."""
    want, have = set(desired), set(present)
    # int keys: IPv4Address's own comparisons are Python calls, slow over 60,000 leases.
    return RouteDiff(
        add=tuple(sorted(want - have, key=int)), remove=tuple(sorted(have - want, key=int))
    )


def unconfirmed(
    wanted: Iterable[IPv4Address], leased: Iterable[IPv4Address], boot: Iterable[IPv4Address]
) -> set[IPv4Address]:
    """Pool addresses held for recovery (wanted, not leased) that only have a boot route: the
    ones an answer on the bridge could still prove are a VM's."""
    return (set(wanted) & set(boot)) - set(leased)


def plan_reconcile(
    *,
    wanted: Iterable[IPv4Address],
    leased: Iterable[IPv4Address],
    ours: Iterable[IPv4Address],
    boot: Iterable[IPv4Address],
    subnet: IPv4Network,
    answering: Iterable[IPv4Address] = (),
    unsettled: Iterable[IPv4Address] = (),
) -> RouteDiff:
    """Make our routes match `wanted` (leases and recovered holds, all pool addresses).

    A wanted address with a boot route is taken over (added as ours, which replaces the boot
    route in place) when it is leased or answered on the bridge. A held address whose boot
    route nobody vouched for keeps that route as it is: its VM confirms it at its next renewal,
    and only then is the route ours. Our routes outside `subnet` are never removed.

    An `unsettled` address (its lease changed in the table, the change not on disk yet) keeps
    whatever route it has: a route must not run ahead of its lease's fdatasync, and the
    change brings its own route once it is durable.
    """
    left = set(unsettled)
    borrowed = unconfirmed(wanted, leased, boot) - set(answering)
    return plan_routes(
        set(wanted) - borrowed - left, (ip for ip in ours if ip in subnet and ip not in left)
    )


def list_routes(bridge: str, proto: int = config.ROUTE_PROTO) -> set[IPv4Address]:
    """Host (/32) routes with protocol proto on bridge in the main table; empty if no bridge."""
    found: set[IPv4Address] = set()
    argv = ["ip", "-json", "-4", "route", "show", "table", "main", "proto", str(proto)]
    for route in nic.show_dev(argv, bridge):
        dst = str(route.get("dst", ""))
        if dst == "default":
            continue
        net = IPv4Network(dst if "/" in dst else f"{dst}/32")
        if net.prefixlen == 32:
            found.add(net.network_address)
    return found


def batch(diff: RouteDiff, bridge: str) -> str:
    """`ip -batch` input for diff; empty when there is nothing to do. Every line names our
    protocol: the kernel deletes only a route that has it."""
    proto = config.ROUTE_PROTO
    lines = [f"route del {ip}/32 dev {bridge} proto {proto} table main" for ip in diff.remove] + [
        f"route replace {ip}/32 dev {bridge} proto {proto} scope link table main" for ip in diff.add
    ]
    return "\n".join(lines) + "\n" if lines else ""


def apply_routes(diff: RouteDiff, bridge: str) -> None:
    """Apply diff in one ip process; deleting a route that is already gone is not an error."""
    text = batch(diff, bridge)
    if not text:
        return
    result = proc.run(["ip", "-force", "-batch", "-"], stdin=text, ok_codes=(0, 1))
    errors = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and line.strip() != _GONE and not line.startswith(_FAILED_LINE)
    ]
    if errors or (result.returncode != 0 and _GONE not in result.stderr):
        reason = errors[0] if errors else f"exit status {result.returncode}"
        raise HostSetupError(
            f"ip -batch on {bridge} ({len(diff.add)} add, {len(diff.remove)} del): {reason}"
        )


def _lease_routes(bridge: str, subnet: IPv4Network) -> set[IPv4Address]:
    return {ip for ip in list_routes(bridge) if ip in subnet}


def _describe_flush(present: set[IPv4Address], bridge: str) -> list[str]:
    proto = config.ROUTE_PROTO
    return [f"remove {len(present)} lease routes (proto {proto}) from {bridge}"] if present else []


def plan_flush(bridge: str, subnet: IPv4Network) -> list[str]:
    return _describe_flush(_lease_routes(bridge, subnet), bridge)


def flush_routes(bridge: str, subnet: IPv4Network) -> list[str]:
    """Remove our /32 routes on bridge for addresses of subnet (teardown)."""
    present = _lease_routes(bridge, subnet)
    apply_routes(plan_routes((), present), bridge)
    return _describe_flush(present, bridge)

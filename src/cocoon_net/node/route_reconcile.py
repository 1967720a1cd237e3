"""The daemon's lease routes over its life: the kernel's /32 routes on the bridge read back,
put in line with the lease table, and the ARP probes that prove a routed address is a VM's.

Routes = leases (+ recovered holds): missing ones added, ours without one removed, anyone
else's untouched. The Go tool's proto-boot route for a pool address is taken over (replaced
in place) once a lease or, at start-up, an answer on the bridge shows a VM uses that
address; other boot routes, an operator's among them, stay as they are (routes.py decides).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

from cocoon_net import config
from cocoon_net.node import arp, routes, rtnl

if TYPE_CHECKING:
    from cocoon_net.dhcp.leases import LeaseTable

log = logging.getLogger("cocoon_net.routes")

# Puts the routes of these addresses in line with the lease table; the ones that failed.
Sync = Callable[[set[IPv4Address]], set[IPv4Address]]


def taken_over(
    diff: routes.RouteDiff, boot: Iterable[IPv4Address], failed: Iterable[IPv4Address]
) -> list[IPv4Address]:
    """Pure: the boot routes that diff's adds replaced (in place) with ours, in order."""
    return sorted((set(diff.add) & set(boot)) - set(failed), key=int)


class Reconciler:
    """Lease routes on one bridge, for one subnet (a reload keeps both)."""

    def __init__(self, sock: rtnl.RouteSocket, bridge: str, subnet: IPv4Network) -> None:
        self.sock = sock
        self.bridge = bridge
        self.subnet = subnet

    def kernel(self) -> dict[int, set[IPv4Address]]:
        """/32 routes on the bridge, ours and the Go tool's, by protocol."""
        index = rtnl.ifindex(self.bridge)
        if index is None:
            return {config.ROUTE_PROTO: set(), config.GO_ROUTE_PROTO: set()}
        return self.sock.dump(index, (config.ROUTE_PROTO, config.GO_ROUTE_PROTO))

    def ours(self) -> set[IPv4Address]:
        return self.kernel()[config.ROUTE_PROTO]

    def routed(self) -> set[IPv4Address]:
        """/32 routes on the bridge that say a VM holds an address: ours and the Go tool's."""
        return {ip for ips in self.kernel().values() for ip in ips if ip in self.subnet}

    def reconcile(
        self,
        table: LeaseTable,
        now: float,
        sync: Sync,
        *,
        unsettled: Iterable[IPv4Address],
        answering: dict[IPv4Address, str] | None = None,
    ) -> int:
        """Put the routes in line with table, except for the `unsettled` addresses (their
        lease change is on its way to the disk, and brings its route after); the number of
        routes changed. `answering` is given at start-up only (the addresses that answered
        ARP)."""
        found = self.kernel()
        boot = found[config.GO_ROUTE_PROTO]
        diff = routes.plan_reconcile(
            wanted=table.routed_addresses(now),
            leased=table.leased_addresses(now),
            ours=found[config.ROUTE_PROTO],
            boot=boot,
            subnet=self.subnet,
            answering=set(answering or ()),
            unsettled=unsettled,
        )
        if not diff:
            return 0
        failed = sync(set(diff.add) | set(diff.remove))
        log.info(
            "routes reconciled: %d added, %d removed%s",
            len(diff.add), len(diff.remove), f", {len(failed)} failed" if failed else "",
        )  # fmt: skip
        taken = taken_over(diff, boot, failed)
        if taken:
            log.info("took over %d proto-boot routes: %s", len(taken),
                     " ".join(map(str, taken)))  # fmt: skip
        return len(diff.add) + len(diff.remove) - len(failed)

    async def answering(
        self, gateway: IPv4Address, targets: set[IPv4Address]
    ) -> dict[IPv4Address, str]:
        """The targets whose VM answers ARP on the bridge, with its MAC (none when it cannot
        be asked)."""
        if not targets:
            return {}
        found = await self.ask(gateway, targets)
        if found is None:
            return {}
        log.info(
            "recovery: %d of %d routed addresses without a lease answer on %s; their routes "
            "are taken over, the rest stay held until their VM asks",
            len(found), len(targets), self.bridge,
        )  # fmt: skip
        return found

    async def ask(
        self, gateway: IPv4Address, targets: set[IPv4Address]
    ) -> dict[IPv4Address, str] | None:
        """Who answers for targets on the bridge; None when the bridge cannot be asked."""
        try:
            return await asyncio.to_thread(arp.probe, self.bridge, gateway, targets)
        except OSError as exc:
            log.warning("ARP probe on %s: %s; holding %d addresses", self.bridge,
                        exc.strerror or exc, len(targets))  # fmt: skip
            return None

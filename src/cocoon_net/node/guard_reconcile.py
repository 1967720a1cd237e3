"""The daemon's VM guard over its life: installed whole at start-up (or removed under
--no-guard), its presence checked every second, compared in full with the kernel at every
reconcile round and rebuilt when it differs, its ports following the bridge's.

Its tables are recorded in pool.json before they are made, so teardown always knows them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from cocoon_net import config, state
from cocoon_net.dhcp import effects
from cocoon_net.errors import CocoonError
from cocoon_net.lock import StateLock
from cocoon_net.node import guard
from cocoon_net.node.nft import Nft
from cocoon_net.state import PoolState

if TYPE_CHECKING:
    from cocoon_net.dhcp.leases import LeaseTable

log = logging.getLogger("cocoon_net.guard")

# The addresses whose lease change is on its way to the disk (DhcpServer.unsettled): the
# guard follows such a change only once it is durable, so until then their elements stay as
# the guard holds them, and a comparison takes them as they are.
Unsettled = Callable[[], Iterable[IPv4Address]]


class Reconciler:
    """The guard of one bridge's VMs, kept in line with the lease table. `handle` is None
    until start, and stays None under --no-guard."""

    def __init__(
        self, paths: config.Paths, bridge: str, table: LeaseTable, lock_wait: float
    ) -> None:
        self.paths = paths
        self.bridge = bridge
        self.table = table
        self.lock_wait = lock_wait  # for the state lock, to record the guard in pool.json
        self.handle: guard.Guard | None = None
        self.reader = guard.GuardReader()  # for the metrics and reconcile threads

    def start(
        self, pool: PoolState, enabled: bool, now: float, answering: dict[IPv4Address, str]
    ) -> guard.Guard | None:
        """Install the VM guard for the recovered leases before the first request is read
        (or remove it when not enabled). A held address whose VM answered ARP (a node taken
        over from the Go tool) stays usable by the MAC that answered, and by nobody else,
        until its VM asks for it. pool.guard follows what is recorded."""
        nft = Nft()
        if not enabled:
            if pool.guard.installed:
                for line in guard.remove(nft):
                    log.warning("guard: %s (--no-guard)", line)
                self._record(pool, installed=False)
            nft.close()
            log.warning("VM guard off (--no-guard): any VM may send from any address")
            return None
        record = pool.guard
        policy = guard.GuardPolicy(
            bridge=self.bridge,
            gateway=pool.gateway_ip,
            allow_vm_to_vm=record.allow_vm_to_vm,
            allow_ipv6=record.allow_ipv6,
        )
        handle = guard.Guard(policy, nft)
        # The previous daemon's elements matter only for addresses held without a lease
        # (effects.guarded); listing them costs seconds with tens of thousands of VMs.
        held = self.table.recovered_addresses(now)
        kernel = guard.read_kernel(nft) if held else None
        if not record.installed:
            self._record(pool, installed=True)
        known = {**answering, **(kernel.elements if kernel else {})}
        elements = effects.guarded(self.table, known, now)
        handle.install(elements, guard.bridge_ports(self.bridge))
        log.info(
            "VM guard on: %d addresses guarded on %d ports (VM to VM %s, IPv6 %s)",
            len(handle.elements), len(handle.ports),
            "allowed" if policy.allow_vm_to_vm else "dropped",
            "allowed" if policy.allow_ipv6 else "dropped",
        )  # fmt: skip
        self.handle = handle
        return handle

    def _record(self, pool: PoolState, *, installed: bool) -> None:
        with StateLock(self.paths.lock_file, "daemon", wait=self.lock_wait):
            saved = state.load(self.paths.pool_file)
            saved.guard = dataclasses.replace(saved.guard, installed=installed)
            state.save(self.paths.pool_file, saved)
        pool.guard = saved.guard

    def check(self, unsettled: Unsettled) -> bool:
        """Every second: our tables still there? (`nft flush ruleset` removes every table;
        listing the table names is cheap, comparing every element waits for the reconcile.)
        Whether it repaired them."""
        if self.handle is None:
            return False
        try:
            if not self.handle.present():
                return self._repair(None, unsettled)
        except CocoonError as exc:
            log.error("VM guard: %s", exc)
        return False

    async def reconcile(self, unsettled: Unsettled) -> bool:
        """Compare every rule count, port and element with the kernel; whether it repaired
        them. The listing takes seconds with tens of thousands of VMs, so it is read in a
        thread, and given up at the first commit made meanwhile (the next round tries
        again). It is skipped while nobody but the guard itself has committed to the
        ruleset (its generation says so)."""
        if self.handle is None or self._in_line(self.handle, unsettled):
            return False
        generation = self.handle.generation
        try:
            kernel = await asyncio.to_thread(self.reader.snapshot)
        except guard.Outdated as exc:
            # Under load the guard itself commits every few milliseconds: the comparison
            # waits for a quieter round rather than list again and again meanwhile.
            log.info("VM guard: %s; compared at the next round", exc)
            return False
        if self.handle.generation == generation:
            return self._repair(kernel, unsettled)
        return False

    def _in_line(self, handle: guard.Guard, unsettled: Unsettled) -> bool:
        try:
            wanted = effects.guarded(self.table, handle.elements, time.time(), unsettled())
            if not handle.in_line(wanted, guard.bridge_ports(self.bridge)):
                return False
        except CocoonError:
            return False  # the full comparison says what is wrong, and repairs it
        log.debug("VM guard: ruleset at generation %s, as the guard left it; not listed",
                  handle.ruleset)  # fmt: skip
        return True

    def _repair(self, kernel: guard.KernelGuard | None, unsettled: Unsettled) -> bool:
        assert self.handle is not None
        wanted = effects.guarded(self.table, self.handle.elements, time.time(), unsettled())
        try:
            problem = self.handle.reconcile(wanted, guard.bridge_ports(self.bridge), kernel)
        except CocoonError as exc:
            log.error("VM guard: %s (retrying)", exc)
            return False
        if problem:
            log.warning("VM guard: %s; restored (%d addresses)", problem, len(wanted))
            return True
        if kernel is not None:
            log.debug("VM guard: compared with the kernel at generation %s: in line",
                      kernel.generation)  # fmt: skip
        return False

    def follow_ports(self) -> None:
        """Guard the bridge's ports as they are now (a port attached or gone)."""
        if self.handle is None:
            return
        try:
            for change in self.handle.set_ports(guard.bridge_ports(self.bridge)):
                log.info("%s", change)
        except CocoonError as exc:
            log.error("guard ports: %s (the reconcile loop retries)", exc)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

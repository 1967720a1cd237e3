"""The composition root of `cocoon-net daemon`: the only place long-lived objects are built.

Start-up: daemon lock -> state lock, pool.json, host setup -> lease recovery -> ARP probe of
held addresses -> VM guard (node/guard.py, replaced whole in one transaction) -> bind ->
route reconcile -> ready.
Lease recovery trusts the journal and snapshot (dhcp/store.py) and also every /32 route
of ours (and of the Go tool) on the bridge: an address with a route but no lease is held
for a lease time and confirmed only to the VM that asks for it, so a lost lease file can
never put one address on two VMs.

The daemon holds the daemon lock for its whole life (one daemon per node; teardown refuses
while it runs) and the state lock only while it reads pool.json and applies host setup, which
records its changes there: init and adopt can grow the pool of a running daemon, then ask it
over the control socket to re-read pool.json. SIGTERM stops it gracefully (leases flushed,
routes and the guard kept: VMs keep their traffic, and stay guarded, across a restart);
SIGHUP re-reads pool.json too. A lease store that can no longer write stops it too, with exit
code 1: under systemd the restart replays what is really on disk, or fails again at the first
write while the disk is broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from cocoon_net import config, control, lifecycle, poolchange, state
from cocoon_net.dhcp import effects
from cocoon_net.dhcp.leases import Change, LeaseTable
from cocoon_net.dhcp.server import READ_INTERVAL, Counters, DhcpServer
from cocoon_net.dhcp.settings import DhcpSettings, Route
from cocoon_net.dhcp.store import LeaseStore, Recovered
from cocoon_net.errors import CocoonError, StateError
from cocoon_net.gcpolicy import Collector
from cocoon_net.lock import StateLock
from cocoon_net.node import egress, guard_reconcile, nic, route_reconcile, rtnl, watch
from cocoon_net.platform import get_platform
from cocoon_net.platform.base import Platform
from cocoon_net.sdnotify import Notifier, watchdog_interval
from cocoon_net.state import PoolState

log = logging.getLogger("cocoon_net.daemon")

SWEEP_SECONDS = 1.0  # lease expiry: cheap when nothing is due (LeaseTable.expire)
RECONCILE_SECONDS = 30.0  # host setup, routes and guard in full, besides kernel events
HOST_CHECK_SECONDS = 5.0  # sysctls and the conflist: no kernel event reports them
EVENT_SETTLE_SECONDS = 0.3  # netlink events come in bursts; reconcile once per burst
# init may hold the state lock through minutes of cloud calls: a starting daemon waits for it
# (within systemd's start timeout); a running one retries its host repair at the next round.
START_LOCK_WAIT = 60.0
REPAIR_LOCK_WAIT = 5.0
# A prober (init, adopt, teardown asking whether a daemon runs) holds the daemon lock for an
# instant; a starting daemon waits that out.
DAEMON_LOCK_WAIT = 1.0


@dataclass(frozen=True)
class DaemonOptions:
    paths: config.Paths
    skip_iptables: bool
    metrics_addr: str
    lease_seconds: int
    guard: bool = True
    relay_from: tuple[IPv4Address, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    ntp: tuple[IPv4Address, ...] = ()
    classless_routes: tuple[Route, ...] = ()
    reservations: dict[str, IPv4Address] = field(default_factory=dict)
    decline_quarantine: float = 600.0
    read_interval: float = READ_INTERVAL


def run(opts: DaemonOptions) -> int:
    # A bad pool.json or DHCP option fails here, before the lock file is made.
    dhcp_settings(state.load(opts.paths.pool_file), opts, None)
    with StateLock(opts.paths.daemon_lock, "daemon", wait=DAEMON_LOCK_WAIT):
        return asyncio.run(Daemon(opts).main())


def dhcp_settings(pool: PoolState, opts: DaemonOptions, bridge_mtu: int | None) -> DhcpSettings:
    dns = tuple(IPv4Address(d) for d in pool.dns_servers) if pool.dns_servers else ()
    settings = DhcpSettings(
        server_id=pool.gateway_ip,
        subnet=pool.network,
        router=pool.gateway_ip,
        dns=dns,
        domain_name=opts.domain,
        search=opts.search,
        ntp=opts.ntp,
        mtu=pool.mtu or bridge_mtu,
        lease_time=opts.lease_seconds,
        classless_routes=opts.classless_routes,
        decline_quarantine=opts.decline_quarantine,
        reservations=opts.reservations,
        relay_allowed_from=frozenset(opts.relay_from),
    )
    settings.validate()
    return settings


class PromCounters(Counters):
    """The server's counters as Prometheus metrics. Each label set's child is looked up once
    and kept: labels() takes a lock and costs about a microsecond, and an exchange counts
    four things."""

    def __init__(self, metrics: Any) -> None:
        self.m = metrics
        self._children: dict[tuple[str, ...], Any] = {}

    def _inc(self, metric: Any, key: tuple[str, ...]) -> None:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*key[1:])
        child.inc()

    def packet(self, mtype: str, result: str) -> None:
        self._inc(self.m.packets, ("packets", mtype, result))

    def drop(self, reason: str) -> None:
        self._inc(self.m.drops, ("drops", reason))

    def lease(self, ok: bool) -> None:
        self._inc(self.m.lease_total, ("lease", "ok" if ok else "failed"))

    def route(self, op: str, ok: bool) -> None:
        self._inc(self.m.route_ops, ("route", op, "ok" if ok else "failed"))

    def gate_closed(self) -> None:
        self.m.gate_closed.inc()

    def gate_opened(self, seconds_closed: float) -> None:
        self.m.gate_closed_seconds.inc(seconds_closed)

    def read(self, frames: int) -> None:
        self.m.reads.inc()


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.notify = Notifier()
        self.stop = asyncio.Event()
        self.pool: PoolState
        self.server: DhcpServer
        self.store: LeaseStore
        self.table: LeaseTable
        self._reconcile_due = asyncio.Event()
        self.collector = Collector()
        self._reload_due = False
        self._reloading = asyncio.Lock()
        self._platform: Platform | None = None
        self.egress: egress.Reconciler
        self.routes: route_reconcile.Reconciler
        self.guard: guard_reconcile.Reconciler
        self._store_error = ""
        # The addresses of each lease change made here (expiry, ARP probes, a VM released by
        # request) while its records are on their way to the disk.
        self._persisting: list[set[IPv4Address]] = []
        self.metrics: Any = None
        self._host_check: watch.HostCheck | None = None

    @property
    def bridge(self) -> str:
        return self.pool.bridge

    # ------------------------------------------------------------------ start-up

    async def main(self) -> int:
        started = time.monotonic()
        # Start-up makes hundreds of thousands of objects on a /16 (pool, leases, history)
        # and no garbage cycles: the collector's passes over them (a tenth of the start's
        # CPU with 60,000 leases) find nothing. One collection runs once serving.
        gc.disable()
        try:
            return await self._main(started)
        finally:
            self.collector.stop()
            gc.enable()

    async def _main(self, started: float) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)

        self.pool, changes = self._setup_host(START_LOCK_WAIT)
        for change in changes:
            log.info("host setup: %s", change)
        self._fix_host()
        lease_file = self._lease_file()
        settings = dhcp_settings(self.pool, self.opts, nic.link_mtu(self.bridge))
        metrics = self.metrics = self._metrics()

        def store_failed(error: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting anyway
                loop.call_soon_threadsafe(self._store_failed, error)

        self.store = LeaseStore(
            lease_file,
            observe_fsync=metrics.fsync_seconds.observe if metrics is not None else None,
            on_failure=store_failed,
        )
        recovered = await asyncio.to_thread(self.store.open)
        try:
            code = await self._serve(settings, recovered, metrics, started)
        finally:
            await asyncio.to_thread(self.store.close)
        # The store logged its failure, once; the exit code tells systemd to restart.
        return 1 if self._store_error else code

    def _store_failed(self, error: str) -> None:
        """No lease can be granted any more: stop, so that systemd restarts the daemon and
        the restart replays what is really on disk (or fails again, loudly, at start)."""
        self._store_error = error
        self.stop.set()

    async def _serve(
        self, settings: DhcpSettings, recovered: Recovered, metrics: Any, started: float
    ) -> int:
        report = recovered.report
        if not report.complete:
            why = report.snapshot_lost or report.meta_lost or "journal damaged"
            if report.foreign_snapshot:
                why = "leases.json was written by another program"
            log.warning(
                "lease state may be incomplete (%s; %d corrupt journal lines): addresses "
                "with a route are held until their VM confirms them",
                why,
                report.journal.corrupt,
            )
        now = time.time()
        route_sock = rtnl.RouteSocket()
        self.egress = egress.Reconciler(route_sock)
        self.routes = route_reconcile.Reconciler(route_sock, self.bridge, self.pool.network)
        in_use = self.routes.routed()
        self.table = LeaseTable(
            self.pool.pool_ints, reservations=settings.reservations, offer_hold=settings.offer_hold
        )
        self.pool = _without_addresses(self.pool)
        changes = self.table.load(
            recovered.leases.values(),
            recovered.history.values(),
            recovered.quarantine,
            now,
            in_use=dict.fromkeys(in_use, ""),
            recovery_hold=float(self.opts.lease_seconds),
            holds=recovered.holds,
        )
        for change in changes:
            log.info("recovery: %s %s", change.op, getattr(change, "lease", change))
        await self.store.commit(effects.records(changes))
        # Asked before the guard is installed: it would drop the answers of VMs it does not
        # know yet. A held address is then confirmed to the MAC that answered, and to no other.
        answering = await self.routes.answering(
            self.pool.gateway_ip, self.table.recovered_addresses(now)
        )
        self.table.identify(answering)
        self.guard = guard_reconcile.Reconciler(
            self.opts.paths, self.bridge, self.table, START_LOCK_WAIT
        )
        handle = self.guard.start(self.pool, self.opts.guard, now, answering)
        counters = PromCounters(metrics) if metrics is not None else Counters()
        self.server = DhcpServer(
            bridge=self.bridge,
            settings=settings,
            table=self.table,
            store=self.store,
            routes=route_sock,
            guard=handle,
            counters=counters,
            read_interval=self.opts.read_interval,
        )
        self.server.open()
        self.routes.reconcile(
            self.table,
            time.time(),
            self.server.sync_routes,
            unsettled=self.unsettled(),
            answering=answering,
        )
        try:
            await self._reconcile_egress(first=True)
        except CocoonError as exc:  # DHCP serves meanwhile; the reconcile loop retries
            log.error("%s (retrying)", exc)
        control_server = await control.serve(self.opts.paths.control_socket, control.handler(self))
        metrics_server = self._start_metrics(metrics)
        events = rtnl.EventSocket(quiet=route_sock.portid)
        asyncio.get_running_loop().add_reader(events.fileno(), self._on_netlink, events)
        ruleset = self._ruleset_events()
        self.guard.follow_ports()  # a port attached since the guard was installed
        stats = self.table.stats(now)
        ready = (
            f"serving {self.pool.subnet} on {self.bridge}: {stats.total} addresses, "
            f"{stats.leased} leased"
        )
        # What start-up built (pool, leases, history: 100,000s of objects on a /16) lives as
        # long as the daemon: frozen out of the collector's sight (gcpolicy). Before the ready
        # signal: the full collection this takes (15 ms on an empty /16, more with leases)
        # is start-up work, not a pause the first VMs to ask should wait out.
        self.collector.start()
        log.info("ready in %.3f s: %s", time.monotonic() - started, ready)
        self.notify.ready(ready)
        # The fold of the lease journal into leases.json that open() left for later.
        self.store.resume_write_behind()
        tasks = [
            asyncio.create_task(self._sweep_loop()),
            asyncio.create_task(self._reconcile_loop()),
            asyncio.create_task(self._host_check_loop()),
            asyncio.create_task(self._watchdog_loop()),
        ]
        try:
            await self.stop.wait()
        finally:
            log.info("stopping: finishing requests in flight, flushing leases; routes stay")
            self.notify.stopping()
            asyncio.get_running_loop().remove_reader(events.fileno())
            events.close()
            if ruleset is not None:
                asyncio.get_running_loop().remove_reader(ruleset.fileno())
                ruleset.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.drain()
            self.server.close_sockets()
            control_server.close()
            if metrics_server is not None:
                metrics_server.stop()
            route_sock.close()
            self.guard.close()
        return 0

    def _setup_host(self, lock_wait: float) -> tuple[PoolState, list[str]]:
        """Host setup from pool.json as it is now, and what it changed. It records what it
        changes in pool.json, so it runs under the state lock, after the init or adopt that
        holds it. It also refreshes what the periodic host check compares with."""
        with StateLock(self.opts.paths.lock_file, "daemon", wait=lock_wait):
            pool = state.load(self.opts.paths.pool_file)
            manage = pool.manage_iptables and not self.opts.skip_iptables
            changes = lifecycle.reconcile_host(pool, self.opts.paths, manage_firewall=manage)
        spec = lifecycle.host_spec(pool, self.opts.paths, manage_firewall=manage)
        self._host_check = watch.HostCheck.of(
            spec.bridge, spec.primary_nic or nic.primary_nic(), spec.secondary_nics,
            spec.conflist, spec.port_isolation,
        )  # fmt: skip
        return pool, changes

    def _fix_host(self) -> None:
        """What the cloud's agents did to the host behind our back, undone again."""
        if self._platform is None:
            self._platform = get_platform(self.pool.platform or "static", os.environ)
        for change in self._platform.fix_host(self.pool):
            log.info("host fix: %s", change)

    async def _reconcile_egress(self, *, first: bool = False) -> None:
        """Each secondary ENI's addresses leave by that ENI (node/egress.py). After start-up,
        whatever it changes was missing or wrong: a repair."""
        changes = await self.egress.reconcile(
            self.pool, lambda: self.table.routed_addresses(time.time())
        )
        for change in changes:
            log.log(logging.INFO if first else logging.WARNING, "egress: %s", change)
        if changes and not first:
            self._repaired("egress", len(changes))

    def _lease_file(self) -> Path:
        return self.opts.paths.lease_file_for(self.pool.lease_file)

    def _metrics(self) -> Any:
        if not self.opts.metrics_addr:
            return None
        from cocoon_net.metrics import GuardCounts, Metrics, PoolCounts

        def counts() -> PoolCounts:
            s = self.table.stats(time.time())
            return PoolCounts(s.total, s.free, s.leased, s.offered, s.quarantined)

        def guard_counts() -> GuardCounts | None:
            handle = self.guard.handle
            if handle is None:
                return None
            return GuardCounts(len(handle.elements), self.guard.reader.read())

        return Metrics(counts, guard_counts)

    def _start_metrics(self, metrics: Any) -> Any:
        if metrics is None:
            return None
        from cocoon_net.metrics import MetricsServer

        try:
            server = MetricsServer(metrics, self.opts.metrics_addr, self.pool.network)
        except OSError as exc:
            log.error("metrics on %s: %s (continuing without)", self.opts.metrics_addr, exc)
            return None
        server.start()
        log.info("metrics on http://%s:%d/metrics", *server.address[:2])
        return server

    def lease_routes(self) -> set[IPv4Address]:
        return self.routes.ours()

    def guarded(self) -> tuple[int, int] | None:
        handle = self.guard.handle
        return None if handle is None else (len(handle.elements), len(handle.ports))

    def unsettled(self) -> set[IPv4Address]:
        """Addresses whose lease change is not on disk yet, the server's and ours: reconcile
        rounds leave them to the change itself, which routes and guards them once durable."""
        return self.server.unsettled().union(*self._persisting)

    async def persist(self, changes: list[Change]) -> None:
        if not changes:
            return
        records, touched = effects.durable(changes)
        self._persisting.append(touched)
        try:
            await self.store.commit(records)
        finally:
            self._persisting.remove(touched)
        self.server.sync_routes(touched)
        self.server.sync_guard(touched)

    # ------------------------------------------------------------------ loops

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            changes = self.table.expire(time.time())
            for change in changes:
                log.info("lease %s: %s", change.op, getattr(change, "lease", change))
            try:
                await self.persist(changes)
                await self._probe_ended_holds()
            except CocoonError as exc:
                log.error("expiry: %s", exc)
            self._repaired("guard", self.guard.check(self.unsettled))
            self.collector.thaw_if_due()

    async def _probe_ended_holds(self) -> None:
        """An address whose hold (after a lost lease file) or quarantine (a DECLINE) ended goes
        to a new VM only once nobody answers ARP for it on the bridge; one that answers is
        held again, for a lease time, for the MAC that answered."""
        asked = self.table.unprobed()
        if not asked:
            return
        answers = await self.routes.ask(self.pool.gateway_ip, asked)
        if answers is None:
            return  # asked again at the next sweep; until then nobody gets them
        changes = self.table.probed(asked, answers, time.time(), float(self.opts.lease_seconds))
        for ip in sorted(answers):
            log.warning("%s still answers ARP on %s (%s): held again", ip, self.bridge, answers[ip])
        await self.persist(changes)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that arrives just as the
                # event is set (gh-86296), and then SIGTERM waits forever for this loop.
                async with asyncio.timeout(RECONCILE_SECONDS):
                    await self._reconcile_due.wait()
                await asyncio.sleep(EVENT_SETTLE_SECONDS)
            except TimeoutError:
                pass
            self._reconcile_due.clear()
            if self._reload_due:
                self._reload_due = False
                try:
                    await self.reload()
                except CocoonError as exc:  # the old pool stays served
                    log.error("reload: %s", exc)
            try:
                await self._heal_host()
                await asyncio.to_thread(self._fix_host)
                if self.server.bound:  # after start-up, a route changed was a repair
                    fixed = self.routes.reconcile(
                        self.table,
                        time.time(),
                        self.server.sync_routes,
                        unsettled=self.unsettled(),
                    )
                    self._repaired("route", fixed)
                await self._reconcile_egress()
                self._repaired("guard", await self.guard.reconcile(self.unsettled))
            except CocoonError as exc:
                log.error("reconcile: %s (retrying)", exc)

    async def _watchdog_loop(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    def _on_netlink(self, events: rtnl.EventSocket) -> None:
        """Our own lease routes come and go with every grant: those need no full reconcile.
        One of ours deleted while its lease lives (someone ran `ip route del`) is put back
        at once; any other change to links, addresses or routes triggers a reconcile."""
        repair: set[IPv4Address] = set()
        now = time.time()
        links = False
        for event in events.drain():
            links = links or event.kind in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK)
            if not event.ours:
                self._reconcile_due.set()
            elif event.rule is not None:
                # Ours come and go with routes; one deleted while still wanted was not us.
                if event.kind == rtnl.RTM_DELRULE and self.egress.plan.wants(
                    event.rule, lambda ip: self.table.needs_route(ip, now)
                ):
                    self._reconcile_due.set()
            elif (
                event.kind == rtnl.RTM_DELROUTE
                and event.dst is not None
                and self.table.needs_route(event.dst, now)
            ):
                repair.add(event.dst)
        if links:  # a port attached or gone: guard it now, not at the next reconcile
            self.guard.follow_ports()
        if repair:
            log.warning("lease routes removed from outside, restoring: %s", sorted(repair))
            self._repaired("route", len(repair - self.server.sync_routes(repair)))

    def _repaired(self, what: str, count: int) -> None:
        if self.metrics is not None and count > 0:
            self.metrics.repairs.labels(what).inc(count)

    def _request_reload(self) -> None:
        self._reload_due = True
        self._reconcile_due.set()

    async def _heal_host(self) -> None:
        """Host setup again: whatever differs from ours now (a bridge deleted, set down, its
        address, MTU or MAC changed; our chains or jumps gone; a sysctl or the conflist
        changed) is set right, logged once and counted. Then the DHCP socket follows a
        bridge that was recreated (its index changed)."""
        _pool, changes = await asyncio.to_thread(self._setup_host, REPAIR_LOCK_WAIT)
        for change in changes:
            log.warning("repaired: %s", change)
            self._repaired(watch.repair_kind(change), 1)
        index = rtnl.ifindex(self.bridge)
        if not self.server.bound or index != self.server.state.ifindex:
            log.warning("bridge %s is new (index %s): serving DHCP on it", self.bridge, index)
            self.server.open()

    def _ruleset_events(self) -> watch.RulesetEvents | None:
        quiet = self.guard.handle.writer.portid if self.guard.handle is not None else None
        try:
            ruleset = watch.RulesetEvents(quiet)
        except OSError as exc:
            log.warning("no nftables events (%s): firewall repairs wait for the %g s round",
                        exc.strerror or exc, RECONCILE_SECONDS)  # fmt: skip
            return None
        asyncio.get_running_loop().add_reader(ruleset.fileno(), self._on_ruleset, ruleset)
        return ruleset

    def _on_ruleset(self, ruleset: watch.RulesetEvents) -> None:
        if ruleset.drain():
            self._reconcile_due.set()

    async def _host_check_loop(self) -> None:
        """Sysctls and the conflist, read every few seconds: a difference brings the full
        reconcile forward."""
        while True:
            await asyncio.sleep(HOST_CHECK_SECONDS)
            check = self._host_check
            try:
                drift = check.drift() if check is not None else []  # a few small reads
            except CocoonError as exc:
                drift = [str(exc)]  # the reconcile says what is wrong, and retries
            if drift:
                log.debug("host check: %s", "; ".join(drift))
                self._reconcile_due.set()

    async def reload(self, *, keep_leases: bool = False) -> int:
        """SIGHUP or a `reload` request: re-read pool.json; leases outside a shrunk pool end
        and lose their routes, unless keep_leases (init and adopt): then such a pool is
        refused. The check and the switch run with no await between them, so no lease can
        be granted in the removed part after the check."""
        async with self._reloading:
            new = state.load(self.opts.paths.pool_file)
            if new.network != self.pool.network or new.bridge != self.pool.bridge:
                raise StateError(
                    f"pool.json now says {new.subnet} on {new.bridge}, the daemon serves "
                    f"{self.pool.subnet} on {self.pool.bridge}: a new subnet or bridge needs "
                    "a restart"
                )
            settings = dhcp_settings(new, self.opts, nic.link_mtu(self.bridge))
            now = time.time()
            held = self.table.routed_addresses(now)  # leases and recovered holds
            busy = poolchange.leased_in_removed(self.table.pool, new.pool_ips, held)
            if keep_leases and busy:
                raise StateError(
                    f"not serving the pool of pool.json: it leaves out leased addresses "
                    f"({', '.join(map(str, busy))})"
                )
            self.pool = _without_addresses(new)
            self.server.settings = settings
            changes = self.table.set_pool(new.pool_ints, now)
            for change in changes:
                log.info("reload: %s %s", change.op, getattr(change, "lease", change))
            await self.persist(changes)
            total = self.table.stats(time.time()).total
            log.info("reloaded %s: %d addresses", self.opts.paths.pool_file, total)
            return total


def _without_addresses(pool: PoolState) -> PoolState:
    """The pool record as the daemon keeps it: the lease table holds the addresses (as ints),
    so the record does not also keep them as strings (65,000 of them on a /16, 4 MB)."""
    return dataclasses.replace(pool, ips=[])


def parse_routes(items: list[str]) -> tuple[Route, ...]:
    """--classless-route DEST=GATEWAY, e.g. 10.0.0.0/8=172.20.100.1."""
    out: list[Route] = []
    for item in items:
        dest, sep, gw = item.partition("=")
        if not sep:
            raise CocoonError(f"invalid --classless-route {item!r}: expected CIDR=GATEWAY")
        out.append(
            (
                config.parse_cidr_list([dest], flag="--classless-route")[0],
                config.parse_ipv4(gw, flag="--classless-route"),
            )
        )
    return tuple(out)

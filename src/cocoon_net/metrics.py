"""Prometheus metrics of the daemon (imported by the daemon only: prometheus_client is slow to
import and status/--help must stay fast).

The three series of the Go tool keep their names and meaning; the rest add what an operator
needs to see a problem: packets by type and result, drops by reason, pool occupancy, fsync
latency, route operations, and the VM guard's drops by reason. The HTTP endpoint refuses
connections from the VM subnet, so VMs cannot read it even when it listens on the gateway
address.
"""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Network, ip_address
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cocoon_net.errors import UsageError

log = logging.getLogger("cocoon_net.metrics")
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class PoolCounts:
    size: int
    free: int
    leased: int
    offered: int
    quarantined: int


class _PoolCollector(Collector):
    """Reads live pool counts at scrape time, so a series is never stale."""

    def __init__(self, read: Callable[[], PoolCounts]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self._read()
        yield GaugeMetricFamily(
            "cocoon_net_dhcp_pool_available",
            "Number of unallocated IPs in the DHCP pool.",
            value=c.free,
        )
        yield GaugeMetricFamily(
            "cocoon_net_dhcp_lease_active",
            "Number of active (unexpired) DHCP leases.",
            value=c.leased,
        )
        for name, value, text in (
            ("size", c.size, "addresses in the pool"),
            ("offered", c.offered, "addresses held by an outstanding OFFER"),
            ("quarantined", c.quarantined, "addresses quarantined after a DECLINE"),
        ):
            yield GaugeMetricFamily(f"cocoon_net_dhcp_pool_{name}", f"Number of {text}.", value)


@dataclass(frozen=True)
class GuardCounts:
    guarded: int  # addresses the guard lets their VM use
    drops: dict[str, int]  # packets the guard dropped, by reason (the kernel's counters)


class _GuardCollector(Collector):
    """The guard's kernel counters, read at scrape time (no series while the guard is off)."""

    def __init__(self, read: Callable[[], GuardCounts | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        c = self._read()
        if c is None:
            return
        yield GaugeMetricFamily(
            "cocoon_net_guard_addresses",
            "Addresses the VM guard lets their leaseholder's MAC use.",
            value=c.guarded,
        )
        drops = CounterMetricFamily(
            "cocoon_net_guard_drops",
            "Packets from VM ports the VM guard dropped, by reason.",
            labels=["reason"],
        )
        for reason, packets in sorted(c.drops.items()):
            drops.add_metric([reason], packets)
        yield drops


class Metrics:
    def __init__(
        self,
        pool_counts: Callable[[], PoolCounts],
        guard_counts: Callable[[], GuardCounts | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)  # pool counts exist only at scrape
        self.registry.register(ProcessCollector(registry=None))
        self.registry.register(_PoolCollector(pool_counts))
        self.registry.register(_GuardCollector(guard_counts))
        r = self.registry
        self.lease_total = Counter(
            "cocoon_net_dhcp_lease_total",
            "Number of DHCP lease grant attempts by result.",
            ["result"],
            registry=r,
        )
        self.packets = Counter(
            "cocoon_net_dhcp_packets_total",
            "DHCP packets received, by message type and what the server did.",
            ["type", "result"],
            registry=r,
        )
        self.drops = Counter(
            "cocoon_net_dhcp_drops_total",
            "DHCP packets dropped without an answer, by reason.",
            ["reason"],
            registry=r,
        )
        self.gate_closed = Counter(
            "cocoon_net_dhcp_discover_gate_closed_total",
            "Times the receive queue ran deep and new DISCOVERs were left to the kernel to "
            "drop until it was down to a quarter (overload).",
            registry=r,
        )
        self.gate_closed_seconds = Counter(
            "cocoon_net_dhcp_discover_gate_closed_seconds_total",
            "Seconds new DISCOVERs were dropped by the kernel under overload; REQUESTs were "
            "still served.",
            registry=r,
        )
        self.reads = Counter(
            "cocoon_net_dhcp_reads_total",
            "Reads of the DHCP receive queue that found requests; packets per read is how "
            "many were answered together (read pacing).",
            registry=r,
        )
        self.fsync_seconds = Histogram(
            "cocoon_net_lease_fsync_seconds",
            "Time to make one batch of lease changes durable (write + fsync).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.route_ops = Counter(
            "cocoon_net_route_operations_total",
            "Host /32 route changes, by operation and result.",
            ["op", "result"],
            registry=r,
        )

        self.repairs = Counter(
            "cocoon_net_repairs_total",
            "Things found changed on the host and set right again, by what (route, bridge, "
            "firewall, sysctl, conflist, guard, egress).",
            ["what"],
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def parse_listen(addr: str) -> tuple[str, int]:
    """':9092', '127.0.0.1:9092' or '[::1]:9092' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    bad = not sep or not port.isdigit() or int(port) > 65535
    try:
        if host:
            ip_address(host)  # a name would be looked up at bind time, after host setup
    except ValueError:
        bad = True
    if bad:
        raise UsageError(f"invalid --metrics-addr {addr!r}: expected [IP]:PORT, e.g. :9092")
    return host, int(port)


class MetricsServer:
    def __init__(self, metrics: Metrics, addr: str, refuse: IPv4Network) -> None:
        host, port = parse_listen(addr)
        render = metrics.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:
                # HTTPServer's own looks the host's name up (getfqdn): on a node whose DNS
                # does not answer that holds the daemon's start for 10 s.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = host, self.server_address[1]

            def verify_request(self, request: Any, client_address: Any) -> bool:
                # VMs must not read host metrics, whatever address the server listens on.
                try:
                    peer = ip_address(client_address[0])
                except (ValueError, IndexError):
                    return True
                return peer not in refuse

        self._server = Server((host, port), Handler)
        self.address = self._server.server_address
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

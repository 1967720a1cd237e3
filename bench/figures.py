"""Figures beyond the ladder, each beside a baseline taken in the same run.

- Start to ready with N leases on disk (253: a full /24 node; 60,000: a /16): every server is
  given the same leases in its own file format and timed from exec to its own "ready" signal
  and to the first OFFER a probe DISCOVER from one of the leased clients gets back (the pool
  of a full /24 has no address for a new one); cocoon-net also reports how many /32 routes it
  had installed when it said ready. Kea and dnsmasq install no routes.
- `cocoon-net status` wall time while the daemon runs with those leases, next to `ip route
  show` at the same moment (it lists the same routes) and a bare interpreter start as floors.
- Resident memory right after start with those leases loaded (idle RSS).
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from bench.bed import Bed
from bench.ladder import REPO, loadgen_argv, rest_of_output
from bench.procstat import memory_kib
from bench.report import OURS, mb, ms, table
from bench.servers import LEASE_SECONDS, SERVERS, ServerFailed, ServerUnderTest
from cocoon_net.dhcp.model import Lease

START_TIMEOUT = 60.0  # dnsmasq needs ~25 s to offer with 60,000 leases on this machine


@dataclass(frozen=True)
class Startup:
    server: str
    leases: int
    status: str  # "ok", "skipped: ...", "failed: ..."
    ready_ms: float | None = None  # exec to the server's own readiness signal
    first_offer_ms: float | None = None  # exec to the first OFFER to a leased client
    routes: int | None = None  # cocoon-net's /32 routes when it said ready
    rss_kib: int | None = None  # resident right after ready
    status_ms: float | None = None  # median `cocoon-net status` wall time while it runs
    route_show_ms: float | None = None  # median `ip route show` at the same moment (floor)


@dataclass(frozen=True)
class Timing:
    command: str
    min_ms: float
    median_ms: float


def make_leases(pool: Sequence[IPv4Address], count: int) -> list[Lease]:
    """`count` live leases on the first addresses of the pool, from random client MACs."""
    expires = time.time() + LEASE_SECONDS
    return [
        Lease(mac=(bytes([0x02]) + secrets.token_bytes(5)).hex(":"), ip=ip, expires=expires)
        for ip in pool[:count]
    ]


def time_command(argv: Sequence[str], repeat: int) -> Timing:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(list(argv), capture_output=True, check=True, timeout=60)
        samples.append((time.perf_counter() - start) * 1000)
    return Timing(" ".join(argv), min(samples), statistics.median(samples))


def status_argv(bed: Bed) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cocoon_net",
        "--netns",
        bed.node,
        "status",
        "--no-cloud",
        "--state-dir",
        str(bed.paths.state_dir),
        "--run-dir",
        str(bed.paths.run_dir),
    ]


def interpreter_floor(repeat: int) -> Timing:
    """What starting any Python command costs on this machine."""
    return time_command([sys.executable, "-c", "pass"], repeat)


def measure_startup(
    bed: Bed, server: ServerUnderTest, leases: Sequence[Lease], timeout: float, repeat: int
) -> Startup:
    name, count = server.name, len(leases)
    reason = server.missing()
    if reason is not None:
        return Startup(name, count, f"skipped: {reason}")
    bed.forget_clients()
    server.write_leases(leases)
    probe = bed.in_loadgen(
        loadgen_argv(bed, "--probe", "--mac", leases[0].mac, "--timeout", str(timeout)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != "armed":
            raise RuntimeError(f"probe did not start: {rest_of_output(probe)[1]}")
        start_ns = time.time_ns()
        server.start()
        ready = server.wait_ready(timeout)
        routes = bed.route_count() if name == OURS else None
        rss = memory_kib(server.pid)[0]
        out, _ = rest_of_output(probe)
        stamp = json.loads(out.splitlines()[-1])["first_offer_ns"]
        status_ms = route_show_ms = None
        if name == OURS:
            status_ms = time_command(status_argv(bed), repeat).median_ms
            route_show = ["ip", "-n", bed.node, "route", "show"]
            route_show_ms = time_command(route_show, repeat).median_ms
        return Startup(
            name,
            count,
            "ok",
            ready_ms=ready * 1000,
            first_offer_ms=None if stamp is None else (stamp - start_ns) / 1e6,
            routes=routes,
            rss_kib=rss,
            status_ms=status_ms,
            route_show_ms=route_show_ms,
        )
    except ServerFailed as exc:
        return Startup(name, count, f"failed: {exc}")
    finally:
        server.stop()
        if probe.poll() is None:
            probe.kill()
            probe.wait()


def run_startups(
    bed: Bed,
    names: Sequence[str],
    count: int,
    workdir: Path,
    repeat: int,
    log: Callable[[str], None],
) -> list[Startup]:
    """Every server in turn, started on the same `count` leases."""
    leases = make_leases(bed.pool, count)
    out = []
    for name in names:
        server = SERVERS[name](bed.site(relay=False), workdir / f"{name}-start-{count}")
        result = measure_startup(bed, server, leases, START_TIMEOUT, repeat)
        log(
            f"{name} start with {count} leases: {result.status}, ready "
            f"{ms(result.ready_ms)} ms, first OFFER {ms(result.first_offer_ms)} ms"
        )
        out.append(result)
    return out


def startup_lines(results: Sequence[Startup], timings: Sequence[Timing]) -> list[str]:
    rows = [
        [
            r.server,
            str(r.leases),
            ms(r.ready_ms),
            ms(r.first_offer_ms),
            "-" if r.routes is None else str(r.routes),
            mb(r.rss_kib),
            ms(r.status_ms),
            ms(r.route_show_ms),
            "" if r.status == "ok" else r.status[:70],
        ]
        for r in results
    ]
    header = [
        "server",
        "leases",
        "ready ms",
        "1st OFFER ms",
        "routes",
        "RSS MB",
        "status ms",
        "ip route ms",
    ]
    return [
        *table([*header, "note"], rows),
        *(
            f"floor: {t.command}: min {t.min_ms:.0f} ms, median {t.median_ms:.0f} ms"
            for t in timings
        ),
    ]

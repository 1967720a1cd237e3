"""Benchmark cocoon-net's DHCP server against ISC Kea and dnsmasq, in namespaces of its own.

    .venv/bin/python -m bench [--smoke] [--servers kea,dnsmasq,...] [--relay] [--no-figures]

Builds a node (cni0, a /16 pool adopted with `cocoon-net adopt --platform static`) and a load
namespace on the bridge, runs each server in turn on the same pool through a ladder of DORA
rates with the direct-path load generator, prints the tables, and writes the raw results to
bench/results/<stamp>.json. Namespaces and files it made are removed on exit, also after an
error, Ctrl-C or SIGTERM. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from ipaddress import IPv4Network
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in {None, ""}:  # run as a script: bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu, figures, recovered, report, spy, summary
from bench.bed import Bed
from bench.ladder import (
    REPO,
    SATURATED_DROPS_PCT,
    LadderConfig,
    ServerRun,
    run_ladder,
)
from bench.relay import RelayStep, relay_lines, run_perfdhcp
from bench.report import OURS
from bench.servers import SERVERS, CocoonNet

DEFAULT_SERVERS = ("kea", "dnsmasq", "dnsmasq-ping", "cocoon-net", "cocoon-net-no-guard")
FULL_RATES = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12000)
SMOKE_RATES = (50,)
# Past the listed rates, the ladder goes on to 3x each server's lossless rate, up to this.
MAX_RATE = 30_000.0
# Debian packages of the peers; perfdhcp comes with kea-admin (testbed-facts #3).
PACKAGES = {
    "kea-dhcp4": "kea-dhcp4-server",
    "dnsmasq": "dnsmasq-base",
    "perfdhcp": "kea-admin",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds per server (tests, CI)")
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, run in this order (default {','.join(DEFAULT_SERVERS)})",
    )
    p.add_argument("--rates", default="", help="DORA/s always offered, e.g. 100,500,2000")
    p.add_argument(
        "--max-rate",
        type=float,
        default=MAX_RATE,
        help=f"past the listed rates, offer up to this DORA/s (default {MAX_RATE:g}; 0: no more)",
    )
    p.add_argument("--seconds", type=float, default=1.2, help="seconds of load per step")
    p.add_argument("--subnet", default="172.20.0.0/16", help="the pool's subnet (a /16)")
    p.add_argument("--relay", action="store_true", help="also run perfdhcp on the relay path")
    p.add_argument("--no-figures", action="store_true", help="ladder only: skip start-up etc.")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run cocoon-net's ladder under cProfile; print its hot spots, keep the .prof",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample cocoon-net's ladder with py-spy --native (every thread); print the shares",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get missing peers")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def ensure_packages(binaries: Sequence[str], log: Callable[[str], None]) -> None:
    """apt-get install the peers that are missing; a failure only means they get skipped."""
    missing = sorted({PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing or shutil.which("apt-get") is None:
        return
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        subprocess.run(install, env=env, check=False, capture_output=True)


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        # Other work on the machine during the run makes every figure slower; look here first.
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def versions() -> dict[str, str]:
    out = {}
    for binary, flag in (("kea-dhcp4", "-v"), ("dnsmasq", "-v"), ("perfdhcp", "-v")):
        if shutil.which(binary):
            done = subprocess.run([binary, flag], capture_output=True, text=True, check=False)
            text = (done.stdout or done.stderr).strip().splitlines()
            out[binary] = text[0] if text else "?"
    return out


@contextlib.contextmanager
def open_bed(
    subnet: IPv4Network, pool_size: int, workdir: Path, log: Callable[[str], None]
) -> Iterator[Bed]:
    workdir.mkdir(parents=True)
    with Bed(subnet, pool_size, workdir) as bed:
        log(f"bench: namespaces {' '.join(bed.namespaces)}")
        log(
            f"bench: node {bed.node}, load {bed.loadgen_ns}, pool {len(bed.pool)} on {subnet}, "
            f"cpus loadgen={bed.cpus.loadgen} server={bed.cpus.server}, "
            f"neighbour limit {bed.neigh_limit}"
        )
        yield bed


def run_relay(
    bed: Bed, names: Sequence[str], cfg: LadderConfig, tmp: Path, log: Callable[[str], None]
) -> list[RelayStep]:
    """perfdhcp through the ladder for each server, after everything on the direct path (the
    relay address it needs stays on the load interface)."""
    site = bed.site(relay=True)
    bed.add_relay_address()
    steps = []
    for name in names:
        for rate in cfg.rates:
            server = SERVERS[name](site, tmp / f"{name}-relay-{rate:g}")
            step = run_perfdhcp(bed, server, rate, cfg.seconds, cfg.ready_timeout)
            steps.append(step)
            log(
                f"{name} relay {rate:g}/s: {step.status}, {step.achieved_rate:.0f} DORA/s, "
                f"{step.drops_pct:.1f} % drops"
            )
            if step.status != "ok" or step.drops_pct > SATURATED_DROPS_PCT:
                break
    return steps


def hot_spots(path: Path, count: int = 20) -> list[str]:
    """The functions that took the most time of their own, as pstats prints them."""
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(count)
    text = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(text) if line.lstrip().startswith("ncalls")), 0)
    return [line for line in text[start:] if line.strip()]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    if os.geteuid() != 0:
        log("bench: needs root (it creates network namespaces)")
        return 2
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        log(f"bench: unknown server {', '.join(unknown)} (known: {', '.join(SERVERS)})")
        return 2
    if args.py_spy and spy.binary() is None:
        log("bench: --py-spy needs py-spy on PATH or in this venv (pip install py-spy)")
        return 2
    rates = tuple(float(r) for r in args.rates.split(",") if r) or (
        SMOKE_RATES if args.smoke else FULL_RATES
    )
    subnet = IPv4Network(args.subnet)
    pool_size = min(subnet.num_addresses - 3 - 256, 65000)
    cfg = LadderConfig(
        rates=rates,
        seconds=1.0 if args.smoke else args.seconds,
        min_clients=20 if args.smoke else 200,
        grace=1.0 if args.smoke else 2.0,
        ready_timeout=10.0,
        pool_size=pool_size,
        max_rate=0.0 if args.smoke else args.max_rate,
    )
    biggest = cfg.clients(max(*rates, cfg.max_rate))
    if biggest > pool_size:
        log(f"bench: a step needs up to {biggest} addresses, the pool has {pool_size}")
        return 2
    if not args.no_install and not args.smoke:
        ensure_packages([SERVERS[n].binary for n in names if not n.startswith("cocoon-net")], log)
    # SIGTERM unwinds like Ctrl-C, through every cleanup below.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    began = time.monotonic()
    machine_at_start = machine()

    subnet24 = next(subnet.subnets(new_prefix=24))
    runs: list[ServerRun] = []
    startups: list[figures.Startup] = []
    timings: list[figures.Timing] = []
    relay_steps: list[RelayStep] = []
    after_loss: recovered.Recovered | None = None
    cpu_rounds: list[cpu.CpuRounds] = []
    spied: dict[str, CocoonNet] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cocoon-bench-") as tmp:
            work = Path(tmp)
            with open_bed(subnet, pool_size, work / "ladder", log) as bed:
                neigh = bed.neigh_limit
                for name in names:
                    server = SERVERS[name](bed.site(relay=False), work / f"{name}-ladder")
                    if args.profile and isinstance(server, CocoonNet):
                        server.profile_to = args.results_dir / f"{stamp}-cocoon-net.prof"
                        args.results_dir.mkdir(parents=True, exist_ok=True)
                    if args.py_spy and isinstance(server, CocoonNet):
                        server.spy_to = args.results_dir / f"{stamp}-{name}-py-spy"
                        args.results_dir.mkdir(parents=True, exist_ok=True)
                        spied[name] = server
                    runs.append(run_ladder(bed, server, cfg, log))
                if not args.no_figures:
                    measured = [run.name for run in runs if run.status == "ok"]
                    cpu_plan = cpu.SMOKE if args.smoke else cpu.FULL
                    cpu_rounds = cpu.measure(bed, measured, work / "cpu", cpu_plan, log)
                if args.relay:
                    relay_steps = run_relay(bed, names, cfg, work, log)
            if not args.no_figures:
                repeat = 3 if args.smoke else 10
                timings = [figures.interpreter_floor(repeat)]
                # Start-up is measured on fresh nodes: a full /24 as GKE gives one, and a /16.
                plan = [(subnet24, 253)] if args.smoke else [(subnet24, 253), (subnet, 60_000)]
                for net, count in plan:
                    size = count if net is subnet24 else pool_size
                    with open_bed(net, size, work / f"start-{count}", log) as bed:
                        startups += figures.run_startups(bed, names, count, work, repeat, log)
                        # After a lost lease file: on the largest node the run builds.
                        if OURS in names and count == plan[-1][1]:
                            held = recovered.SMOKE if args.smoke else recovered.FULL
                            after_loss = recovered.measure(bed, work / "recovered", held, log)
    except KeyboardInterrupt:
        log("bench: interrupted; namespaces removed")
        return 130

    lines = [
        "",
        "ladder (latency in ms; cpu = % of one core; RSS = peak VmHWM)",
        *report.ladder_table(runs),
    ]
    if cpu_rounds:
        lines += ["", *cpu.lines(cpu_rounds)]
    if startups:
        lines += ["", "start to ready, idle RSS, status", *figures.startup_lines(startups, timings)]
    if after_loss is not None:
        lines += ["", *recovered.lines(after_loss)]
    if relay_steps:
        lines += ["", "relay path (perfdhcp)", *relay_lines(relay_steps)]
    figs = summary.collect(runs, startups, [] if after_loss is None else [after_loss], cpu_rounds)
    targets = summary.evaluate(figs, runs)
    lines += [
        "",
        "summary",
        *summary.summary_table(figs),
        "",
        *summary.ratio_lines(figs),
        *report.guard_lines(runs),
        *summary.behind_lines(runs),
        *summary.generator_lines(runs),
    ]
    profile = args.results_dir / f"{stamp}-cocoon-net.prof"
    if args.profile and profile.exists():
        lines += ["", f"cocoon-net profile (ladder, main thread): {profile}", *hot_spots(profile)]
    for name, spied_server in spied.items():
        files = [f for f in spied_server.spy_files if f.exists()]
        listed = ", ".join(map(str, files)) or "no samples written"
        stacks = spy.read_files(files)
        lines += ["", f"{name} py-spy (ladder): {listed}", *spy.report(stacks)]
        lines += spy.cpu_lines(spied_server.thread_cpu, stacks)
    lines += [
        "",
        f"load average at start {' '.join(machine_at_start['loadavg'])}, "
        f"at the end {' '.join(machine()['loadavg'])}; whole run {time.monotonic() - began:.0f} s",
        "",
        "targets",
        *summary.target_lines(targets, runs),
    ]
    log("\n".join(lines))
    document = report.to_json(
        runs,
        {
            "stamp": stamp,
            "machine": machine_at_start,
            "loadavg_at_end": machine()["loadavg"],
            "versions": versions(),
            "neighbour_limit": neigh,
            "ladder": asdict(cfg),
            "startup": [asdict(s) for s in startups],
            "floors": [asdict(t) for t in timings],
            "relay": [asdict(r) for r in relay_steps],
            "recovered": None if after_loss is None else asdict(after_loss),
            "cpu": [asdict(c) for c in cpu_rounds],
            "targets": [asdict(t) for t in targets],
        },
    )
    path = report.write_results(args.results_dir, stamp, document)
    log(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DISCOVER latency after a lost lease file, beside the same load on a node that lost nothing.

A daemon that starts without its lease files finds its /32 routes (proto 203) still in the
kernel for the addresses its VMs hold, and holds each of them, for its own VM only, until a
lease time has passed. New clients must then be served around those holds. The bench builds
that state as the daemon leaves it: on a fresh node, `held` routes `<ip>/32 dev cni0 proto
203 scope link` on the first `held` addresses of the pool, and no lease files. The daemon
hands out never-used addresses in ascending order, so that is a node whose first VMs are all
still there, and every new client's search for a free address starts at the held ones (the
worst place for them). The daemon starts on it, reports how many
addresses it holds (its control socket), and takes a step of new clients at a moderate rate;
the same step, on the same node with no routes and no lease files, is the baseline. The two
alternate for a few rounds, each on a fresh start; each side's figure is its lowest p99 over
the rounds, because other work on a shared machine only ever adds to a round's latency.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.bed import BRIDGE, Bed
from bench.ladder import Step, run_step
from bench.report import table
from bench.servers import CocoonNet, ServerFailed
from cocoon_net import config, control

START_TIMEOUT = 60.0  # the daemon probes every held address by ARP before it serves


@dataclass(frozen=True)
class RecoveredPlan:
    held: int  # routed pool addresses without a lease
    rate: float  # DISCOVERs per second of the step
    clients: int  # new clients in the step
    grace: float  # seconds to wait for the last replies
    rounds: int  # of the baseline and the held step each, alternating


FULL = RecoveredPlan(held=20_000, rate=1000.0, clients=2000, grace=2.0, rounds=2)
SMOKE = RecoveredPlan(held=100, rate=50.0, clients=20, grace=1.0, rounds=1)


@dataclass(frozen=True)
class Recovered:
    """The steps of every round: `none` on a node that lost nothing, `held` after the loss."""

    server: str
    status: str  # "ok" or "failed: ..."
    plan: RecoveredPlan
    holding: int | None = None  # addresses the daemon said it held when it was ready
    none: tuple[Step, ...] = ()
    held: tuple[Step, ...] = ()

    @property
    def p99_ms(self) -> tuple[float, float] | None:
        """DISCOVER->OFFER p99 in ms, the lowest of the rounds: (with no held addresses,
        with them)."""
        if not self.none or not self.held:
            return None
        return _best_p99(self.none), _best_p99(self.held)

    @property
    def ratio(self) -> float | None:
        p99 = self.p99_ms
        return None if p99 is None or p99[0] <= 0 else p99[1] / p99[0]


def _best_p99(steps: tuple[Step, ...]) -> float:
    return min(float(s.loadgen["offer_latency"]["p99_ms"]) for s in steps)


def held_count(server: CocoonNet) -> int:
    """Pool addresses that are neither free nor leased, offered or quarantined: held."""
    pool = control.request(server.site.paths.control_socket, {"cmd": "leases"})["pool"]
    busy = pool["free"] + pool["leased"] + pool["offered"] + pool["quarantined"]
    return int(pool["size"]) - int(busy)


def route_batch(bed: Bed, count: int, path: Path) -> None:
    """Our /32 routes for the first `count` pool addresses, as `ip -batch` lines in `path`."""
    path.write_text(
        "".join(
            f"route replace {ip}/32 dev {BRIDGE} proto {config.ROUTE_PROTO} scope link\n"
            for ip in bed.pool[:count]
        )
    )


def _step(bed: Bed, server: CocoonNet, plan: RecoveredPlan) -> tuple[int, Step]:
    server.start()
    try:
        server.wait_ready(START_TIMEOUT)
        holding = held_count(server)
        bed.flush_neighbours()
        return holding, run_step(bed, server, plan.rate, plan.clients, plan.grace)
    finally:
        server.stop()
        server.forget_leases()
        bed.forget_clients()


def measure(bed: Bed, workdir: Path, plan: RecoveredPlan, log: Callable[[str], None]) -> Recovered:
    """Rounds of the baseline step and the step after a lost lease file, each on a fresh
    start."""
    server = CocoonNet(bed.site(relay=False), workdir)
    bed.forget_clients()
    batch = workdir / "routes.batch"
    none: list[Step] = []
    held: list[Step] = []
    holding = None
    try:
        for _ in range(plan.rounds):
            none.append(_step(bed, server, plan)[1])
            route_batch(bed, plan.held, batch)
            bed.node_exec("ip", "-batch", str(batch))
            holding, step = _step(bed, server, plan)
            held.append(step)
    except ServerFailed as exc:
        log(f"{server.name} with {plan.held} recovered addresses: {exc}")
        return Recovered(server.name, f"failed: {exc}", plan)
    result = Recovered(server.name, "ok", plan, holding, tuple(none), tuple(held))
    p99 = result.p99_ms
    assert p99 is not None
    log(
        f"{server.name}: DISCOVER p99 {p99[0]:.2f} ms with no recovered addresses, "
        f"{p99[1]:.2f} ms holding {holding} after a lost lease file "
        f"({plan.clients} new clients at {plan.rate:g}/s, lowest of {plan.rounds} rounds)"
    )
    return result


def lines(result: Recovered) -> list[str]:
    """The two steps side by side, and the ratio of their DISCOVER p99s."""
    title = (
        f"after a lost lease file ({result.server}, {result.plan.clients} new clients at "
        f"{result.plan.rate:g}/s, each round on a fresh start)"
    )
    if result.status != "ok":
        return [title, f"  {result.status}"]
    rows = []
    for label, holding, steps in (
        ("none", 0, result.none),
        ("recovered", result.holding, result.held),
    ):
        for step in steps:
            lg = step.loadgen
            rows.append(
                [
                    label,
                    "-" if holding is None else str(holding),
                    f"{lg['goodput']:.0f}",
                    f"{lg['drops_pct']:.1f}",
                    f"{lg['offer_latency']['avg_ms']:.2f}",
                    f"{lg['offer_latency']['p99_ms']:.2f}",
                    f"{lg['ack_latency']['p99_ms']:.2f}",
                    f"{step.server_cpu_pct:.0f}",
                    f"{step.other_cpu_pct:.0f}",
                ]
            )
    header = ["routes", "held", "goodput/s", "drops %", "D-O avg", "D-O p99", "R-A p99"]
    ratio = result.ratio
    return [
        title,
        *table([*header, "cpu %", "other %"], rows),
        f"DISCOVER p99 (the lowest of {result.plan.rounds} rounds) with recovered addresses / "
        f"with none: {'-' if ratio is None else f'{ratio:.2f}x'}",
    ]

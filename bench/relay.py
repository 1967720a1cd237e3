"""The relay path, driven by ISC perfdhcp (Debian kea-admin), for servers that answer relays.

perfdhcp -4 always acts as a relay (testbed-facts #1): giaddr is its `-l` address, which the
bench puts in the load namespace inside the subnet and outside the pool, and servers answer
unicast to giaddr:67. Its own "Rate" line divides by a run time that includes the exit wait
(#2), so the rate here is ACKs over the test period; its NAKs count as drops.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from bench.bed import Bed
from bench.report import ms, table
from bench.servers import ServerFailed, ServerUnderTest

PERFDHCP = "perfdhcp"
_SECTION = re.compile(r"\*\*\*Statistics for: (\S+)\*\*\*")
_FIELDS = {
    "sent": re.compile(r"^sent packets: (\d+)", re.M),
    "received": re.compile(r"^received packets: (\d+)", re.M),
    "avg_ms": re.compile(r"^avg delay: ([\d.]+) ms", re.M),
    "max_ms": re.compile(r"^max delay: ([\d.]+) ms", re.M),
}


@dataclass(frozen=True)
class Exchange:
    sent: int
    received: int
    avg_ms: float
    max_ms: float


@dataclass(frozen=True)
class RelayStep:
    server: str
    target_rate: float
    seconds: float
    status: str  # "ok", "skipped: ...", "failed: ..."
    achieved_rate: float = 0.0  # ACKs per second of the test period
    drops_pct: float = 0.0
    offer: Exchange | None = None  # DISCOVER -> OFFER
    ack: Exchange | None = None  # REQUEST -> ACK


def parse_exchanges(output: str) -> dict[str, Exchange]:
    """perfdhcp's per-exchange statistics blocks, keyed "DISCOVER-OFFER", "REQUEST-ACK"."""
    parts = _SECTION.split(output)
    out: dict[str, Exchange] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        values: dict[str, float] = {}
        for key, pattern in _FIELDS.items():
            match = pattern.search(body)
            values[key] = float(match.group(1)) if match else 0.0
        out[name] = Exchange(
            int(values["sent"]), int(values["received"]), values["avg_ms"], values["max_ms"]
        )
    return out


def run_perfdhcp(
    bed: Bed, server: ServerUnderTest, rate: float, seconds: float, ready_timeout: float
) -> RelayStep:
    name = server.name
    if shutil.which(PERFDHCP) is None:
        return RelayStep(name, rate, seconds, "skipped: perfdhcp not installed (kea-admin)")
    reason = server.missing()
    if reason is not None:
        return RelayStep(name, rate, seconds, f"skipped: {reason}")
    bed.forget_clients()
    cpu = bed.cpus.loadgen
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    argv = [
        *pin,
        PERFDHCP,
        "-4",
        "-l",
        str(bed.relay_ip),
        "-r",
        f"{rate:g}",
        "-R",
        str(round(rate * seconds)),
        "-p",
        f"{seconds:g}",
        "-g",
        "single",  # #4: on two cores with the server pinned to the other, single is fair
        str(bed.gateway),
    ]
    try:
        server.start()
        server.wait_ready(ready_timeout)
        done = bed.in_loadgen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = done.communicate(timeout=seconds + 60)
    except ServerFailed as exc:
        return RelayStep(name, rate, seconds, f"failed: {exc}")
    finally:
        server.stop()
    exchanges = parse_exchanges(output)
    offer, ack = exchanges.get("DISCOVER-OFFER"), exchanges.get("REQUEST-ACK")
    if offer is None or ack is None:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        return RelayStep(name, rate, seconds, f"failed: perfdhcp: {tail[0][:120]}")
    drops = 100.0 * (1 - ack.received / offer.sent) if offer.sent else 100.0
    return RelayStep(
        name,
        rate,
        seconds,
        "ok",
        achieved_rate=ack.received / seconds,
        drops_pct=drops,
        offer=offer,
        ack=ack,
    )


def relay_lines(steps: list[RelayStep]) -> list[str]:
    rows = [
        [
            s.server,
            f"{s.target_rate:g}",
            f"{s.achieved_rate:.0f}" if s.ack else "-",
            f"{s.drops_pct:.1f}" if s.ack else "-",
            ms(s.offer.avg_ms if s.offer else None, 2),
            ms(s.ack.avg_ms if s.ack else None, 2),
            "" if s.status == "ok" else s.status[:70],
        ]
        for s in steps
    ]
    return table(["server", "target/s", "DORA/s", "drops %", "D-O avg", "R-A avg", "note"], rows)

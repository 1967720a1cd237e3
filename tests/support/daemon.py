"""A cocoon-net node in a sandbox: `adopt --platform static`, then `cocoon-net daemon`.

Everything the node writes goes under one private directory (state, run, CNI conflist, logs,
the notify socket); the daemon runs as the CLI runs it (`python -m cocoon_net --netns NODE`),
and readiness is systemd's: the test binds the NOTIFY_SOCKET datagram socket and waits for
READY=1, so no test sleeps for a fixed time.

What the tests compare is read from the two places that must agree: the daemon's own view
(the control socket, as `status` reads it) and the kernel's (`ip -json route show proto 203`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from cocoon_net import config, control, proc
from cocoon_net.sandbox import Sandbox
from cocoon_net.sandbox.node import SandboxNode

T = TypeVar("T")

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
METRICS_PORT = 9464  # inside the node namespace, so no other test or service shares it
POLL_S = 0.05


@dataclass(frozen=True)
class LeaseRow:
    """One live lease as the daemon reports it on its control socket."""

    ip: IPv4Address
    mac: str
    hostname: str
    expires: float
    route: bool


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll probe until it returns something other than None; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while (result := probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)
    return result


class NodeDaemon(SandboxNode):
    """The sandbox node (adopt, daemon start/stop/kill) plus what the tests read back."""

    def __init__(
        self,
        sandbox: Sandbox,
        root: Path,
        *,
        lease_time: str = "120",
        metrics_addr: str = f":{METRICS_PORT}",  # every address: VMs must be refused
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(
            sandbox,
            root,
            lease_time=lease_time,
            metrics_addr=metrics_addr,
            log_level="debug",
            extra=extra,
        )

    def adopt(self, node_name: str = "demo", *extra: str) -> str:
        return super().adopt(node_name, *extra)

    def close(self) -> None:
        """Kill the daemon if it still runs (the sandbox removes the namespaces after)."""
        self.kill()

    def errors(self) -> list[str]:
        """The lines the daemon logged at level error, in every run so far."""
        return [line for line in self.log().splitlines() if line[24:].startswith(" error ")]

    # -- what the daemon and the kernel say -------------------------------------------------

    def live(self) -> dict[str, Any]:
        """The daemon's live view: {"pool": {...counts}, "leases": [...]}."""
        return control.request(self.paths.control_socket, {"cmd": "leases"})

    def leases(self) -> dict[str, LeaseRow]:
        """Live leases by MAC."""
        rows = [
            LeaseRow(
                ip=IPv4Address(row["ip"]),
                mac=row["mac"],
                hostname=row["hostname"],
                expires=float(row["expires"]),
                route=bool(row["route"]),
            )
            for row in self.live()["leases"]
        ]
        by_mac = {row.mac: row for row in rows}
        assert len(by_mac) == len(rows), f"a MAC holds two leases: {rows}"
        return by_mac

    def pool_counts(self) -> dict[str, int]:
        return dict(self.live()["pool"])

    def route_list(self) -> list[IPv4Address]:
        """Every proto-203 route in the node (each must be a /32 on cni0), repeats kept."""
        out = proc.run_json(
            ["ip", "-n", self.sandbox.node, "-4", "-json", "route", "show", "proto",
             str(config.ROUTE_PROTO)]
        )  # fmt: skip
        strays = [r for r in out if r.get("dev") != "cni0" or "/" in r["dst"]]
        assert not strays, f"proto {config.ROUTE_PROTO} routes that are not /32 on cni0: {strays}"
        return [IPv4Address(r["dst"]) for r in out]

    def routes(self) -> set[IPv4Address]:
        found = self.route_list()
        assert len(found) == len(set(found)), f"duplicate /32 routes: {sorted(found)}"
        return set(found)

    def metrics(self, host: str = "127.0.0.1", netns: str | None = None) -> str:
        """GET /metrics from inside netns (default: the node); the body, or AssertionError."""
        url = f"http://{host}:{METRICS_PORT}/metrics"
        fetch = (
            "import sys, urllib.request\n"
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        )
        result = self.sandbox.run(
            netns or self.sandbox.node, [sys.executable, "-c", fetch, url], ok_codes=(0, 1)
        )
        if result.returncode != 0:
            raise AssertionError(f"GET {url}: {result.stderr.strip().splitlines()[-1:]}")
        return result.stdout

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when the series does not exist yet)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{want}}}" if want else name
        for line in self.metrics().splitlines():
            sample, _, value = line.rpartition(" ")
            if _canonical(sample) == key:
                return float(value)
        return 0.0

    def routes_equal_leases(self) -> set[IPv4Address]:
        """Wait until the kernel's routes and the daemon's leases agree; return the set."""

        def agree() -> set[IPv4Address] | None:
            leased = {row.ip for row in self.leases().values()}
            return leased if self.routes() == leased else None

        try:
            return wait_for(agree, "routes to equal leases", timeout=10)
        except AssertionError:
            leased = sorted(row.ip for row in self.leases().values())
            raise AssertionError(f"routes {sorted(self.routes())} != leases {leased}") from None


def _canonical(sample: str) -> str:
    """name{b="2",a="1"} -> name{a="1",b="2"}: label order is not part of a sample's identity."""
    name, brace, rest = sample.partition("{")
    if not brace:
        return name
    labels = sorted(part for part in rest.rstrip("}").split(",") if part)
    return f"{name}{{{','.join(labels)}}}"


@contextlib.contextmanager
def node_with_daemon(
    vms: int,
    root: Path,
    *,
    start: bool = True,
    adopt_flags: Sequence[str] = (),
    **daemon_kwargs: Any,
) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    """A sandbox with `vms` VMs, adopted, VMs attached to cni0, the daemon ready (if start)."""
    with Sandbox(vms, tmpdir=root) as sandbox:
        node = NodeDaemon(sandbox, root / "node", **daemon_kwargs)
        try:
            node.adopt("demo", *adopt_flags)
            if start:
                node.start()
            yield sandbox, node
        finally:
            node.close()

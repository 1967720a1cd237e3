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
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from cocoon_net import config, control, proc
from cocoon_net.sandbox import Sandbox

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


class NodeDaemon:
    """adopt + daemon in sandbox.node with private paths; start/stop/kill as often as needed."""

    def __init__(
        self,
        sandbox: Sandbox,
        root: Path,
        *,
        lease_time: str = "120",
        metrics_addr: str = f":{METRICS_PORT}",  # every address: VMs must be refused
        extra: Sequence[str] = (),
    ) -> None:
        self.sandbox = sandbox
        self.root = root
        self.lease_time = lease_time
        self.metrics_addr = metrics_addr
        self.extra = tuple(extra)
        self.state = root / "state"
        self.run_dir = root / "run"
        self.cni = root / "cni"
        self.log_file = root / "daemon.log"
        self.paths = config.Paths(state_dir=self.state, run_dir=self.run_dir, cni_conf_dir=self.cni)
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify: socket.socket | None = None
        self.starts = 0

    # -- the node's lifecycle ---------------------------------------------------------------

    def cocoon(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`cocoon-net --netns NODE ARGV` with this node's paths, as an operator runs it."""
        result = subprocess.run(
            [sys.executable, "-m", "cocoon_net", "--netns", self.sandbox.node, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"cocoon-net {' '.join(argv)}: {result.stderr.strip()}")
        return result

    def adopt(self) -> None:
        uplink = self.sandbox.node_uplink.network
        self.cocoon(
            "adopt", "--platform", "static", "--node-name", "demo",
            "--subnet", str(self.sandbox.subnet), "--manage-iptables", "--vpc-cidr", str(uplink),
            "--state-dir", str(self.state), "--run-dir", str(self.run_dir),
            "--cni-conf-dir", str(self.cni),
        )  # fmt: skip
        self.sandbox.attach_vms("cni0")

    def start(self, *extra: str) -> None:
        """Launch the daemon and return once it has told systemd READY=1."""
        if self.running:
            raise AssertionError("the daemon already runs")
        self.root.mkdir(parents=True, exist_ok=True)
        notify_path = self.root / f"notify-{self.starts}.sock"
        self.starts += 1
        # Bound for the daemon's whole life, as systemd's is: it also sends STOPPING=1.
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.settimeout(POLL_S * 4)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "cocoon_net", "--netns", self.sandbox.node,
                    "--log-level", "debug", "daemon",
                    "--metrics-addr", self.metrics_addr, "--lease-time", self.lease_time,
                    "--state-dir", str(self.state), "--run-dir", str(self.run_dir),
                    *self.extra, *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in self._notify.recv(4096).split(b"\n"):
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in {READY_TIMEOUT:g} s:\n{self.log()}")

    def _close_notify(self) -> None:
        if self._notify is not None:
            Path(self._notify.getsockname()).unlink(missing_ok=True)
            self._notify.close()
            self._notify = None

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal the daemon (SIGTERM: graceful; SIGKILL: a crash) and return its exit code."""
        assert self.proc is not None, "the daemon does not run"
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored {signum.name}:\n{self.log()}") from None
        self.proc = None
        self._close_notify()
        return code

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None, "the daemon does not run"
        self.proc.send_signal(signum)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Kill the daemon if it still runs (the sandbox removes the namespaces after)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._close_notify()

    def errors(self) -> list[str]:
        """The lines the daemon logged at level error, in every run so far."""
        return [line for line in self.log().splitlines() if line[24:].startswith(" error ")]

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- what the daemon and the kernel say -------------------------------------------------

    def status(self) -> dict[str, Any]:
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
            for row in self.status()["leases"]
        ]
        by_mac = {row.mac: row for row in rows}
        assert len(by_mac) == len(rows), f"a MAC holds two leases: {rows}"
        return by_mac

    def pool_counts(self) -> dict[str, int]:
        return dict(self.status()["pool"])

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

    def release(self, mac: str) -> list[str]:
        out = self.cocoon("release", "--mac", mac, "--run-dir", str(self.run_dir))
        return out.stdout.split()

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
    vms: int, root: Path, *, start: bool = True, **daemon_kwargs: Any
) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    """A sandbox with `vms` VMs, adopted, VMs attached to cni0, the daemon ready (if start)."""
    with Sandbox(vms, tmpdir=root) as sandbox:
        node = NodeDaemon(sandbox, root / "node", **daemon_kwargs)
        try:
            node.adopt()
            if start:
                node.start()
            yield sandbox, node
        finally:
            node.close()

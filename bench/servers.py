"""The DHCP servers the bench compares, behind one seam: start, wait until ready, stop.

Every server runs in the node namespace, serves the same pool on the same bridge, keeps its
leases durably in a file of its own under the run's work directory (never /var/lib or /run of
the host), and is pinned to the CPU the load generator does not use. `pid` is the process the
CPU and memory figures are read from; each server runs in the foreground as that process.

Peer set-up facts (research/testbed-facts.md): Kea is bound to `cni0/<gateway>` so a second
address on the bridge cannot make it answer twice (#9); dnsmasq's lease cap is raised from
1,000 (#6), and it runs with and without its ping check (#5).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bench import spy
from cocoon_net import config, control
from cocoon_net.dhcp.leasefile import encode_snapshot
from cocoon_net.dhcp.model import Lease

LEASE_SECONDS = 86400


class ServerFailed(Exception):
    """A server did not start, exited early or never became ready; the message says why."""


@dataclass(frozen=True)
class Site:
    """Where the servers run and what they serve; the same for every server in a run."""

    node: str  # network namespace of the node
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    pool_first: IPv4Address
    pool_last: IPv4Address
    paths: config.Paths  # the node's cocoon-net state, run and CNI directories
    cpu: int | None  # pin the server here; None on a one-CPU machine
    relay: IPv4Address | None  # accept relayed requests from this address (--relay)


class ServerUnderTest(abc.ABC):
    """One DHCP server implementation. An instance may be started again once stopped (the
    ladder restarts a server on empty lease files when the pool runs short)."""

    name: str
    binary: str

    def __init__(self, site: Site, workdir: Path) -> None:
        self.site = site
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} not installed"
        return None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServerFailed(f"{self.name} is not running")
        return self._proc.pid

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The command line, run as is (it enters the node namespace itself)."""

    @property
    @abc.abstractmethod
    def lease_file(self) -> Path:
        """Where the server keeps its leases; its other lease files start with this name."""

    @abc.abstractmethod
    def write_leases(self, leases: Sequence[Lease]) -> None:
        """Write `leases` where the server will load them from at start."""

    def forget_leases(self) -> None:
        """Remove every lease file of the stopped server, so its next start has none."""
        for path in self.workdir.glob(f"{self.lease_file.name}*"):
            path.unlink()

    def prepare(self) -> dict[str, str]:
        """Write configuration before start; return extra environment variables."""
        return {}

    def journal_stats(self) -> dict[str, int]:
        """Counters of the server's durable lease writes (batches = fsyncs), where it has them."""
        return {}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.prepare()}
        argv = self.argv()
        if self.site.cpu is not None:
            # taskset pins before exec, so every thread the server starts inherits the CPU.
            argv = ["taskset", "-c", str(self.site.cpu), *argv]
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )

    def wait_ready(self, timeout: float) -> float:
        """Block until the server says it serves; return seconds since start."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self._is_ready(min(0.02, deadline - time.monotonic())):
                return time.monotonic() - self.started_at
        raise ServerFailed(f"{self.name} not ready within {timeout:g} s ({self.last_log_line()})")

    # A line the server logs once it serves; None where _is_ready is overridden.
    ready_marker: str | None = None

    def _is_ready(self, wait: float) -> bool:
        """Poll readiness once, waiting at most `wait` seconds."""
        if self.ready_marker is not None and self._log_contains(self.ready_marker):
            return True
        time.sleep(wait)
        return False

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerFailed(
                f"{self.name} exited with status {self._proc.returncode} ({self.last_log_line()})"
            )

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1][:200] if lines else "no log output"

    def _log_contains(self, needle: str) -> bool:
        try:
            return needle in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _netns_exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.site.node, *argv]


class Kea(ServerUnderTest):
    """ISC kea-dhcp4 with the memfile backend, persist on (every lease written before the ACK)."""

    name = "kea"
    binary = "kea-dhcp4"
    ready_marker = "DHCP4_STARTED"

    @property
    def lease_file(self) -> Path:
        return self.workdir / "kea-leases4.csv"

    def prepare(self) -> dict[str, str]:
        site = self.site
        conf = {
            "Dhcp4": {
                "interfaces-config": {
                    "interfaces": [f"{site.bridge}/{site.gateway}"],
                    "dhcp-socket-type": "raw",
                },
                "lease-database": {
                    "type": "memfile",
                    "persist": True,
                    "name": str(self.lease_file),
                    "lfc-interval": 0,
                },
                "valid-lifetime": LEASE_SECONDS,
                "authoritative": True,
                "subnet4": [
                    {
                        "id": 1,
                        "subnet": str(site.subnet),
                        "pools": [{"pool": f"{site.pool_first} - {site.pool_last}"}],
                        # A relayed request's giaddr lies in this subnet, which selects it.
                        "option-data": [{"name": "routers", "data": str(site.gateway)}],
                    }
                ],
                # Startup and errors only: per-lease logging would be charged to the server.
                "loggers": [
                    {
                        "name": "kea-dhcp4",
                        "output_options": [{"output": "stderr"}],
                        "severity": "INFO",
                    },
                    *(
                        {
                            "name": f"kea-dhcp4.{sub}",
                            "output_options": [{"output": "stderr"}],
                            "severity": "WARN",
                        }
                        for sub in ("leases", "packets", "alloc-engine", "bad-packets", "options")
                    ),
                ],
            }
        }
        (self.workdir / "kea-dhcp4.json").write_text(json.dumps(conf, indent=2))
        # Kea's pid and logger lock files default to /run/kea; keep them in the work dir.
        return {"KEA_PIDFILE_DIR": str(self.workdir), "KEA_LOCKFILE_DIR": "none"}

    def argv(self) -> list[str]:
        return self._netns_exec(self.binary, "-c", str(self.workdir / "kea-dhcp4.json"))

    def write_leases(self, leases: Sequence[Lease]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        header = (
            "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,"
            "fqdn_fwd,fqdn_rev,hostname,state,user_context\n"
        )
        rows = (
            f"{lease.ip},{lease.mac},,{LEASE_SECONDS},{int(lease.expires)},1,0,0,,0,\n"
            for lease in leases
        )
        self.lease_file.write_text(header + "".join(rows))


class Dnsmasq(ServerUnderTest):
    """dnsmasq as a DHCP server only (DNS off), authoritative, leases in its own file."""

    name = "dnsmasq"
    binary = "dnsmasq"
    ready_marker = "DHCP, IP range"  # logged once the DHCP socket is open
    ping_check = False

    @property
    def lease_file(self) -> Path:
        return self.workdir / "dnsmasq.leases"

    def argv(self) -> list[str]:
        site = self.site
        argv = [
            self.binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",  # no DNS
            "--no-resolv",
            "--no-hosts",
            f"--interface={site.bridge}",
            "--bind-dynamic",
            f"--dhcp-range={site.pool_first},{site.pool_last},{site.subnet.netmask},"
            f"{LEASE_SECONDS}",
            f"--dhcp-option=option:router,{site.gateway}",
            # #6: dnsmasq NAKs "no leases left" at 1,000 leases unless this is raised.
            f"--dhcp-lease-max={site.subnet.num_addresses}",
            "--dhcp-authoritative",
            f"--dhcp-leasefile={self.lease_file}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            "--user=root",  # the lease file lives in the bench's root-owned work dir
            "--log-facility=-",
            "--quiet-dhcp",  # per-lease log lines would be charged to the server
        ]
        if not self.ping_check:
            argv.append("--no-ping")
        return self._netns_exec(*argv)

    def write_leases(self, leases: Sequence[Lease]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        rows = (f"{int(lease.expires)} {lease.mac} {lease.ip} * *\n" for lease in leases)
        self.lease_file.write_text("".join(rows))


class DnsmasqPing(Dnsmasq):
    """Stock dnsmasq: pings every new address before offering it (#5)."""

    name = "dnsmasq-ping"
    ping_check = True


class CocoonNet(ServerUnderTest):
    """`cocoon-net daemon` on the pool `adopt` registered, with its own lease file."""

    name = "cocoon-net"
    binary = "cocoon-net"
    extra_flags: tuple[str, ...] = ()

    def __init__(self, site: Site, workdir: Path, *, profile_to: Path | None = None) -> None:
        super().__init__(site, workdir)
        self._notify: socket.socket | None = None
        self._stale_control: int | None = None
        # cProfile of the main thread (the event loop: receive, decode, decide, reply), written
        # when the daemon exits on SIGTERM. The store's writer thread is not in it.
        self.profile_to = profile_to
        # py-spy's raw samples of every thread, one file per start: `<spy_to>.<n>.txt`.
        self.spy_to: Path | None = None
        self.spy_files: list[Path] = []
        # CPU seconds (user, system) of each thread id, read from /proc just before each stop.
        self.thread_cpu: dict[int, tuple[float, float]] = {}
        self._spy: subprocess.Popen[bytes] | None = None

    @property
    def lease_file(self) -> Path:
        return self.workdir / "leases.json"

    def missing(self) -> str | None:
        return None  # runs from this checkout's interpreter

    def prepare(self) -> dict[str, str]:
        path = self.workdir / "notify.sock"
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        self._notify = sock
        self._stale_control = _inode(self.site.paths.control_socket)
        return {"NOTIFY_SOCKET": str(path)}

    def argv(self) -> list[str]:
        paths = self.site.paths
        profiler = [] if self.profile_to is None else ["-m", "cProfile", "-o", str(self.profile_to)]
        argv = [
            sys.executable,
            *profiler,
            "-m",
            "cocoon_net",
            "--netns",
            self.site.node,
            # Quiet like the peers (Kea logs start-up and errors, dnsmasq --quiet-dhcp): no
            # line per OFFER and ACK.
            "--log-level",
            "warn",
            "daemon",
            "--state-dir",
            str(paths.state_dir),
            "--run-dir",
            str(paths.run_dir),
            "--lease-file",
            str(self.lease_file),
            "--metrics-addr",
            "",
        ]
        if self.site.relay is not None:
            argv += ["--relay-from", str(self.site.relay)]
        return argv + list(self.extra_flags)

    def _is_ready(self, wait: float) -> bool:
        """READY=1 on $NOTIFY_SOCKET, or a new control socket appearing, whichever is first
        (a socket file left by an earlier run does not count)."""
        control = _inode(self.site.paths.control_socket)
        if control is not None and control != self._stale_control:
            return True
        if self._notify is None:
            return False
        readable, _, _ = select.select([self._notify], [], [], max(0.0, wait))
        while readable:
            try:
                data = self._notify.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if b"READY=1" in data.split(b"\n"):
                return True
        return False

    def wait_ready(self, timeout: float) -> float:
        took = super().wait_ready(timeout)
        py_spy = spy.binary()
        if self.spy_to is not None and py_spy is not None:
            out = self.spy_to.with_name(f"{self.spy_to.name}.{len(self.spy_files)}.txt")
            self.spy_files.append(out)
            argv = [py_spy, "record", "--pid", str(self.pid), "--native", "--threads"]
            argv += ["--rate", str(spy.RATE_HZ), "--format", "raw", "--output", str(out)]
            with self.log_path.open("ab") as log:
                self._spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return took

    def journal_stats(self) -> dict[str, int]:
        answer = control.request(self.site.paths.control_socket, {"cmd": "stats"})
        store = answer["store"]
        return {"batches": int(store["batches"]), "records": int(store["records"])}

    def write_leases(self, leases: Sequence[Lease]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lease_file.write_bytes(encode_snapshot(leases))

    def stop(self) -> None:
        if self._spy is not None:
            with contextlib.suppress(ServerFailed):
                self.thread_cpu.update(spy.thread_cpu(self.pid))
        try:
            super().stop()
        finally:
            spy_proc, self._spy = self._spy, None
            if spy_proc is not None:
                # py-spy writes its file when the process it samples has exited.
                try:
                    spy_proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy_proc.send_signal(signal.SIGINT)
                    spy_proc.wait(timeout=10)
            if self._notify is not None:
                with contextlib.suppress(OSError):
                    self._notify.close()
                self._notify = None


class CocoonNetNoGuard(CocoonNet):
    """The same daemon without its VM guard: what the guard costs is the difference."""

    name = "cocoon-net-no-guard"
    extra_flags = ("--no-guard",)


class CocoonNetUnpaced(CocoonNet):
    """The same daemon reading each request at once (no read pacing): what pacing saves, and
    what it costs in latency, is the difference. Not in the default run; `--servers` names it."""

    name = "cocoon-net-unpaced"
    extra_flags = ("--read-interval", "0")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


SERVERS: dict[str, type[ServerUnderTest]] = {
    cls.name: cls
    for cls in (CocoonNet, CocoonNetNoGuard, CocoonNetUnpaced, Kea, Dnsmasq, DnsmasqPing)
}

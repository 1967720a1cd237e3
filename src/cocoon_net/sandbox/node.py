"""A cocoon-net node inside a Sandbox: adopt, daemon, status, release, teardown.

Everything runs as an operator runs it — the real command, `python -m cocoon_net --netns NODE`
— with every path under one private directory, so the host's /etc, /var/lib and /run are
never touched. Readiness is systemd's protocol: we bind the NOTIFY_SOCKET the daemon reports
READY=1 on, so nothing waits a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cocoon_net import config
from cocoon_net.errors import HostSetupError
from cocoon_net.sandbox.topology import Sandbox

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class SandboxNode:
    def __init__(
        self,
        sandbox: Sandbox,
        root: Path,
        *,
        lease_time: str = "1h",
        metrics_addr: str = "127.0.0.1:9092",
        log_level: str = "info",
        extra: Sequence[str] = (),
    ) -> None:
        self.sandbox = sandbox
        self.root = root
        self.lease_time = lease_time
        self.metrics_addr = metrics_addr
        self.log_level = log_level
        self.extra = tuple(extra)  # more daemon flags, on every start
        self.paths = config.Paths(
            state_dir=root / "state", run_dir=root / "run", cni_conf_dir=root / "cni"
        )
        self.log_file = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def _path_flags(self, *, cni: bool = False) -> list[str]:
        flags = ["--state-dir", str(self.paths.state_dir), "--run-dir", str(self.paths.run_dir)]
        return flags + (["--cni-conf-dir", str(self.paths.cni_conf_dir)] if cni else [])

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`cocoon-net --netns NODE ARGV`, as an operator runs it; the caller judges the result."""
        return subprocess.run(
            [sys.executable, "-m", "cocoon_net", "--netns", self.sandbox.node, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def cocoon(self, *argv: str) -> str:
        """run(), then its stdout, or HostSetupError with its stderr."""
        result = self.run(*argv)
        if result.returncode != 0:
            raise HostSetupError(f"cocoon-net {argv[0]}: {result.stderr.strip()}")
        return result.stdout

    def adopt(self, node_name: str = "sandbox", *extra: str) -> str:
        """Register the sandbox's subnet as a static pool; VMs reach the 'VPC' unmasqueraded.
        extra: more adopt flags (e.g. --allow-vm-to-vm)."""
        out = self.cocoon(
            "adopt",
            "--platform", "static",
            "--node-name", node_name,
            "--subnet", str(self.sandbox.subnet),
            "--manage-iptables",
            "--vpc-cidr", str(self.sandbox.node_uplink.network),
            *self._path_flags(cni=True),
            *extra,
        )  # fmt: skip
        self.sandbox.attach_vms(config.DEFAULT_BRIDGE)
        return out

    def start(self, *extra: str) -> None:
        """Start the daemon and return once it reported READY=1."""
        if self.running:
            raise HostSetupError("the daemon already runs")
        self.root.mkdir(parents=True, exist_ok=True)
        notify_path = self.root / f"notify-{self._starts}.sock"
        self._starts += 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.2)
            with self.log_file.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable, "-m", "cocoon_net", "--netns", self.sandbox.node,
                        "--log-level", self.log_level, "daemon",
                        "--metrics-addr", self.metrics_addr, "--lease-time", self.lease_time,
                        *self._path_flags(cni=True), *self.extra, *extra,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                )  # fmt: skip
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096).split(b"\n"):
                        break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise HostSetupError(f"daemon did not become ready:\n{self.log()}")
        notify_path.unlink()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, signum: signal.Signals) -> None:
        if self.proc is None:
            raise HostSetupError("the daemon does not run")
        self.proc.send_signal(signum)

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal the daemon (SIGTERM: graceful; SIGKILL: a crash); its exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HostSetupError(f"daemon ignored {signum.name}:\n{self.log()}") from None
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> str:
        return self.cocoon("status", *self._path_flags())

    def release(self, mac: str) -> list[str]:
        """End the lease of mac at once; the released addresses."""
        out = self.cocoon("release", "--mac", mac, "--run-dir", str(self.paths.run_dir))
        return [line.removeprefix("released ") for line in out.split("\n") if line]

    def teardown(self) -> str:
        return self.cocoon("teardown", *self._path_flags(cni=True))

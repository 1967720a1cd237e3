"""Real DHCP clients (ISC dhclient, busybox udhcpc, dhcpcd) driven inside a sandbox VM.

Every client runs as `ip netns exec VM unshare --mount --uts -- sh -c '<bind mounts>; exec CLIENT'`
with all its files in the VM's state dir, because in a namespace a client still shares the host's
/etc, /run, /var/lib and hostname (testbed-facts #13-#15):

- dhclient: `-lf`/`-pf` per VM, or every VM shares /var/lib/dhcp/dhclient.leases and one pid file;
  `-cf` our own config, or Debian's sends the host's hostname as option 12; `-sf` our script,
  because /sbin/dhclient-script rewrites /etc/resolv.conf (via a temp file next to it). dhclient
  has no signal that forces RENEWING, so renew() restarts it on its lease file and it confirms the
  lease in INIT-REBOOT (RFC 2131 §3.2), the path a rebooted VM takes.
- udhcpc: Debian's busybox names /etc/udhcpc/default.script, which comes from another package
  and writes /etc/resolv.conf; ours only sets the address and the default route. SIGUSR1 renews
  (unicast REQUEST, RENEWING), SIGUSR2 releases.
- dhcpcd: keeps its pid file, control socket, lease and DUID in /run/dhcpcd and /var/lib/dhcpcd
  under the interface name, and every VM has eth0: both are bind-mounted from the state dir in the
  private mount namespace. Its hooks rewrite resolv.conf and the hostname, so `-c` names a script
  that only records events. It ARP-probes an offered address (RFC 5227) before using it: expect
  5-9 s to a lease. SIGUSR1 renews, SIGALRM releases and exits (dhcpcd(8) -N and -k send the same
  over a control socket that lives in the private mount namespace).

As a second guard, /etc/resolv.conf and /etc/hostname are bind-mounted from per-VM copies, and the
private UTS namespace keeps `hostname` calls away from the host.

Every script appends "<reason> <address>" to the state dir's `events` file; the drivers wait on
that file and on the kernel's view of eth0, never on fixed sleeps.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import ClassVar, TypeVar

from cocoon_net.errors import HostSetupError, UsageError
from cocoon_net.sandbox.topology import Sandbox, Vm, ipv4_addresses

T = TypeVar("T")

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
POLL_S = 0.05
GUARDED_HOST_FILES = ("/etc/resolv.conf", "/etc/hostname")

# Shared by the dhclient and udhcpc scripts: put the address on the interface unless it is already
# there (renewals must not flap it), replacing any other, then point the default route at router.
# `ip` takes the prefix either as a length (udhcpc) or as a dotted mask (dhclient).
_SH_CONFIGURE = """\
configure() {
    if ! ip -4 -o addr show dev "$interface" | grep -q " inet $1/"; then
        ip -4 addr flush dev "$interface"
        ip addr add "$1/$2" dev "$interface"
    fi
    [ -z "$3" ] || ip route replace default via "$3" dev "$interface"
}
"""

_SH_HEADER = "#!/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n"


class DhcpClient(ABC):
    """One client process on one VM's eth0; start() again after stop() or release()."""

    program: ClassVar[str]
    # Script events after which the client holds a configured lease.
    bound_events: ClassVar[frozenset[str]]

    def __init__(
        self, sandbox: Sandbox, vm: Vm, *, hostname: str | None = None, timeout: float = 30.0
    ) -> None:
        if hostname is not None and not HOSTNAME_RE.match(hostname):
            raise UsageError(f"invalid hostname {hostname!r}: letters, digits, '-' and '.' only")
        self.sandbox = sandbox
        self.vm = vm
        self.hostname = hostname
        self.timeout = timeout
        self.statedir = vm.statedir / self.program
        self.statedir.mkdir(mode=0o755, exist_ok=True)
        self.events_file = self.statedir / "events"
        self.log_file = self.statedir / "log"
        self.script = self.statedir / "script"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what differs per client -------------------------------------------------------------

    @abstractmethod
    def _script_body(self) -> str:
        """Shell run by the client on each event; must append '<reason> <address>' to events."""

    @abstractmethod
    def _argv(self) -> list[str]:
        """The client in the foreground on the VM's interface."""

    def _binds(self) -> list[tuple[Path, str]]:
        """(state-dir path, host path) pairs bind-mounted in the client's mount namespace."""
        return []

    @abstractmethod
    def _send_renew(self) -> None: ...

    @abstractmethod
    def _send_release(self) -> None: ...

    # -- the common driver -------------------------------------------------------------------

    def start(self) -> IPv4Address:
        """Launch the client and wait until it reports a lease and eth0 carries the address."""
        if self.running:
            raise UsageError(f"{self.program} already runs in {self.vm.netns}")
        self.script.write_text(
            _SH_HEADER + f"EVENTS={shlex.quote(str(self.events_file))}\n" + self._script_body()
        )
        self.script.chmod(0o755)
        seen = len(self.events())
        self._launch()
        try:
            return self._wait_bound(seen, "a lease")
        except HostSetupError:
            self.stop()  # a later start() begins from scratch
            raise

    def renew(self) -> IPv4Address:
        """Make the client renew its lease now; return the address it holds afterwards."""
        self._require_running()
        seen = len(self.events())
        self._send_renew()
        return self._wait_bound(seen, "a renewed lease")

    def release(self) -> None:
        """Send a DHCPRELEASE and stop; eth0 has no address afterwards."""
        self._require_running()
        self._send_release()
        self._wait(lambda: not self.running or None, "the client to exit after its release")
        self._wait(lambda: self.ip() is None or None, "eth0 to lose its address")

    def stop(self) -> None:
        """Stop without releasing, as when a VM dies; the server still holds the lease."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def ip(self) -> IPv4Address | None:
        """The address on the VM's interface now, as the kernel has it."""
        addrs = ipv4_addresses(self.vm.netns, self.vm.ifname)
        return addrs[0].ip if addrs else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def events(self) -> list[tuple[str, str]]:
        """(reason, address) for every script run so far, oldest first."""
        try:
            lines = self.events_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        rows = [line.split(maxsplit=1) for line in lines if line.strip()]
        return [(row[0], row[1] if len(row) > 1 else "") for row in rows]

    def _launch(self) -> None:
        with self.log_file.open("ab") as log:
            self._proc = self.sandbox.popen(
                self.vm.netns, self._jailed(self._argv()), stdout=log, stderr=subprocess.STDOUT
            )

    def _jailed(self, argv: Sequence[str]) -> list[str]:
        """argv in private mount and UTS namespaces with the guard and client bind mounts."""
        binds = list(self._binds())
        for host_file in GUARDED_HOST_FILES:
            if Path(host_file).exists():
                copy = self.vm.statedir / Path(host_file).name
                if not copy.exists():
                    copy.write_text("")
                binds.append((copy, host_file))
        mounts = "".join(
            f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)} && " for src, dst in binds
        )
        return [
            "unshare", "--mount", "--uts", "--propagation", "private", "--",
            "sh", "-c", f'{mounts}exec "$@"', "sh", *argv,
        ]  # fmt: skip

    def _signal(self, signum: signal.Signals) -> None:
        # The jail execs the client, so the pid we started is the client's own.
        assert self._proc is not None
        self._proc.send_signal(signum)

    def _require_running(self) -> None:
        if not self.running:
            raise UsageError(f"{self.program} is not running in {self.vm.netns}")

    def _wait_bound(self, seen: int, what: str) -> IPv4Address:
        def bound() -> IPv4Address | None:
            fresh = [addr for reason, addr in self.events()[seen:] if reason in self.bound_events]
            if fresh and self.ip() == IPv4Address(fresh[-1]):
                return IPv4Address(fresh[-1])
            if not self.running:
                raise self._failure(f"exited ({self._returncode()}) before {what}")
            return None

        return self._wait(bound, what)

    def _wait(self, probe: Callable[[], T | None], what: str) -> T:
        deadline = time.monotonic() + self.timeout
        while (result := probe()) is None:
            if time.monotonic() > deadline:
                raise self._failure(f"timed out after {self.timeout:g} s waiting for {what}")
            time.sleep(POLL_S)
        return result

    def _returncode(self) -> str:
        code = self._proc.returncode if self._proc else None
        return f"exit status {code}"

    def _failure(self, what: str) -> HostSetupError:
        try:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-1:]
        except FileNotFoundError:
            tail = []
        last = f" (last output: {tail[0]})" if tail else ""
        return HostSetupError(f"{self.program} in {self.vm.netns}: {what}{last}")


class Dhclient(DhcpClient):
    program = "dhclient"
    bound_events = frozenset({"BOUND", "RENEW", "REBIND", "REBOOT"})

    def _script_body(self) -> str:
        return (
            _SH_CONFIGURE
            + """\
case "$reason" in
PREINIT) ip link set dev "$interface" up ;;
BOUND|RENEW|REBIND|REBOOT) configure "$new_ip_address" "$new_subnet_mask" "${new_routers%% *}" ;;
EXPIRE|FAIL|RELEASE) ip -4 addr flush dev "$interface" ;;
# An old lease from the lease file is not proof the address is still ours: do not use it.
TIMEOUT) echo "$reason" >> "$EVENTS"; exit 1 ;;
esac
echo "$reason ${new_ip_address:-}" >> "$EVENTS"
"""
        )

    def _files(self) -> list[str]:
        conf = self.statedir / "dhclient.conf"
        # Retry fast: the defaults wait 10 s before a second DISCOVER and 5 min after a failure.
        lines = ["initial-interval 1;", "backoff-cutoff 2;", "retry 2;"]
        if self.hostname:
            lines.append(f'send host-name "{self.hostname}";')
        conf.write_text("\n".join(lines) + "\n")
        return [
            "-cf", str(conf),
            "-lf", str(self.statedir / "dhclient.leases"),
            "-pf", str(self.statedir / "dhclient.pid"),
            "-sf", str(self.script),
        ]  # fmt: skip

    def _argv(self) -> list[str]:
        return ["dhclient", "-4", "-d", *self._files(), self.vm.ifname]

    def _send_renew(self) -> None:
        self.stop()
        self._launch()

    def _send_release(self) -> None:
        # `dhclient -r` stops the running instance through the pid file, then releases its lease.
        self.sandbox.run(
            self.vm.netns, self._jailed(["dhclient", "-4", "-r", *self._files(), self.vm.ifname])
        )


class Udhcpc(DhcpClient):
    program = "udhcpc"
    bound_events = frozenset({"bound", "renew"})

    def _script_body(self) -> str:
        return (
            _SH_CONFIGURE
            + """\
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set dev "$interface" up ;;
bound|renew) configure "$ip" "$mask" "${router%% *}" ;;
esac
echo "$1 ${ip:-}" >> "$EVENTS"
"""
        )

    def _argv(self) -> list[str]:
        # Busybox alone is enough; Debian's udhcpc package only adds the default script.
        hostname = ["-x", f"hostname:{self.hostname}"] if self.hostname else []
        return [
            "busybox", "udhcpc", "-f", "-i", self.vm.ifname, "-s", str(self.script),
            "-p", str(self.statedir / "udhcpc.pid"), "-t", "5", "-T", "1", "-A", "1", *hostname,
        ]  # fmt: skip

    def _send_renew(self) -> None:
        self._signal(signal.SIGUSR1)

    def _send_release(self) -> None:
        seen = len(self.events())
        self._signal(signal.SIGUSR2)
        # udhcpc stays up after releasing (it runs "deconfig" and idles), so stop it afterwards.
        self._wait(
            lambda: any(r == "deconfig" for r, _ in self.events()[seen:]) or None,
            "deconfig after its release",
        )
        self.stop()


class Dhcpcd(DhcpClient):
    program = "dhcpcd"
    bound_events = frozenset({"BOUND", "RENEW", "REBIND", "REBOOT"})

    def _script_body(self) -> str:
        return 'echo "$reason ${new_ip_address:-}" >> "$EVENTS"\n'

    def _binds(self) -> list[tuple[Path, str]]:
        run, lib = self.statedir / "run", self.statedir / "lib"
        for path in (run, lib):
            path.mkdir(mode=0o755, exist_ok=True)
        # /run/dhcpcd need not exist on the host, so the whole of /run is replaced.
        return [(run, "/run"), (lib, "/var/lib/dhcpcd")]

    def _argv(self) -> list[str]:
        conf = self.statedir / "dhcpcd.conf"
        # persistent: stop() leaves the address in place, as the other two clients do.
        conf.write_text("persistent\n")
        hostname = ["-h", self.hostname] if self.hostname else []
        # -L: no IPv4LL fallback address; -B: stay in the foreground so we own the process.
        return [
            "dhcpcd", "-4", "-B", "-L", "-f", str(conf), "-c", str(self.script), *hostname,
            self.vm.ifname,
        ]  # fmt: skip

    def _send_renew(self) -> None:
        self._signal(signal.SIGUSR1)

    def _send_release(self) -> None:
        self._signal(signal.SIGALRM)


CLIENTS: dict[str, type[DhcpClient]] = {c.program: c for c in (Dhclient, Udhcpc, Dhcpcd)}

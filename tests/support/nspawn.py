"""A Debian root booted with systemd as PID 1 (systemd-nspawn) inside a test's namespace.

The root is built once with debootstrap from Debian's package registry and cached outside the
repository (`$XDG_CACHE_HOME/cocoon-net-tests`, else `~/.cache/...`); each test boots its own
copy, so nothing a test does reaches the cache. The container shares the network namespace the
test names (`--network-namespace-path`) and is entered with nsenter on its PID 1, with an
environment of its own (nothing of the caller's, pip's settings included, leaks in).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd as init, and what an installed cocoon-net runs (scripts/system-deps --product);
# procps gives the unit's `kill`. The container cannot reach a package registry, so the
# install finds these present, as on a host that has them.
PACKAGES: tuple[str, ...] = ("systemd", "systemd-sysv", "dbus", "procps", "python3")
PACKAGES += ("python3-venv", "iproute2", "iptables", "nftables")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 90.0
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter")


def cannot_run() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/system-deps installs them)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system at /sys/fs/cgroup"
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cocoon-net-tests"


def debian_root(extra: Sequence[str] = ()) -> Path:
    """The cached root, built on first use (about a minute); one builder at a time."""
    packages = sorted({*PACKAGES, *extra})
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(packages)}".encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"debian-{SUITE}-{key}"
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "etc" / "os-release").exists():
            return root
        building = cache / f"{root.name}.partial"
        shutil.rmtree(building, ignore_errors=True)
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
             str(building), MIRROR],
            capture_output=True, text=True, check=False, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-10:] + result.stderr.splitlines()[-10:])
            raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{tail}")
        building.rename(root)
        return root


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str
    readonly: bool = True

    def flag(self) -> str:
        return f"--bind{'-ro' if self.readonly else ''}={self.source}:{self.target}"


class Container:
    """Boot a copy of a root in a network namespace; stop and remove it on exit."""

    def __init__(self, root: Path, workdir: Path, netns: str, binds: Sequence[Bind] = ()):
        self.workdir = workdir
        self.dir = workdir / "root"
        self.netns = netns
        self.binds = tuple(binds)
        self.console = workdir / "console.log"
        self._source = root
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def __enter__(self) -> Container:
        subprocess.run(["cp", "-a", "--reflink=auto", str(self._source), str(self.dir)], check=True)
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> None:
        for bind in self.binds:
            (self.dir / bind.target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        with self.console.open("ab") as console:
            self._nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                 "--console=read-only", "-D", str(self.dir), "-b",
                 f"--network-namespace-path=/run/netns/{self.netns}",
                 # nspawn grants CAP_NET_ADMIN only in a namespace it made itself.
                 "--capability=CAP_NET_ADMIN",
                 *(bind.flag() for bind in self.binds)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                # The namespace is the container's own: its /proc/sys/net writable, as a
                # host's is (read-only otherwise, as for CAP_NET_ADMIN).
                env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"},
            )  # fmt: skip
        self.pid1 = self._wait_pid1()
        deadline = time.monotonic() + BOOT_TIMEOUT
        # "offline" until PID 1 is systemd and listens (it starts as nspawn's own child).
        while True:
            state = self.inside("systemctl", "is-system-running", "--wait", check=False, timeout=90)
            if state.stdout.strip() in {"running", "degraded"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot: {state.stdout}{self.console_tail()}")
            time.sleep(0.2)

    def _wait_pid1(self) -> int:
        assert self._nspawn is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console_tail()}")
            for pid in _children(self._nspawn.pid):
                if _ns_pid(pid) == 1:
                    return pid
            time.sleep(0.05)
        raise RuntimeError(f"no PID 1 in the container: {self.console_tail()}")

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-20:])
        return ""

    def inside(
        self, *argv: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """argv inside the container (all its namespaces), as root with a clean environment:
        its programs are the root's (PACKAGES), not this machine's."""
        result = subprocess.run(
            self.enter(*argv), capture_output=True, text=True, check=False, timeout=timeout,
            input=stdin,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def enter(self, *argv: str) -> list[str]:
        env = ["env", "-i", f"PATH={CONTAINER_PATH}", "HOME=/root", "LANG=C.UTF-8"]
        return ["nsenter", "-t", str(self.pid1), "-a", *env, *argv]

    def close(self) -> None:
        if self._nspawn is not None and self._nspawn.poll() is None:
            # nspawn asks the container's systemd to power off on SIGTERM.
            self._nspawn.terminate()
            try:
                self._nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
        self._nspawn = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    yield int(entry.name)


def _ns_pid(pid: int) -> int | None:
    """The process's PID in its innermost PID namespace."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


@dataclass(frozen=True)
class Entry:
    kind: str  # "f", "d", "l", or "o" (anything else)
    mode: int
    owner: tuple[int, int]
    content: str  # sha256 of a file, target of a link


def snapshot(root: Path, skip: Sequence[str]) -> dict[str, Entry]:
    """Every path under root except those under skip (relative, e.g. "var/log"), with what
    it is; file contents by digest. Times are left out: they change with every boot."""
    out: dict[str, Entry] = {}
    skipped = {root / s for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skipped]
        for name in dirnames + filenames:
            path = here / name
            if path in skipped:
                continue
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = Entry("l", st.st_mode, (st.st_uid, st.st_gid), os.readlink(path))
            elif path.is_dir():
                out[rel] = Entry("d", st.st_mode, (st.st_uid, st.st_gid), "")
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = Entry("f", st.st_mode, (st.st_uid, st.st_gid), digest)
            else:
                out[rel] = Entry("o", st.st_mode, (st.st_uid, st.st_gid), "")
    return out


def differences(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    lines = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"- {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"~ {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines

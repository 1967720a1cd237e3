"""Throw-away network namespaces for tests (the CNI plugins' testutils.NewNS, in Python).

Every namespace gets a random `cnt-` name, is deleted when the test ends, and is the only
place a test changes links, addresses, routes or firewall rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000


@dataclass
class Netns:
    name: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self, *argv: str, check: bool = True, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def sh(self, script: str, *, check: bool = True) -> str:
        return self.run("sh", "-c", script, check=check).stdout

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen([*self.prefix, *argv], **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def ip(self, *argv: str, check: bool = True) -> str:
        return subprocess.run(
            ["ip", "-n", self.name, *argv], capture_output=True, text=True, check=check
        ).stdout

    def iptables_save(self) -> str:
        """iptables-save without comments and counters, and without tables that hold nothing.

        With the nf_tables backend a table stays once any rule was added, even after every
        rule and chain of ours is gone; an empty table with ACCEPT policies filters nothing,
        so it counts as absent.
        """
        out = self.run("iptables-save").stdout
        lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in out.splitlines()]
        kept: list[str] = []
        table: list[str] = []
        for line in lines:
            if line.startswith("#"):
                continue
            table.append(line)
            if line == "COMMIT":
                empty = all(
                    entry.startswith("*") or entry == "COMMIT" or entry.endswith(" ACCEPT")
                    for entry in table
                ) and not any(entry.startswith("-A") for entry in table)
                if not empty:
                    kept += table
                table = []
        return "\n".join(kept + table)

    def sysctl(self, key: str) -> str:
        return self.run("cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) in a forked child that has joined this namespace.

        The child uses cocoon_net.netns.enter, the same code path as the CLI's --netns, and
        sends back the return value or the exception (both pickled).
        """
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            try:
                from cocoon_net import netns as netns_mod

                netns_mod.enter(self.name)
                result: tuple[bool, Any] = (True, fn(*args, **kwargs))
            except BaseException as exc:
                result = (False, exc)
            try:
                payload = pickle.dumps(result)
            except Exception as exc:
                payload = pickle.dumps((False, RuntimeError(f"unpicklable result: {exc!r}")))
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as inp:
            data = inp.read()
        os.waitpid(pid, 0)
        ok, value = pickle.loads(data)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def new_name(tag: str = "") -> str:
    return f"cnt-{tag}{secrets.token_hex(3)}"[:15]


@contextlib.contextmanager
def netns(tag: str = "") -> Iterator[Netns]:
    ns = Netns(new_name(tag))
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        ns.ip("link", "set", "lo", "up")
        # IPv6 link-local addresses and routes appear a moment after a link comes up, which
        # would make before/after snapshots of a namespace differ for no reason of ours.
        for scope in ("all", "default"):
            ns.run("sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{scope}/disable_ipv6")
        yield ns
    finally:
        ns.close()


def link_pair(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth pair with one end in each namespace, both up.

    Made inside `a` with its peer created directly in `b`: no link ever exists, not even
    for a moment, in the namespace the tests run in.
    """
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


@contextlib.contextmanager
def joined(ns: Netns) -> Iterator[None]:
    """Move the calling thread into ns, and back when the block ends.

    For code under test that reads or changes the kernel itself (no --netns to pass): it
    runs in the namespace, and so do the sockets it opens and the commands it starts.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns.name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                # Carrying on in the wrong namespace would make every later test lie.
                os.write(2, f"cannot return from namespace {ns.name}\n".encode())
                os._exit(70)
    finally:
        os.close(home)


def is_root() -> bool:
    return os.geteuid() == 0

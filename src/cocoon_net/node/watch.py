"""Noticing that someone changed what host setup made, cheaply, so that it is made again.

The kernel tells about links, addresses and routes (rtnl.EventSocket) and about every
nftables change (RulesetEvents below: iptables-nft, `nft flush ruleset`, firewalld). It says
nothing about a sysctl written or a file replaced: HostCheck compares those few values with
ours by reading them, which costs a handful of small file reads. The repair itself is host
setup run again (hostsetup.reconcile): it changes only what differs and says what it changed.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from cocoon_net.node import cni, sysctl
from cocoon_net.node.nft import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
)
from cocoon_net.node.rtnl import _messages, quiet_sender

NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN = 15
# Set elements change with every lease (the VM guard): those are the daemon's own, and the
# guard checks its tables itself. A generation message follows every transaction.
_QUIET = frozenset(
    (NFNL_SUBSYS_NFTABLES << 8) | kind
    for kind in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN)
)


class RulesetEvents:
    """nftables change notifications (iptables-nft included); legacy iptables sends none, so
    the periodic reconcile stays the backstop. Those caused by the socket `quiet` (the guard's
    element writer: one transaction per grant) are dropped by the kernel."""

    def __init__(self, quiet: int | None = None) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if quiet is not None:
            quiet_sender(self._sock, quiet)
        self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Whether a table, chain or rule changed since the last call (an overrun counts)."""
        changed = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                changed = True
                continue
            changed = changed or any(kind not in _QUIET for kind, _seq, _body in _messages(data))

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class HostCheck:
    """The values host setup wrote that no kernel event reports: sysctls and the conflist."""

    sysctls: tuple[sysctl.Setting, ...]
    conflist: Path
    conflist_bytes: bytes

    @classmethod
    def of(
        cls, bridge: str, primary: str | None, secondaries: tuple[str, ...], conflist: Path,
        port_isolation: bool,
    ) -> HostCheck:  # fmt: skip
        # A NIC's own setting that does not exist here is left out, as host setup leaves it.
        wanted = sysctl.desired(bridge, primary, secondaries)
        return cls(
            tuple(s for s in wanted if s.required or sysctl.read(s.key) is not None),
            conflist,
            cni.render_conflist(bridge, port_isolation),
        )

    def drift(self) -> list[str]:
        """What differs from ours, one line each; [] when all holds."""
        found = [sysctl.describe(change) for change in sysctl.plan(self.sysctls)]
        try:
            same = self.conflist.read_bytes() == self.conflist_bytes
        except OSError:
            same = False
        return found if same else [*found, f"{self.conflist} differs"]


def repair_kind(change: str) -> str:
    """The metric label of one host setup change line: bridge, sysctl, firewall or conflist."""
    if change.startswith("firewall:"):
        return "firewall"
    if change.startswith("write "):
        return "conflist"
    if change.startswith("set ") and "=" in change.split(" ", 2)[1]:
        return "sysctl"
    return "bridge"

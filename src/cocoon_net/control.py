"""The daemon's local control socket: live leases for `status`, `release` for the VM manager,
`reload` for init and adopt when they change the pool of a running daemon.

A Unix stream socket in the run directory, mode 0600 (root only). One JSON object per line in
each direction::

    -> {"cmd": "leases"}
    <- {"ok": true, "pool": {"size": 140, ...}, "leases": [{"ip": "172.20.100.7", ...}]}
    -> {"cmd": "release", "mac": "02:00:00:00:00:07"}
    <- {"ok": true, "released": ["172.20.100.7"]}
    -> {"cmd": "reload", "keep_leases": true}
    <- {"ok": true, "addresses": 140}
    -> {"cmd": "stats"}
    <- {"ok": true, "store": {"batches": 12, ...}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cocoon_net.errors import CocoonError, StateError

if TYPE_CHECKING:  # the daemon's; `status` and `release` stay quick to start
    import asyncio

    from cocoon_net.dhcp.leases import Change, LeaseTable
    from cocoon_net.dhcp.store import LeaseStore

log = logging.getLogger("cocoon_net.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on path (replacing a stale socket file) and answer requests with handler."""
    import asyncio

    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            response = await handler(request)
        except (ValueError, CocoonError) as exc:
            response = {"ok": False, "error": str(exc)}
        writer.write(json.dumps(response).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    old_umask = os.umask(0o177)  # the socket file is created 0600: root only
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old_umask)
    return server


def request(path: Path, message: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a running daemon; StateError when none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise StateError(
            f"no daemon is listening on {path} (is 'cocoon-net daemon' running?)"
        ) from None
    except OSError as exc:
        raise StateError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        response = json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        raise StateError(f"control socket {path}: unreadable answer") from None
    if not isinstance(response, dict):
        raise StateError(f"control socket {path}: unexpected answer")
    if not response.get("ok"):
        raise CocoonError(str(response.get("error", "request failed")))
    return response


# ---------------------------------------------------------------- the daemon's side


class Served(Protocol):
    """What the handlers need from the running daemon."""

    table: LeaseTable
    store: LeaseStore

    def lease_routes(self) -> set[IPv4Address]:
        """Our /32 routes on the bridge now."""
        ...

    def guarded(self) -> tuple[int, int] | None:
        """The VM guard's addresses guarded and bridge ports covered; None when it is off."""
        ...

    async def persist(self, changes: list[Change]) -> None:
        """Make changes durable and put the routes in line with them."""
        ...

    async def reload(self, *, keep_leases: bool = False) -> int:
        """Re-read pool.json and serve its pool; the number of addresses now served. With
        keep_leases, a pool that would end a lease is refused instead."""
        ...


def handler(daemon: Served) -> Handler:
    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        now = time.time()
        if cmd == "leases":
            return _leases(daemon, now)
        if cmd == "release":
            return await _release(daemon, request, now)
        if cmd == "reload":
            keep = bool(request.get("keep_leases"))
            return {"ok": True, "addresses": await daemon.reload(keep_leases=keep)}
        if cmd == "stats":
            # Group commit at work: records per fsync'ed batch (the benchmark reads it).
            return {"ok": True, "store": dataclasses.asdict(daemon.store.stats())}
        raise ValueError(f"unknown command {cmd!r}")

    return handle


def _leases(daemon: Served, now: float) -> dict[str, Any]:
    present = daemon.lease_routes()
    stats = daemon.table.stats(now)
    return {
        "ok": True,
        "pool": {
            "size": stats.total,
            "free": stats.free,
            "leased": stats.leased,
            "offered": stats.offered,
            "quarantined": stats.quarantined,
        },
        "guard": _guard_status(daemon.guarded()),
        "leases": [
            {
                "ip": str(lease.ip),
                "mac": lease.mac,
                "hostname": lease.hostname,
                "expires": lease.expires,
                "route": lease.ip in present,
            }
            for lease in daemon.table.leases(now)
        ],
    }


def _guard_status(guarded: tuple[int, int] | None) -> dict[str, Any]:
    if guarded is None:
        return {"state": "off", "guarded": 0, "ports": 0}
    return {"state": "on", "guarded": guarded[0], "ports": guarded[1]}


async def _release(daemon: Served, request: dict[str, Any], now: float) -> dict[str, Any]:
    """The VM manager deleted a VM: its address returns to the pool at once."""
    mac = str(request.get("mac") or "").lower()
    ip_text = str(request.get("ip") or "")
    released: list[str] = []
    for lease in daemon.table.leases(now):
        if (mac and lease.mac == mac) or (ip_text and str(lease.ip) == ip_text):
            await daemon.persist(daemon.table.release(lease.mac, lease.ip, now))
            released.append(str(lease.ip))
            log.info("released %s <- %s by request", lease.ip, lease.mac)
    return {"ok": True, "released": released}

"""The daemon's local control socket: live leases for `status`, `release` for the VM manager.

A Unix stream socket in the run directory, mode 0600 (root only). One JSON object per line in
each direction::

    -> {"cmd": "leases"}
    <- {"ok": true, "leases": [{"ip": "172.20.100.7", "mac": "02:00:00:00:00:07", ...}]}
    -> {"cmd": "release", "mac": "02:00:00:00:00:07"}
    <- {"ok": true, "released": ["172.20.100.7"]}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon_net.errors import CocoonError, StateError

if TYPE_CHECKING:  # asyncio is the daemon's; `status` and `release` stay quick to start
    import asyncio

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

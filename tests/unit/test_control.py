"""The control socket: root-only, one JSON request and answer per connection."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from cocoon_net import control
from cocoon_net.errors import CocoonError, StateError


async def _handler(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("cmd") == "echo":
        return {"ok": True, "echo": request.get("value")}
    raise ValueError(f"unknown command {request.get('cmd')!r}")


def test_request_answer_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    path.write_text("stale")  # a socket file left by a crash is replaced

    async def main() -> tuple[dict[str, Any], str, int]:
        server = await control.serve(path, _handler)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            answer = await asyncio.to_thread(control.request, path, {"cmd": "echo", "value": 7})
            try:
                await asyncio.to_thread(control.request, path, {"cmd": "nope"})
                error = ""
            except CocoonError as exc:
                error = str(exc)
            return answer, error, mode
        finally:
            server.close()
            await server.wait_closed()

    answer, error, mode = asyncio.run(main())
    assert answer == {"ok": True, "echo": 7}
    assert error == "unknown command 'nope'"
    assert mode == 0o600  # root only: VMs' managers and users cannot release leases


def test_no_daemon_is_a_clear_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no daemon is listening"):
        control.request(tmp_path / "control.sock", {"cmd": "leases"})

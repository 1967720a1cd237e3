"""init and adopt tell the running daemon to serve the new pool, and check its answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon_net import config, control, lifecycle, lock
from cocoon_net.errors import StateError


@pytest.fixture
def paths(tmp_path: Path) -> config.Paths:
    return config.Paths(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                        cni_conf_dir=tmp_path / "cni")  # fmt: skip


@pytest.fixture
def serving(paths: config.Paths) -> Iterator[list[int]]:
    """A daemon stand-in: holds the daemon lock, answers `reload` with the size in the list."""
    size = [0]
    loop = asyncio.new_event_loop()

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        assert request == {"cmd": "reload"}
        return {"ok": True, "addresses": size[0]}

    async def main() -> asyncio.AbstractServer:
        return await control.serve(paths.control_socket, handle)

    async def close(server: asyncio.AbstractServer) -> None:
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(main(), loop).result(10)
    try:
        with lock.StateLock(paths.daemon_lock, "daemon"):
            yield size
    finally:
        asyncio.run_coroutine_threadsafe(close(server), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_the_daemons_answer_is_the_last_line(paths: config.Paths, serving: list[int]) -> None:
    serving[0] = 4
    assert lifecycle._tell_daemon(paths, 4) == "daemon now serves 4 addresses"


def test_a_daemon_serving_another_size_is_an_error(paths: config.Paths, serving: list[int]) -> None:
    serving[0] = 3
    with pytest.raises(StateError, match=r"pool\.json lists 4 addresses, but the daemon serves 3"):
        lifecycle._tell_daemon(paths, 4)


def test_no_daemon_any_more_is_said_not_waited_for(paths: config.Paths) -> None:
    line = lifecycle._tell_daemon(paths, 4)
    assert line == "no daemon runs now: it serves 4 addresses when it starts"

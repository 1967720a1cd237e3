"""Cloud emulators for tests: real HTTP servers on 127.0.0.1 in a thread, with fault injection.

An emulator is a function from Request to Reply run by EmulatorServer. Faults are queued on
the server and consumed by the requests they match, before the emulator sees them:

    server.inject(Fault(status=503), method="PATCH", path="/subnetworks/")  # next PATCH fails
    server.inject(Fault(delay=1.0))  # the next request is answered late (a client timeout)

A delayed fault still lets the emulator apply the request afterwards, like a cloud that did the
work but answered too late; `drop=True` answers nothing at all (the connection is closed).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

T = TypeVar("T")


def in_netns(netns: str | None, make: Callable[[], T]) -> T:
    """make() in a thread that joined network namespace netns, so the sockets it creates
    live there (a listening socket keeps its namespace whatever thread serves it). The
    thread ends, and with it the switch: the test process itself never moves."""
    if not netns:
        return make()
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            from cocoon_net import netns as netns_mod

            netns_mod.enter(netns)
            box.append(make())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # keys lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # bytes/str sent as-is, anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain"
        if self.body is None:
            return b"", "text/plain"
        return json.dumps(self.body).encode(), "application/json"


@dataclass
class Fault:
    """What to do to the next `count` matching requests instead of (or before) answering."""

    status: int | None = None  # answer this status with `body` and skip the emulator
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # sleep first (longer than the client's timeout = a timeout)
    drop: bool = False  # close the connection without an answer
    count: int = 1
    method: str = ""  # match: empty = any
    path: str = ""  # match: a substring of the path


Handler = Callable[[Request], Reply]


class EmulatorServer:
    def __init__(self, handler: Handler, *, netns: str | None = None) -> None:
        """Listen on 127.0.0.1:0, inside network namespace netns when given."""
        self.handler = handler
        self.log: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        handler_class = self._make_handler_class()
        self._httpd = in_netns(netns, lambda: ThreadingHTTPServer(("127.0.0.1", 0), handler_class))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> EmulatorServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.count for f in self._faults)

    def _take_fault(self, req: Request) -> Fault | None:
        with self._lock:
            self.log.append(req)
            for fault in self._faults:
                if fault.method and fault.method != req.method:
                    continue
                if fault.path and fault.path not in req.path:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _make_handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                fault = server._take_fault(req)
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.drop:
                    self.close_connection = True
                    return
                if fault is not None and fault.status is not None:
                    reply = Reply(fault.status, fault.body, dict(fault.headers))
                else:
                    reply = server.handler(req)
                data, ctype = reply.encoded()
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": ctype, **reply.headers}
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timed out)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        return _Handler


@contextmanager
def serve(handler: Handler) -> Iterator[EmulatorServer]:
    server = EmulatorServer(handler).start()
    try:
        yield server
    finally:
        server.stop()

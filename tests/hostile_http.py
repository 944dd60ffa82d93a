"""A hostile image host for fetch tests: an http.server on a loopback address, in a thread.

Each route is a function of the handler; `hits` records every request (path and Host header),
so a test can prove that a refused destination was never contacted.
"""

from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import Image

SECRET = "TOPSECRET-9f2c41-internal-admin-token"
SECRET_TYPE = "application/x-secret-type-7b1e"

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class HostileServer:
    base: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    hits: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)


def png_bytes(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def body(data: bytes, content_type: str = "image/png", status: int = 200, reason: str | None = None) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status, reason)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def hang(seconds: float) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)  # then answer nothing: the client must have given up long before

    return route


@contextmanager
def hostile_server(address: str = "127.0.0.1") -> Iterator[HostileServer]:
    state = HostileServer(base="", port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.hits.append((self.path, self.headers.get("Host", "")))
            route = state.routes.get(self.path, body(b"missing", "text/plain", 404))
            try:
                route(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: that is the limit under test at work

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    state.base = f"http://{address}:{state.port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


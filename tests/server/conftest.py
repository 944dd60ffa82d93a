"""A real nvlm-serve on a loopback port, around the session's tiny engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from nvlm_server import ServerImagePolicy, ServerSettings, create_app


@contextmanager
def running_server(engine, settings: ServerSettings) -> Iterator[str]:
    config = uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server_url(tiny_engine) -> Iterator[str]:
    settings = ServerSettings(model_name="nvlm-tiny", max_body_bytes=2 * 2**20, max_batch_size=16,
                              images=ServerImagePolicy(max_images=2))
    with running_server(tiny_engine, settings) as url:
        yield url

"""An oracle OpenAI-compatible server for the evaluation tests: an http.server in a thread.

It answers each chat request by finding which fixture question the user turn holds and
returning that question's gold answer (or, in "wrong" mode, an answer no scorer accepts).
Scoring 100% with it proves the harness -> prompt -> answer -> parser -> metric chain; scoring 0
in wrong mode proves the metric can fail. Every request body is kept for assertions on what the
harnesses send (system turn, image data URLs, a trailing assistant message, stop, seed).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

WRONG = "zzqx-not-it"


@dataclass
class OracleServer:
    url: str
    answers: Mapping[str, str]  # question text -> gold answer
    wrong: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reply(self, body: dict[str, Any]) -> str:
        text = "\n".join(_texts(m) for m in body["messages"] if m["role"] == "user")
        matches = [q for q in self.answers if q in text]
        if not matches:
            return "no fixture question in this request"
        gold = self.answers[max(matches, key=len)]
        return WRONG if self.wrong else gold


def _texts(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


@contextmanager
def oracle_server(answers: Mapping[str, str], *, wrong: bool = False, model: str = "oracle-model",
                  max_tiles: int = 6) -> Iterator[OracleServer]:
    """Runs the oracle on a loopback port until the block ends."""
    state = OracleServer("", dict(answers), wrong)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                self._send(404, {"error": {"message": "not found"}})
                return
            self._send(200, {"object": "list", "data": [{"id": model, "object": "model", "max_tiles": max_tiles}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(body)
            content = state.reply(body)
            self._send(200, {
                "id": "chatcmpl-oracle", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

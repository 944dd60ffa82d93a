"""The server's edge: who may call, how many body bytes are read, what counts as a JSON body.

`Guard` is a pure ASGI middleware in front of every route. It checks the bearer token on the raw
header bytes, counts body bytes as they arrive (a chunked upload has no Content-Length to trust),
and turns anything a route leaves unhandled into a 500 JSON error without details. It is not a
Starlette `BaseHTTPMiddleware` (`@app.middleware("http")`): that one hands routes a receive channel
that never reports `http.disconnect`, so a non-streaming request could not notice its client had
gone and decoded on for nobody.

`parse_json_body` reads a request body as strict JSON (RFC 8259 UTF-8, I-JSON's RFC 7493 rules:
no lone surrogates, finite numbers), bounded in depth, so that bad text is a 400 here rather than
a crash in the tokenizer or the grammar compiler later.

The module knows nothing of chat completions, the engine or the scheduler.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .schemas import error_body

logger = logging.getLogger(__name__)

MAX_JSON_DEPTH = 64
"""Nesting allowed in a request body; tool and response schemas need a dozen levels at most."""

_TOKEN = re.compile(r"[\x21-\x7e]+")  # RFC 6750 bearer tokens are visible ASCII, no spaces
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_api_key(api_key: str) -> None:
    """Raise ValueError unless `api_key` is something a client can send as `Authorization: Bearer <key>`."""
    if not _TOKEN.fullmatch(api_key):
        what = "empty" if not api_key else f"{len(api_key)} characters, not all visible ASCII"
        raise ValueError(f"api_key must be a non-empty token of visible ASCII characters without spaces (got {what}); "
                         "leave it unset to serve without a key")


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: API key, body size limit, last line of defence.

    Args:
        app: the application behind the guard.
        api_key: when set, every path except `public_paths` needs `Authorization: Bearer <api_key>`
            (the OpenAPI schema and unknown paths included: nothing is told to a caller without it).
        max_body_bytes: a body declared or counted larger than this gets 413 and is not read further.
        public_paths: paths served without a key (the load balancer's health check).
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 public_paths: frozenset[str] = frozenset({"/health"})) -> None:
        if api_key is not None:
            check_api_key(api_key)
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.public_paths = public_paths
        self._key = api_key.encode("ascii") if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websockets
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # lower-cased names, raw value bytes
        # 1. who is calling: before anything else is looked at
        if self._key is not None and scope["path"] not in self.public_paths and not self._authorized(headers):
            await _reply(scope, receive, send, 401, "missing or wrong API key (send Authorization: Bearer <key>)",
                         "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"})
            return
        # 2. how big the body says it is
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await _reply(scope, receive, send, 400, "Content-Length is not a number", code="invalid_request")
            return
        if length is not None and int(length) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        # 3. how big it is: counted as it arrives, never buffered past the limit
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)
        except Exception:  # last line of defence: log it, never show it
            logger.exception("unhandled error")
            if not started:  # once a response has started, the connection just ends
                await _reply(scope, receive, send, 500, "internal server error", "server_error")

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key is not None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # bytes on both sides: any header bytes compare safely (str compare_digest refuses non-ASCII)
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # close the connection: the rest of the body is never read, so the connection cannot be reused
        await _reply(scope, receive, send, 413, f"request body larger than {self.max_body_bytes} bytes",
                     code="request_too_large", headers={"connection": "close"})


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(error_body(message, kind=kind, code=code), status_code=status, headers=headers)
    await response(scope, receive, send)


class BodyError(ValueError):
    """A request body that is not strict JSON; the message says why, for a 400.

    Attributes:
        code: "invalid_json" when the text is not JSON at all; "invalid_request" when a value in it
            is not allowed (then `param` is its path, as a validation error names a field).
        param: the path of the offending value, e.g. "messages.0.content", or None.
    """

    def __init__(self, message: str, *, code: str = "invalid_json", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def parse_json_body(body: bytes) -> Any:
    """The body as a JSON value: UTF-8, finite numbers, no lone surrogates, at most `MAX_JSON_DEPTH` deep.

    Raises:
        BodyError: the body breaks one of these rules (the message names which, and where).
    """
    try:
        text = body.decode("utf-8")  # strict: also refuses surrogates written as raw bytes
    except UnicodeDecodeError as e:
        raise BodyError(f"request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r}); "
                        "send JSON encoded as UTF-8") from e
    try:
        value = json.loads(text.removeprefix("\ufeff"))  # NaN, Infinity, 1e999: floats, refused by _check_tree
    except json.JSONDecodeError as e:
        raise BodyError(f"request body is not valid JSON: {e.msg} at position {e.pos}") from e
    except RecursionError as e:
        raise BodyError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:  # an integer past Python's 4300-digit conversion limit
        raise BodyError("request body has a number with too many digits") from e
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Depth, finite numbers and lone surrogates (valid JSON escapes that no UTF-8 can carry), without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise BodyError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, float) and not math.isfinite(node):
            where = _where(path)
            raise BodyError(f"invalid request: {where}: numbers must be finite (NaN, Infinity and values past "
                            "1.8e308 are not JSON numbers)", code="invalid_request", param=where)
        elif isinstance(node, dict):
            for key, item in node.items():
                _check_text(key, path)
                stack.append((item, (*path, key)))
        elif isinstance(node, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(node))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if not text.isascii() and (match := _SURROGATE.search(text)):
        where = _where(path)
        raise BodyError(f"invalid request: {where}: lone UTF-16 surrogate \\u{ord(match.group()):04x} in a string; "
                        "send valid Unicode text", code="invalid_request", param=where)


def _where(path: tuple[str | int, ...]) -> str:
    # keys on the path were checked before their values, so they hold no surrogates
    return ".".join(str(p) for p in path)[:200] or "body"

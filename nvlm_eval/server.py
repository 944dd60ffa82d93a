"""The server under evaluation: its OpenAI base URL, the model it serves and its tile budget.

Read once from `GET /v1/models` before any harness starts, so a wrong URL or a stopped server
fails in a second with one line instead of after a harness has loaded its datasets. nvlm-serve
reports its tile budget (`max_tiles`, from `--max-tiles`); a server that does not (vLLM) is
taken at its word and the run notes it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ServerError

__all__ = ["ServerInfo", "api_base", "probe"]


@dataclass(frozen=True)
class ServerInfo:
    """What the harnesses need to know about the server.

    Attributes:
        base: the OpenAI base URL, ending in "/v1".
        model: the id of the first model in /v1/models.
        max_tiles: the server's tile budget per request, when it reports one.
    """

    base: str
    model: str
    max_tiles: int | None

    @property
    def chat_completions(self) -> str:
        return self.base + "/chat/completions"


def api_base(url: str) -> str:
    """The OpenAI base URL for what a user typed: "http://host:8000", ".../v1" or ".../v1/"."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServerError(f"--base-url must be an http(s) URL such as http://localhost:8000/v1, got {url!r}")
    path = parts.path.rstrip("/").removesuffix("/chat/completions")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def probe(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> ServerInfo:
    """Reads /v1/models.

    Raises:
        ServerError: the server cannot be reached, refuses the key, or answers no model list.
    """
    base = api_base(url)
    request = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read(4 * 2**20))
    except urllib.error.HTTPError as e:
        hint = " (pass --api-key or set NVLM_API_KEY)" if e.code in (401, 403) else ""
        raise ServerError(f"{base}/models answered HTTP {e.code}{hint}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"cannot reach the server at {base}: {reason}; is nvlm-serve running there?") from e
    except ValueError as e:
        raise ServerError(f"{base}/models did not answer JSON; is this an OpenAI-compatible server?") from e
    entries = body.get("data") if isinstance(body, dict) else None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict) or "id" not in entries[0]:
        raise ServerError(f"{base}/models lists no model; is this an OpenAI-compatible server?")
    tiles = entries[0].get("max_tiles")
    return ServerInfo(base=base, model=str(entries[0]["id"]), max_tiles=tiles if isinstance(tiles, int) else None)

"""nvlm_server: an OpenAI-compatible chat server for NVLM-D, sharing one loaded model among many clients.

Names are imported on first use, so `nvlm-serve --help` does not pay for FastAPI and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerSettings, create_app
    from .convert import ServerImagePolicy

__all__ = ["ServerImagePolicy", "ServerSettings", "create_app"]

_LAZY = {"ServerSettings": "app", "create_app": "app", "ServerImagePolicy": "convert"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nvlm_server' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)

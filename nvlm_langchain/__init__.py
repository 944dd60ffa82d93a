"""nvlm_langchain: NVIDIA's NVLM-D as a LangChain chat model.

    from nvlm_langchain import ChatNVLM
    llm = ChatNVLM(model="/models/NVLM-D-72B")        # loads on first use, once per process
    llm.invoke([HumanMessage([{"type": "image", "url": "file:///tmp/invoice.png"},
                              {"type": "text", "text": "What is the total?"}])])
    remote = ChatNVLM(base_url="http://gpu-host:8000/v1", model="nvidia/NVLM-D-72B")  # nvlm-serve or vLLM

`ChatNVLM` is imported on first access, so `nvlm_langchain.tools` and friends do not pay for
LangChain's chat-model machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chat_models import ChatNVLM
    from .engines import EngineSpec, clear_engines
    from .remote import RemoteError, ServerConnectionError, ServerError

__all__ = ["ChatNVLM", "EngineSpec", "RemoteError", "ServerConnectionError", "ServerError", "clear_engines"]


def __getattr__(name: str) -> Any:
    if name == "ChatNVLM":
        from .chat_models import ChatNVLM

        return ChatNVLM
    if name in ("EngineSpec", "clear_engines"):
        from . import engines

        return getattr(engines, name)
    if name in ("RemoteError", "ServerConnectionError", "ServerError"):
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'nvlm_langchain' has no attribute {name!r}")

"""nvlm_engine: run NVIDIA's NVLM-D from its published checkpoint, without remote code.

    from nvlm_engine import NVLMEngine
    engine = NVLMEngine.from_pretrained("/models/NVLM-D-72B")
    result = engine.generate([{"role": "user", "content": [
        {"type": "image", "image": "invoice.png"}, {"type": "text", "text": "What is the total?"}]}])
    print(result.text, result.finish_reason, result.usage)

Knows nothing of LangChain, HTTP or command lines.

Names are imported on first use (`NVLMEngine` pulls in torch), so `import nvlm_engine` and the
command lines' `--help` stay fast; the errors are always there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTensorError,
    ContextLengthError,
    GenerationOptionsError,
    HubDownloadError,
    HubOfflineError,
    ImageAspectRatioError,
    ImageDecodeError,
    ImageError,
    ImageSourceError,
    ImageTooLargeError,
    ImageURLRefusedError,
    LoadOptionsError,
    NVLMError,
    PromptError,
    RequestFailedError,
    SamplingError,
    TensorParallelError,
    TensorParallelOptionsError,
    UnsafeCheckpointError,
    UnsafeCheckpointPathError,
)

if TYPE_CHECKING:
    from .config import LLMConfig, NVLMConfig, VisionConfig
    from .devices import DeviceMapError
    from .engine import GenerationStream, ImagePolicy, NVLMEngine
    from .fetch import FetchPolicy
    from .generation import GenerationResult, PreparedRequest, Usage
    from .images import load_image
    from .placement import PlanError
    from .prompts import PromptDialect
    from .quantization import QuantizationError
    from .sampling import SamplingOptions, TokenConstraint
    from .tiling import TiledImage, preprocess_image

# name -> the submodule that defines it, imported when the name is first read
_LAZY = {
    "LLMConfig": "config", "NVLMConfig": "config", "VisionConfig": "config",
    "DeviceMapError": "devices",
    "GenerationStream": "engine", "ImagePolicy": "engine", "NVLMEngine": "engine",
    "FetchPolicy": "fetch",
    "GenerationResult": "generation", "PreparedRequest": "generation", "Usage": "generation",
    "load_image": "images",
    "PlanError": "placement",
    "PromptDialect": "prompts",
    "QuantizationError": "quantization",
    "SamplingOptions": "sampling", "TokenConstraint": "sampling",
    "TiledImage": "tiling", "preprocess_image": "tiling",
}

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointTensorError",
    "ContextLengthError",
    "DeviceMapError",
    "FetchPolicy",
    "GenerationOptionsError",
    "GenerationResult",
    "GenerationStream",
    "HubDownloadError",
    "HubOfflineError",
    "ImageAspectRatioError",
    "ImageDecodeError",
    "ImageError",
    "ImagePolicy",
    "ImageSourceError",
    "ImageTooLargeError",
    "ImageURLRefusedError",
    "LLMConfig",
    "LoadOptionsError",
    "NVLMConfig",
    "NVLMEngine",
    "NVLMError",
    "PlanError",
    "PreparedRequest",
    "PromptDialect",
    "PromptError",
    "QuantizationError",
    "RequestFailedError",
    "SamplingError",
    "SamplingOptions",
    "TensorParallelError",
    "TensorParallelOptionsError",
    "TiledImage",
    "TokenConstraint",
    "UnsafeCheckpointError",
    "UnsafeCheckpointPathError",
    "Usage",
    "VisionConfig",
    "load_image",
    "preprocess_image",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nvlm_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""nvlm_engine: run NVIDIA's NVLM-D from its published checkpoint, without remote code.

    from nvlm_engine import NVLMEngine
    engine = NVLMEngine.from_pretrained("/models/NVLM-D-72B")
    result = engine.generate([{"role": "user", "content": [
        {"type": "image", "image": "invoice.png"}, {"type": "text", "text": "What is the total?"}]}])
    print(result.text, result.finish_reason, result.usage)

Knows nothing of LangChain, HTTP or command lines.
"""

from .config import LLMConfig, NVLMConfig, VisionConfig
from .devices import DeviceMapError
from .engine import GenerationStream, ImagePolicy, NVLMEngine
from .errors import (
    CheckpointError,
    CheckpointTensorError,
    ContextLengthError,
    GenerationOptionsError,
    ImageAspectRatioError,
    ImageDecodeError,
    ImageError,
    ImageSourceError,
    ImageTooLargeError,
    ImageURLRefusedError,
    NVLMError,
    PromptError,
    RequestFailedError,
    SamplingError,
    UnsafeCheckpointError,
    UnsafeCheckpointPathError,
)
from .fetch import FetchPolicy
from .generation import GenerationResult, PreparedRequest, Usage
from .images import load_image
from .placement import PlanError
from .prompts import PromptDialect
from .quantization import QuantizationError
from .sampling import SamplingOptions, TokenConstraint
from .tiling import TiledImage, preprocess_image

__all__ = [
    "CheckpointError",
    "CheckpointTensorError",
    "ContextLengthError",
    "DeviceMapError",
    "FetchPolicy",
    "GenerationOptionsError",
    "GenerationResult",
    "GenerationStream",
    "ImageAspectRatioError",
    "ImageDecodeError",
    "ImageError",
    "ImagePolicy",
    "ImageSourceError",
    "ImageTooLargeError",
    "ImageURLRefusedError",
    "LLMConfig",
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
    "TiledImage",
    "TokenConstraint",
    "UnsafeCheckpointError",
    "UnsafeCheckpointPathError",
    "Usage",
    "VisionConfig",
    "load_image",
    "preprocess_image",
]

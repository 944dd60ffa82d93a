"""`NVLMEngine`: load an NVLM-D checkpoint once, answer chat requests with text and images.

The public face of the package. It owns the model, tokenizer and prompt builder, and turns
chat messages into prepared requests (images loaded and tiled, prompt ids spliced, context
checked) before any model compute; `decode_requests.decode_requests` does the rest.

Messages are `{"role": "system" | "user" | "assistant", "content": str | list[part]}` with parts
`{"type": "text", "text": ...}` and `{"type": "image", "image": <path | bytes | base64 | data URL |
PIL image | http(s) URL>}` (an OpenAI-style `{"type": "image_url", "image_url": {"url": ...}}` is
accepted too). Knows nothing of LangChain, HTTP servers or command lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import NVLMConfig
from .cores import CorePool, DecodeSettings
from .decode_requests import decode_requests
from .devices import DeviceMapLike
from .errors import ContextLengthError
from .generation import DecodeCore, Delta, GenerationResult, PreparedRequest, TokenIds
from .image_cache import image_key
from .images import load_image
from .load_progress import LoadProgress
from .loading import load_checkpoint
from .model import NVLMModel
from .prompt_messages import parse_chat_messages
from .prompts import ImageSlot, PromptBuilder, PromptDialect, PromptMessage
from .quantization import QuantizationScheme
from .sampling import DEFAULT_MAX_NEW_TOKENS, TokenConstraint, make_options
from .tiling import preprocess_image, share_tile_budget
from .tokenizer import SpecialTokens

logger = logging.getLogger(__name__)

# Characters of message text read per token of context; more is refused before tokenizing, so a
# refused request costs at most this many characters per token of tokenizing. Text averages 2-5
# characters a token (deeply indented code ~27); only long runs of spaces or dashes pass 32 (one
# Qwen2.5 token holds up to 128 spaces), and a prompt mostly made of them is refused even if it fits.
MAX_CHARS_PER_TOKEN = 32
# Text of up to this many characters per token of context is tokenized whole without a pre-check
# (~130k characters for 32k tokens: ~20 MB and a fraction of a second).
_CHEAP_CHARS_PER_TOKEN = 4

Message = Mapping[str, Any]
ProgressCallback = Callable[[Path, int, int], None]


@dataclass(frozen=True)
class ImagePolicy:
    """How images in messages are read and tiled.

    Attributes:
        max_tiles: tiles per image before the thumbnail (the checkpoint's `max_dynamic_patch`,
            6 for NVLM-D). With several images in one request each gets
            `max(1, max_tiles // n_images)`, as Megatron's evaluation did, unless a request sets
            `max_tiles` itself.
        allow_url_fetch: fetch http(s) image URLs (off by default).
        max_pixels: larger images are refused as possible decompression bombs.
    """

    max_tiles: int = 6
    allow_url_fetch: bool = False
    max_pixels: int = 64_000_000


class GenerationStream:
    """An iterator of text deltas for one request; `result` is set once it is exhausted.

    `cancel()` may be called from any thread: generation stops at the next token and the
    result's finish_reason is "cancelled".
    """

    def __init__(self, deltas: Iterator[Delta], request: PreparedRequest) -> None:
        self._deltas = deltas
        self._request = request
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        for delta in self._deltas:
            if delta.result is not None:
                self.result = delta.result
            if delta.text:
                return delta.text
        raise StopIteration

    def cancel(self) -> None:
        self._request.cancel.set()

    def close(self) -> None:
        """Stop generating and release the request's cache (also what garbage collection does)."""
        self._request.cancel.set()
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


class NVLMEngine:
    """An NVLM-D model ready to answer chat requests."""

    def __init__(
        self,
        model: NVLMModel,
        tokenizer: Any,
        *,
        context_length: int,
        dialect: PromptDialect | str = PromptDialect.REFERENCE,
        system_prompt: str | None = None,
        images: ImagePolicy | None = None,
        name: str = "nvlm-d",
        decoding: DecodeSettings | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: NVLMConfig = model.config
        self.context_length = context_length
        self.name = name
        self.images = images or ImagePolicy(max_tiles=self.config.max_dynamic_patch)
        self.prompts = PromptBuilder(
            tokenizer,
            dialect=PromptDialect(dialect),
            system_prompt=system_prompt,
            tokens_per_tile=self.config.tokens_per_tile,
        )
        special = SpecialTokens.from_tokenizer(tokenizer)
        self.token_ids = TokenIds(end=special.im_end, image=special.vision_pad, pad=special.endoftext)
        self.decoding = decoding or DecodeSettings()
        self.cores = CorePool(model, tokenizer, self.token_ids, context_length=context_length, settings=self.decoding)

    def with_dialect(self, dialect: PromptDialect | str) -> NVLMEngine:
        """A view of this engine that renders prompts in `dialect`; it shares the weights, the
        decode cores and their caches (a prompt's KV is the same whichever view prepared it)."""
        view = NVLMEngine(self.model, self.tokenizer, context_length=self.context_length, dialect=dialect,
                          system_prompt=None, images=self.images, name=self.name, decoding=self.decoding)
        view.cores = self.cores
        return view

    def new_core(self, *, max_slots: int | None = None) -> DecodeCore:
        """A decode core of its own for a long-lived owner (the scheduler's worker thread)."""
        return self.cores.new_core(max_slots=max_slots)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (nothing to do in one process).

        Afterwards a tensor-parallel engine fails every request with `TensorParallelError`;
        the workers are also stopped at interpreter exit.
        """
        link = getattr(self.model, "tp_link", None)
        if link is not None:
            link.close()

    def cache_stats(self) -> dict[str, int]:
        """Prefix-cache and image-cache counters of every core of this engine (see `CorePool.stats`)."""
        return self.cores.stats()

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        revision: str | None = None,
        download: bool = False,
        device_map: DeviceMapLike | None = "auto",
        dtype: str | torch.dtype | None = None,
        max_memory: Mapping[str | int, int | str] | None = None,
        context_length: int | None = None,
        batch_size: int = 1,
        quantization: str | QuantizationScheme | None = None,
        dialect: PromptDialect | str = PromptDialect.REFERENCE,
        system_prompt: str | None = None,
        max_tiles: int | None = None,
        allow_url_fetch: bool = False,
        allow_pickle: bool = False,
        progress: LoadProgress = None,
        decoding: DecodeSettings | None = None,
        vision_replicas: bool = False,
        tensor_parallel: int = 1,
    ) -> NVLMEngine:
        """Load a checkpoint in the published NVLM-D layout: a folder, or a Hugging Face repo id.

        Nothing from the folder is executed: `*.py` files and `auto_map` are ignored, and
        pickled weights are refused unless `allow_pickle=True`. Where each module goes is
        planned before any weight is read (`nvlm_engine.placement`), so a model that does not fit
        fails at once with a `PlanError` that says what would fit.

        Args:
            path: the checkpoint folder (config.json, safetensors shards + index, tokenizer files),
                or a Hugging Face repo id ("nvidia/NVLM-D-72B") found in the Hugging Face cache
                (`HF_HOME` / `HF_HUB_CACHE`; see `nvlm_engine.hub`). An existing folder wins.
            revision: with a repo id, the branch, tag or commit to use (default "main").
            download: with a repo id missing from the cache, download it (only the safetensors,
                JSON configs and tokenizer files: never code or pickles; resumable). Off, a
                missing id fails with the `hf download` command to run. Refused while
                HF_HUB_OFFLINE is set.
            device_map: "auto" (every visible GPU, placed by free memory; the CPU without GPUs),
                "card" (every visible GPU, split exactly as the model card's `split_model()`:
                GPU 0 counted as half a GPU, the last layer with the LM head on GPU 0), a device
                ("cpu", "cuda:1"), a list of devices (placed by the planner in that order; a
                "cpu" entry offloads the layers the GPUs cannot hold, slowly), or an explicit
                {module prefix: device} map (the model card's `split_model()` output works).
            dtype: compute dtype; None/"auto" is bfloat16 on GPU and float32 on CPU.
            max_memory: per-device budgets ({0: "70GiB", 1: "80GiB"}) instead of the free memory;
                with "auto", only the GPUs listed are used, and a "cpu" entry allows offload.
            context_length: longest prompt + answer accepted; default the checkpoint's
                `max_position_embeddings` (32,768), within which RoPE is the plain one. Each GPU
                reserves KV cache and activation memory for it.
            batch_size: sequences decoded together that memory is reserved for (larger batches
                still run when memory allows).
            quantization: None, "bnb-8bit", "bnb-4bit" (NF4) or "fp8": the decoder layers' linear
                weights only (vision tower, projector, embeddings and LM head stay in `dtype`).
                "bnb-*" need bitsandbytes (`pip install 'nvlm-langchain[quant]'`) and run on CUDA
                or, from bitsandbytes 0.50, the CPU; "fp8" needs CUDA compute capability 8.9+
                (L4/L40/RTX 40xx, H100, H200, B200).
            dialect: "reference" (the model card's chat(), the default) or "vllm".
            system_prompt: default system prompt; None keeps the dialect's default.
            max_tiles: tiles per image (1..12); default the checkpoint's `max_dynamic_patch`.
            allow_url_fetch: allow http(s) image URLs in messages.
            allow_pickle: allow pickled `.bin` weights (unsafe: unpickling can execute code).
            progress: loading progress (`nvlm_engine.load_progress`): None, the default, draws a
                tqdm bar (bytes and shards; a widget in notebooks) when stderr is a terminal and
                nothing otherwise; True always a bar; False nothing; "log" one INFO log line per
                shard; a callable is called as `progress(shard_path, shard_number, shard_count)`
                after each shard. A download shows huggingface_hub's bars unless False or "log".
            decoding: prefix and image caching, prefill chunk size, KV cache bounds, compiled
                decode steps (`DecodeSettings`); the KV cache is bounded by the memory the
                placement plan leaves unless `decoding.kv_tokens` is set.
            vision_replicas: with several GPUs, plan and load a copy of the vision tower and
                projector on each, so the tiles of a batch are encoded on all of them at once
                (costs each GPU the tower's weights, ~11 GiB in bf16 for InternViT-6B).
            tensor_parallel: split every decoder layer over this many processes (Megatron-style,
                `nvlm_engine.tensor_parallel`), one per GPU ("auto"/"cuda": cuda:0..N-1, NCCL) or
                all on the CPU ("cpu", gloo); 1, the default, is one process (the layer split).
                It must divide the query heads, KV heads and intermediate size (1/2/4/8 for
                NVLM-D-72B). On CUDA every rank is planned first (`PlanError` if one does not
                fit) and the KV cache is sized from the tightest rank. Workers are separate
                processes started here: call `close()` when done, and guard a script's entry
                point with `if __name__ == "__main__":`.

        Raises:
            CheckpointError: a missing, incomplete or mismatched checkpoint (CheckpointNotFoundError:
            not a folder and not in the Hugging Face cache; HubOfflineError / HubDownloadError: a
            download refused offline, or failed). LoadOptionsError: a `progress` of the wrong kind.
            DeviceMapError: a
            device or map that cannot be used. PlanError: the model does not fit as asked.
            QuantizationError: a quantization this machine cannot run.
            TensorParallelOptionsError: a `tensor_parallel` size or combination that cannot be used.
            TensorParallelError: a worker process failed to load its shard, or exited before
                joining the process group.
        """
        loaded = load_checkpoint(
            path, revision=revision, download=download, device_map=device_map, dtype=dtype, max_memory=max_memory,
            context_length=context_length, batch_size=batch_size, quantization=quantization,
            allow_pickle=allow_pickle, progress=progress, decoding=decoding, vision_replicas=vision_replicas,
            tensor_parallel=tensor_parallel,
        )
        images = ImagePolicy(max_tiles=max_tiles or loaded.model.config.max_dynamic_patch, allow_url_fetch=allow_url_fetch)
        return cls(loaded.model, loaded.tokenizer, context_length=loaded.context_length, dialect=dialect,
                   system_prompt=system_prompt, images=images, name=loaded.name, decoding=loaded.decoding)

    # --- requests ------------------------------------------------------------------------

    def generate(self, messages: Sequence[Message], **options: Any) -> GenerationResult:
        """Answer one conversation. Options: see `prepare()`."""
        return self.generate_batch([messages], **options)[0]

    def stream(self, messages: Sequence[Message], **options: Any) -> GenerationStream:
        """Answer one conversation as an iterator of text deltas (see `GenerationStream`)."""
        request = self.prepare(messages, **options)
        return GenerationStream(self._decode([request]), request)

    def generate_batch(self, conversations: Sequence[Sequence[Message]], **options: Any) -> list[GenerationResult]:
        """Answer several conversations together in one batch; results in input order.

        Every conversation is prepared (and checked) before any model compute, so one bad
        request fails the call before work is spent on the others.
        """
        requests = [self.prepare(messages, **options) for messages in conversations]
        return self.run(requests)

    def run(self, requests: Sequence[PreparedRequest]) -> list[GenerationResult]:
        """Decode prepared requests as one batch; results in input order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        for delta in self._decode(list(requests)):
            if delta.result is not None:
                results[delta.index] = delta.result
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def stream_batch(self, requests: Sequence[PreparedRequest]) -> Iterator[Delta]:
        """Decode prepared requests as one batch, yielding every request's deltas as they come."""
        return self._decode(list(requests))

    def _decode(self, requests: list[PreparedRequest]) -> Iterator[Delta]:
        """`decode_requests` on a core borrowed for this call (its cached prefixes stay for the next)."""
        with self.cores.borrow() as core:
            yield from decode_requests(core, requests)

    def prepare(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        max_tiles: int | None = None,
        cancel: threading.Event | None = None,
        constraint: TokenConstraint | None = None,
        continue_final_message: bool | None = None,
    ) -> PreparedRequest:
        """Load and tile images, build prompt ids and check the context, before any model compute.

        Args:
            messages: the conversation (see the module docstring).
            max_new_tokens: answer length limit (default 1024, the model card's).
            temperature: 0 (default) is greedy decoding, like the model card.
            top_p, top_k, repetition_penalty, seed: sampling controls (ignored when greedy,
                except repetition_penalty).
            stop: strings that end the answer (not included in it).
            stop_token_ids: ids that end the answer besides `<|im_end|>`.
            presence_penalty, frequency_penalty: OpenAI's penalties on tokens already
                generated, each in [-2, 2] (default 0, off; applied also when greedy).
            logprobs: record each generated token's log-probability (`GenerationResult.logprobs`,
                `Delta.logprobs`); top_logprobs (0..20, needs logprobs) adds the likeliest alternatives.
            max_tiles: tiles per image for this request (1..12).
            cancel: an event another thread may set to stop this request.
            constraint: restricts each next token (a grammar matcher, see `TokenConstraint`);
                the request ends when the constraint is done. One per request: it is stateful.
            continue_final_message: the model continues the final assistant message (the prompt
                ends with its text, turn left open) instead of answering in a new turn. None
                (default): continue exactly when the conversation ends with an assistant message,
                as OpenAI-style clients (lm-eval's chat models) send a prefix to continue.

        Raises:
            PromptError: malformed messages. ContextLengthError: prompt + max_new_tokens too long.
            ImageError: an image cannot be read. GenerationOptionsError: an option out of range.
        """
        started = time.perf_counter()
        sampling = make_options(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logprobs=logprobs, top_logprobs=top_logprobs,
        )
        turns, sources = parse_chat_messages(messages)
        # Text that cannot fit is refused before any image is read, and before it is tokenized
        # whole: the cost of the check grows with the context length, not with the text.
        self._check_text_length([p for _, parts in turns for p in parts if p is not None], sampling.max_new_tokens)
        per_image = max_tiles or share_tile_budget(self.images.max_tiles, len(sources))
        tiled = [
            preprocess_image(
                load_image(src, allow_url_fetch=self.images.allow_url_fetch, max_pixels=self.images.max_pixels),
                max_tiles=per_image,
                use_thumbnail=self.config.use_thumbnail,
            )
            for src in sources
        ]
        slots = iter([ImageSlot(t.num_tiles) for t in tiled])
        if continue_final_message is None:
            continue_final_message = bool(turns) and turns[-1][0] == "assistant"
        prompt = self.prompts.build(
            [PromptMessage(role, tuple(next(slots) if p is None else p for p in parts)) for role, parts in turns],
            add_generation_prompt=not continue_final_message, continue_final_message=continue_final_message,
        )
        if continue_final_message:
            sampling = replace(sampling, continuation=True)  # keep the continuation's leading whitespace
        total = len(prompt.token_ids) + sampling.max_new_tokens
        if total > self.context_length:
            raise ContextLengthError(
                f"The prompt has {len(prompt.token_ids)} tokens ({prompt.image_token_count} of them for "
                f"{prompt.num_images} image(s)) and max_new_tokens is {sampling.max_new_tokens}: "
                f"{total} > the context length {self.context_length}. Shorten the conversation, use fewer "
                "images or max_tiles, or lower max_new_tokens.",
                prompt_tokens=len(prompt.token_ids), max_new_tokens=sampling.max_new_tokens,
                context_length=self.context_length,
            )
        pixel_values = torch.cat([t.pixel_values for t in tiled]) if tiled else None
        return PreparedRequest(
            image_tiles=tuple(t.num_tiles for t in tiled),
            image_keys=tuple(image_key(t.pixel_values) for t in tiled),
            prompt_ids=prompt.token_ids,
            pixel_values=pixel_values,
            options=sampling,
            image_tokens=prompt.image_token_count,
            cancel=cancel or threading.Event(),
            started=started,
            preprocess_s=time.perf_counter() - started,
            constraint=constraint,
        )

    def _check_text_length(self, texts: list[str], max_new_tokens: int) -> None:
        """Refuse long text that cannot fit, at a cost bounded by the context length, not by the text."""
        chars = sum(len(text) for text in texts)
        if chars <= _CHEAP_CHARS_PER_TOKEN * self.context_length:
            return  # cheap to tokenize whole: the exact count of the prompt decides, images included
        room = max(self.context_length - max_new_tokens, 0)
        if chars > MAX_CHARS_PER_TOKEN * room:
            raise ContextLengthError(
                f"The messages' text has {chars:,} characters; this engine reads at most {MAX_CHARS_PER_TOKEN} "
                f"per token of the room the context leaves before tokenizing (context length {self.context_length} "
                f"less max_new_tokens {max_new_tokens}: {room:,} tokens, {MAX_CHARS_PER_TOKEN * room:,} characters). "
                "Shorten the conversation (runs of spaces or dashes count too), or lower max_new_tokens.",
                prompt_tokens=-(-chars // self.prompts.max_token_chars),
                max_new_tokens=max_new_tokens, context_length=self.context_length,
            )
        at_least = self.prompts.min_text_tokens(texts, room)
        if at_least > room:
            raise ContextLengthError(
                f"The messages' text ({chars:,} characters) takes at least {at_least:,} tokens and max_new_tokens "
                f"is {max_new_tokens}: more than the context length {self.context_length}. Shorten the "
                "conversation, or lower max_new_tokens.",
                prompt_tokens=at_least, max_new_tokens=max_new_tokens, context_length=self.context_length,
            )

    def count_tokens(self, messages: Sequence[Message], *, max_tiles: int | None = None) -> int:
        """Prompt tokens of a conversation, image tokens included (images are read and tiled)."""
        return len(self.prepare(messages, max_new_tokens=1, max_tiles=max_tiles).prompt_ids)

"""A tiny checkpoint split across devices gives the same logits and tokens as the unsplit model.

Without GPUs the CPU stands in for every device: `VirtualDevices` runs every op on the CPU while
tracking which device each tensor would be on. `tensor.device` reports that device, `.to()` and
`device=` arguments move tensors between devices, and an op that mixes tensors of two devices
raises the error CUDA raises ("Expected all tensors to be on the same device"), so a missing
move in the model, the KV cache or the generation loop fails here as it would on GPUs. With CUDA,
a `gpu`-marked test splits the model between `cuda:0` and the CPU for real.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch.nn.attention.bias import CausalBias
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from nvlm_engine import NVLMEngine
from nvlm_engine.devices import DeviceMapError, device_for, validate_device_map
from nvlm_engine.cores import DecodeSettings
from nvlm_engine.reference_decode import prefill
from nvlm_engine.placement import DeviceSpec, Footprint, plan_placement
from nvlm_engine.testing import build_tiny_checkpoint, tiny_config

CPU = torch.device("cpu")
from shared_paths import REAL_72B  # its tokenizer, where present

_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _vdev(t: torch.Tensor) -> torch.device:
    return getattr(t, "_vdev", CPU)


def _tag(tree: object, device: torch.device) -> object:
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            if device.type == "cpu":
                t.__dict__.pop("_vdev", None)
            else:
                t._vdev = device
    return tree


def _as_device(value: object) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)  # type: ignore[arg-type]


class VirtualDevices(TorchFunctionMode):
    """The CPU standing in for several CUDA devices (see the module docstring).

    Attributes:
        transfers: (source, target) -> number of `.to()` copies between different devices.
    """

    def __init__(self) -> None:
        super().__init__()
        self.transfers: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:  # a fresh method-wrapper each time: compare, not `is`
            return _vdev(args[0])
        if func == torch.Tensor.is_cuda.__get__:
            return _vdev(args[0]).type == "cuda"
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.pin_memory:  # page-locked host memory needs a driver; plain memory stands in
            return args[0]
        if "device" in kwargs and kwargs["device"] is not None:  # factories: torch.tensor, arange, empty...
            target = _as_device(kwargs["device"])
            kwargs["device"] = CPU
            return _tag(func(*args, **kwargs), target)
        if func is torch.Tensor.copy_:  # copies across devices are allowed, as on CUDA
            return func(*args, **kwargs)
        device = self._common_device(func, args, kwargs)
        return _tag(func(*args, **kwargs), device)

    def _move(self, func, args, kwargs):  # noqa: ANN001, ANN202
        source = args[0]
        if func is torch.Tensor.cpu:
            target, dtype = CPU, None
        elif func is torch.Tensor.cuda:
            target, dtype = torch.device("cuda", args[1] if len(args) > 1 else 0), None
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):
            target, dtype = _vdev(args[1]), args[1].dtype
        else:
            parsed, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = _vdev(source) if parsed is None else _as_device(parsed)
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", 0)
        if target == _vdev(source):
            return source.to(dtype=dtype) if dtype is not None else source
        self.transfers[(str(_vdev(source)), str(target))] += 1
        moved = source.to(dtype=dtype or source.dtype, copy=True)
        return _tag(moved, target)

    @staticmethod
    def _common_device(func, args, kwargs) -> torch.device:  # noqa: ANN001
        # A CausalBias (SDPA's lazily built causal mask) has no device of its own: SDPA makes it
        # on the query's device.
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and not isinstance(t, CausalBias)]
        if not tensors:
            return CPU
        if func in _INDEXING:
            # Index tensors may be on the CPU or on the indexed tensor's device; a value written
            # must be on that device (or a CPU scalar). Anything else is an error on CUDA.
            self_device = _vdev(args[0])
            indices = [t for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)]
            for index in indices:
                if _vdev(index) not in (CPU, self_device):
                    raise RuntimeError(
                        f"indices should be either on cpu or on the same device as the indexed tensor ({self_device}); "
                        f"got indices on {_vdev(index)} [virtual devices]"
                    )
            tensors = [args[0], *[t for t in tree_flatten(args[2:])[0] if isinstance(t, torch.Tensor)]]
        devices = {_vdev(t) for t in tensors if not (t.dim() == 0 and _vdev(t) == CPU)}
        if len(devices) > 1:
            first, second = sorted(map(str, devices))[:2]
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}! "
                f"[virtual devices, in {getattr(func, '__name__', func)}]"
            )
        return devices.pop() if devices else CPU


def place(model: torch.nn.Module, device_map: dict[str, torch.device]) -> None:
    """Put every parameter and buffer on its (virtual) device, as the loader would."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        _tag(tensor, device_for(name, device_map))


def unplace(model: torch.nn.Module) -> None:
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        _tag(tensor, CPU)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_layer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four decoder layers, so three devices each get some (tiny_checkpoint has two)."""
    tokenizer = REAL_72B if (REAL_72B / "vocab.json").is_file() else None
    folder = tmp_path_factory.mktemp("tiny-nvlm-4-layers")
    return build_tiny_checkpoint(folder, config=tiny_config(llm_layers=4), tokenizer_from=tokenizer)


@pytest.fixture(scope="module")
def engine(four_layer_checkpoint: Path) -> NVLMEngine:
    # No prefix or image caching: every run here must compute across the devices it is given,
    # not reuse what an earlier run on other devices cached.
    no_caches = DecodeSettings(prefix_caching=False, image_cache_bytes=0)
    return NVLMEngine.from_pretrained(four_layer_checkpoint, device_map="cpu", dtype="float32", decoding=no_caches)


@pytest.fixture()
def image_messages(engine: NVLMEngine) -> list[dict]:
    from PIL import Image

    image = Image.new("RGB", (600, 450), (200, 60, 30))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]


def planned_map(engine: NVLMEngine, gpus: int) -> dict[str, torch.device]:
    """The planner's map for `gpus` equal virtual GPUs (small enough that the layers spread)."""
    footprint = Footprint.from_model(engine.model, dtype=torch.float32)
    specs = [DeviceSpec(f"cuda:{i}", 2**30) for i in range(gpus)]
    plan = plan_placement(footprint, specs, context_length=2048, overhead_bytes=0, activation_bytes=0)
    return plan.device_map()


# --- the harness catches what CUDA would -------------------------------------------------


def test_virtual_devices_raise_like_cuda() -> None:
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    _tag(x, torch.device("cuda", 0))
    _tag(w, torch.device("cuda", 1))
    with VirtualDevices() as mode:
        assert x.device == torch.device("cuda", 0)
        with pytest.raises(RuntimeError, match="same device"):
            F.linear(x, w)
        moved = x.to(w.device)
        assert moved.device == torch.device("cuda", 1) and x.device == torch.device("cuda", 0)
        assert F.linear(moved, w).device == torch.device("cuda", 1)
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            w[torch.tensor([0, 1], device="cuda:0")]
        assert w[torch.tensor([0, 1])].shape == (2, 8)  # CPU indices are fine
        assert (x * torch.tensor(2.0)).device == torch.device("cuda", 0)  # CPU scalars are fine
    assert mode.transfers[("cuda:0", "cuda:1")] == 1


def test_a_decoder_layer_split_between_devices_fails(engine: NVLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control: a half-moved layer is caught by the harness and refused by the map check."""
    layer = "language_model.model.layers.1"
    device_map = {"": torch.device("cuda", 0), f"{layer}.mlp": torch.device("cuda", 1)}
    place(engine.model, device_map)
    try:
        with VirtualDevices(), pytest.raises(RuntimeError, match="same device"):
            prefill(engine.model, [engine.prepare([{"role": "user", "content": "hi"}])], engine.token_ids)
    finally:
        unplace(engine.model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, as far as the map check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    units = [layer, "language_model.model.layers.0"]
    with pytest.raises(DeviceMapError, match="splits language_model.model.layers.1"):
        validate_device_map({"": 0, f"{layer}.mlp": 1}, units)
    with pytest.raises(DeviceMapError, match="does not place 1 module"):
        validate_device_map({layer: 0}, units)
    assert validate_device_map({"": 0, layer: 1, "language_model.output": 1}, units) == {
        "": torch.device("cuda", 0), layer: torch.device("cuda", 1)}


# --- a split model equals the unsplit one ------------------------------------------------


@pytest.mark.parametrize("gpus", [2, 3])
def test_planned_split_gives_the_same_logits_and_tokens(engine: NVLMEngine, image_messages: list[dict], gpus: int) -> None:
    request = engine.prepare(image_messages, max_new_tokens=6)
    reference_logits, _, _ = prefill(engine.model, [request], engine.token_ids)
    reference = engine.generate(image_messages, max_new_tokens=6)

    device_map = planned_map(engine, gpus)
    layer_devices = {device_for(f"language_model.model.layers.{i}", device_map) for i in range(4)}
    assert len(layer_devices) == gpus  # the layers really are spread
    assert device_for("language_model.model.layers.3", device_map) == torch.device("cuda", 0)
    place(engine.model, device_map)
    try:
        with VirtualDevices() as mode:
            logits, _, _ = prefill(engine.model, [engine.prepare(image_messages, max_new_tokens=6)], engine.token_ids)
            assert logits.device == torch.device("cuda", 0)
            split = engine.generate(image_messages, max_new_tokens=6)
    finally:
        unplace(engine.model)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)
    assert split.token_ids == reference.token_ids and split.text == reference.text
    # Hidden states went out to every other device and came back for the last layer.
    for i in range(1, gpus):
        assert mode.transfers[("cuda:0", f"cuda:{i}")] > 0 or mode.transfers[(f"cuda:{i - 1}", f"cuda:{i}")] > 0
    assert mode.transfers[(f"cuda:{gpus - 1}", "cuda:0")] > 0


def test_unusual_explicit_map_still_crosses_correctly(engine: NVLMEngine, image_messages: list[dict]) -> None:
    """Rotary table, last layer and LM head off the embedding device; vision and projector apart.

    The card's code breaks on exactly these ("tensors on different devices"); the model moves
    vision features, positions, cos/sin, masks and hidden states itself, so any map works.
    """
    c = [torch.device("cuda", i) for i in range(4)]
    device_map = {
        "": c[0],
        "vision_model": c[2],
        "mlp1": c[3],
        "language_model.model.rotary_emb": c[1],
        "language_model.model.layers.0": c[1],
        "language_model.model.layers.2": c[3],
        "language_model.model.layers.3": c[2],
        "language_model.model.norm": c[1],
        "language_model.lm_head": c[3],
    }
    reference = engine.generate(image_messages, max_new_tokens=5)
    place(engine.model, device_map)
    try:
        with VirtualDevices() as mode:
            split = engine.generate(image_messages, max_new_tokens=5)
    finally:
        unplace(engine.model)
    assert split.token_ids == reference.token_ids
    assert mode.transfers[("cuda:2", "cuda:3")] > 0  # vision features to the projector
    assert mode.transfers[("cuda:3", "cuda:0")] > 0  # image tokens to the embeddings / next token back


def test_batch_with_an_early_finisher_across_devices(engine: NVLMEngine) -> None:
    short = engine.prepare([{"role": "user", "content": "Say hi."}], max_new_tokens=2)
    long = engine.prepare([{"role": "user", "content": "Tell me a long story."}], max_new_tokens=5)
    reference = engine.run([short, long])
    place(engine.model, planned_map(engine, 2))
    try:
        with VirtualDevices():
            short = engine.prepare([{"role": "user", "content": "Say hi."}], max_new_tokens=2)
            long = engine.prepare([{"role": "user", "content": "Tell me a long story."}], max_new_tokens=5)
            split = engine.run([short, long])
    finally:
        unplace(engine.model)
    assert [r.token_ids for r in split] == [r.token_ids for r in reference]


def test_continuous_batching_merge_across_devices(engine: NVLMEngine, image_messages: list[dict]) -> None:
    """A newcomer joins a running batch whose layers (and KV cache) span devices."""

    def run() -> list[list[int]]:
        first = engine.prepare(image_messages, max_new_tokens=5)
        second = engine.prepare([{"role": "user", "content": "Name three colours."}], max_new_tokens=3)
        core = engine.new_core()
        results: dict[int, list[int]] = {}
        steps = [core.admit([(0, first)]), core.step(), core.step()]  # 2 tokens: 3 to go, as many as the newcomer
        steps.append(core.admit([(1, second)]))
        while core.busy:
            steps.append(core.step())
        results.update({d.index: d.result.token_ids for deltas in steps for d in deltas if d.result is not None})
        return [results[0], results[1]]

    reference = run()
    place(engine.model, planned_map(engine, 3))
    try:
        with VirtualDevices():
            split = run()
    finally:
        unplace(engine.model)
    assert split == reference


def test_plan_map_loads_through_from_pretrained_on_the_cpu(four_layer_checkpoint: Path, engine: NVLMEngine) -> None:
    """A full explicit map (every module named, as `split_model()` writes it) loads and answers the same."""
    device_map = {unit: "cpu" for unit in planned_map(engine, 3) if unit}
    device_map["language_model.output"] = 0  # an InternLM name from the card's map: ignored, not a GPU lookup
    loaded = NVLMEngine.from_pretrained(four_layer_checkpoint, device_map=device_map, dtype="float32")
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.generate(messages, max_new_tokens=4).token_ids == engine.generate(messages, max_new_tokens=4).token_ids


# --- real devices ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_between_cuda_and_cpu_gives_the_same_greedy_tokens(four_layer_checkpoint: Path,
                                                                 image_messages: list[dict]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    whole = NVLMEngine.from_pretrained(four_layer_checkpoint, device_map="cuda:0", dtype="float32")
    split_map = {"": "cuda:0", "language_model.model.layers.1": "cpu", "language_model.model.layers.2": "cpu"}
    split = NVLMEngine.from_pretrained(four_layer_checkpoint, device_map=split_map, dtype="float32")
    a = whole.generate(image_messages, max_new_tokens=8)
    b = split.generate(image_messages, max_new_tokens=8)
    assert a.token_ids == b.token_ids
    la, _, _ = prefill(whole.model, [whole.prepare(image_messages)], whole.token_ids)
    lb, _, _ = prefill(split.model, [split.prepare(image_messages)], split.token_ids)
    torch.testing.assert_close(la.cpu(), lb.cpu(), rtol=1e-4, atol=1e-4)


def test_vision_tiles_spread_over_replicas(engine: NVLMEngine) -> None:
    """With copies of the vision tower on three GPUs, a batch's tiles run on all three and come back in order."""
    pixels = torch.randn(6, 3, 448, 448)
    reference = engine.model.encode_images(pixels)
    c = [torch.device("cuda", i) for i in range(3)]
    place(engine.model, {"": c[0]})
    ran_on: list[torch.device] = []
    try:
        with VirtualDevices() as mode:
            engine.model.replicate_vision([c[1], c[2], c[0]])  # the original's device is not copied again
            towers = engine.model.vision_towers
            assert [t[0].embeddings.patch_embedding.weight.device for t in towers] == c
            hooks = [t[0].register_forward_hook(lambda m, i, o: ran_on.append(o.device)) for t in towers]
            spread = engine.model.encode_images(pixels)
            for hook in hooks:
                hook.remove()
            assert spread.device == c[0]
    finally:
        del engine.model.vision_towers
        unplace(engine.model)
    assert sorted(ran_on, key=str) == c  # one chunk of 2 tiles per copy
    assert mode.transfers[("cuda:1", "cuda:0")] > 0 and mode.transfers[("cuda:2", "cuda:0")] > 0  # gathered home
    torch.testing.assert_close(spread, reference, rtol=0, atol=0)
    assert not any("vision_towers" in name for name, _ in engine.model.named_parameters())

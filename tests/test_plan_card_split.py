"""`--split card` is the model card's `split_model()`, exactly; the balanced plan says how it differs.

`card_split_model` below is written into this test from the model card's description (SPEC
section 8): each GPU's share is ceil(layers / (world_size - 0.5)), GPU 0 takes half of that
(rounded up), layers are dealt out in order, and the vision tower, projector, embeddings, final
norm, LM head, rotary table and the last layer are then put on GPU 0. It is compared with the
planner's card split through the command line (its table) and through the API (the device map).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nvlm_engine import devices
from nvlm_engine.cli import main
from nvlm_engine.config import NVLMConfig
from nvlm_engine.model import NVLMModel
from nvlm_engine.placement import DeviceSpec, Footprint, PlanError, layer_unit, plan_placement
from nvlm_engine.placement_card import card_layer_owners, format_counts

PINNED = ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
          "language_model.lm_head", "language_model.model.rotary_emb")


def card_split_model(world_size: int, num_layers: int = 80) -> dict[str, int]:
    """The model card's split_model(), from its description: module prefix -> GPU index."""
    device_map: dict[str, int] = {}
    per_gpu = math.ceil(num_layers / (world_size - 0.5))  # the first GPU counts as half a GPU
    shares = [per_gpu] * world_size
    shares[0] = math.ceil(shares[0] * 0.5)
    layer = 0
    for gpu, share in enumerate(shares):
        for _ in range(share):
            device_map[f"language_model.model.layers.{layer}"] = gpu
            layer += 1
    for name in PINNED:
        device_map[name] = 0
    device_map[f"language_model.model.layers.{num_layers - 1}"] = 0
    return device_map


@pytest.fixture(scope="module")
def metadata_only(tmp_path_factory: pytest.TempPathFactory, real_72b: Path) -> Path:
    folder = tmp_path_factory.mktemp("meta") / "nvlm-d-72b"
    folder.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copyfile(real_72b / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def footprint(real_72b: Path) -> Footprint:
    with torch.device("meta"):
        model = NVLMModel(NVLMConfig.from_folder(real_72b))
    return Footprint.from_model(model)


def layers_in_table(output: str) -> dict[int, list[int]]:
    """GPU index -> decoder layers, read from the plan's table ('layers 0-25, 79 (27)')."""
    found: dict[int, list[int]] = {}
    for line in output.splitlines():
        match = re.match(r"cuda:(\d+) .*layers ([\d, -]+) \((\d+)\)$", line)
        if match is None:
            continue
        layers: list[int] = []
        for run in match.group(2).split(", "):
            first, _, last = run.partition("-")
            layers.extend(range(int(first), int(last or first) + 1))
        assert len(layers) == int(match.group(3))
        found[int(match.group(1))] = layers
    return found


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_split_card_on_the_command_line_is_the_cards(metadata_only: Path, gpus: int) -> None:
    result = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", f"{gpus}xH200", "--split", "card"])
    assert result.exit_code == 0, result.output
    assert "the model card's split" in result.output.splitlines()[0]
    card = card_split_model(gpus)
    expected: dict[int, list[int]] = {}
    for layer in range(80):
        expected.setdefault(card[f"language_model.model.layers.{layer}"], []).append(layer)
    assert layers_in_table(result.output) == expected
    assert "vision_model, mlp1, embed_tokens, norm, lm_head, rotary_emb" in result.output.splitlines()[4]


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_split_card_device_map_is_the_cards(footprint: Footprint, gpus: int) -> None:
    specs = [DeviceSpec(f"cuda:{i}", 141 * 2**30, "H200") for i in range(gpus)]
    plan = plan_placement(footprint, specs, context_length=8192, split="card")
    mapping = plan.device_map()
    for prefix, gpu in card_split_model(gpus).items():
        if prefix.startswith("language_model.model.layers.") and int(prefix.rsplit(".", 1)[1]) >= 80:
            continue  # the card's loop names layers beyond the 80 that exist
        assert mapping[prefix] == torch.device("cuda", gpu), prefix
    assert plan.split == "card"


def test_the_pure_function_matches_for_any_count() -> None:
    for layers in (2, 7, 48, 80, 81):
        for gpus in range(1, 17):
            card = card_split_model(gpus, layers)
            assert card_layer_owners(layers, gpus) == [card[layer_unit(i)] for i in range(layers)], (layers, gpus)


def test_the_balanced_plan_says_how_it_differs(metadata_only: Path) -> None:
    two = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "2xH200"]).output
    assert "Split: card 28/52, this plan 27/53 layers, because the card rounds every share up" in two
    eight = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "8xH200"]).output
    assert "Split: card 7/11x6/7, this plan 5/11x5/10x2 layers" in eight
    mixed = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "H200,H100"]).output
    assert "weighs each GPU by its memory" in mixed
    card = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "2xH200", "--split", "card"]).output
    assert "Split:" not in card and "--device-map card" in card  # and the command that runs it


def test_a_card_split_that_does_not_fit_is_resources(metadata_only: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "H200,A100-80GB", "--split", "card"])
    assert result.exit_code == 5, result.output
    assert "The model card's split puts 52 decoder layers on cuda:1, which has room for 40" in result.output
    balanced = CliRunner().invoke(main, ["plan", str(metadata_only), "--gpus", "H200,A100-80GB"])
    assert balanced.exit_code == 0, balanced.output
    assert ("Split: card 28/52, this plan 40x2 layers, because the card's split does not fit these GPUs as asked; "
            "this plan weighs each GPU by its memory (the card assumes equal GPUs).\n") in balanced.output


def test_format_counts() -> None:
    assert format_counts([7, 11, 11, 11, 11, 11, 11, 7]) == "7/11x6/7"
    assert format_counts([28, 52]) == "28/52"


def test_device_map_card_in_from_pretrained_plans_the_cards_split(footprint: Footprint,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`from_pretrained(device_map="card")` goes through `resolve_placement`: checked with fake visible GPUs."""
    gpus = [DeviceSpec(f"cuda:{i}", 141 * 2**30, "H200", (9, 0)) for i in range(3)]
    monkeypatch.setattr(devices, "local_gpus", lambda max_memory=None: list(gpus))
    with torch.device("meta"):
        model = NVLMModel(footprint.config)
    placement = devices.resolve_placement("card", model, dtype="bfloat16", context_length=8192)
    assert placement.plan is not None and placement.plan.split == "card"
    card = card_split_model(3)
    for i in range(80):
        assert placement.device_map[layer_unit(i)] == torch.device("cuda", card[layer_unit(i)])
    monkeypatch.setattr(devices, "local_gpus", lambda max_memory=None: [])
    with pytest.raises(devices.DeviceMapError, match="no GPU is visible"):
        devices.resolve_placement("card", model, context_length=8192)


def test_card_split_refuses_cpu_offload(footprint: Footprint) -> None:
    specs = [DeviceSpec("cuda:0", 80 * 2**30), DeviceSpec("cpu", 256 * 2**30)]
    with pytest.raises(PlanError, match="GPUs only"):
        plan_placement(footprint, specs, context_length=8192, split="card")

"""The model card's multi-GPU split (`split_model()`), as a pure function, and how the planner's differs.

The NVLM-D model card splits the 80 decoder layers over `world_size` GPUs counting GPU 0 as half
a GPU, because it also holds the vision tower (SPEC section 8):

1. every GPU's share is `ceil(layers / (world_size - 0.5))`, rounded up;
2. GPU 0 gets half of that share, again rounded up;
3. layers are dealt out in order, GPU 0 first, each GPU taking its full share (so the last GPUs
   get what is left, possibly nothing);
4. the vision tower, the projector, the embeddings, the final norm, the LM head, the rotary table
   *and the last decoder layer* then go to GPU 0, whatever step 3 gave it.

The planner's default ("balanced", `placement.plan_placement`) starts from the same idea but
rounds each GPU's ideal share to the nearest layer, counts the last layer inside GPU 0's half
share, weighs GPUs by their memory, and never gives a GPU more layers than fit. On two equal GPUs
that is 27/53 where the card gives 28/52. `split="card"` reproduces the card exactly.
Knows no devices or sizes: counts and indices only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["card_layer_counts", "card_layer_owners", "format_counts", "split_difference"]


def card_layer_owners(num_layers: int, num_gpus: int) -> list[int]:
    """The GPU index of each decoder layer (list index = layer index), as the card's `split_model()` assigns it.

    Raises:
        ValueError: no layers or no GPU.
    """
    if num_layers < 1 or num_gpus < 1:
        raise ValueError(f"the card's split needs layers and GPUs, got {num_layers} layers and {num_gpus} GPUs")
    share = math.ceil(num_layers / (num_gpus - 0.5))  # step 1: GPU 0 counted as half a GPU
    shares = [math.ceil(share * 0.5)] + [share] * (num_gpus - 1)  # step 2
    owners: list[int] = []
    for gpu, count in enumerate(shares):  # step 3: in order, each its full share
        owners.extend([gpu] * count)
    owners = owners[:num_layers]
    owners[num_layers - 1] = 0  # step 4: the last layer joins the LM head
    return owners


def card_layer_counts(num_layers: int, num_gpus: int) -> list[int]:
    """Decoder layers per GPU under the card's split, GPU 0 first (zeros for GPUs left empty)."""
    counts = [0] * num_gpus
    for gpu in card_layer_owners(num_layers, num_gpus):
        counts[gpu] += 1
    return counts


def format_counts(counts: Sequence[int]) -> str:
    """Layers per GPU, runs shortened: [7, 11, 11, 11, 11, 11, 11, 7] -> "7/11x6/7"."""
    parts: list[str] = []
    index = 0
    while index < len(counts):
        run = 1
        while index + run < len(counts) and counts[index + run] == counts[index]:
            run += 1
        parts.append(f"{counts[index]}x{run}" if run > 1 else str(counts[index]))
        index += run
    return "/".join(parts)


def split_difference(plan_counts: Sequence[int], memories: Sequence[int], first_device_share: float,
                     card_fits: bool | None) -> str:
    """One line: the planner's layer counts against the card's for the same GPUs, and why they differ.

    Args:
        plan_counts: the plan's layers per GPU, GPU 0 first (zeros for GPUs it leaves empty).
        memories: each GPU's memory, same order.
        first_device_share: the plan's weight of GPU 0 (the card's is 0.5).
        card_fits: whether the card's split fits these GPUs as asked (None: not checked).
    """
    n, gpus = sum(plan_counts), len(plan_counts)
    card = card_layer_counts(n, gpus)
    mine = format_counts(plan_counts)
    if list(plan_counts) == card:
        return f"Split: {mine} layers, the same as the model card's split_model()."
    reasons: list[str] = []
    if card_fits is False:
        reasons.append("the card's split does not fit these GPUs as asked")
    if len(set(memories)) > 1:
        reasons.append("this plan weighs each GPU by its memory (the card assumes equal GPUs)")
    if first_device_share != 0.5:
        reasons.append(f"GPU 0 counts as {first_device_share:g} of a GPU here (the card: 0.5)")
    if not reasons:
        share = math.ceil(n / (gpus - 0.5))
        reasons.append(
            f"the card rounds every share up (ceil({n}/{gpus - 0.5:g}) = {share}, GPU 0 half of it: "
            f"{math.ceil(share * 0.5)}), adds the last layer to GPU 0 on top and leaves the last GPU the rest, while "
            "this plan rounds the ideal shares to the nearest layer with the last layer inside GPU 0's share"
        )
    tail = "" if card_fits is False else " --split card uses the card's."
    return f"Split: card {format_counts(card)}, this plan {mine} layers, because " + "; ".join(reasons) + "." + tail

"""lmms-eval messages for NVLM-D: the card's system prompt, then the image(s) and NVLM's question prompt.

Each `*_doc_to_messages` here reuses the upstream task's own `doc_to_visual` and `doc_to_text`
(`lmms_eval.tasks.<task>.utils`, imported when first called), so data loading and the
post-prompt mechanism stay lmms-eval's; this file only adds what lmms-eval's `openai` model
cannot: a system message. The system text comes from `lmms_eval_specific_kwargs.system_prompt`
(the card's "Answer the questions." in every YAML here; NVIDIA's Megatron evaluation used
"Follow the user's instruction and answer questions." for most tasks; set it empty to send
none and let the server choose).

The user turn is lmms-eval's own layout: images first, then the text, which the server writes
as `<image>\\n{question}` (SPEC section 9). Loaded by lmms-eval through `!function` in the YAMLs
beside it; the rest of the project never imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

CARD_SYSTEM_PROMPT = "Answer the questions."

Messages = list[dict[str, Any]]


def with_system(messages: Messages, kwargs: dict[str, Any] | None) -> Messages:
    """Puts the system turn (lmms-eval's content-list shape) before the messages, unless it is empty."""
    system = (kwargs or {}).get("system_prompt", CARD_SYSTEM_PROMPT)
    if not system:
        return messages
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]


def user_turn(visuals: list[Any], text: str) -> Messages:
    """Images first, then the text: the layout NVLM-D was trained and evaluated with."""
    return [{"role": "user", "content": [*({"type": "image", "url": v} for v in visuals), {"type": "text", "text": text}]}]


def _upstream(task: str, name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(f"lmms_eval.tasks.{task}.utils"), name)


def _messages_for(task: str, visual: str, text: str) -> Callable[..., Messages]:
    """A doc_to_messages built from an upstream task's doc_to_visual and doc_to_text."""

    def doc_to_messages(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> Messages:
        kwargs = lmms_eval_specific_kwargs or {}
        visuals = _upstream(task, visual)(doc)
        return with_system(user_turn(visuals, _upstream(task, text)(doc, kwargs)), kwargs)

    doc_to_messages.__name__ = f"{task}_doc_to_messages"
    return doc_to_messages


chartqa_doc_to_messages = _messages_for("chartqa", "chartqa_doc_to_visual", "chartqa_doc_to_text")
docvqa_doc_to_messages = _messages_for("docvqa", "docvqa_doc_to_visual", "docvqa_doc_to_text")
ocrbench_doc_to_messages = _messages_for("ocrbench", "ocrbench_doc_to_visual", "ocrbench_doc_to_text")
realworldqa_doc_to_messages = _messages_for("realworldqa", "realworldqa_doc_to_visual", "realworldqa_doc_to_text")
vqav2_doc_to_messages = _messages_for("vqav2", "vqav2_doc_to_visual", "vqav2_doc_to_text")
ai2d_doc_to_messages = _messages_for("ai2d", "ai2d_doc_to_visual", "ai2d_doc_to_text")
mathvista_doc_to_messages = _messages_for("mathvista", "mathvista_doc_to_visual", "mathvista_doc_to_text")


def textvqa_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """TextVQA's question as NVLM saw it: upstream capitalizes it (lower-casing the rest), NVLM did not."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def textvqa_doc_to_messages(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> Messages:
    kwargs = lmms_eval_specific_kwargs or {}
    visuals = _upstream("textvqa", "textvqa_doc_to_visual")(doc)
    return with_system(user_turn(visuals, textvqa_doc_to_text(doc, kwargs)), kwargs)


def mmmu_doc_to_messages(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> Messages:
    """lmms-eval's interleaved MMMU messages (every image, where the question refers to it), plus the system turn."""
    kwargs = lmms_eval_specific_kwargs or {}
    return with_system(_upstream("mmmu", "mmmu_doc_to_messages")(doc, kwargs), kwargs)

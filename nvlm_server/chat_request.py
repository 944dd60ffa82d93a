"""An OpenAI chat-completions request -> the engine chat layer's `ChatRequest`.

Reads the fields once: sampling (with vLLM's `top_k` / `repetition_penalty` and OpenAI's
presence / frequency penalties and logprobs), tools with tool_choice and
parallel_tool_calls, response_format, the leading system turn, whether to continue a final assistant message. The rules themselves
(tool_choice spellings, the system turn, the tile budget, the grammar) are
`nvlm_engine.chat`'s, shared with ChatNVLM, so a server answer equals a local one.
"""

from __future__ import annotations

from typing import Any

from nvlm_engine.chat import ChatRequest, ResponseFormat, Sampling, ToolBinding

from .convert import RequestRejected
from .schemas import ChatCompletionRequest

__all__ = ["to_chat_request"]


def to_chat_request(req: ChatCompletionRequest, messages: list[dict[str, Any]], max_tiles: int,
                    default_max_tokens: int) -> ChatRequest:
    """The chat request for converted engine `messages` (see `convert.openai_to_engine_messages`).

    Raises:
        RequestRejected: a bad tool list, tool_choice, response_format, or top_logprobs without logprobs.
    """
    try:
        tools = ToolBinding.build([t.model_dump(exclude_none=True) for t in req.tools or ()], req.tool_choice,
                                  req.parallel_tool_calls, strict=True)
    except ValueError as e:
        param = "tools" if "unique" in str(e) else "tool_choice"
        raise RequestRejected(str(e), param=param) from e
    try:
        answer = ResponseFormat.parse(req.response_format.model_dump(exclude_none=True) if req.response_format else None)
    except ValueError as e:
        raise RequestRejected(str(e), param="response_format") from e
    if req.top_logprobs and not req.logprobs:
        raise RequestRejected("top_logprobs needs logprobs=true", param="top_logprobs")
    system = None
    if messages and messages[0]["role"] == "system":
        system = "".join(p["text"] for p in messages[0]["content"] if p["type"] == "text")
        messages = messages[1:]
    sampling = Sampling(
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        seed=req.seed, stop=tuple(req.stop) if req.stop else None,
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
    )
    return ChatRequest(messages=tuple(messages), system=system, sampling=sampling, tools=tools,
                       response_format=answer, max_tiles=max_tiles, continue_final=_continue_final(req, messages))


def _continue_final(req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> bool | None:
    """vLLM's two flags -> continue the final assistant message or not (None: the engine's rule).

    vLLM continues only with `continue_final_message=true` plus `add_generation_prompt=false`;
    here either one asks for it, and neither means: continue when the last message is the
    assistant's (lm-eval sends HumanEval's prefix that way). Asking for both is refused, as vLLM does.
    """
    cont, gen = req.continue_final_message, req.add_generation_prompt
    if cont and gen:
        raise RequestRejected("continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")
    if cont is None and gen is None:
        return None
    wants = bool(cont) or gen is False
    ends_with_answer = bool(messages) and messages[-1]["role"] == "assistant"
    if wants and not ends_with_answer:
        raise RequestRejected("continue_final_message needs the last message to be an assistant message "
                              "(the text to continue)", param="continue_final_message")
    if not wants and ends_with_answer:
        raise RequestRejected("the last message is an assistant message and continue_final_message is false: "
                              "this server continues such a message or answers a user message; drop the "
                              "flag or end with a user message", param="continue_final_message")
    return wants

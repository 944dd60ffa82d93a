"""A document-QA agent over a multi-page PDF invoice, with NVLM-D reading the pages.

    python examples/document_qa_agent.py                        # tiny random checkpoint: noise, real plumbing
    python examples/document_qa_agent.py --checkpoint /models/NVLM-D-72B \\
        --question "What is the total due, and on which page is it?"

The agent is a plain LangChain-core loop: a planner chat model with the three document tools
bound (OCR, chart reading, localization) decides which to call; each call runs, its short text
goes back to the planner, until the planner answers. The planner is NVLM-D itself by default
(its Qwen2 decoder knows the Hermes tool-call format that ChatNVLM writes), and any other
tool-calling chat model can take its place (`run_agent(planner=...)`). The tools are bound to
the invoice (`NVLMDocumentToolkit(document=...)`), so the planner chooses pages and options,
never file paths. The first step is forced to read the document (`first_tool`), the usual
habit of a document agent and what keeps the plumbing exercised on a random model.

With no --checkpoint a tiny random-weight NVLM-D is written to a temporary folder: its answers
are noise, but every step (PDF rendering, tool calls, grammar-constrained planning, parsing,
errors) is the real one. Point --checkpoint at the NVLM-D-72B download for real answers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool

from nvlm_langchain.tools import NVLMDocumentToolkit
from nvlm_langchain.tools.samples import make_invoice_pdf

SYSTEM_PROMPT = (
    "You answer questions about one document, a PDF invoice, using the tools. The tools already have the "
    "document: choose only pages (numbered from 1) and options. Read what you need, then answer briefly, "
    "quoting the figures you read."
)


@dataclass
class AgentRun:
    """The agent's answer and the whole conversation (tool results carry their artifacts)."""

    answer: str
    messages: list[BaseMessage] = field(default_factory=list)

    @property
    def tool_messages(self) -> list[ToolMessage]:
        return [m for m in self.messages if isinstance(m, ToolMessage)]


def run_agent(
    planner: BaseChatModel,
    tools: Sequence[BaseTool],
    question: str,
    *,
    max_steps: int = 4,
    first_tool: str | None = "ocr_document",
) -> AgentRun:
    """Let `planner` answer `question` by calling `tools` until it answers without a call.

    Args:
        planner: a chat model that supports `bind_tools` (ChatNVLM, or any provider's).
        tools: the document tools (bound to the document).
        question: the user's question.
        max_steps: planner turns before it must answer without tools.
        first_tool: the tool the first turn must call (None: the planner decides from the start).
    """
    by_name = {tool.name: tool for tool in tools}
    messages: list[BaseMessage] = [SystemMessage(SYSTEM_PROMPT), HumanMessage(question)]
    for step in range(max_steps):
        choice = first_tool if step == 0 and first_tool else "auto"
        reply = planner.bind_tools(list(tools), tool_choice=choice).invoke(messages)
        messages.append(reply)
        if not reply.tool_calls and not reply.invalid_tool_calls:
            return AgentRun(answer=reply.text, messages=messages)
        messages.extend(_run_calls(reply, by_name))
    final = planner.invoke([*messages, HumanMessage("Answer the question now, from what the tools returned.")])
    messages.append(final)
    return AgentRun(answer=final.text, messages=messages)


def _run_calls(reply: AIMessage, tools: dict[str, BaseTool]) -> list[ToolMessage]:
    results = []
    for call in reply.tool_calls:
        tool = tools.get(call["name"])
        if tool is None:
            results.append(
                ToolMessage(f"there is no tool {call['name']!r}", tool_call_id=call["id"] or "", status="error")
            )
        else:
            results.append(tool.invoke(call))  # a ToolMessage: content for the planner, artifact for us
    for bad in reply.invalid_tool_calls:  # say what was wrong, so the planner can try again
        results.append(
            ToolMessage(f"invalid tool call: {bad.get('error')}", tool_call_id=bad.get("id") or "", status="error")
        )
    return results


def main(argv: Sequence[str] | None = None) -> AgentRun:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="NVLM-D checkpoint folder (default: a tiny random one)")
    parser.add_argument("--pdf", type=Path, help="the PDF to ask about (default: a generated 3-page invoice)")
    parser.add_argument("--question", default="What is the total due on this invoice?")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per tool answer (default 1024; 16 on the tiny model)"
    )
    parser.add_argument(
        "--planner-max-tokens", type=int, default=None, help="tokens per planner turn (default 512; 64 tiny)"
    )
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument(
        "--device-map", default=None, help="'auto' (all GPUs), 'cpu', ... (default: auto; cpu for tiny)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from nvlm_langchain.chat_models import ChatNVLM

    # Generated files (a tiny checkpoint, the sample document) live only as long as the run.
    with tempfile.TemporaryDirectory(prefix="nvlm-doc-agent-") as tmp:
        workdir = Path(tmp)
        tiny = args.checkpoint is None
        if tiny:
            from nvlm_engine.testing import build_tiny_checkpoint

            print("No --checkpoint: using a tiny random-weight NVLM-D. Its answers are noise; the plumbing is real.")
            args.checkpoint = build_tiny_checkpoint(workdir / "tiny-nvlm")
        pdf = args.pdf or make_invoice_pdf(workdir / "invoice.pdf").path
        engine: dict[str, Any] = {
            "device_map": args.device_map or ("cpu" if tiny else "auto"),
            "dtype": "float32" if tiny else None,  # None: bfloat16 on GPU, the engine's choice
        }
        # Two ChatNVLM objects on one checkpoint share one loaded engine: they differ only in how
        # long each answer may be (a page transcription needs more room than a planner turn).
        reader = ChatNVLM(model=str(args.checkpoint), max_tokens=args.max_tokens or (16 if tiny else 1024), **engine)
        planner = ChatNVLM(
            model=str(args.checkpoint), max_tokens=args.planner_max_tokens or (64 if tiny else 512), **engine
        )
        tools = NVLMDocumentToolkit(llm=reader, document=str(pdf)).get_tools()

        run = run_agent(planner, tools, args.question, max_steps=args.max_steps)
        print(f"Question: {args.question}\nDocument: {pdf}")
        for message in run.messages[2:]:
            if isinstance(message, AIMessage):
                for call in message.tool_calls:
                    print(f"-> {call['name']}({call['args']})")
                for bad in message.invalid_tool_calls:
                    print(f"-> invalid call: {bad.get('error')}")
            elif isinstance(message, ToolMessage):
                print(f"<- {message.name} [{message.status}]: {message.content[:300]!r}")
        print(f"Answer: {run.answer}")
        return run


if __name__ == "__main__":
    main(sys.argv[1:])

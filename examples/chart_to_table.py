"""A chart-to-table chain: a chart image in, its data as JSON and CSV (and a short answer) out.

    python examples/chart_to_table.py                           # tiny random checkpoint: noise, real plumbing
    python examples/chart_to_table.py --checkpoint /models/NVLM-D-72B --image sales.png \\
        --question "Which quarter had the highest revenue?"

The chain is `to_tool_call | read_chart | summarize`: the chart tool (NVLM-D through ChatNVLM)
asks for the chart's table and the ChartQA-style short answer, parses the table (columns,
rows, units) and returns it as the ToolMessage's artifact; `summarize` turns that into a dict
a program can use, or, when the model's table could not be parsed, into the error with the
model's raw text. With no --image a bar chart is drawn with Pillow; with no --checkpoint a tiny
random-weight NVLM-D is written to a temporary folder (its answers are noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.runnables import Runnable, RunnableLambda

from nvlm_langchain.tools import ChartResult, ChartTool
from nvlm_langchain.tools.samples import draw_bar_chart


def build_chain(tool: ChartTool) -> Runnable[dict[str, Any], dict[str, Any]]:
    """`{"image": ..., "question": ...}` -> `{"table", "csv", "answer", "error", "raw"}`."""

    def to_tool_call(inputs: dict[str, Any]) -> ToolCall:
        return ToolCall(name=tool.name, args=inputs, id=f"call_{uuid.uuid4().hex[:8]}", type="tool_call")

    def summarize(message: ToolMessage) -> dict[str, Any]:
        if message.status == "error":  # the message quotes the model's raw answer
            return {"table": None, "csv": None, "answer": None, "error": message.content, "raw": None}
        result: ChartResult = message.artifact
        page = result.pages[0]
        return {
            "table": page.table.model_dump() if page.table else None,
            "csv": page.csv,
            "answer": page.answer,
            "error": None if page.table else "; ".join(page.issues),
            "raw": page.raw_table_text,
        }

    return RunnableLambda(to_tool_call) | tool | RunnableLambda(summarize)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="NVLM-D checkpoint folder (default: a tiny random one)")
    parser.add_argument("--image", help="chart image or PDF (default: a generated bar chart)")
    parser.add_argument("--question", default="Which quarter had the highest revenue?")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per answer (default 1024; 24 on the tiny model)"
    )
    parser.add_argument(
        "--device-map", default=None, help="'auto' (all GPUs), 'cpu', ... (default: auto; cpu for tiny)"
    )
    args = parser.parse_args(argv)
    from nvlm_langchain.chat_models import ChatNVLM

    # Generated files (a tiny checkpoint, the sample document) live only as long as the run.
    with tempfile.TemporaryDirectory(prefix="nvlm-chart-") as tmp:
        workdir = Path(tmp)
        tiny = args.checkpoint is None
        if tiny:
            from nvlm_engine.testing import build_tiny_checkpoint

            print("No --checkpoint: using a tiny random-weight NVLM-D. Its answers are noise; the plumbing is real.")
            args.checkpoint = build_tiny_checkpoint(workdir / "tiny-nvlm")
        if args.image is None:
            args.image = str(workdir / "chart.png")
            draw_bar_chart(args.image)
        llm = ChatNVLM(
            model=str(args.checkpoint),
            max_tokens=args.max_tokens or (24 if tiny else 1024),
            device_map=args.device_map or ("cpu" if tiny else "auto"),
            dtype="float32" if tiny else None,  # None: bfloat16 on GPU, the engine's choice
        )
        # The tool reads local files only under root_dir: here, the folder of the chart we chose.
        chain = build_chain(ChartTool(llm=llm, root_dir=Path(args.image).resolve().parent))
        summary = chain.invoke({"image": args.image, "question": args.question})
        if summary["csv"]:
            print(f"Table (CSV):\n{summary['csv']}")
            print(f"Table (JSON): {json.dumps(summary['table'])}")
        else:
            print(f"No table: {summary['error']}\nThe model wrote: {summary['raw']!r}")
        print(f"Answer to {args.question!r}: {summary['answer']}")
        return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""The engine's chat layer: tools, answer formats and typed answer events, for any front end.

Neither LangChain nor HTTP is known here. `ChatRequest` says what is asked (engine messages,
sampling, tools with tool_choice and parallel_tool_calls, response format, tile budget);
`ChatService(engine).prepare()` turns it into a `PreparedChat` (one system turn, one
grammar, one tile rule), whose `reader()` turns the engine's deltas into `TextDelta`,
`ToolCallStarted`, `ToolCallArgumentsDelta`, `ToolCallDone` and `Finished` events.
The grammar modules (xgrammar) load on first use.
"""

from .events import (
    ChatEvent,
    Finished,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    finish_reason,
)
from .request import (
    DIALECT_SYSTEM,
    ChatRequest,
    ResponseFormat,
    Sampling,
    ToolBinding,
    compose_system,
    normalize_tool_choice,
    tiles_per_image,
)
from .service import ChatService, EventReader, PreparedChat, grammars_for
from .tool_calls import ParsedOutput, ToolCallParser, ToolSpec, parse_tool_calls, render_tool_calls, tools_system_text

__all__ = [
    "DIALECT_SYSTEM",
    "ChatEvent",
    "ChatRequest",
    "ChatService",
    "EventReader",
    "Finished",
    "ParsedOutput",
    "PreparedChat",
    "ResponseFormat",
    "Sampling",
    "TextDelta",
    "ToolBinding",
    "ToolCallArgumentsDelta",
    "ToolCallDone",
    "ToolCallParser",
    "ToolCallStarted",
    "ToolSpec",
    "compose_system",
    "finish_reason",
    "grammars_for",
    "normalize_tool_choice",
    "parse_tool_calls",
    "render_tool_calls",
    "tiles_per_image",
    "tools_system_text",
]

"""`with_structured_output` for ChatNVLM: a bound model plus an output parser.

Three methods, all enforced by the grammar engine rather than hoped for:

- "json_schema" (default): the answer is JSON matching the schema (`response_format`);
- "function_calling": the answer is one forced call of a tool whose arguments are the schema;
- "json_mode": the answer is a JSON object (the prompt should say which keys).

Schemas may be pydantic classes (v1 or v2; the result is an instance), TypedDicts or JSON
schema dicts (the result is a dict). A schema too costly to compile (`GrammarLimits`: a regex
`a{1,30000}`, say) raises `GrammarTooComplexError` here, before any call.
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

if TYPE_CHECKING:
    from .chat_models import ChatNVLM

__all__ = ["Method", "structured_output"]

Method = Literal["json_schema", "function_calling", "json_mode"]


def structured_output(chat: ChatNVLM, schema: Any, *, method: Method, include_raw: bool) -> Runnable:
    """The runnable `ChatNVLM.with_structured_output` returns (see there)."""
    if schema is None and method != "json_mode":
        raise ValueError(f"method={method!r} needs a schema; only 'json_mode' works without one")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
    parser: Runnable
    from nvlm_engine.chat.grammar_budget import check_schemas

    if method == "function_calling":
        function = convert_to_openai_tool(schema)["function"]
        name = function["name"]
        check_schemas([(f"tool {name!r}'s parameters", function.get("parameters", {}))])
        llm = chat.bind_tools([schema], tool_choice=name, parallel_tool_calls=False, **trace)
        parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                  else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
    elif method == "json_schema":
        json_schema = convert_to_json_schema(schema)
        check_schemas([("the response format's JSON schema", json_schema)])
        response_format = {"type": "json_schema", "json_schema": {"name": json_schema.get("title", "answer"), "schema": json_schema}}
        llm = chat.bind(response_format=response_format, **trace)
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
    elif method == "json_mode":
        llm = chat.bind(response_format={"type": "json_object"}, **(trace if schema is not None else {}))
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
    else:
        raise ValueError(f"unknown method {method!r}; use 'json_schema', 'function_calling' or 'json_mode'")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

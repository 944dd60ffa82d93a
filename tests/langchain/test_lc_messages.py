"""LangChain messages -> engine messages: roles, system merging, images, PDFs, tool traffic (pure)."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from lc_inputs import b64, pdf_bytes, png_bytes, random_image

from nvlm_langchain.messages import ContentOptions, UnsupportedContentError, to_engine_messages

PNG = b64(png_bytes(random_image(32, 24)))
IMAGE = {"type": "image", "base64": PNG, "mime_type": "image/png"}


def kinds(content: list) -> list[str]:
    return [p["type"] if p["type"] == "image" else p["text"] for p in content]


def test_system_messages_merge_into_the_leading_system_turn() -> None:
    conversation = to_engine_messages([SystemMessage("One."), HumanMessage("hi"), SystemMessage("Two."),
                                       AIMessage("yo"), ChatMessage(role="developer", content="Three.")])
    assert conversation.system == "One.\n\nTwo.\n\nThree."
    assert [t["role"] for t in conversation.turns] == ["user", "assistant"]
    assert to_engine_messages([HumanMessage("hi")]).system is None
    assert conversation.messages("S")[0] == {"role": "system", "content": "S"}


def test_images_go_first_by_default_and_text_blocks_are_joined() -> None:
    message = HumanMessage([{"type": "text", "text": "Compare"}, IMAGE, IMAGE, {"type": "text", "text": "these"}])
    (turn,) = to_engine_messages([message]).turns
    assert kinds(turn["content"]) == ["image", "image", "Compare\nthese"]
    assert turn["content"][0]["image"] == f"data:image/png;base64,{PNG}"
    (inline,) = to_engine_messages([message], ContentOptions(images_first=False)).turns
    assert kinds(inline["content"]) == ["Compare", "image", "image", "these"]
    # Text between two images is a layout the user chose: kept.
    laid_out = HumanMessage([{"type": "text", "text": "A:"}, IMAGE, {"type": "text", "text": "B:"}, IMAGE,
                             {"type": "text", "text": "Which is larger?"}])
    (turn,) = to_engine_messages([laid_out]).turns
    assert kinds(turn["content"]) == ["A:", "image", "B:", "image", "Which is larger?"]


def test_assistant_tool_calls_and_tool_results_are_written_the_qwen_way() -> None:
    calls = [{"name": "f", "args": {"x": "é"}, "id": "1", "type": "tool_call"},
             {"name": "g", "args": {}, "id": "2", "type": "tool_call"}]
    turns = to_engine_messages([
        HumanMessage("go"),
        AIMessage([{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "On it."},
                   {"type": "tool_use", "id": "1", "name": "f", "input": {"x": "é"}}], tool_calls=calls),
        ToolMessage([IMAGE, {"type": "text", "text": "a picture"}], tool_call_id="1"),
        ToolMessage("done", tool_call_id="2", status="error"),
    ]).turns
    assert turns[1] == {"role": "assistant", "content": 'On it.\n<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n'
                        '</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'}
    assert turns[2]["role"] == "user"
    assert kinds(turns[2]["content"]) == ["<tool_response>\n", "image",
                                          "a picture\n</tool_response>\n<tool_response>\ndone\n</tool_response>"]


def test_pdf_pages_become_images() -> None:
    pytest.importorskip("pypdfium2")
    pdf = pdf_bytes(random_image(60, 80, 1), random_image(80, 60, 2), random_image(50, 50, 3))
    for block in ({"type": "file", "base64": b64(pdf), "mime_type": "application/pdf"},
                  {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{b64(pdf)}"}},
                  {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(pdf)}}):
        (turn,) = to_engine_messages([HumanMessage([block, {"type": "text", "text": "Summarize"}])]).turns
        pages = [p["image"] for p in turn["content"] if p["type"] == "image"]
        assert [page.size for page in pages] == [(120, 160), (160, 120), (100, 100)]  # 144 dpi: twice the points
    with pytest.raises(UnsupportedContentError, match="3 pages"):
        to_engine_messages([HumanMessage([{"type": "file", "base64": b64(pdf), "mime_type": "application/pdf"}])],
                           ContentOptions(pdf_max_pages=2))
    with pytest.raises(UnsupportedContentError, match="cannot be opened"):
        to_engine_messages([HumanMessage([{"type": "file", "base64": b64(b"not a pdf"), "mime_type": "application/pdf"}])])


def test_plain_text_documents_are_text() -> None:
    (turn,) = to_engine_messages([HumanMessage([{"type": "text-plain", "text": "notes", "mime_type": "text/plain"}])]).turns
    assert kinds(turn["content"]) == ["notes"]


@pytest.mark.parametrize("message, match", [
    (AIMessage([IMAGE]), "human and tool messages only"),
    (SystemMessage([IMAGE]), "text only"),
    (ChatMessage(role="critic", content="hm"), "role 'critic'"),
    (HumanMessage([{"type": "video", "url": "https://example.com/v.mp4"}]), "'video'"),
    (HumanMessage([{"type": "image_url", "image_url": {"detail": "high"}}]), "'image_url'"),
])
def test_what_cannot_be_read_is_a_value_error(message, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_engine_messages([message])

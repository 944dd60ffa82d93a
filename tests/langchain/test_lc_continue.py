"""ChatNVLM continues a final AIMessage, locally and through a server (nvlm-serve or vLLM).

Locally the engine's rule applies (a conversation ending with the assistant's message is
continued); remotely the request carries vLLM's `continue_final_message` and
`add_generation_prompt=false`, which vLLM needs and nvlm-serve accepts.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from langchain_core.messages import AIMessage, HumanMessage
from server.conftest import running_server  # tests/server: the real nvlm-serve on a loopback port

from nvlm_langchain import ChatNVLM
from nvlm_langchain.remote import build_request
from nvlm_server import ServerSettings

PREFIX = "Here is the completed function:\n```python\ndef add(a, b):\n"
CONVERSATION = [HumanMessage("Complete add(a, b)."), AIMessage(PREFIX)]


@pytest.fixture(scope="module")
def server_url(tiny_engine) -> Any:
    with running_server(tiny_engine, ServerSettings(model_name="nvlm-tiny")) as url:
        yield url


def test_local_chat_continues_a_final_ai_message(chat) -> None:
    answer = chat.invoke(CONVERSATION)
    engine_messages = [{"role": "user", "content": "Complete add(a, b)."}, {"role": "assistant", "content": PREFIX}]
    expected = chat.engine.generate(engine_messages, max_new_tokens=12)
    assert answer.content == expected.text
    assert answer.usage_metadata["input_tokens"] == len(chat.engine.prepare(engine_messages).prompt_ids)


def test_remote_request_asks_to_continue_only_after_a_final_ai_message() -> None:
    offline = ChatNVLM(base_url="http://127.0.0.1:9/v1", model="nvidia/NVLM-D-72B")
    continued = build_request(offline, CONVERSATION, None, {}).params
    assert continued["extra_body"] == {"continue_final_message": True, "add_generation_prompt": False}
    answered = build_request(offline, [HumanMessage("Hi")], None, {}).params
    assert "extra_body" not in answered


def test_remote_chat_continues_like_the_local_one(server_url, chat) -> None:
    remote = ChatNVLM(base_url=server_url + "/v1", model="nvlm-tiny", max_tokens=12, max_retries=0)
    remote_answer, local_answer = remote.invoke(CONVERSATION), chat.invoke(CONVERSATION)
    assert remote_answer.content == local_answer.content
    assert remote_answer.usage_metadata == local_answer.usage_metadata

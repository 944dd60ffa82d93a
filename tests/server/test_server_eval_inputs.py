"""What the evaluation harnesses send, against a real server on the tiny engine.

lm-eval's `local-chat-completions` sends `stop` (up to 4), `seed`, `max_tokens` and, for
HumanEval, a final assistant message to continue (no flag); lmms-eval sends images first as
PNG data URLs, several per request for multi-image tasks (JPEG with LMMS_IMAGE_ENCODE_FORMAT).
The server's tile budget (`nvlm-serve --max-tiles`) is shared by a request's images.
"""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from nvlm_server import ServerSettings

from .conftest import running_server


def _image(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def _part(data: bytes, mime: str) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "nvlm-tiny", "max_tokens": 6, **body}, timeout=120)


QUESTION = [{"role": "user", "content": "Complete the function."}]


def test_a_final_assistant_message_is_continued_as_lm_eval_sends_it(server_url, tiny_engine) -> None:
    prefix = "Here is the completed function:\n```python\ndef add(a, b):\n"
    messages = [*QUESTION, {"role": "assistant", "content": prefix}]
    expected = tiny_engine.generate(messages, max_new_tokens=6)  # the engine continues it too
    base_ids = tiny_engine.prepare(QUESTION).prompt_ids
    prompt_ids = tiny_engine.prepare(messages).prompt_ids
    im_end = tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the prompt: the question's prompt, then the partial answer, its turn left open
    assert prompt_ids[: len(base_ids)] == base_ids and im_end not in prompt_ids[len(base_ids):]
    plain = _post(server_url, messages=messages, stop=["\nclass", "\ndef", "\n#", "\nif"], seed=1234)
    flagged = _post(server_url, messages=messages, continue_final_message=True, add_generation_prompt=False)
    for reply in (plain, flagged):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert flagged.json()["choices"][0]["message"]["content"] == expected.text


def test_contradicting_continuation_flags_are_400(server_url) -> None:
    answer = [*QUESTION, {"role": "assistant", "content": "def f():"}]
    cases = [
        (answer, {"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true"),
        (QUESTION, {"continue_final_message": True}, "last message to be an assistant message"),
        (answer, {"continue_final_message": False}, "continue_final_message is false"),
    ]
    for messages, flags, text in cases:
        reply = _post(server_url, messages=messages, **flags)
        assert reply.status_code == 400 and text in reply.json()["error"]["message"], reply.text


def test_stop_strings_and_seed(server_url) -> None:
    free = _post(server_url, messages=QUESTION, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert len(free) > 3
    stop = free[2:4]
    cut = _post(server_url, messages=QUESTION, max_tokens=12, stop=["NEVER", stop, "NOPE", "nada"])
    assert cut.json()["choices"][0]["message"]["content"] == free[: free.index(stop)].strip()
    assert cut.json()["choices"][0]["finish_reason"] == "stop"
    sampled = [_post(server_url, messages=QUESTION, max_tokens=10, temperature=1.0, seed=7).json() for _ in range(2)]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]


def test_several_images_png_and_jpeg_share_the_tile_budget(server_url, tiny_engine) -> None:
    png, jpeg = _image(900, 600, "PNG"), _image(900, 600, "JPEG")
    content = [_part(png, "image/png"), _part(jpeg, "image/jpeg"), {"type": "text", "text": "Compare."}]
    reply = _post(server_url, messages=[{"role": "user", "content": content}])
    assert reply.status_code == 200, reply.text
    engine_messages = [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "image", "image": jpeg},
                                                    {"type": "text", "text": "Compare."}]}]
    # budget 6 shared by 2 images: 3 tiles each -> 900x600 is a 2x1 grid (+ thumbnail), not 3x2
    prepared = tiny_engine.prepare(engine_messages, max_tiles=3)
    assert prepared.image_tiles == (3, 3)
    assert reply.json()["usage"]["prompt_tokens"] == len(prepared.prompt_ids)
    one_jpeg = _post(server_url, messages=[{"role": "user", "content": [_part(jpeg, "image/jpeg"),
                                                                        {"type": "text", "text": "Compare."}]}])
    assert one_jpeg.status_code == 200, one_jpeg.text
    single = tiny_engine.prepare([{"role": "user", "content": [{"type": "image", "image": jpeg},
                                                               {"type": "text", "text": "Compare."}]}])
    assert single.image_tiles == (7,)  # alone, the image gets the whole budget: 3x2 + thumbnail
    assert one_jpeg.json()["usage"]["prompt_tokens"] == len(single.prompt_ids)


def test_server_wide_tile_budget_applies_and_is_reported(tiny_engine) -> None:
    jpeg = _image(900, 600, "JPEG")
    with running_server(tiny_engine, ServerSettings(model_name="nvlm-tiny", max_tiles=2)) as url:
        models = httpx.get(url + "/v1/models", timeout=30).json()
        assert models["data"][0]["max_tiles"] == 2
        reply = _post(url, messages=[{"role": "user", "content": [_part(jpeg, "image/jpeg"),
                                                                  {"type": "text", "text": "What?"}]}])
    assert reply.status_code == 200, reply.text
    # 900x600 with at most 2 tiles: 2x1 (+ thumbnail), where the default 6 gives 3x2 (+ thumbnail)
    prepared = tiny_engine.prepare([{"role": "user", "content": [{"type": "image", "image": jpeg},
                                                                 {"type": "text", "text": "What?"}]}], max_tiles=2)
    assert prepared.image_tiles == (3,)
    assert reply.json()["usage"]["prompt_tokens"] == len(prepared.prompt_ids)

"""nvlm-chat's interactive mode in a real pseudo-terminal (pexpect): line editing and history,
commands that fail without ending the session, typed text and attachments never lost,
Ctrl-C stopping an answer, /save and --load. One test, two processes: each start costs seconds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

LEFT, ESC_ENTER, CTRL_U = "\x1b[D", "\x1b\r", "\x15"
# prompt_toolkit turns bracketed paste on when a prompt starts and off when the line is accepted:
# unambiguous marks, where ">>>" is drawn again on every keystroke
PROMPT_STARTS, LINE_ACCEPTED = "\x1b[?2004h", "\x1b[?2004l"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pty") / "invoice.png"
    Image.new("RGB", (640, 480), (250, 250, 240)).save(path)
    return path


def _spawn(args: list[str], home: Path, history: Path) -> pexpect.spawn:
    env = {**os.environ, "HOME": str(home), "NVLM_CHAT_HISTORY": str(history), "PROMPT_TOOLKIT_NO_CPR": "1",
           "TERM": "xterm"}
    env.pop("NVLM_MODEL", None)
    return pexpect.spawn(sys.executable, ["-m", "nvlm_langchain.cli", *args], encoding="utf-8", timeout=120,
                         dimensions=(40, 200), env=env, cwd=str(home))


def _do(child: pexpect.spawn, line: str, *expected: str) -> None:
    """Type `line`, press Enter, then wait for each expected text in turn and the next prompt."""
    child.send(line + "\r")
    child.expect_exact(LINE_ACCEPTED)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact(PROMPT_STARTS)


def test_interactive_session(tiny_checkpoint: Path, image_file: Path,
                                                             tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    history = tmp_path / "history.txt"
    child = _spawn(["-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32", "--max-tokens", "5",
                    "--context-length", "60"], tmp_path, history)
    child.expect_exact(PROMPT_STARTS)
    # line editing: the arrow keys move the cursor instead of reaching the model as ^[[D
    child.send("abc" + LEFT + LEFT + "X")
    _do(child, "")
    # Esc then Enter adds a line to the same message
    child.send("line one" + ESC_ENTER + "line two")
    _do(child, "")
    _do(child, "/system", "system prompt: (the model default)")
    _do(child, "/system Be brief.", "system prompt set: Be brief.")
    _do(child, "/system", "system prompt: Be brief.")
    # a bad image is refused when attached; the session goes on
    _do(child, f"/image {notes}", "notes.txt cannot be used", "not attached")
    _do(child, "/save ~/chat.json", f"saved to {tmp_path / 'chat.json'}")
    _do(child, "/save '/nonexistent dir/x.json'", "cannot write /nonexistent dir/x.json")
    _do(child, '/save "with space.json"', "saved to with space.json")
    _do(child, "/save 'unclosed.json", "close the quote")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["system"] == "Be brief."
    texts = [m["data"]["content"] for m in saved["messages"] if m["type"] == "human"]
    assert [t[-1]["text"] for t in texts] == ["aXbc", "line one\nline two"]
    assert (tmp_path / "with space.json").is_file()
    # a message that fails (the image does not fit the 60-token context) comes back, image still attached
    _do(child, f"/image {image_file}", "attached")
    _do(child, "Describe the image", "context length", "your message is back at the prompt",
        "1 image(s) stay attached")
    child.expect_exact("Describe the image")  # typed again at the new prompt, ready to edit
    child.send(CTRL_U)  # clear the line given back
    _do(child, "/image", "1 image(s) attached to your next message")
    _do(child, "/unknown thing", "unknown command /unknown")
    child.expect_exact("/unknown thing")  # given back to edit
    child.send(CTRL_U)
    _do(child, "/reset", "conversation cleared")
    _do(child, "/image", "no image attached")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")
    lines = history.read_text().splitlines()  # prompt_toolkit's history file: "+" marks a line of an entry
    assert "+aXbc" in lines and "+line one" in lines and "+/system Be brief." in lines


    # resume that transcript with an image attached from the command line; Ctrl-C stops the answer
    transcript = tmp_path / "chat.json"
    child = _spawn(["-m", str(tiny_checkpoint), "--device-map", "cpu", "--dtype", "float32", "--max-tokens", "3000",
                    "--load", str(transcript), "-i", str(image_file)], tmp_path, history)
    child.expect_exact(PROMPT_STARTS)
    child.send("Tell me everything.\r")
    child.expect_exact(LINE_ACCEPTED)
    child.expect(r"\S")  # the answer has started (a Ctrl-C before it would just clear the line)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT_STARTS)
    _do(child, f"/save {transcript}", "saved to")
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["type"] for m in messages] == ["human", "ai", "human", "ai", "human", "ai"]  # the stopped one: empty
    assert messages[4]["data"]["content"][0]["type"] == "image"
    assert messages[4]["data"]["content"][-1]["text"] == "Tell me everything."
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

"""The document tools' file policy: the calling model's `image` argument is untrusted.

Local files are read only under the application's `root_dir` (none by default), after
symlinks and `..` are resolved; http(s) URLs only with `allow_url_fetch`; `document=` pins
one file the application chose. A refusal names how to allow access and never carries the
file's bytes, its size or the working directory.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from pathlib import Path

import pytest
from langchain_core.messages import ToolMessage
from PIL import Image

from nvlm_langchain.tools import FilePolicy, LocateTool, NVLMDocumentToolkit, OCRTool, load_pages
from nvlm_langchain.tools.errors import DocumentInputError

SECRET = b"SECRET-TOKEN=hunter2-do-not-leak\n" * 40


def call(tool, **args) -> ToolMessage:
    return tool.invoke({"type": "tool_call", "id": "call-1", "name": tool.name, "args": args})


def assert_leaks_nothing(message: str, data: bytes = b"", size: int | None = None) -> None:
    for piece in (data[:8], data[8:16]):
        if piece.strip():
            assert piece.decode("latin-1") not in message and repr(piece)[2:-1] not in message, message
    assert os.getcwd() not in message, message
    if size:
        assert f"{size:,}" not in message and f" {size} " not in message and f"({size} " not in message, message


def png(path: Path, size: tuple[int, int] = (20, 10)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path, format="PNG")
    return path


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """root/ holds readable files; outside/ sits next to it, with a secret and an image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    png(root / "page.png")
    png(root / "sub" / "deep.png", (30, 12))
    (outside / "secret.txt").write_bytes(SECRET)
    png(outside / "photo.png", (40, 40))
    (root / "link_out.png").symlink_to(outside / "photo.png")
    (root / "link_secret").symlink_to(outside / "secret.txt")
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    (root / "link_in.png").symlink_to(root / "sub" / "deep.png")
    return {"root": root, "outside": outside}


SYSTEM_FILES = ["/etc/passwd", "/etc/shadow", "/proc/self/environ", "/etc/hosts", "../../etc/hosts",
                "../../../../../../../../etc/passwd", "file:///etc/passwd", "file://localhost/etc/passwd",
                "/proc/self/cwd/README.md"]


@pytest.mark.parametrize("source", SYSTEM_FILES)
def test_local_files_are_refused_by_default(recording, source: str) -> None:
    llm = recording(["x"])
    message = call(OCRTool(llm=llm), image=source)
    assert message.status == "error", message.content
    assert "root_dir" in message.content and "NVLMDocumentToolkit" in message.content, message.content
    path = source.removeprefix("file://localhost").removeprefix("file://")
    data, size = b"", None
    try:
        data, size = Path(path).read_bytes()[:64], os.stat(path).st_size or None
    except OSError:
        pass
    assert_leaks_nothing(message.content, data, size)
    assert llm.calls == []


@pytest.mark.parametrize("source", SYSTEM_FILES)
def test_files_outside_the_root_are_refused(recording, layout, source: str) -> None:
    message = call(OCRTool(llm=recording(["x"]), root_dir=layout["root"]), image=source)
    assert message.status == "error" and "root_dir" in message.content, message.content
    assert_leaks_nothing(message.content)


def test_files_under_the_root_are_read(recording, layout, monkeypatch: pytest.MonkeyPatch) -> None:
    root = layout["root"]
    tool = OCRTool(llm=recording(["text"]), root_dir=root)
    for source, width in [(str(root / "page.png"), 20), ("page.png", 20), ("sub/deep.png", 30),
                          ("sub/../page.png", 20), ((root / "sub" / "deep.png").as_uri(), 30),
                          ("link_in.png", 30)]:
        message = call(tool, image=source)
        assert message.status == "success", (source, message.content)
        assert message.artifact.pages[0].page.width == width
    # Relative paths are taken from the root, not from the working directory.
    monkeypatch.chdir(layout["outside"])
    assert call(tool, image="page.png").status == "success"
    assert call(tool, image="photo.png").status == "error"


@pytest.mark.parametrize("name", ["../outside/photo.png", "sub/../../outside/photo.png", "link_out.png",
                                  "link_dir/photo.png", "link_secret", "link_dir/secret.txt", "{outside}/photo.png",
                                  "{root}/../outside/secret.txt", "{root}/link_dir/photo.png"])
def test_escapes_from_the_root_are_refused(recording, layout, name: str) -> None:
    llm = recording(["x"])
    source = name.format(root=layout["root"], outside=layout["outside"])
    message = call(OCRTool(llm=llm, root_dir=layout["root"]), image=source)
    assert message.status == "error", message.content
    assert "outside" in message.content and "root_dir" in message.content, message.content
    assert_leaks_nothing(message.content, SECRET, len(SECRET))
    assert str(layout["outside"]) not in message.content.replace(source, "")  # the resolved target is not shown
    assert llm.calls == []


def test_refusals_do_not_tell_which_files_exist(recording, layout) -> None:
    tool = OCRTool(llm=recording(["x"]), root_dir=layout["root"])
    present = call(tool, image=str(layout["outside"] / "secret.txt")).content
    missing = call(tool, image=str(layout["outside"] / "nothing.txt")).content
    assert present.replace("secret", "nothing") == missing


def test_unreadable_files_under_the_root_do_not_quote_their_bytes(recording, layout) -> None:
    (layout["root"] / "notes.txt").write_bytes(SECRET)
    message = call(OCRTool(llm=recording(["x"]), root_dir=layout["root"]), image="notes.txt")
    assert message.status == "error" and "not an image" in message.content, message.content
    assert_leaks_nothing(message.content, SECRET)


def test_urls_are_refused_unless_allowed(recording, layout) -> None:
    for root in (None, layout["root"]):
        message = call(OCRTool(llm=recording(["x"]), root_dir=root), image="http://127.0.0.1:9/secret.png")
        assert message.status == "error" and "allow_url_fetch" in message.content, message.content
    # Allowed: the policy lets it through to the fetcher (nothing listens on port 9).
    message = call(OCRTool(llm=recording(["x"]), allow_url_fetch=True), image="http://127.0.0.1:9/secret.png")
    assert message.status == "error" and "root_dir" not in message.content and "allow_url_fetch" not in message.content


def test_inline_documents_need_no_root(recording) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), "white").save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    for source in (encoded, f"data:image/png;base64,{encoded}"):
        message = call(OCRTool(llm=recording(["x"])), image=source)
        assert message.status == "success" and message.artifact.pages[0].page.width == 16


def test_base64_that_names_a_file_in_the_working_directory_is_not_read(
    recording, layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "abcd" is valid base64 and, here, also a file in the working directory: the reader must
    # never look it up there (the engine's reader prefers an existing file to base64).
    monkeypatch.chdir(layout["outside"])
    png(layout["outside"] / "abcd")
    message = call(OCRTool(llm=recording(["x"])), image="abcd")
    assert message.status == "error" and "base64" in message.content, message.content


def test_document_pins_one_file_without_a_root(recording, layout) -> None:
    photo = layout["outside"] / "photo.png"
    tools = NVLMDocumentToolkit(llm=recording(["x"]), document=str(photo)).get_tools()
    message = call(tools[0])
    assert message.status == "success" and message.artifact.pages[0].page.width == 40


def test_toolkit_passes_the_root_to_every_tool(recording, layout) -> None:
    tools = NVLMDocumentToolkit(llm=recording(["<box>(1,2),(3,4)</box>"]), root_dir=layout["root"]).get_tools()
    assert all(tool.root_dir == layout["root"] for tool in tools)
    assert call(tools[0], image="page.png").status == "success"
    assert call(tools[2], image="page.png", query="x").status == "success"
    assert call(tools[0], image="../outside/photo.png").status == "error"
    default = NVLMDocumentToolkit(llm=recording(["x"])).get_tools()
    assert all(call(tool, image="/etc/hosts", **({"query": "x"} if tool.name.startswith("locate") else {})).status
               == "error" for tool in default)


def test_async_calls_follow_the_same_policy(recording, layout) -> None:
    tool = LocateTool(llm=recording(["<box>(1,2),(3,4)</box>"]), root_dir=layout["root"])

    async def run() -> list[ToolMessage]:
        return await asyncio.gather(*(
            tool.ainvoke({"type": "tool_call", "id": str(i), "name": tool.name, "args": {"image": image, "query": "x"}})
            for i, image in enumerate(["page.png", "/etc/passwd", "../outside/secret.txt"])
        ))

    ok, passwd, secret = asyncio.run(run())
    assert ok.status == "success"
    assert passwd.status == secret.status == "error"
    assert_leaks_nothing(secret.content, SECRET, len(SECRET))


def test_the_root_must_be_an_existing_folder(recording, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root_dir"):
        OCRTool(llm=recording(["x"]), root_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="root_dir"):
        FilePolicy(root_dir=png(tmp_path / "a.png"))


def test_load_pages_with_a_policy(layout) -> None:
    policy = FilePolicy(root_dir=layout["root"])
    assert load_pages("sub/deep.png", policy=policy)[0].width == 30
    with pytest.raises(DocumentInputError, match="outside"):
        load_pages(str(layout["outside"] / "photo.png"), policy=policy)
    with pytest.raises(DocumentInputError, match="root_dir"):
        load_pages("/etc/hosts", policy=FilePolicy())
    # Without a policy the source is the application's own: any file.
    assert load_pages(str(layout["outside"] / "photo.png"))[0].width == 40


def test_huge_files_under_the_root_are_refused_by_size_before_reading(recording, layout) -> None:
    with open(layout["root"] / "x.pdf", "wb") as f:
        f.truncate(1_100_000_000)  # sparse: no real bytes on disk
    message = call(OCRTool(llm=recording(["x"]), root_dir=layout["root"]), image="x.pdf")
    assert message.status == "error" and "max_bytes" in message.content, message.content

"""The web demo: context trimming and grounding overlays as units, then the real page in a browser.

The browser tests start ``python -m deepseek_vl2.web --demo`` once for the module and drive it with Playwright and
Debian's Chromium (skipped, saying why, where either is missing); the concurrency test uses
gradio_client like a second and third user would.
"""

from __future__ import annotations

import html
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl2.chat import ChatResult, ContextTooLongError, DeepseekVL2Chat, GenerationSettings
from deepseek_vl2.grounding import clean_answer, parse_grounding
from deepseek_vl2.utils.io import load_pil_images
from deepseek_vl2.web import demo as web_demo
from deepseek_vl2.web.context import count_prompt_tokens, fit_history
from deepseek_vl2.web.session import Turn, chat_messages, model_history, turn_gallery, user_message

REPO = Path(__file__).resolve().parents[1]
WEB_DEMO = REPO / "web_demo.py"
IMAGES = REPO / "images"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
GROUNDED = "<|ref|>x<|/ref|><|det|>[[10,10,500,500]]<|/det|>"

needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")


def answered_turn(text: str, image: Path | None, answer: str) -> Turn:
    return Turn(text=text, images=[str(image)] if image else [], answer=answer)


# -- context: the history that fits ------------------------------------------------------------------


def test_fit_history_drops_oldest_turns_until_prompt_and_answer_fit(checkpoint_dir):
    from deepseek_vl2.models import DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    turns = [
        answered_turn(f"Question {index} about this picture?", IMAGES / name, f"Answer number {index}. " * 5)
        for index, name in enumerate(["street.png", "chart.png", "shapes.png", "document.png", "shelf.png"])
    ]
    history = model_history(turns)
    message = user_message(Turn("And now?", [str(IMAGES / "street.png")]))
    everything = count_prompt_tokens(processor, [*history, message])

    roomy = fit_history(processor, history, message, max_new_tokens=64, context_tokens=everything + 64)
    assert (roomy.dropped_turns, roomy.prompt_tokens, roomy.history) == (0, everything, history)

    limit, max_new = 2000, 64
    fitted = fit_history(processor, history, message, max_new_tokens=max_new, context_tokens=limit)
    assert 0 < fitted.dropped_turns < len(turns)
    assert fitted.history == history[2 * fitted.dropped_turns :]  # whole turns, the newest kept
    assert fitted.prompt_tokens == count_prompt_tokens(processor, [*fitted.history, message])
    assert fitted.prompt_tokens + max_new <= limit
    one_more = history[2 * (fitted.dropped_turns - 1) :]
    assert count_prompt_tokens(processor, [*one_more, message]) + max_new > limit  # kept as much as fits


def test_fit_history_counts_image_tokens_and_rejects_a_turn_that_cannot_fit(checkpoint_dir):
    from deepseek_vl2.models import DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    text_only = count_prompt_tokens(processor, [user_message(Turn("Hi", []))])
    with_image = count_prompt_tokens(processor, [user_message(Turn("Hi", [str(IMAGES / "street.png")]))])
    assert with_image - text_only >= 421  # a whole image: global view, separator and at least one tile

    big = user_message(Turn("Compare.", [str(IMAGES / "street.png"), str(IMAGES / "chart.png")]))
    with pytest.raises(ContextTooLongError, match=r"prompt tokens \+ 32 new tokens, more than the 600-token"):
        fit_history(processor, [], big, max_new_tokens=32, context_tokens=600)
    with pytest.raises(ContextTooLongError, match="max new tokens"):
        fit_history(processor, [], big, max_new_tokens=600, context_tokens=600)


def test_fit_history_counts_from_image_sizes_as_full_processing_would(checkpoint_dir, monkeypatch):
    from deepseek_vl2.models import DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(checkpoint_dir("tiny"))
    names = ["street.png", "chart.png", "shapes.png", "document.png", "shelf.png"]
    turns = [answered_turn(f"Question {i}?", IMAGES / name, f"Answer {i}. " * 5) for i, name in enumerate(names)]
    history = model_history(turns)
    message = user_message(Turn("And now?", [str(IMAGES / "street.png")]))

    def processed_tokens(messages):  # how fit_history counted before: every image tiled and normalised
        return len(processor(conversations=messages, images=load_pil_images(messages)).input_ids[0])

    candidates = [processed_tokens([*history[2 * dropped :], message]) for dropped in range(len(names) + 1)]
    assert candidates != sorted(candidates, reverse=True)  # with 2 images or fewer they are tiled again

    def no_pixels(*args, **kwargs):
        raise AssertionError("fit_history must not resize or normalise images")

    monkeypatch.setattr(processor, "tile_image", no_pixels)
    max_new = 32
    for limit in sorted({tokens + max_new + extra for tokens in candidates for extra in (-1, 0)}):
        fits = [dropped for dropped, tokens in enumerate(candidates) if tokens + max_new <= limit]
        if not fits:
            with pytest.raises(ContextTooLongError):
                fit_history(processor, history, message, max_new_tokens=max_new, context_tokens=limit)
            continue
        fitted = fit_history(processor, history, message, max_new_tokens=max_new, context_tokens=limit)
        assert (fitted.dropped_turns, fitted.prompt_tokens) == (fits[0], candidates[fits[0]])
        assert fitted.history == history[2 * fits[0] :]


# -- session: what the page shows ----------------------------------------------------------------


def grounded_result(images: list[Image.Image]) -> ChatResult:
    return ChatResult(
        answer=GROUNDED, text="x", grounding=parse_grounding(GROUNDED), prompt="", history=[], images=images,
        prompt_tokens=10, new_tokens=5,
    )  # fmt: skip


def test_grounding_answer_gets_an_overlay_in_the_chat_and_the_gallery(tmp_path):
    first, last = Image.new("RGB", (200, 100), "white"), Image.new("RGB", (200, 100), "white")
    overlays = grounded_result([first, last]).grounding_overlays()
    assert len(overlays) == 1  # drawn on the last image only, the one the model grounds on
    drawn = overlays[0]
    assert drawn.size == (200, 100) and drawn.getpixel((round(10 * 200 / 999), 30)) != (255, 255, 255)
    assert drawn.getpixel((150, 80)) == (255, 255, 255)  # outside the box nothing changed
    assert grounded_result([]).grounding_overlays() == []  # text-only chat: nothing to draw on

    path = tmp_path / "overlay.png"
    drawn.save(path)
    turn = Turn("<|ref|>x<|/ref|>", ["upload.png"], answer=GROUNDED, overlays=[str(path)])
    assert chat_messages([turn]) == [
        {"role": "user", "content": [{"path": "upload.png"}, "<|ref|>x<|/ref|>"]},
        {"role": "assistant", "content": ["x", {"path": str(path)}]},
    ]
    assert turn_gallery([turn]) == [("upload.png", "image 1"), (str(path), "grounding")]


def test_failed_and_unanswered_turns_are_shown_but_never_sent_to_the_model():
    turns = [
        Turn("a", [], answer="fine"),
        Turn("<image> b", [], error="the conversation has 1 <image> placeholder(s) but 0 image(s) were given"),
        Turn("c", []),
    ]
    assert [m["content"] for m in model_history(turns)] == ["a", "fine"]
    shown = chat_messages(turns)
    assert [m["role"] for m in shown] == ["user", "assistant", "user", "assistant", "user"]
    assert shown[3]["content"].startswith("**Error:**")


class _ScriptedChat:
    """A real processor, and a stream that gives a fixed (grounding) answer."""

    def __init__(self, chat: DeepseekVL2Chat, pieces: list[str]):
        self.processor, self.context_length, self.device = chat.processor, chat.context_length, chat.device
        self.pieces = pieces

    def stream(self, prompt, images=(), history=None, settings=None, reuse_owner=None):
        yield from self.pieces
        answer = "".join(self.pieces)
        yield ChatResult(
            answer=answer, text=clean_answer(answer), grounding=parse_grounding(answer), prompt=prompt, history=[],
            images=load_pil_images([*(history or []), {"images": images}]), prompt_tokens=100,
            new_tokens=len(self.pieces), timings={"tokens_per_s": 50.0},
        )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_chat(checkpoint_dir):
    return DeepseekVL2Chat.from_pretrained(checkpoint_dir("tiny"), dtype="float32")


@pytest.mark.parametrize(
    "text, count, prompt",
    [
        ("Compare.", 2, "<image>\n<image>\nCompare."),
        ("Is <image> a street?", 1, "Is <image> a street?"),
        ("Hi", 0, "Hi"),
    ],
)
def test_the_page_and_the_chat_api_place_images_alike(tiny_chat, text, count, prompt):
    images = [str(IMAGES / "street.png")] * count
    conversation, _ = tiny_chat.build_conversation(text, images)
    assert user_message(Turn(text, images))["content"] == conversation[-2]["content"] == prompt


@needs_gradio
def test_respond_streams_then_shows_the_overlay_image(tiny_chat, tmp_path, monkeypatch):
    from deepseek_vl2.web.app import ChatApp

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    app = ChatApp(
        _ScriptedChat(tiny_chat, ["<|ref|>x<|/ref|>", "<|det|>[[10,10,", "500,500]]<|/det|>"]), model_name="t"
    )
    turns = [Turn("<|ref|>x<|/ref|>", [str(IMAGES / "shapes.png")])]
    updates = list(app.respond(turns, 0.9, 0.4, 1.1, 16, 4096))
    shown, gallery, status = updates[-1]
    assert turns[0].answer == GROUNDED and turns[0].error is None
    (overlay,) = turns[0].overlays
    assert Path(overlay).is_relative_to(tmp_path) and Image.open(overlay).size == Image.open(IMAGES / "shapes.png").size
    assert shown[-1] == {"role": "assistant", "content": ["x", {"path": overlay}]}
    assert gallery[-1] == (overlay, "grounding")
    assert status.startswith("100 prompt tokens + 3 new tokens")


@needs_gradio
@pytest.mark.filterwarnings("ignore:The .* left out to fit the context")  # gr.Warning outside a request: a UserWarning
def test_long_session_never_exceeds_the_context(tiny_chat):
    from deepseek_vl2.web.app import ChatApp

    results = []

    class Recording:
        processor, context_length, device = tiny_chat.processor, tiny_chat.context_length, tiny_chat.device

        def stream(self, *args, **kwargs):
            for piece in tiny_chat.stream(*args, **kwargs):
                if isinstance(piece, ChatResult):
                    results.append(piece)
                yield piece

    app, limit, max_new = ChatApp(Recording(), model_name="t"), 2000, 24
    turns, statuses = [], []
    for index in range(6):
        image = ["street.png", "chart.png", "shapes.png"][index % 3]
        app.add_message({"text": f"Turn {index}: what is here?", "files": [str(IMAGES / image)]}, turns)
        *_, (shown, _, status) = app.respond(turns, 0.9, 0.4, 1.1, max_new, limit)
        statuses.append(status)
        assert turns[-1].error is None, turns[-1].error
    assert len(results) == 6 and len(turns) == 6 and len(shown) == 12  # the page keeps every turn
    assert all(r.prompt_tokens + max_new <= limit for r in results)
    assert all(r.new_tokens <= max_new for r in results)
    assert any("left out to fit the context" in status for status in statuses)
    assert len(results[-1].history) < 12  # the model saw only the recent turns


@needs_gradio
def test_a_failing_generation_becomes_a_message_and_the_session_goes_on(tiny_chat):
    from deepseek_vl2.web.app import ChatApp

    class Failing:
        processor, context_length, device = tiny_chat.processor, tiny_chat.context_length, tiny_chat.device

        def stream(self, *args, **kwargs):
            yield "partial"
            raise RuntimeError("CUDA out of memory (simulated)")

    app, turns = ChatApp(Failing(), model_name="t"), []
    app.add_message({"text": "hello", "files": []}, turns)
    *_, (shown, _, status) = app.respond(turns, 0.9, 0.4, 1.1, 8, 4096)
    assert turns[0].error == "Generation failed: CUDA out of memory (simulated)"
    assert shown[-1]["content"].startswith("**Error:** Generation failed") and status == "Generation failed."
    app.chat = tiny_chat  # the next turn, on a working model, is answered normally
    app.add_message({"text": "again", "files": []}, turns)
    *_, (shown, _, status) = app.respond(turns, 0.9, 0.4, 1.1, 8, 4096)
    assert turns[-1].answered and "tokens/s" in status


@needs_gradio
def test_stop_ends_this_generation_at_once_and_keeps_what_came(tiny_chat):
    from deepseek_vl2.web.app import ChatApp

    app, turns = ChatApp(tiny_chat, model_name="t"), []
    app.add_message({"text": "Tell me a long story.", "files": []}, turns)
    updates = app.respond(turns, 0.9, 0.0, 1.1, 2000, 4096)  # greedy: this random model runs the full 2000
    next(updates), next(updates)  # "Generating…", then the first streamed text
    app.stop(turns)  # the Stop button, from another request of the same session
    *_, (shown, _, status) = updates
    assert status == "Stopped." and turns[0].done and turns[0].error is None
    assert 0 < len(turns[0].answer) and shown[-1]["content"] == [clean_answer(turns[0].answer)]

    next_turn = threading.Thread(
        target=tiny_chat.chat, args=("Next question?",), kwargs={"max_new_tokens": 2}, daemon=True
    )
    next_turn.start()
    next_turn.join(timeout=5)
    assert not next_turn.is_alive()  # the model is free at once, not busy with the abandoned tokens

    app.add_message({"text": "Queued, then stopped.", "files": []}, turns)
    app.stop(turns)  # pressed while the turn waited in the queue: it never reaches the model
    assert list(app.respond(turns, 0.9, 0.0, 1.1, 2000, 4096))[-1][2] == "Stopped." and turns[-1].answer == ""


@needs_gradio
def test_buttons_change_the_session_in_place_and_refuse_while_answering(tiny_chat):
    import gradio as gr

    from deepseek_vl2.web.app import ChatApp

    app, turns = ChatApp(tiny_chat, model_name="t"), []
    session = turns  # what the gr.State holds: every handler must keep working on this same list
    app.add_message({"text": "first", "files": []}, turns)
    with pytest.raises(gr.Error, match="Still answering"):
        app.add_message({"text": "too early", "files": []}, turns)
    with pytest.raises(gr.Error, match="Still answering"):
        app.prepare_regenerate(turns)
    *_, (_, _, status) = app.respond(turns, 0.9, 0.4, 1.1, 4, 4096)
    first_answer = turns[0].answer
    app.prepare_regenerate(turns)
    assert turns[0].answer == "" and not turns[0].done
    *_, (_, _, status) = app.respond(turns, 0.9, 0.4, 1.1, 4, 4096)
    assert "tokens/s" in status and turns[0].done and turns[0].answer != first_answer

    app.add_message({"text": "second", "files": []}, turns)
    app.stop(turns)  # Stop while "second" waits to be answered: the user may type on at once
    app.add_message({"text": "third", "files": []}, turns)
    app.remove_last_turn(turns)
    shown, *_ = app.remove_last_turn(turns)
    assert [turn.text for turn in session] == ["first"] and len(shown) == 2
    assert list(app.respond(turns, 0.9, 0.4, 1.1, 4, 4096))[-1][2] == ""  # nothing left to answer
    app.clear(turns)
    assert session == [] and turns is session


@needs_gradio
def test_a_message_that_cannot_be_answered_is_refused_before_it_leaves_the_box(tiny_chat, tmp_path, monkeypatch):
    import gradio as gr
    from PIL import Image as PILImage

    from deepseek_vl2.web.app import ChatApp

    upload = tmp_path / "gradio" / "5f3c9a0e"
    upload.mkdir(parents=True)
    notes, cut, photo = upload / "<b>notes.png", upload / "cut.png", upload / "photo.png"
    notes.write_text("not a picture")
    street = (IMAGES / "street.png").read_bytes()
    cut.write_bytes(street[: len(street) // 2])
    shutil.copy(IMAGES / "street.png", photo)
    app, turns = ChatApp(tiny_chat, model_name="t"), []

    def refusal(text: str, files: list[Path]) -> str:
        with pytest.raises(gr.Error) as refused:
            app.check_message({"text": text, "files": [str(path) for path in files]}, turns)
        assert str(tmp_path) not in refused.value.message and "<" not in refused.value.message  # shown as HTML
        return html.unescape(refused.value.message)

    assert refusal("  ", []) == "Type a message or attach an image first."
    assert refusal("Both?", [photo, notes]).startswith("The image '<b>notes.png' could not be read: it is not an image")
    assert refusal("This?", [cut]) == "The image 'cut.png' could not be read: it is damaged or cut short."
    assert refusal("<image> and <image>?", [photo]).startswith("The message places 2 <image> but 1 image(s)")
    assert refusal("<image> What is in it?", []).startswith("The message places 1 <image> but 0 image(s)")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # street.png has 416,000 pixels
    too_big = "The image 'photo.png' could not be read: it has too many pixels (the limit is 2,000)."
    assert refusal("Big?", [photo]) == too_big
    monkeypatch.undo()
    assert turns == []  # nothing reached the session

    for text, files in [("Hi", []), ("", [photo]), ("<image> then <image>", [photo, photo])]:
        app.check_message({"text": text, "files": [str(path) for path in files]}, turns)
    app.add_message({"text": "first", "files": []}, turns)
    assert refusal("second", []) == "Still answering the last message: wait for it, or press Stop."
    with pytest.raises(gr.Error, match="Still answering this message"):
        app.check_regenerate(turns)
    app.stop(turns)
    app.check_message({"text": "second", "files": []}, turns)  # after Stop the user may send at once
    app.clear(turns)
    with pytest.raises(gr.Error, match="There is no turn to regenerate yet"):
        app.check_regenerate(turns)


@needs_gradio
def test_an_unreadable_or_deleted_upload_is_named_as_uploaded_never_by_its_server_path(tiny_chat, tmp_path):
    from deepseek_vl2.web.app import ChatApp

    cache = tmp_path / "gradio" / "5f3c9a0e"  # Gradio keeps each upload, under its own name, in a folder of its own
    cache.mkdir(parents=True)
    notes, photo = cache / "holiday notes.png", cache / "beach.png"
    notes.write_text("not a picture")
    shutil.copy(IMAGES / "street.png", photo)

    def answer(text: str, files: list[Path]) -> tuple[str, str]:
        app.add_message({"text": text, "files": [str(path) for path in files]}, turns)
        *_, (shown, _, status) = app.respond(turns, 0.9, 0.4, 1.1, 2, 4096)
        return shown[-1]["content"], status

    app, turns = ChatApp(tiny_chat, model_name="t"), []
    shown, status = answer("What is this?", [notes])
    assert "the image 'holiday notes.png' could not be read" in shown and status == "The message was not accepted."
    assert str(tmp_path) not in shown

    app.clear(turns)
    answer("Describe it.", [photo])
    assert turns[0].answered
    shutil.copy(photo, cache / "again.png")
    photo.unlink()  # the cache policy deleted the upload; the chat still refers to it
    shown, status = answer("And now?", [])
    assert turns[-1].answered and status != "The message was not accepted."  # answered without that turn
    assert "Generation failed" not in shown

    (cache / "again.png").unlink()  # deleted between attaching and sending
    shown, status = answer("This one?", [cache / "again.png"])
    assert "the image 'again.png' is no longer on the server" in shown and "Clear" in shown
    assert str(tmp_path) not in shown and status == "The message was not accepted."


@needs_gradio
def test_turns_whose_uploads_were_deleted_are_left_out_with_a_note(tiny_chat, tmp_path, monkeypatch):
    from deepseek_vl2.web import app as web_app
    from deepseek_vl2.web.session import Turn, turns_with_uploads

    kept_image, gone_image = tmp_path / "kept.png", tmp_path / "gone.png"
    for path in (kept_image, gone_image):
        shutil.copy(IMAGES / "street.png", path)
    turns = [Turn(text="a", images=[str(gone_image)], answer="A", done=True),
             Turn(text="b", images=[str(kept_image)], answer="B", done=True),
             Turn(text="c", images=[str(gone_image)], answer="C", done=True)]  # fmt: skip
    gone_image.unlink()
    kept, deleted = turns_with_uploads(turns)
    assert kept == [turns[1]] and deleted == 2

    warnings, seen = [], []
    monkeypatch.setattr(web_app.gr, "Warning", warnings.append)
    chat = web_app.ChatApp(tiny_chat, model_name="t")
    original_stream = chat.chat.stream
    monkeypatch.setattr(chat.chat, "stream", lambda *a, **k: seen.append(k["history"]) or original_stream(*a, **k))
    chat.add_message({"text": "d", "files": []}, turns)
    *_, (_, _, status) = chat.respond(turns, 0.9, 0.4, 1.1, 2, 4096)
    assert turns[-1].answered
    assert [m["content"] for m in seen[0]] == [turns[1].prompt, "B"]
    assert warnings == ["2 earlier turns were left out: their images have been deleted from the server."]


@needs_gradio
def test_the_page_deletes_old_uploads_hourly_unless_told_otherwise(tiny_chat):
    from deepseek_vl2.web.app import ChatApp

    assert ChatApp(tiny_chat, model_name="t").build().delete_cache == (3600, 86400)
    assert ChatApp(tiny_chat, model_name="t", delete_cache=(60, 600)).build().delete_cache == (60, 600)
    for bad in [(0, 600), (60,), 3600, (60.0, 600), (True, 600), None]:
        with pytest.raises(ValueError, match="delete_cache must be two positive whole numbers"):
            ChatApp(tiny_chat, model_name="t", delete_cache=bad)


# -- the script -----------------------------------------------------------------------------------


def test_flags_default_to_localhost_without_a_share_link():
    args = web_demo.build_parser().parse_args(["--model_name", "deepseek-ai/deepseek-vl2-tiny"])
    assert (args.host, args.share, args.port, args.chunk_size) == ("127.0.0.1", False, 37913, -1)
    with pytest.raises(SystemExit):
        web_demo.main(["--demo", "--model_name", "x"])


@pytest.mark.parametrize("port", ["0", "65536", "-1", "web"])
def test_a_port_that_cannot_be_is_refused_by_the_flag_parser(port, capsys):
    with pytest.raises(SystemExit) as refused:
        web_demo.build_parser().parse_args(["--demo", "--port", port])
    assert refused.value.code == 2 and "argument --port: " in capsys.readouterr().err


@needs_gradio
def test_a_busy_port_or_a_missing_model_is_one_line_before_any_loading(monkeypatch, capsys, tmp_path):
    import deepseek_vl2.web.app as web_app

    monkeypatch.setattr(web_app, "launch", lambda app, **kwargs: pytest.fail("the page must not start"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with monkeypatch.context() as patch:
            patch.setattr(DeepseekVL2Chat, "from_pretrained", lambda *a, **k: pytest.fail("the model must not load"))
            assert web_demo.main(["--model_name", "org/model", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot serve the page on 127.0.0.1:{port}: Address already in use (choose another --port or --host)\n"
    )
    assert web_demo.main(["--model_name", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: checkpoint folder not found: ") and "missing" in error
    assert "Traceback" not in error and error.count("\n") == 1


@needs_gradio
def test_the_cache_policy_flag_reaches_the_page(tiny_chat, monkeypatch):
    import deepseek_vl2.web.app as web_app

    pages = []
    monkeypatch.setattr(DeepseekVL2Chat, "from_pretrained", lambda *args, **kwargs: tiny_chat)
    monkeypatch.setattr(web_app, "launch", lambda app, **kwargs: pages.append(app))
    port = str(free_port())
    assert web_demo.main(["--model_name", "org/model", "--delete_cache", "60", "600", "--port", port]) == 0
    assert web_demo.main(["--model_name", "org/model", "--port", port]) == 0
    assert [page.delete_cache for page in pages] == [(60, 600), (3600, 86400)]
    with pytest.raises(SystemExit):
        web_demo.main(["--model_name", "org/model", "--delete_cache", "0", "600"])
    assert len(pages) == 2


def test_without_gradio_the_library_imports_and_the_script_says_what_to_install():
    blocked = "import sys; sys.modules['gradio'] = None; "  # import gradio now raises ImportError
    library = subprocess.run(
        [sys.executable, "-c", blocked + "import deepseek_vl2, deepseek_vl2.chat, deepseek_vl2.web.session"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert library.returncode == 0, library.stderr
    script = subprocess.run(
        [sys.executable, "-c", blocked + f"import runpy, sys; sys.argv = ['web_demo.py', '--demo']; "
         f"runpy.run_path({str(WEB_DEMO)!r}, run_name='__main__')"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert script.returncode == 1
    assert 'pip install -e ".[gradio]"' in script.stderr
    package = subprocess.run(
        [sys.executable, "-c", blocked + "import runpy, sys; sys.argv = ['web', '--demo']; "
         "runpy.run_module('deepseek_vl2.web', run_name='__main__', alter_sys=True)"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert package.returncode == 1 and package.stderr == script.stderr


def test_the_web_demo_takes_the_loading_options_of_the_command_line(capsys):
    with pytest.raises(SystemExit):
        web_demo.main(["--help"])
    shown = capsys.readouterr().out
    for flag in ("--model_path PATH, --model PATH, --model_name PATH", "--local_path", "--demo", "--device", "--dtype",
                 "--chunk_size", "--device_map", "--max_memory", "--offload_folder"):  # fmt: skip
        assert flag in shown
    with pytest.raises(SystemExit) as refused:
        web_demo.main(["--model", "org/model", "--device_map", "auto", "--max_memory", "cpu"])
    assert refused.value.code == 2 and "max_memory: cannot read 'cpu'" in capsys.readouterr().err


@needs_gradio
def test_loading_flags_reach_the_model_under_each_name_of_the_model_flag(tiny_chat, monkeypatch, tmp_path):
    import deepseek_vl2.web.app as web_app

    loads = []

    def load(path, **kwargs):
        loads.append((path, kwargs))
        return tiny_chat

    monkeypatch.setattr(DeepseekVL2Chat, "from_pretrained", load)
    monkeypatch.setattr(web_app, "launch", lambda app, **kwargs: None)
    flags = ["--device_map", "auto", "--max_memory", "0=2GiB,cpu=1GiB", "--offload_folder", str(tmp_path),
             "--dtype", "fp32", "--chunk_size", "64", "--port", str(free_port())]  # fmt: skip
    for name in ("--model_name", "--model_path", "--model"):
        assert web_demo.main([name, "org/model", *flags]) == 0
    expected = {"device": None, "dtype": "fp32", "chunk_size": 64, "device_map": "auto",
                "max_memory": {0: 2 << 30, "cpu": 1 << 30}, "offload_folder": str(tmp_path),
                "reuse": True, "reuse_budget": None, "quantization": None}  # fmt: skip
    assert loads == [("org/model", expected)] * 3
    assert web_demo.main(["--model", "org/model", *flags, "--no-reuse", "--reuse_budget", "1GiB"]) == 0
    assert loads[-1] == ("org/model", {**expected, "reuse": False, "reuse_budget": 1 << 30})


@needs_gradio
def test_the_sliders_start_at_the_chat_apis_defaults(tiny_chat):
    import gradio as gr

    from deepseek_vl2.web.app import ChatApp

    page = ChatApp(tiny_chat, model_name="t").build()
    sliders = {block.label: block.value for block in page.blocks.values() if isinstance(block, gr.Slider)}
    defaults = GenerationSettings()
    shown = [sliders[label] for label in ("Top-p", "Temperature", "Repetition penalty", "Max new tokens")]
    assert shown == [defaults.top_p, defaults.temperature, defaults.repetition_penalty, defaults.max_new_tokens]


# -- the running server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m deepseek_vl2.web --demo`` on a free port, run from an unrelated folder (assets need no cwd)."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed (pip install -e '.[gradio]')")
    root = tmp_path_factory.mktemp("web")
    port = free_port()
    env = {**os.environ, "DEEPSEEK_VL2_CACHE": str(root / "cache"), "GRADIO_TEMP_DIR": str(root / "gradio"),
           "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    log = open(root / "server.log", "w")
    command = [sys.executable, "-m", "deepseek_vl2.web", "--demo", "--port", str(port)]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the web demo did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_two_clients_get_complete_separate_answers(server):
    from gradio_client import Client, handle_file

    answers: dict[str, tuple] = {}

    def converse(name: str, image: str):
        client = Client(server, verbose=False)
        client.predict({"text": f"I am {name}.", "files": [handle_file(str(IMAGES / image))]}, api_name="/add_message")
        answers[name] = client.predict(0.9, 0.4, 1.1, 24, 4096, api_name="/respond")

    threads = [threading.Thread(target=converse, args=args) for args in (("Ann", "street.png"), ("Bob", "chart.png"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(answers) == {"Ann", "Bob"}
    for name, (chat, _gallery, status) in answers.items():
        user, assistant = chat  # each session holds only its own turn
        assert user["content"][-1]["text"] == f"I am {name}."
        assert assistant["role"] == "assistant" and assistant["content"][0]["text"]
        assert "tokens/s" in status  # the final status: the generation completed
    ann_image, bob_image = (answers[name][0][0]["content"][0]["file"] for name in ("Ann", "Bob"))
    assert Image.open(ann_image).size != Image.open(bob_image).size  # street 800x520, chart 720x480


def test_only_uploads_and_examples_are_served(server):
    for path in (REPO / "pyproject.toml", WEB_DEMO, Path("/etc/passwd")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server}gradio_api/file={path}", timeout=10)
        assert refused.value.code == 403


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright; it drives Debian's chromium)")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    # Assertions wait as long as actions: a 300-token answer takes longer than expect's 5 s default on a CPU
    # without fast bfloat16 (the demo model's dtype).
    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 1000},
        )  # fmt: skip
        context.set_default_timeout(60_000)
        yield context.new_page()
        context.close()


def test_browser_chat_stream_grounding_regenerate_remove(page, server, tmp_path):
    from playwright.sync_api import expect

    page.goto(server)
    expect(page.locator("#demo-notice")).to_contain_text("RANDOM weights")
    bot, user, status = page.locator("#chat .bot-row"), page.locator("#chat .user-row"), page.locator("#status")
    textbox = page.locator("#message textarea")

    def set_slider(label: str, value: float):
        field = page.get_by_label(f"number input for {label}")
        field.fill(str(value))
        field.press("Enter")

    def wait_for_answer(answers: int):
        """Until a *new* answer is complete: the status leaves the last result's line, then shows a new one."""
        page.wait_for_function("() => !document.querySelector('#status').innerText.includes('tokens/s')")
        expect(bot).to_have_count(answers)
        expect(status).to_contain_text("tokens/s")

    # an image and a question: the answer streams in (seen while the status still says "Generating");
    # greedy, so that this random-weight model surely gives a long answer (300 tokens, no early end)
    set_slider("Max new tokens", 300)
    set_slider("Temperature", 0)
    page.locator("#message input[type=file]").set_input_files(str(IMAGES / "street.png"))
    expect(page.locator("#message img")).to_have_count(1)  # uploaded, shown as a thumbnail
    textbox.fill("Describe the image.")
    textbox.press("Enter")
    expect(user.first.locator("img")).to_have_count(1)
    partial = page.wait_for_function(
        """() => {
            const bot = document.querySelector('#chat .bot-row');
            const generating = document.querySelector('#status').innerText.includes('Generating');
            return generating && bot && bot.innerText.trim().length > 0 ? bot.innerText.length : null;
        }"""
    ).json_value()
    wait_for_answer(1)
    assert len(bot.first.inner_text()) > partial  # more text arrived after the first piece was shown

    # a grounding example from images/: clicking it fills the box with its image and prompt
    set_slider("Max new tokens", 40)
    set_slider("Temperature", 0.4)  # sampling again: Regenerate must give another answer
    page.get_by_text("Find all the <|ref|>fruit<|/ref|>").click()
    expect(page.locator("#message img")).to_have_count(1)
    expect(textbox).to_have_value("Find all the <|ref|>fruit<|/ref|>")
    textbox.press("Enter")
    wait_for_answer(2)
    expect(user).to_have_count(2)
    expect(page.locator("#gallery img").first).to_be_visible()

    # Regenerate: a new (sampled) answer replaces the last one
    before = bot.last.inner_text()
    page.locator("#regenerate").click()
    wait_for_answer(2)
    assert bot.last.inner_text() != before

    # Remove last turn: back to the first turn
    page.locator("#remove").click()
    expect(user).to_have_count(1)
    expect(bot).to_have_count(1)

    screenshot = tmp_path / "web_demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    # Stop: the page stops streaming at once and keeps what came so far
    set_slider("Max new tokens", 1500)
    textbox.fill("Tell me more.")
    textbox.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#chat .bot-row').length === 2")
    page.locator("#stop").click()
    expect(status).to_have_text("Stopped.")
    kept = bot.last.inner_text()
    page.wait_for_timeout(1000)
    assert bot.last.inner_text() == kept and kept.strip()
    expect(textbox).to_be_editable()

    # a message that cannot be answered is refused while it is still in the box: a pop-up names the
    # problem (the file as uploaded), the text and images stay, and the chat is neither changed nor hidden
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    page.locator("#message input[type=file]").set_input_files([str(not_an_image), str(IMAGES / "chart.png")])
    expect(page.locator("#message img")).to_have_count(2)
    textbox.fill("What is in them?")
    textbox.press("Enter")
    refusal = page.get_by_text("The image 'notes.png' could not be read: it is not an image")
    expect(refusal).to_be_visible()
    assert "/" not in refusal.inner_text()  # no path on the server
    textbox.fill("<image> What is in it?")
    textbox.press("Enter")
    expect(page.get_by_text("The message places 1 <image> but 2 image(s) are attached")).to_be_visible()
    expect(textbox).to_have_value("<image> What is in it?")
    expect(page.locator("#message img")).to_have_count(2)
    expect(user).to_have_count(2)
    expect(page.locator("#chat").get_by_text("Error", exact=True)).to_have_count(0)
    expect(status).to_have_text("Stopped.")

    # Regenerate with nothing to regenerate is refused the same way
    page.locator("#clear").click()
    expect(user).to_have_count(0)
    expect(textbox).to_have_value("")
    page.locator("#regenerate").click()
    expect(page.get_by_text("There is no turn to regenerate yet.")).to_be_visible()

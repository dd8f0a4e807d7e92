"""The Gradio page: a multimodal chat over one ``DeepseekVL2Chat``, streamed, one generation at a time.

Each browser session keeps its own turns in a ``gr.State``. Sending and regenerating are three steps:
a check that refuses what cannot be answered (its error a pop-up, the input box untouched), a quick
unqueued step that shows the user's turn and locks the input box, then the queued generation, which
shares one concurrency slot ("model") with every other session's, since there is one model on one
device. Stop, Remove last turn and Clear end only their own session's generation.

The chat's reuse keeps each session's last prompt cache, tagged with the session's turn list, so a
follow-up, a Regenerate or a message after Remove last turn prefills only what changed; Clear and the
end of the session (its state deleted) free it.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.processing_utils import save_pil_to_cache
from gradio.utils import get_upload_folder

from ..chat import ContextTooLongError, DeepseekVL2Chat, GenerationSettings
from ..models.conversation import IMAGE_TOKEN
from .context import context_limit, fit_history
from .session import (
    Turn,
    chat_messages,
    deleted_note,
    dropped_note,
    model_history,
    read_upload,
    read_uploads,
    status_line,
    turn_gallery,
    turns_with_uploads,
    user_message,
)

logger = logging.getLogger(__name__)

MAX_UPLOAD_MB = 20  # per file; Gradio refuses a bigger upload before it is stored (MB = 2**20 bytes)
MAX_QUEUE = 32  # requests waiting for the model; more are refused ("queue is full") rather than piled up
REFRESH_S = 0.05  # the shortest time between two updates of a streaming answer
WAITING = "Waiting for the model…"  # until this session's turn in the queue comes
MODEL_SLOT = "model"  # concurrency id shared by every event that runs the model
CHECK_SLOT = "check"  # checks of a message or a Regenerate: never wait for the model
# Gradio keeps every upload and overlay for good unless told otherwise: every CACHE_CHECK_S seconds,
# delete those older than CACHE_MAX_AGE_S, and all when the server stops (the examples stay).
CACHE_CHECK_S, CACHE_MAX_AGE_S = 3600, 86400

# (image files in images/, prompt): grounding, grounded conversation, chart and document
# questions, and two images at once.
EXAMPLES = (
    (("street.png",), "<|ref|>The red car<|/ref|>"),
    (("shapes.png",), "Find all the <|ref|>fruit<|/ref|>"),
    (("shapes.png",), "<|grounding|>I am hungry. What on the table could I eat?"),
    (("chart.png",), "On which day were the most cups of coffee sold, and how many?"),
    (("document.png",), "When does the library open on Saturdays?"),
    (("shapes.png", "shelf.png"), "Which kinds of object appear in both images?"),
)

GUIDE = f"""\
**Grounding**: put the object in `<|ref|>...<|/ref|>` (e.g. `Find all the <|ref|>mugs<|/ref|>`), or start
with `<|grounding|>` for an answer that marks what it mentions; the boxes are drawn on the last image
of the conversation. **Several images**: attach them together; `<image>` in your text places them,
otherwise they come first; each may be up to {MAX_UPLOAD_MB} MB. Older turns are left out when the chat
outgrows the context.
"""


class ChatApp:
    """The page's event handlers, bound to one model; ``build()`` lays out the page."""

    def __init__(
        self,
        chat: DeepseekVL2Chat,
        *,
        model_name: str,
        notice: str | None = None,
        examples_dir: str | Path | None = None,
        delete_cache: tuple[int, int] = (CACHE_CHECK_S, CACHE_MAX_AGE_S),
    ):
        """``delete_cache`` is (check every N seconds, delete files older than M seconds), as Gradio takes it."""
        if not (
            isinstance(delete_cache, (tuple, list))
            and len(delete_cache) == 2
            and all(type(seconds) is int and seconds > 0 for seconds in delete_cache)
        ):
            raise ValueError(f"delete_cache must be two positive whole numbers of seconds, got {delete_cache!r}")
        self.chat = chat
        self.model_name = model_name
        self.notice = notice
        self.examples_dir = Path(examples_dir) if examples_dir is not None else None
        self.delete_cache = tuple(delete_cache)
        self.model_context = chat.context_length

    # -- handlers (plain methods, so tests can call them without a server) -------------------------
    #
    # A session's turn list lives in its gr.State and is only ever changed in place, so the running
    # generation and the buttons see one list: Stop, Remove and Clear flag the turn being answered,
    # and the generation ends itself at the next token and shows the final state. (Cancelling the
    # event instead would race: an update already on its way could land after the button's own.)

    def check_message(self, message: dict | None, turns: list[Turn]) -> None:
        """Refuse a message that cannot be answered while it is still in the input box.

        The page runs this as its own step, with no outputs: its error shows as a pop-up and the
        user's text and images stay in the box to be fixed. (An error in a step that updates the
        chat would hide the chat behind Gradio's "Error" badge, and without queueing the page
        shows no message at all.)
        """
        text, files = self._parse_message(message, turns)
        placed = text.count(IMAGE_TOKEN)
        if placed and placed != len(files):
            raise _refusal(
                f"The message places {placed} {IMAGE_TOKEN} but {len(files)} image(s) are attached: attach one "
                f"image per {IMAGE_TOKEN}, or take {IMAGE_TOKEN} out to put the images first."
            )
        for path in files:
            try:
                read_upload(path)
            except ValueError as error:
                raise _refusal(f"{str(error)[0].upper()}{str(error)[1:]}.") from error

    def add_message(self, message: dict | None, turns: list[Turn]):
        """Show the user's turn at once and lock the input until the answer is done."""
        text, files = self._parse_message(message, turns)
        turns.append(Turn(text=text, images=files))
        return chat_messages(turns), gr.MultimodalTextbox(value=None, interactive=False), turn_gallery(turns), WAITING

    @staticmethod
    def check_regenerate(turns: list[Turn]) -> None:
        """Refuse Regenerate with a pop-up, as ``check_message`` refuses a message."""
        if not turns:
            raise gr.Error("There is no turn to regenerate yet.")
        if not turns[-1].done:
            raise gr.Error("Still answering this message: wait for it, or press Stop first.")

    def prepare_regenerate(self, turns: list[Turn]):
        """Forget the last answer and lock the input; the queued step then answers the turn again."""
        self.check_regenerate(turns)
        turns[-1].reset()
        return chat_messages(turns), gr.MultimodalTextbox(interactive=False), turn_gallery(turns), WAITING

    def respond(
        self,
        turns: list[Turn],
        top_p: float,
        temperature: float,
        repetition_penalty: float,
        max_new_tokens: float,
        max_context_tokens: float,
    ) -> Iterator[tuple]:
        """Answer the last turn, streaming; a failure becomes a message in the chat, never a hang."""
        if not turns or turns[-1].done:  # removed or cleared while this waited in the queue
            yield chat_messages(turns), turn_gallery(turns), ""
            return
        turn, status = turns[-1], "Stopped."
        if turn.stop_requested:  # stopped while it waited in the queue
            turn.done = True
            yield chat_messages(turns), turn_gallery(turns), status
            return
        try:
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
            )
            limit = context_limit(self.model_context, int(max_context_tokens))
            earlier, deleted = turns_with_uploads(turns[:-1])
            *history, message = read_uploads([*model_history(earlier), user_message(turn)])
            fitted = fit_history(self.chat.processor, history, message, settings.max_new_tokens, limit)
            notes = [deleted_note(deleted)] if deleted else []
            if fitted.dropped_turns:
                notes.append(dropped_note(fitted.dropped_turns))
            note = "; ".join(notes)
            if note:
                gr.Warning(f"{note[0].upper()}{note[1:]}.")
            generating = f"Generating… {note}".strip()
            yield chat_messages(turns), turn_gallery(turns), generating

            result, shown_at = None, time.perf_counter()
            stream = self.chat.stream(
                turn.prompt,
                images=message["images"],
                history=fitted.history,
                settings=settings,
                reuse_owner=session_owner(turns),
            )
            try:
                for piece in stream:
                    if turn.stop_requested:
                        break
                    if not isinstance(piece, str):
                        result = piece
                        continue
                    turn.answer += piece
                    if time.perf_counter() - shown_at >= REFRESH_S:  # a fast model outpaces the page
                        shown_at = time.perf_counter()
                        yield chat_messages(turns), turn_gallery(turns), generating
            finally:
                stream.close()  # ends the model's generation at the next token, also if Gradio closes us
                if not turns:  # cleared while answering: the prompt cache this turn just kept is no one's
                    self.forget_session(turns)
            if result is not None:
                turn.answer = result.answer
                turn.overlays = [self._save_image(image) for image in result.grounding_overlays()]
                status = status_line(result, fitted.dropped_turns)
        except ContextTooLongError as error:
            turn.error, status = str(error), "The message does not fit the context."
        except (ValueError, TypeError) as error:  # the library's word for input it cannot use
            turn.error, status = f"Cannot answer this message: {error}", "The message was not accepted."
        except Exception as error:  # any failure must reach the page, and the session must stay usable
            logger.exception("generation failed")
            turn.error, status = f"Generation failed: {error}", "Generation failed."
        turn.done = True
        yield chat_messages(turns), turn_gallery(turns), status

    def stop(self, turns: list[Turn]) -> None:
        """Ask this session's generation to end; it shows what came so far and "Stopped."."""
        if turns:
            turns[-1].stop_requested = True

    def remove_last_turn(self, turns: list[Turn]):
        self.stop(turns)
        if turns:
            turns.pop()
        return chat_messages(turns), turn_gallery(turns), gr.MultimodalTextbox(interactive=True), ""

    def clear(self, turns: list[Turn]):
        self.stop(turns)
        turns.clear()
        self.forget_session(turns)
        return [], [], gr.MultimodalTextbox(value=None, interactive=True), ""

    def forget_session(self, turns: list[Turn]) -> None:
        """Free what the chat keeps for this session's next turn (Clear, or the session has ended)."""
        self.chat.clear_reuse(session_owner(turns))

    @staticmethod
    def _parse_message(message: dict | None, turns: list[Turn]) -> tuple[str, list[str]]:
        """The text and files of a message the session can take now; gr.Error says why not."""
        text = ((message or {}).get("text") or "").strip()
        files = [str(path) for path in (message or {}).get("files") or []]
        if not text and not files:
            raise gr.Error("Type a message or attach an image first.")
        if turns and not (turns[-1].done or turns[-1].stop_requested):
            raise gr.Error("Still answering the last message: wait for it, or press Stop.")
        return text, files

    @staticmethod
    def unlock_input():
        return gr.MultimodalTextbox(interactive=True)

    def _save_image(self, image) -> str:
        """Overlays go straight into Gradio's file cache: served like uploads, never copied again."""
        return save_pil_to_cache(image, cache_dir=get_upload_folder(), name="grounding", format="png")

    # -- layout ------------------------------------------------------------------------------------

    def examples(self) -> list[list[dict]]:
        if self.examples_dir is None:
            return []
        found = []
        for names, text in EXAMPLES:
            paths = [self.examples_dir / name for name in names]
            if all(path.is_file() for path in paths):
                found.append([{"text": text, "files": [str(path) for path in paths]}])
        return found

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="DeepSeek-VL2 chat", analytics_enabled=False, delete_cache=self.delete_cache) as demo:
            gr.Markdown(f"# DeepSeek-VL2 chat\nModel: `{self.model_name}` on `{self.chat.device}`")
            if self.notice:
                gr.Markdown(f"**{self.notice}**", elem_id="demo-notice")
            turns = gr.State([], delete_callback=self.forget_session)
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        label="Chat", elem_id="chat", height=520, buttons=["copy", "copy_all"], feedback_options=None,
                        allow_tags=[IMAGE_TOKEN.strip("<>")],  # show <image> as text, not as an HTML tag
                    )  # fmt: skip
                    textbox = gr.MultimodalTextbox(
                        file_types=["image"],
                        file_count="multiple",
                        sources=["upload"],
                        placeholder="Ask something; attach or drop images here (several per turn are fine)",
                        show_label=False,
                        elem_id="message",
                    )
                    with gr.Row():
                        stop = gr.Button("Stop", elem_id="stop")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate")
                        remove = gr.Button("Remove last turn", elem_id="remove")
                        clear = gr.Button("Clear", elem_id="clear")
                    status = gr.Markdown(elem_id="status")
                with gr.Column(scale=1):
                    with gr.Accordion("Generation settings", open=True):
                        defaults = GenerationSettings()
                        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                        temperature = gr.Slider(
                            0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature", info="0 = greedy"
                        )
                        repetition_penalty = gr.Slider(
                            1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"
                        )
                        max_new_tokens = gr.Slider(
                            1, min(4096, self.model_context - 1),
                            value=min(defaults.max_new_tokens, self.model_context // 2),
                            step=1, precision=0, label="Max new tokens",
                        )  # fmt: skip
                        max_context_tokens = gr.Slider(
                            64, self.model_context, value=self.model_context, step=1, precision=0,
                            label="Max context tokens", info="prompt (history and images) + answer",
                        )  # fmt: skip
                    gallery = gr.Gallery(label="This turn's images", columns=2, height=300, elem_id="gallery")
            if examples := self.examples():
                gr.Examples(examples=examples, inputs=[textbox], label="Examples (images/ folder)")
            gr.Markdown(GUIDE)

            settings = [top_p, temperature, repetition_penalty, max_new_tokens, max_context_tokens]
            shown = [chatbot, textbox, gallery, status]
            respond = {"fn": self.respond, "inputs": [turns, *settings], "outputs": [chatbot, gallery, status],
                       "concurrency_id": MODEL_SLOT, "show_progress": "minimal"}  # fmt: skip
            unlock = {"fn": self.unlock_input, "outputs": textbox, "queue": False, "api_visibility": "private"}

            # queued (an unqueued step's error never reaches the page), but not behind the model
            check = {"outputs": None, "concurrency_id": CHECK_SLOT, "concurrency_limit": None,
                     "show_progress": "hidden", "api_visibility": "private"}  # fmt: skip
            checked = textbox.submit(self.check_message, [textbox, turns], **check)
            sent = checked.success(self.add_message, [textbox, turns], shown, queue=False, api_name="add_message")
            sent.success(**respond, api_name="respond").then(**unlock)
            checked = regenerate.click(self.check_regenerate, turns, **check)
            again = checked.success(self.prepare_regenerate, turns, shown, queue=False, api_name="prepare_regenerate")
            again.success(**respond, api_name="regenerate").then(**unlock)

            stop.click(self.stop, turns, None, queue=False, api_name="stop")
            after_change = [chatbot, gallery, textbox, status]
            remove.click(self.remove_last_turn, turns, after_change, queue=False, api_name="remove_last_turn")
            clear.click(self.clear, turns, after_change, queue=False, api_name="clear")
        return demo


def session_owner(turns: list[Turn]) -> int:
    """The tag of a session's kept prompt cache: its turn list, the one object a session keeps for good."""
    return id(turns)


def _refusal(message: str) -> gr.Error:
    """The page shows an error's message as HTML: ``<image>`` or a file's name must show as typed."""
    return gr.Error(html.escape(message))


def launch(
    app: ChatApp,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    root_path: str | None = None,
    block: bool = True,
) -> gr.Blocks:
    """Serve the page: one generation at a time, uploads up to MAX_UPLOAD_MB, no public link unless asked.

    Gradio serves only its own cache (uploads, the copied examples, our overlays): no allowed_paths.
    With ``block=False`` the server runs in the background (tests) and ``.close()`` on the returned
    Blocks stops it.
    """
    demo = app.build()
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        root_path=root_path,
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        ssr_mode=False,
        theme=gr.themes.Soft(),
        prevent_thread_lock=not block,
    )
    return demo

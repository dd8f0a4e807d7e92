"""One browser session's chat, and how it is shown: the turns, the model's messages, the chat view.

Nothing here needs Gradio: the chat view is plain message dicts in the format ``gr.Chatbot``
reads (``{"role": "user" | "assistant", "content": [text, {"path": file}, ...]}``), so it can be
tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..chat import ChatResult
from ..grounding import clean_answer
from ..models.conversation import ASSISTANT, USER, place_images
from ..utils.io import load_image


@dataclass
class Turn:
    """A user message and what came back: the answer (grounding tags kept), or an error."""

    text: str  # what the user typed
    images: list[str]  # files the user attached (paths on the server)
    answer: str = ""
    overlays: list[str] = field(default_factory=list)  # annotated copies of images, for grounding answers
    error: str | None = None
    done: bool = False  # generation ended (finished, failed or stopped); until then the answer is partial
    stop_requested: bool = False  # Stop (or Remove, Clear) was pressed while it was being answered

    @property
    def prompt(self) -> str:
        """The user message as the model reads it: one ``<image>`` per attached image, first, unless placed."""
        return place_images(self.text, len(self.images))

    @property
    def answered(self) -> bool:
        return bool(self.answer) and self.error is None

    def reset(self) -> None:
        self.answer, self.overlays, self.error = "", [], None
        self.done = self.stop_requested = False


def model_history(turns: list[Turn]) -> list[dict]:
    """The answered turns as model messages; failed and unanswered turns are left out."""
    messages = []
    for turn in turns:
        if turn.answered:
            messages += [user_message(turn), {"role": ASSISTANT, "content": turn.answer}]
    return messages


def turns_with_uploads(turns: list[Turn]) -> tuple[list[Turn], int]:
    """The turns whose uploads are all still on the server, and how many answered turns lost one.

    The upload cache deletes old files; a turn that refers to a deleted one is left out of what the model
    sees (the page still shows it) rather than failing every later message.
    """
    kept, gone = [], 0
    for turn in turns:
        if all(Path(path).is_file() for path in turn.images):
            kept.append(turn)
        elif turn.answered:
            gone += 1
    return kept, gone


def user_message(turn: Turn) -> dict:
    return {"role": USER, "content": turn.prompt, "images": list(turn.images)}


def read_uploads(messages: list[dict]) -> list[dict]:
    """The messages with their uploaded images read (upright RGB), as the model takes them."""
    return [{**message, "images": [read_upload(path) for path in message.get("images", [])]} for message in messages]


def read_upload(path: str) -> Image.Image:
    """One uploaded image. Its errors (ValueError) name the file as the user named it.

    The page shows these errors, so they never say where the file lies on the server. Gradio keeps
    each upload under its original file name, in a folder of its own.
    """
    name = Path(path).name
    shown = f"the image {name!r}" if name else "the uploaded image"
    try:
        return load_image(path)
    except FileNotFoundError as error:
        raise ValueError(
            f"{shown} is no longer on the server (old uploads are deleted): press Clear and attach it again"
        ) from error
    except ValueError as error:
        raise ValueError(f"{shown} could not be read: {_unreadable_reason(error.__cause__)}") from error


def _unreadable_reason(cause: BaseException | None) -> str:
    """Why Pillow refused a file, in words that do not name its path (``load_image`` keeps the cause)."""
    if isinstance(cause, Image.DecompressionBombError):
        return f"it has too many pixels (the limit is {2 * Image.MAX_IMAGE_PIXELS:,})"
    if isinstance(cause, UnidentifiedImageError):
        return "it is not an image, or in a format that cannot be read (PNG, JPEG, WebP, GIF and BMP can)"
    return "it is damaged or cut short"


def chat_messages(turns: list[Turn]) -> list[dict]:
    """The chat view: each user message with its images; each answer cleaned, with its overlays."""
    messages = []
    for turn in turns:
        user_content = [{"path": path} for path in turn.images]
        if turn.text:
            user_content.append(turn.text)
        messages.append({"role": "user", "content": user_content})
        if turn.error is not None:
            messages.append({"role": "assistant", "content": f"**Error:** {turn.error}"})
            continue
        text = clean_answer(turn.answer)
        assistant_content = ([text] if text else []) + [{"path": path} for path in turn.overlays]
        if not assistant_content and turn.done:
            assistant_content = ["*(no answer)*"]
        if assistant_content:  # nothing yet: the chat shows its "pending" dots
            messages.append({"role": "assistant", "content": assistant_content})
    return messages


def turn_gallery(turns: list[Turn]) -> list[tuple[str, str]]:
    """The last turn's images with captions: what the user attached, then the grounding overlays."""
    if not turns:
        return []
    last = turns[-1]
    attached = [(path, f"image {index + 1}") for index, path in enumerate(last.images)]
    return attached + [(path, "grounding") for path in last.overlays]


def status_line(result: ChatResult, dropped_turns: int) -> str:
    """One line under the chat: token counts, speed, and whether earlier turns were left out."""
    parts = [
        f"{result.prompt_tokens} prompt tokens + {result.new_tokens} new tokens",
        f"{result.timings.get('tokens_per_s', 0.0):.1f} tokens/s",
    ]
    if dropped_turns:
        parts.append(dropped_note(dropped_turns))
    return " · ".join(parts)


def deleted_note(turns: int) -> str:
    """Why earlier turns were left out although they fit (see ``turns_with_uploads``)."""
    if turns == 1:
        return "an earlier turn was left out: its image has been deleted from the server"
    return f"{turns} earlier turns were left out: their images have been deleted from the server"


def dropped_note(dropped_turns: int) -> str:
    """What the model did not see this time (the page still shows every turn)."""
    if dropped_turns == 1:
        return "the oldest turn was left out to fit the context"
    return f"the {dropped_turns} oldest turns were left out to fit the context"

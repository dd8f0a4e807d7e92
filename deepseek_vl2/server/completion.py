"""One chat completion: an OpenAI request turned into a ``DeepseekVL2Chat.stream`` call, and its answer.

The server's worker and the batch runner both go through here, so a request gets the same tokens,
counts and errors from either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from ..chat import ChatResult, ContextTooLongError, DeepseekVL2Chat, GenerationSettings
from ..grounding import GroundingResult, parse_grounding
from ..models.conversation import place_images
from .media import MediaError, MediaPolicy
from .protocol import APIError, ChatCompletionRequest, Message

MAX_IMAGES = 8  # per request; nine untiled images (421 tokens each) already fill the 4096-token context


@dataclass
class ChatCall:
    """What ``DeepseekVL2Chat.stream`` is called with, and the prompt's size, known before it runs."""

    prompt: str
    images: list[Image.Image]
    history: list[dict]
    settings: GenerationSettings
    prompt_tokens: int


@dataclass
class Completion:
    content: str  # the answer as the model wrote it (grounding tags included), cut before a stop string
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    grounding: dict


def prepare_call(
    chat: DeepseekVL2Chat, request: ChatCompletionRequest, media: MediaPolicy, max_images: int = MAX_IMAGES
) -> ChatCall:
    """Load the images, count the prompt and choose the settings; APIError 400 for what cannot be answered.

    Everything that can be refused is refused here, before the request waits for the model.
    """
    *earlier, last = request.messages
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's, not {last.role!r}", code="invalid_value",
                       param=f"messages.{len(earlier)}.role")  # fmt: skip
    image_count = sum(len(message.image_urls) for message in request.messages)
    if image_count > max_images:
        raise APIError(400, f"the request has {image_count} images; at most {max_images}", code="too_many_images",
                       param="messages")  # fmt: skip
    history = [_model_message(message, index, media) for index, message in enumerate(earlier)]
    images = _load_images(last, len(earlier), media)
    try:
        conversation, all_images = chat.build_conversation(last.text, images, history)
        prompt_tokens = chat.processor.count_tokens(conversation, all_images)
        settings = _settings(request, chat.context_length - prompt_tokens)
        chat.check_context(prompt_tokens, settings.max_new_tokens)
    except ContextTooLongError as error:
        raise APIError(400, str(error), code="context_length_exceeded", param="messages") from None
    except (ValueError, TypeError) as error:
        raise APIError(400, str(error), code="invalid_value") from None
    return ChatCall(last.text, images, history, settings, prompt_tokens)


def _settings(request: ChatCompletionRequest, room: int) -> GenerationSettings:
    """The request's settings; the chat API's defaults for what it leaves out.

    Without a token limit, the answer may take what the context has ``room`` for, as in OpenAI's API,
    but at most the chat API's usual answer length.
    """
    limit = request.answer_limit
    if limit is None:
        limit = max(1, min(GenerationSettings.max_new_tokens, room))
    return GenerationSettings(max_new_tokens=limit, stop=request.stop_strings, **request.sampling)


def _model_message(message: Message, index: int, media: MediaPolicy) -> dict:
    """An earlier message as the chat API's history holds it (images placed as for the new prompt)."""
    role = "system" if message.role == "developer" else message.role
    images = _load_images(message, index, media)
    if images and role != "user":
        raise APIError(400, f"message {index} ({role}) has images; only user messages may",
                       code="invalid_value", param=f"messages.{index}.content")  # fmt: skip
    return {"role": role, "content": place_images(message.text, len(images)), "images": images}


def _load_images(message: Message, index: int, media: MediaPolicy) -> list[Image.Image]:
    images = []
    for number, url in enumerate(message.image_urls):
        try:
            images.append(media.load(url))
        except MediaError as error:
            raise APIError(400, f"message {index}, image {number + 1}: {error}", code="invalid_image",
                           param=f"messages.{index}.content") from None  # fmt: skip
    return images


def run_completion(chat: DeepseekVL2Chat, call: ChatCall) -> Iterator[str | Completion]:
    """Text pieces as they are generated (cut before a stop string), then the Completion.

    Closing the iterator early stops generation at the next token.
    """
    cutter = StopCutter(call.settings.stop)
    stream = chat.stream(call.prompt, call.images, call.history, settings=call.settings)
    try:
        for item in stream:
            if isinstance(item, ChatResult):
                result = item
            elif piece := cutter.feed(item):
                yield piece
    finally:
        stream.close()
    if rest := cutter.finish():
        yield rest
    yield Completion(
        content=cutter.text,
        finish_reason="stop" if cutter.stopped else result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.new_tokens,
        grounding=grounding_json(parse_grounding(cutter.text), result.images),
    )


class StopCutter:
    """Passes text on, holding back what may be the start of a stop string, and ends before the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""  # what has been passed on
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        found = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.stopped = True
            return self._pass(min(found))
        return self._pass(len(self.pending) - self._held_back())

    def finish(self) -> str:
        return "" if self.stopped else self._pass(len(self.pending))

    def _held_back(self) -> int:
        """Length of the longest end of the pending text that begins a stop string."""
        return max(
            (size for stop in self.stops for size in range(1, len(stop)) if self.pending.endswith(stop[:size])),
            default=0,
        )

    def _pass(self, count: int) -> str:
        passed, self.pending = self.pending[:count], self.pending[count:]
        self.text += passed
        return passed


def grounding_json(grounding: GroundingResult, images: Sequence[Image.Image]) -> dict:
    """The boxes on the 0-999 grid, and in pixels of each image of the conversation."""
    return {
        "boxes": grounding.to_json()["boxes"],
        "images": [
            {"width": image.width, "height": image.height, "boxes": grounding.to_json(image.size)["boxes"]}
            for image in images
        ],
        "problems": list(grounding.problems),
    }

"""Keep a chat inside the model's context: drop the oldest turns until the prompt and the answer fit.

Tokens are counted by the processor on the very conversation the model will see, so image tokens
are counted exactly, including the switch to untiled images when a conversation holds more than two
images (which is why dropping a turn can *add* tokens, and why every candidate is counted rather
than estimated). Counting reads only the images' sizes (``DeepseekVLV2Processor.count_tokens``), so
trying every candidate never resizes an image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from ..chat import ContextTooLongError
from ..models.processing import DeepseekVLV2Processor
from ..utils.io import load_image


@dataclass
class FittedPrompt:
    history: list[dict]  # the most recent whole turns that fit, as model messages
    dropped_turns: int  # how many of the oldest turns were left out
    prompt_tokens: int  # tokens of history + the new user turn, image tokens included


def context_limit(model_context: int, user_limit: int | None = None) -> int:
    """The context to fit into: the model's, or the user's limit when that is smaller."""
    if user_limit is None:
        return model_context
    if isinstance(user_limit, bool) or not isinstance(user_limit, int) or user_limit <= 0:
        raise ValueError(f"the context limit must be a positive number of tokens, got {user_limit!r}")
    return min(model_context, user_limit)


def count_prompt_tokens(processor: DeepseekVLV2Processor, messages: Sequence[Mapping]) -> int:
    """Tokens the model reads for ``messages`` (ending with the user turn to answer), images included."""
    images = [load_image(image) for message in messages for image in message.get("images", [])]
    return processor.count_tokens(list(messages), images)


def fit_history(
    processor: DeepseekVLV2Processor,
    history: Sequence[Mapping],
    message: Mapping,
    max_new_tokens: int,
    context_tokens: int,
) -> FittedPrompt:
    """The longest recent part of ``history`` with which ``message`` and its answer fit the context.

    ``history`` holds whole turns (a user message, then the assistant's answer), oldest first;
    ``message`` is the new user message. Turns are dropped oldest first until prompt tokens +
    ``max_new_tokens`` <= ``context_tokens``. Raises ContextTooLongError when even the new message
    alone does not fit.
    """
    if len(history) % 2:
        raise ValueError(f"history must hold whole turns (user, assistant), got {len(history)} messages")
    if max_new_tokens >= context_tokens:
        raise ContextTooLongError(
            f"max new tokens ({max_new_tokens}) leaves no room for a prompt in a {context_tokens}-token "
            "context: lower max new tokens"
        )
    loaded = _with_loaded_images([*history, message])  # load each image once, not once per candidate
    *history_loaded, message_loaded = loaded
    turns = len(history) // 2
    for dropped in range(turns + 1):
        candidate = [*history_loaded[2 * dropped :], message_loaded]
        tokens = processor.count_tokens(candidate, [image for m in candidate for image in m["images"]])
        if tokens + max_new_tokens <= context_tokens:
            return FittedPrompt([dict(m) for m in history[2 * dropped :]], dropped, tokens)
    raise ContextTooLongError(
        f"this message needs {tokens} prompt tokens + {max_new_tokens} new tokens, more than the "
        f"{context_tokens}-token context even without earlier turns: use fewer or smaller images, a "
        "shorter message, or fewer max new tokens"
    )


def _with_loaded_images(messages: Sequence[Mapping]) -> list[dict]:
    """The messages with every image upright RGB, as the chat will see it; a file used twice is read once."""
    cache: dict[str, Image.Image] = {}

    def load(image: str | os.PathLike | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            return load_image(image)
        key = os.fspath(image)
        if key not in cache:
            cache[key] = load_image(key)
        return cache[key]

    return [{**message, "images": [load(image) for image in message.get("images", [])]} for message in messages]

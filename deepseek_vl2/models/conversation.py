"""The ``deepseek`` chat format that all DeepSeek-VL2 models were trained with.

A conversation reads::

    {system}\\n\\n<|User|>: {question}\\n\\n<|Assistant|>: {answer}<｜end▁of▁sentence｜><|User|>: ...

and a prompt for generation ends with ``<|Assistant|>:``. The system block is present only when
there is system text: ``system_prompt=`` text is followed by the blank line of the chat template; a
``system`` message is followed by nothing, as the original tokenizes (and trained on) it. The model
sees each user turn *together with* the assistant prompt that follows it, and each answer as a
separate piece of text without the space after ``<|Assistant|>:``; :func:`format_user_turn` gives
the first, the processor adds the second.
:meth:`Conversation.get_prompt` is the readable form, with that space, as the original shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SYSTEM = "system"
TURN_SEP = "\n\n"  # after the system text and after each question
EOS = "<｜end▁of▁sentence｜>"  # after each answer
PAD = "<｜▁pad▁｜>"  # the pad token the processor adds to a tokenizer that has none
IMAGE_TOKEN = "<image>"  # where an image goes in a user turn
# Grounding: <|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>; <|grounding|> asks for a grounded caption.
REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
GROUNDING = "<|grounding|>"
GROUNDING_TOKENS = (REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE, GROUNDING)  # in the order the processor adds them

# Accepted spellings of the roles, compared case-insensitively.
_ROLE_ALIASES = {
    USER.lower(): USER,
    "user": USER,
    ASSISTANT.lower(): ASSISTANT,
    "assistant": ASSISTANT,
    SYSTEM: SYSTEM,
    "deepseekapi-sys": SYSTEM,  # the original's other name for a system message
}


def format_user_turn(question: str) -> str:
    """A user turn followed by the assistant prompt, exactly as the model reads it."""
    if not question:
        return f"{USER}:{ASSISTANT}:"
    return f"{USER}: {question}{TURN_SEP}{ASSISTANT}:"


def place_images(prompt: str, image_count: int) -> str:
    """``prompt`` with one ``<image>`` per image put first, unless it places them itself.

    A prompt that places some but not all of its images is left as it is: the processor names the
    mismatch.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(image_count, bool) or not isinstance(image_count, int):
        raise TypeError(f"image_count must be an int, got {type(image_count).__name__}")
    if image_count < 0:
        raise ValueError(f"image_count must be >= 0, got {image_count}")
    if IMAGE_TOKEN in prompt:
        return prompt
    return f"{IMAGE_TOKEN}\n" * image_count + prompt


def is_system_role(role: object) -> bool:
    """Whether ``role`` is any accepted spelling of the system role."""
    return isinstance(role, str) and _ROLE_ALIASES.get(role.lower()) == SYSTEM


def normalize_role(role: object, index: int) -> str:
    """``USER``, ``ASSISTANT`` or ``SYSTEM`` for any accepted spelling; ValueError otherwise."""
    canonical = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
    if canonical is None:
        raise ValueError(
            f"message {index} has unknown role {role!r}; use '{USER}' or 'user', "
            f"'{ASSISTANT}' or 'assistant', or 'system'"
        )
    return canonical


@dataclass
class Conversation:
    """System text plus alternating user and assistant turns, as ``(role, text)`` pairs.

    Texts are stored stripped of surrounding whitespace, as the original processor used them.
    Build one from chat messages with :meth:`from_messages`.
    """

    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)
    system_separator: str = TURN_SEP  # "" for text from a system message

    @property
    def system_block(self) -> str:
        """The text that precedes the first user turn ("" when there is no system text)."""
        return f"{self.system}{self.system_separator}" if self.system else ""

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping], system_prompt: str = "") -> Conversation:
        """Validate ``[{"role": ..., "content": ...}, ...]`` and put it in canonical form.

        A ``system`` message may only come first; ``system_prompt`` gives system text as an argument
        instead (one or the other; they differ only in the blank line after the text). The first turn
        must be the user's. A conversation that ends with a user turn gets the empty assistant turn that
        asks the model to answer.
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"conversations must be a list of message dicts, got {type(messages).__name__}")
        if not messages:
            raise ValueError("the conversation is empty: give at least one user message")
        if not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string, got {type(system_prompt).__name__}")

        conversation = cls(system=system_prompt.strip())
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise TypeError(f"message {index} must be a dict with 'role' and 'content' keys, got {message!r}")
            role = normalize_role(message["role"], index)
            content = message["content"]
            if not isinstance(content, str):
                raise TypeError(f"message {index} ({role}) has content of type {type(content).__name__}, not str")
            if role == SYSTEM:
                if index != 0:
                    raise ValueError(f"a system message may only come first, found one at position {index}")
                if conversation.system:
                    raise ValueError("system text given twice: as a system message and as system_prompt=")
                conversation.system, conversation.system_separator = content.strip(), ""
            elif not conversation.turns and role != USER:
                raise ValueError(f"the conversation must start with a user turn, message {index} is {role}")
            else:
                conversation.turns.append((role, content.strip()))

        if not conversation.turns:
            raise ValueError("the conversation has a system message but no user message")
        if conversation.turns[-1][0] == USER:
            conversation.turns.append((ASSISTANT, ""))
        return conversation

    def get_prompt(self) -> str:
        """The conversation as one readable string (the processor's ``sft_format``)."""
        text = self.system_block
        for role, message in self.turns:
            if not message:
                text += f"{role}:"
            else:
                text += f"{role}: {message}{TURN_SEP if role == USER else EOS}"
        return text.strip()

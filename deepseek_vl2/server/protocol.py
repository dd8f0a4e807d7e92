"""OpenAI's chat-completion request and response shapes, and the errors a request can get.

Requests are parsed with pydantic straight from the body bytes: its JSON parser refuses invalid
UTF-8 and nesting deeper than its recursion limit before any Python object is built. Parameters
that OpenAI defines but this server does not implement are refused (422) rather than ignored, so
a client never silently gets something other than what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 256  # per request; a longer chat cannot fit the 4096-token context anyway
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI's error object, with its HTTP status."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images are always tiled as trained


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @pydantic.model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs a {self.type!r} field")
        return self


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None  # accepted and not used, as by most servers

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, content):
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    @property
    def text(self) -> str:
        """The text parts joined by newlines (as vLLM joins them)."""
        return "\n".join(part.text for part in self.content if part.type == "text")

    @property
    def image_urls(self) -> list[str]:
        return [part.image_url.url for part in self.content if part.type == "image_url"]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None  # not OpenAI's; vLLM's extra parameter of the same name
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI parameters accepted only at their neutral value
    n: int = 1
    logprobs: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def answer_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or else ``max_tokens``, as vLLM reads them."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def sampling(self) -> dict:
        """The sampling settings the client gave, under GenerationSettings' names."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }
        return {name: value for name, value in given.items() if value is not None}


def parse_request(body: bytes | str | dict) -> ChatCompletionRequest:
    """The validated request; APIError 400 (malformed) or 422 (a parameter this server does not support)."""
    try:
        if isinstance(body, dict):
            request = ChatCompletionRequest.model_validate(body)
        else:
            request = ChatCompletionRequest.model_validate_json(body)
    except pydantic.ValidationError as error:
        raise _request_error(error) from None
    _check_supported(request)
    return request


def _request_error(error: pydantic.ValidationError) -> APIError:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
                        code="invalid_json")  # fmt: skip
    if first["type"] == "extra_forbidden":
        return APIError(422, f"unsupported parameter {where!r}", code="unsupported_parameter", param=where)
    return APIError(400, f"{where or 'body'}: {first['msg']}", code="invalid_value", param=where or None)


def _check_supported(request: ChatCompletionRequest) -> None:
    neutral = {"n": 1, "logprobs": False, "frequency_penalty": 0.0, "presence_penalty": 0.0}
    for name, value in neutral.items():
        if getattr(request, name) != value:
            raise APIError(
                422, f"{name}={getattr(request, name)!r} is not supported (only {value!r})",
                code="unsupported_parameter", param=name,
            )  # fmt: skip
    if len(request.stop_strings) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop holds {len(request.stop_strings)} strings; at most {MAX_STOP_STRINGS}",
                       code="invalid_value", param="stop")  # fmt: skip


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(request_id: str, model: str, completion) -> dict:
    """A ``chat.completion`` object for a finished completion (``completion.Completion``)."""
    message = {"role": "assistant", "content": completion.content, "grounding": completion.grounding}
    return {
        **_envelope(request_id, model, "chat.completion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": completion.finish_reason}],
        "usage": usage(completion.prompt_tokens, completion.completion_tokens),
    }


def chunk_body(request_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """A ``chat.completion.chunk`` of a stream."""
    return {
        **_envelope(request_id, model, "chat.completion.chunk"),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk_body(request_id: str, model: str, completion) -> dict:
    """The last chunk of a stream asked for with ``stream_options.include_usage``: no choices, the usage."""
    return {
        **_envelope(request_id, model, "chat.completion.chunk"),
        "choices": [],
        "usage": usage(completion.prompt_tokens, completion.completion_tokens),
    }


def _envelope(request_id: str, model: str, kind: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}


def models_body(model: str, created: int, context_length: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": created, "owned_by": "deepseek_vl2",
             "max_model_len": context_length},
        ],
    }  # fmt: skip

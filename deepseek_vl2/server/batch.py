"""``batch``: run an OpenAI batch file (the format vLLM's ``run_batch`` reads) and write one result per line.

Input, one request a line: ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {...}}``. Output, one line per request as it finishes: ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``, where ``body`` is the chat.completion, or OpenAI's
error object with the status the server would answer. A line that is not a request at all gets
``"response": null`` and an ``error`` naming its line. Results are appended and flushed one by one,
so a killed run loses nothing, and a re-run skips every request already in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydantic
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..chat import DeepseekVL2Chat
from .completion import Completion, prepare_call, run_completion
from .loading import check_model_options, default_model_name, load_chat
from .media import FORMATS, MediaPolicy
from .protocol import APIError, completion_body, completion_id, parse_request
from .serve import media_policy

CHAT_URL = "/v1/chat/completions"


class BatchLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    custom_id: str = pydantic.Field(min_length=1)
    method: str
    url: str
    body: dict


@dataclass
class Summary:
    done: int = 0  # answered in this run (errors included)
    failed: int = 0  # of those, how many are error lines
    skipped: int = 0  # already in the output from an earlier run


def run_batch(
    chat: DeepseekVL2Chat,
    input_path: Path,
    output_path: Path,
    served_model_name: str,
    media: MediaPolicy | None = None,
    progress: bool = True,
) -> Summary:
    """Answer every request of ``input_path`` not yet in ``output_path``, appending one line each."""
    from tqdm import tqdm

    media = media or MediaPolicy()
    finished = _finished(output_path)
    keys = [line.key for line in _lines(input_path)]
    summary = Summary(skipped=sum(key in finished for key in keys))
    bar = tqdm(total=len(keys) - summary.skipped, unit="request", disable=not progress, file=sys.stderr)
    with output_path.open("a", encoding="utf-8") as output, bar:
        for line in _lines(input_path):
            if line.key in finished:
                continue
            result = _answer(chat, line, served_model_name, media)
            output.write(json.dumps(result, ensure_ascii=False) + "\n")
            output.flush()
            summary.done += 1
            summary.failed += result["error"] is not None or result["response"]["status_code"] != 200
            bar.update()
    return summary


@dataclass
class _InputLine:
    number: int
    text: str
    request: BatchLine | None  # None: not a batch request line
    problem: str = ""  # why the line cannot be run

    @property
    def key(self) -> str:
        """What identifies the line's result in the output: its custom_id, or its number when unusable."""
        return self.request.custom_id if not self.problem else f"line {self.number}"


def _lines(path: Path) -> Iterator[_InputLine]:
    """The non-blank lines, parsed; a repeated custom_id makes its later lines unusable."""
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                line = _parse_line(number, text)
                if line.request is not None:
                    custom_id = line.request.custom_id
                    if custom_id in seen:
                        line.problem = f"custom_id {custom_id!r} was used on line {seen[custom_id]}"
                    seen.setdefault(custom_id, number)
                yield line


def _parse_line(number: int, text: str) -> _InputLine:
    try:
        request = BatchLine.model_validate_json(text)
    except pydantic.ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"])
        return _InputLine(number, text, None, f"{where + ': ' if where else ''}{problem['msg']}")
    return _InputLine(number, text, request)


def _finished(output_path: Path) -> set[str]:
    """The keys of the requests already answered; a last line cut short by a kill is removed first."""
    if not output_path.exists():
        return set()
    data = output_path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output_path.write_bytes(data)
    keys = set()
    for text in data.decode("utf-8", errors="replace").splitlines():
        try:
            result = json.loads(text)
        except ValueError:
            continue
        if isinstance(result, dict):
            error = result.get("error") or {}
            keys.add(result.get("custom_id") if error.get("line") is None else f"line {error['line']}")
    return keys


def _answer(chat: DeepseekVL2Chat, line: _InputLine, served_model_name: str, media: MediaPolicy) -> dict:
    """The output line for one input line."""
    if line.problem:
        return _line_error(line, f"line {line.number}: {line.problem}")
    request = line.request
    if request.method != "POST" or request.url != CHAT_URL:
        return _result(request.custom_id, 400, APIError(400, f"only POST {CHAT_URL} is supported, not "
                       f"{request.method} {request.url}", code="unsupported_url").body())  # fmt: skip
    try:
        completion = _complete(chat, request.body, served_model_name, media)
    except APIError as error:
        return _result(request.custom_id, error.status, error.body())
    return _result(request.custom_id, 200, completion_body(completion_id(), served_model_name, completion))


def _complete(chat: DeepseekVL2Chat, body: dict, served_model_name: str, media: MediaPolicy) -> Completion:
    """The request's completion, through the same steps as the server's; APIError as the server would answer."""
    parsed = parse_request(body)
    if parsed.model != served_model_name:
        raise APIError(404, f"the model {parsed.model!r} does not exist; this batch runs {served_model_name!r}",
                       code="model_not_found", param="model")  # fmt: skip
    if parsed.stream:
        raise APIError(400, "stream is not supported in a batch", code="invalid_value", param="stream")
    call = prepare_call(chat, parsed, media)
    try:
        *_, completion = run_completion(chat, call)
    except (ValueError, TypeError) as error:
        raise APIError(400, str(error), code="invalid_value") from None
    except Exception as error:  # one failed request must not end the run
        raise APIError(500, f"generation failed: {error}", code="generation_failed") from None
    return completion


def _result(custom_id: str, status: int, body: dict) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def _line_error(line: _InputLine, message: str) -> dict:
    """A line that is no request: no response, an error naming the line (its number marks it as answered)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_request_line", "message": message, "line": line.number},
    }


# ---------------------------------------------------------------------------------------------- a folder of images


def image_extensions() -> set[str]:
    """File name endings of the formats the server reads (.png, .jpg, .jpeg, .webp, .gif ...)."""
    return {ext for ext, name in Image.registered_extensions().items() if name in FORMATS}


def image_requests(folder: Path, prompt: str, model: str, sampling: dict) -> list[dict]:
    """One batch request per image under ``folder`` (sorted; custom_id = its relative path), all with ``prompt``.

    Images are ``file://`` URLs: run the file with ``--allowed-local-media-path`` set to the folder
    (vLLM's option of the same name, too).
    """
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a folder")
    extensions = image_extensions()
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in extensions)
    if not files:
        raise ValueError(f"--images {folder}: no PNG, JPEG, WebP or GIF files in it")
    return [
        {
            "custom_id": path.relative_to(folder).as_posix(),
            "method": "POST",
            "url": CHAT_URL,
            "body": {
                "model": model,
                "messages": [
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": path.resolve().as_uri()}},
                        {"type": "text", "text": prompt},
                    ]},
                ],
                **sampling,
            },
        }
        for path in files
    ]  # fmt: skip


def write_image_requests(path: Path, requests: list[dict]) -> None:
    """Write the batch file, or keep the identical one a killed run left; refuse to overwrite another file."""
    text = "".join(json.dumps(request, ensure_ascii=False) + "\n" for request in requests)
    if path.exists() and path.read_text(encoding="utf-8", errors="replace") != text:
        raise ValueError(f"{path} exists and holds other requests; remove it or give another INPUT.jsonl")
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the command


def batch_main(args: argparse.Namespace) -> int:
    """Run the batch; 2 (with one error line) for bad options, found before the model loads."""
    try:
        options = check_model_options(args)
        name = args.served_model_name or default_model_name(args)
        media = media_policy(args)
        if args.images is not None:
            if not args.prompt:
                raise ValueError("--images needs --prompt, the question asked about each image")
            sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
            sampling = {key: value for key, value in sampling.items() if value is not None}
            write_image_requests(args.input, image_requests(args.images, args.prompt, name, sampling))
            media = MediaPolicy(local_root=args.images, allow_remote=args.allow_remote_images)
        elif args.prompt or args.max_tokens is not None or args.temperature is not None:
            raise ValueError("--prompt, --max-tokens and --temperature go with --images")
        if not args.input.is_file():
            raise FileNotFoundError(f"batch file not found: {args.input}")
        if not args.output.parent.is_dir():
            raise FileNotFoundError(f"folder of {args.output} not found")
        chat = load_chat(args, options)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = run_batch(chat, args.input, args.output, name, media, progress=not args.no_progress)
    print(f"{summary.done} answered ({summary.failed} errors), {summary.skipped} already in {args.output}",
          file=sys.stderr)  # fmt: skip
    return 0

"""The FastAPI app: OpenAI's ``/v1/chat/completions`` and ``/v1/models``, and ``/health``.

Every error is OpenAI's error object with its status: 400 malformed or unanswerable, 401 a wrong or
missing key, 404 another model's name or an unknown path, 413 a body over the limit (checked while
it arrives, before anything is parsed), 422 a parameter this server does not implement, 503 a full
queue (with Retry-After). Each request is logged in one line when its response has been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..chat import DeepseekVL2Chat
from .completion import MAX_IMAGES, Completion, prepare_call
from .engine import Cancelled, Engine, Job, QueueFull
from .options import MAX_QUEUE
from .media import MediaPolicy
from .protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    models_body,
    parse_request,
    usage_chunk_body,
)

logger = logging.getLogger("deepseek_vl2.server")

MAX_BODY_BYTES = 32 * 2**20  # a request with a few large images as data: URLs fits; 50 MB does not
DRAIN_BYTES = 64 * 2**20  # read (and drop) this much of a body over the limit, so the client sees the 413
RETRY_AFTER_S = 5  # what a 503 for a full queue tells the client to wait


def create_app(
    chat: DeepseekVL2Chat,
    served_model_name: str,
    api_key: str | None = None,
    *,
    media: MediaPolicy | None = None,
    max_queue: int = MAX_QUEUE,
    max_images: int = MAX_IMAGES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """An app serving ``chat`` under ``served_model_name``; with ``api_key``, /v1 needs ``Bearer <key>``."""
    media = media or MediaPolicy()
    engine = Engine(chat, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="DeepSeek-VL2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    started = int(time.time())
    authorized = Depends(_key_check(api_key))
    app.add_middleware(_RequestLog)
    app.add_exception_handler(APIError, _api_error_response)
    app.add_exception_handler(HTTPException, _http_error_response)
    app.add_exception_handler(Exception, _internal_error_response)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": int(engine.running is not None), "waiting": engine.waiting}

    @app.get("/v1/models", dependencies=[authorized])
    async def models() -> dict:
        return models_body(served_model_name, started, chat.context_length)

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(request: Request):
        parsed = await run_in_threadpool(parse_request, await _read_body(request, max_body_bytes))
        if parsed.model != served_model_name:
            raise APIError(404, f"the model {parsed.model!r} does not exist; this server serves {served_model_name!r}",
                           code="model_not_found", param="model")  # fmt: skip
        call = await run_in_threadpool(prepare_call, chat, parsed, media, max_images)
        try:
            job = engine.submit(call)
        except QueueFull as error:
            raise APIError(503, f"the server is busy ({error}); retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        request_id = completion_id()
        if parsed.stream:
            events = _sse_events(job, parsed, request_id, request)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = await _completion(job, request)
        _note(request, completion)
        return completion_body(request_id, served_model_name, completion)

    return app


def _key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    return check


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it outgrows ``limit``; nothing over it is kept."""
    declared = request.headers.get("content-length", "")
    size, chunks = 0, []
    too_big = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        too_big = too_big or size > limit
        if too_big:
            chunks.clear()
            if size > limit + DRAIN_BYTES:
                break
        else:
            chunks.append(chunk)
    if too_big:
        shown = int(declared) if declared.isdigit() else size
        raise APIError(413, f"the request body ({shown:,} bytes) is over the {limit:,}-byte limit",
                       code="request_too_large")  # fmt: skip
    return b"".join(chunks)


async def _completion(job: Job, request: Request) -> Completion:
    """The finished completion; a client that disconnects meanwhile cancels the job."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(job, request))
    try:
        while not isinstance(event := await job.next_event(), Completion):
            pass
        return event
    except (ValueError, TypeError) as error:
        raise APIError(400, str(error), code="invalid_value") from None
    except Cancelled:  # nobody reads this answer; 499 is what the log line shows, as nginx logs it
        raise APIError(499, "the client disconnected", code="client_disconnected") from None
    finally:
        watcher.cancel()
        job.cancel()


async def _cancel_on_disconnect(job: Job, request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _sse_events(job: Job, parsed: ChatCompletionRequest, request_id: str, request: Request) -> AsyncIterator[str]:
    """OpenAI's server-sent events: a role chunk, content chunks, a finish chunk, usage if asked, [DONE].

    When the client goes away Starlette cancels this generator, and the job with it.
    """
    model = parsed.model
    try:
        yield _sse(chunk_body(request_id, model, {"role": "assistant", "content": ""}))
        while not isinstance(event := await job.next_event(), Completion):
            yield _sse(chunk_body(request_id, model, {"content": event}))
        yield _sse(chunk_body(request_id, model, {"grounding": event.grounding}, event.finish_reason))
        if parsed.stream_options and parsed.stream_options.include_usage:
            yield _sse(usage_chunk_body(request_id, model, event))
        _note(request, event)
    except (asyncio.CancelledError, GeneratorExit):
        request.state.log = "client disconnected"
        raise
    except Exception as error:  # the 200 has been sent: the error goes in the stream
        status = 400 if isinstance(error, (ValueError, TypeError)) else 500
        yield _sse(APIError(status, str(error) or type(error).__name__, code="generation_failed").body())
        request.state.log = f"failed in the stream: {error}"
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _note(request: Request, completion: Completion) -> None:
    request.state.log = (
        f"prompt={completion.prompt_tokens} completion={completion.completion_tokens} "
        f"finish={completion.finish_reason}"
    )


async def _api_error_response(request: Request, error: APIError) -> JSONResponse:
    request.state.log = error.message
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error_response(request: Request, error: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return await _api_error_response(request, APIError(error.status_code, str(error.detail), code=code))


async def _internal_error_response(request: Request, error: Exception) -> JSONResponse:
    return await _api_error_response(request, APIError(500, "internal server error (see the server log)",
                                                       code="internal_error"))  # fmt: skip


class _RequestLog:
    """One log line per request, written when the response is complete (a stream: when it ends)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        started, status = time.perf_counter(), None

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            status = status or 500
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            detail = scope["state"].get("log", "")
            logger.info("%s %s %s %s %.2fs %s", client[0], scope["method"], scope["path"], status or "-",
                        time.perf_counter() - started, detail)  # fmt: skip

"""One model, many clients: a bounded queue of requests and one worker thread that runs them in turn.

Requests run one at a time (one model on one device). A request waits in the queue until the
worker takes it; a full queue refuses new requests at once (the server answers 503). A cancelled
request (its client went away) is skipped if it is still waiting, and stops at the next token if
it is running, so the next request starts straight away.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from ..chat import DeepseekVL2Chat
from .completion import ChatCall, run_completion
from .options import MAX_QUEUE

logger = logging.getLogger(__name__)



class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests already."""


class Cancelled(Exception):
    """The job's last event when it was cancelled before it finished."""


class Job:
    """One queued request; its events (text pieces, then a Completion or an exception) arrive on the
    event loop that submitted it."""

    def __init__(self, call: ChatCall, loop: asyncio.AbstractEventLoop):
        self.call = call
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            self.cancel()

    async def next_event(self):
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event


class Engine:
    """Runs queued jobs on ``chat``, one at a time, in a worker thread started by ``start()``."""

    def __init__(self, chat: DeepseekVL2Chat, max_queue: int = MAX_QUEUE):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
        self.chat = chat
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self.running: Job | None = None

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="deepseek-vl2-server", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Cancel every job, running or waiting, and end the worker."""
        while True:
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(RuntimeError("the server is shutting down"))
        if self.running is not None:
            self.running.cancel()
        self._waiting.put(None)
        if self._worker is not None:
            self._worker.join()

    def submit(self, call: ChatCall) -> Job:
        """Queue ``call``; QueueFull when the queue is full. Must be called on the event loop."""
        job = Job(call, asyncio.get_running_loop())
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are waiting already") from None
        return job

    def _work(self) -> None:
        while (job := self._waiting.get()) is not None:
            if not job.cancelled.is_set():
                self.running = job
                self._run(job)
                self.running = None
            if job.cancelled.is_set():
                job.emit(Cancelled())  # ends the wait of a request whose client has gone

    def _run(self, job: Job) -> None:
        events = run_completion(self.chat, job.call)
        try:
            for event in events:
                if job.cancelled.is_set():
                    return
                job.emit(event)
        except Exception as error:  # handed to the request, which answers with it; the worker goes on
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("generation failed")
            job.emit(error)
        finally:
            events.close()  # stops generation at the next token when the job was cancelled

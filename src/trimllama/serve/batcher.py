"""Dynamic batching: a bounded queue on the asyncio side, one generation thread on the model side.

Requests wait in a FIFO queue. The generation thread takes the oldest request and every waiting
request with the same batching key (same trimming settings; image and text-only requests apart),
up to `max_batch_size`, once the oldest has waited `batch_window_ms` or the batch is full.
Requests that arrive while a batch runs wait for the next one. Output travels back to the
event loop through `loop.call_soon_threadsafe`, so the asyncio side never touches the model.

Faults stay with their request: if a batch raises, each of its requests that has not streamed
any text yet (every non-streaming request, and streaming ones still before their first delta)
is run again alone, and only those that fail alone get the error. A streaming request that had
sent text gets the error, since text already sent cannot be taken back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import TrimllamaError
from .config import ServeConfig
from .errors import APIError
from .generation import Engine, RowResult, SamplingParams
from .metrics import ServeMetrics
from .prompts import EncodedPrompt
from .trimming import TrimSetting

logger = logging.getLogger("trimllama.serve")


class QueueFullError(Exception):
    """The queue holds `max_queue` requests already."""


@dataclass(eq=False)
class Request:
    """One chat completion on its way through the batcher; the engine's `Job`.

    Events for the event loop, in its queue `events`: ("delta", str) for a streaming request,
    then ("done", RowResult) or ("error", APIError). `emitted` is set once a delta went out.
    """

    id: str
    prompt: EncodedPrompt
    sampling: SamplingParams
    setting: TrimSetting
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    emitted: bool = False
    finished: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def batch_key(self) -> str:
        """Requests batch together only when these are equal."""
        return self.setting.key if self.prompt.has_images else "text-only"

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def delta(self, text: str) -> None:
        if not self.stream:  # its text travels in the final result; it can still be re-run after a fault
            return
        self.emitted = True
        self._send(("delta", text))

    def finish(self, result: RowResult) -> None:
        self.finished = True
        self._send(("done", result))

    def fail(self, error: APIError) -> None:
        self.finished = True
        self._send(("error", error))

    def _send(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self._cancel.set()


class Batcher:
    """Owns the queue and the generation thread.

    If the generation thread dies (a fault outside any one batch's isolation), `failure` says why, every request
    it held or that waits is failed with a 500, and every later `submit` too: nothing waits for a thread that
    is gone.
    """

    def __init__(self, engine: Engine, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.failure: str | None = None
        self._pending: list[Request] = []
        self._running: list[Request] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="trimllama-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch in progress; waiting requests are cancelled."""
        with self._condition:
            self._stopping = True
            for request in self._pending:
                request._cancel.set()
            self._pending.clear()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def problem(self) -> str | None:
        """None while the generation thread serves; else why it does not."""
        if self.failure is not None:
            return f"the generation thread died ({self.failure})"
        if self._thread is None or not self._thread.is_alive():
            return "the generation thread is not running"
        return None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFullError if `max_queue` requests wait already, the 500 of `failure` if the
        generation thread is dead."""
        with self._condition:
            if self.failure is not None:
                raise self._failure_error()
            if len(self._pending) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (--max-queue {self.config.max_queue})")
            self._pending.append(request)
            self.metrics.queue_depth.set(len(self._pending))
            self._condition.notify_all()

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it waits, or let its batch skip its row."""
        request._cancel.set()
        with self._condition:
            if request in self._pending:
                self._pending.remove(request)
                self.metrics.queue_depth.set(len(self._pending))
                self._condition.notify_all()

    # -- generation thread ---------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                now = time.monotonic()
                for request in batch:
                    request.started = now
                    self.metrics.queue_wait.observe(now - request.arrival)
                self.metrics.batch_size.observe(len(batch))
                self.metrics.running.set(len(batch))
                self._running = batch
                self._run(batch)
                self._running = []
                self.metrics.running.set(0)
        except BaseException as error:  # noqa: BLE001 - the thread is gone: fail what it held, then say so
            logger.critical("the generation thread died; failing every request", exc_info=error)
            self._fail_all(f"{type(error).__name__}: {error}")

    def _fail_all(self, failure: str) -> None:
        """Record the thread's death, and fail the running batch's and the waiting requests."""
        with self._condition:
            self.failure = failure
            held = [*self._running, *self._pending]
            self._running, self._pending = [], []
            self.metrics.queue_depth.set(0)
            self.metrics.running.set(0)
        for request in held:
            if not (request.finished or request.cancelled()):
                request.fail(self._failure_error())

    def _failure_error(self) -> APIError:
        return APIError(
            500,
            f"the server's generation thread stopped ({self.failure}); it cannot answer until it is restarted",
            code="generation_thread_died",
        )

    def _next_batch(self) -> list[Request] | None:
        """Block until a batch is due; None when stopping."""
        window = self.config.batch_window_ms / 1000
        with self._condition:
            while not self._stopping:
                if not self._pending:
                    self._condition.wait()
                    continue
                head = self._pending[0]
                group = [r for r in self._pending if r.batch_key == head.batch_key][: self.config.max_batch_size]
                wait = head.arrival + window - time.monotonic()
                if len(group) >= self.config.max_batch_size or wait <= 0:
                    for request in group:
                        self._pending.remove(request)
                    self.metrics.queue_depth.set(len(self._pending))
                    return group
                self._condition.wait(wait)
        return None

    def _run(self, batch: list[Request]) -> None:
        """Generate for a batch; on an exception, isolate it by running the requests alone."""
        try:
            self.engine.generate(batch, batch[0].setting)
        except Exception as error:  # noqa: BLE001 - any fault must stay with its request
            if len(batch) == 1:
                logger.warning("request %s failed: %s: %s", batch[0].id, type(error).__name__, error)
                batch[0].fail(_as_api_error(error))
                return
            logger.warning("a batch of %d failed (%s); running its requests alone", len(batch), type(error).__name__)
            for request in batch:
                if request.finished or request.cancelled():
                    continue
                if request.emitted:
                    request.fail(APIError(500, f"generation failed mid-stream ({type(error).__name__}: {error})"))
                else:
                    self._run([request])


def _as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, TrimllamaError):
        return APIError(400, f"trimming refused this request: {error}", param="trim", code="invalid_trim_setting")
    if isinstance(error, torch.OutOfMemoryError):
        return APIError(503, "out of accelerator memory for this request; retry later", headers={"Retry-After": "5"})
    return APIError(500, f"generation failed ({type(error).__name__}: {error})", code="generation_failed")

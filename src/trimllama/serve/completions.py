"""Answering a queued request: one `chat.completion` body, or a stream of `chat.completion.chunk` server-sent events.

A client that goes away before its answer (a closed connection, or a stream it stops reading) cancels its
request in the batcher, once, and is counted as cancelled.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from .batcher import Batcher
from .batcher import Request as Job
from .generation import RowResult
from .metrics import ServeMetrics


class Completions:
    """Turns a submitted job's events into the OpenAI response, and records its outcome in the metrics."""

    def __init__(self, batcher: Batcher, metrics: ServeMetrics, model_name: str) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.model_name = model_name

    async def respond(self, request: Request, job: Job, include_usage: bool, received: float) -> Response:
        """The answer to `job` (already submitted): streamed if it asked for a stream, else one JSON body."""
        if job.stream:
            return StreamingResponse(
                self._stream(job, include_usage, received),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                background=BackgroundTask(self.abandon, job),  # runs also when the stream never started
            )
        return await self._complete(request, job, received)

    def abandon(self, job: Job) -> None:
        """The client went away before the answer: cancel the request (once)."""
        if job.finished or job.cancelled():
            return
        self.batcher.cancel(job)
        self.metrics.requests.labels("cancelled").inc()

    async def _complete(self, request: Request, job: Job, received: float) -> Response:
        result_task = asyncio.ensure_future(job.events.get())  # a non-streaming job gets no deltas
        disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
        done, _ = await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if result_task not in done:
            result_task.cancel()
            self.abandon(job)
            return Response(status_code=499)
        disconnect_task.cancel()
        kind, payload = result_task.result()
        if kind == "error":
            raise payload
        self.metrics.record_result(payload, time.monotonic() - received)
        return JSONResponse(_completion_body(job, payload, self.model_name))

    async def _stream(self, job: Job, include_usage: bool, received: float) -> AsyncIterator[str]:
        chunk = _chunk_factory(job, self.model_name)
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield _sse(chunk({"content": payload}))
                    continue
                if kind == "error":
                    self.metrics.requests.labels("failed").inc()
                    yield _sse(payload.body())
                    break
                self.metrics.record_result(payload, time.monotonic() - received)
                yield _sse({**chunk({}, payload.finish_reason), "trim": payload.trim.as_dict()})
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": _usage(payload)})
                break
            yield "data: [DONE]\n\n"
        finally:
            self.abandon(job)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(result: RowResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _completion_body(job: Job, result: RowResult, model_name: str) -> dict:
    message = {"role": "assistant", "content": result.text}
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": _usage(result),
        "trim": result.trim.as_dict(),
    }


def _chunk_factory(job: Job, model_name: str):
    """`chunk(delta, finish_reason=None)` -> one `chat.completion.chunk` object of this request."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "system_fingerprint": None,
            "choices": [choice],
        }

    return chunk


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"

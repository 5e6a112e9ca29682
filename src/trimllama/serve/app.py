"""The OpenAI-style HTTP API: `create_app(model, processor, config)` returns a FastAPI app.

    POST /v1/chat/completions   chat completions, streamed (server-sent events) or not
    GET  /v1/models             the one served model
    GET  /health                liveness and queue state
    GET  /metrics               Prometheus text format

The event loop parses and checks requests and streams results; images are decoded and prompts
tokenized by `encode_workers` threads, each with its own copy of the processor (no lock shared
between requests, so a long text does not hold up a short one), at most `max_concurrent_decodes`
requests with images among them (their images' memory is bounded however many arrive);
generation runs in the batcher's single thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidSettingError
from ..methods.base import check_seed
from .batcher import Batcher, QueueFullError
from .batcher import Request as Job
from .config import ServeConfig
from .errors import APIError, invalid
from .feature_cache import FeatureCache
from .generation import Engine, RowResult, SamplingParams
from .metrics import ServeMetrics
from .prompts import EncodedPrompt, build_conversation, check_prompt_length, encode_conversation
from .schemas import ChatCompletionRequest, ImagePart, parse_request
from .trimming import TrimSetting, check_fits, check_turns, resolve_trim

CHAT_PATH = "/v1/chat/completions"


def create_app(model, processor, config: ServeConfig) -> FastAPI:
    """A FastAPI app serving `model` (a loaded Mllama in eval mode) with `processor`."""
    feature_cache = FeatureCache(config.feature_cache_bytes) if config.feature_cache_bytes else None
    engine = Engine(model, processor, feature_cache)
    metrics = ServeMetrics()
    if feature_cache is not None:
        metrics.registry.register(feature_cache)
    batcher = Batcher(engine, config, metrics)
    default_setting = TrimSetting(config.method, config.trim_scoring_layer)
    started = int(time.time())

    encoders = ThreadPoolExecutor(config.encode_workers, thread_name_prefix="trimllama-encode")
    encoding = 0  # requests being encoded or waiting for an encoder; only touched on the event loop
    decode_slots = asyncio.Semaphore(config.max_concurrent_decodes)  # held by requests with images
    local = threading.local()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()
        encoders.shutdown(wait=False, cancel_futures=True)

    def encode(chat: ChatCompletionRequest, gauges: tuple) -> EncodedPrompt:
        """Decode the images, then render and tokenize the prompt (in an encoder thread, counted in `gauges`)."""
        if not hasattr(local, "processor"):  # a fast tokenizer may not be called from two threads at once
            local.processor = copy.deepcopy(processor)
        for gauge in gauges:
            gauge.inc()
        try:
            conversation = build_conversation(chat.messages, config.images)
            return encode_conversation(local.processor, conversation)
        finally:
            for gauge in gauges:
                gauge.dec()

    async def encode_bounded(chat: ChatCompletionRequest) -> EncodedPrompt:
        """`encode` on an encoder thread, holding a decode slot if the request has images (until its
        thread is done, even if the request is cancelled); 503 when `max_queue` requests wait already."""
        nonlocal encoding
        if encoding >= config.encode_workers + config.max_queue:
            raise APIError(
                503,
                f"the server is busy: {encoding} requests are being encoded or wait for it (--encode-workers "
                f"{config.encode_workers}, --max-concurrent-decodes {config.max_concurrent_decodes}, --max-queue "
                f"{config.max_queue}); retry shortly",
                code="encoders_busy",
                headers={"Retry-After": "1"},
            )
        encoding += 1
        try:
            if not _has_images(chat):
                return await asyncio.wrap_future(encoders.submit(encode, chat, (metrics.encoding,)))
            await decode_slots.acquire()
            try:
                future = encoders.submit(encode, chat, (metrics.encoding, metrics.decoding))
            except BaseException:
                decode_slots.release()
                raise
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(decode_slots.release))
            return await asyncio.wrap_future(future)
        finally:
            encoding -= 1

    def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="missing_api_key", headers=challenge
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)

    app = FastAPI(
        title="trimllama",
        lifespan=lifespan,
        dependencies=[Depends(require_api_key)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        if request.url.path == CHAT_PATH:  # the metric counts chat completion requests only
            outcome = "rejected" if error.status == 503 else "invalid" if error.status < 500 else "failed"
            metrics.requests.labels(outcome).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        """A bug, not bad input: the OpenAI error shape and the metrics still (Starlette logs the traceback)."""
        failure = APIError(500, f"internal error ({type(error).__name__}: {error})"[:500], code="internal_error")
        return await api_error(request, failure)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": config.model_name,
            "trim": default_setting.label,
            "queue_depth": batcher.queue_depth,
            "max_batch_size": config.max_batch_size,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": config.model_name, "object": "model", "created": started, "owned_by": "trimllama"}
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> Response:
        received = time.monotonic()
        chat = parse_request(await _read_body(request, config.max_body_bytes))
        _check_text_length(chat, config.max_text_chars)
        if chat.model is not None and chat.model != config.model_name:
            raise APIError(
                404,
                f"model {chat.model!r} is not served here; this server serves {config.model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        setting = resolve_trim(chat.trim, default_setting)
        check_turns(setting, processor)
        sampling_seed = _checked_seed(chat.seed)
        prompt: EncodedPrompt = await encode_bounded(chat)
        check_fits(setting, model, prompt.inputs)
        max_tokens = check_prompt_length(
            prompt.prompt_tokens, chat.requested_max_tokens, engine.context_length, config.default_max_tokens
        )
        job = Job(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt=prompt,
            sampling=_sampling(chat, max_tokens, engine.default_sampling, sampling_seed),
            setting=setting,
            loop=asyncio.get_running_loop(),
            stream=chat.stream,
        )
        try:
            batcher.submit(job)
        except QueueFullError as error:
            raise APIError(
                503, f"the server is busy: {error}; retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        if chat.stream:
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage
            return StreamingResponse(
                _stream(job, include_usage, received),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                background=BackgroundTask(abandon, job),  # runs also when the stream never started
            )
        return await _complete(request, job, received)

    async def _complete(request: Request, job: Job, received: float) -> Response:
        result_task = asyncio.ensure_future(_final_event(job))
        disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
        done, _ = await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if result_task not in done:
            result_task.cancel()
            abandon(job)
            return Response(status_code=499)
        disconnect_task.cancel()
        kind, payload = result_task.result()
        if kind == "error":
            raise payload
        metrics.record_result(payload, time.monotonic() - received)
        body = _completion_body(job, payload, config.model_name)
        return JSONResponse(body)

    async def _stream(job: Job, include_usage: bool, received: float) -> AsyncIterator[str]:
        chunk = _chunk_factory(job, config.model_name)
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield _sse(chunk({"content": payload}))
                    continue
                if kind == "error":
                    metrics.requests.labels("failed").inc()
                    yield _sse(payload.body())
                    break
                metrics.record_result(payload, time.monotonic() - received)
                yield _sse({**chunk({}, payload.finish_reason), "trim": payload.trim.as_dict()})
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": _usage(payload)})
                break
            yield "data: [DONE]\n\n"
        finally:
            abandon(job)

    def abandon(job: Job) -> None:
        """The client went away before the answer: cancel the request (once)."""
        if job.finished or job.cancelled():
            return
        batcher.cancel(job)
        metrics.requests.labels("cancelled").inc()

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _final_event(job: Job) -> tuple[str, object]:
    """("done", RowResult) or ("error", APIError): a non-streaming request gets no deltas."""
    return await job.events.get()


def _sampling(chat: ChatCompletionRequest, max_tokens: int, defaults: tuple[float, float], seed: int | None) -> SamplingParams:
    temperature = float(chat.temperature) if chat.temperature is not None else defaults[0]
    top_p = float(chat.top_p) if chat.top_p is not None else defaults[1]
    return SamplingParams(max_tokens, temperature, top_p, seed, tuple(chat.stop_sequences))


def _checked_seed(seed: int | None) -> int | None:
    """The request's seed, or a 400 when torch cannot seed a generator with it."""
    if seed is not None:
        try:
            check_seed("seed", seed)
        except InvalidSettingError as error:
            raise invalid(f"'seed': {error}", "seed", "invalid_value") from None
    return seed


def _has_images(chat: ChatCompletionRequest) -> bool:
    parts = (part for message in chat.messages if isinstance(message.content, list) for part in message.content)
    return any(isinstance(part, ImagePart) for part in parts)


def _check_text_length(chat: ChatCompletionRequest, limit: int) -> None:
    """413 when the messages hold more than `limit` characters of text (before any tokenizing)."""
    total = 0
    for message in chat.messages:
        parts = [message.content] if isinstance(message.content, str) else message.content or []
        total += sum(len(part) if isinstance(part, str) else len(getattr(part, "text", "")) for part in parts)
    if total > limit:
        raise APIError(
            413,
            f"'messages': {total} characters of text exceed the limit of {limit} characters per request "
            "(--max-text-chars)",
            param="messages",
            code="text_too_large",
        )


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

"""The OpenAI-style HTTP API: `create_app(model, processor, config)` returns a FastAPI app.

    POST /v1/chat/completions   chat completions, streamed (server-sent events) or not
    GET  /v1/models             the one served model
    GET  /health                liveness and queue state
    GET  /metrics               Prometheus text format

The routes check requests and hand them on: `encoding.Encoder` decodes images and tokenizes prompts on its
own threads, `batcher.Batcher` queues and batches them for the generation thread, and
`completions.Completions` answers each one, in one body or streamed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, QueueFullError
from .batcher import Request as Job
from .completions import Completions
from .config import ServeConfig
from .encoding import Encoder
from .errors import APIError
from .feature_cache import FeatureCache
from .generation import Engine, SamplingParams
from .metrics import ServeMetrics
from .schemas import ChatCompletionRequest, parse_request, shorten
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
    encoder = Encoder(processor, engine.context_length, config, metrics)
    completions = Completions(batcher, metrics, config.model_name)
    default_setting = TrimSetting(config.method, config.trim_scoring_layer)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()
        encoder.shutdown()

    app = FastAPI(
        title="trimllama",
        lifespan=lifespan,
        dependencies=[Depends(_api_key_check(config.api_key))],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    _add_error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 and "ok" while requests can be served; 503 and "unhealthy", with the problem, once they cannot."""
        state = {
            "model": config.model_name,
            "trim": default_setting.label,
            "queue_depth": batcher.queue_depth,
            "max_batch_size": config.max_batch_size,
        }
        problem = batcher.problem
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "problem": problem, **state}, status_code=503)
        return JSONResponse({"status": "ok", **state})

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
        chat = await asyncio.to_thread(parse_request, await _read_body(request, config.max_body_bytes), config)
        if chat.model is not None and chat.model != config.model_name:
            raise APIError(
                404,
                f"model {shorten(chat.model)!r} is not served here; this server serves {config.model_name!r} "
                "(GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        setting = resolve_trim(chat.trim, default_setting)
        check_turns(setting, processor)
        prompt, max_tokens = await encoder.encode(chat)
        check_fits(setting, model, prompt.inputs)
        job = Job(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt=prompt,
            sampling=_sampling(chat, max_tokens, engine.default_sampling),
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
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        return await completions.respond(request, job, include_usage, received)

    return app


def _api_key_check(api_key: str | None):
    """The dependency every route runs: a 401 unless the request carries `Authorization: Bearer <api_key>`."""

    def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="missing_api_key", headers=challenge
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)

    return require_api_key


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error in the OpenAI shape; chat completion requests that fail are counted by outcome."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        if request.url.path == CHAT_PATH:
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


def _sampling(chat: ChatCompletionRequest, max_tokens: int, defaults: tuple[float, float]) -> SamplingParams:
    temperature = float(chat.temperature) if chat.temperature is not None else defaults[0]
    top_p = float(chat.top_p) if chat.top_p is not None else defaults[1]
    return SamplingParams(max_tokens, temperature, top_p, chat.seed, tuple(chat.stop_sequences))

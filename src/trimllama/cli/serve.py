"""`trimllama serve`: an OpenAI-style chat completions server with dynamic batching and trimming."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

from ..serve.config import ImageLimits, ServeConfig
from .options import CommandError, add_method_options, add_model_options, finite_float, load_model, method_from_args

API_KEY_VARIABLE = "TRIMLLAMA_API_KEY"
TESTBED_MODEL_NAME = "trimllama-testbed"
DEFAULTS = ServeConfig(model_name=TESTBED_MODEL_NAME)
# ServeConfig field -> (flag, type, help); the default is the field's (argparse shows it for %(default)s)
SERVER_OPTIONS = {
    "max_batch_size": ("--max-batch-size", int, "requests served together (default %(default)s)"),
    "batch_window_ms": (
        "--batch-window-ms", finite_float, "how long a request waits for others to batch with (default %(default)s)"
    ),
    "max_queue": ("--max-queue", int, "waiting requests before answering 503 (default %(default)s)"),
    "default_max_tokens": (
        "--default-max-tokens", int, "completion length when a request sets none (default %(default)s)"
    ),
    "max_body_bytes": (
        "--max-body-bytes",
        int,
        "bytes of one request body; more is answered 413 (default: enough for --max-images images of "
        f"--max-image-bytes, base64, and --max-text-chars of text; {DEFAULTS.max_body_bytes} with the defaults)",
    ),
    "max_messages": ("--max-messages", int, "messages per request; more is answered 400 (default %(default)s)"),
    "max_content_parts": (
        "--max-content-parts",
        int,
        "content parts per request, all messages together; more is answered 400 (default %(default)s)",
    ),
    "max_text_chars": (
        "--max-text-chars",
        int,
        "characters of text per request, checked before tokenizing; more is answered 413 (default %(default)s)",
    ),
    "encode_workers": (
        "--encode-workers",
        int,
        "requests whose images are decoded and prompt tokenized at once; this bounds their memory "
        "(default %(default)s)",
    ),
    "max_concurrent_decodes": (
        "--max-concurrent-decodes",
        int,
        "requests with images decoded and preprocessed at once, the bound on the memory images take; more wait, "
        "within --max-queue, then 503 (default %(default)s)",
    ),
    "feature_cache_bytes": (
        "--feature-cache-bytes",
        int,
        "byte limit of the LRU cache of full image features keyed by image content, so follow-up turns about the "
        "same image skip the vision tower (default %(default)s)",
    ),
}
# ImageLimits field -> (flag, type, help)
IMAGE_OPTIONS = {
    "max_images": ("--max-images", int, "images per request (default %(default)s)"),
    "max_bytes": ("--max-image-bytes", int, "bytes per image file (default %(default)s)"),
    "max_pixels": (
        "--max-image-pixels",
        int,
        "width x height per image, read from the header before decoding (default %(default)s; at most PIL's "
        "decompression-bomb limit)",
    ),
}
FLAGS = {**{field: flag for field, (flag, _, _) in SERVER_OPTIONS.items()},
         **{f"images.{field}": flag for field, (flag, _, _) in IMAGE_OPTIONS.items()}}  # fmt: skip


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a (trimmed) Llama-3.2-Vision model over an OpenAI-style HTTP API",
        description="OpenAI-style server: POST /v1/chat/completions (images as data: URLs, streaming), "
        "GET /v1/models, /health, /metrics (Prometheus). Requests that arrive within the batch window, or "
        "while a batch runs, are served together in one batched prefill and decode (request-level batching). "
        "Per-request trimming: the request body's `trim` object (extra_body={'trim': {...}} in the OpenAI client).",
    )
    add_model_options(parser)
    add_method_options(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument(
        "--served-model-name",
        default=None,
        help="model id in the API (default: a hub id as given, a local directory's name, or trimllama-testbed)",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_VARIABLE} if set)",
    )
    defaults = _field_defaults(ServeConfig)
    for field, (flag, kind, help_text) in SERVER_OPTIONS.items():
        server.add_argument(flag, dest=field, type=kind, default=defaults[field], metavar="N", help=help_text)
    server.add_argument("--no-feature-cache", action="store_true", help="turn the image feature cache off")
    limits = parser.add_argument_group("image limits")
    image_defaults = _field_defaults(ImageLimits)
    for field, (flag, kind, help_text) in IMAGE_OPTIONS.items():
        limits.add_argument(flag, dest=f"image_{field}", type=kind, default=image_defaults[field], metavar="N", help=help_text)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as error:
        raise CommandError(f"serving needs the serve extra ({error.name} is missing): pip install 'trimllama[serve]'")
    if not args.host.strip():
        raise CommandError("--host is empty: give an address, 127.0.0.1 for this machine or 0.0.0.0 for every interface")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is out of range (0-65535; 0 picks a free port)")
    method = method_from_args(args)
    settings = {field: getattr(args, field) for field in SERVER_OPTIONS}
    if args.no_feature_cache:
        settings["feature_cache_bytes"] = 0
    try:
        config = ServeConfig(
            model_name=served_model_name(args.served_model_name, args.model),
            method=method,
            trim_scoring_layer=args.trim_scoring_layer,
            api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
            images=ImageLimits(**{field: getattr(args, f"image_{field}") for field in IMAGE_OPTIONS}),
            **settings,
        )
    except ValueError as error:  # ServeConfig checks the ranges; the CLI names its flags
        raise CommandError(_as_flag(str(error))) from None
    listener = _bind(args.host, args.port)  # before loading the model: a busy port is reported at once
    port = listener.getsockname()[1]  # the one bound, also when --port 0 let the system pick it
    model, processor, device = load_model(args)
    app = create_app(model, processor, config)
    if config.api_key is None and not _is_loopback(args.host):
        print(
            f"trimllama serve: warning: listening on {args.host} without an API key; anyone who can reach it can use it "
            f"(set --api-key or ${API_KEY_VARIABLE})",
            file=sys.stderr,
        )
    trimming = method.label() if method is not None else "untrimmed"
    print(
        f"trimllama serve: {config.model_name} on {device} ({trimming}; batches of up to {config.max_batch_size}, "
        f"window {config.batch_window_ms:g} ms) at http://{_url_host(args.host)}:{port}/v1",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    server.run(sockets=[listener])
    return 0


def served_model_name(served_model_name: str | None, model: str | None) -> str:
    """The id the API publishes: as given, else a hub id as is, a local directory's name, or the testbed's."""
    if served_model_name:
        return served_model_name
    if model is None:
        return TESTBED_MODEL_NAME
    local = Path(model).expanduser()
    return local.resolve().name if local.exists() else model


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a CommandError naming why not."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        listener.close()
        reason = "the port is in use" if error.errno == errno.EADDRINUSE else error.strerror or str(error)
        raise CommandError(f"cannot listen on {host}:{port}: {reason}") from None
    listener.set_inheritable(True)
    return listener


def _field_defaults(settings: type) -> dict:
    """A settings dataclass's field defaults (None where a setting is derived from others)."""
    return {field.name: field.default for field in dataclasses.fields(settings)}


def _as_flag(message: str) -> str:
    """`ServeConfig`'s message with the field it starts with named as its flag."""
    field = message.split(" ", 1)[0]
    return FLAGS[field] + message[len(field) :] if field in FLAGS else message


def _url_host(host: str) -> str:
    """`host` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

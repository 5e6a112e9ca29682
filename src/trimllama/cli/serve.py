"""`trimllama serve`: an OpenAI-style chat completions server with dynamic batching and trimming."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

from .options import CommandError, add_method_options, add_model_options, load_model, method_from_args

API_KEY_VARIABLE = "TRIMLLAMA_API_KEY"
TESTBED_MODEL_NAME = "trimllama-testbed"
CONFIG_FLAGS = {
    "max_batch_size": "--max-batch-size",
    "batch_window_ms": "--batch-window-ms",
    "max_queue": "--max-queue",
    "default_max_tokens": "--default-max-tokens",
    "image limit max_bytes": "--max-image-bytes",
    "image limit max_pixels": "--max-image-pixels",
    "image limit max_images": "--max-images",
    "max_pixels": "--max-image-pixels",
    "max_text_chars": "--max-text-chars",
    "encode_workers": "--encode-workers",
    "max_concurrent_decodes": "--max-concurrent-decodes",
    "feature_cache_bytes": "--feature-cache-bytes",
}


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
    server.add_argument("--max-batch-size", type=int, default=8, help="requests served together (default 8)")
    server.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long a request waits for others to batch with (default 10)"
    )
    server.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503 (default 64)")
    server.add_argument(
        "--default-max-tokens", type=int, default=512, help="completion length when a request sets none (default 512)"
    )
    server.add_argument(
        "--max-text-chars",
        type=int,
        default=512 * 1024,
        help="characters of text per request, checked before tokenizing; more is answered 413 (default 524288)",
    )
    server.add_argument(
        "--encode-workers",
        type=int,
        default=2,
        help="requests whose images are decoded and prompt tokenized at once; this bounds their memory (default 2)",
    )
    server.add_argument(
        "--max-concurrent-decodes",
        type=int,
        default=2,
        help="requests with images decoded and preprocessed at once, the bound on the memory images take; more "
        "wait, within --max-queue, then 503 (default 2)",
    )
    server.add_argument(
        "--feature-cache-bytes",
        type=int,
        default=2**30,
        help="byte limit of the LRU cache of full image features keyed by image content, so follow-up turns about "
        "the same image skip the vision tower (default 1 GiB)",
    )
    server.add_argument("--no-feature-cache", action="store_true", help="turn the image feature cache off")
    limits = parser.add_argument_group("image limits")
    limits.add_argument("--max-images", type=int, default=2, help="images per request (default 2)")
    limits.add_argument("--max-image-bytes", type=int, default=10 * 2**20, help="bytes per image file (default 10 MiB)")
    limits.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="width x height per image, read from the header before decoding (default 4096 x 4096; at most "
        "PIL's decompression-bomb limit)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import ImageLimits, ServeConfig, create_app
    except ImportError as error:
        raise CommandError(f"serving needs the serve extra ({error.name} is missing): pip install 'trimllama[serve]'")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is out of range (0-65535)")
    method = method_from_args(args)
    try:
        config = ServeConfig(
            model_name=served_model_name(args.served_model_name, args.model),
            method=method,
            trim_scoring_layer=args.trim_scoring_layer,
            api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
            max_batch_size=args.max_batch_size,
            batch_window_ms=args.batch_window_ms,
            max_queue=args.max_queue,
            default_max_tokens=args.default_max_tokens,
            images=ImageLimits(args.max_image_bytes, args.max_image_pixels, args.max_images),
            max_text_chars=args.max_text_chars,
            encode_workers=args.encode_workers,
            max_concurrent_decodes=args.max_concurrent_decodes,
            feature_cache_bytes=0 if args.no_feature_cache else args.feature_cache_bytes,
        )
    except ValueError as error:  # ServeConfig checks the ranges; the CLI names its flags
        raise CommandError(_as_flag(str(error))) from None
    listener = _bind(args.host, args.port)  # before loading the model: a busy port is reported at once
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
        f"window {config.batch_window_ms:g} ms) at http://{args.host}:{args.port}/v1",
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


def _as_flag(message: str) -> str:
    """`ServeConfig`'s message with the field it starts with named as its flag."""
    for field, flag in CONFIG_FLAGS.items():
        if message.startswith(field + " "):
            return flag + message[len(field) :]
    return message


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

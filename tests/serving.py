"""Helpers for the serving tests: `trimllama serve` in a subprocess, images as data URLs, /metrics lines."""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
import tempfile
import time
import zlib

import httpx

from trimllama.harness.server_process import ServerProcess, free_port

TIMEOUT = 60.0


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text, e.g. metric(text, 'trimllama_batch_size_count')."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_metric(server, name: str, done) -> float:
    """Poll /metrics until `done(value)` holds for the sample `name`; its value then."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = metric(server.get("/metrics").text, name)
        if done(value):
            return value
        time.sleep(0.01)
    raise AssertionError(f"{name} never reached the expected value")


class Server(ServerProcess):
    """`trimllama serve` in a subprocess; its log is shown when it fails to come up."""

    def __init__(self, *options: str, api_key: str | None = None, prelude: str = "") -> None:
        """`prelude`: Python run in the server process before the command (e.g. to inject a fault)."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("TRIMLLAMA_API_KEY", None)
        if api_key:
            env["TRIMLLAMA_API_KEY"] = api_key
        port = free_port()
        script = f"import sys\n{prelude}\nfrom trimllama.cli import main\nsys.exit(main())"
        command = [sys.executable, "-c", script, "serve"]
        handle, log = tempfile.mkstemp(prefix="trimllama-serve-", suffix=".log")
        os.close(handle)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__([*command, "--port", str(port), "--log-level", "warning", *options], env, log, port, headers)

    def wait_ready(self, timeout: float = 120.0) -> None:
        super().wait_ready(timeout)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})}, timeout=TIMEOUT, **kwargs)

    def stop(self) -> None:
        super().stop(grace=15)
        self.log.unlink(missing_ok=True)

"""SGLang servers on 127.0.0.1 for the engine tests: started once per module (or session), always stopped.

Each server runs in its own process group and is stopped with SIGTERM to the group (SIGKILL after 30 s).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from trimllama.harness.server_process import ServerProcess, free_port
from trimllama.testing import random_image, save_sglang_checkpoint

pytest.importorskip("sglang.srt")

START_TIMEOUT_S = 300
BUDGET = 197  # a quarter of a 4-tile image's 788 tokens
FULL_BUDGET = 1000  # more than any image's 788 tokens
SGLANG_FLAGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--dtype", "float32",
    "--mem-fraction-static", "0.05",
    "--max-total-tokens", "16384",
    "--skip-server-warmup",
]  # fmt: skip


class Server(ServerProcess):
    """One SGLang server process group; `generate` posts to its native /generate endpoint."""

    def __init__(self, command: list[str], env: dict, log: Path, port: int, kept_dump: Path | None = None) -> None:
        super().__init__(command, env, log, port)
        self.kept_dump = kept_dump

    def generate(self, prompt: str | list[str], images=None, max_new_tokens: int = 8) -> dict | list[dict]:
        """Greedy /generate; `images` is a path (or list of paths, or None per prompt of a batch)."""
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}
        if images is not None:
            body["image_data"] = images
        response = requests.post(f"{self.url}/generate", json=body, timeout=120)
        response.raise_for_status()
        return response.json()

    def flush_cache(self) -> None:
        requests.post(f"{self.url}/flush_cache", timeout=30).raise_for_status()

    def prefill_batches(self, requests_in_batch: int) -> int:
        """How many prefill batches of exactly that many new requests the server has logged so far."""
        return self.log.read_text().count(f"Prefill batch, #new-seq: {requests_in_batch},")

    def kept_records(self) -> list[dict]:
        """What the model override dumped: one record per encoded request and rank, in order."""
        if self.kept_dump is None or not self.kept_dump.exists():
            return []
        return [json.loads(line) for line in self.kept_dump.read_text().splitlines()]


@contextmanager
def running(checkpoint: Path, workdir: Path, name: str, trimllama: list[str] | None = None, tp: int = 1):
    """A ready server: stock `python -m sglang.launch_server`, or `trimllama sglang <trimllama> -- ...`."""
    port = free_port()
    launch = ["--model-path", str(checkpoint), "--host", "127.0.0.1", "--port", str(port), "--tp", str(tp), *SGLANG_FLAGS]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SGLANG_", "TRIMLLAMA_SGLANG"))}
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["SGLANG_ENABLE_COLOCATED_BATCH_GEN"] = "1"  # a /generate batch reaches the scheduler as one (test_engine)
    if tp > 1:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(core % (os.cpu_count() or 1)) for core in range(tp))
    kept_dump = None
    if trimllama is None:
        command = [sys.executable, "-m", "sglang.launch_server", *launch]
    else:
        kept_dump = workdir / f"{name}-kept.jsonl"
        env["TRIMLLAMA_SGLANG_KEPT_DUMP"] = str(kept_dump)
        command = [str(Path(sys.executable).parent / "trimllama"), "sglang", *trimllama, "--", *launch]
    server = Server(command, env, workdir / f"{name}.log", port, kept_dump)
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="session")
def checkpoint(workdir) -> Path:
    return save_sglang_checkpoint(workdir / "checkpoint")


@pytest.fixture(scope="session")
def image_files(workdir) -> dict[str, str]:
    """Images by tile count: 'four' and 'four_b' (2x2 tiles), 'two' (2x1), 'one' (1x1)."""
    shapes = {"four": (2, 2, 0), "four_b": (2, 2, 1), "two": (2, 1, 2), "one": (1, 1, 3)}
    files = {}
    for name, (wide, high, seed) in shapes.items():
        files[name] = str(workdir / f"{name}.png")
        random_image(wide, high, seed).save(files[name])
    return files


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def stock_server(checkpoint, workdir):
    with running(checkpoint, workdir, "stock") as server:
        yield server


@pytest.fixture(scope="module")
def full_budget_server(checkpoint, workdir):
    with running(checkpoint, workdir, "full", ["--budget", str(FULL_BUDGET)]) as server:
        yield server


@pytest.fixture(scope="session")
def trimmed_server(checkpoint, workdir):
    with running(checkpoint, workdir, "trimmed", ["--budget", str(BUDGET)]) as server:
        yield server

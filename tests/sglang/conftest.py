"""SGLang servers on 127.0.0.1 for the engine tests: stock SGLang and `trimllama sglang` on the tiny checkpoint.

Each server runs in its own process group and is stopped with SIGTERM to the group (SIGKILL after 30 s). `stock` and
`trimmed` (the defaults: image pool, image_turn rows, budget 64) live for the whole session; the other arms live for
their module, so that a few servers at most run at once (`--sleep-on-idle`: an idle scheduler would spin a core).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from trimllama.harness.server_process import ServerProcess, free_port
from trimllama.testing import random_image, save_sglang_checkpoint

pytest.importorskip("sglang.srt")

START_TIMEOUT_S = 300
PATCHES = 65  # (112 / 14)^2 + 1 tokens per tile
MAX_TILES = 4
LAYERS, CROSS_LAYERS = 5, 2  # the checkpoint's decoder layers, and how many of them are cross-attention layers
BUDGET = 64  # a quarter of a 4-tile image's 260 tokens
FULL_BUDGET = 300  # more than any image's 260 tokens
POOL_SLOTS = 4096
SGLANG_FLAGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--dtype", "float32",
    "--mem-fraction-static", "0.05",
    "--max-total-tokens", str(POOL_SLOTS),
    "--skip-server-warmup",
    "--sleep-on-idle",
    "--decode-log-interval", "1",
    "--enable-metrics",
]  # fmt: skip


def image_slots(tokens: int, packed: bool = True) -> int:
    """Pool slots of an image block of `tokens` tokens: the image pool packs 2 cross layers into 5-layer slots."""
    return -(-tokens * CROSS_LAYERS // LAYERS) if packed else tokens


def prompt(question: str, images: int = 1) -> str:
    """The raw prompt the checkpoint's chat template writes for one user turn."""
    return "<|image|>" * images + f"<|begin_of_text|>question : {question} answer :"


def follow_up(history: str, answer: str, question: str) -> str:
    """`history` (a prompt ending in the generation prompt), an assistant answer, then the next user turn."""
    return f"{history} {answer}<|end_of_text|><|begin_of_text|>question : {question} answer :"


class Server(ServerProcess):
    """One SGLang server process group; `generate` posts to its native /generate endpoint."""

    def __init__(self, command: list[str], env: dict, log: Path, port: int, kept_dump: Path | None = None) -> None:
        super().__init__(command, env, log, port)
        self.kept_dump = kept_dump

    def post_generate(self, prompt: str | list[str], images=None, max_new_tokens: int = 8, **sampling) -> requests.Response:
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, **sampling}}
        if images is not None:
            body["image_data"] = images
        return requests.post(f"{self.url}/generate", json=body, timeout=600)

    def generate(self, prompt: str | list[str], images=None, max_new_tokens: int = 8, **sampling) -> dict | list[dict]:
        """Greedy /generate; `images` is a path (or list of paths, or None per prompt of a batch)."""
        response = self.post_generate(prompt, images, max_new_tokens, **sampling)
        response.raise_for_status()
        return response.json()

    def flush_cache(self) -> None:
        requests.post(f"{self.url}/flush_cache", timeout=30).raise_for_status()

    def server_info(self) -> dict:
        return requests.get(f"{self.url}/server_info", timeout=30).json()

    def metric(self, name: str) -> float:
        """A gauge of SGLang's /metrics (e.g. `sglang:kv_available_tokens`), summed over its label sets."""
        text = requests.get(f"{self.url}/metrics", timeout=30).text
        values = [float(value) for value in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
        assert values, f"{name} is not in /metrics"
        return sum(values)

    def log_lines(self, since: int = 0) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()[since:]

    def running_peak(self, since: int) -> int:
        """The most requests SGLang's own decode log reports running at once (`#running-req`), after line `since`."""
        counts = [int(m.group(1)) for line in self.log_lines(since) if "Decode batch" in line for m in [re.search(r"#running-req: (\d+)", line)] if m]
        assert counts, "no decode batch was logged"
        return max(counts)

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


@pytest.fixture(scope="session")
def hf(checkpoint):
    """The checkpoint in Hugging Face, aligned to SGLang (`tiny_checkpoint.hf_model`), and its processor."""
    from tiny_checkpoint import hf_model
    from transformers import AutoProcessor

    return hf_model(checkpoint), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def stock_server(checkpoint, workdir):
    with running(checkpoint, workdir, "stock") as server:
        yield server


@pytest.fixture(scope="session")
def trimmed_server(checkpoint, workdir):
    with running(checkpoint, workdir, "trimmed", ["--budget", str(BUDGET)]) as server:
        yield server

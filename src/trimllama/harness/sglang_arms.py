"""What the SGLang benchmarks share: their common options, the checkpoint and one 4-tile image per request, and the
servers of their arms (stock SGLang or `trimllama sglang`), started one after the other on the same arguments.

Arguments after `--` go to every server unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .server_process import ServerProcess, free_port

CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--dtype", "float32",
             "--mem-fraction-static", "0.05", "--skip-server-warmup", "--sleep-on-idle"]  # fmt: skip


def parse(parser: argparse.ArgumentParser, argv: list[str], max_total_tokens: int) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own options (the shared ones added here) and the arguments after `--`."""
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser.add_argument("--model-path", help="an Mllama checkpoint (directory or hub id)")
    parser.add_argument("--tiny", action="store_true", help="build and serve the tiny CPU test checkpoint")
    parser.add_argument("--budget", type=int, default=64, help="tokens kept per image")
    parser.add_argument("--max-total-tokens", type=int, default=max_total_tokens, help="the pool given to every server")
    parser.add_argument("--cpu", action="store_true", help="SGLang's CPU engine flags (implied by --tiny)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (and a plot beside it, .png)")
    return parser.parse_args(argv), passthrough


def prepare(args: argparse.Namespace, images: int, prefix: str) -> tuple[Path, str, list[str]]:
    """A work folder, the model path (the tiny checkpoint built there with `--tiny`), and `images` random 4-tile
    images (one per request, so no request reuses another's cached image K/V)."""
    from transformers import AutoConfig

    from ..testing import random_image, save_sglang_checkpoint

    work = Path(tempfile.mkdtemp(prefix=prefix))
    model_path = str(save_sglang_checkpoint(work / "checkpoint")) if args.tiny else args.model_path
    tile = AutoConfig.from_pretrained(model_path).vision_config.image_size
    paths = []
    for seed in range(images):
        paths.append(str(work / f"image-{seed}.png"))
        random_image(2, 2, seed=seed, tile=tile).save(paths[-1])
    return work, model_path, paths


def serve_arms(
    arms: dict[str, list[str] | None],
    args: argparse.Namespace,
    passthrough: list[str],
    work: Path,
    model_path: str,
    measure: Callable[[ServerProcess], object],
    launch: list[str] = (),
    env: dict[str, str] | None = None,
) -> dict[str, object]:
    """`measure(server)` for each arm, its server started and stopped in turn: None is stock SGLang, a list is
    `trimllama sglang --budget N <list>`; every server gets `launch`, the pool size, the CPU flags (or
    `--disable-cuda-graph`) and the arguments after `--`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("SGLANG_EXTERNAL", "TRIMLLAMA_SGLANG"))}
    environment.update(env or {})
    cpu = args.cpu or args.tiny
    if cpu:
        environment["SGLANG_USE_CPU_ENGINE"] = "1"
    results = {}
    for arm, options in arms.items():
        port = free_port()
        server_args = ["--model-path", model_path, "--host", "127.0.0.1", "--port", str(port), *launch,
                       "--max-total-tokens", str(args.max_total_tokens), *(CPU_FLAGS if cpu else ["--disable-cuda-graph"]),
                       *passthrough]  # fmt: skip
        if options is None:
            command = [sys.executable, "-m", "sglang.launch_server", *server_args]
        else:
            command = [str(Path(sys.executable).parent / "trimllama"), "sglang", "--budget", str(args.budget), *options, "--", *server_args]
        server = ServerProcess(command, environment, work / f"{arm}.log", port)
        try:
            server.wait_ready(900)
            results[arm] = measure(server)
        finally:
            server.stop()
        print(f"{arm}: {results[arm]}", flush=True)
    return results

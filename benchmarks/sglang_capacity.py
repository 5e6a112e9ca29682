"""SGLang capacity, stock vs trimmed: image requests the KV pool admits at once, and requests/s.

    python benchmarks/sglang_capacity.py --tiny                                   # CPU, the tiny test checkpoint
    python benchmarks/sglang_capacity.py --model-path meta-llama/Llama-3.2-11B-Vision-Instruct --budget 1600 \
        --max-total-tokens 200000 -- --tp 2                                       # a GPU machine

Two servers, one after the other, with the same `--max-total-tokens`: stock SGLang (`python -m sglang.launch_server`)
and `trimllama sglang --budget N`. For each, from the engine's own figures: the pool size (`max_total_num_tokens`
of /server_info) and the slots one request takes (`usage.prompt_tokens` + `--max-tokens`), so the number of such
requests the pool holds at once; then `--requests` chat requests with the `openai` client, `--concurrency` at a
time (greedy, `--max-tokens` each), each with its own random image (no request reuses another's cached image
K/V), timed after one warm-up request. On the tiny CPU model the times are noisy and
dominated by the vision encoder, which trimming does not change: only the slot arithmetic carries over.
Arguments after `--` go to both servers. Run it alone (it starts servers): `flock /work/heavy.lock python ...`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from trimllama.harness.server_process import ServerProcess, free_port

CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--dtype", "float32",
             "--mem-fraction-static", "0.05", "--skip-server-warmup"]  # fmt: skip


def find_key(data, key: str):
    """The first value of `key` anywhere in nested dicts and lists."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = find_key(item, key)
            if found is not None:
                return found
    return None


def image_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def measure(server: ServerProcess, args: argparse.Namespace, urls: list[str]) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    model = client.models.list().data[0].id

    def ask(index: int):
        content = [{"type": "image_url", "image_url": {"url": urls[index]}}, {"type": "text", "text": args.question}]
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=args.max_tokens,
        )

    first = ask(-1)  # warm-up, and the engine's slot count of one request
    pool = find_key(requests.get(f"{server.url}/server_info", timeout=30).json(), "max_total_num_tokens")
    per_request = first.usage.prompt_tokens + args.max_tokens
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as executor:
        list(executor.map(ask, range(args.requests)))
    elapsed = time.perf_counter() - start
    return {
        "pool_slots": pool,
        "prompt_tokens": first.usage.prompt_tokens,
        "slots_per_request": per_request,
        "admitted_at_once": pool // per_request,
        "requests_per_s": args.requests / elapsed,
    }


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="an Mllama checkpoint (directory or hub id)")
    parser.add_argument("--tiny", action="store_true", help="build and serve the tiny CPU test checkpoint")
    parser.add_argument("--budget", type=int, default=None, help="tokens kept per image (default: a quarter of a 4-tile image)")
    parser.add_argument("--max-total-tokens", type=int, default=16384, help="the pool size given to both servers")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--question", default="what color is the square")
    parser.add_argument("--cpu", action="store_true", help="SGLang's CPU engine flags (implied by --tiny)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.tiny and not args.model_path:
        parser.error("give --model-path or --tiny")

    from transformers import AutoConfig

    from trimllama.testing import random_image, save_sglang_checkpoint

    work = Path(tempfile.mkdtemp(prefix="sglang-capacity-"))
    model_path = str(save_sglang_checkpoint(work / "checkpoint")) if args.tiny else args.model_path
    vision = AutoConfig.from_pretrained(model_path).vision_config
    tile_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    budget = args.budget or vision.max_num_tiles * tile_tokens // 4
    urls = []  # the last one is the warm-up's
    for seed in range(args.requests + 1):
        path = work / f"image-{seed}.png"
        random_image(2, 2, seed=seed, tile=vision.image_size).save(path)
        urls.append(image_url(str(path)))

    env = {key: value for key, value in os.environ.items() if not key.startswith(("SGLANG_EXTERNAL", "TRIMLLAMA_SGLANG"))}
    cpu = args.cpu or args.tiny
    if cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    results = {}
    for arm in ("stock", "trimmed"):
        port = free_port()
        launch = ["--model-path", model_path, "--host", "127.0.0.1", "--port", str(port),
                  "--max-total-tokens", str(args.max_total_tokens), *(CPU_FLAGS if cpu else []), *passthrough]  # fmt: skip
        if arm == "stock":
            command = [sys.executable, "-m", "sglang.launch_server", *launch]
        else:
            command = [str(Path(sys.executable).parent / "trimllama"), "sglang", "--budget", str(budget), "--", *launch]
        server = ServerProcess(command, env, work / f"{arm}.log", port)
        try:
            server.wait_ready(600)
            results[arm] = measure(server, args, urls)
        finally:
            server.stop()
        print(f"{arm:8s} {json.dumps(results[arm])}", flush=True)

    stock, trimmed = results["stock"], results["trimmed"]
    print(f"\nmodel {model_path}, budget {budget} per image, --max-total-tokens {args.max_total_tokens}")
    print(f"{'':24s}{'stock':>12s}{'trimmed':>12s}{'ratio':>9s}")
    for key in ("prompt_tokens", "slots_per_request", "admitted_at_once", "requests_per_s"):
        ratio = trimmed[key] / stock[key] if stock[key] else float("nan")
        print(f"{key:24s}{stock[key]:12.4g}{trimmed[key]:12.4g}{ratio:9.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model_path, "budget": budget, **results}, indent=2))


if __name__ == "__main__":
    main()

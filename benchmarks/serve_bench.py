"""Load benchmark of `trimllama serve`: requests/s and p50/p99 latency, batched vs one at a time, trimmed vs not.

    python benchmarks/serve_bench.py --model testbed --concurrency 1,4,16 --out benchmarks/results
    python benchmarks/serve_bench.py --model bench11b --concurrency 1,4 --requests 8 --max-tokens 4

The warm-up request each server gets first is not timed.

Arms (each at every concurrency level, closed loop: `c` clients each send their next request when
the previous one is answered, `--requests` requests per level in all):
    one_at_a_time       a server with --max-batch-size 1, untrimmed requests
    batched_untrimmed   a server with --max-batch-size B, untrimmed requests (trim: {"method": "none"})
    batched_trimmed     the same server, trimmed requests (trim: {"head_k": K} or {"budget": N})

Models: `testbed`, the shipped trained checkpoint (112-px tiles, 197 tokens per tile), with testbed
questions; `bench11b`, `trimllama.bench`'s random Mllama with the text widths of Llama-3.2-11B-Vision
(hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256, 20 layers with shared weights by
default) and the real image layout (560-px tiles, 1601 tokens per tile), fed 2x2-tile images, with
a word-level tokenizer whose ids are the model's (it has no trained tokenizer; its answers are noise).

Both servers run at once in subprocesses (this script with `serve`), the load in this process over
HTTP. At each level the arms take turns, `--repeats` times, in an order rotated each time; throughput
is requests over the summed wall time, p50/p99 over all requests of the arm at that level.
Writes serve_<model>.json and serve_<model>.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trimllama.harness.server_process import ServerProcess, free_port

ARMS = {
    "one_at_a_time": ("single", {"method": "none"}),
    "batched_untrimmed": ("batched", {"method": "none"}),
    "batched_trimmed": ("batched", None),  # filled in with --head-k
}
BENCH11B_TILE = 560


# --------------------------------------------------------------------------- the server side


def build_bench11b(layers: int, dtype_name: str):
    """(model, processor): trimllama.bench's 11B-width random model and a processor with its token ids."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        MllamaImageProcessorPil,
        MllamaProcessor,
        PreTrainedTokenizerFast,
    )

    from trimllama.bench import LLAMA_32_11B_VISION, build_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    bench = build_model(LLAMA_32_11B_VISION.with_layers(layers), torch.device("cpu"), dtype, share_weights=True)
    config = bench.model.config
    text = config.text_config
    special = {
        "<|finetune_right_pad_id|>": text.pad_token_id,
        "<|begin_of_text|>": text.bos_token_id,
        "<|end_of_text|>": text.eos_token_id,
        "<|image|>": config.image_token_index,
    }
    free = [i for i in range(text.vocab_size) if i not in special.values()]
    special |= {"<unk>": free[0], "<|python_tag|>": free[1]}
    vocab = {f"w{i}": i for i in free[2:]} | special
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(list(special))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image|>"},
    )
    template = (
        "<|begin_of_text|>{%- for m in messages -%}{%- for c in m['content'] -%}"
        "{%- if c['type'] == 'image' -%}<|image|>{%- else -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    )
    image_processor = MllamaImageProcessorPil(size={"height": BENCH11B_TILE, "width": BENCH11B_TILE}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return bench.model, processor


def serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from trimllama.serve import ServeConfig, create_app

    torch.set_num_threads(args.threads)
    if args.model == "testbed":
        from trimllama.testbed import load_testbed

        model, processor = load_testbed()
    else:
        model, processor = build_bench11b(args.layers, args.dtype)
    config = ServeConfig(
        model_name=args.model,
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_queue=4096,
    )
    uvicorn.run(create_app(model, processor, config), host="127.0.0.1", port=args.port, log_level="warning")


# --------------------------------------------------------------------------- the load side


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_bodies(model: str, count: int, seed: int) -> list[list[dict]]:
    """`count` distinct message lists (one image and a question each)."""
    if model == "testbed":
        from trimllama.testbed import make_questions

        questions = make_questions(count, seed=seed)
        return [_messages(data_url(q.image), q.question) for q in questions]
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = 2 * BENCH11B_TILE
    bodies = []
    for _ in range(count):
        gradient = np.linspace(0, 255, side, dtype=np.float32)
        pixels = (gradient[None, :, None] * rng.uniform(0.2, 1.0, size=(1, 1, 3)) + gradient[:, None, None] * 0.3) % 256
        image = Image.fromarray(np.broadcast_to(pixels, (side, side, 3)).astype(np.uint8))
        bodies.append(_messages(data_url(image), "describe the image"))
    return bodies


def _messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


async def run_level(url: str, model: str, bodies: list, trim: dict, concurrency: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """Closed-loop load: `concurrency` clients, `requests` requests in all. Raw samples: wall time, per-request latency."""
    import httpx

    latencies, completions, reports = [], [], []
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            index, next_index = next_index, next_index + 1
            payload = {"model": model, "messages": bodies[index % len(bodies)], "max_tokens": max_tokens, "temperature": 0, "trim": trim}
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=payload)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            body = response.json()
            completions.append(body["usage"]["completion_tokens"])
            reports.append(body["trim"])

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies_s": latencies, "completion_tokens": completions, "trim": reports}


def summarise_level(concurrency: int, runs: list[dict], batches: float, served: float) -> dict:
    """Pool the repetitions of one arm at one level: throughput over the summed wall time, latency percentiles over all requests."""
    latencies = [latency for run in runs for latency in run["latencies_s"]]
    completions = [tokens for run in runs for tokens in run["completion_tokens"]]
    reports = [report for run in runs for report in run["trim"]]
    wall = sum(run["wall_s"] for run in runs)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "repeats": len(runs),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "requests_per_s_by_repeat": [len(run["latencies_s"]) / run["wall_s"] for run in runs],
        "completion_tokens_per_s": sum(completions) / wall,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "latency_mean_s": float(np.mean(latencies)),
        "mean_batch_size": served / max(1.0, batches),
        "completion_tokens_mean": float(np.mean(completions)),
        "image_tokens_mean": float(np.mean([r["image_tokens"] for r in reports])),
        "kept_tokens_mean": float(np.mean([r["kept_tokens"] for r in reports])),
        "cross_kv_bytes_saved_mean": float(np.mean([r["cross_kv_bytes_saved"] for r in reports])),
    }


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(batches, requests batched) from the server's /metrics."""
    values = {}
    for line in metrics_text.splitlines():
        if line.startswith(("trimllama_batch_size_count ", "trimllama_batch_size_sum ")):
            name, value = line.split()
            values[name] = float(value)
    return values["trimllama_batch_size_count"], values["trimllama_batch_size_sum"]


def start_server(args: argparse.Namespace, max_batch_size: int, log: Path) -> ServerProcess:
    """This script's own `serve` (the 11B-width model) with `max_batch_size`, on a free port."""
    port = free_port()
    command = [
        sys.executable, __file__, "serve", "--model", args.model, "--port", str(port),
        "--max-batch-size", str(max_batch_size), "--batch-window-ms", str(args.batch_window_ms),
        "--layers", str(args.layers), "--dtype", args.dtype, "--threads", str(args.threads),
    ]  # fmt: skip
    return ServerProcess(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, log, port)


def metrics(server: ServerProcess) -> str:
    import httpx

    return httpx.get(f"{server.url}/metrics", timeout=30).text


def bench(args: argparse.Namespace) -> dict:
    """Both servers up at once; at each level the arms take turns (order rotated each repetition), so drift in
    the machine's load spreads over all arms instead of biasing the one measured last."""
    trimmed = {"method": "headwise_topk", **({"budget": args.budget} if args.budget else {"head_k": args.head_k})}
    arms = {name: (kind, trim if trim is not None else trimmed) for name, (kind, trim) in ARMS.items()}
    bodies = request_bodies(args.model, max(args.requests), args.seed)
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    servers = {kind: start_server(args, size, logs / f"{kind}.log") for kind, size in (("single", 1), ("batched", args.max_batch_size))}
    results: dict = {name: [] for name in arms}
    try:
        for server in servers.values():
            server.wait_ready(args.startup_timeout)
            asyncio.run(run_level(server.url, args.model, bodies, {"method": "none"}, 1, 1, args.max_tokens, args.timeout))
        for concurrency, requests in zip(args.concurrency, args.requests):
            runs: dict = {name: [] for name in arms}
            batch_counts = {name: [0.0, 0.0] for name in arms}
            names = list(arms)
            for repeat in range(args.repeats):
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    kind, trim = arms[name]
                    batches_before, served_before = batch_stats(metrics(servers[kind]))
                    runs[name].append(
                        asyncio.run(run_level(servers[kind].url, args.model, bodies, trim, concurrency, requests, args.max_tokens, args.timeout))
                    )
                    batches_after, served_after = batch_stats(metrics(servers[kind]))
                    batch_counts[name][0] += batches_after - batches_before
                    batch_counts[name][1] += served_after - served_before
            for name in arms:
                level = summarise_level(concurrency, runs[name], *batch_counts[name])
                results[name].append(level)
                print(
                    f"{args.model} {name:<18} c={concurrency:<3} {level['requests_per_s']:7.3f} req/s  "
                    f"p50 {level['latency_p50_s']:.3f} s  p99 {level['latency_p99_s']:.3f} s  "
                    f"batch {level['mean_batch_size']:.1f}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    return {
        "model": args.model,
        "arms": results,
        "trim": arms["batched_trimmed"][1],
        "settings": {
            key: getattr(args, key)
            for key in ("concurrency", "requests", "repeats", "max_tokens", "max_batch_size", "batch_window_ms", "threads", "seed")
        }
        | ({"layers": args.layers, "dtype": args.dtype} if args.model == "bench11b" else {}),
        "machine": machine(),
    }


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in summary["arms"].items():
        concurrency = [level["concurrency"] for level in levels]
        throughput.plot(concurrency, [level["requests_per_s"] for level in levels], marker="o", label=name)
        line = latency.plot(concurrency, [level["latency_p50_s"] for level in levels], marker="o", label=f"{name} p50")[0]
        latency.plot(concurrency, [level["latency_p99_s"] for level in levels], marker="x", linestyle="--", color=line.get_color(), label=f"{name} p99")
    for axis in (throughput, latency):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.grid(alpha=0.3)
    throughput.set_ylabel("requests / s")
    latency.set_ylabel("latency (s)")
    throughput.legend()
    latency.legend(fontsize=7)
    machine_line = f"{summary['machine']['cpu']}, {summary['machine']['cores']} cores"
    trim = ", ".join(f"{key}={value}" for key, value in summary["trim"].items())
    figure.suptitle(f"trimllama serve, {summary['model']} model, trimmed arm {trim}; {machine_line}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve"], help="serve: the server subprocess (internal)")
    parser.add_argument("--model", default="testbed", choices=["testbed", "bench11b"])
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="concurrent clients per level (default 1,4,16)")
    parser.add_argument("--requests", type=int_list, default=None, help="requests per level, one value or one per level (default 4 x concurrency, at least 16)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every arm at every level, interleaved (default 3)")
    parser.add_argument("--max-tokens", type=int, default=4, help="max_tokens of every request (default 4)")
    parser.add_argument("--head-k", type=float, default=0.1, help="trimmed arm: headwise_topk head_k (default 0.1)")
    parser.add_argument("--budget", type=int, default=None, help="trimmed arm: headwise_topk with this fixed budget instead")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batched server: --max-batch-size (default 16)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="batched server: --batch-window-ms (default 10)")
    parser.add_argument("--layers", type=int, default=20, help="bench11b: decoder layers, multiple of 5, >= 20 (default 20)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bench11b weights (default float32)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="server torch threads")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request before the run fails")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for the server to load the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="serve mode: the port")
    parser.add_argument("--out", default="benchmarks/results", help="directory for serve_<model>.json and .png")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = [max(16, 4 * c) for c in args.concurrency]
    elif len(args.requests) == 1:
        args.requests = args.requests * len(args.concurrency)
    if len(args.requests) != len(args.concurrency):
        parser.error(f"--requests has {len(args.requests)} values for {len(args.concurrency)} concurrency levels")
    if min(args.max_tokens, args.max_batch_size, args.repeats, args.budget or 1) < 1 or not 0.0 < args.head_k <= 1.0:
        parser.error("--max-tokens, --max-batch-size, --repeats and --budget must be >= 1, --head-k a fraction in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "serve":
        serve(args)
        return 0
    summary = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve_{args.model}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / f"serve_{args.model}.png")
    print(f"wrote {out / f'serve_{args.model}.json'} and {out / f'serve_{args.model}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SGLang capacity at the same KV bytes: stock, trimmed in SGLang's layout (`--shared-pool`), trimmed in the image pool.

    python benchmarks/sglang_capacity.py --tiny --out benchmarks/results/sglang_capacity_tiny.json   # CPU
    python benchmarks/sglang_capacity.py --model-path meta-llama/Llama-3.2-11B-Vision-Instruct --budget 1600 \
        --max-total-tokens 200000 -- --tp 2                                       # a GPU machine

Three servers, one after the other, with the same `--max-total-tokens` (so the same KV pool, whose bytes each server
logs: "KV Cache is allocated ... K size ... V size"): stock SGLang, `trimllama sglang --budget N --shared-pool` and
`trimllama sglang --budget N` (the image pool). Each gets `--requests` image requests at once (one /generate batch),
each with its own 4-tile image (no request reuses another's cached image K/V) and `--max-tokens` new tokens
(ignore_eos; one burst per value), radix cache off. Reported from the engine's own figures: the pool and its logged
size, the slots of one request (`prompt_tokens`), and the peak number of requests running at once (SGLang's decode
log, `#running-req`), with its ratio to stock; then the wall time of the burst. `--arithmetic` prints the bytes-per-image table of the 11B and 90B
for each layout (no server). Arguments after `--` go to every server. Run it alone (it starts servers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import requests

from trimllama.harness import sglang_arms
from trimllama.harness.server_process import ServerProcess
from trimllama.integrations.sglang.layout import PoolLayout

ARMS = {
    "stock": None,
    "trimmed_shared_pool": ["--shared-pool"],
    "trimmed_image_pool": [],
}
# Llama-3.2-Vision: decoder layers, cross-attention layers; K+V of one token in one layer: 2 x 8 KV heads x 128 x 2 B
MODELS = {"11B": (40, tuple(range(3, 40, 5))), "90B": (100, tuple(range(3, 100, 5)))}
BYTES_PER_ROW = 2 * 8 * 128 * 2
IMAGE_TOKENS = 4 * 1601


def arithmetic(budget: int = 1600, memory: float = 80e9) -> list[dict]:
    """Bytes per image and text token in each layout, and images of `budget` kept tokens per `memory` bytes."""
    rows = []
    for model, (layers, cross) in MODELS.items():
        for name, packed in (("shared", False), ("image_pool", True)):
            layout = PoolLayout(layers=layers, cross_layers=cross, packed=packed)
            per_token = layout.bytes_per_image_token(BYTES_PER_ROW)
            rows.append({
                "model": model,
                "layout": name,
                "bytes_per_image_token": per_token,
                "bytes_per_text_token": layers * BYTES_PER_ROW,
                "stock_image_bytes": IMAGE_TOKENS * layers * BYTES_PER_ROW,
                "trimmed_image_bytes": budget * per_token,
                "trimmed_images_per_80gb": int(memory // (budget * per_token)),
                "stock_images_per_80gb": int(memory // (IMAGE_TOKENS * layers * BYTES_PER_ROW)),
            })  # fmt: skip
    return rows


def kv_bytes(log: str) -> float:
    """GB of K plus V that SGLang allocated, from its start-up line."""
    match = re.search(r"KV Cache is allocated\..*K size: ([\d.]+) GB, V size: ([\d.]+) GB", log)
    return float(match.group(1)) + float(match.group(2))


def running_peak(lines: list[str]) -> int:
    counts = [int(m.group(1)) for line in lines if "Decode batch" in line for m in [re.search(r"#running-req: (\d+)", line)] if m]
    return max(counts, default=0)


def measure(server: ServerProcess, args: argparse.Namespace, images: list[str]) -> dict:
    """The pool, one request's slots, then one burst per `--max-tokens` value: peak running requests and seconds."""
    text = f"<|image|><|begin_of_text|>{args.question}"
    one = requests.post(f"{server.url}/generate", json={"text": text, "image_data": images[-1], "sampling_params": {"max_new_tokens": 1}}, timeout=600)
    one.raise_for_status()
    info = requests.get(f"{server.url}/server_info", timeout=30).json()
    result = {
        "pool_slots": info.get("max_total_tokens"),
        "kv_gb_logged": kv_bytes(server.log.read_text(errors="replace")),
        "prompt_tokens": one.json()["meta_info"]["prompt_tokens"],
        "bursts": {},
    }
    for new_tokens in args.max_tokens:
        start_line = len(server.log.read_text(errors="replace").splitlines())
        body = {
            "text": [text] * args.requests,
            "image_data": images[: args.requests],
            "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
        }
        start = time.perf_counter()
        response = requests.post(f"{server.url}/generate", json=body, timeout=3600)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        lines = server.log.read_text(errors="replace").splitlines()[start_line:]
        result["bursts"][new_tokens] = {"peak_running_requests": running_peak(lines), "burst_seconds": elapsed}
    return result


def plot(record: dict, path: Path) -> None:
    """Peak requests running at once per arm, one group of bars per number of new tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(record["arms"])
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        peaks = [record["arms"][arm]["bursts"][str(n)]["peak_running_requests"] for n in record["max_tokens"]]  # JSON keys
        bars = axis.bar([group + index * width for group in range(len(peaks))], peaks, width, label=arm.replace("_", " "))
        axis.bar_label(bars)
    axis.set_xticks([group + width * (len(arms) - 1) / 2 for group in range(len(record["max_tokens"]))])
    axis.set_xticklabels([f"{n} new tokens per request" for n in record["max_tokens"]])
    axis.set_ylabel("requests running at once (SGLang's decode log)")
    axis.set_title(f"{record['requests']} image requests at once, {record['max_total_tokens']} KV slots, budget {record['budget']}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[64, 8], help="new tokens per request, one burst each")
    parser.add_argument("--question", default="question : what color is the square answer :")
    parser.add_argument("--arithmetic", action="store_true", help="print the 11B/90B bytes-per-image table and exit")
    args, passthrough = sglang_arms.parse(parser, sys.argv[1:], max_total_tokens=4096)
    if args.arithmetic:
        print(json.dumps(arithmetic(), indent=2))
        return
    if not args.tiny and not args.model_path:
        parser.error("give --model-path or --tiny")
    work, model_path, images = sglang_arms.prepare(args, args.requests + 1, "sglang-capacity-")  # the last: one request's
    results = sglang_arms.serve_arms(
        ARMS, args, passthrough, work, model_path, lambda server: measure(server, args, images),
        launch=["--disable-radix-cache", "--decode-log-interval", "1"],
        env={"SGLANG_ENABLE_COLOCATED_BATCH_GEN": "1"},  # the burst reaches the scheduler as one batch
    )

    print(f"\nmodel {model_path}, budget {args.budget} per image, --max-total-tokens {args.max_total_tokens}, "
          f"{args.requests} requests at once, each with its own 4-tile image")  # fmt: skip
    print(f"{'':22s}{'KV GB':>8s}{'prompt_tokens':>15s}" + "".join(f"{f'peak, {n} new':>14s}{'x stock':>9s}" for n in args.max_tokens))
    for arm, result in results.items():
        cells = "".join(
            f"{result['bursts'][n]['peak_running_requests']:14d}"
            f"{result['bursts'][n]['peak_running_requests'] / results['stock']['bursts'][n]['peak_running_requests']:9.2f}"
            for n in args.max_tokens
        )
        print(f"{arm:22s}{result['kv_gb_logged']:8.3f}{result['prompt_tokens']:15d}{cells}")
    if args.out:
        record = {"model": model_path, "budget": args.budget, "max_total_tokens": args.max_total_tokens,
                  "requests": args.requests, "max_tokens": args.max_tokens, "arms": results, "arithmetic_11b_90b_budget_1600": arithmetic()}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=2))
        plot(json.loads(json.dumps(record)), Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()

"""SGLang conversations: what each turn prefills again, and its time to first token, for three keyings.

    python benchmarks/sglang_conversations.py --tiny --out benchmarks/results/sglang_conversations_tiny.json   # CPU
    python benchmarks/sglang_conversations.py --model-path meta-llama/Llama-3.2-11B-Vision-Instruct --budget 1600 -- --tp 2

Three servers, one after the other, radix cache on, the same `--max-total-tokens`: stock SGLang (an image's pad ids
hash the image), `trimllama sglang --budget N --param query_rows=all` (every prompt row scores, so the pad ids hash
the whole prompt: per-prompt keying) and `trimllama sglang --budget N` (query_rows=image_turn, the default: the pad
ids hash the image's own user message). `--conversations` chats at once, each about its own 4-tile image, `--turns`
turns each; every turn sends the whole history with the model's earlier replies through the `openai` client
(streamed), all conversations' turn k together. Per turn, from the engine's own figures: prompt tokens, cached tokens
(`usage.prompt_tokens_details.cached_tokens`, `--enable-cache-report`), so the tokens prefilled again, and the time
to first token (median over conversations). Arguments after `--` go to every server. Run it alone (it starts servers).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trimllama.harness import sglang_arms
from trimllama.harness.server_process import ServerProcess
ARMS = {"stock": None, "per_prompt_keying": ["--param", "query_rows=all"], "image_turn_keying": []}
QUESTIONS = ["what color is the square", "how many circles are there", "what shape is left of the circle", "is there a red triangle"]


def image_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def run_conversations(server: ServerProcess, args: argparse.Namespace, urls: list[str]) -> list[dict]:
    """Per turn: median prompt, cached and prefilled tokens and time to first token over the conversations."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    histories = [[] for _ in urls]

    def turn(index: int, number: int) -> dict:
        question = QUESTIONS[number % len(QUESTIONS)]
        content = [{"type": "text", "text": question}]
        if number == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": urls[index]}})
        histories[index].append({"role": "user", "content": content})
        start = time.perf_counter()
        first, reply, usage = None, [], None
        stream = client.chat.completions.create(
            model=model, messages=histories[index], temperature=0, max_tokens=args.max_tokens, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                reply.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        histories[index].append({"role": "assistant", "content": "".join(reply)})
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
        return {"prompt": usage.prompt_tokens, "cached": cached, "ttft": first if first is not None else time.perf_counter() - start}

    turns = []
    with ThreadPoolExecutor(len(urls)) as pool:
        for number in range(args.turns):
            results = list(pool.map(lambda index: turn(index, number), range(len(urls))))
            turns.append({
                "turn": number + 1,
                "prompt_tokens": statistics.median(r["prompt"] for r in results),
                "cached_tokens": statistics.median(r["cached"] for r in results),
                "prefilled_tokens": statistics.median(r["prompt"] - r["cached"] for r in results),
                "ttft_s": statistics.median(r["ttft"] for r in results),
            })  # fmt: skip
    return turns


def plot(record: dict, path: Path) -> None:
    """Tokens prefilled again at each turn, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for arm, turns in record["arms"].items():
        axis.plot([t["turn"] for t in turns], [t["prefilled_tokens"] for t in turns], marker="o", label=arm.replace("_", " "))
    axis.set_xlabel("turn")
    axis.set_ylabel("tokens prefilled (prompt - cached), median")
    axis.set_xticks(range(1, record["turns"] + 1))
    axis.set_yscale("log")
    axis.set_title(f"{record['conversations']} conversations at once, budget {record['budget']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    args, passthrough = sglang_arms.parse(parser, sys.argv[1:], max_total_tokens=16384)
    if not args.tiny and not args.model_path:
        parser.error("give --model-path or --tiny")
    work, model_path, images = sglang_arms.prepare(args, args.conversations, "sglang-conversations-")
    urls = [image_url(path) for path in images]
    results = sglang_arms.serve_arms(
        ARMS, args, passthrough, work, model_path, lambda server: run_conversations(server, args, urls),
        launch=["--enable-cache-report"],
    )

    print(f"\nmodel {model_path}, budget {args.budget}, {args.conversations} conversations x {args.turns} turns at once")
    print(f"{'turn':>4s} " + "".join(f"{arm + ' prefilled / ttft':>36s}" for arm in results))
    for number in range(args.turns):
        cells = [f"{r[number]['prefilled_tokens']:>8.0f} of {r[number]['prompt_tokens']:<5.0f} {r[number]['ttft_s']:7.3f} s" for r in results.values()]
        print(f"{number + 1:>4d} " + "".join(f"{cell:>36s}" for cell in cells))
    if args.out:
        record = {"model": model_path, "budget": args.budget, "conversations": args.conversations, "turns": args.turns,
                  "max_tokens": args.max_tokens, "arms": results}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=2))
        plot(record, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()

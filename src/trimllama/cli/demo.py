"""`trimllama demo`: the main job on the embedded default, untrimmed and trimmed side by side."""

from __future__ import annotations

import argparse
import time

import torch

from ..handle import trim
from ..loading import encode
from ..methods import HeadwiseTopK, MergeRemainder
from .options import finite_float


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="answer held-out testbed questions untrimmed and trimmed, side by side",
        description="Loads the shipped testbed checkpoint (a small trained Mllama), asks it held-out questions "
        "untrimmed, with HeadwiseTopK, and with HeadwiseTopK + one remainder token per tile, and prints answers, "
        "accuracy, kept tokens and cache bytes.",
    )
    parser.add_argument("--questions", type=int, default=24, help="held-out questions to ask (default 24)")
    parser.add_argument("--head-k", type=finite_float, default=0.05, help="HeadwiseTopK per-head fraction (default 0.05)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out questions")
    return parser


def _testbed_available() -> bool:
    try:
        from ..testbed import CHECKPOINT_DIR
    except ImportError:
        return False
    return (CHECKPOINT_DIR / "model.safetensors").exists()


def run(args: argparse.Namespace) -> int:
    if not _testbed_available():
        return _run_tiny_random(args)
    from ..testbed import answer_matches, build_prompt, load_testbed, make_questions

    model, processor = load_testbed()
    questions = make_questions(args.questions, seed=args.seed)
    prompts = [build_prompt(processor, q.question) for q in questions]
    inputs = encode(processor, prompts, [[q.image] for q in questions])
    prompt_len = inputs["input_ids"].shape[1]
    method = HeadwiseTopK(head_k=args.head_k)
    arms = {"untrimmed": None, "trimmed": method, "+remainder": MergeRemainder(method)}
    print(f"testbed checkpoint, {len(questions)} held-out questions, {method.label()} vs untrimmed\n")
    answers, timings, stats = {}, {}, None
    with torch.no_grad():
        for arm, arm_method in arms.items():
            start = time.perf_counter()
            if arm_method is None:
                output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            else:
                with trim(model, arm_method) as handle:
                    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                stats = stats or handle.stats
            timings[arm] = time.perf_counter() - start
            answers[arm] = [a.strip() for a in processor.batch_decode(output[:, prompt_len:], skip_special_tokens=True)]
    print(f"{'question':<40} {'truth':<9} " + " ".join(f"{arm:<11}" for arm in arms) + "kept")
    for index, question in enumerate(questions):
        kept = f"{stats.image_tokens_after[index]}/{stats.image_tokens_valid[index]}"
        cells = " ".join(f"{answers[arm][index]:<11}" for arm in arms)
        print(f"{question.question:<40} {question.answer:<9} {cells}{kept}")
    for arm in arms:
        correct = sum(answer_matches(a, q.answer) for a, q in zip(answers[arm], questions))
        print(f"{arm:>10}: {correct}/{len(questions)} correct, {timings[arm]:.2f} s")
    _print_stats(stats)
    return 0


def _print_stats(stats) -> None:
    kept = sum(stats.image_tokens_after) / max(1, sum(stats.image_tokens_valid))
    print(
        f"image tokens kept: {sum(stats.image_tokens_after)}/{sum(stats.image_tokens_valid)} ({kept:.1%}); "
        f"cross-attention KV cache {stats.cross_kv_bytes_before / 2**20:.2f} MiB -> "
        f"{stats.cross_kv_bytes_after / 2**20:.2f} MiB (layers {stats.trimmed_layers} trimmed)"
    )


def _run_tiny_random(args: argparse.Namespace) -> int:
    from ..testing import SampleSpec, synthetic_batch, tiny_mllama

    print("no trained testbed checkpoint found: running on a tiny RANDOM Mllama built in code (answers are noise)")
    model = tiny_mllama(attn_implementation="sdpa")
    batch = synthetic_batch(model, [SampleSpec(tiles=(4, 1)), SampleSpec(tiles=(2,), left_pad=3)], seed=args.seed)
    with torch.no_grad():
        untrimmed = model.generate(**batch, max_new_tokens=8, do_sample=False)
        with trim(model, HeadwiseTopK(head_k=args.head_k)) as handle:
            trimmed = model.generate(**batch, max_new_tokens=8, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    print("untrimmed tokens:", untrimmed[:, prompt_len:].tolist())
    print("trimmed tokens:  ", trimmed[:, prompt_len:].tolist())
    _print_stats(handle.stats)
    return 0

"""`trimllama eval`: accuracy against kept tokens on the testbed's held-out questions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import TrimllamaError
from ..loading import prompt_text
from .options import CommandError, add_model_options, add_param_option, load_model, params_from_args, progress_bar

DEFAULT_SETTINGS = "0.02,0.05,0.1,0.25"
CONVERSATION_SETTINGS = "0.05,0.08"
DEFAULT_METHODS = (
    "headwise_topk,random,uniform_stride,tile_balanced,mean_heads_topk,last_token,class_token,feature_norm,attention_mass:mass"
)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy vs kept image tokens for selection methods on the testbed's held-out questions",
        description="Evaluates every method at every setting on a fixed held-out question set (generated from "
        "--seed), with the untrimmed model and the floor (later cross-attention layers see no image token) as "
        "references. Writes JSON (method, parameter, mean kept fraction, accuracy overall and per question type) "
        "and a PNG (accuracy against kept fraction, one panel per question type).",
    )
    add_model_options(parser)
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated registered method names; NAME sweeps head_k (headwise_topk's per-head k, the ratio of "
        "the others, as --head-k everywhere), NAME:SETTING sweeps that setting (e.g. attention_mass:mass)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated values of the swept setting; default "
        f"{DEFAULT_SETTINGS} ({CONVERSATION_SETTINGS} with --conversations: about 13%% and 25%% kept)",
    )
    add_param_option(parser.add_argument_group("trimming"), example="query_rows=image_turn")
    parser.add_argument("--merge-remainder", action="store_true", help="also evaluate each arm with MergeRemainder")
    parser.add_argument("--no-matched-random", action="store_true", help="skip the count-matched random arms")
    parser.add_argument(
        "--least-attended",
        action="store_true",
        help="also keep each head's least attended tokens (headwise_topk order=least) at every headwise_topk setting",
    )
    parser.add_argument(
        "--conversations",
        action="store_true",
        help="two-turn conversations instead (second question about another object): second-turn accuracy per type "
        "for untrimmed, floor, headwise_topk with query_rows all / last_turn / image_turn, the reused first-turn kept set, "
        "their remainder variants and count-matched random, at each --settings head_k (--methods is not used)",
    )
    parser.add_argument(
        "--questions", type=int, default=None, help="held-out questions (default 1000; conversations: default 200)"
    )
    parser.add_argument("--seed", type=int, default=2024, help="seed of the held-out set (default 2024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-images", action="store_true", help="control: permute images within each batch")
    parser.add_argument("--out", default="results/eval", help="output prefix: writes OUT.json and OUT.png")
    parser.add_argument("--json", action="store_true", help="print the JSON record to stdout, no progress")
    return parser


def _parse_settings(text: str) -> list[float | int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(float(item) if any(c in item for c in ".eE") else int(item))
        except ValueError:
            raise CommandError(f"--settings: {item!r} is not a number") from None
    return values


def run(args: argparse.Namespace) -> int:
    from ..harness.evaluate import answer_questions, build_arms, encode_questions, plot, score, uninformative_types, write_json
    from ..testbed import answer_matches, make_questions

    if args.questions is None:
        args.questions = 200 if args.conversations else 1000
    if args.questions < 1 or args.batch_size < 1:
        raise CommandError("--questions and --batch-size must be at least 1")
    if args.conversations:
        return run_conversations(args)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    try:
        arms = build_arms(
            methods,
            _parse_settings(args.settings or DEFAULT_SETTINGS),
            args.merge_remainder,
            not args.no_matched_random,
            args.least_attended,
            params_from_args(args.param),
        )
    except (TrimllamaError, ValueError) as error:
        raise CommandError(str(error)) from None
    model, processor, _ = load_model(args)
    questions = make_questions(args.questions, seed=args.seed)
    batches = encode_questions(processor, questions, question_prompt, args.batch_size, args.shuffle_images)
    results = []
    started = time.perf_counter()
    for arm in arms:
        bar = progress_bar(args, len(questions), desc=f"{arm.curve} {arm.parameter if arm.parameter is not None else ''}", leave=False)
        answers, kept, extra = answer_questions(
            model, processor, questions, arm.method, question_prompt, args.batch_size,
            progress=bar.update if bar else None, batches=batches,
        )
        if bar:
            bar.close()
        results.append(score(arm, questions, answers, kept, extra, answer_matches))
    meta = dict(
        model=args.model or "testbed", questions=len(questions), seed=args.seed,
        shuffle_images=args.shuffle_images, seconds=round(time.perf_counter() - started, 1),
    )
    out = Path(args.out)
    write_json(results, out.with_suffix(".json"), meta)
    plot(results, out.with_suffix(".png"), title=f"testbed, {len(questions)} held-out questions")
    if args.json:
        print(out.with_suffix(".json").read_text())
        return 0
    _print_table(results)
    close = uninformative_types(results)
    if close:
        print(f"floor within 20 points of untrimmed (cannot tell methods apart): {', '.join(close)}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def run_conversations(args: argparse.Namespace) -> int:
    """`--conversations`: second-turn accuracy of two-turn conversations on the testbed."""
    from ..harness import evaluate_conversations as conversations
    from ..testbed import answer_matches, make_conversations

    if args.shuffle_images or args.least_attended:
        raise CommandError("--shuffle-images and --least-attended do not apply to --conversations")
    try:
        arms = conversations.build_conversation_arms(
            _parse_settings(args.settings or CONVERSATION_SETTINGS),
            remainder=True,
            matched_random=not args.no_matched_random,
            params=params_from_args(args.param),
        )
    except (TrimllamaError, ValueError) as error:
        raise CommandError(str(error)) from None
    model, processor, _ = load_model(args)
    dialogues = make_conversations(args.questions, seed=args.seed)
    results = []
    started = time.perf_counter()
    for arm in arms:
        bar = progress_bar(args, len(dialogues), desc=f"{arm.curve} {arm.parameter or ''}", leave=False)
        results.append(
            conversations.run_arm(
                model, processor, dialogues, arm, answer_matches, args.batch_size, progress=bar.update if bar else None
            )
        )
        if bar:
            bar.close()
    meta = dict(
        model=args.model or "testbed", conversations=len(dialogues), seed=args.seed,
        seconds=round(time.perf_counter() - started, 1),
    )
    out = Path(args.out)
    conversations.write_json(results, out.with_suffix(".json"), meta)
    conversations.plot(results, out.with_suffix(".png"), title=f"testbed, {len(dialogues)} two-turn conversations")
    if args.json:
        print(out.with_suffix(".json").read_text())
        return 0
    types = list(results[0].per_type)
    print(f"{'arm':<40} {'head_k':>6} {'kept':>6} {'turn 1':>6} {'turn 2':>6} " + " ".join(f"{t:>8}" for t in types))
    for r in results:
        setting = "" if r.parameter is None else f"{r.parameter:g}"
        cells = " ".join(f"{r.per_type[t]:>8.3f}" for t in types)
        print(f"{r.curve:<40} {setting:>6} {r.kept_fraction:>6.3f} {r.first_turn_accuracy:>6.3f} {r.accuracy:>6.3f} {cells}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def question_prompt(processor, question: str) -> str:
    """The prompt rule of every front-end (`trimllama.loading.prompt_text`) for one image; on the testbed its
    chat template renders the format it was trained on."""
    return prompt_text(processor, question, 1)


def _print_table(results) -> None:
    types = list(results[0].per_type)
    print(f"{'curve':<36} {'setting':>8} {'kept':>6} {'all':>6} " + " ".join(f"{t:>8}" for t in types))
    for r in results:
        setting = "" if r.parameter is None else f"{r.parameter:g}"
        cells = " ".join(f"{r.per_type[t]:>8.3f}" for t in types)
        print(f"{r.curve:<36} {setting:>8} {r.kept_fraction:>6.3f} {r.accuracy:>6.3f} {cells}")

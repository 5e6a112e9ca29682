"""`python -m trimllama.integrations.lmms_tasks --out DIR`: write the local lmms-eval testbed task."""

from __future__ import annotations

import argparse

from . import TASK_NAME, write_testbed_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trimllama.integrations.lmms_tasks",
        description="Write the testbed's held-out questions as a local lmms-eval task (images, JSONL, yaml).",
    )
    parser.add_argument("--out", required=True, help="directory to write the task into (give it to --include_path)")
    parser.add_argument(
        "--questions", type=int, default=1000, help="held-out questions (default 1000, as trimllama eval)"
    )
    parser.add_argument(
        "--seed", type=int, default=2024, help="seed of the held-out set (default 2024, as trimllama eval)"
    )
    parser.add_argument("--task", default=TASK_NAME, help=f"task name (default {TASK_NAME})")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error(f"--questions must be at least 1, got {args.questions}")
    config = write_testbed_task(args.out, args.questions, args.seed, args.task)
    print(f"wrote {config}")
    print(
        f"run: python -m lmms_eval --model trimllama --model_args pretrained=testbed,method=headwise_topk,head_k=0.1 "
        f"--include_path {config.parent} --tasks {args.task} --batch_size 32"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

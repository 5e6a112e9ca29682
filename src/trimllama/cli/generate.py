"""`trimllama generate`: answer one prompt about one or more images with the trimmed model."""

from __future__ import annotations

import argparse
import json

from . import answer as run_model
from .options import add_method_options, add_model_options


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt about image(s) with the trimmed model and print the answer plus kept tokens and KV saved",
        description="Loads a Mllama (Llama-3.2-Vision) model and its processor with from_pretrained (a Hugging Face "
        "id such as meta-llama/Llama-3.2-11B-Vision-Instruct or a local directory; default: the shipped testbed "
        "checkpoint), applies the chat template for Instruct models, trims the cross-attended image features, "
        "generates greedily, and prints the answer, then one line: image tokens before -> after, cross-attention "
        "KV cache before -> after, and the generation time. --method none runs the untrimmed model for comparison.",
        epilog="example: trimllama generate --image photo.jpg --prompt 'What is in this image?' --head-k 0.1",
    )
    run_model.add_prompt_options(parser)
    add_model_options(parser)
    add_method_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    generation = run_model.run(args)
    if args.json:
        print(json.dumps(generation.record()))
    else:
        print(generation.answer)
        print(generation.summary())
    return 0

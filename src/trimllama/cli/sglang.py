"""`trimllama sglang [selection options] -- <sglang.launch_server args>`: SGLang's server with trimming in its engine.

The selection options are checked here, before SGLang starts; then SGLang's launcher replaces this process, with
trimllama's Mllama registered as SGLang's external model (`trimllama.integrations.sglang`) and the settings in
the environment every tensor-parallel rank reads. Everything after `--` goes to SGLang unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..errors import TrimllamaError
from ..integrations.sglang.settings import (
    EXTERNAL_PACKAGE,
    SETTINGS_VARIABLE,
    EngineSettings,
)
from .options import (
    CommandError,
    flag_message,
    params_from_args,
    parse_count_or_fraction,
)

EXTERNAL_VARIABLE = "SGLANG_EXTERNAL_MODEL_PACKAGE"


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sglang",
        help="serve (trimmed) Llama-3.2-Vision with SGLang: paged KV, continuous batching, tensor parallel",
        description="Starts `python -m sglang.launch_server` with trimllama's Mllama in place of SGLang's: each image "
        "reserves and keeps min(--budget, its real tokens) KV slots. Arguments after `--` go to SGLang unchanged, "
        "e.g. `trimllama sglang --budget 1600 -- --model-path meta-llama/Llama-3.2-11B-Vision-Instruct --tp 2`.",
    )
    group = parser.add_argument_group("trimming")
    group.add_argument(
        "--method",
        default="headwise_topk",
        help="selection method with a fixed budget (headwise_topk, random), or 'none' for SGLang's own slots "
        "(default headwise_topk)",
    )
    group.add_argument(
        "--budget",
        type=int,
        default=None,
        help="image tokens kept (and KV slots reserved) per image; required unless --method none",
    )
    group.add_argument(
        "--head-k",
        type=parse_count_or_fraction,
        default=None,
        help="headwise_topk's per-head count or fraction, whose union is then cut or filled to --budget",
    )
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting of the method, e.g. --param reduce=max (repeatable; VALUE is read as JSON)",
    )
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="-- then sglang.launch_server's arguments")
    return parser


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The settings the options describe, checked as the engine will build them."""
    loose = {"head_k": args.head_k, "budget": args.budget, **params_from_args(args.param)}
    settings = EngineSettings(method=args.method, settings={key: value for key, value in loose.items() if value is not None})
    try:
        settings.build()
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None
    return settings


def launch_arguments(args: argparse.Namespace) -> list[str]:
    """What follows `--`, unchanged."""
    launch = list(args.launch_args)
    if launch[:1] == ["--"]:
        launch = launch[1:]
    elif launch:
        raise CommandError(f"unexpected argument {launch[0]!r}: SGLang's arguments go after `--`")
    if not launch:
        raise CommandError("no SGLang arguments: give them after `--`, e.g. `-- --model-path DIR`")
    return launch


def run(args: argparse.Namespace) -> int:
    settings = engine_settings(args)
    launch = launch_arguments(args)
    if importlib.util.find_spec("sglang.launch_server") is None:
        raise CommandError(
            "SGLang is not installed in this environment (pip install sglang==0.5.23 on a GPU machine; "
            "scripts/sglang-cpu-env.sh VENV_DIR builds a CPU environment)"
        )
    given = os.environ.get(EXTERNAL_VARIABLE)
    if given not in (None, "", EXTERNAL_PACKAGE):
        raise CommandError(f"{EXTERNAL_VARIABLE}={given} is set; trimllama sglang registers {EXTERNAL_PACKAGE} there")
    environment = {**os.environ, EXTERNAL_VARIABLE: EXTERNAL_PACKAGE, SETTINGS_VARIABLE: settings.to_json()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sglang.launch_server", *launch], environment)
    return 0  # not reached: execve replaces this process

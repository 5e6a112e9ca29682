"""`trimllama sglang [selection options] -- <sglang.launch_server args>`: SGLang's server with trimming in its engine.

The options are checked and trimllama's SGLang override is imported here, before SGLang starts (SGLang itself would
only log an import error and serve its own Mllama); then SGLang's launcher replaces this process, with trimllama's
Mllama and request processor registered as SGLang's external packages and the settings in the environment every
tensor-parallel rank reads. Everything after `--` goes to SGLang unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

from ..errors import TrimllamaError
from ..integrations.sglang.settings import (
    EXTERNAL_PACKAGE,
    SETTINGS_VARIABLE,
    SGLANG_VERSION,
    EngineSettings,
)
from .options import (
    CommandError,
    add_param_option,
    flag_message,
    loose_settings,
    parse_count_or_fraction,
)

EXTERNAL_VARIABLES = ("SGLANG_EXTERNAL_MODEL_PACKAGE", "SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE")
LAUNCH_MODULE = f"{EXTERNAL_PACKAGE}.launch"


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sglang",
        help="serve (trimmed) Llama-3.2-Vision with SGLang: paged KV, continuous batching, tensor parallel",
        description="Starts SGLang's server (`python -m sglang.launch_server`) with trimllama's Mllama in place of "
        "SGLang's: each image reserves and keeps min(--budget, its real tokens) image tokens, and with the image "
        "pool (the default) an image token takes only its cross-attention layers' share of a KV slot. Arguments "
        "after `--` go to SGLang unchanged, e.g. `trimllama sglang --budget 1600 -- --model-path "
        f"meta-llama/Llama-3.2-11B-Vision-Instruct --tp 2 --disable-cuda-graph`. Written for SGLang {SGLANG_VERSION}.",
    )
    group = parser.add_argument_group("trimming")
    group.add_argument(
        "--method",
        default="headwise_topk",
        help="selection method with a fixed budget (headwise_topk, random), or 'none' for every image token "
        "(default headwise_topk)",
    )
    group.add_argument(
        "--budget",
        type=int,
        default=None,
        help="image tokens kept per image; required unless --method none",
    )
    group.add_argument(
        "--head-k",
        type=parse_count_or_fraction,
        default=None,
        help="headwise_topk's per-head count or fraction, whose union is then cut or filled to --budget",
    )
    add_param_option(
        group,
        example="reduce=max, or --param query_rows=all to score every prompt row (default in the engine: "
        "image_turn, the rows of the image's own user message)",
    )
    group.add_argument(
        "--shared-pool",
        action="store_true",
        help="keep SGLang's own KV layout, where an image token takes a whole slot of every layer (default: the "
        "image pool, where it takes only the cross-attention layers' rows; needs --disable-cuda-graph)",
    )
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="-- then sglang.launch_server's arguments")
    return parser


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The settings the options describe, checked as the engine will build them."""
    settings = EngineSettings(
        method=args.method,
        settings=loose_settings(args),
        layout="shared" if args.shared_pool else "image_pool",
    )
    try:
        settings.build()
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None
    return settings


def launch_arguments(args: argparse.Namespace, settings: EngineSettings) -> list[str]:
    """What follows `--`, unchanged; the image pool runs its cross-attention eagerly (no CUDA graphs)."""
    launch = list(args.launch_args)
    if launch[:1] == ["--"]:
        launch = launch[1:]
    elif launch:
        raise CommandError(f"unexpected argument {launch[0]!r}: SGLang's arguments go after `--`")
    if not launch:
        raise CommandError("no SGLang arguments: give them after `--`, e.g. `-- --model-path DIR`")
    if settings.layout == "image_pool" and "--disable-cuda-graph" not in launch:
        raise CommandError(
            "the image pool runs the cross-attention layers outside CUDA graphs: add --disable-cuda-graph to "
            "SGLang's arguments, or use --shared-pool (SGLang's own KV layout)"
        )
    return launch


def check_engine() -> None:
    """Import SGLang and trimllama's override here, so that a missing SGLang, another release, or an override that
    fails to import is one line before anything starts (SGLang would serve its own Mllama instead)."""
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise CommandError(
            f"SGLang is not installed in this environment (pip install sglang=={SGLANG_VERSION} on a GPU machine; "
            "scripts/sglang-cpu-env.sh VENV_DIR builds a CPU environment)"
        ) from None
    if version != SGLANG_VERSION:
        raise CommandError(f"trimllama sglang is written for SGLang {SGLANG_VERSION}, found {version}")
    for module in (f"{EXTERNAL_PACKAGE}.model", f"{EXTERNAL_PACKAGE}.processor"):
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure here would make SGLang serve its stock Mllama silently
            raise CommandError(f"trimllama's SGLang override does not import ({type(error).__name__}: {error})") from None


def run(args: argparse.Namespace) -> int:
    settings = engine_settings(args)
    launch = launch_arguments(args, settings)
    for variable in EXTERNAL_VARIABLES:
        given = os.environ.get(variable)
        if given not in (None, "", EXTERNAL_PACKAGE):
            raise CommandError(f"{variable}={given} is set; trimllama sglang registers {EXTERNAL_PACKAGE} there")
    check_engine()
    environment = {**os.environ, SETTINGS_VARIABLE: settings.to_json()}
    environment.update({variable: EXTERNAL_PACKAGE for variable in EXTERNAL_VARIABLES})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", LAUNCH_MODULE, *launch], environment)
    return 0  # not reached: execve replaces this process

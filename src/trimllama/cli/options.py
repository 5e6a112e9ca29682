"""Options and loading shared by the subcommands (generate, show, eval, serve, ...).

Everything here turns bad input into a `CommandError` with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..errors import TrimllamaError
from ..methods import METHODS, SelectionMethod, get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_MODEL_TYPES = ("mllama",)


class CommandError(Exception):
    """A bad input the CLI reports as one line on stderr with a non-zero exit."""


def default_model() -> str:
    """The shipped testbed checkpoint directory."""
    from ..testbed import CHECKPOINT_DIR

    return str(CHECKPOINT_DIR)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face model id or local checkpoint directory of a Mllama (Llama-3.2-Vision) model "
        "(default: the shipped testbed checkpoint)",
    )
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights dtype; auto: bfloat16 on cuda, float32 on cpu",
    )
    group.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"], help="attention backend")


def parse_count_or_fraction(text: str) -> int | float:
    """'0.25' -> 0.25 (a fraction), '64' -> 64 (a count)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (e.g. 64) or a fraction (e.g. 0.25), got {text!r}")


def add_method_options(parser: argparse.ArgumentParser, default_method: str = "headwise_topk") -> None:
    group = parser.add_argument_group("trimming")
    group.add_argument(
        "--method",
        default=default_method,
        help=f"selection method (see `trimllama methods`), or 'none' for the untrimmed model (default {default_method})",
    )
    group.add_argument(
        "--head-k",
        type=parse_count_or_fraction,
        default=None,
        help="per-head tokens kept by headwise_topk: a fraction of the non-padding image tokens (0.25) or a count (64); "
        "for random, the fraction kept",
    )
    group.add_argument("--budget", type=int, default=None, help="keep exactly N image tokens per sample")
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting of the method, e.g. --param seed=3 (repeatable; VALUE is read as JSON)",
    )
    group.add_argument(
        "--merge-remainder",
        action="store_true",
        help="add one remainder token per tile standing for the dropped tokens (MergeRemainder)",
    )
    group.add_argument(
        "--trim-scoring-layer", action="store_true", help="also compact the first cross-attention layer's cache"
    )


def method_from_args(args: argparse.Namespace) -> SelectionMethod | None:
    """The selection method the options describe, or None for `--method none`."""
    given = {"--head-k": args.head_k, "--budget": args.budget}
    if args.method.lower() == "none":
        extra = [flag for flag, value in given.items() if value is not None] + (["--param"] if args.param else [])
        if extra or args.merge_remainder:
            flags = ", ".join(extra + (["--merge-remainder"] if args.merge_remainder else []))
            raise CommandError(f"{flags} has no effect with --method none (the untrimmed model)")
        return None
    if args.method not in METHODS:
        raise CommandError(f"unknown method {args.method!r}; registered methods: {', '.join(METHODS)}, or none")
    cls = METHODS[args.method]
    fields = {field.name for field in dataclasses.fields(cls)}
    settings = {}
    for flag, value in given.items():
        if value is None:
            continue
        name = {"--head-k": "head_k" if "head_k" in fields else "ratio", "--budget": "budget"}[flag]
        if name not in fields:
            raise CommandError(f"method {cls.name} takes no {flag}")
        settings[name] = value
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise CommandError(f"--param {item!r}: method {cls.name} has settings {', '.join(sorted(fields)) or 'none'}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    try:
        method = get_method(cls, **settings)
        if args.merge_remainder:
            method = METHODS["merge_remainder"](method=method)
    except TrimllamaError as error:
        raise CommandError(str(error)) from None
    return method


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for, but no CUDA GPU is available on this machine")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(args: argparse.Namespace):
    """(model, processor, device) for the model options; the model is in eval mode on its device."""
    from transformers import AutoConfig, AutoProcessor, MllamaForConditionalGeneration

    source = args.model or default_model()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    local = Path(source)
    if local.exists() and not (local / "config.json").is_file():
        raise CommandError(f"--model {source}: not a model directory (no config.json)")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise CommandError(f"--model {source}: no such directory, and not a Hugging Face model id (owner/name)")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:  # hub or parsing failure: one line, not a traceback
        raise CommandError(f"--model {source}: could not load its config ({_first_line(error)})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CommandError(
            f"--model {source}: model_type {config.model_type!r} is not a supported cross-attention model "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}, i.e. Llama-3.2-Vision)"
        )
    try:
        model = MllamaForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation=args.attn_implementation
        )
        processor = AutoProcessor.from_pretrained(source)
    except Exception as error:
        raise CommandError(f"--model {source}: could not load it ({_first_line(error)})") from None
    return model.to(device).eval(), processor, device


def load_image(path: str):
    """An RGB PIL image from a file, or a CommandError naming what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise CommandError(f"image file not found: {path}")
    if file.is_dir():
        raise CommandError(f"not an image file: {path} is a directory")
    if not file.is_file():
        raise CommandError(f"not an image file: {path} is not a regular file (a device, pipe or socket)")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise CommandError(f"not an image: {path} (unrecognised image format)") from None
    except Image.DecompressionBombError as error:
        raise CommandError(f"refused image {path}: {_first_line(error)}") from None
    except OSError as error:
        raise CommandError(f"cannot read image {path}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

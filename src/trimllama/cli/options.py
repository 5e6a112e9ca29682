"""Options shared by the subcommands (generate, show, eval, serve, ...), turned into core calls.

Loading, methods and prompts live in the core (`trimllama.loading`, `trimllama.build_method`); everything here
turns their errors, and other bad input, into a `CommandError` with a one-line message naming the flag.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from .. import loading
from ..errors import TrimllamaError
from ..loading import DTYPES, first_line
from ..methods import SelectionMethod, method_from_settings

SETTING_FLAGS = {
    "head_k": "--head-k",
    "budget": "--budget",
    "merge_remainder": "--merge-remainder",
    "method": "--method",
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "chat_template": "--chat-template",
}
OPTION_SETTINGS = ("method", "head_k", "budget", "merge_remainder")  # settings that have an option of their own


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: stderr is a terminal and no `--json`."""
    return sys.stderr.isatty() and not getattr(args, "json", False)


def progress_bar(args: argparse.Namespace, total: int, **options):
    """A tqdm bar on stderr when `progress_enabled`, else None (logs, CI, pipes, `--json`)."""
    if not progress_enabled(args):
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **options)


class CommandError(Exception):
    """A bad input the CLI reports as one line on stderr with a non-zero exit."""


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


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `trimllama COMMAND: error: ...`, and exit status 2 (no usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    """A float option's value; nan, inf and values that overflow to inf (1e999) are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_count_or_fraction(text: str) -> int | float:
    """'0.25' -> 0.25 (a fraction), '64' -> 64 (a count); a float that overflows to inf (1e999) is refused."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (e.g. 64) or a fraction (e.g. 0.25), got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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
    group.add_argument(
        "--budget",
        type=int,
        default=None,
        help="keep exactly N image tokens per sample; headwise_topk ranks its per-head union (--head-k) and cuts or "
        "fills it to N, methods whose budget replaces --head-k refuse both",
    )
    add_param_option(group)
    group.add_argument(
        "--merge-remainder",
        action="store_true",
        help="add one remainder token per tile standing for the dropped tokens (MergeRemainder)",
    )
    group.add_argument(
        "--trim-scoring-layer", action="store_true", help="also compact the first cross-attention layer's cache"
    )


def add_param_option(group, example: str = "seed=3") -> None:
    """`--param KEY=VALUE`: any other setting of the method (`loose_settings` reads it)."""
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any other setting of the method, e.g. --param {example} (repeatable; VALUE is read as JSON); "
        "a setting that has its own option is given once, by either",
    )


def params_from_args(items: list[str]) -> dict:
    """The `--param KEY=VALUE` options as settings; VALUE is read as JSON, else kept as a string."""
    settings = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CommandError(f"--param {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def loose_settings(args: argparse.Namespace) -> dict:
    """The method settings the options give: those of `OPTION_SETTINGS` the command has and sets, and every
    `--param`. A setting given by its option and by a `--param` is refused (no precedence between the two)."""
    given = {key: getattr(args, key, None) for key in OPTION_SETTINGS}
    given = {key: value for key, value in given.items() if value is not None and value is not False}  # 0 is given
    params = params_from_args(args.param)
    for key in params:
        if key in given:  # --method always is: it has a default
            raise CommandError(f"--param {key} and {SETTING_FLAGS[key]} set the same setting: give it once")
    given.pop("method", None)  # named apart from the settings
    return {**given, **params}


def method_from_args(args: argparse.Namespace, image_tokens: int | None = None) -> SelectionMethod | None:
    """The selection method the options describe (`trimllama.method_from_settings`), or None for `--method none`."""
    settings = loose_settings(args)
    try:
        method = method_from_settings(args.method, settings, image_tokens)
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None
    if method is None and args.trim_scoring_layer:
        raise CommandError("--trim-scoring-layer has no effect with --method none (the untrimmed model)")
    return method


def flag_message(error: TrimllamaError) -> str:
    """The error's message, with the setting it names first spelled as its flag (`budget 5000 ...` -> `--budget 5000 ...`)."""
    message, setting = str(error), getattr(error, "setting", None)
    flag = SETTING_FLAGS.get(setting)
    if flag and message.startswith(f"{setting} "):
        return flag + message[len(setting) :]
    return message


def resolve_device(name: str):
    """The device `--device` names (`trimllama.loading.resolve_device`); no GPU for cuda is a `CommandError`."""
    try:
        return loading.resolve_device(name)
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None


def load_model(args: argparse.Namespace):
    """(model, processor, device) for the model options (`trimllama.loading.load_model`), with the libraries'
    loading and download bars only when `progress_enabled` (never in a server's redirected log)."""
    _set_library_progress(progress_enabled(args))
    try:
        return loading.load_model(args.model, args.device, args.dtype, args.attn_implementation)
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None


def _set_library_progress(enabled: bool) -> None:
    """Let transformers / huggingface_hub draw their loading and download bars only when `enabled`."""
    import huggingface_hub.utils
    import transformers

    if enabled:
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    else:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


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
        with warnings.catch_warnings():
            # PIL's own bound decides (DecompressionBombError past twice its pixel limit); its warning below that
            # would print two lines of its own before our answer
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise CommandError(f"not an image: {path} (unrecognised image format)") from None
    except Image.DecompressionBombError as error:
        raise CommandError(f"refused image {path}: {first_line(error)}") from None
    except OSError as error:
        raise CommandError(f"cannot read image {path}: {first_line(error)}") from None

"""`trimllama bench`: memory and time of untrimmed, trimmed, ideal and trimmed + remainder, side by side."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from ..bench.config import DEFAULTS, DTYPES
from .options import CommandError, finite_float, flag_message, progress_bar

_DESCRIPTION = """\
Builds a randomly initialised Mllama with the text widths of Llama-3.2-11B-Vision (hidden 4096, 32 heads,
8 KV heads, MLP 14336, cross-attention every fifth layer from layer 3) and feeds it precomputed image
features of 1 image x 4 tiles x 1601 tokens per sample. Per prompt length and batch size it measures,
interleaved over several repetitions: cross-attention and total KV bytes, the peak memory of the prefill
and of a decode step, the time of trimllama's hooks (profiler), prefill latency, decode time per token and
tokens/s of four arms: untrimmed; trimmed (HeadwiseTopK, fixed budget); ideal (the model handed only the
kept features: no scoring, no gathering); trimmed + remainder (MergeRemainder).
Default: 20 layers with shared weights (16 self + 4 cross). --full: the real 40-layer model on a GPU.
Writes bench.json, bench.png and bench.md to --out."""


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark memory and time, untrimmed vs trimmed vs ideal, at 11B widths",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cpu, gpu = DEFAULTS["cpu"], DEFAULTS["cuda"]
    add = parser.add_argument
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    add("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 (float32 with --smoke)")
    add("--full", action="store_true", help="the real 40-layer model, no shared weights (GPU only)")
    add("--layers", type=int, default=None, help="decoder layers, a multiple of 5, >= 20 (default 20; 40 with --full)")
    add(
        "--batch-sizes",
        type=_int_list,
        default=None,
        help=f"comma-separated (default CPU {_join(cpu.batch_sizes)}; GPU {_join(gpu.batch_sizes)})",
    )
    add("--fractions", type=_float_list, default=None, help="kept fractions of the image tokens (default 1,0.5,0.25)")
    add(
        "--repeats",
        type=int,
        default=None,
        help=f"timed repetitions per arm (default CPU {cpu.repeats}, GPU {gpu.repeats})",
    )
    add(
        "--new-tokens",
        type=int,
        default=None,
        help="generated tokens per run, the first from the prefill "
        f"(default CPU {cpu.new_tokens}, GPU {gpu.new_tokens})",
    )
    add(
        "--prompt-len",
        "--prompt-lens",
        dest="prompt_lens",
        type=_int_list,
        default=None,
        help="prompt tokens per sample, comma-separated: every batch size runs at every length "
        f"(default CPU {_join(cpu.prompt_lens)}; GPU {_join(gpu.prompt_lens)})",
    )
    add(
        "--memory-budget",
        default=None,
        help="for the largest-batch estimate, e.g. 60GiB "
        f"(default CPU {cpu.memory_budget // 2**30}GiB, GPU {gpu.memory_budget // 2**30}GiB)",
    )
    add("--seed", type=int, default=0, help="seed of the random weights and inputs")
    add("--smoke", action="store_true", help="tiny widths, seconds: checks that the benchmark runs end to end")
    add("--out", default="bench-results", help="output directory (default ./bench-results)")
    return parser


def _join(values: tuple[int, ...]) -> str:
    return ",".join(str(value) for value in values)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(finite_float(item) for item in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite fractions such as 1.0,0.5,0.25, got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import BenchConfig, benchmark, markdown, parse_bytes, total_runs
    from ..errors import InvalidSettingError, ModelLoadError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out}: exists and is not a directory")
    try:
        config = BenchConfig(
            device=args.device,
            dtype=args.dtype,
            full=args.full,
            layers=args.layers,
            batch_sizes=args.batch_sizes,
            fractions=args.fractions or BenchConfig.fractions,
            repeats=args.repeats,
            new_tokens=args.new_tokens,
            prompt_lens=args.prompt_lens,
            memory_budget=None if args.memory_budget is None else parse_bytes(args.memory_budget),
            smoke=args.smoke,
            seed=args.seed,
        )
    except InvalidSettingError as error:
        raise CommandError(_as_flags(str(error))) from None
    except ModelLoadError as error:  # the device (`trimllama.loading.resolve_device`)
        raise CommandError(flag_message(error)) from None
    bar = progress_bar(args, total_runs(config), unit="run")
    try:
        progress = bar and (lambda label: _advance(bar, label))
        summary = benchmark(config, out, progress=progress, command=shlex.join(["trimllama", *args.argv]))
    except torch.cuda.OutOfMemoryError:
        raise CommandError("the GPU ran out of memory; lower --batch-sizes (or drop --full)") from None
    finally:
        if bar is not None:
            bar.close()
    print(markdown(summary))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.md'} ({summary['seconds']:.0f} s)")
    return 0


def _as_flags(message: str) -> str:
    """Name settings as the options that set them: `batch_sizes=(0,)` -> `--batch-sizes (0,)`, `full=True`
    -> `--full`."""
    return _SETTING.sub(lambda match: f"--{match[1].replace('_', '-')}" + ("" if match[2] else " "), message)


_SETTING = re.compile(
    r"\b(device|dtype|full|smoke|layers|batch_sizes|fractions|repeats|new_tokens|prompt_lens|memory_budget)=(True\b)?"
)
def _advance(bar, label: str) -> None:
    bar.set_description(label)
    bar.update(1)

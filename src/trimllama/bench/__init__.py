"""The efficiency benchmark behind `trimllama bench`: memory and time, untrimmed vs trimmed vs ideal.

    from trimllama.bench import BenchConfig, benchmark
    summary = benchmark(BenchConfig(smoke=True), out_dir="bench-out")   # writes bench.json, bench.png, bench.md

Modules: `model` (the randomly initialised 11B-width model and its inputs), `arms` (what is compared),
`decode` (the timed prefill + greedy decode loop), `memory` (peak memory), `runner` (the interleaved
measurement loop), `report` (ratios, targets, memory budget, JSON, PNG, Markdown).
"""

from __future__ import annotations

from pathlib import Path

from .arms import Arm, arms_for
from .config import BenchConfig, parse_bytes
from .decode import greedy_decode, image_features
from .model import LLAMA_32_11B_VISION, SMOKE_SHAPE, ModelShape, build_model, make_inputs
from .report import markdown, plot, summarise, write_json
from .runner import Progress, run_benchmark, total_runs

OUTPUT_FILES = ("bench.json", "bench.png", "bench.md")


def benchmark(
    config: BenchConfig, out_dir: str | Path | None = None, progress: Progress | None = None, command: str | None = None
) -> dict:
    """Run the benchmark; with `out_dir`, write bench.json, bench.png and bench.md there. Returns the summary.

    `command`, if given, is recorded in the summary (the command line that reproduces it).
    """
    summary = {"command": command, **summarise(run_benchmark(config, progress))}
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(summary, directory / "bench.json")
        plot(summary, directory / "bench.png")
        (directory / "bench.md").write_text(markdown(summary))
    return summary


__all__ = [
    "LLAMA_32_11B_VISION",
    "OUTPUT_FILES",
    "SMOKE_SHAPE",
    "Arm",
    "BenchConfig",
    "ModelShape",
    "arms_for",
    "benchmark",
    "build_model",
    "greedy_decode",
    "image_features",
    "make_inputs",
    "markdown",
    "parse_bytes",
    "summarise",
    "total_runs",
]

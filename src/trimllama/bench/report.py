"""From the raw runs to the comparisons, the targets, the memory-budget estimate, JSON, PNG and Markdown.

Ratios are medians over repetitions, divided. Definitions:
    overhead          trimmed / ideal - 1 (scoring + gathering; at fraction 1.0 the ideal is the untrimmed model)
    gain              1 - trimmed / untrimmed
    predicted saving  removed cross-attention cache bytes / (weight bytes + untrimmed KV cache bytes) that one
                      decode step reads: what a purely memory-bound decode step would save
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

TARGET_PREFILL_OVERHEAD = 0.03
TARGET_DECODE_OVERHEAD = 0.01
TARGET_SAVING_OF_PREDICTED = 0.8
MIB = 2**20


def summarise(raw: dict) -> dict:
    """`raw` (from `run_benchmark`) plus comparisons, targets and the memory-budget estimate."""
    comparisons = compare(raw)
    return {
        **raw,
        "comparisons": comparisons,
        "targets": targets(comparisons),
        "memory_budget": memory_budget(raw),
    }


def _runs_by_name(raw: dict) -> dict[tuple[int, str], dict]:
    return {(run["batch_size"], run["arm"]): run for run in raw["runs"]}


def compare(raw: dict) -> list[dict]:
    """One row per batch size and kept fraction: trimmed against untrimmed, ideal and trimmed + remainder."""
    runs = _runs_by_name(raw)
    tokens_per_image = raw["model"]["shape"]["tokens_per_image"]
    weight_read = raw["model"]["weight_read_bytes_per_decode_step"]
    rows = []
    for run in raw["runs"]:
        if run["kind"] != "trimmed":
            continue
        batch, fraction = run["batch_size"], run["fraction"]
        untrimmed = runs[(batch, "untrimmed")]
        ideal = runs.get((batch, f"ideal@{fraction:g}"), untrimmed)
        remainder = runs.get((batch, f"remainder@{fraction:g}"))
        removed = untrimmed["cross_kv_bytes"] - run["cross_kv_bytes"]
        predicted = removed / (weight_read + untrimmed["total_kv_bytes"])
        measured = 1 - run["decode_seconds_per_token"] / untrimmed["decode_seconds_per_token"]
        row = {
            "batch_size": batch,
            "fraction": fraction,
            "kept_tokens": run["kept_tokens"],
            "trimmed_layers_kv_fraction": run["trimmed_layers_kv_bytes"] / untrimmed["trimmed_layers_kv_bytes"],
            "trimmed_layers_kv_exact": Fraction(run["trimmed_layers_kv_bytes"], untrimmed["trimmed_layers_kv_bytes"])
            == Fraction(run["kept_tokens"], tokens_per_image),
            "cross_kv_ratio": run["cross_kv_bytes"] / untrimmed["cross_kv_bytes"],
            "total_kv_ratio": run["total_kv_bytes"] / untrimmed["total_kv_bytes"],
            "peak_memory_ratio": run["peak_memory_bytes"] / untrimmed["peak_memory_bytes"],
            "ideal": ideal["arm"],
            "prefill_overhead": run["prefill_seconds"] / ideal["prefill_seconds"] - 1,
            "decode_overhead": run["decode_seconds_per_token"] / ideal["decode_seconds_per_token"] - 1,
            "prefill_gain": 1 - run["prefill_seconds"] / untrimmed["prefill_seconds"],
            "decode_gain": measured,
            "ideal_decode_gain": 1 - ideal["decode_seconds_per_token"] / untrimmed["decode_seconds_per_token"],
            "predicted_decode_saving": predicted,
            "decode_saving_of_predicted": measured / predicted if predicted > 0 else None,
        }
        if remainder is not None:
            row["remainder"] = {
                "extra_tokens": remainder["extra_tokens"],
                "cross_kv_over_trimmed": remainder["cross_kv_bytes"] / run["cross_kv_bytes"],
                "prefill_over_trimmed": remainder["prefill_seconds"] / run["prefill_seconds"],
                "decode_over_trimmed": remainder["decode_seconds_per_token"] / run["decode_seconds_per_token"],
            }
        rows.append(row)
    return rows


def targets(comparisons: list[dict]) -> dict:
    """The issue's targets, each with the measured value and whether it is met (a report, not an assertion)."""
    largest = max(row["batch_size"] for row in comparisons)
    savings = {
        f"{row['fraction']:g}": row["decode_saving_of_predicted"]
        for row in comparisons
        if row["batch_size"] == largest and row["decode_saving_of_predicted"] is not None
    }
    prefill = max(row["prefill_overhead"] for row in comparisons)
    decode = max(row["decode_overhead"] for row in comparisons)
    return {
        "trimmed_layers_kv_equals_kept_fraction": {
            "target": "exact",
            "met": all(row["trimmed_layers_kv_exact"] for row in comparisons),
        },
        "prefill_overhead_vs_ideal": {
            "target": TARGET_PREFILL_OVERHEAD,
            "worst": prefill,
            "met": prefill <= TARGET_PREFILL_OVERHEAD,
        },
        "decode_overhead_vs_ideal": {
            "target": TARGET_DECODE_OVERHEAD,
            "worst": decode,
            "met": decode <= TARGET_DECODE_OVERHEAD,
        },
        "decode_saving_of_predicted_at_largest_batch": {
            "target": TARGET_SAVING_OF_PREDICTED,
            "batch_size": largest,
            "by_fraction": savings,
            "met": bool(savings) and min(savings.values()) >= TARGET_SAVING_OF_PREDICTED,
        },
    }


def memory_budget(raw: dict) -> dict:
    """Largest batch within the budget per arm, two ways.

    from_cache: (budget - weights) / KV cache bytes per sample, measured at the largest batch (the issue's rule).
    from_peak: a straight line through the measured peak memory against batch size (prefill activations and
    inputs included), solved for the budget; only with two batch sizes or more.
    """
    budget = raw["config"]["memory_budget"]
    weights = raw["model"]["weight_bytes"]
    batches = sorted({run["batch_size"] for run in raw["runs"]})
    runs = _runs_by_name(raw)
    arms = {}
    for arm in raw["arms"]:
        if arm["kind"] == "ideal":
            continue  # the same cache as the trimmed arm
        largest = runs[(batches[-1], arm["name"])]
        per_sample = largest["total_kv_bytes"] / batches[-1]
        record = {
            "kv_bytes_per_sample": per_sample,
            "max_batch_from_cache": max(0, math.floor((budget - weights) / per_sample)),
        }
        if len(batches) > 1:
            slope, intercept = _line([(b, runs[(b, arm["name"])]["peak_memory_bytes"]) for b in batches])
            record["peak_bytes_per_sample"] = slope
            record["peak_bytes_fixed"] = intercept
            record["max_batch_from_peak"] = max(0, math.floor((budget - intercept) / slope)) if slope > 0 else None
        arms[arm["name"]] = record
    return {"budget_bytes": budget, "weight_bytes": weights, "arms": arms}


def _size(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / MIB:.1f} MiB"


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope, mean_y - slope * mean_x


def write_json(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=1) + "\n")


def plot(summary: dict, path: Path) -> None:
    """Decode tokens/s and KV cache bytes against batch size, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (speed, cache) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    fractions = sorted({arm["fraction"] for arm in summary["arms"]}, reverse=True)
    colours = {
        fraction: pyplot.cm.viridis(i / max(1, len(fractions) - 1) * 0.8) for i, fraction in enumerate(fractions)
    }
    styles = {
        "untrimmed": ("k", "-", "o"),
        "trimmed": (None, "-", "o"),
        "ideal": (None, ":", "s"),
        "remainder": (None, "--", "^"),
    }
    for arm in summary["arms"]:
        runs = sorted((run for run in summary["runs"] if run["arm"] == arm["name"]), key=lambda run: run["batch_size"])
        colour, line, marker = styles[arm["kind"]]
        style = dict(color=colour or colours[arm["fraction"]], linestyle=line, marker=marker, label=arm["name"])
        batches = [run["batch_size"] for run in runs]
        speed.plot(batches, [run["tokens_per_second"] for run in runs], **style)
        cache.plot(batches, [run["total_kv_bytes"] / MIB for run in runs], **style)
    all_batches = sorted({run["batch_size"] for run in summary["runs"]})
    for axis, label in ((speed, "decode tokens / s"), (cache, "KV cache (MiB, self + cross)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_batches, [str(batch) for batch in all_batches])
        axis.minorticks_off()
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    model = summary["model"]
    figure.suptitle(
        f"trimllama bench: {model['shape']['num_layers']} layers, {model['dtype']}, {summary['machine']['device']} "
        f"({summary['machine'].get('gpu') or summary['machine']['processor']})",
        fontsize=10,
    )
    cache.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def markdown(summary: dict) -> str:
    """What ran, and the tables of the README's results section."""
    config, model, machine = summary["config"], summary["model"], summary["machine"]
    lines = [
        f"Command: `{summary.get('command') or 'run_benchmark(...)'}`; {summary['seconds']:.0f} s on "
        f"{machine.get('gpu') or machine['processor']} ({machine['cpu_cores']} cores, torch {machine['torch']}, "
        f"load average before/after {machine['load_average_1min_before_after']}).",
        "",
        f"Model: {model['note']}; {model['dtype']}; weights held {_size(model['weight_bytes'])}, "
        f"read per decode step {_size(model['weight_read_bytes_per_decode_step'])}.",
        "",
        f"Per batch size and arm: {config['repeats']} timed repetitions (medians), interleaved; prompt "
        f"{config['prompt_len']} tokens, {config['new_tokens']} new tokens (decode time: median step). "
        f"Peak memory: {model['peak_memory_method']}.",
        "",
        "| batch | arm | kept tokens | cross KV MiB | total KV MiB | peak MiB | prefill s | decode ms/token "
        "| tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in summary["runs"]:
        kept = run["kept_tokens"] + run["extra_tokens"] if run["kind"] != "untrimmed" else run["kept_tokens"]
        lines.append(
            f"| {run['batch_size']} | {run['arm']} | {kept} | {run['cross_kv_bytes'] / MIB:.1f} | "
            f"{run['total_kv_bytes'] / MIB:.1f} | {run['peak_memory_bytes'] / MIB:.0f} | "
            f"{run['prefill_seconds']:.3f} | "
            f"{run['decode_seconds_per_token'] * 1e3:.1f} | {run['tokens_per_second']:.2f} |"
        )
    lines += [
        "",
        "| batch | kept | later-layer KV = kept? | prefill overhead vs ideal | decode overhead vs ideal | "
        "prefill gain | decode gain | ideal decode gain | predicted decode saving | measured / predicted | "
        "remainder decode / trimmed |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["comparisons"]:
        of_predicted = row["decode_saving_of_predicted"]
        remainder = row.get("remainder")
        lines.append(
            f"| {row['batch_size']} | {row['fraction']:g} | {'exact' if row['trimmed_layers_kv_exact'] else 'NO'} "
            f"({row['trimmed_layers_kv_fraction']:.4f}) | {row['prefill_overhead']:+.1%} | "
            f"{row['decode_overhead']:+.1%} | "
            f"{row['prefill_gain']:+.1%} | {row['decode_gain']:+.1%} | {row['ideal_decode_gain']:+.1%} | "
            f"{row['predicted_decode_saving']:.1%} | {'-' if of_predicted is None else f'{of_predicted:.2f}'} | "
            f"{'-' if remainder is None else format(remainder['decode_over_trimmed'], '.3f')} |"
        )
    checks = [run for run in summary["runs"] if run["tokens_equal"] is not None]
    failed = [f"{run['arm']} (batch {run['batch_size']})" for run in checks if not run["tokens_equal"]["equal"]]
    lines += [
        "",
        f"Generated tokens, trimmed@1 = untrimmed and ideal@f = trimmed@f: {len(checks) - len(failed)} of "
        f"{len(checks)} equal" + (f"; differ: {', '.join(failed)}" if failed else "") + ".",
    ]
    budget = summary["memory_budget"]
    lines += [
        "",
        f"Largest batch within {_size(budget['budget_bytes'])} (weights held: {_size(budget['weight_bytes'])}):",
        "",
        "| arm | KV MiB per sample | max batch (cache rule) | max batch (peak-memory fit) |",
        "|---|---:|---:|---:|",
    ]
    for name, record in budget["arms"].items():
        from_peak = record.get("max_batch_from_peak")
        lines.append(
            f"| {name} | {record['kv_bytes_per_sample'] / MIB:.1f} | {record['max_batch_from_cache']} | "
            f"{'-' if from_peak is None else from_peak} |"
        )
    return "\n".join(lines) + "\n"

"""From the raw runs to the comparisons, the targets, the memory-budget estimate, JSON, PNG and Markdown.

Ratios are medians over repetitions, divided. Definitions:
    overhead          trimmed / ideal - 1 (scoring + gathering; at fraction 1.0 the ideal is the untrimmed model)
    gain              1 - trimmed / untrimmed
    predicted saving  removed cross-attention cache bytes / (weight bytes + untrimmed KV cache bytes) that one
                      decode step reads: what a purely memory-bound decode step would save
    prefill peak over ideal   trimmed prefill peak - ideal prefill peak (bytes): what scoring and gathering hold
    selection share   time of trimllama's hooks in the prefill (scoring, selection, gathering) / the prefill, both
                      under the profiler
    hook share        time of trimllama's hooks in one decode step (profiler) / the ideal arm's decode step (timed)
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

TARGET_PREFILL_OVERHEAD = 0.03
TARGET_DECODE_OVERHEAD = 0.01
TARGET_SAVING_OF_PREDICTED = 0.8
TARGET_PREFILL_PEAK_OVER_IDEAL = 64 * 2**20
TARGET_DECODE_HOOK_SHARE = 0.01
TARGET_MAX_BATCH_RATIO = 1.6  # at the smallest kept fraction, by measured peak, against untrimmed
MIB = 2**20


def summarise(raw: dict) -> dict:
    """`raw` (from `run_benchmark`) plus comparisons, targets and the memory-budget estimate."""
    comparisons = compare(raw)
    budget = memory_budget(raw)
    return {**raw, "comparisons": comparisons, "targets": targets(comparisons, budget), "memory_budget": budget}


def _runs_by_name(raw: dict) -> dict[tuple[int, int, str], dict]:
    return {(run["batch_size"], run["prompt_len"], run["arm"]): run for run in raw["runs"]}


def compare(raw: dict) -> list[dict]:
    """One row per prompt length, batch size and kept fraction: trimmed against untrimmed, ideal and remainder."""
    runs = _runs_by_name(raw)
    tokens_per_image = raw["model"]["shape"]["tokens_per_image"]
    weight_read = raw["model"]["weight_read_bytes_per_decode_step"]
    rows = []
    for run in raw["runs"]:
        if run["kind"] != "trimmed":
            continue
        batch, prompt, fraction = run["batch_size"], run["prompt_len"], run["fraction"]
        untrimmed = runs[(batch, prompt, "untrimmed")]
        ideal = runs.get((batch, prompt, f"ideal@{fraction:g}"), untrimmed)
        remainder = runs.get((batch, prompt, f"remainder@{fraction:g}"))
        removed = untrimmed["cross_kv_bytes"] - run["cross_kv_bytes"]
        predicted = removed / (weight_read + untrimmed["total_kv_bytes"])
        measured = 1 - run["decode_seconds_per_token"] / untrimmed["decode_seconds_per_token"]
        row = {
            "batch_size": batch,
            "prompt_len": prompt,
            "fraction": fraction,
            "kept_tokens": run["kept_tokens"],
            "trimmed_layers_kv_fraction": run["trimmed_layers_kv_bytes"] / untrimmed["trimmed_layers_kv_bytes"],
            "trimmed_layers_kv_exact": Fraction(run["trimmed_layers_kv_bytes"], untrimmed["trimmed_layers_kv_bytes"])
            == Fraction(run["kept_tokens"], tokens_per_image),
            "cross_kv_ratio": run["cross_kv_bytes"] / untrimmed["cross_kv_bytes"],
            "total_kv_ratio": run["total_kv_bytes"] / untrimmed["total_kv_bytes"],
            "peak_memory_ratio": run["peak_memory_bytes"] / untrimmed["peak_memory_bytes"],
            "prefill_peak_ratio": run["prefill_peak_bytes"] / untrimmed["prefill_peak_bytes"],
            "decode_peak_ratio": run["decode_peak_bytes"] / untrimmed["decode_peak_bytes"],
            "prefill_peak_over_ideal_bytes": run["prefill_peak_bytes"] - ideal["prefill_peak_bytes"],
            "selection_share_of_prefill": run["prefill_hook_seconds"] / run["prefill_profiled_seconds"],
            "decode_hook_share_of_ideal_step": run["decode_hook_seconds"] / ideal["decode_seconds_per_token"],
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
                "prefill_peak_over_trimmed_bytes": remainder["prefill_peak_bytes"] - run["prefill_peak_bytes"],
                "cross_kv_over_trimmed": remainder["cross_kv_bytes"] / run["cross_kv_bytes"],
                "prefill_over_trimmed": remainder["prefill_seconds"] / run["prefill_seconds"],
                "decode_over_trimmed": remainder["decode_seconds_per_token"] / run["decode_seconds_per_token"],
            }
        rows.append(row)
    return rows


def targets(comparisons: list[dict], budget: dict) -> dict:
    """The issues' targets, each with the measured value and whether it is met (a report, not an assertion)."""
    largest = max(row["batch_size"] for row in comparisons)
    savings = {
        f"{row['fraction']:g}@{row['prompt_len']}": row["decode_saving_of_predicted"]
        for row in comparisons
        if row["batch_size"] == largest and row["decode_saving_of_predicted"] is not None
    }
    prefill = max(row["prefill_overhead"] for row in comparisons)
    decode = max(row["decode_overhead"] for row in comparisons)
    over_ideal = max(row["prefill_peak_over_ideal_bytes"] for row in comparisons)
    hooks = max(row["decode_hook_share_of_ideal_step"] for row in comparisons)
    smallest = min(row["fraction"] for row in comparisons)
    ratios = {}
    for prompt, arms in budget["by_prompt_len"].items():
        trimmed, untrimmed = arms.get(f"trimmed@{smallest:g}", {}), arms["untrimmed"]
        if trimmed.get("max_batch_from_peak") and untrimmed.get("max_batch_from_peak"):
            ratios[prompt] = trimmed["max_batch_from_peak"] / untrimmed["max_batch_from_peak"]
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
            "by_fraction_and_prompt_len": savings,
            "met": bool(savings) and min(savings.values()) >= TARGET_SAVING_OF_PREDICTED,
        },
        "prefill_peak_over_ideal": {
            "target_bytes": TARGET_PREFILL_PEAK_OVER_IDEAL,
            "worst_bytes": over_ideal,
            "met": over_ideal <= TARGET_PREFILL_PEAK_OVER_IDEAL,
        },
        "decode_hook_share_of_ideal_step": {
            "target": TARGET_DECODE_HOOK_SHARE,
            "worst": hooks,
            "met": hooks <= TARGET_DECODE_HOOK_SHARE,
        },
        "max_batch_by_peak_vs_untrimmed": {
            "target": TARGET_MAX_BATCH_RATIO,
            "fraction": smallest,
            "by_prompt_len": ratios,
            "met": bool(ratios) and min(ratios.values()) >= TARGET_MAX_BATCH_RATIO,
        },
    }


def memory_budget(raw: dict) -> dict:
    """Largest batch within the budget, per prompt length and arm, two ways.

    from_cache: (budget - weights) / KV cache bytes per sample, measured at the largest batch (the cache rule).
    from_peak: a straight line through the measured peaks against batch size (prefill activations and inputs
    included), solved for the budget, for the prefill and the decode step each; the batch must fit both. Only
    with two batch sizes or more.
    """
    budget = raw["config"]["memory_budget"]
    weights = raw["model"]["weight_bytes"]
    batches = sorted({run["batch_size"] for run in raw["runs"]})
    runs = _runs_by_name(raw)
    by_prompt = {}
    for prompt in sorted({run["prompt_len"] for run in raw["runs"]}):
        arms = {}
        for arm in raw["arms"]:
            largest = runs[(batches[-1], prompt, arm["name"])]
            per_sample = largest["total_kv_bytes"] / batches[-1]
            record = {
                "kv_bytes_per_sample": per_sample,
                "max_batch_from_cache": max(0, math.floor((budget - weights) / per_sample)),
            }
            if len(batches) > 1:
                fits = []
                for phase in ("prefill", "decode"):
                    points = [(b, runs[(b, prompt, arm["name"])][f"{phase}_peak_bytes"]) for b in batches]
                    slope, intercept = _line(points)
                    record[f"{phase}_peak_bytes_per_sample"] = slope
                    record[f"{phase}_peak_bytes_fixed"] = intercept
                    fits.append(max(0, math.floor((budget - intercept) / slope)) if slope > 0 else None)
                record["max_batch_from_prefill_peak"], record["max_batch_from_decode_peak"] = fits
                known = [fit for fit in fits if fit is not None]
                record["max_batch_from_peak"] = min(known) if known else None
            arms[arm["name"]] = record
        by_prompt[str(prompt)] = arms
    return {"budget_bytes": budget, "weight_bytes": weights, "by_prompt_len": by_prompt}


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
    """Against batch size, one line per arm at the longest prompt: decode tokens/s, KV cache bytes, prefill peak
    and decode peak; and per prompt length the prefill peak of each arm at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(2, 3, figsize=(15, 8))
    (speed, cache, prompts), (prefill, decode, share) = axes
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
    longest = max(summary["config"]["prompt_lens"])
    largest = max(summary["config"]["batch_sizes"])
    for arm in summary["arms"]:
        runs = sorted(
            (run for run in summary["runs"] if run["arm"] == arm["name"] and run["prompt_len"] == longest),
            key=lambda run: run["batch_size"],
        )
        colour, line, marker = styles[arm["kind"]]
        style = dict(color=colour or colours[arm["fraction"]], linestyle=line, marker=marker, label=arm["name"])
        batches = [run["batch_size"] for run in runs]
        speed.plot(batches, [run["tokens_per_second"] for run in runs], **style)
        cache.plot(batches, [run["total_kv_bytes"] / MIB for run in runs], **style)
        prefill.plot(batches, [run["prefill_peak_bytes"] / MIB for run in runs], **style)
        decode.plot(batches, [run["decode_peak_bytes"] / MIB for run in runs], **style)
        at_largest = sorted(
            (run for run in summary["runs"] if run["arm"] == arm["name"] and run["batch_size"] == largest),
            key=lambda run: run["prompt_len"],
        )
        prompts.plot(
            [run["prompt_len"] for run in at_largest], [run["prefill_peak_bytes"] / MIB for run in at_largest], **style
        )
    for fraction in sorted({row["fraction"] for row in summary["comparisons"]}, reverse=True):
        rows = sorted(
            (row for row in summary["comparisons"] if row["fraction"] == fraction and row["batch_size"] == largest),
            key=lambda row: row["prompt_len"],
        )
        share.plot(
            [row["prompt_len"] for row in rows],
            [100 * row["selection_share_of_prefill"] for row in rows],
            color=colours[fraction],
            marker="o",
            label=f"trimmed@{fraction:g}",
        )
    all_batches = sorted({run["batch_size"] for run in summary["runs"]})
    for axis, label in (
        (speed, f"decode tokens / s (prompt {longest})"),
        (cache, f"KV cache MiB, self + cross (prompt {longest})"),
        (prefill, f"prefill peak MiB (prompt {longest})"),
        (decode, f"decode-step peak MiB (prompt {longest})"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_batches, [str(batch) for batch in all_batches])
        axis.minorticks_off()
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    for axis, label in (
        (prompts, f"prefill peak MiB (batch {largest})"),
        (share, f"scoring + selection, % of prefill (batch {largest})"),
    ):
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    model = summary["model"]
    figure.suptitle(
        f"trimllama bench: {model['shape']['num_layers']} layers, {model['dtype']}, {summary['machine']['device']} "
        f"({summary['machine'].get('gpu') or summary['machine']['processor']})",
        fontsize=10,
    )
    cache.legend(fontsize=7, ncol=2)
    share.legend(fontsize=7)
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
        f"Per prompt length, batch size and arm: {config['repeats']} timed repetitions (medians), interleaved; "
        f"prompts of {', '.join(str(p) for p in config['prompt_lens'])} tokens, {config['new_tokens']} new tokens "
        f"(decode time: median step). Peak memory, of the prefill and of one decode step (the cache of the prefill "
        f"included): {model['peak_memory_method']}.",
        "",
        "| prompt | batch | arm | kept tokens | cross KV MiB | total KV MiB | prefill peak MiB | decode peak MiB "
        "| prefill s | decode ms/token | tokens/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in summary["runs"]:
        kept = run["kept_tokens"] + run["extra_tokens"] if run["kind"] != "untrimmed" else run["kept_tokens"]
        lines.append(
            f"| {run['prompt_len']} | {run['batch_size']} | {run['arm']} | {kept} | "
            f"{run['cross_kv_bytes'] / MIB:.1f} | "
            f"{run['total_kv_bytes'] / MIB:.1f} | {run['prefill_peak_bytes'] / MIB:.0f} | "
            f"{run['decode_peak_bytes'] / MIB:.0f} | {run['prefill_seconds']:.3f} | "
            f"{run['decode_seconds_per_token'] * 1e3:.1f} | {run['tokens_per_second']:.2f} |"
        )
    lines += [
        "",
        "| prompt | batch | kept | later-layer KV = kept? | prefill peak - ideal | scoring + selection / prefill "
        "| decode hooks / ideal step | prefill overhead vs ideal | decode overhead vs ideal | decode gain "
        "| ideal decode gain | measured / predicted saving | remainder decode / trimmed |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["comparisons"]:
        of_predicted = row["decode_saving_of_predicted"]
        remainder = row.get("remainder")
        lines.append(
            f"| {row['prompt_len']} | {row['batch_size']} | {row['fraction']:g} | "
            f"{'exact' if row['trimmed_layers_kv_exact'] else 'NO'} ({row['trimmed_layers_kv_fraction']:.4f}) | "
            f"{row['prefill_peak_over_ideal_bytes'] / MIB:+.1f} MiB | {row['selection_share_of_prefill']:.1%} | "
            f"{row['decode_hook_share_of_ideal_step']:.2%} | {row['prefill_overhead']:+.1%} | "
            f"{row['decode_overhead']:+.1%} | {row['decode_gain']:+.1%} | {row['ideal_decode_gain']:+.1%} | "
            f"{'-' if of_predicted is None else f'{of_predicted:.2f}'} | "
            f"{'-' if remainder is None else format(remainder['decode_over_trimmed'], '.3f')} |"
        )
    checks = [run for run in summary["runs"] if run["tokens_equal"] is not None]
    failed = [
        f"{run['arm']} (batch {run['batch_size']}, prompt {run['prompt_len']})"
        for run in checks
        if not run["tokens_equal"]["equal"]
    ]
    lines += [
        "",
        f"Generated tokens, trimmed@1 = untrimmed and ideal@f = trimmed@f: {len(checks) - len(failed)} of "
        f"{len(checks)} equal" + (f"; differ: {', '.join(failed)}" if failed else "") + ".",
    ]
    budget = summary["memory_budget"]
    lines += [
        "",
        f"Largest batch within {_size(budget['budget_bytes'])} (weights held: {_size(budget['weight_bytes'])}); "
        "by peak: a line through the measured peaks against batch size, the prefill's and the decode step's:",
        "",
        "| prompt | arm | KV MiB per sample | max batch (cache rule) | max batch (prefill peak) "
        "| max batch (decode peak) | max batch (peak) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for prompt, arms in budget["by_prompt_len"].items():
        for name, record in arms.items():
            cells = [record.get(key) for key in ("max_batch_from_prefill_peak", "max_batch_from_decode_peak")]
            cells.append(record.get("max_batch_from_peak"))
            lines.append(
                f"| {prompt} | {name} | {record['kv_bytes_per_sample'] / MIB:.1f} | {record['max_batch_from_cache']} | "
                + " | ".join("-" if cell is None else str(cell) for cell in cells)
                + " |"
            )
    lines += ["", "Targets (reported, not asserted):", ""]
    for name, target in summary["targets"].items():
        details = ", ".join(f"{key} {_plain(value)}" for key, value in target.items() if key != "met")
        lines.append(f"- {name}: {'met' if target['met'] else 'NOT met'} ({details})")
    return "\n".join(lines) + "\n"


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_plain(item)}" for key, item in value.items()) + "}"
    return str(value)

"""The measurement loop: every arm at every prompt length and batch size, interleaved, several repetitions.

Per prompt length and batch size:
    1. one untimed pass over the arms (untrimmed, then per fraction trimmed, ideal, remainder), a prefill
       and one decode step each: it warms the kernels, measures the peak memory of the prefill and of the
       decode step separately, and the time of trimllama's hooks in each (profiler), and keeps the trimmed
       arm's kept indices for the ideal arm;
    2. `repeats` timed passes, each over all arms, the order rotated by one arm per pass, so that drift
       (thermal, other processes) hits every arm alike. Medians over the passes are reported. The first
       pass also reads the cache bytes and checks the generated tokens (trimmed@1.0 = untrimmed,
       ideal = trimmed: the same features reach the same layers).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
import transformers

from .. import __version__
from .arms import Arm, IdealFeatures, activate, arms_for
from .config import BenchConfig
from .decode import Decoder, cache_bytes, greedy_decode
from .memory import PeakMemory, describe_method
from .model import LLAMA_32_11B_VISION, BenchInputs, BenchModel, build_model, make_inputs

Progress = Callable[[str], None]


def total_runs(config: BenchConfig) -> int:
    """Runs `run_benchmark` makes (for a progress bar)."""
    arms = len(arms_for(list(config.fractions)))
    return len(config.prompt_lens) * len(config.batch_sizes) * arms * (1 + config.repeats)


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> dict:
    """Build the model, measure every arm, and return the raw record (see `report.summarise`)."""
    torch.manual_seed(config.seed)
    started, load_before = time.time(), os.getloadavg()
    bench = build_model(config.shape, config.torch_device, config.torch_dtype, config.share_weights, config.seed)
    arms = arms_for(list(config.fractions))
    runs = []
    for prompt_len in config.prompt_lens:
        for batch_size in config.batch_sizes:
            inputs = make_inputs(bench, batch_size, prompt_len, seed=config.seed + batch_size)
            runs += _measure_batch(bench, inputs, arms, config, progress or (lambda label: None))
            del inputs
    return {
        "benchmark": "trimllama bench",
        "trimllama_version": __version__,
        "machine": {
            **machine_description(config.torch_device),
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "config": config.as_dict(),
        "model": {
            **bench.as_dict(),
            "note": _model_note(bench),
            "peak_memory_method": describe_method(config.torch_device),
        },
        "arms": [{"name": arm.name, "kind": arm.kind, "fraction": arm.fraction} for arm in arms],
        "runs": runs,
        "seconds": round(time.time() - started, 1),
    }


def _measure_batch(
    bench: BenchModel, inputs: BenchInputs, arms: list[Arm], config: BenchConfig, progress: Progress
) -> list[dict]:
    records, ideal = _warm_up(bench, inputs, arms, progress)
    generated: dict[str, torch.Tensor] = {}
    for repeat in range(config.repeats):
        shift = repeat % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            progress(f"{_where(inputs)} {arm.name} (repeat {repeat + 1}/{config.repeats})")
            with activate(arm, bench.model, arm.budget(bench.shape.tokens_per_image), ideal.get(arm.fraction)):
                run = greedy_decode(bench.model, inputs, config.new_tokens)
            record = records[arm.name]
            if repeat == 0:
                record.update(_cache_record(run.cache, bench))
                generated[arm.name] = run.tokens
            record["prefill_seconds_runs"].append(run.prefill_seconds)
            record["decode_seconds_per_token_runs"].append(statistics.median(run.step_seconds))
            del run
    for arm in arms:
        record = records[arm.name]
        record["tokens_equal"] = _tokens_equal(arm, generated)
        record["prefill_seconds"] = statistics.median(record["prefill_seconds_runs"])
        record["decode_seconds_per_token"] = statistics.median(record["decode_seconds_per_token_runs"])
        record["tokens_per_second"] = record["batch_size"] / record["decode_seconds_per_token"]
    return list(records.values())


def _where(inputs: BenchInputs) -> str:
    return f"batch {inputs.batch_size} x {inputs.input_ids.shape[1]} tokens"


def _warm_up(
    bench: BenchModel, inputs: BenchInputs, arms: list[Arm], progress: Progress
) -> tuple[dict[str, dict], dict[float, IdealFeatures]]:
    """One untimed prefill + decode step per arm, each under the profiler: kernels warmed for both shapes, the
    peak memory of the prefill and of the step, the time of trimllama's hooks in each, extra tokens, and the
    ideal arms' features."""
    records: dict[str, dict] = {}
    ideal: dict[float, IdealFeatures] = {}
    for arm in arms:
        progress(f"{_where(inputs)} {arm.name} (warm-up, memory)")
        baseline = bench.weight_bytes + inputs.nbytes + (ideal[arm.fraction].nbytes if arm.kind == "ideal" else 0)
        budget = arm.budget(bench.shape.tokens_per_image)
        with activate(arm, bench.model, budget, ideal.get(arm.fraction)) as handle:
            decoder = Decoder(bench.model, inputs)
            with PeakMemory(bench.device, baseline, hook_times=True) as prefill:
                decoder.prefill()
            cache = sum(cache_bytes(decoder.cache).values())  # alive through the step
            with PeakMemory(bench.device, baseline + cache, hook_times=True) as step:
                decoder.step()
            kept = [index.clone() for index in handle.kept] if handle is not None else None
            extra = max(handle.stats.extra_tokens) if handle is not None else 0
            del decoder
        if arm.kind == "trimmed" and arm.fraction < 1.0:
            ideal[arm.fraction] = IdealFeatures.from_kept(kept, inputs, bench.model)
        records[arm.name] = {
            "batch_size": inputs.batch_size,
            "prompt_len": int(inputs.input_ids.shape[1]),
            "arm": arm.name,
            "kind": arm.kind,
            "fraction": arm.fraction,
            "kept_tokens": budget,
            "extra_tokens": extra,
            "prefill_peak_bytes": prefill.peak_bytes,
            "decode_peak_bytes": step.peak_bytes,
            "peak_memory_bytes": max(prefill.peak_bytes, step.peak_bytes),
            "prefill_hook_seconds": prefill.hook_seconds,
            "prefill_profiled_seconds": prefill.seconds,
            "decode_hook_seconds": step.hook_seconds,
            "decode_profiled_seconds": step.seconds,
            "prefill_seconds_runs": [],
            "decode_seconds_per_token_runs": [],
        }
    return records, ideal


def _cache_record(cache, bench: BenchModel) -> dict:
    """Cache bytes after the last decode step: cross-attention, its trimmed layers, and everything."""
    per_layer = cache_bytes(cache)
    cross = bench.cross_attention_layers
    return {
        "cross_kv_bytes": sum(per_layer[index] for index in cross),
        "trimmed_layers_kv_bytes": sum(per_layer[index] for index in cross[1:]),
        "total_kv_bytes": sum(per_layer.values()),
    }


def _tokens_equal(arm: Arm, generated: dict[str, torch.Tensor]) -> dict | None:
    """Whether an arm generated what the arm it must agree with generated (None where none must)."""
    reference = {"trimmed": "untrimmed" if arm.fraction == 1.0 else None, "ideal": f"trimmed@{arm.fraction:g}"}.get(
        arm.kind
    )
    if reference is None:
        return None
    return {"reference": reference, "equal": bool(torch.equal(generated[arm.name], generated[reference]))}


def _model_note(bench: BenchModel) -> str:
    shape = bench.shape
    sharing = (
        "all self-attention layer instances share one set of weights and all cross-attention layer instances "
        "another (each layer keeps its own KV cache and does its full compute; a decode step still reads "
        "the weights once per layer)"
        if bench.shared_weights
        else "no shared weights"
    )
    widths = "Llama-3.2-11B-Vision" if shape == LLAMA_32_11B_VISION.with_layers(shape.num_layers) else "tiny (smoke)"
    return (
        f"random weights; {widths} text widths (hidden {shape.hidden_size}, "
        f"{shape.num_attention_heads} heads, {shape.num_key_value_heads} KV heads, head dim {shape.head_dim}, "
        f"MLP {shape.intermediate_size}, vocab {shape.vocab_size}); "
        f"{shape.num_layers} decoder layers with cross-attention at {shape.cross_attention_layers}; {sharing}; "
        f"precomputed cross_attention_states of 1 image x {shape.max_num_tiles} tiles x {shape.tokens_per_tile} tokens "
        f"= {shape.tokens_per_image} per sample (the vision tower does not run); SDPA attention"
    )


def machine_description(device: torch.device) -> dict:
    description = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

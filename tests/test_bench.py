"""The efficiency benchmark at tiny widths: it runs end to end, writes valid output, measures bytes exactly.

No timing assertions: times are recorded, never compared.
"""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from trimllama.bench import (
    OUTPUT_FILES,
    SMOKE_SHAPE,
    BenchConfig,
    benchmark,
    greedy_decode,
    image_features,
    parse_bytes,
)
from trimllama.bench.model import BenchInputs
from trimllama.cli import main
from trimllama.errors import InvalidSettingError
from trimllama.testing import SampleSpec, synthetic_batch, tiny_mllama

RUN_FIELDS = {
    "batch_size",
    "prompt_len",
    "arm",
    "kind",
    "fraction",
    "kept_tokens",
    "extra_tokens",
    "cross_kv_bytes",
    "trimmed_layers_kv_bytes",
    "total_kv_bytes",
    "peak_memory_bytes",
    "prefill_peak_bytes",
    "decode_peak_bytes",
    "prefill_hook_seconds",
    "prefill_profiled_seconds",
    "decode_hook_seconds",
    "decode_profiled_seconds",
    "prefill_seconds",
    "decode_seconds_per_token",
    "tokens_per_second",
    "prefill_seconds_runs",
    "decode_seconds_per_token_runs",
    "tokens_equal",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny widths: a second thread only waits at every op, badly so on a busy machine
    try:
        return benchmark(BenchConfig(smoke=True), out_dir=out), out
    finally:
        torch.set_num_threads(threads)


def test_smoke_run_writes_json_plot_and_tables(smoke):
    summary, out = smoke
    assert sorted(path.name for path in out.iterdir()) == sorted(OUTPUT_FILES)
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| batch | arm |" in (out / "bench.md").read_text()


def test_every_arm_is_measured_at_every_batch_size(smoke):
    summary, _ = smoke
    config = summary["config"]
    names = [arm["name"] for arm in summary["arms"]]
    assert names == [
        "untrimmed",
        "trimmed@1",
        "trimmed@0.5",
        "ideal@0.5",
        "remainder@0.5",
        "trimmed@0.25",
        "ideal@0.25",
        "remainder@0.25",
    ]
    assert len(config["prompt_lens"]) == 2
    assert {(run["batch_size"], run["prompt_len"], run["arm"]) for run in summary["runs"]} == {
        (batch, prompt, name) for batch in config["batch_sizes"] for prompt in config["prompt_lens"] for name in names
    }
    for run in summary["runs"]:
        assert set(run) == RUN_FIELDS
        assert len(run["prefill_seconds_runs"]) == len(run["decode_seconds_per_token_runs"]) == config["repeats"]
        assert all(
            math.isfinite(value) and value > 0
            for value in run["prefill_seconds_runs"] + run["decode_seconds_per_token_runs"]
        )
        assert run["peak_memory_bytes"] == max(run["prefill_peak_bytes"], run["decode_peak_bytes"])
        # the decode step's peak counts the prefill's cache, which is alive through it
        assert run["decode_peak_bytes"] > summary["model"]["weight_bytes"] + run["cross_kv_bytes"]
        assert run["prefill_peak_bytes"] > summary["model"]["weight_bytes"]
        hooked = run["kind"] in ("trimmed", "remainder", "ideal")
        assert (run["decode_hook_seconds"] > 0) == hooked and (run["prefill_hook_seconds"] > 0) == hooked
        assert run["prefill_hook_seconds"] < run["prefill_profiled_seconds"]
        assert run["decode_hook_seconds"] < run["decode_profiled_seconds"]
        assert run["tokens_per_second"] == pytest.approx(run["batch_size"] / run["decode_seconds_per_token"])


def test_trimmed_layers_hold_exactly_the_kept_fraction_of_the_cache(smoke):
    summary, _ = smoke
    tokens = SMOKE_SHAPE.tokens_per_image
    untrimmed = {(run["batch_size"], run["prompt_len"]): run for run in summary["runs"] if run["kind"] == "untrimmed"}
    for run in summary["runs"]:
        reference = untrimmed[(run["batch_size"], run["prompt_len"])]
        kept = Fraction(run["kept_tokens"] + run["extra_tokens"], tokens)
        if run["kind"] != "untrimmed":
            assert Fraction(run["trimmed_layers_kv_bytes"], reference["trimmed_layers_kv_bytes"]) == kept
        if run["kind"] == "remainder":
            assert run["extra_tokens"] == SMOKE_SHAPE.max_num_tiles  # one remainder per tile
    assert all(row["trimmed_layers_kv_exact"] for row in summary["comparisons"])
    assert summary["targets"]["trimmed_layers_kv_equals_kept_fraction"]["met"]


def test_ideal_arm_generates_what_the_trimmed_arm_generates(smoke):
    summary, _ = smoke
    checked = [run for run in summary["runs"] if run["tokens_equal"] is not None]
    assert {run["kind"] for run in checked} == {"trimmed", "ideal"}
    assert all(run["tokens_equal"]["equal"] for run in checked), [run["arm"] for run in checked]


def test_comparisons_targets_and_memory_budget_are_reported(smoke):
    summary, _ = smoke
    config = summary["config"]
    batches, fractions, prompts = config["batch_sizes"], config["fractions"], config["prompt_lens"]
    assert {(row["batch_size"], row["prompt_len"], row["fraction"]) for row in summary["comparisons"]} == {
        (batch, prompt, fraction) for batch in batches for prompt in prompts for fraction in fractions
    }
    for row in summary["comparisons"]:
        assert ("remainder" in row) == (row["fraction"] < 1.0)
        assert (row["decode_saving_of_predicted"] is None) == (row["fraction"] == 1.0)
        assert 0 < row["selection_share_of_prefill"] < 1 and row["decode_hook_share_of_ideal_step"] > 0
    assert set(summary["targets"]) == {
        "trimmed_layers_kv_equals_kept_fraction",
        "prefill_overhead_vs_ideal",
        "decode_overhead_vs_ideal",
        "decode_saving_of_predicted_at_largest_batch",
        "prefill_peak_over_ideal",
        "decode_hook_share_of_ideal_step",
        "max_batch_by_peak_vs_untrimmed",
    }
    budget = summary["memory_budget"]
    assert set(budget["by_prompt_len"]) == {str(prompt) for prompt in prompts}
    for arms in budget["by_prompt_len"].values():
        assert set(arms) == {arm["name"] for arm in summary["arms"]}
        capacity = {name: record["max_batch_from_cache"] for name, record in arms.items()}
        assert capacity["trimmed@0.25"] > capacity["untrimmed"]
        for record in arms.values():
            fits = [record["max_batch_from_prefill_peak"], record["max_batch_from_decode_peak"]]
            assert record["max_batch_from_peak"] == min(fit for fit in fits if fit is not None)
    tables = (smoke[1] / "bench.md").read_text()
    assert "prefill peak MiB" in tables and "max batch (peak)" in tables


def test_model_is_described_exactly(smoke):
    summary, _ = smoke
    model = summary["model"]
    assert model["shared_weights"] is True
    assert model["shape"]["cross_attention_layers"] == [3, 8, 13, 18]
    assert "share" in model["note"]


@torch.no_grad()
def test_decode_loop_matches_generate_with_pixel_values():
    model = tiny_mllama(seed=3, attn_implementation="sdpa")
    batch = synthetic_batch(model, [SampleSpec(tiles=(3,)), SampleSpec(tiles=(4,))], seed=2)
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1] :]
    states = image_features(model, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    inputs = BenchInputs(batch["input_ids"], batch["attention_mask"], states, batch["cross_attention_mask"])
    run = greedy_decode(model, inputs, new_tokens=5)
    assert torch.equal(run.tokens, expected)
    assert len(run.step_seconds) == 4


def test_cli_smoke_run_writes_valid_json(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("trimllama")),
            "bench",
            "--smoke",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny widths: one thread, no contention with pytest's own
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "bench.json").read_text())
    assert summary["config"]["batch_sizes"] == [1] and summary["config"]["smoke"] is True
    assert "| batch | arm |" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "12"], "--layers 12: needs a multiple of 5"),
        (["--fractions", "0.5,1.5"], "--fractions (0.5, 1.5): kept fractions must lie in (0, 1]"),
        (["--batch-sizes", "0"], "--batch-sizes (0,): needs positive integers"),
        (["--new-tokens", "1"], "--new-tokens 1: needs at least 2"),
        (["--memory-budget", "lots"], "--memory-budget 'lots': expected a size"),
        (["--batch-sizes", "2,2"], "--batch-sizes (2, 2): a value repeats"),
        (["--prompt-len", "32,2"], "--prompt-lens (32, 2): each needs at least 3 tokens"),
        (["--full", "--smoke"], "--full and --smoke exclude each other"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--smoke", *argv, "--out", str(tmp_path)] if "--smoke" not in argv else ["bench", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("trimllama bench: error: ") and message in error and "\n" not in error


def test_memory_budget_sizes_parse():
    assert parse_bytes("60GiB") == 60 * 2**30
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(InvalidSettingError, match="expected a size"):
        parse_bytes("12 parsecs")

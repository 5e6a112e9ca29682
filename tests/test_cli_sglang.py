"""`trimllama sglang`: options checked before SGLang starts, then SGLang's launcher with the settings; the engine's
pure rules (slots, pool rows, scoring spans). No SGLang needed: tests/sglang runs the engine itself."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimllama.cli import main
from trimllama.cli import sglang as command
from trimllama.integrations.sglang.layout import PoolLayout, key_length, scoring_spans
from trimllama.integrations.sglang.settings import (
    EXTERNAL_PACKAGE,
    SETTINGS_VARIABLE,
    SGLANG_VERSION,
    EngineSettings,
    image_tokens,
)
from trimllama.methods import HeadwiseTopK, RandomSelect

LAUNCH = ["--", "--model-path", "/models/llama-vision", "--tp", "2", "--port", "30000", "--disable-cuda-graph"]


@pytest.fixture
def launched(monkeypatch):
    """Calls of os.execve, which `trimllama sglang` ends with; SGLang and the override counted as importable."""
    calls = []
    monkeypatch.setattr(command, "check_engine", lambda: None)
    monkeypatch.setattr(command.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    for variable in command.EXTERNAL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return calls


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sglang", *LAUNCH], "--budget is required with method headwise_topk"),
        (["sglang", "--budget", "0", *LAUNCH], "budget=0 is out of range"),
        (["sglang", "--method", "merge_remainder", "--budget", "64", *LAUNCH], "MergeRemainder (merge_remainder) is not supported on SGLang"),
        (["sglang", "--method", "feature_norm", *LAUNCH], "--method feature_norm has no budget"),
        (["sglang", "--budget", "64", "--param", "query_rows=last_turn", *LAUNCH], "query_rows=last_turn is not supported on SGLang"),
        (["sglang", "--method", "bogus", "--budget", "64", *LAUNCH], "unknown method 'bogus'"),
        (["sglang", "--method", "none", "--budget", "64", *LAUNCH], "--budget has no effect with method=none"),
        (["sglang", "--budget", "64", "--param", "reduce=mean", *LAUNCH], "reduce must be 'sum' or 'max'"),
        (["sglang", "--budget", "64", "--param", "nope", *LAUNCH], "--param 'nope': expected KEY=VALUE"),
        (["sglang", "--budget", "64", "--param", "budget=32", *LAUNCH], "--param budget and --budget set the same setting"),
        (["sglang", "--budget", "64", "--param", "name=x", *LAUNCH], "name is not a method setting"),
        (["sglang", "--budget", "64", "--param", "image_tokens=9", *LAUNCH], "image_tokens is not a method setting"),
        (["sglang", "--budget", "64"], "no SGLang arguments"),
        (["sglang", "--budget", "64", "serve"], "unexpected argument 'serve'"),
        (["sglang", "--budget", "64", "--", "--model-path", "m"], "add --disable-cuda-graph"),
    ],
)
def test_bad_options_fail_before_sglang(capsys, launched, argv, message):
    assert message in error_of(capsys, argv)
    assert launched == []


def test_launches_sglang_with_the_settings(launched):
    assert main(["sglang", "--budget", "1600", "--head-k", "0.1", "--param", "reduce=max", *LAUNCH]) == 0
    ((_, argv, env),) = launched
    assert argv[1:] == ["-m", "trimllama.integrations.sglang.launch", *LAUNCH[1:]]  # everything after `--`, unchanged
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == env["SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE"] == EXTERNAL_PACKAGE
    assert EXTERNAL_PACKAGE == "trimllama.integrations.sglang"
    assert json.loads(env[SETTINGS_VARIABLE]) == {
        "method": "headwise_topk",
        "settings": {"budget": 1600, "head_k": 0.1, "reduce": "max"},
        "layout": "image_pool",
    }
    # the engine scores the image's own user message unless told otherwise
    assert EngineSettings.from_environment(env).build() == HeadwiseTopK(head_k=0.1, budget=1600, reduce="max", query_rows="image_turn")


def test_per_prompt_rows_and_the_shared_pool(launched):
    assert main(["sglang", "--budget", "64", "--param", "query_rows=all", "--shared-pool", "--", "--model-path", "m"]) == 0
    settings = EngineSettings.from_environment(launched[-1][2])
    assert settings.layout == "shared"  # SGLang's own layout needs no --disable-cuda-graph
    assert settings.build() == HeadwiseTopK(budget=64, query_rows="all")


def test_method_none_and_random(launched):
    assert main(["sglang", "--method", "none", *LAUNCH]) == 0
    assert EngineSettings.from_environment(launched[-1][2]).build() is None
    assert main(["sglang", "--method", "random", "--budget", "64", "--param", "seed=3", *LAUNCH]) == 0
    assert EngineSettings.from_environment(launched[-1][2]).build() == RandomSelect(budget=64, seed=3)


def test_other_external_packages_are_refused(capsys, launched, monkeypatch):
    for variable in command.EXTERNAL_VARIABLES:
        monkeypatch.setenv(variable, "my_models")
        assert f"{variable}=my_models is set" in error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])
        monkeypatch.delenv(variable)


def test_engine_problems_are_one_line(capsys, monkeypatch):
    """No SGLang, another SGLang release, an override that fails to import: one line, exit 2, nothing started."""
    started = []
    monkeypatch.setattr(command.os, "execve", lambda *args: started.append(args))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(command.importlib.metadata, "version", missing)
    assert "SGLang is not installed" in error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])
    monkeypatch.setattr(command.importlib.metadata, "version", lambda name: "0.5.24")
    assert f"written for SGLang {SGLANG_VERSION}, found 0.5.24" in error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])

    real_import = command.importlib.import_module

    def broken(name):
        if name.startswith(EXTERNAL_PACKAGE):
            raise ImportError("cannot import name 'MultimodalInputs'")
        return real_import(name)

    monkeypatch.setattr(command.importlib.metadata, "version", lambda name: SGLANG_VERSION)
    monkeypatch.setattr(command.importlib, "import_module", broken)
    message = error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])
    assert "override does not import (ImportError: cannot import name 'MultimodalInputs')" in message
    assert started == []


def sglang_installed() -> bool:
    try:
        return importlib.metadata.distribution("sglang") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(sglang_installed(), reason="SGLang is installed here")
def test_missing_sglang_from_a_clean_directory(tmp_path):
    """The real command where SGLang is absent, run away from this checkout (no tests/sglang folder on the path)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "trimllama"), "sglang", "--budget", "64", *LAUNCH],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"trimllama sglang: error: SGLang is not installed in this environment (pip install sglang=={SGLANG_VERSION} "
        "on a GPU machine; scripts/sglang-cpu-env.sh VENV_DIR builds a CPU environment)"
    )


def test_image_tokens_per_image():
    method = HeadwiseTopK(budget=1600)
    assert [image_tokens(method, tiles * 1601, 4 * 1601) for tiles in (1, 2, 4)] == [1600, 1600, 1600]
    assert image_tokens(HeadwiseTopK(budget=6404), 2 * 1601, 4 * 1601) == 3202  # padding tiles are never kept
    assert image_tokens(None, 2 * 1601, 4 * 1601) == 6404  # method none keeps SGLang's tiles, padding included


@pytest.mark.parametrize(("layers", "cross"), [(40, (3, 8, 13, 18, 23, 28, 33, 38)), (100, tuple(range(3, 100, 5))), (5, (1, 3))])
def test_image_pool_packs_every_token_into_its_own_row(layers, cross):
    """Each (token, cross-attention layer) gets its own (slot, layer row) inside the block's slots, and the block is
    as small as its rows allow: ceil(tokens x cross layers / layers) slots."""
    layout = PoolLayout(layers=layers, cross_layers=cross)
    for tokens in (1, 64, 1600, 1601):
        slots = layout.slots(tokens)
        assert slots == -(-tokens * len(cross) // layers)
        cells = set()
        for index in range(len(cross)):
            slot, layer = layout.rows(tokens, index)
            assert slot.max() < slots and layer.max() < layers
            cells |= set(zip(slot.tolist(), layer.tolist()))
        assert len(cells) == tokens * len(cross)
    shared = PoolLayout(layers=layers, cross_layers=cross, packed=False)
    assert shared.slots(1600) == 1600
    assert shared.rows(3, 1)[1].tolist() == [cross[1]] * 3  # SGLang's own: a token's row in its layer
    assert layout.bytes_per_image_token(4096) * layers == shared.bytes_per_image_token(4096) * len(cross)


IMAGE, OPENER = 3, torch.tensor([20, 21])  # <|image|>, and an assistant opener of two ids


def test_scoring_spans_follow_the_image_message():
    one_turn = torch.tensor([IMAGE, 0, 10, 11, 12, 20, 21])  # image, BOS, question, generation prompt
    assert scoring_spans(one_turn, IMAGE, OPENER, "image_turn") == [(0, 5)]
    assert scoring_spans(one_turn, IMAGE, OPENER, "all") == [(0, 7)]
    later_turns = torch.cat([one_turn, torch.tensor([30, 31, 1, 0, 13, 14, 20, 21])])
    assert scoring_spans(later_turns, IMAGE, OPENER, "image_turn") == [(0, 5)]  # later turns change nothing
    assert key_length(scoring_spans(later_turns, IMAGE, OPENER, "image_turn")) == 5
    two_images = torch.tensor([IMAGE, 0, 10, 20, 21, 30, 1, IMAGE, 0, 11, 20, 21])
    assert scoring_spans(two_images, IMAGE, OPENER, "image_turn") == [(0, 3), (7, 10)]
    raw = torch.tensor([0, IMAGE, 10, 11])  # no template markers: the image's rows to the end
    assert scoring_spans(raw, IMAGE, OPENER, "image_turn") == [(1, 4)]

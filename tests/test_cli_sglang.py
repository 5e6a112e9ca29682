"""`trimllama sglang`: options checked before SGLang starts, then SGLang's launcher with the settings (no SGLang needed)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from trimllama.cli import main
from trimllama.cli import sglang as command
from trimllama.integrations.sglang.settings import (
    EXTERNAL_PACKAGE,
    SETTINGS_VARIABLE,
    EngineSettings,
    reserved_tokens,
)
from trimllama.methods import HeadwiseTopK, RandomSelect

LAUNCH = ["--", "--model-path", "/models/llama-vision", "--tp", "2", "--port", "30000"]


@pytest.fixture
def launched(monkeypatch):
    """Calls of os.execve, which `trimllama sglang` ends with; SGLang counted as installed."""
    calls = []
    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: object() if name == "sglang.launch_server" else None)
    monkeypatch.setattr(command.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.delenv("SGLANG_EXTERNAL_MODEL_PACKAGE", raising=False)
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
        (
            ["sglang", "--budget", "64", "--param", "query_rows=last_turn", *LAUNCH],
            "query_rows=last_turn is not supported on SGLang yet",
        ),
        (["sglang", "--method", "bogus", "--budget", "64", *LAUNCH], "unknown method 'bogus'"),
        (["sglang", "--method", "none", "--budget", "64", *LAUNCH], "--budget has no effect with method=none"),
        (["sglang", "--budget", "64", "--param", "reduce=mean", *LAUNCH], "reduce must be 'sum' or 'max'"),
        (["sglang", "--budget", "64", "--param", "nope", *LAUNCH], "--param 'nope': expected KEY=VALUE"),
        (["sglang", "--budget", "64"], "no SGLang arguments"),
        (["sglang", "--budget", "64", "serve"], "unexpected argument 'serve'"),
    ],
)
def test_bad_options_fail_before_sglang(capsys, launched, argv, message):
    assert message in error_of(capsys, argv)
    assert launched == []


def test_launches_sglang_with_the_settings(launched):
    assert main(["sglang", "--budget", "1600", "--head-k", "0.1", "--param", "reduce=max", *LAUNCH]) == 0
    ((_, argv, env),) = launched
    assert argv[1:] == ["-m", "sglang.launch_server", *LAUNCH[1:]]  # everything after `--`, unchanged
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == EXTERNAL_PACKAGE == "trimllama.integrations.sglang"
    settings = EngineSettings.from_environment(env)
    assert json.loads(env[SETTINGS_VARIABLE]) == {"method": "headwise_topk", "settings": {"budget": 1600, "head_k": 0.1, "reduce": "max"}}
    assert settings.build() == HeadwiseTopK(head_k=0.1, budget=1600, reduce="max")


def test_method_none_and_random(launched):
    assert main(["sglang", "--method", "none", *LAUNCH]) == 0
    assert EngineSettings.from_environment(launched[-1][2]).build() is None
    assert main(["sglang", "--method", "random", "--budget", "64", "--param", "seed=3", *LAUNCH]) == 0
    assert EngineSettings.from_environment(launched[-1][2]).build() == RandomSelect(budget=64, seed=3)


def test_other_external_package_is_refused(capsys, launched, monkeypatch):
    monkeypatch.setenv("SGLANG_EXTERNAL_MODEL_PACKAGE", "my_models")
    assert "SGLANG_EXTERNAL_MODEL_PACKAGE=my_models is set" in error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])


def sglang_installed() -> bool:
    try:
        return importlib.metadata.distribution("sglang") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(sglang_installed(), reason="SGLang is installed here")
def test_missing_sglang_is_named(capsys):
    assert "SGLang is not installed" in error_of(capsys, ["sglang", "--budget", "64", *LAUNCH])


def test_reserved_slots_per_image():
    method = HeadwiseTopK(budget=1600)
    assert [reserved_tokens(method, tiles * 1601) for tiles in (1, 2, 4)] == [1600, 1600, 1600]
    assert reserved_tokens(HeadwiseTopK(budget=6404), 2 * 1601) == 3202  # padding tiles are never kept

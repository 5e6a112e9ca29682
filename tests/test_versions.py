"""The supported-versions contract: tested transformers releases only (or an explicit opt-in), and a lock
that satisfies every bound the package declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import trimllama
from trimllama.adapters.mllama import ALLOW_UNTESTED_ENV, TESTED_TRANSFORMERS
from trimllama.testing import tiny_mllama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_mllama(seed=0)


def current_transformers():
    """transformers as it is now in sys.modules (5.24 replaces its lazy module object after the first imports)."""
    import transformers

    return transformers


def test_the_installed_transformers_is_a_tested_one():
    transformers = current_transformers()
    assert transformers.__version__ in TESTED_TRANSFORMERS


def test_an_untested_transformers_is_refused_with_the_tested_versions_named(model, monkeypatch):
    monkeypatch.setattr(current_transformers(), "__version__", "5.22.0")
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(trimllama.UnsupportedModelError) as refused:
        trimllama.trim(model, "headwise_topk")
    message = str(refused.value)
    assert "transformers 5.22.0" in message and "tested: 5.19.0, 5.23.0, 5.24.0" in message
    assert f"{ALLOW_UNTESTED_ENV}=1" in message
    assert not hasattr(model, "_trimllama_handle")  # nothing was installed


def test_an_untested_transformers_is_accepted_with_the_opt_in(model, monkeypatch):
    monkeypatch.setattr(current_transformers(), "__version__", "5.22.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="not tested on"):
        handle = trimllama.trim(model, "headwise_topk")
    handle.remove()


def test_pyproject_accepts_exactly_the_tested_transformers_range():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specifier = next(Requirement(dep) for dep in dependencies if dep.startswith("transformers")).specifier
    assert all(version in specifier for version in TESTED_TRANSFORMERS)
    assert "5.18.0" not in specifier and "5.25.0" not in specifier


def test_the_lock_satisfies_every_declared_dependency():
    lock = {}
    for line in (ROOT / "requirements" / "lock-cpu.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            lock[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [dep for extra in project["optional-dependencies"].values() for dep in extra]
    for dependency in map(Requirement, declared):
        name = re.sub(r"[-_.]+", "-", dependency.name).lower()
        assert name in lock, f"{dependency} is not in the lock"
        assert dependency.specifier.contains(lock[name], prereleases=True), f"lock has {name}=={lock[name]}, not {dependency}"
    assert lock["torch"].endswith("+cpu"), "the lock must pin torch's CPU build"

"""Model-family adapters: how trimming is wired into one architecture.

Adding a family: one new file with an `Adapter` subclass, plus one line in `ADAPTERS`.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, SampleStats, TrimHandle, TrimStats
from .mllama import MllamaAdapter

ADAPTERS: list[type[Adapter]] = [
    MllamaAdapter,
]


def adapter_for(model: nn.Module) -> type[Adapter]:
    """The adapter class that supports `model`, or a clear error."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise UnsupportedModelError(
        f"trimllama cannot trim a {type(model).__name__}: supported cross-attention models are {supported}"
    )


def supported_model_types() -> list[str]:
    """The `config.model_type`s some adapter wires (what a checkpoint must be to load for trimming)."""
    return [model_type for adapter in ADAPTERS for model_type in adapter.model_types]


__all__ = ["ADAPTERS", "Adapter", "SampleStats", "TrimHandle", "TrimStats", "adapter_for", "supported_model_types"]

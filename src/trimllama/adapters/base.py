"""What every model-family adapter provides to `TrimHandle`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TrimStats:
    """What the last prefill kept and what the cross-attention cache holds.

    Per-sample lists follow the batch order. Byte counts cover the cross-attention layers only.

    Attributes:
        image_tokens_before: tokens per sample on the untrimmed axis (images x tiles x patches, padding tiles included).
        image_tokens_valid: non-padding tokens per sample, the base of `kept_fraction`.
        image_tokens_after: kept tokens per sample, given to the trimmed layers.
        extra_tokens: tokens a method appended per sample (e.g. remainders), 0 for plain methods.
        cross_kv_bytes_before: what the untrimmed model's cross-attention cache holds for this batch.
        cross_kv_bytes_after: what the trimmed cache holds (read off the cache when there is one).
        sample_cross_kv_bytes_after: per sample, bytes its own tokens need (without batch padding).
        trimmed_layers: decoder-layer indices whose cross-attention inputs were trimmed.
    """

    image_tokens_before: list[int] = field(default_factory=list)
    image_tokens_valid: list[int] = field(default_factory=list)
    image_tokens_after: list[int] = field(default_factory=list)
    extra_tokens: list[int] = field(default_factory=list)
    cross_kv_bytes_before: int = 0
    cross_kv_bytes_after: int = 0
    sample_cross_kv_bytes_before: list[int] = field(default_factory=list)
    sample_cross_kv_bytes_after: list[int] = field(default_factory=list)
    trimmed_layers: list[int] = field(default_factory=list)

    @property
    def kept_fraction(self) -> list[float]:
        """Kept / non-padding tokens per sample (1.0 for samples without image tokens)."""
        return [after / valid if valid else 1.0 for after, valid in zip(self.image_tokens_after, self.image_tokens_valid)]

    @property
    def cross_kv_bytes_saved(self) -> int:
        return self.cross_kv_bytes_before - self.cross_kv_bytes_after

    def as_dict(self) -> dict:
        """JSON-ready record."""
        record = {name: getattr(self, name) for name in self.__dataclass_fields__}
        record["kept_fraction"] = self.kept_fraction
        record["cross_kv_bytes_saved"] = self.cross_kv_bytes_saved
        return record


class Adapter:
    """Installs a selection method on one model instance through forward hooks.

    Subclasses implement `supports`, `_install` (register hooks, appending the handles to
    `self._hooks`) and keep `kept` / `stats` current after every prefill.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kept: list[torch.Tensor] = []
        self.stats = TrimStats()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def remove(self) -> None:
        """Unregister every hook; the model runs as before."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

"""Baseline: per head, the smallest token set holding a share `mass` of its attention; union over heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidSettingError
from ..selection import mass_threshold
from .base import AttentionScored, ImageTokens


@dataclass
class AttentionMass(AttentionScored):
    """Each head keeps its most attended tokens until they hold `mass` of its attention; union over heads.

    The kept count adapts to how peaked each head is, rather than a fixed per-head k.
    """

    name = "attention_mass"
    description = "baseline: per head the smallest set holding `mass` of its attention, union over heads"

    mass: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) or not 0 < self.mass <= 1:
            raise InvalidSettingError(f"mass={self.mass!r} is out of range: it must lie in (0, 1]")

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return mass_threshold(tokens.head_attention("sum", self.query_rows), float(self.mass), tokens.valid)

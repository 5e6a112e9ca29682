"""Baseline: a uniform spatial stride over the non-padding image tokens, blind to the question."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import counts_from_setting, evenly_spaced
from .base import ImageTokens, RatioMethod


@dataclass
class UniformStride(RatioMethod):
    """Keep `ratio` of each sample's non-padding tokens, evenly spaced along the token axis."""

    name = "uniform_stride"
    description = "baseline: evenly spaced tokens (a spatial stride), independent of the question"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return evenly_spaced(counts_from_setting(self.ratio, tokens.num_valid), tokens.valid)

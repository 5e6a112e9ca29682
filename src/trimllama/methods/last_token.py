"""Baseline (FastV-like): the attention of the last text token only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import counts_from_setting, top_count
from .base import ImageTokens, RatioMethod


@dataclass
class LastTokenAttention(RatioMethod):
    """Keep the `ratio` tokens most attended by the last prompt token (head-averaged), as FastV ranks."""

    name = "last_token"
    description = "baseline (FastV-like): top-k by the last text token's head-averaged attention"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.last_row().mean(dim=1)  # (batch, image_tokens)
        return top_count(scores, counts_from_setting(self.ratio, tokens.num_valid), tokens.valid)

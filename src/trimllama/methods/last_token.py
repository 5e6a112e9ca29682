"""Baseline (FastV-like): the attention of the last text token only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import counts_from_setting, top_count
from .base import ImageTokens, SelectionMethod, check_count_or_fraction


@dataclass
class LastTokenAttention(SelectionMethod):
    """Keep the `ratio` tokens most attended by the last prompt token (head-averaged), as FastV ranks."""

    name = "last_token"
    description = "baseline (FastV-like): top-k by the last text token's head-averaged attention"

    ratio: int | float = 0.25

    def __post_init__(self) -> None:
        check_count_or_fraction("ratio", self.ratio)

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.last_row().mean(dim=1)  # (batch, image_tokens)
        return top_count(scores, counts_from_setting(self.ratio, tokens.num_valid), tokens.valid)

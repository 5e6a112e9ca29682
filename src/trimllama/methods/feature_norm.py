"""Baseline: keep the image tokens whose projected features have the largest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import counts_from_setting, top_count
from .base import ImageTokens, RatioMethod


@dataclass
class FeatureNorm(RatioMethod):
    """Keep the `ratio` tokens with the largest feature norm (question-blind)."""

    name = "feature_norm"
    description = "baseline: top-k by the L2 norm of the projected image features"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.features.float().norm(dim=-1)  # (batch, image_tokens)
        return top_count(scores, counts_from_setting(self.ratio, tokens.num_valid), tokens.valid)

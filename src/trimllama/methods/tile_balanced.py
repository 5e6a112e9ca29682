"""Baseline: every tile keeps the same share of its tokens, ranked by the scoring layer's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import per_tile_top
from .base import AttentionScored, ImageTokens, RatioMethod


@dataclass
class TileBalanced(RatioMethod, AttentionScored):
    """Each tile keeps `ratio` of its non-padding tokens by head-summed attention (no tile starves)."""

    name = "tile_balanced"
    description = "baseline: per-tile equal budget, tokens ranked by head-summed attention"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.head_attention("sum", self.query_rows).sum(dim=1)  # (batch, image_tokens)
        return per_tile_top(scores, self.ratio, tokens.valid, tokens.layout[2])

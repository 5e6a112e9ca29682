"""Baseline: every tile keeps the same share of its tokens, ranked by the scoring layer's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import per_tile_top
from .base import ImageTokens, RatioMethod, check_query_rows


@dataclass
class TileBalanced(RatioMethod):
    """Each tile keeps `ratio` of its non-padding tokens by head-summed attention (no tile starves)."""

    name = "tile_balanced"
    description = "baseline: per-tile equal budget, tokens ranked by head-summed attention"

    query_rows: str = "all"  # "all" rows that see an image score, or only the "last_turn"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_query_rows(self.query_rows)

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.head_attention("sum", self.query_rows).sum(dim=1)  # (batch, image_tokens)
        return per_tile_top(scores, self.ratio, tokens.valid, tokens.layout[2])

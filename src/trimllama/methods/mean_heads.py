"""Ablation of the union: one top-k over the attention averaged across heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import counts_from_setting, top_count
from .base import AttentionScored, ImageTokens, RatioMethod


@dataclass
class MeanHeadsTopK(RatioMethod, AttentionScored):
    """Keep the `ratio` most attended tokens of the head-averaged attention (heads do not vote separately)."""

    name = "mean_heads_topk"
    description = "ablation: top-k of the head-averaged attention instead of the union of per-head top-k"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.head_attention("sum", self.query_rows).mean(dim=1)  # (batch, image_tokens)
        return top_count(scores, counts_from_setting(self.ratio, tokens.num_valid), tokens.valid)

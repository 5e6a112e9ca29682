"""Baseline (FasterVLM-like): per tile, the attention of the tile's class token over its patches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import per_tile_top
from .base import ImageTokens, RatioMethod


@dataclass
class ClassTokenAttention(RatioMethod):
    """Each tile keeps `ratio` of its tokens ranked by its class token's attention, question-blind.

    The score is softmax(cls . patch / sqrt(d)) over the tile, on the projected features the language
    model receives (a proxy: Mllama exposes no vision-encoder attention weights under SDPA). The class
    token itself scores highest and is kept first.
    """

    name = "class_token"
    description = "baseline (FasterVLM-like): per tile, top-k by the class token's attention over its patches"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        tiles = tokens.tiled(tokens.features.float())  # (batch, tiles, patches, hidden)
        logits = torch.einsum("bth,btph->btp", tiles[:, :, 0], tiles) / tiles.shape[-1] ** 0.5
        scores = logits.softmax(dim=-1).flatten(1)  # (batch, image_tokens)
        return per_tile_top(scores, self.ratio, tokens.valid, tokens.layout[2])

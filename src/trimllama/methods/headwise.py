"""The paper's method: per-head top-k over the first cross-attention layer, union over heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidSettingError
from ..selection import counts_from_setting, fill_to_budget, headwise_union
from .base import AttentionScored, ImageTokens, budget_counts, check_budget, check_count_or_fraction

ORDERS = ("most", "least")  # which end of each head's attention ranking is kept


@dataclass
class HeadwiseTopK(AttentionScored):
    """Each query head keeps its `head_k` most attended image tokens; the union over heads is kept.

    Args:
        head_k: per-head count (int) or fraction of the sample's non-padding image tokens (float,
            the paper's K-ratio). The union size adapts per sample.
        budget: if set, exactly this many tokens per sample: the union ranked by head-summed score,
            filled up from the other tokens by the same score when the union is smaller.
        reduce: how a head's attention is aggregated over text rows, "sum" or "max".
        query_rows: which text rows score (keyword only, `AttentionScored`).
        order: "most" keeps each head's most attended tokens (the method); "least" its least attended ones, the
            paper's feature-order control, which should fall to random or below.
    """

    name = "headwise_topk"
    description = "Trimmed Llama: per-head top-k of the first cross-attention layer's attention, union over heads"

    head_k: int | float = 0.25
    budget: int | None = None
    reduce: str = "sum"
    order: str = "most"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count_or_fraction("head_k", self.head_k)
        check_budget(self.budget)
        if self.reduce not in ("sum", "max"):
            raise InvalidSettingError(f"reduce must be 'sum' or 'max', got {self.reduce!r}")
        if self.order not in ORDERS:
            raise InvalidSettingError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}", setting="order")

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        scores = tokens.head_attention(self.reduce, self.query_rows)  # (batch, heads, image_tokens)
        if self.order == "least":
            scores = -scores  # top-k of the negated attention: each head's least attended tokens
        union = headwise_union(scores, counts_from_setting(self.head_k, tokens.num_valid), tokens.valid)
        if self.budget is None:
            return union
        return fill_to_budget(union, scores.sum(dim=1), budget_counts(self.budget, tokens), tokens.valid)

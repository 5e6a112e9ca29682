"""Random baseline: a seeded uniform subset of the non-padding image tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidSettingError
from ..selection import counts_from_setting, random_keep
from .base import ImageTokens, SelectionMethod, budget_counts, check_budget, check_count_or_fraction, check_seed


@dataclass
class RandomSelect(SelectionMethod):
    """Keep a seeded random subset of each sample's non-padding image tokens.

    The count comes from, in order of precedence: `like` (the per-sample counts another method
    keeps on the same input, for count-matched comparisons), `budget` (tokens per sample), or
    `ratio` (fraction, or int count, of the sample's non-padding tokens).
    """

    name = "random"
    description = "baseline: seeded random subset, by ratio, budget, or matched to another method's counts"

    ratio: int | float = 0.25
    budget: int | None = None
    seed: int = 0
    like: SelectionMethod | None = None

    def __post_init__(self) -> None:
        check_count_or_fraction("ratio", self.ratio)
        check_budget(self.budget)
        check_seed("seed", self.seed)
        if self.like is not None and not isinstance(self.like, SelectionMethod):
            raise InvalidSettingError(f"like must be a selection method, got {self.like!r}")

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        if self.like is not None:
            counts = (self.like.select(tokens) & tokens.valid).sum(dim=-1)
        elif self.budget is not None:
            counts = budget_counts(self.budget, tokens)
        else:
            counts = counts_from_setting(self.ratio, tokens.num_valid)
        generator = torch.Generator().manual_seed(self.seed)
        return random_keep(counts, tokens.valid, generator)

"""Beyond the paper: one remainder token per tile stands for the tokens the wrapped method dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidSettingError
from .base import ExtraTokens, ImageTokens, SelectionMethod
from .headwise import HeadwiseTopK


@dataclass
class MergeRemainder(SelectionMethod):
    """Wrap any method: keep what it keeps, and add per tile the mean of the tile's dropped features.

    The remainder token's attention logit gets `+log(n_dropped)` (proportional attention, as in token
    merging), so it takes the dropped set's share of the softmax; it is visible wherever its tile is,
    and masked for padding tiles, tiles with nothing dropped, and rows that see no image. Dropping
    background tokens then no longer renormalises the later layers' attention over what is left,
    which is what counting questions read.

    Args:
        method: the selection method whose kept set is used (default: `HeadwiseTopK()`).
    """

    name = "merge_remainder"
    description = "wrapper: any method plus one remainder token per tile (mean of its dropped features, logit + log n)"

    method: SelectionMethod = field(default_factory=HeadwiseTopK)

    def __post_init__(self) -> None:
        if not isinstance(self.method, SelectionMethod):
            raise InvalidSettingError(f"MergeRemainder wraps a selection method instance, got {self.method!r}")

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return self.method.select(tokens)

    def extra_tokens(self, tokens: ImageTokens, keep: torch.Tensor) -> ExtraTokens:
        features = tokens.tiled(tokens.features)  # (batch, tiles, patches, hidden), tiles = images * tiles
        dropped = tokens.tiled(tokens.valid & ~keep).to(torch.float32)  # (batch, tiles, patches)
        count = dropped.sum(dim=-1)  # (batch, tiles)
        mean = torch.einsum("btp,btph->bth", dropped, features.float()) / count.clamp_min(1)[..., None]
        bias = torch.where(count > 0, count.log(), torch.full_like(count, float("-inf")))
        patches = tokens.layout[2]
        first_token = torch.arange(count.shape[1], device=count.device) * patches  # each tile's class token
        return ExtraTokens(
            features=mean.to(tokens.features.dtype),
            bias=bias,
            source=first_token.expand(count.shape[0], -1),
        )

    def label(self) -> str:
        return f"{self.name}({self.method.label()})"

"""How a selection becomes physical: gather indices and the matching cross-attention mask columns.

Model-agnostic; adapters call it from their hooks. Shapes:
    batch, image_tokens (the untrimmed axis), kept (largest kept count in the batch, >= 1),
    extra (tokens a method appends, e.g. one remainder per tile), text_len (rows of this step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeMismatchError
from .methods.base import ExtraTokens
from .selection import keep_to_index


@dataclass
class TrimPlan:
    """The kept columns of one prefill, reused on every decode step.

    Attributes:
        index: (batch, kept) long, kept token indices (ascending), then padding.
        column_valid: (batch, kept) bool, False on padding columns (masked in every row).
        num_tokens: image_tokens of the untrimmed axis, checked against every later mask.
        extra: tokens appended after the kept ones, or None.
    """

    index: torch.Tensor
    column_valid: torch.Tensor
    num_tokens: int
    extra: ExtraTokens | None = None

    @classmethod
    def from_keep(
        cls, keep: torch.Tensor, mask: torch.Tensor, row_visible: torch.Tensor, extra: ExtraTokens | None = None
    ) -> "TrimPlan":
        """Plan for a (batch, image_tokens) keep-mask, given the prefill's mask and row visibility.

        A text row that sees an image none of whose tokens (or extra columns) is kept must attend to
        nothing, the limit of -inf logits on all its columns. It gets that from a padding column
        (zero features, so zero keys and values): a sample with such a row is given one if it has none.
        """
        plan = cls(*keep_to_index(keep), num_tokens=keep.shape[-1], extra=extra)
        blind = (plan.column_mask(mask, row_visible) == torch.finfo(mask.dtype).min).all(dim=-1)  # (batch, 1, text_len)
        needs_padding = blind.flatten(1).any(dim=1) & plan.column_valid.all(dim=1)
        if needs_padding.any():
            padded = int((keep.sum(dim=-1) + needs_padding).max())
            plan = cls(*keep_to_index(keep, min_columns=padded), num_tokens=keep.shape[-1], extra=extra)
        return plan

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def kept_columns(self) -> int:
        return self.index.shape[1]

    @property
    def extra_columns(self) -> int:
        return 0 if self.extra is None else self.extra.features.shape[1]

    @property
    def columns(self) -> int:
        """Columns the later layers hold: kept (padded) plus extra."""
        return self.kept_columns + self.extra_columns

    def kept_counts(self) -> torch.Tensor:
        """(batch,) long."""
        return self.column_valid.sum(dim=-1)

    def extra_counts(self) -> torch.Tensor:
        """(batch,) long, extra columns that some row can use (finite bias)."""
        if self.extra is None:
            return torch.zeros_like(self.kept_counts())
        return torch.isfinite(self.extra.bias).sum(dim=-1)

    def kept_indices(self) -> list[torch.Tensor]:
        """One sorted 1-D LongTensor per sample, on the CPU."""
        counts = self.kept_counts().tolist()
        index = self.index.cpu()
        return [index[sample, :count].clone() for sample, count in enumerate(counts)]

    def gather_states(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, image_tokens, hidden) -> (batch, columns, hidden); padding columns are zero."""
        batch, num_tokens, hidden = states.shape
        # one index_select over the flattened rows: a contiguous result, unlike gather with an expanded index
        rows = self.index.to(states.device) + torch.arange(batch, device=states.device)[:, None] * num_tokens
        kept = states.reshape(batch * num_tokens, hidden).index_select(0, rows.flatten()).view(batch, -1, hidden)
        kept = kept.masked_fill_(~self.column_valid.to(states.device)[:, :, None], 0)
        if self.extra is None:
            return kept
        return torch.cat([kept, self.extra.features.to(device=states.device, dtype=states.dtype)], dim=1)

    def column_mask(self, mask: torch.Tensor, row_visible: torch.Tensor) -> torch.Tensor:
        """Gather the additive cross-attention mask of one step to the plan's columns.

        Args:
            mask: (batch, 1, text_len, image_tokens) additive mask as Mllama builds it (0 or finfo.min).
            row_visible: (batch, 1, text_len, 1), 1 for rows that see at least one image.

        Returns:
            (batch, 1, text_len, columns): kept columns copy their mask, padding columns are finfo.min
            in every row, extra columns carry their bias where their source column is visible.
        """
        batch, heads, text_len, num_tokens = mask.shape
        if batch != self.batch_size or num_tokens != self.num_tokens:
            raise ShapeMismatchError(
                f"cross-attention mask of shape {tuple(mask.shape)} does not match the trimmed prefill "
                f"(batch {self.batch_size}, {self.num_tokens} image tokens); start a new prefill for new images"
            )
        lowest = torch.finfo(mask.dtype).min
        index = self.index.to(mask.device)[:, None, None, :].expand(batch, heads, text_len, -1)
        padding = ~self.column_valid.to(mask.device)[:, None, None, :]
        columns = mask.gather(-1, index).masked_fill(padding, lowest)
        if self.extra is not None:
            source = self.extra.source.to(mask.device)[:, None, None, :].expand(batch, heads, text_len, -1)
            visible = (mask.gather(-1, source) == 0) & (row_visible > 0)
            bias = self.extra.bias.to(mask.device)[:, None, None, :]
            extra = torch.where(visible & torch.isfinite(bias), bias.to(mask.dtype), lowest).to(mask.dtype)
            columns = torch.cat([columns, extra], dim=-1)
        # rows that see no column attend to the zero padding columns: their attention output is exactly 0
        blind = (columns == lowest).all(dim=-1, keepdim=True)
        padding = torch.nn.functional.pad(padding, (0, self.extra_columns))
        return columns.masked_fill(blind & padding, 0)

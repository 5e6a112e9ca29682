"""The arms compared side by side, and how each one is switched on for a run.

    untrimmed  the plain model
    trimmed    `HeadwiseTopK(budget=kept)`: scoring in the first cross-attention layer, gathering for the later ones
    remainder  `MergeRemainder(HeadwiseTopK(budget=kept))`: trimmed plus one remainder token per tile
    ideal      the plain model handed the trimmed arm's kept features directly: the first cross-attention
               layer sees every token (the method never trims it), the later ones only the kept tokens and
               their mask columns, precomputed before the run. No scoring, no gathering: the physical limit.

Every arm at a kept fraction keeps the same count per sample (the fixed-budget mode), so bytes and time
compare like for like. At kept fraction 1.0 the ideal arm is the untrimmed model itself, and the remainder
arm drops nothing, so neither is run there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import MllamaForConditionalGeneration

from ..adapters import adapter_for
from ..handle import TrimHandle, trim
from ..methods import HeadwiseTopK, MergeRemainder
from .model import BenchInputs

KINDS = ("untrimmed", "trimmed", "remainder", "ideal")


@dataclass(frozen=True)
class Arm:
    """One configuration of the model: `kind` at kept `fraction` (1.0 for untrimmed)."""

    kind: str
    fraction: float = 1.0

    @property
    def name(self) -> str:
        return self.kind if self.kind == "untrimmed" else f"{self.kind}@{self.fraction:g}"

    def budget(self, tokens_per_image: int) -> int:
        """Image tokens kept per sample in the later cross-attention layers."""
        return round(self.fraction * tokens_per_image)


def arms_for(fractions: list[float]) -> list[Arm]:
    """Untrimmed, then per fraction: trimmed, ideal and remainder (the last two below 1.0 only)."""
    arms = [Arm("untrimmed")]
    for fraction in fractions:
        arms.append(Arm("trimmed", fraction))
        if fraction < 1.0:
            arms += [Arm("ideal", fraction), Arm("remainder", fraction)]
    return arms


@dataclass
class IdealFeatures:
    """What the ideal arm hands to the later cross-attention layers.

    Attributes:
        states: (batch, kept, hidden) the kept image features.
        prefill_mask: (batch, 1, text_len, kept) additive cross-attention mask of the kept columns.
        step_mask: (batch, 1, 1, kept) the same for one decode step (the last prompt row's visibility).
    """

    states: torch.Tensor
    prefill_mask: torch.Tensor
    step_mask: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.prefill_mask.nbytes + self.step_mask.nbytes

    @classmethod
    def from_kept(
        cls, kept: list[torch.Tensor], inputs: BenchInputs, model: MllamaForConditionalGeneration
    ) -> "IdealFeatures":
        """Gather `inputs` at the kept indices (one 1-D LongTensor per sample, all of one length)."""
        states = inputs.cross_attention_states
        index = torch.stack(kept).to(states.device)  # (batch, kept)
        kept_states = states.gather(1, index[:, :, None].expand(-1, -1, states.shape[-1]))
        mask, _ = adapter_for(model).cross_attention_mask(model, inputs.cross_attention_mask, states.dtype)
        kept_mask = mask.gather(3, index[:, None, None, :].expand(-1, 1, mask.shape[2], -1))  # the model's own mask
        return cls(kept_states, kept_mask, kept_mask[:, :, -1:].contiguous())


@contextlib.contextmanager
def activate(
    arm: Arm, model: MllamaForConditionalGeneration, budget: int, ideal: IdealFeatures | None = None
) -> Iterator[TrimHandle | None]:
    """Switch `arm` on for the block; yields the trim handle of the trimmed arms, else None."""
    if arm.kind == "untrimmed":
        yield None
    elif arm.kind in ("trimmed", "remainder"):
        method = HeadwiseTopK(budget=budget)
        with trim(model, method if arm.kind == "trimmed" else MergeRemainder(method)) as handle:
            yield handle
    elif arm.kind == "ideal":
        if ideal is None:
            raise ValueError(f"the {arm.name} arm needs the kept features of trimmed@{arm.fraction:g}")
        hooks = adapter_for(model).feed_later_layers(model, ideal.states, ideal.prefill_mask, ideal.step_mask)
        try:
            yield None
        finally:
            for hook in hooks:
                hook.remove()
    else:
        raise ValueError(f"unknown arm kind {arm.kind!r}; known: {', '.join(KINDS)}")


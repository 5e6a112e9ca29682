"""The floor reference: the later cross-attention layers get no image token at all."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageTokens, SelectionMethod


@dataclass
class Floor(SelectionMethod):
    """Keep nothing: only the (never trimmed) first cross-attention layer sees the image.

    Not a method to use, a reference: a question type answered as well at the floor as untrimmed
    cannot tell selection methods apart."""

    name = "floor"
    description = "reference: later cross-attention layers see no image token at all"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return torch.zeros_like(tokens.valid)

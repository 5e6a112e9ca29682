"""Identity: keep every image token, padding tiles included, so the model is reproduced exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageTokens, SelectionMethod


@dataclass
class KeepAll(SelectionMethod):
    """Keep every image token (including padding tiles, which untrimmed Mllama also attends from
    rows before `<|image|>`). Runs the full trimming machinery; a check that it is exact."""

    name = "keep_all"
    description = "identity: keeps every image token (exactness check of the machinery)"

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return torch.ones_like(tokens.valid)

"""Where an image's cross-attention K/V live in SGLang's KV pool, and which text rows score it: pure arithmetic.

SGLang's KV pool is a set of slots; one slot holds a K and a V row in every decoder layer (`layers` rows). Text
tokens are written by the self-attention layers, image tokens only by the cross-attention layers. Two layouts:

- **shared** (SGLang's own): image token `j` of cross-attention layer `c` sits in the image's slot `j`, in layer `c`'s
  row. An image token costs a whole slot although only `len(cross_layers)` of its rows are ever written.
- **image pool** (trimllama's default): an image's tokens are packed into the rows of its slots, so that an image
  token costs exactly its cross-attention rows: row `r = j * C + c_index` of the image's `slots(tokens) * layers` rows,
  i.e. slot `r // layers`, layer row `r % layers` (C = number of cross-attention layers). An image of N tokens
  reserves `ceil(N * C / layers)` slots instead of N. The self-attention layers never read an image's slots, so the
  rows they own there are free for it; SGLang's allocator, admission control, radix cache and eviction all count
  the image in slots as before and need no change.

    11B (40 layers, 8 cross):  shared: 1 image token = 1 slot = 160 KiB;  image pool: 1 image token = 1/5 slot = 32 KiB

Text slots keep every layer's rows in both layouts (the cross-attention rows of a text slot stay unused: 8 of 40 in
the 11B). Nothing here imports SGLang.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...selection import image_turn_rows

LAYOUTS = ("image_pool", "shared")


@dataclass(frozen=True)
class PoolLayout:
    """How image tokens map onto pool slots and layer rows.

    Attributes:
        layers: decoder layers, i.e. layer rows per pool slot.
        cross_layers: decoder-layer indices of the cross-attention layers, in order.
        packed: True for the image pool, False for SGLang's shared layout.
    """

    layers: int
    cross_layers: tuple[int, ...]
    packed: bool = True

    def slots(self, image_tokens: int) -> int:
        """Pool slots a block of `image_tokens` image tokens reserves."""
        if not self.packed:
            return image_tokens
        return math.ceil(image_tokens * len(self.cross_layers) / self.layers)

    def rows(self, image_tokens: int, cross_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where cross-attention layer `cross_layers[cross_index]` keeps each token of a block of `image_tokens`.

        Returns:
            slot: (image_tokens,) long, the slot's position within the block's slots.
            layer: (image_tokens,) long, the decoder layer whose pool row holds the token's K and V.
        """
        tokens = torch.arange(image_tokens)
        if not self.packed:
            return tokens, torch.full_like(tokens, self.cross_layers[cross_index])
        row = tokens * len(self.cross_layers) + cross_index
        return row // self.layers, row % self.layers

    @property
    def slots_per_image_token(self) -> float:
        """The share of a pool slot one image token takes: C / layers in the image pool, 1 in the shared layout."""
        return len(self.cross_layers) / self.layers if self.packed else 1.0

    def bytes_per_image_token(self, bytes_per_row: int) -> float:
        """KV bytes one image token costs in the pool (`bytes_per_row`: K and V of one token in one layer)."""
        return self.slots_per_image_token * self.layers * bytes_per_row


def scoring_spans(
    text_ids: torch.Tensor, image_token_id: int, assistant_opener: torch.Tensor, query_rows: str
) -> list[tuple[int, int]]:
    """Per image of a prompt, the rows `[start, stop)` that score it and see all of its tokens in the scoring layer.

    `query_rows="image_turn"`: from the image's `<|image|>` token to the end of the user message that holds it
    (`selection.image_turn_rows`), so later turns of a conversation never change what an image keeps, and rows
    after it (the generation prompt, later turns, decode steps) see the kept tokens only, as a cached prefix does.
    `query_rows="all"`: every row of the prompt, for every image.

    Args:
        text_ids: (text_len,) long, the prompt's token ids (image tokens included, no pad ids).
        image_token_id: the `<|image|>` token id.
        assistant_opener: (marker_len,) long, the chat template's assistant-turn marker (may be empty).
        query_rows: "image_turn" or "all".

    Returns:
        One (start, stop) per `<|image|>` token, in order.
    """
    images = (text_ids == image_token_id).nonzero().flatten().tolist()
    if query_rows == "all":
        return [(0, len(text_ids))] * len(images)
    in_turn = image_turn_rows(text_ids[None], image_token_id, assistant_opener)[0].tolist()
    spans = []
    for start in images:
        stop = start
        while stop < len(in_turn) and in_turn[stop]:
            stop += 1
        spans.append((start, stop))
    return spans


def key_length(spans: list[tuple[int, int]]) -> int:
    """How many leading prompt ids decide what the images keep: the radix cache's key of their trimmed K/V."""
    return max((stop for _, stop in spans), default=0)

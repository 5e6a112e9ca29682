"""Facts of the Mllama architecture, read off its configs and inputs: the one home of each, shared by the Hugging Face
adapter (`adapters/mllama.py`) and SGLang's Mllama (`integrations/sglang/model.py`).

Nothing here touches a model's modules or imports an engine: which layer scores, which layers are trimmed, how long
the context is, which id the image token has, which inputs are per image, how many tokens a tile has, which tiles are real, and what a method's keep-mask must look like.
"""

from __future__ import annotations

import torch

from ..errors import ShapeMismatchError, UnsupportedModelError

IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")  # the processor's per-image inputs


def cross_attention_layers(text_config) -> list[int]:
    """Decoder-layer indices of the cross-attention layers, in order (3, 8, 13, ..., 38 in the 11B)."""
    return sorted(int(index) for index in text_config.cross_attention_layers)


def scoring_and_trimmed_layers(text_config) -> tuple[int, list[int]]:
    """(the scoring layer, the trimmed layers): the first cross-attention layer scores, every later one is trimmed.

    Raises:
        UnsupportedModelError: fewer than 2 cross-attention layers (nothing would be trimmed).
    """
    layers = cross_attention_layers(text_config)
    if len(layers) < 2:
        raise UnsupportedModelError(
            f"trimming needs at least 2 cross-attention layers (one scores, the others are trimmed); "
            f"this model has {len(layers)}"
        )
    return layers[0], layers[1:]


def context_length(text_config) -> int:
    """Text positions the model takes, prompt and answer together (`max_position_embeddings`)."""
    return int(text_config.max_position_embeddings)


def image_token_id(config) -> int:
    """The id of the `<|image|>` token in the prompt's input_ids (`MllamaConfig.image_token_index`)."""
    return int(config.image_token_index)


def tokens_per_tile(vision_config) -> int:
    """Image tokens per tile: (image_size / patch_size)^2 patches plus the class token (1601 for the 11B)."""
    return (int(vision_config.image_size) // int(vision_config.patch_size)) ** 2 + 1


def real_tiles(aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
    """(..., images) long: the real (non-padding) tiles of each image, from its (..., images, max_tiles) 0/1 mask."""
    return aspect_ratio_mask.long().sum(dim=-1)


def check_keep_mask(method, keep: torch.Tensor, valid: torch.Tensor) -> None:
    """Refuse a keep-mask that is not a bool tensor of `valid`'s shape (what every wiring of `select` relies on).

    keep, valid: (batch, image_tokens) bool.
    """
    if keep.dtype != torch.bool or keep.shape != valid.shape:
        raise ShapeMismatchError(
            f"{type(method).__name__}.select returned {keep.dtype} {tuple(keep.shape)}, "
            f"expected a bool mask of shape {tuple(valid.shape)}"
        )

"""Tiny random Mllama models and synthetic batches, built in code (no download).

Used by the tests, the smoke benchmark and the demo when no trained checkpoint is at hand.
A sample is described by its image tile counts and where its text sits:

    SampleSpec(tiles=(4, 1), left_pad=3, text_before=2, text_between=4, text_after=5)

gives `pad pad pad t t <|image|> t t t t <|image|> t t t t t`: rows before the first
`<|image|>` see no image (as in Mllama), each image is seen from its token to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration

ASPECT_RATIOS = [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [4, 1], [2, 2]]
_RATIO_FOR_TILES = {1: 1, 2: 2, 3: 4, 4: 8}  # aspect_ratio_id (1-based) with that many tiles


def tiny_mllama_config(
    cross_attention_layers: tuple[int, ...] = (1, 3, 5, 7),
    num_hidden_layers: int = 8,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    image_size: int = 16,
    patch_size: int = 4,
    vocab_size: int = 96,
    initializer_range: float = 0.1,
) -> MllamaConfig:
    """A small `MllamaConfig`: (image_size / patch_size)^2 + 1 tokens per tile, up to 4 tiles, GQA."""
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        max_num_tiles=4,
        intermediate_layers_indices=[0],
        vision_output_dim=64,
        supported_aspect_ratios=ASPECT_RATIOS,
        initializer_range=initializer_range,
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        cross_attention_layers=list(cross_attention_layers),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=initializer_range,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size)


def tiny_mllama(seed: int = 0, attn_implementation: str = "eager", **config_overrides) -> MllamaForConditionalGeneration:
    """A random tiny `MllamaForConditionalGeneration` in eval mode, fp32, cross-attention gates open.

    Mllama initialises its tanh gates at 0, which would hide the cross-attention entirely; they are set to 1.
    """
    torch.manual_seed(seed)
    config = tiny_mllama_config(**config_overrides)
    config._attn_implementation = attn_implementation
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for index in config.text_config.cross_attention_layers:
            layer = model.model.language_model.layers[index]
            layer.cross_attn_attn_gate.fill_(1.0)
            layer.cross_attn_mlp_gate.fill_(1.0)
    model.config._attn_implementation = attn_implementation
    model.set_attn_implementation(attn_implementation)
    return model


@dataclass(frozen=True)
class SampleSpec:
    """One synthetic sample: tile count of each image (empty: text only) and its text layout."""

    tiles: tuple[int, ...] = (1,)
    left_pad: int = 0
    text_before: int = 2
    text_between: int = 3
    text_after: int = 4


def synthetic_batch(model: MllamaForConditionalGeneration, specs: list[SampleSpec], seed: int = 0) -> dict:
    """Model inputs for `specs`, left-padded to one length, with random pixels and token ids.

    Returns a dict for `model(**batch)` / `model.generate(**batch)`: input_ids, attention_mask,
    pixel_values (batch, images, 4, 3, H, W), aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    size = config.vision_config.image_size
    max_tiles = config.vision_config.max_num_tiles
    max_images = max(1, max(len(spec.tiles) for spec in specs))

    rows, image_positions = [], []
    for spec in specs:
        text = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
        ids, positions = text(spec.text_before), []
        for index, _ in enumerate(spec.tiles):
            positions.append(len(ids))
            ids += [image_token] + text(spec.text_between if index < len(spec.tiles) - 1 else spec.text_after)
        if not spec.tiles:
            ids += text(spec.text_after)
        rows.append([0] * spec.left_pad + ids)
        image_positions.append([p + spec.left_pad for p in positions])
    length = max(len(row) for row in rows)

    batch = len(specs)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    cross_attention_mask = torch.zeros(batch, length, max_images, max_tiles, dtype=torch.long)
    pixel_values = torch.zeros(batch, max_images, max_tiles, 3, size, size)
    aspect_ratio_ids = torch.zeros(batch, max_images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(batch, max_images, max_tiles, dtype=torch.long)
    for b, (spec, row, positions) in enumerate(zip(specs, rows, image_positions)):
        offset = length - len(row)  # left padding up to the batch length
        input_ids[b, offset:] = torch.tensor(row)
        attention_mask[b, offset + spec.left_pad :] = 1
        for image, tiles in enumerate(spec.tiles):
            start = offset + positions[image]
            stop = offset + positions[image + 1] if image + 1 < len(spec.tiles) else length
            cross_attention_mask[b, start:stop, image, :tiles] = 1
            pixel_values[b, image, :tiles] = torch.randn(tiles, 3, size, size, generator=generator)
            aspect_ratio_ids[b, image] = _RATIO_FOR_TILES[tiles]
            aspect_ratio_mask[b, image, :tiles] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask,
        cross_attention_mask=cross_attention_mask,
    )


def select_sample(batch: dict, index: int) -> dict:
    """One sample of a synthetic batch, with its own left padding removed."""
    start = int(batch["attention_mask"][index].nonzero()[0, 0])
    single = {}
    for key, value in batch.items():
        value = value[index : index + 1]
        single[key] = value[:, start:] if key in ("input_ids", "attention_mask", "cross_attention_mask") else value
    return single


SGLANG_INTERMEDIATE_LAYERS = [1]  # vision features at layer 1 (SGLang: its input; Hugging Face: its output)
SGLANG_PATCH_SIZE = 14  # 112-px tiles of 14-px patches: 65 tokens per tile, 260 per 4-tile image


def save_sglang_checkpoint(out_dir: str | Path) -> Path:
    """Save a tiny random Mllama checkpoint that SGLang serves on CPU: config, weights, tokenizer, processor.

    The testbed's tokenizer (a real `tokenizers` WordLevel tokenizer with Llama's special tokens), processor and
    chat template (112-px tiles of 14-px patches, 65 tokens per tile, up to 4 tiles); 5 decoder layers, cross-attention
    at 1 and 3; a random model with open cross-attention gates
    and wide weights, so that greedy answers depend on the image and on what trimming keeps.
    """
    from .testbed.build import make_config, make_processor, new_model, save_all

    config = make_config(vision_hidden=32, vision_layers=3, text_hidden=64, text_layers=5, cross_attention_layers=(1, 3))
    config.vision_config.patch_size = SGLANG_PATCH_SIZE
    config.vision_config.intermediate_layers_indices = SGLANG_INTERMEDIATE_LAYERS
    config.text_config.max_position_embeddings = 4096  # SGLang's context length counts the image slots
    config.text_config.initializer_range = config.vision_config.initializer_range = 0.3
    out_dir = Path(out_dir)
    save_all(new_model(config, gate_init=1.0, seed=0), make_processor(), out_dir)
    return out_dir


def random_image(tiles_wide: int, tiles_high: int, seed: int, tile: int = 112):
    """A random RGB PIL image that Mllama's processor splits into `tiles_wide x tiles_high` tiles of `tile` px."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (tile * tiles_high, tile * tiles_wide, 3), dtype=np.uint8)
    return Image.fromarray(pixels)

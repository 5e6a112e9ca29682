"""A tiny random Mllama checkpoint for SGLang, built at test time from the testbed's builders.

The testbed's tokenizer (a real `tokenizers` WordLevel tokenizer with Llama's special tokens), processor and chat
template; a smaller random model with open cross-attention gates (HF starts them at 0, which would make every
comparison vacuous) and wide enough weights that the answers depend on the image. The vision encoder takes its intermediate features at layer 1 (SGLang: the input of layer 1,
Hugging Face: the output of layer 1); `hf_model` aligns the Hugging Face side to SGLang's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trimllama.testbed.build import make_config, make_processor, new_model, save_all

SGLANG_INTERMEDIATE_LAYERS = [1]
TILE = 112


def build_checkpoint(out_dir: Path) -> Path:
    """Save the tiny checkpoint (config, weights, tokenizer, processor, chat template) to `out_dir`."""
    config = make_config(vision_hidden=32, vision_layers=3, text_hidden=64, text_layers=5, cross_attention_layers=(1, 3))
    config.vision_config.intermediate_layers_indices = SGLANG_INTERMEDIATE_LAYERS
    config.text_config.max_position_embeddings = 4096  # SGLang's context length counts the image slots
    # wide random weights: greedy answers that change with the image and with what trimming keeps
    config.text_config.initializer_range = config.vision_config.initializer_range = 0.3
    model = new_model(config, gate_init=1.0, seed=0)
    save_all(model, make_processor(), out_dir)
    return out_dir


def hf_model(checkpoint: Path):
    """The checkpoint in Hugging Face, its vision features aligned to SGLang's (the input of layer i)."""
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    model.model.vision_model.intermediate_layers_indices = [index - 1 for index in SGLANG_INTERMEDIATE_LAYERS]
    return model


def image(tiles_wide: int, tiles_high: int, seed: int) -> Image.Image:
    """A random RGB image that the processor splits into `tiles_wide x tiles_high` tiles."""
    pixels = np.random.default_rng(seed).integers(0, 256, (TILE * tiles_high, TILE * tiles_wide, 3), dtype=np.uint8)
    return Image.fromarray(pixels)

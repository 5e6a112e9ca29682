"""A copy of the shipped testbed whose answers run many tokens, for tests that must see decode steps.

The trained testbed answers in one word and then `<|end_of_text|>`, so a test on it never reaches a
second decode step. Here its output layer is replaced by a seeded random one whose rows for the
special tokens (ids below `FIRST_WORD_ID`) and for ids past the tokenizer's vocabulary are zero:
their logit is exactly 0 while the word tokens' logits are spread around 0, so the model keeps
generating words (never EOS) and every word depends on the whole prefix, image included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trimllama.testbed import load_testbed

FIRST_WORD_ID = 9  # ids 0..8 are the special tokens of the testbed tokenizer


def multitoken_testbed(seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, processor): the testbed with a random output layer over the word tokens."""
    model, processor = load_testbed(attn_implementation=attn_implementation)
    words = len(processor.tokenizer)
    weight = model.lm_head.weight
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * 4 / weight.shape[1] ** 0.5
    random[:FIRST_WORD_ID] = 0
    random[words:] = 0
    with torch.no_grad():
        weight.copy_(random)
    return model, processor


def save_multitoken_testbed(directory: Path, seed: int = 0) -> Path:
    """Write the model and processor to `directory` (a checkpoint `trimllama serve --model` loads)."""
    model, processor = multitoken_testbed(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory

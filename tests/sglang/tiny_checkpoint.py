"""The tiny SGLang checkpoint (`trimllama.testing.save_sglang_checkpoint`) on the Hugging Face side, aligned to SGLang.

The checkpoint takes its vision intermediate features at layer 1: SGLang takes the input of layer i, Hugging Face
the output of layer i, so `hf_model` reads the output of layer i - 1 (the same tensor).
"""

from __future__ import annotations

from pathlib import Path

from trimllama.testing import SGLANG_INTERMEDIATE_LAYERS


def hf_model(checkpoint: Path):
    """The checkpoint in Hugging Face (eager attention), its vision features aligned to SGLang's."""
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    model.model.vision_model.intermediate_layers_indices = [index - 1 for index in SGLANG_INTERMEDIATE_LAYERS]
    return model

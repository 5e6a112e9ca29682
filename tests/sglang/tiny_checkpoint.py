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


def hf_answer(hf, text: str, path: str, budget: int | None, query_rows: str = "image_turn", tokens: int = 8):
    """Greedy token ids and kept indices of the Hugging Face path, aligned to SGLang's semantics.

    `hf_model` takes the vision features as SGLang does (the input of layer i); here every text row sees every real
    tile, as SGLang passes no cross-attention mask (and trimllama's slots hold real tiles only). The engine's scoring
    layer keeps only the kept tokens (`trim_scoring_layer=True`).
    """
    from PIL import Image

    from trimllama import HeadwiseTopK, trim

    model, processor = hf
    inputs = processor(images=[Image.open(path)], text=text, return_tensors="pt")
    tiles = int(inputs["aspect_ratio_mask"].sum())
    inputs["cross_attention_mask"][..., :tiles] = 1
    length = inputs["input_ids"].shape[1]
    if budget is None:
        return model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[0, length:].tolist(), None
    method = HeadwiseTopK(budget=budget, query_rows=query_rows)
    with trim(model, method, trim_scoring_layer=True, tokenizer=processor) as handle:
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        return output[0, length:].tolist(), handle.kept[0].tolist()

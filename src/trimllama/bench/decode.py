"""Prefill + greedy decode with a DynamicCache, timed step by step.

`model.generate(cross_attention_states=...)` would hand the states to every step, and Mllama would
project them again and append them to the cross-attention cache. This loop passes them, with the
4-D `cross_attention_mask` (batch, text_len, images, tiles), on the prefill only; decode steps pass
`cross_attention_states=None` and the mask row of the new token, as `generate` does with pixel values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, MllamaForConditionalGeneration

from ..adapters import adapter_for
from .model import BenchInputs


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeRun:
    """One prefill and its greedy continuation.

    Attributes:
        tokens: (batch, new_tokens) generated ids, the prefill's token first.
        prefill_seconds: the prefill forward pass and its argmax.
        step_seconds: one entry per decode step (new_tokens - 1 of them).
        cache: the DynamicCache after the last step.
    """

    tokens: torch.Tensor
    prefill_seconds: float
    step_seconds: list[float]
    cache: DynamicCache


class Decoder:
    """Greedy decoding one forward pass at a time: `prefill()`, then `step()` per new token.

    Attributes:
        tokens: generated ids so far, one (batch, 1) tensor per pass.
        cache: the DynamicCache after the last pass.
    """

    def __init__(self, model: MllamaForConditionalGeneration, inputs: BenchInputs) -> None:
        self.model, self.inputs = model, inputs
        self.facts = adapter_for(model)
        self.attention_mask = inputs.attention_mask
        # (batch, 1, images, tiles): the new token sees what the last prompt token did
        self.step_tile_mask = inputs.cross_attention_mask[:, -1:]
        self.tokens: list[torch.Tensor] = []
        self.cache: DynamicCache | None = None

    @torch.inference_mode()
    def prefill(self) -> float:
        """The prefill forward pass and its argmax; returns its seconds."""
        inputs, device = self.inputs, self.inputs.input_ids.device
        synchronize(device)
        start = time.perf_counter()
        prefill = dict(
            input_ids=inputs.input_ids,
            attention_mask=self.attention_mask,
            cross_attention_states=inputs.cross_attention_states,
            cross_attention_mask=inputs.cross_attention_mask,
        )
        output = self.model(**prefill, use_cache=True, logits_to_keep=1)
        self.cache = getattr(output, self.facts.cache_keyword)
        self.tokens.append(output.logits[:, -1].argmax(dim=-1, keepdim=True))
        synchronize(device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def step(self) -> float:
        """One decode step after the prefill; returns its seconds."""
        token, device = self.tokens[-1], self.inputs.input_ids.device
        start = time.perf_counter()
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(token)], dim=1)
        step = dict(
            input_ids=token,
            attention_mask=self.attention_mask,
            cross_attention_states=None,
            cross_attention_mask=self.step_tile_mask,
        )
        output = self.model(**step, **{self.facts.cache_keyword: self.cache}, use_cache=True)
        self.tokens.append(output.logits[:, -1].argmax(dim=-1, keepdim=True))
        synchronize(device)
        return time.perf_counter() - start


def greedy_decode(model: MllamaForConditionalGeneration, inputs: BenchInputs, new_tokens: int) -> DecodeRun:
    """Prefill `inputs`, then decode `new_tokens - 1` more tokens greedily, one forward pass each."""
    decoder = Decoder(model, inputs)
    prefill_seconds = decoder.prefill()
    step_seconds = [decoder.step() for _ in range(new_tokens - 1)]
    return DecodeRun(torch.cat(decoder.tokens, dim=1), prefill_seconds, step_seconds, decoder.cache)


def cache_bytes(cache: DynamicCache) -> dict[int, int]:
    """Bytes of keys + values per decoder layer (self-attention: text tokens; cross-attention: image tokens)."""
    return {
        index: layer.keys.nbytes + layer.values.nbytes
        for index, layer in enumerate(cache.layers)
        if getattr(layer, "keys", None) is not None
    }


@torch.inference_mode()
def image_features(
    model: MllamaForConditionalGeneration,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor,
    aspect_ratio_mask: torch.Tensor,
) -> torch.Tensor:
    """(batch, images * tiles * patches, hidden): the `cross_attention_states` Mllama computes from pixels."""
    return adapter_for(model).image_features(model, pixel_values, aspect_ratio_ids, aspect_ratio_mask)

"""A randomly initialised Mllama with the text widths of Llama-3.2-11B-Vision, and its inputs.

The vision tower never runs: the benchmark feeds precomputed `cross_attention_states`
(batch, images * tiles * patches, hidden), so the vision config only has to give the real
token layout (560 / 14 -> 40 x 40 patches + 1 class token = 1601 per tile, 4 tiles) at a tiny width.

With `share_weights`, every self-attention layer instance uses one set of parameters and every
cross-attention layer instance another: each layer still has its own KV cache and does its full
compute, and each decode step still reads its weights once per layer (they do not fit in any CPU
cache), but memory holds about two layers' worth of weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.initialization import no_init_weights

from ..errors import InvalidSettingError
from ..testing import tiny_mllama_config

CROSS_ATTENTION_PERIOD = 5  # 11B: cross-attention at 3, 8, 13, ..., 38: one in five layers
CROSS_ATTENTION_OFFSET = 3
INIT_STD = 0.02


@dataclass(frozen=True)
class ModelShape:
    """Text widths and image-token layout of the benchmarked model."""

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    num_layers: int = 40
    vocab_size: int = 128256
    image_size: int = 560
    patch_size: int = 14
    max_num_tiles: ClassVar[int] = 4  # as in the 11B model and in `tiny_mllama_config`

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def cross_attention_layers(self) -> list[int]:
        """The real spacing: layer 3 and every fifth after it (4:1 self- to cross-attention layers)."""
        return list(range(CROSS_ATTENTION_OFFSET, self.num_layers, CROSS_ATTENTION_PERIOD))

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def tokens_per_image(self) -> int:
        return self.max_num_tiles * self.tokens_per_tile

    def with_layers(self, num_layers: int) -> "ModelShape":
        return ModelShape(**{**asdict(self), "num_layers": num_layers})

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "head_dim": self.head_dim,
            "max_num_tiles": self.max_num_tiles,
            "cross_attention_layers": self.cross_attention_layers,
            "tokens_per_tile": self.tokens_per_tile,
            "tokens_per_image": self.tokens_per_image,
        }


LLAMA_32_11B_VISION = ModelShape()
SMOKE_SHAPE = ModelShape(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_layers=20,
    vocab_size=128,
    image_size=16,
    patch_size=4,
)


def check_layer_count(num_layers: int) -> None:
    """Layer counts keep the 4:1 ratio of self- to cross-attention layers and at least 4 cross-attention layers."""
    if num_layers < 4 * CROSS_ATTENTION_PERIOD or num_layers % CROSS_ATTENTION_PERIOD:
        raise InvalidSettingError(
            f"layers={num_layers}: needs a multiple of {CROSS_ATTENTION_PERIOD} that is at least "
            f"{4 * CROSS_ATTENTION_PERIOD} (4 self- per cross-attention layer, at least 4 cross-attention layers)"
        )


@dataclass
class BenchModel:
    """The model and what a decode step reads from it.

    Attributes:
        weight_bytes: bytes of parameter storage this process holds (shared parameters once).
        weight_read_bytes: parameter bytes one decode step reads: every decoder-layer instance's weights
            (a shared set once per layer that uses it), the final norm and the LM head.
    """

    model: MllamaForConditionalGeneration
    shape: ModelShape
    dtype: torch.dtype
    shared_weights: bool
    weight_bytes: int
    weight_read_bytes: int

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def cross_attention_layers(self) -> list[int]:
        return self.shape.cross_attention_layers

    def as_dict(self) -> dict:
        return {
            "shape": self.shape.as_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shared_weights": self.shared_weights,
            "weight_bytes": self.weight_bytes,
            "weight_read_bytes_per_decode_step": self.weight_read_bytes,
        }


def mllama_config(shape: ModelShape) -> MllamaConfig:
    """A `MllamaConfig` with `shape`'s text widths and image-token layout and a tiny vision width."""
    config = tiny_mllama_config(
        cross_attention_layers=tuple(shape.cross_attention_layers),
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        vocab_size=shape.vocab_size,
        initializer_range=INIT_STD,
    )
    config.text_config.intermediate_size = shape.intermediate_size
    return config


def build_model(
    shape: ModelShape, device: torch.device, dtype: torch.dtype, share_weights: bool, seed: int = 0
) -> BenchModel:
    """A random `MllamaForConditionalGeneration` of `shape` in eval mode, SDPA attention.

    Built without initialisation (untouched memory), then, if `share_weights`, every layer instance
    takes the parameters of the first layer of its kind, and the remaining parameters are initialised:
    matrices normal(0, 0.02), norms 1, biases 0, the cross-attention tanh gates 1 (open).
    """
    config = mllama_config(shape)
    with no_init_weights(), torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    layers = model.model.language_model.layers
    if share_weights:
        first_self = next(i for i in range(shape.num_layers) if i not in shape.cross_attention_layers)
        for index, layer in enumerate(layers):
            source = shape.cross_attention_layers[0] if index in shape.cross_attention_layers else first_self
            if index != source:
                _share_parameters(layer, layers[source])
    _initialise(model, seed)
    model.eval()
    weight_bytes = sum(p.nbytes for p in model.parameters())  # parameters() yields a shared tensor once
    read_modules = [*layers, model.model.language_model.norm, model.lm_head]
    weight_read_bytes = sum(p.nbytes for module in read_modules for p in module.parameters())
    return BenchModel(model, shape, dtype, share_weights, weight_bytes, weight_read_bytes)


def _share_parameters(target: nn.Module, source: nn.Module) -> None:
    """Make every parameter of `target` the very tensor of `source` (same module structure)."""
    for (_, module), (_, source_module) in zip(target.named_modules(), source.named_modules()):
        for parameter_name, parameter in source_module.named_parameters(recurse=False):
            setattr(module, parameter_name, parameter)


@torch.no_grad()
def _initialise(model: nn.Module, seed: int) -> None:
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            parameter.normal_(0.0, INIT_STD, generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:  # norm weights, gates, embeddings of the (never run) vision tower
            parameter.fill_(1.0)


@dataclass
class BenchInputs:
    """One synthetic batch: `<bos> <|image|> text...`, one image of all tiles per sample.

    Attributes:
        input_ids: (batch, prompt_len) long.
        attention_mask: (batch, prompt_len) long, all ones (no padding).
        cross_attention_states: (batch, images * tiles * patches, hidden) projected image features.
        cross_attention_mask: (batch, prompt_len, images, tiles) 0/1; row 0 (before `<|image|>`) sees nothing.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cross_attention_states: torch.Tensor
    cross_attention_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in vars(self).values())


def make_inputs(bench: BenchModel, batch_size: int, prompt_len: int, seed: int = 0) -> BenchInputs:
    """Random token ids and image features for `batch_size` samples of `prompt_len` tokens."""
    shape, device = bench.shape, bench.device
    generator = torch.Generator(device=device).manual_seed(seed)
    input_ids = torch.randint(3, shape.vocab_size, (batch_size, prompt_len), generator=generator, device=device)
    input_ids[:, 0] = bench.model.config.text_config.bos_token_id
    input_ids[:, 1] = bench.model.config.image_token_index
    states = torch.randn(
        batch_size, shape.tokens_per_image, shape.hidden_size, generator=generator, device=device, dtype=bench.dtype
    )
    tile_mask = torch.ones(batch_size, prompt_len, 1, shape.max_num_tiles, dtype=torch.long, device=device)
    tile_mask[:, 0] = 0
    return BenchInputs(input_ids, torch.ones_like(input_ids), states, tile_mask)

"""What a benchmark run measures: settings, per-device defaults, and their checks."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InvalidSettingError
from ..loading import DTYPES, resolve_device
from .model import LLAMA_32_11B_VISION, SMOKE_SHAPE, ModelShape, check_layer_count

CPU_LAYERS = 20  # the fewest that keep 4:1 self- to cross-attention layers with 4 cross-attention layers
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class DeviceDefaults:
    batch_sizes: tuple[int, ...]
    repeats: int
    new_tokens: int
    prompt_lens: tuple[int, ...]
    memory_budget: int


DEFAULTS = {
    "cpu": DeviceDefaults(
        batch_sizes=(1, 4, 16), repeats=3, new_tokens=6, prompt_lens=(16,), memory_budget=8 * 2**30
    ),
    "cuda": DeviceDefaults(
        batch_sizes=(1, 8, 32, 64), repeats=5, new_tokens=32, prompt_lens=(32, 256, 1024), memory_budget=60 * 2**30
    ),
    "smoke": DeviceDefaults(
        batch_sizes=(1, 2), repeats=2, new_tokens=3, prompt_lens=(6, 40), memory_budget=16 * 2**20
    ),
}


@dataclass
class BenchConfig:
    """Settings of `run_benchmark`; None takes the default of the device (or of the smoke run).

    Attributes:
        device: "auto" (cuda if available), "cpu" or "cuda".
        dtype: weights and activations, "bfloat16" (default; float32 for the smoke run), "float32", "float16".
        full: the real 40-layer text model, no shared weights (needs a GPU: about 20 GB of bf16 weights).
        layers: decoder layers (multiple of 5, >= 20); default 20 with shared weights, 40 with `full`.
        batch_sizes, fractions, repeats, new_tokens, prompt_lens: what is measured (every batch size at every
            prompt length); fractions of the 6404 image tokens per sample kept by the trimmed layers.
        memory_budget: bytes for the largest-batch estimate.
        smoke: tiny widths (hidden 64, 68 image tokens per sample): checks that everything runs, nothing more.
    """

    device: str = "auto"
    dtype: str | None = None
    full: bool = False
    layers: int | None = None
    batch_sizes: tuple[int, ...] | None = None
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25)
    repeats: int | None = None
    new_tokens: int | None = None
    prompt_lens: tuple[int, ...] | None = None
    memory_budget: int | None = None
    smoke: bool = False
    seed: int = 0
    defaults: DeviceDefaults = field(init=False, repr=False)

    def __post_init__(self) -> None:
        device = resolve_device(self.device)
        self.device = str(device)
        self.defaults = DEFAULTS["smoke" if self.smoke else device.type]
        self.dtype = _default(self.dtype, "float32" if self.smoke else "bfloat16")
        self.layers = _default(self.layers, LLAMA_32_11B_VISION.num_layers if self.full else CPU_LAYERS)
        self.batch_sizes = tuple(_default(self.batch_sizes, self.defaults.batch_sizes))
        self.fractions = tuple(self.fractions)
        self.repeats = _default(self.repeats, self.defaults.repeats)
        self.new_tokens = _default(self.new_tokens, self.defaults.new_tokens)
        self.prompt_lens = tuple(_default(self.prompt_lens, self.defaults.prompt_lens))
        self.memory_budget = _default(self.memory_budget, self.defaults.memory_budget)
        self._check()

    def _check(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidSettingError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.full and self.smoke:
            raise InvalidSettingError(
                "full=True and smoke=True exclude each other: one is the real 40-layer model, the other tiny"
            )
        if self.full and self.torch_device.type != "cuda":
            raise InvalidSettingError(
                "full=True builds the real 40-layer model (about 20 GB of bf16 weights): it needs device=cuda"
            )
        if self.full and self.layers != LLAMA_32_11B_VISION.num_layers:
            raise InvalidSettingError(
                f"layers={self.layers} contradicts full=True, the real {LLAMA_32_11B_VISION.num_layers}-layer model"
            )
        check_layer_count(self.layers)
        if not self.batch_sizes or not all(_positive_int(batch) for batch in self.batch_sizes):
            raise InvalidSettingError(f"batch_sizes={self.batch_sizes}: needs positive integers")
        for name in ("repeats", "new_tokens"):
            if not _positive_int(getattr(self, name)):
                raise InvalidSettingError(f"{name}={getattr(self, name)!r}: needs a positive integer")
        if self.new_tokens < 2:
            raise InvalidSettingError(
                f"new_tokens={self.new_tokens}: needs at least 2 (the prefill's token and one decode step)"
            )
        if not self.prompt_lens or not all(_positive_int(length) and length >= 3 for length in self.prompt_lens):
            raise InvalidSettingError(
                f"prompt_lens={self.prompt_lens}: each needs at least 3 tokens (<bos>, <|image|> and a text token)"
            )
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise InvalidSettingError(f"fractions={self.fractions}: kept fractions must lie in (0, 1]")
        for name, values in (
            ("batch_sizes", self.batch_sizes),
            ("fractions", self.fractions),
            ("prompt_lens", self.prompt_lens),
        ):
            if len(set(values)) != len(values):
                raise InvalidSettingError(f"{name}={values}: a value repeats")
        smallest = min(round(f * self.shape.tokens_per_image) for f in self.fractions)
        if smallest < 1:
            raise InvalidSettingError(
                f"fractions={self.fractions}: the smallest keeps no token of {self.shape.tokens_per_image}"
            )
        if self.memory_budget <= 0:
            raise InvalidSettingError(f"memory_budget={self.memory_budget}: needs a positive number of bytes")

    @property
    def shape(self) -> ModelShape:
        return (SMOKE_SHAPE if self.smoke else LLAMA_32_11B_VISION).with_layers(self.layers)

    @property
    def share_weights(self) -> bool:
        return not self.full

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        record = {name: value for name, value in asdict(self).items() if name != "defaults"}
        return {
            **record,
            "batch_sizes": list(self.batch_sizes),
            "fractions": list(self.fractions),
            "prompt_lens": list(self.prompt_lens),
        }


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _default(value, default):
    return default if value is None else value


def parse_bytes(text: str) -> int:
    """'60GiB' -> 64424509440; also GB, MiB, MB, KiB, KB, B or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise InvalidSettingError(f"memory_budget={text!r}: expected a size such as 60GiB, 4GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])

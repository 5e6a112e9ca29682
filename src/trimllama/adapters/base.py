"""The object `trim` returns (`TrimHandle`), and what every model-family adapter provides: each adapter is the
handle of the trimming it installs (one object holds the hooks and their results)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidSettingError
from ..methods.base import SelectionMethod

MIN_SCORING_BUFFER_BYTES = 2**20


@dataclass(frozen=True)
class SampleStats:
    """One sample's own share of a prefill: its image tokens (those its text sees, padding tiles excluded), how
    many of them the later cross-attention layers keep, the tokens a method adds, and the cache bytes they need.

    `kept_tokens` never exceeds `image_tokens`: KeepAll and the untrimmed model also hold padding tiles, which
    are no sample's own tokens (selection methods never keep one).
    """

    image_tokens: int
    kept_tokens: int
    extra_tokens: int
    cross_kv_bytes_before: int
    cross_kv_bytes_after: int

    @property
    def kept_fraction(self) -> float:
        """Kept / own image tokens (1.0 for a sample without image tokens)."""
        return self.kept_tokens / self.image_tokens if self.image_tokens else 1.0

    @property
    def cross_kv_bytes_saved(self) -> int:
        return self.cross_kv_bytes_before - self.cross_kv_bytes_after


@dataclass
class TrimStats:
    """What the last prefill kept and what the cross-attention cache holds.

    Per-sample lists follow the batch order. Byte counts cover the cross-attention layers only.

    Attributes:
        image_tokens_before: tokens per sample on the untrimmed axis (images x tiles x patches, padding tiles included).
        image_tokens_valid: non-padding tokens per sample, the base of `kept_fraction`.
        image_tokens_after: kept tokens per sample, given to the trimmed layers.
        extra_tokens: tokens a method appended per sample (e.g. remainders), 0 for plain methods.
        cross_kv_bytes_before: what the untrimmed model's cross-attention cache holds for this batch.
        cross_kv_bytes_after: what the trimmed cache holds (read off the cache when there is one).
        sample_cross_kv_bytes_before: per sample, bytes its own tokens (`image_tokens_valid`) need untrimmed,
            in every cross-attention layer (without batch or tile padding).
        sample_cross_kv_bytes_after: per sample, bytes its own kept and extra tokens need (without batch padding).
        trimmed_layers: decoder-layer indices whose cross-attention inputs were trimmed.
    """

    image_tokens_before: list[int] = field(default_factory=list)
    image_tokens_valid: list[int] = field(default_factory=list)
    image_tokens_after: list[int] = field(default_factory=list)
    extra_tokens: list[int] = field(default_factory=list)
    cross_kv_bytes_before: int = 0
    cross_kv_bytes_after: int = 0
    sample_cross_kv_bytes_before: list[int] = field(default_factory=list)
    sample_cross_kv_bytes_after: list[int] = field(default_factory=list)
    trimmed_layers: list[int] = field(default_factory=list)

    @property
    def kept_fraction(self) -> list[float]:
        """Kept / non-padding tokens per sample (1.0 for samples without image tokens)."""
        return [sample.kept_fraction for sample in self.samples]

    @property
    def samples(self) -> list[SampleStats]:
        """The per-sample view: each sample's own image tokens and cache bytes, without batch padding."""
        return [
            SampleStats(valid, min(after, valid), extra, before_bytes, after_bytes)
            for valid, after, extra, before_bytes, after_bytes in zip(
                self.image_tokens_valid,
                self.image_tokens_after,
                self.extra_tokens,
                self.sample_cross_kv_bytes_before,
                self.sample_cross_kv_bytes_after,
            )
        ]

    @property
    def cross_kv_bytes_saved(self) -> int:
        return self.cross_kv_bytes_before - self.cross_kv_bytes_after

    def as_dict(self) -> dict:
        """JSON-ready record."""
        record = {name: getattr(self, name) for name in self.__dataclass_fields__}
        record["kept_fraction"] = self.kept_fraction
        record["cross_kv_bytes_saved"] = self.cross_kv_bytes_saved
        return record


def check_scoring_buffer_bytes(value) -> int:
    """The `scoring_buffer_bytes` setting: an int of at least 1 MiB (the bound on scoring's transient memory)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_SCORING_BUFFER_BYTES:
        raise InvalidSettingError(
            f"scoring_buffer_bytes={value!r}: needs an integer number of bytes of at least {MIN_SCORING_BUFFER_BYTES} "
            "(1 MiB)"
        )
    return value


HANDLE_ATTRIBUTE = "_trimllama_handle"  # set on a trimmed model: its active handle


class TrimHandle:
    """Trimming installed on one model instance; a context manager that removes it on exit.

    Attributes:
        model: the trimmed model.
        method: the selection method in use.
        kept: after each prefill, one sorted 1-D LongTensor per sample of kept indices into the
            sample's flattened image-token axis (images x tiles x patches).
        stats: a `TrimStats` for the last prefill.
    """

    model: nn.Module
    method: SelectionMethod
    kept: list[torch.Tensor]
    stats: TrimStats

    @property
    def active(self) -> bool:
        return getattr(self.model, HANDLE_ATTRIBUTE, None) is self

    def remove(self) -> None:
        """Uninstall; the model behaves exactly as before `trim`. Calling it twice is harmless."""
        if self.active:
            delattr(self.model, HANDLE_ATTRIBUTE)

    def __enter__(self) -> "TrimHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"TrimHandle({self.method.label()}, {type(self.model).__name__}, {state})"


class Adapter(TrimHandle):
    """Installs a selection method on one model instance through forward hooks; the `TrimHandle` of it.

    Subclasses implement `supports`, `_install` (register hooks, appending the handles to
    `self._hooks`) and keep `kept` / `stats` current after every prefill. They also answer, without
    installing anything, every question about the model that front-ends and harnesses have: the class
    methods below. Nothing outside `adapters/` reads a model's modules.
    """

    model_classes: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ()  # names of the processor's per-image inputs (what the vision tower reads)
    # the forward's cache argument and its output's cache field (`past_key_values`; `cache` from transformers 5.24)
    cache_keyword: str = "past_key_values"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kept: list[torch.Tensor] = []
        self.stats = TrimStats()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def tokens_per_tile(cls, model: nn.Module) -> int:
        """Image tokens per tile (or per image, for a family without tiles)."""
        raise NotImplementedError

    @classmethod
    def cross_attention_layers(cls, model: nn.Module) -> list[int]:
        """Decoder-layer indices of the cross-attention layers, in order."""
        raise NotImplementedError

    @classmethod
    def context_length(cls, model: nn.Module) -> int:
        """Text positions the model takes, prompt and answer together."""
        raise NotImplementedError

    @classmethod
    def cross_attention_mask(cls, model: nn.Module, tile_mask: torch.Tensor, dtype: torch.dtype) -> tuple:
        """(additive mask, row visibility) of the image tokens, as the model builds them from the processor's mask."""
        raise NotImplementedError

    @classmethod
    def cache_bytes_per_token(cls, model: nn.Module) -> int:
        """Cache bytes of one image token in one cross-attention layer (keys + values)."""
        raise NotImplementedError

    @classmethod
    def image_tokens(cls, model: nn.Module, inputs: dict) -> list[int]:
        """Per sample of the processor's batch `inputs`, the image tokens its text sees."""
        raise NotImplementedError

    @classmethod
    def untrimmed_stats(cls, model: nn.Module, inputs: dict) -> TrimStats:
        """The `TrimStats` of the untrimmed model on `inputs`: what it caches, by the same definitions."""
        raise NotImplementedError

    @classmethod
    def image_features(cls, model: nn.Module, *image_inputs: torch.Tensor) -> torch.Tensor:
        """(batch, image_tokens, hidden): the image features the cross-attention layers receive."""
        raise NotImplementedError

    @classmethod
    def with_image_features(cls, model: nn.Module, inputs: dict, features: torch.Tensor) -> dict:
        """`inputs` with precomputed `image_features` in place of the pixel inputs (the vision tower is skipped)."""
        raise NotImplementedError

    @classmethod
    def feed_later_layers(cls, model: nn.Module, *fixed_inputs: torch.Tensor) -> list:
        """Hooks that give the later cross-attention layers fixed image inputs (the benchmark's ideal arm)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Unregister every hook; the model runs as before."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        super().remove()

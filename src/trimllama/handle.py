"""`trim(model, method)`: the one call that installs trimming on a loaded model."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter, TrimStats, adapter_for
from .errors import AlreadyTrimmedError
from .methods import SelectionMethod, get_method

_HANDLE_ATTRIBUTE = "_trimllama_handle"


class TrimHandle:
    """Trimming installed on one model instance; a context manager that removes it on exit.

    Attributes:
        method: the selection method in use.
        kept: after each prefill, one sorted 1-D LongTensor per sample of kept indices into the
            sample's flattened image-token axis (images x tiles x patches).
        stats: a `TrimStats` for the last prefill.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, method: SelectionMethod) -> None:
        self.model = model
        self.method = method
        self._adapter = adapter

    @property
    def kept(self) -> list[torch.Tensor]:
        return self._adapter.kept

    @property
    def stats(self) -> TrimStats:
        return self._adapter.stats

    @property
    def active(self) -> bool:
        return getattr(self.model, _HANDLE_ATTRIBUTE, None) is self

    def remove(self) -> None:
        """Uninstall; the model behaves exactly as before `trim`. Calling it twice is harmless."""
        self._adapter.remove()
        if self.active:
            delattr(self.model, _HANDLE_ATTRIBUTE)

    def __enter__(self) -> "TrimHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"TrimHandle({self.method.label()}, {type(self.model).__name__}, {state})"


def trim(
    model: nn.Module,
    method: SelectionMethod | str = "headwise_topk",
    *,
    trim_scoring_layer: bool = False,
    **settings,
) -> TrimHandle:
    """Trim the cross-attended image features of `model` (this instance only).

    Args:
        model: a loaded `MllamaForConditionalGeneration` (or `MllamaModel`).
        method: a selection method instance, or a registered name (see `trimllama.METHODS`) whose
            settings are given as keyword arguments, e.g. `trim(model, "headwise_topk", head_k=0.1)`.
        trim_scoring_layer: also compact the first cross-attention layer's own cache after scoring.

    Returns:
        A `TrimHandle`; use it as a context manager or call `remove()`.
    """
    method = get_method(method, **settings)
    adapter_class = adapter_for(model)
    existing = getattr(model, _HANDLE_ATTRIBUTE, None)
    if existing is not None:
        raise AlreadyTrimmedError(f"this model is already trimmed by {existing!r}; remove() it first")
    handle = TrimHandle(model, adapter_class(model, method, trim_scoring_layer=trim_scoring_layer), method)
    setattr(model, _HANDLE_ATTRIBUTE, handle)
    return handle

"""`trim(model, method)`: the one call that installs trimming on a loaded model.

It returns the model family's adapter, which is the `TrimHandle`: one object holds the hooks, `kept` and `stats`.
"""

from __future__ import annotations

from torch import nn

from .adapters import adapter_for
from .adapters.base import HANDLE_ATTRIBUTE, TrimHandle
from .errors import AlreadyTrimmedError
from .methods import SelectionMethod, get_method
from .methods.base import query_rows_of
from .selection import SCORING_BUFFER_BYTES
from .turns import turn_markers

__all__ = ["TrimHandle", "trim"]


def trim(
    model: nn.Module,
    method: SelectionMethod | str = "headwise_topk",
    *,
    trim_scoring_layer: bool = False,
    scoring_buffer_bytes: int = SCORING_BUFFER_BYTES,
    tokenizer=None,
    **settings,
) -> TrimHandle:
    """Trim the cross-attended image features of `model` (this instance only).

    Args:
        model: a loaded `MllamaForConditionalGeneration` (or `MllamaModel`).
        method: a selection method instance, or a registered name (see `trimllama.METHODS`) whose
            settings are given as keyword arguments, e.g. `trim(model, "headwise_topk", head_k=0.1)`.
        trim_scoring_layer: also compact the first cross-attention layer's own cache after scoring.
        scoring_buffer_bytes: bound on the transient memory of the head-wise scoring (at least 1 MiB; default
            32 MiB). A larger buffer scores in fewer, larger chunks; the selection is the same unless the buffer
            is too small for one KV group's 256 text rows (then rows are summed in smaller steps).
        tokenizer: the tokenizer or processor whose chat template built the prompts; needed by methods with
            `query_rows="last_turn"` or `"image_turn"`, which read the template's turn markers (`trimllama.turns`).

    Returns:
        A `TrimHandle`; use it as a context manager or call `remove()`.
    """
    method = get_method(method, **settings)
    adapter_class = adapter_for(model)
    existing = getattr(model, HANDLE_ATTRIBUTE, None)
    if existing is not None:
        raise AlreadyTrimmedError(f"this model is already trimmed by {existing!r}; remove() it first")
    markers = turn_markers(tokenizer, query_rows_of(method)) if tokenizer is not None else {}
    handle = adapter_class(
        model,
        method,
        trim_scoring_layer=trim_scoring_layer,
        scoring_buffer_bytes=scoring_buffer_bytes,
        turn_markers=markers,
    )
    setattr(model, HANDLE_ATTRIBUTE, handle)
    return handle

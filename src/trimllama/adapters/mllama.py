"""Trimming wired into Hugging Face Mllama (Llama-3.2-Vision), transformers 5.19 to 5.24.

How one forward pass runs with the hooks:

    MllamaModel                    pre-hook: checks the inputs, records the (images, tiles, patches) layout
      language_model (text model)  post-hook: drops per-step buffers, measures the cache after a prefill
        first cross-attn layer     pre-hook: on prefill keeps the full inputs for scoring; on decode gathers
                                   the step's mask to the kept columns (used by the later layers)
                                   post-hook: builds the TrimPlan, gathers the kept features
          cross_attn.q_norm/k_norm post-hooks: capture q/k on prefill, so scoring reuses the layer's projections;
                                   once k exists, score and select (before the layer's own attention)
          cross_attn               post-hook: zero the attention of rows left with no column (image_turn below)
        later cross-attn layers    pre-hook: swap in the kept features (prefill) and the gathered mask (always)

Decode steps pass `cross_attention_states=None`; the later layers read their (trimmed) cache, and
the mask that `MllamaModel` rebuilds from the untrimmed tile layout is gathered with the plan's indices.
A text-only forward (no image given, none cached) passes through untouched, as untrimmed: Mllama
skips its cross-attention layers, and the stats report zero image tokens.

`query_rows="image_turn"` with `trim_scoring_layer=True`: the prefill rows that come after their image's user
message (they see an image but do not score) attend, in the scoring layer too, to the kept columns only, as the
decode steps and any later extension of the prompt do. The scoring layer then gets its own copy of the mask, whose
dropped columns the selection (made in k_norm's hook, before the layer's attention) sets to -inf in those rows; a
row left with no column gets an attention output of 0, as its decode steps do. So a prompt prefilled from scratch
equals its earlier turns from the cache plus its extension, as in an engine whose cache holds only the kept tokens.

Memory. What trimming adds is largest in the scoring layer's post-hook, where the selection is made. Alive then:
    the model's own tensors, untrimmed or not: the full image features (batch, image_tokens, hidden), which
        Mllama holds for the whole forward pass, its additive mask (batch, 1, text_len, image_tokens), the hidden
        states, and the scoring layer's full keys and values in the cache;
    held by the hooks until the selection is made (in k_norm's hook, before the layer's own attention): the scoring
        layer's own q (batch, heads, text_len, head_dim) and k (batch, kv_heads, image_tokens, head_dim), captured
        from q_norm/k_norm instead of projected again;
    the scoring's buffers, at most `scoring_buffer_bytes` (selection.head_attention chunks samples, KV groups
        and rows), the visible-token mask built a few rows at a time within the same bound, and the scores
        (batch, heads, image_tokens) float32.
Then q, k and the scores are released (the keep-mask stays), the layer's attention runs (with image_turn and
trim_scoring_layer over its own copy of the mask), and after it the kept features (batch, kept, hidden) and the
prefill's mask of the kept columns (batch, 1, text_len, kept) are built once, shared by every later layer, and
dropped when the text model returns (the plan's indices stay for the decode steps). Nothing of the trimming grows with
batch x text_len x image_tokens x heads, so the trimmed prefill peaks where the untrimmed one does.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.mllama.modeling_mllama import (
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextCrossAttention,
    _prepare_cross_attention_mask,
)

from ..errors import InvalidSettingError, MissingImageError, ShapeMismatchError, UnsupportedModelError
from ..methods.base import ExtraTokens, ImageTokens, SelectionMethod, query_rows_of
from ..plan import TrimPlan
from ..selection import SCORING_BUFFER_BYTES, head_attention, image_turn_rows, last_turn_rows, visible_tokens
from ..turns import MARKER_READERS
from . import mllama_facts
from .base import Adapter, TrimStats, check_scoring_buffer_bytes

# The transformers releases whose Mllama the core tests run on (.ci/run); trim() refuses any other unless opted in.
TESTED_TRANSFORMERS = ("5.19.0", "5.23.0", "5.24.0")
ALLOW_UNTESTED_ENV = "TRIMLLAMA_ALLOW_UNTESTED_TRANSFORMERS"
# transformers 5.24 renamed the layers' and models' `past_key_values` argument, and the outputs' field, to `cache`.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(MllamaTextCrossAttention.forward).parameters else "past_key_values"


def check_transformers_version() -> None:
    """Refuse an untested transformers release (Mllama's internals move between releases), unless opted in."""
    import transformers  # the module now in sys.modules: transformers 5.24 replaces its lazy module after import

    version = transformers.__version__
    if version in TESTED_TRANSFORMERS:
        return
    tested = ", ".join(TESTED_TRANSFORMERS)
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(f"trimllama is running on transformers {version}, which it is not tested on (tested: {tested})")
        return
    raise UnsupportedModelError(
        f"trimllama's Mllama adapter is not tested on transformers {version} (tested: {tested}); install one of "
        f"those, or set {ALLOW_UNTESTED_ENV}=1 to run on {version} at your own risk"
    )


@dataclass
class _Prefill:
    """Inputs of the scoring layer on a prefill and its selection, held until the plan is built.

    states: (batch, image_tokens, hidden); mask: (batch, 1, text_len, image_tokens) additive;
    row_visible: (batch, 1, text_len, 1); rule_rows: (batch, text_len) bool per row rule whose marker is known;
    late_rows: (batch, text_len) bool, rows that must see only the kept columns (image_turn, trim_scoring_layer);
    scoring_mask: the scoring layer's own copy of `mask` where there are late rows;
    query: (batch, heads, text_len, head_dim) and key: (batch, kv_heads, image_tokens, head_dim), released once
    the selection is made; keep: (batch, image_tokens) bool; extra: the method's extra tokens; valid: per sample.
    """

    states: torch.Tensor
    mask: torch.Tensor
    row_visible: torch.Tensor
    rule_rows: dict[str, torch.Tensor]
    late_rows: torch.Tensor | None = None
    scoring_mask: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    extra: ExtraTokens | None = None
    valid: list[int] | None = None


def _last_row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    *,
    buffer_bytes: int = SCORING_BUFFER_BYTES,
) -> torch.Tensor:
    """(batch, heads, image_tokens) attention of each sample's last text row that sees an image."""
    last = (torch.arange(rows.shape[1], device=rows.device) * rows).argmax(dim=1)  # (batch,)
    query_last = query.gather(2, last[:, None, None, None].expand(-1, query.shape[1], 1, query.shape[3]))
    mask_last = mask.gather(2, last[:, None, None, None].expand(-1, 1, 1, mask.shape[3]))
    return head_attention(
        query_last, key, mask_last, rows.any(dim=1, keepdim=True), scaling, buffer_bytes=buffer_bytes
    )


# what a sample lacks when a row rule finds none of its rows that see an image
_NO_RULE_ROWS = {
    "last_turn": "user-turn marker of the chat template; build the prompt with the chat template",
    "image_turn": "<|image|> token before its rows that see an image; give the prompt's input_ids with its <|image|> tokens",
}


def _row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    reduce: str,
    query_rows: str,
    *,
    rule_rows: dict[str, torch.Tensor],
    buffer_bytes: int,
) -> torch.Tensor:
    """`head_attention` over `rows` (query_rows "all"), or over those of them the row rule `query_rows` takes.

    rule_rows: (batch, text_len) bool per rule: "last_turn" from `selection.last_turn_rows`, "image_turn" from
    `selection.image_turn_rows`; a rule is missing where its marker or the prompt's input_ids are not known.
    """
    if query_rows != "all":
        if query_rows not in rule_rows:
            raise InvalidSettingError(
                f"query_rows={query_rows} needs the prompt's token ids and the chat template's turn marker: "
                "trim(model, method, tokenizer=processor) and a prefill given input_ids",
                setting="query_rows",
            )
        taken = rows & rule_rows[query_rows]
        missing = rows.any(dim=1) & ~taken.any(dim=1)
        if missing.any():
            raise InvalidSettingError(
                f"query_rows={query_rows}: sample(s) {missing.nonzero().flatten().tolist()} of the batch have no "
                + _NO_RULE_ROWS[query_rows],
                setting="query_rows",
            )
        rows = taken
    return head_attention(query, key, mask, rows, scaling, reduce, buffer_bytes=buffer_bytes)


def _hide_dropped_columns(mask: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Set the columns `keep` drops to the mask's -inf in `rows`, in place; the rows left with no column.

    mask: (batch, 1, text_len, image_tokens) additive; rows: (batch, text_len) bool; keep: (batch, image_tokens) bool.
    Returns (batch, text_len) bool: rows of `rows` that now see no column (their attention output must be 0).
    """
    lowest = torch.finfo(mask.dtype).min
    mask[:, 0].masked_fill_(rows[:, :, None] & ~keep[:, None, :], lowest)
    return rows & (mask[:, 0] == lowest).all(dim=-1)


class MllamaAdapter(Adapter):
    """Trims the image features of every cross-attention layer after the first one."""

    model_classes = ("MllamaForConditionalGeneration", "MllamaModel")
    model_types = ("mllama",)  # `config.model_type` of the checkpoints it wires
    image_inputs = mllama_facts.IMAGE_INPUTS
    cache_keyword = _CACHE_ARGUMENT

    def __init__(
        self,
        model: nn.Module,
        method: SelectionMethod,
        trim_scoring_layer: bool = False,
        scoring_buffer_bytes: int = SCORING_BUFFER_BYTES,
        turn_markers: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        check_transformers_version()
        rules = query_rows_of(method)
        turn_markers = turn_markers or {}
        for rule in MARKER_READERS:
            if rule in rules and rule not in turn_markers:
                raise InvalidSettingError(
                    f"query_rows={rule} needs the chat template's turn marker: trim(model, method, tokenizer=processor)",
                    setting="query_rows",
                )
        super().__init__(model)
        self.method = method
        self.trim_scoring_layer = trim_scoring_layer
        self.scoring_buffer_bytes = check_scoring_buffer_bytes(scoring_buffer_bytes)
        self.turn_markers = {rule: torch.tensor(ids, dtype=torch.long) for rule, ids in turn_markers.items()}
        # image_turn with a compacted scoring layer: prefill rows past their image's message see the kept columns only
        self.late_rows_see_kept = trim_scoring_layer and "image_turn" in rules
        self.core: MllamaModel = model.model if isinstance(model, MllamaForConditionalGeneration) else model
        self.image_token_id = mllama_facts.image_token_id(self.core.config)
        text_model = self.core.language_model
        self.scoring_index, self.trimmed_indices = mllama_facts.scoring_and_trimmed_layers(text_model.config)
        self.scoring_layer = text_model.layers[self.scoring_index]
        attention = getattr(self.scoring_layer, "cross_attn", None)
        if not isinstance(attention, MllamaTextCrossAttention):
            raise UnsupportedModelError(
                f"decoder layer {self.scoring_index} has no MllamaTextCrossAttention; "
                f"this transformers version's Mllama is not supported (tested: {', '.join(TESTED_TRANSFORMERS)})"
            )
        self.attention = attention
        self.num_patches = self.tokens_per_tile(model)
        self._forward_signature = inspect.signature(self.core.forward)

        self.plan: TrimPlan | None = None
        self._layout: tuple[int, int, int] | None = None
        self._prefill: _Prefill | None = None
        self._input_ids: torch.Tensor | None = None  # (batch, text_len) of the prefill, for the row rules
        self._blind_rows: torch.Tensor | None = None  # (batch, text_len) late rows of this prefill that see no column
        self._trimmed_states: torch.Tensor | None = None  # (batch, columns, hidden), prefill only
        self._step_mask: torch.Tensor | None = None  # (batch, 1, text_len, columns)
        self._install()

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, (MllamaForConditionalGeneration, MllamaModel))

    def _install(self) -> None:
        text_model = self.core.language_model
        self._hooks += [
            self.core.register_forward_pre_hook(self._before_model, with_kwargs=True),
            text_model.register_forward_hook(self._after_text_model),
            self.scoring_layer.register_forward_pre_hook(self._before_scoring_layer, with_kwargs=True),
            self.scoring_layer.register_forward_hook(self._after_scoring_layer, with_kwargs=True),
            self.attention.q_norm.register_forward_hook(self._capture_query),
            self.attention.k_norm.register_forward_hook(self._capture_key),
            self.attention.register_forward_hook(self._after_scoring_attention),
        ]
        for index in self.trimmed_indices:
            layer = text_model.layers[index]
            self._hooks.append(layer.register_forward_pre_hook(self._before_trimmed_layer, with_kwargs=True))

    def remove(self) -> None:
        super().remove()
        self._prefill = self._trimmed_states = self._step_mask = self._input_ids = self._blind_rows = None

    # -- hooks ---------------------------------------------------------------------------------

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._prefill = self._blind_rows = None  # nothing of a forward pass that raised carries over
        inputs = self._forward_signature.bind_partial(*args, **kwargs).arguments
        has_image = inputs.get("pixel_values") is not None or inputs.get("cross_attention_states") is not None
        cache = _passed_cache(inputs)
        if not has_image:
            if not _has_cross_cache(cache, self.scoring_index):
                self._pass_through(inputs)
            return  # a text-only prompt, or a decode step whose later layers read their trimmed cache
        _refuse_compile(torch.compiler.is_compiling())
        if cache is not None and not isinstance(cache, DynamicCache):
            raise NotImplementedError(
                f"trimllama supports DynamicCache only, got {type(cache).__name__} (static cache / torch.compile)"
            )
        if cache is not None and any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise NotImplementedError("trimllama supports DynamicCache with dynamic layers only (no static or sliding layers)")
        tile_mask = inputs.get("cross_attention_mask")
        if tile_mask is None or tile_mask.dim() != 4:
            raise ShapeMismatchError(
                "a trimmed model needs cross_attention_mask of shape (batch, text_len, images, tiles) "
                f"with the images, got {None if tile_mask is None else tuple(tile_mask.shape)}"
            )
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and tuple(pixel_values.shape[:3]) != (tile_mask.shape[0], *tile_mask.shape[2:]):
            raise ShapeMismatchError(
                f"pixel_values has (batch, images, tiles) = {tuple(pixel_values.shape[:3])} but cross_attention_mask "
                f"has {(tile_mask.shape[0], *tile_mask.shape[2:])}"
            )
        self._layout = (int(tile_mask.shape[2]), int(tile_mask.shape[3]), self.num_patches)
        self._input_ids = inputs.get("input_ids")

    def _before_scoring_layer(self, module: nn.Module, args: tuple, kwargs: dict):
        _refuse_compile(torch.compiler.is_compiling())  # also where only the model's forward is compiled (its own pre-hook runs eagerly)
        states = kwargs["cross_attention_states"]
        mask = kwargs["cross_attention_mask"]
        row_visible = kwargs["full_text_row_masked_out_mask"]
        if states is not None:
            # Mllama hands over (batch * images * tiles, patches, hidden); the attention views it per sample.
            batch, expected = mask.shape[0], self._layout[0] * self._layout[1] * self._layout[2]
            if states.numel() != batch * expected * states.shape[-1] or mask.shape[-1] != expected:
                raise ShapeMismatchError(
                    f"image features of shape {tuple(states.shape)} and a mask over {mask.shape[-1]} columns do not "
                    f"match batch {batch} x images x tiles x patches {self._layout} = {expected} tokens per sample"
                )
            states = states.reshape(batch, expected, states.shape[-1])
            rows = row_visible[:, 0, :, 0] > 0  # (batch, text_len)
            self._prefill = prefill = _Prefill(states, mask, row_visible, self._rule_rows(rows))
            if not self.late_rows_see_kept or "image_turn" not in prefill.rule_rows:
                return None
            past_image = (self._input_ids.to(rows.device) == self.image_token_id).cumsum(dim=1) > 0
            prefill.late_rows = rows & past_image & ~prefill.rule_rows["image_turn"]
            prefill.scoring_mask = mask.clone()  # the adapter's own: the selection hides dropped columns in late rows
            kwargs["cross_attention_mask"] = prefill.scoring_mask
            return args, kwargs
        if self.plan is None:
            raise MissingImageError(
                "a decode step reached the trimmed model with image keys in its cache but no trimming plan "
                "(the prefill ran before trim() was installed); run the prefill with the trimmed model"
            )
        self._step_mask = self.plan.column_mask(mask, row_visible)
        if not self.trim_scoring_layer:
            return None
        kwargs["cross_attention_mask"] = self._step_mask[..., : self.plan.kept_columns]
        return args, kwargs

    def _capture_query(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._prefill is not None:
            self._prefill.query = output  # (batch, heads, text_len, head_dim)

    def _capture_key(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._prefill is not None:
            self._prefill.key = output  # (batch, kv_heads, image_tokens, head_dim)
            self._select(self._prefill)

    def _select(self, prefill: _Prefill) -> None:
        """Score and select once q and k exist, before the scoring layer's attention; release q and k."""
        tokens = self._image_tokens(prefill)
        keep = self.method.select(tokens)
        mllama_facts.check_keep_mask(self.method, keep, tokens.valid)
        prefill.keep, prefill.extra = keep, self.method.extra_tokens(tokens, keep)
        prefill.valid = tokens.num_valid.tolist()
        prefill.query = prefill.key = None  # with `tokens`, the last references to the captured q/k and the scores
        if prefill.late_rows is not None:
            self._blind_rows = _hide_dropped_columns(prefill.scoring_mask, prefill.late_rows, keep)

    def _after_scoring_attention(self, module: nn.Module, args: tuple, output):
        blind, self._blind_rows = self._blind_rows, None
        if blind is None or not blind.any():
            return None
        return (output[0].masked_fill(blind[:, :, None].to(output[0].device), 0), *output[1:])

    def _after_scoring_layer(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        prefill, self._prefill = self._prefill, None
        if prefill is None:
            return
        if prefill.keep is None:
            raise ShapeMismatchError("the scoring layer ran without its q_norm/k_norm; unsupported Mllama variant")
        states, mask, row_visible = prefill.states, prefill.mask, prefill.row_visible
        self.plan = TrimPlan.from_keep(prefill.keep, mask, row_visible, prefill.extra)
        self._trimmed_states = self.plan.gather_states(states)
        self._step_mask = self.plan.column_mask(mask, row_visible)
        if self.trim_scoring_layer:
            self._compact_scoring_cache(kwargs.get(_CACHE_ARGUMENT))
        self.kept = self.plan.kept_indices()
        self._record_stats(prefill.valid)

    def _before_trimmed_layer(self, module: nn.Module, args: tuple, kwargs: dict):
        device = args[0].device if args else kwargs["hidden_states"].device
        if kwargs["cross_attention_states"] is not None:
            if self._trimmed_states is None:
                raise ShapeMismatchError("a trimmed layer got image features, but the scoring layer did not run first")
            kwargs["cross_attention_states"] = self._trimmed_states.to(device)
        if self._step_mask is not None:
            kwargs["cross_attention_mask"] = self._step_mask.to(device)
        return args, kwargs

    def _after_text_model(self, module: nn.Module, args: tuple, output) -> None:
        if self._trimmed_states is not None:
            self._measure_cache(getattr(output, _CACHE_ARGUMENT, None))
        self._trimmed_states = self._step_mask = None

    # -- helpers -------------------------------------------------------------------------------

    def _pass_through(self, inputs: dict) -> None:
        """No image and no cached image: nothing to trim, Mllama skips its cross-attention layers."""
        ids = inputs.get("input_ids")
        batch = int((ids if ids is not None else inputs["inputs_embeds"]).shape[0])
        self.plan = None
        self.kept = [torch.zeros(0, dtype=torch.long) for _ in range(batch)]
        zeros = [0] * batch
        self.stats = TrimStats(
            image_tokens_before=zeros,
            image_tokens_valid=zeros,
            image_tokens_after=zeros,
            extra_tokens=zeros,
            sample_cross_kv_bytes_before=zeros,
            sample_cross_kv_bytes_after=zeros,
        )

    def _image_tokens(self, prefill: _Prefill) -> ImageTokens:
        if prefill.query is None or prefill.key is None:
            raise ShapeMismatchError("the scoring layer ran without its q_norm/k_norm; unsupported Mllama variant")
        rows = prefill.row_visible[:, 0, :, 0] > 0  # (batch, text_len)
        scoring = (prefill.query, prefill.key, prefill.mask, rows, float(self.attention.scaling))
        buffer = {"buffer_bytes": self.scoring_buffer_bytes}
        return ImageTokens(
            features=prefill.states,
            valid=visible_tokens(prefill.mask, rows, self.scoring_buffer_bytes),
            layout=self._layout,
            attention=partial(_row_attention, *scoring, rule_rows=prefill.rule_rows, **buffer),
            last_row_attention=partial(_last_row_attention, *scoring, **buffer),
        )

    def _rule_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """(batch, text_len) bool per row rule whose marker is known, read off the prefill's input_ids (none without
        them). rows: (batch, text_len), for the shape and device."""
        ids = self._input_ids
        if ids is None or ids.shape != rows.shape:
            return {}
        ids = ids.to(rows.device)
        found = {}
        if "last_turn" in self.turn_markers:
            found["last_turn"] = last_turn_rows(ids, self.turn_markers["last_turn"])
        if "image_turn" in self.turn_markers:
            found["image_turn"] = image_turn_rows(ids, self.image_token_id, self.turn_markers["image_turn"])
        return found

    def _bytes_per_token(self) -> int:
        return self.cache_bytes_per_token(self.model)

    def _compact_scoring_cache(self, cache) -> None:
        """Keep only the kept columns in the scoring layer's own cache (padding columns zeroed)."""
        if cache is None:
            return
        layer = cache.layers[self.scoring_index]
        batch, kv_heads, _, head_dim = layer.keys.shape
        index = self.plan.index.to(layer.keys.device)[:, None, :, None].expand(batch, kv_heads, -1, head_dim)
        padding = ~self.plan.column_valid.to(layer.keys.device)[:, None, :, None]
        layer.keys = layer.keys.gather(2, index).masked_fill(padding, 0)
        layer.values = layer.values.gather(2, index).masked_fill(padding, 0)

    def _record_stats(self, valid: list[int]) -> None:
        plan = self.plan
        per_token = self._bytes_per_token()
        layers_total = 1 + len(self.trimmed_indices)
        batch, num_tokens = plan.batch_size, plan.num_tokens
        kept = plan.kept_counts().tolist()
        extra = plan.extra_counts().tolist()
        scoring_tokens = kept if self.trim_scoring_layer else valid
        later = len(self.trimmed_indices)
        self.stats = TrimStats(
            image_tokens_before=[num_tokens] * batch,
            image_tokens_valid=valid,
            image_tokens_after=kept,
            extra_tokens=extra,
            cross_kv_bytes_before=layers_total * batch * num_tokens * per_token,
            cross_kv_bytes_after=self._planned_bytes(),
            sample_cross_kv_bytes_before=[layers_total * own * per_token for own in valid],
            sample_cross_kv_bytes_after=[
                (first + later * (k + e)) * per_token for first, k, e in zip(scoring_tokens, kept, extra)
            ],
            trimmed_layers=list(self.trimmed_indices),
        )

    def _planned_bytes(self) -> int:
        """Bytes the cross-attention cache holds under the plan, batch padding included."""
        plan = self.plan
        scoring_columns = plan.kept_columns if self.trim_scoring_layer else plan.num_tokens
        columns = scoring_columns + len(self.trimmed_indices) * plan.columns
        return plan.batch_size * columns * self._bytes_per_token()

    def _measure_cache(self, cache) -> None:
        if cache is None or not hasattr(cache, "layers"):
            return
        indices = [self.scoring_index, *self.trimmed_indices]
        self.stats.cross_kv_bytes_after = sum(
            cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in indices if i < len(cache.layers)
        )

    # -- model facts (no hooks installed): what the front-ends and harnesses ask of a Mllama -----------------

    @staticmethod
    def _core(model: nn.Module) -> MllamaModel:
        return model.model if isinstance(model, MllamaForConditionalGeneration) else model

    @classmethod
    def tokens_per_tile(cls, model: nn.Module) -> int:
        """Image tokens per tile: (image_size / patch_size)^2 patches plus the class token (1601 for the 11B)."""
        return mllama_facts.tokens_per_tile(cls._core(model).config.vision_config)

    @classmethod
    def cross_attention_layers(cls, model: nn.Module) -> list[int]:
        """Decoder-layer indices of the cross-attention layers, in order."""
        return mllama_facts.cross_attention_layers(cls._core(model).config.text_config)

    @classmethod
    def context_length(cls, model: nn.Module) -> int:
        """Text positions the model takes, prompt and answer together."""
        return mllama_facts.context_length(cls._core(model).config.text_config)

    @classmethod
    def cross_attention_mask(
        cls, model: nn.Module, tile_mask: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mllama's additive mask (batch, 1, text_len, image_tokens) and row visibility (batch, 1, text_len, 1), built
        from the processor's (batch, text_len, images, tiles) 0/1 mask as the model builds them: 0 where a row sees a
        token, the dtype's lowest elsewhere, and 0 in every column of a row that sees no image (visibility 0)."""
        return _prepare_cross_attention_mask(tile_mask, cls.tokens_per_tile(model), dtype)

    @classmethod
    def cache_bytes_per_token(cls, model: nn.Module) -> int:
        """Cache bytes of one image token in one cross-attention layer (keys + values, KV heads x head_dim)."""
        layer = cls._core(model).language_model.layers[cls.cross_attention_layers(model)[0]]
        weight = layer.cross_attn.k_proj.weight
        return 2 * weight.shape[0] * weight.element_size()

    @classmethod
    def image_tokens(cls, model: nn.Module, inputs: dict) -> list[int]:
        """Per sample, the image tokens its text sees (tiles with a 1 in `cross_attention_mask` x tokens per tile);
        padding tiles, padding images and text-only samples count 0. The base of every kept fraction."""
        tile_mask = inputs.get("cross_attention_mask")  # (batch, text_len, images, tiles)
        if tile_mask is None:
            return [0] * int(inputs["input_ids"].shape[0])
        seen_tiles = tile_mask.bool().any(dim=1).flatten(1).sum(dim=1)  # (batch,)
        return (seen_tiles * cls.tokens_per_tile(model)).tolist()

    @classmethod
    def untrimmed_stats(cls, model: nn.Module, inputs: dict) -> TrimStats:
        """What the untrimmed model caches for the batch `inputs`: every image token, padding tiles included,
        in every cross-attention layer (the same definitions as a trimmed prefill's stats)."""
        tile_mask = inputs.get("cross_attention_mask")
        batch = int(inputs["input_ids"].shape[0])
        num_tokens = 0 if tile_mask is None else int(tile_mask.shape[2] * tile_mask.shape[3]) * cls.tokens_per_tile(model)
        per_layer = len(cls.cross_attention_layers(model)) * cls.cache_bytes_per_token(model)
        valid = cls.image_tokens(model, inputs)
        return TrimStats(
            image_tokens_before=[num_tokens] * batch,
            image_tokens_valid=valid,
            image_tokens_after=[num_tokens] * batch,
            extra_tokens=[0] * batch,
            cross_kv_bytes_before=batch * num_tokens * per_layer,
            cross_kv_bytes_after=batch * num_tokens * per_layer,
            sample_cross_kv_bytes_before=[own * per_layer for own in valid],
            sample_cross_kv_bytes_after=[own * per_layer for own in valid],
        )

    @classmethod
    def image_features(
        cls, model: nn.Module, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch, images * tiles * patches, hidden): the `cross_attention_states` Mllama computes from pixels."""
        core = cls._core(model)
        vision = core.vision_model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state
        projected = core.multi_modal_projector(vision)  # (batch, images, tiles, patches, hidden)
        return projected.reshape(pixel_values.shape[0], -1, core.hidden_size)

    @classmethod
    def with_image_features(cls, model: nn.Module, inputs: dict, features: torch.Tensor) -> dict:
        """`inputs` with precomputed image features instead of pixels: the vision tower does not run.

        features: (batch, images * tiles * patches, hidden), as `image_features` returns for the same image inputs.
        The result drops pixel_values / aspect_ratio_ids / aspect_ratio_mask and passes `cross_attention_states`
        shaped as Mllama's own forward hands them on, (batch * images * tiles, patches, hidden).
        """
        patches = cls.tokens_per_tile(model)
        given = {key: value for key, value in inputs.items() if key not in cls.image_inputs}
        given["cross_attention_states"] = features.reshape(-1, patches, features.shape[-1])
        return given

    @classmethod
    def feed_later_layers(
        cls, model: nn.Module, states: torch.Tensor, prefill_mask: torch.Tensor, step_mask: torch.Tensor
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Hand the later cross-attention layers fixed inputs instead of the model's own (no scoring, no gathering).

        states: (batch, kept, hidden) image features; prefill_mask: (batch, 1, text_len, kept) additive mask of the
        prefill; step_mask: (batch, 1, 1, kept) the mask of every decode step. Returns the hooks to remove.
        """
        text_model = cls._core(model).language_model

        def swap_inputs(module, args, kwargs):
            if kwargs["cross_attention_states"] is not None:
                kwargs["cross_attention_states"] = states
                kwargs["cross_attention_mask"] = prefill_mask
            else:
                kwargs["cross_attention_mask"] = step_mask
            return args, kwargs

        later = cls.cross_attention_layers(model)[1:]
        return [text_model.layers[index].register_forward_pre_hook(swap_inputs, with_kwargs=True) for index in later]


def _passed_cache(inputs: dict):
    """The cache given to `MllamaModel.forward`; on 5.24 an old-style `past_key_values` arrives in its **kwargs."""
    cache = inputs.get(_CACHE_ARGUMENT)
    return cache if cache is not None else inputs.get("kwargs", {}).get("past_key_values")


def _has_cross_cache(cache, layer_index: int) -> bool:
    """Whether `cache` already holds image keys for the cross-attention layer `layer_index`."""
    if cache is None or not hasattr(cache, "layers") or layer_index >= len(cache.layers):
        return False
    layer = cache.layers[layer_index]
    return bool(getattr(layer, "is_initialized", False)) and layer.keys is not None and layer.keys.numel() > 0


@torch.compiler.disable
def _refuse_compile(compiling: bool) -> None:
    """NotImplementedError when `compiling` (torch.compile traces a trimmed forward over images: the plan's
    data-dependent shapes do not compile). Runs outside the compiled graph, so the error reaches the caller
    instead of making torch.compile fall back to running the hook eagerly; text-only forwards never get here."""
    if compiling:
        raise NotImplementedError(
            "trimllama does not support torch.compile yet: run the trimmed model uncompiled "
            "(static cache / torch.compile)"
        )

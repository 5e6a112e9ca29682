"""SGLang's Mllama with trimming and the image pool: the one module that imports SGLang's model internals.

Loaded by SGLang as an external model package (`SGLANG_EXTERNAL_MODEL_PACKAGE=trimllama.integrations.sglang`):
`EntryClass` keeps the name `MllamaForConditionalGeneration`, so SGLang serves it for Mllama checkpoints. Written
against SGLang `settings.SGLANG_VERSION`; `check_pool` fails loudly at the first forward pass when SGLang's pool is
not the plain per-layer MHA pool this relies on.

What changes against SGLang's own class (sglang/srt/models/mllama.py):

- `pad_input_ids`: a request's images reserve `layout.slots(tokens)` pool slots, tokens = `min(budget, real tokens)`
  per image (`settings.image_tokens`); with the image pool (`layout.PoolLayout`, the default) an image token takes
  only its cross-attention layers' rows of a slot. Its pad ids hash the images, the settings and the prompt ids
  that decide the kept set (`layout.scoring_spans`: up to the end of the image's user message under
  `query_rows="image_turn"`, the engine's default), so a conversation's later turns find the trimmed K/V and every
  earlier turn in the radix cache, and a different first question does not.
- The first cross-attention layer's prefill scores the real tokens of the images it encodes with
  `trimllama.selection.head_attention` (the scores of all heads gathered across tensor-parallel ranks, so every
  rank keeps the same tokens) over each image's scoring rows, runs the method's `select` per image, and writes only
  the kept K/V to the pool. Rows of an image's scoring span attend to all of its tokens in that layer; every later
  row (the generation prompt, later turns, decode steps) and every later layer attends to the kept tokens only, so a
  prefill from scratch computes what a cached prefix plus its extension computes.
- With the image pool, the cross-attention layers write and read their K/V through `PoolLayout.rows` and attend
  with SDPA per request; with `layout="shared"` they use SGLang's attention backend as SGLang's own Mllama does.
- `get_full_text_row_masked_out_mask`: rows counted per request's extend length (SGLang's own count mixes total
  sequence lengths and encoder lengths, and zeroes an image request's cross-attention when it shares a prefill
  batch with a text-only request that has a cached prefix).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sglang.srt.distributed.communication_op import tensor_model_parallel_all_gather
from sglang.srt.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.managers.schedule_batch import MM_PAD_SHIFT_VALUE, MultimodalInputs
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from sglang.srt.models import mllama

from ...adapters import mllama_facts
from ...errors import ShapeMismatchError, UnsupportedModelError
from ...methods import ImageTokens, SelectionMethod
from ...selection import head_attention
from ...turns import assistant_turn_opener
from .layout import PoolLayout, key_length, scoring_spans
from .settings import KEPT_DUMP_VARIABLE, EngineSettings, image_tokens, scored_rows

logger = logging.getLogger(__name__)
_PAD_MASK = (1 << 62) - 1  # pad ids stay below 2**63 (int64 token ids), as SGLang's own


@dataclass
class Encoding:
    """The images of one request that this prefill encodes.

    Attributes:
        real_tiles: real tiles of each image.
        spans: per image, the request's rows `[start, stop)` that score it (`layout.scoring_spans`).
        patches: image tokens per tile.
        features: (images, width, hidden) projected features, width = max_tiles x patches (padding tiles included);
            set by `flat_encoder_result` once the vision model has run.
        kept: per image, its kept token indices (within its real tokens); set by the scoring layer.
        kept_features: (tokens, hidden) what the request's image block stores; set by the scoring layer.
    """

    real_tiles: list[int]
    spans: list[tuple[int, int]]
    patches: int
    features: torch.Tensor | None = None
    kept: list[torch.Tensor] = field(default_factory=list)
    kept_features: torch.Tensor | None = None

    @property
    def lengths(self) -> list[int]:
        """Real tokens of each image."""
        return [tiles * self.patches for tiles in self.real_tiles]

    @property
    def starts(self) -> list[int]:
        """Where each image's real tokens start in the request's concatenation of them."""
        return torch.tensor([0, *self.lengths[:-1]]).cumsum(0).tolist()


@dataclass
class RequestImages:
    """One request of the forward batch that has images, and where its image block lives in the pool.

    Attributes:
        rows: its rows in this forward pass (its extend rows, or its one decode row).
        slots: (slots,) long, the pool slots of its image block (the first `encoder_len` of its tokens).
        tokens: image tokens its block stores (all of its images, in order).
        encoding: set when this forward pass encodes its images (its block is written here).
    """

    rows: slice
    slots: torch.Tensor
    tokens: int
    encoding: Encoding | None = None


@dataclass
class EnginePlan:
    """The requests with images of one forward pass, shared by its cross-attention layers."""

    requests: list[RequestImages]

    @property
    def encoded(self) -> list[RequestImages]:
        return [request for request in self.requests if request.encoding is not None]


class TrimState:
    """What the model and its cross-attention layers share (not an nn.Module): method, layout, the current plan."""

    def __init__(self, method: SelectionMethod | None, layout: PoolLayout, patches: int) -> None:
        self.method = method
        self.layout = layout
        self.patches = patches
        self.scoring_layer = layout.cross_layers[0]
        self.plan: EnginePlan | None = None
        self.pool_checked = False


class TrimmedCrossAttention(mllama.MllamaTextCrossAttention):
    """SGLang's cross-attention layer attending to the kept image tokens, in the pool layout of `trim_state`."""

    trim_state: TrimState

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cross_attention_states: torch.Tensor | None,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        state = self.trim_state
        if state.plan is None:  # shared layout without an image to encode: SGLang's own path reads the pool
            return super().forward(hidden_states, attention_mask, None, forward_batch)
        query = self._query(hidden_states)
        encoded = state.plan.encoded
        keys = values = None
        full = []
        if encoded and self.layer_id == state.scoring_layer:
            keys, values, full = self._score(query, encoded)
        elif encoded:
            keys, values = self._project(torch.cat([request.encoding.kept_features for request in encoded]))
        if state.layout.packed:
            output = self._attend_packed(query, keys, values, state.plan)
        else:
            output = self.attn(query, keys, values, forward_batch).view_as(query).clone()
        for rows, attended in full:  # rows of an image's scoring span attend to all of its tokens in this layer
            output[rows] = attended
        out, _ = self.o_proj(output.view(-1, self.num_local_heads * self.head_dim))
        return out

    # -- projections ---------------------------------------------------------------------------------

    def _query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(rows, heads, head_dim) queries after q_norm, as SGLang's layer computes them."""
        qkv, _ = self.qkv_proj(hidden_states)
        query = qkv.split([self.q_local_size, self.kv_local_size, self.kv_local_size], dim=-1)[0]
        return self.q_norm(query.reshape(-1, self.head_dim)).reshape(-1, self.num_local_heads, self.head_dim)

    def _project(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, kv_heads, head_dim) keys (after k_norm) and values of image features (tokens, hidden)."""
        qkv, _ = self.qkv_proj(features)
        _, key, value = qkv.split([self.q_local_size, self.kv_local_size, self.kv_local_size], dim=-1)
        key = self.k_norm(key.reshape(-1, self.head_dim)).reshape(-1, self.num_local_key_value_heads, self.head_dim)
        return key, value.reshape(-1, self.num_local_key_value_heads, self.head_dim)

    # -- the scoring layer ---------------------------------------------------------------------------

    def _score(self, query: torch.Tensor, encoded: list[RequestImages]):
        """Select the kept tokens of every encoded request; their K/V, and the full attention of scoring spans.

        Returns:
            keys, values: (kept tokens of all encoded requests, kv_heads, head_dim), in request order.
            full: (rows, (rows, heads, head_dim)) attention over all of an image's tokens for the rows of a request
                that see every token of some image (`_span_groups`).
        """
        state = self.trim_state
        real = [
            torch.cat([image[:length] for image, length in zip(r.encoding.features, r.encoding.lengths)])
            if state.method is not None
            else r.encoding.features.flatten(0, 1)
            for r in encoded
        ]
        keys, values = self._project(torch.cat(real))
        kept_keys, kept_values, full, offset = [], [], [], 0
        for request, features in zip(encoded, real):
            key, value = keys[offset : offset + len(features)], values[offset : offset + len(features)]
            offset += len(features)
            encoding = request.encoding
            if state.method is None:
                encoding.kept = [torch.arange(len(features))]
                index = encoding.kept[0]
            else:
                encoding.kept = self._select(query[request.rows], key, encoding)
                index = torch.cat([kept + start for kept, start in zip(encoding.kept, encoding.starts)])
                full += self._span_groups(query, key, value, request, index)
            index = index.to(key.device)
            encoding.kept_features = features.index_select(0, index)
            kept_keys.append(key.index_select(0, index))
            kept_values.append(value.index_select(0, index))
        return torch.cat(kept_keys), torch.cat(kept_values), full

    def _span_groups(self, query, key, value, request: RequestImages, kept: torch.Tensor) -> list:
        """Attention of the rows that see all tokens of some image: a row before the end of an image's span sees all
        of that image's tokens, and the kept tokens of the images whose span it is past.

        key, value: (real tokens of the request's images, kv_heads, head_dim); kept: (kept,) indices into them.
        """
        encoding = request.encoding
        stops = [stop for _, stop in encoding.spans]
        groups, first = [], 0
        for stop in sorted(set(stops)):
            if stop > first:
                columns = torch.cat([
                    torch.arange(start, start + length, device=key.device)
                    if image_stop >= stop
                    else kept[(kept >= start) & (kept < start + length)]
                    for start, length, image_stop in zip(encoding.starts, encoding.lengths, stops)
                ])
                rows = slice(request.rows.start + first, request.rows.start + stop)
                groups.append((rows, attend(query[rows], key[columns], value[columns], self.scaling)))
            first = max(first, stop)
        return groups

    def _select(self, query: torch.Tensor, key: torch.Tensor, encoding: Encoding) -> list[torch.Tensor]:
        """Kept token indices (1-D long, within each image's real tokens), one tensor per image of a request.

        Each image is scored by the rows of its span (a softmax over the tokens of all of the request's images, as
        its rows attend) and selected as one row of the `ImageTokens` batch.
        """
        state = self.trim_state
        images, width = len(encoding.real_tiles), encoding.features.shape[1]
        lengths, starts = encoding.lengths, encoding.starts
        valid = torch.zeros(images, width, dtype=torch.bool, device=key.device)
        for image, length in enumerate(lengths):
            valid[image, :length] = True

        def scores(reduce: str, last_row_only: bool = False) -> torch.Tensor:
            # per image: (1, local heads, real tokens of all images) -> every rank's heads -> its own columns
            per_image = key.new_zeros((images, self.num_heads, width), dtype=torch.float32)
            for image, ((first, stop), start, length) in enumerate(zip(encoding.spans, starts, lengths)):
                rows = torch.zeros(query.shape[0], dtype=torch.bool, device=key.device)
                rows[stop - 1 if last_row_only else first : stop] = True
                local = head_attention(
                    query.movedim(0, 1).unsqueeze(0),
                    key.movedim(0, 1).unsqueeze(0),
                    key.new_zeros((1, 1, query.shape[0], key.shape[0])),
                    rows.unsqueeze(0),
                    self.scaling,
                    reduce,
                )
                if get_tensor_model_parallel_world_size() > 1:
                    local = tensor_model_parallel_all_gather(local.contiguous(), dim=1)
                per_image[image, :, :length] = local[0, :, start : start + length]
            return per_image

        tokens = ImageTokens(
            features=encoding.features,
            valid=valid,
            layout=(1, width // state.patches, state.patches),
            attention=lambda reduce, query_rows: scores(reduce),  # the spans follow the method's query_rows
            last_row_attention=lambda: scores("sum", last_row_only=True),
        )
        keep = state.method.select(tokens)
        mllama_facts.check_keep_mask(state.method, keep, valid)
        kept = []
        for image, length in enumerate(lengths):
            indices = keep[image].nonzero().flatten().cpu()
            expected = image_tokens(state.method, length, width)
            if len(indices) != expected or (indices >= length).any():
                raise ShapeMismatchError(
                    f"{state.method.label()} kept {len(indices)} tokens of an image with {length} real tokens; "
                    f"the engine reserved room for {expected}"
                )
            kept.append(indices)
        return kept

    # -- the image pool ------------------------------------------------------------------------------

    def _attend_packed(self, query, keys, values, plan: EnginePlan) -> torch.Tensor:
        """Write the encoded requests' kept K/V into their image blocks, read the others' from the pool, and attend
        every request's rows to its block's tokens. Rows of requests without an image get 0 (masked out anyway)."""
        state = self.trim_state
        pool = get_token_to_kv_pool()
        cross_index = state.layout.cross_layers.index(self.layer_id)
        output = query.new_zeros(query.shape)
        offset = 0
        for request in plan.requests:
            slot, layer = state.layout.rows(request.tokens, cross_index)
            slot = request.slots[slot.to(request.slots.device)]
            if request.encoding is not None:
                key, value = keys[offset : offset + request.tokens], values[offset : offset + request.tokens]
                offset += request.tokens
                for pool_layer in layer.unique().tolist():
                    chosen = (layer == pool_layer).to(key.device)
                    pool.set_kv_buffer(self.attn, slot[chosen], key[chosen], value[chosen], layer_id_override=pool_layer)
            else:
                key = query.new_empty((request.tokens, self.num_local_key_value_heads, self.head_dim))
                value = torch.empty_like(key)
                for pool_layer in layer.unique().tolist():
                    chosen = (layer == pool_layer).to(key.device)
                    key[chosen] = pool.get_key_buffer(pool_layer)[slot[chosen]].to(key.dtype)
                    value[chosen] = pool.get_value_buffer(pool_layer)[slot[chosen]].to(value.dtype)
            output[request.rows] = attend(query[request.rows], key, value, self.scaling)
        return output


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """(rows, heads, head_dim) attention of one request's rows (rows, heads, head_dim) over image tokens
    (tokens, kv_heads, head_dim), as SGLang's torch_native backend computes it (GQA inside SDPA)."""
    attended = F.scaled_dot_product_attention(
        query.movedim(0, 1).unsqueeze(0),
        key.movedim(0, 1).unsqueeze(0).to(query.dtype),
        value.movedim(0, 1).unsqueeze(0).to(query.dtype),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return attended.squeeze(0).movedim(0, 1)


def check_pool(pool, layout: PoolLayout) -> None:
    """The image pool writes into every layer's rows of an image's slots: refuse a pool that is not SGLang's plain
    per-layer MHA pool over every decoder layer (a layout this override was not written for)."""
    problems = []
    if type(pool) is not MHATokenToKVPool:
        problems.append(f"its KV pool is {type(pool).__name__}, not MHATokenToKVPool")
    elif pool.is_quantized_kv_cache:
        problems.append("its KV cache is quantized")
    elif (pool.start_layer, pool.layer_num) != (0, layout.layers):
        problems.append(f"its pool holds layers {pool.start_layer}..{pool.start_layer + pool.layer_num - 1} of {layout.layers}")
    if problems:
        raise UnsupportedModelError(
            f"trimllama's image pool needs SGLang's plain KV pool over all {layout.layers} decoder layers, but "
            f"{'; '.join(problems)}: run `trimllama sglang --shared-pool` (SGLang's own layout)"
        )


class MllamaForConditionalGeneration(mllama.MllamaForConditionalGeneration):
    """SGLang's Mllama with trimllama's selection and pool layout (`EngineSettings.from_environment()`)."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.settings = EngineSettings.from_environment()
        method = self.settings.build()
        cross_layers = mllama_facts.cross_attention_layers(config.text_config)
        if method is not None:
            mllama_facts.scoring_and_trimmed_layers(config.text_config)  # refuses a model with nothing to trim
        layout = PoolLayout(
            layers=int(config.text_config.num_hidden_layers),
            cross_layers=tuple(cross_layers),
            packed=self.settings.layout == "image_pool",
        )
        self.trim_state = TrimState(method, layout, mllama_facts.tokens_per_tile(config.vision_config))
        self.image_token_id = mllama_facts.image_token_id(config)
        self.turn_opener = self._assistant_opener(method)
        self.kept_dump = os.environ.get(KEPT_DUMP_VARIABLE) or None  # decided once: a test's record of kept indices
        for index in cross_layers:
            attention = self.language_model.model.layers[index].cross_attn
            attention.__class__ = TrimmedCrossAttention  # this instance's layers only
            attention.trim_state = self.trim_state
        logger.info("trimllama: %s", self.describe())

    def describe(self) -> str:
        """One line: the method, the layout and what an image token costs (the start-up log)."""
        state = self.trim_state
        layout = state.layout
        method = state.method.label() if state.method is not None else "none (every image token kept)"
        largest = state.patches * self.max_num_tiles
        cost = (
            f"image pool: an image token takes {len(layout.cross_layers)} of a slot's {layout.layers} layer rows"
            if layout.packed
            else "shared pool: an image token takes a whole slot"
        )
        note = ""
        if state.method is not None and state.method.budget >= largest:
            note = f"; budget {state.method.budget} >= every image's {largest} tokens: nothing is trimmed"
        return f"serving Mllama with {method}, scoring rows {scored_rows(state.method)}; {cost}{note}"

    @staticmethod
    def _assistant_opener(method: SelectionMethod | None) -> torch.Tensor:
        """The chat template's assistant-turn marker, when the method scores `image_turn` rows (else empty)."""
        if method is None or scored_rows(method) != "image_turn":
            return torch.zeros(0, dtype=torch.long)
        from sglang.srt.runtime_context import get_server_args
        from transformers import AutoTokenizer

        args = get_server_args()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
        return torch.tensor(assistant_turn_opener(tokenizer), dtype=torch.long)

    # -- the scheduler side: slots and pad ids -------------------------------------------------------

    def image_block(self, mm_inputs: MultimodalInputs) -> tuple[list[int], int]:
        """(real tiles of each image, image tokens of the request's block) from its aspect-ratio mask."""
        mask = mm_inputs.mm_items[0].model_specific_data["aspect_ratio_mask"]  # (1, images, max_tiles)
        patches = self.trim_state.patches
        tiles = mllama_facts.real_tiles(mask[0]).tolist()
        tokens = sum(image_tokens(self.trim_state.method, real * patches, mask.shape[-1] * patches) for real in tiles)
        return tiles, tokens

    def pad_input_ids(self, input_ids: array, mm_inputs: MultimodalInputs) -> array:
        if not mm_inputs.mm_items:  # no image reached the model (the processor refuses images without a token)
            return input_ids
        tiles, tokens = self.image_block(mm_inputs)
        slots = self.trim_state.layout.slots(tokens)
        mm_inputs.num_image_tokens = slots
        return array("q", [self.pad_value(input_ids, mm_inputs, len(tiles))]) * slots + input_ids

    def pad_value(self, input_ids: array, mm_inputs: MultimodalInputs, images: int) -> int:
        """A pad id from the images, the settings and the prompt ids that decide the kept set: the radix cache's key
        of the request's image block."""
        digest = hashlib.sha256(b"trimllama-sglang-v2")
        digest.update(self.settings.to_json().encode())
        for item in mm_inputs.mm_items:
            digest.update(int(item.pad_value).to_bytes(8, "big"))
        if self.trim_state.method is not None:
            spans = self.spans(torch.tensor(input_ids, dtype=torch.long))
            if len(spans) != images:
                raise ShapeMismatchError(f"the prompt has {len(spans)} image tokens for {images} images")
            digest.update(array("q", input_ids[: key_length(spans)]).tobytes())
        return MM_PAD_SHIFT_VALUE + (int.from_bytes(digest.digest()[:8], "big") & _PAD_MASK)

    def spans(self, text_ids: torch.Tensor) -> list[tuple[int, int]]:
        """Per image, the prompt rows that score it (`layout.scoring_spans` under the method's rows)."""
        return scoring_spans(text_ids, self.image_token_id, self.turn_opener, scored_rows(self.trim_state.method))

    # -- the forward pass ----------------------------------------------------------------------------

    def _plan(self, input_ids: torch.Tensor, forward_batch: ForwardBatch) -> EnginePlan | None:
        """The requests with images in this forward pass, or None when nothing needs trimllama's path (no image, or
        the shared layout with nothing to encode: SGLang's own attention reads the pool)."""
        lengths = forward_batch.encoder_lens_cpu
        if lengths is None or not any(lengths):
            return None
        decode = forward_batch.forward_mode.is_decode()
        cached = forward_batch.encoder_cached if not decode else [True] * len(lengths)
        layout = self.trim_state.layout
        if not layout.packed and all(cached):
            return None
        extend = [1] * len(lengths) if decode else forward_batch.extend_seq_lens_cpu
        starts = torch.tensor([0, *extend[:-1]]).cumsum(0).tolist()
        # one gather for the batch: the first max(encoder_len) token slots of every request
        block_slots = get_req_to_token_pool().req_to_token[forward_batch.req_pool_indices, : max(lengths)].long()
        requests = []
        for index, (length, mm_inputs) in enumerate(zip(lengths, forward_batch.mm_inputs or [None] * len(lengths))):
            if length == 0:
                continue
            tiles, tokens = self.image_block(mm_inputs)
            if layout.slots(tokens) != length:
                raise ShapeMismatchError(f"a request's image block has {length} slots, expected {layout.slots(tokens)}")
            rows = slice(starts[index], starts[index] + extend[index])
            request = RequestImages(rows=rows, slots=block_slots[index, :length], tokens=tokens)
            if not cached[index]:
                text_ids = input_ids[rows].cpu()
                request.encoding = Encoding(real_tiles=tiles, spans=self.spans(text_ids), patches=self.trim_state.patches)
            requests.append(request)
        return EnginePlan(requests)

    def flat_encoder_result(self, cross_attention_states: torch.Tensor, encoder_lens_need: list[int]) -> torch.Tensor:
        """Hands each encoded request its images' features (images, max_tiles x patches, hidden); the
        cross-attention layers read them from the plan."""
        encoded = self.trim_state.plan.encoded
        images = max(len(r.encoding.real_tiles) for r in encoded)
        for request, states in zip(encoded, cross_attention_states):
            request.encoding.features = states.view(images, -1, states.shape[-1])[: len(request.encoding.real_tiles)]
        return cross_attention_states

    def get_full_text_row_masked_out_mask(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """(rows, 1) bool: the rows of requests with an image, each request counted by its extend length."""
        if forward_batch.forward_mode.is_decode():
            return super().get_full_text_row_masked_out_mask(forward_batch)
        has_image = torch.tensor([length != 0 for length in forward_batch.encoder_lens_cpu])
        rows = torch.repeat_interleave(has_image, torch.tensor(forward_batch.extend_seq_lens_cpu))
        return rows.to(forward_batch.seq_lens.device).reshape(-1, 1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch):
        state = self.trim_state
        if state.layout.packed and not state.pool_checked:
            check_pool(get_token_to_kv_pool(), state.layout)
            state.pool_checked = True
        state.plan = self._plan(input_ids, forward_batch)
        try:
            result = super().forward(input_ids, positions, forward_batch)
            if self.kept_dump and state.plan is not None:
                self._dump_kept(state.plan)
            return result
        finally:
            state.plan = None

    def _dump_kept(self, plan: EnginePlan) -> None:
        with open(self.kept_dump, "a") as file:
            for request in plan.encoded:
                record = {"rank": get_tensor_model_parallel_rank(), "kept": [kept.tolist() for kept in request.encoding.kept]}
                file.write(json.dumps(record) + "\n")


EntryClass = MllamaForConditionalGeneration

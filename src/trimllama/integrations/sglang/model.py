"""SGLang's Mllama with trimming: each image reserves and keeps `min(budget, its real tokens)` KV slots.

Loaded by SGLang as an external model package (`SGLANG_EXTERNAL_MODEL_PACKAGE=trimllama.integrations.sglang`):
`EntryClass` keeps the name `MllamaForConditionalGeneration`, so SGLang serves it for Mllama checkpoints.

What changes against SGLang's own class (sglang/srt/models/mllama.py, 0.5.23):

- `pad_input_ids`: an image reserves `min(budget, real tiles x patches)` slots instead of `max_tiles x patches`, so
  the pool, admission control and usage figures see the trimmed size. Its pad ids hash the image AND the prompt:
  the radix cache reuses an image's trimmed K/V only for the same prompt, since the kept set depends on it.
- `flat_encoder_result`: hands the first cross-attention layer every real-tile token of the images being encoded.
- The first cross-attention layer's prefill scores those tokens with `trimllama.selection.head_attention` (the
  scores of all heads gathered across tensor-parallel ranks, so every rank keeps the same tokens), runs the
  method's `select` per image, attends with all tokens, and writes only the kept K/V to the pool. Every later
  cross-attention layer projects only the kept features; decode reads the kept slots only. With SGLang's shared
  cross-attention slots this equals the Hugging Face path with `trim(..., trim_scoring_layer=True)`.
- `get_full_text_row_masked_out_mask`: rows counted per request's extend length (SGLang's own count mixes total
  sequence lengths and encoder lengths, and zeroes an image request's cross-attention when it shares a prefill
  batch with a text-only request that has a cached prefix).

The method `none` keeps SGLang's slots and attention (only the row-mask count is fixed).
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
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.models import mllama

from ...errors import ShapeMismatchError
from ...methods import ImageTokens, SelectionMethod
from ...selection import head_attention
from .settings import KEPT_DUMP_VARIABLE, EngineSettings, reserved_tokens

logger = logging.getLogger(__name__)
_PAD_MASK = (1 << 62) - 1  # pad ids stay below 2**63 (int64 token ids), as SGLang's own


@dataclass
class EncodedRequest:
    """One request whose images are encoded in this prefill.

    Attributes:
        batch_index: its index in the forward batch (extend rows, encoder slots).
        real_tiles: real tiles of each of its images (0 for an image slot it does not use).
        features: (images, tiles * patches, hidden) projected image features, padding tiles included;
            set by `flat_encoder_result` once the vision model has run.
    """

    batch_index: int
    real_tiles: list[int]
    features: torch.Tensor | None = None


@dataclass
class EnginePlan:
    """What one prefill forward pass encodes, shared by the cross-attention layers of that pass."""

    requests: list[EncodedRequest]
    patches: int
    kept_features: torch.Tensor | None = None  # (kept rows of all requests, hidden), set by the scoring layer
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per request, per image: kept token indices


@dataclass
class TrimState:
    """The method and the current plan, shared by the model and its cross-attention layers (not an nn.Module)."""

    method: SelectionMethod
    scoring_layer: int
    plan: EnginePlan | None = None


class TrimmedCrossAttention(mllama.MllamaTextCrossAttention):
    """SGLang's cross-attention layer; in a prefill that encodes images it attends to the kept tokens only.

    The scoring layer (the first cross-attention layer) also selects them; see the module docstring.
    """

    trim_state: TrimState

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cross_attention_states: torch.Tensor | None,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        plan = self.trim_state.plan
        if plan is None or cross_attention_states is None:
            return super().forward(hidden_states, attention_mask, cross_attention_states, forward_batch)
        if self.layer_id != self.trim_state.scoring_layer:
            return super().forward(hidden_states, attention_mask, plan.kept_features, forward_batch)
        return self._score_and_attend(hidden_states, cross_attention_states, forward_batch, plan)

    def _project(self, hidden_states: torch.Tensor, cross_attention_states: torch.Tensor):
        """(rows, heads, head_dim) queries; (tokens, kv_heads, head_dim) keys and values, as SGLang's layer."""
        qkv_dec, _ = self.qkv_proj(hidden_states)
        q = qkv_dec.split([self.q_local_size, self.kv_local_size, self.kv_local_size], dim=-1)[0]
        q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(-1, self.num_local_heads, self.head_dim)
        qkv_enc, _ = self.qkv_proj(cross_attention_states)
        _, k, v = qkv_enc.split([self.q_local_size, self.kv_local_size, self.kv_local_size], dim=-1)
        k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(-1, self.num_local_key_value_heads, self.head_dim)
        v = v.reshape(-1, self.num_local_key_value_heads, self.head_dim)
        return q, k, v

    def _score_and_attend(
        self,
        hidden_states: torch.Tensor,
        cross_attention_states: torch.Tensor,
        forward_batch: ForwardBatch,
        plan: EnginePlan,
    ) -> torch.Tensor:
        q, k, v = self._project(hidden_states, cross_attention_states)
        starts = forward_batch.extend_start_loc.tolist()
        lengths = forward_batch.extend_seq_lens_cpu
        kept_rows, full_outputs, token_offset = [], [], 0
        for request in plan.requests:
            rows = slice(starts[request.batch_index], starts[request.batch_index] + lengths[request.batch_index])
            real = [tiles * plan.patches for tiles in request.real_tiles]
            tokens = slice(token_offset, token_offset + sum(real))
            kept = self._select(q[rows], k[tokens], request, plan)
            plan.kept.append(kept)
            image_offsets = torch.tensor([0, *real[:-1]]).cumsum(0).tolist()
            kept_rows += [index + token_offset + offset for index, offset in zip(kept, image_offsets)]
            if sum(len(indices) for indices in kept) < tokens.stop - tokens.start:
                full_outputs.append((rows, self._attend(q[rows], k[tokens], v[tokens])))
            token_offset = tokens.stop
        kept_index = torch.cat(kept_rows).to(k.device)
        plan.kept_features = cross_attention_states.index_select(0, kept_index)
        # the pool gets the kept K/V; the batch's other requests attend as in SGLang
        output = self.attn(q, k.index_select(0, kept_index), v.index_select(0, kept_index), forward_batch)
        output = output.view(-1, self.num_local_heads, self.head_dim).clone()
        for rows, attended in full_outputs:  # where tokens were dropped, this layer's prefill attends to all
            output[rows] = attended
        out, _ = self.o_proj(output.view(-1, self.num_local_heads * self.head_dim))
        return out

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(rows, heads, head_dim) attention of one request's rows over all of its image tokens."""
        attended = F.scaled_dot_product_attention(
            query.movedim(0, 1).unsqueeze(0),
            key.movedim(0, 1).unsqueeze(0),
            value.movedim(0, 1).unsqueeze(0),
            scale=self.scaling,
            enable_gqa=self.num_local_heads != self.num_local_key_value_heads,
        )
        return attended.squeeze(0).movedim(0, 1)

    def _select(self, query: torch.Tensor, key: torch.Tensor, request: EncodedRequest, plan: EnginePlan) -> list:
        """Kept token indices (1-D long, within each image's real tokens), one tensor per image of `request`.

        The images of a request are scored together (one softmax over all their tokens, as the request's rows
        attend) and selected per image, each image a row of the `ImageTokens` batch.
        """
        method = self.trim_state.method
        images = len(request.real_tiles)
        width = request.features.shape[1]  # tiles * patches of one image, padding tiles included
        valid = torch.zeros(images, width, dtype=torch.bool, device=key.device)
        for image, tiles in enumerate(request.real_tiles):
            valid[image, : tiles * plan.patches] = True

        def scores(rows: torch.Tensor, reduce: str) -> torch.Tensor:
            # (1, local heads, real tokens) -> every rank's heads -> (images, heads, width), zero on padding
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
            per_image = local.new_zeros((images, local.shape[1], width))
            per_image.transpose(0, 1)[:, valid] = local[0]
            return per_image

        every_row = torch.ones(query.shape[0], dtype=torch.bool, device=key.device)
        last_row = torch.zeros_like(every_row)
        last_row[-1] = True
        tokens = ImageTokens(
            features=request.features,
            valid=valid,
            layout=(1, width // plan.patches, plan.patches),
            attention=lambda reduce, query_rows: scores(every_row, reduce),  # query_rows: settings refuse last_turn
            last_row_attention=lambda: scores(last_row, "sum"),
        )
        keep = method.select(tokens)
        if keep.dtype != torch.bool or keep.shape != valid.shape:
            raise ShapeMismatchError(
                f"{type(method).__name__}.select returned {keep.dtype} {tuple(keep.shape)}, expected a bool mask "
                f"of shape {tuple(valid.shape)}"
            )
        kept = []
        for image, tiles in enumerate(request.real_tiles):
            indices = keep[image].nonzero().flatten().cpu()
            expected = reserved_tokens(method, tiles * plan.patches)
            if len(indices) != expected or (indices >= tiles * plan.patches).any():
                raise ShapeMismatchError(
                    f"{method.label()} kept {len(indices)} tokens of an image with {tiles * plan.patches} real "
                    f"tokens; the engine reserved {expected} slots for it"
                )
            kept.append(indices)
        return kept


class MllamaForConditionalGeneration(mllama.MllamaForConditionalGeneration):
    """SGLang's Mllama with trimllama's selection; the method comes from `EngineSettings.from_environment()`."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.settings = EngineSettings.from_environment()
        self.method = self.settings.build()
        self.num_patches = self.vision_model.num_patches
        self.trim_state: TrimState | None = None
        if self.method is not None:
            cross_layers = sorted(int(index) for index in config.text_config.cross_attention_layers)
            self.trim_state = TrimState(method=self.method, scoring_layer=cross_layers[0])
            for index in cross_layers:
                attention = self.language_model.model.layers[index].cross_attn
                attention.__class__ = TrimmedCrossAttention  # this instance's layers only
                attention.trim_state = self.trim_state
        logger.info("trimllama: serving Mllama with %s", self.method.label() if self.method else "method none")

    def real_tiles(self, mm_inputs: MultimodalInputs) -> list[int]:
        """Real tiles of each image of a request, from its aspect-ratio mask (1, images, max_tiles)."""
        mask = mm_inputs.mm_items[0].model_specific_data["aspect_ratio_mask"]
        return [int(tiles) for tiles in mask[0].sum(dim=-1).tolist()]

    def pad_input_ids(self, input_ids: array, mm_inputs: MultimodalInputs) -> array:
        if self.method is None:
            return super().pad_input_ids(input_ids, mm_inputs)
        image_len = sum(reserved_tokens(self.method, tiles * self.num_patches) for tiles in self.real_tiles(mm_inputs))
        mm_inputs.num_image_tokens = image_len
        return array("q", [self.pad_value(input_ids, mm_inputs)]) * image_len + input_ids

    def pad_value(self, input_ids: array, mm_inputs: MultimodalInputs) -> int:
        """A pad id from the images, the prompt and the settings: the radix cache's key of the trimmed K/V."""
        digest = hashlib.sha256(b"trimllama-sglang-v1")
        digest.update(self.settings.to_json().encode())
        for item in mm_inputs.mm_items:
            digest.update(int(item.pad_value).to_bytes(8, "big"))
        digest.update(array("q", input_ids).tobytes())
        return MM_PAD_SHIFT_VALUE + (int.from_bytes(digest.digest()[:8], "big") & _PAD_MASK)

    def _batch_image_inputs(self, forward_batch: ForwardBatch):
        batched = super()._batch_image_inputs(forward_batch)
        if self.trim_state is not None:
            self.trim_state.plan = None
            images, _, aspect_ratio_mask, _ = batched
            if images is not None:
                encoded = [
                    index
                    for index, mm_input in enumerate(forward_batch.mm_inputs)
                    if not forward_batch.encoder_cached[index] and mm_input is not None
                ]
                tiles = aspect_ratio_mask.sum(dim=-1).tolist()  # (requests, images)
                self.trim_state.plan = EnginePlan(
                    requests=[EncodedRequest(index, row) for index, row in zip(encoded, tiles)],
                    patches=self.num_patches,
                )
        return batched

    def flat_encoder_result(self, cross_attention_states: torch.Tensor, encoder_lens_need: list[int]) -> torch.Tensor:
        """(real-tile tokens of the encoded requests, hidden): what the scoring layer selects from."""
        plan = self.trim_state.plan if self.trim_state is not None else None
        if plan is None:
            return super().flat_encoder_result(cross_attention_states, encoder_lens_need)
        rows = []
        for request, states in zip(plan.requests, cross_attention_states):
            request.features = states.view(len(request.real_tiles), -1, states.shape[-1])
            rows += [image[: tiles * plan.patches] for image, tiles in zip(request.features, request.real_tiles)]
        return torch.cat(rows)

    def get_full_text_row_masked_out_mask(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """(rows, 1) bool: the rows of requests with an image, each request counted by its extend length."""
        if forward_batch.forward_mode.is_decode():
            return super().get_full_text_row_masked_out_mask(forward_batch)
        has_image = torch.tensor([length != 0 for length in forward_batch.encoder_lens_cpu])
        rows = torch.repeat_interleave(has_image, torch.tensor(forward_batch.extend_seq_lens_cpu))
        return rows.to(forward_batch.seq_lens.device).reshape(-1, 1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch):
        result = super().forward(input_ids, positions, forward_batch)
        plan = self.trim_state.plan if self.trim_state is not None else None
        dump = os.environ.get(KEPT_DUMP_VARIABLE)
        if plan is not None and dump:
            with open(dump, "a") as file:
                for request, kept in zip(plan.requests, plan.kept):
                    record = {
                        "rank": get_tensor_model_parallel_rank(),
                        "kept": [indices.tolist() for indices in kept],
                    }
                    file.write(json.dumps(record) + "\n")
        return result


EntryClass = MllamaForConditionalGeneration

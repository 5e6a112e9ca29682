"""What to keep: pure tensor functions, scores in, boolean keep-masks out.

Shapes use these names:
    batch        samples in the batch
    heads        query heads of the scoring cross-attention layer
    kv_heads     key/value heads (GQA: heads = kv_heads * groups)
    text_len     text positions of the prefill
    image_tokens flattened image-token axis of one sample: images x tiles x patches

None of these functions knows about a model; they are unit-tested on random tensors.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 256  # text rows whose attention one reduction sums: the summation order of the scores
SCORING_BUFFER_BYTES = 32 * 2**20  # default bound on the transient memory of `head_attention`


def head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    reduce: str = "sum",
    *,
    buffer_bytes: int = SCORING_BUFFER_BYTES,
) -> torch.Tensor:
    """Per-head attention of the text rows over the image tokens, aggregated over rows.

    Computed in chunks of (samples, KV groups, rows) whose buffers fit `buffer_bytes`, so its transient memory
    does not grow with batch size or prompt length. Every chunking multiplies and sums exactly as one chunk of
    ROW_CHUNK rows over the whole batch would (the scores do not depend on `buffer_bytes`), unless one KV
    group's ROW_CHUNK rows of one sample alone exceed the buffer: then fewer rows are summed at a time.

    Args:
        query: (batch, heads, text_len, head_dim), after q_norm.
        key: (batch, kv_heads, image_tokens, head_dim), after k_norm.
        mask: (batch, 1, text_len, image_tokens) additive cross-attention mask.
        rows: (batch, text_len) bool, the rows that take part (rows that see an image).
        scaling: softmax scale of the layer (head_dim ** -0.5).
        reduce: "sum" (total attention mass a token receives) or "max" (its peak over rows).
        buffer_bytes: bound on the buffers of one chunk (logits in the key's dtype and in float32, row sums).

    Returns:
        (batch, heads, image_tokens) float32 scores; 0 for samples without any row. The logits are
        computed in the key's dtype, as the layer's own attention does; mask and softmax in float32.
    """
    batch, heads, text_len, head_dim = query.shape
    kv_heads, image_tokens = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    groups = heads // kv_heads
    row_step, kv_step, batch_step = _chunking(
        batch, kv_heads, groups, text_len, (image_tokens, head_dim), key.dtype, buffer_bytes
    )
    key_t = key.transpose(-1, -2)  # (batch, kv_heads, head_dim, image_tokens), in the model's dtype
    scores = query.new_zeros((batch, heads, image_tokens), dtype=torch.float32)
    for start in range(0, text_len, row_step):
        stop = min(start + row_step, text_len)
        for first in range(0, batch, batch_step):
            samples = slice(first, min(first + batch_step, batch))
            chunk_rows = rows[samples, start:stop]
            if not chunk_rows.any():
                continue
            for kv_first in range(0, kv_heads, kv_step):
                kv = slice(kv_first, min(kv_first + kv_step, kv_heads))
                heads_of_kv = slice(kv.start * groups, kv.stop * groups)
                _score_chunk(
                    scores[samples, heads_of_kv],
                    query[samples, heads_of_kv, start:stop],
                    key_t[samples, kv],
                    mask[samples, :, start:stop],
                    chunk_rows,
                    scaling,
                    reduce,
                )
    return scores


def _chunking(
    batch: int, kv_heads: int, groups: int, text_len: int, shape: tuple[int, int], dtype: torch.dtype, buffer_bytes: int
) -> tuple[int, int, int]:
    """(rows, KV heads, samples) per chunk whose buffers fit `buffer_bytes`.

    A chunk's buffers, per sample: its query heads' logits in the key's dtype and their query copy; below float32,
    one head's float32 logits and row sums (one head at a time); in float32, the row sums of every head. Row sums
    count twice: the reduction may take a buffer of the result's size.
    Chunks cover whole KV groups, so every matmul is (groups * rows, head_dim) x (head_dim, tokens) per sample and
    KV head, as in one chunk over the whole batch.
    """
    image_tokens, head_dim = shape
    item = dtype.itemsize

    def per_sample(rows: int, kv: int) -> int:
        logits = kv * groups * rows * (image_tokens + head_dim) * item
        if dtype == torch.float32:
            return logits + 2 * kv * groups * image_tokens * 4
        return logits + (rows + 2) * image_tokens * 4

    rows = min(ROW_CHUNK, text_len)
    if per_sample(rows, 1) > buffer_bytes:  # one KV group's ROW_CHUNK rows alone are too many: fewer rows
        fixed, per_row = per_sample(0, 1), per_sample(1, 1) - per_sample(0, 1)
        return max(1, (buffer_bytes - fixed) // per_row), 1, 1
    kv_step = max(k for k in range(1, kv_heads + 1) if per_sample(rows, k) <= buffer_bytes)
    return rows, kv_step, max(1, min(batch, buffer_bytes // per_sample(rows, kv_step)))


def _score_chunk(
    scores: torch.Tensor,
    query: torch.Tensor,
    key_t: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    reduce: str,
) -> None:
    """Add one chunk's attention to `scores` (samples, heads, image_tokens) in place.

    query: (samples, heads, rows, head_dim); key_t: (samples, kv_heads, head_dim, image_tokens), the KV heads
    of these query heads; mask: (samples, 1, rows, image_tokens); rows: (samples, rows) bool.
    """
    samples, heads, count, head_dim = query.shape
    kv_heads, image_tokens = key_t.shape[1], key_t.shape[-1]
    # the query heads of one KV group share its keys: stack them as rows of one matmul
    # (samples, kv_heads, heads / kv_heads * rows, head_dim), so the keys are never repeated per head
    q = query.to(key_t.dtype).reshape(samples, kv_heads, heads // kv_heads * count, head_dim)
    logits = torch.matmul(q, key_t).view(samples, heads, count, image_tokens)
    # float32 logits in place; below float32, one head at a time, so that only one head's copy is alive
    step = heads if logits.dtype == torch.float32 else 1
    for head in range(0, heads, step):
        probs = logits[:, head : head + step].float()
        probs.mul_(scaling).add_(mask)
        torch.softmax(probs, dim=-1, out=probs)
        probs.mul_(rows[:, None, :, None])
        if reduce == "sum":
            scores[:, head : head + step] += probs.sum(dim=2)
        else:
            torch.maximum(scores[:, head : head + step], probs.amax(dim=2), out=scores[:, head : head + step])


def visible_tokens(mask: torch.Tensor, rows: torch.Tensor, buffer_bytes: int = SCORING_BUFFER_BYTES) -> torch.Tensor:
    """(batch, image_tokens) bool: the tokens some taking-part row sees (mask 0), a few rows at a time.

    Args:
        mask: (batch, 1, text_len, image_tokens) additive cross-attention mask.
        rows: (batch, text_len) bool, the rows that take part.
        buffer_bytes: bound on the boolean buffers of one step of rows.
    """
    batch, _, text_len, image_tokens = mask.shape
    step = max(1, buffer_bytes // (2 * batch * image_tokens))  # two booleans per entry: mask == 0, and with rows
    visible = torch.zeros((batch, image_tokens), dtype=torch.bool, device=mask.device)
    for start in range(0, text_len, step):
        seen = (mask[:, 0, start : start + step] == 0) & rows[:, start : start + step, None]
        visible |= seen.any(dim=1)
    return visible


def counts_from_setting(setting: int | float, available: torch.Tensor) -> torch.Tensor:
    """Turn an int count or a fraction into a per-sample count, clipped to what is available.

    Args:
        setting: an int >= 0 (tokens) or a float in [0, 1] (fraction of `available`).
        available: (batch,) long, tokens that may be chosen per sample.

    Returns:
        (batch,) long counts; a fraction rounds to nearest and keeps at least one token
        when the fraction is positive and the sample has any token.
    """
    if isinstance(setting, float):
        counts = torch.round(available.double() * setting).long()
        if setting > 0:
            counts = torch.maximum(counts, (available > 0).long())
    else:
        counts = torch.full_like(available, int(setting))
    return torch.minimum(counts, available)


def top_count(priority: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Keep the `counts[b]` valid tokens of highest priority in each row.

    Args:
        priority: (..., image_tokens) float, higher is kept first.
        counts: (...) long, how many to keep per row (at most the row's valid count).
        valid: (..., image_tokens) bool, tokens that may be kept.

    Returns:
        (..., image_tokens) bool keep-mask with exactly `min(counts, valid.sum(-1))` True per row.
    """
    masked = priority.float().masked_fill(~valid, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < counts.unsqueeze(-1)) & valid


def headwise_union(head_scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The paper's rule: each head keeps its top-`counts` tokens, the result is the union over heads.

    Args:
        head_scores: (batch, heads, image_tokens).
        counts: (batch,) long per-head count.
        valid: (batch, image_tokens) bool.

    Returns:
        (batch, image_tokens) bool.
    """
    heads = head_scores.shape[1]
    per_head = top_count(head_scores, counts[:, None].expand(-1, heads), valid[:, None].expand(-1, heads, -1))
    return per_head.any(dim=1)


def fill_to_budget(preferred: torch.Tensor, scores: torch.Tensor, budget: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Exactly `budget` tokens per sample: the preferred set first, each part ordered by `scores`.

    If the preferred set is larger than the budget its best-scored tokens are kept; if smaller, the
    best-scored other valid tokens fill it up.

    Args:
        preferred: (batch, image_tokens) bool, e.g. the head-wise union.
        scores: (batch, image_tokens) aggregated scores (any scale, finite).
        budget: (batch,) long.
        valid: (batch, image_tokens) bool.
    """
    scale = scores.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    priority = scores.float() / scale + 2.0 * preferred.float()  # normalised scores lie in [-1, 1]
    return top_count(priority, budget, valid)


def random_keep(counts: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random subset of `counts[b]` valid tokens per sample.

    Args:
        counts: (batch,) long.
        valid: (batch, image_tokens) bool.
        generator: a seeded CPU generator, so a run is reproducible.
    """
    noise = torch.rand(valid.shape, generator=generator).to(valid.device)
    return top_count(noise, counts, valid)


def keep_to_index(keep: torch.Tensor, min_columns: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a keep-mask into sorted, right-padded gather indices.

    Args:
        keep: (batch, image_tokens) bool.
        min_columns: at least this many columns (at least 1, so a layer never gets zero keys).

    Returns:
        index: (batch, columns) long, kept token indices in ascending order, then padding.
        column_valid: (batch, columns) bool, False on padding columns.
        `columns` is the largest kept count in the batch, or `min_columns` if larger.
    """
    counts = keep.sum(dim=-1)
    columns = max(int(counts.max()) if keep.numel() else 0, min_columns, 1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :columns]
    if order.shape[-1] < columns:  # fewer image tokens than one column
        order = torch.nn.functional.pad(order, (0, columns - order.shape[-1]))
    column_valid = torch.arange(columns, device=keep.device)[None, :] < counts[:, None]
    return order, column_valid


def evenly_spaced(counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`counts[b]` valid tokens per sample at evenly spaced ranks along the token axis (a spatial stride).

    Args:
        counts: (batch,) long.
        valid: (batch, image_tokens) bool.
    """
    available = valid.sum(dim=-1, keepdim=True).double()  # (batch, 1)
    rank = valid.long().cumsum(dim=-1) - 1  # rank of each valid token among the valid ones
    wanted = counts[:, None].double()
    # token of rank r is kept when floor(r * wanted / available) steps to a new value: exactly `wanted` tokens
    step = torch.floor(rank.double() * wanted / available.clamp_min(1))
    previous = torch.floor((rank.double() - 1) * wanted / available.clamp_min(1))
    return valid & ((rank == 0) | (step != previous)) & (wanted > 0)


def per_tile_top(scores: torch.Tensor, setting: int | float, valid: torch.Tensor, patches: int) -> torch.Tensor:
    """Every tile keeps its own share: `setting` (fraction or count) of its valid tokens, by score.

    Args:
        scores: (batch, image_tokens).
        setting: fraction of each tile's valid tokens, or a count per tile.
        valid: (batch, image_tokens) bool.
        patches: tokens per tile.
    """
    batch, tokens = valid.shape
    tiled_valid = valid.view(batch, tokens // patches, patches)
    counts = counts_from_setting(setting, tiled_valid.sum(dim=-1).flatten()).view(batch, -1)
    keep = top_count(scores.view(batch, -1, patches), counts, tiled_valid)
    return keep.view(batch, tokens)


def mass_threshold(head_scores: torch.Tensor, mass: float, valid: torch.Tensor) -> torch.Tensor:
    """Each head keeps the smallest set of tokens holding `mass` of its attention; union over heads.

    Args:
        head_scores: (batch, heads, image_tokens), non-negative.
        mass: in (0, 1].
        valid: (batch, image_tokens) bool.
    """
    scores = head_scores.float().masked_fill(~valid[:, None], 0)
    total = scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    ordered, order = (scores / total).sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the better tokens
    keep_sorted = before < mass  # a token is needed while the mass before it falls short
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.any(dim=1) & valid


def _opener_starts(input_ids: torch.Tensor, opener: torch.Tensor) -> torch.Tensor:
    """(batch, text_len) bool: True where an occurrence of `opener` (marker_len,) starts in `input_ids`."""
    batch, text_len = input_ids.shape
    length = opener.numel()
    starts = torch.zeros(batch, text_len, dtype=torch.bool, device=input_ids.device)
    if 0 < length <= text_len:
        windows = input_ids.unfold(1, length, 1)  # (batch, text_len - length + 1, length)
        starts[:, : windows.shape[1]] = (windows == opener.to(input_ids.device)).all(dim=-1)
    return starts


def _latest(flags: torch.Tensor) -> torch.Tensor:
    """(batch, text_len) long: the position of the latest True at or before each position, -1 before the first."""
    position = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    return torch.where(flags, position, -1).cummax(dim=1).values


def last_turn_rows(input_ids: torch.Tensor, opener: torch.Tensor) -> torch.Tensor:
    """The rows of each sample's last turn: from the last occurrence of `opener` to the end of the prompt.

    Args:
        input_ids: (batch, text_len) long token ids (left padding is fine: it precedes every turn).
        opener: (marker_len,) long, the token ids that open a user message (e.g. Llama 3's
            `<|start_header_id|> user <|end_header_id|>`).

    Returns:
        (batch, text_len) bool; all False for a sample in which `opener` never occurs.
    """
    last = _latest(_opener_starts(input_ids, opener))[:, -1:]  # (batch, 1), -1 where the opener is missing
    rows = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= last
    return rows & (last >= 0)


def image_turn_rows(input_ids: torch.Tensor, image_token_id: int, assistant_opener: torch.Tensor) -> torch.Tensor:
    """The rows of the user message that holds each row's latest image token: they score under `query_rows="image_turn"`.

    A row takes part iff some image token lies at or before it and no assistant-turn opener starts after that
    (latest) image token and at or before the row. Rows before the first image token never take part; the
    generation prompt and later turns do not; a prompt with no opener after its image (raw text) takes part from
    its first image token on. Later turns appended to a conversation never change the rows of earlier ones.

    Args:
        input_ids: (batch, text_len) long token ids (left padding is fine: it holds no image token).
        image_token_id: the id of the `<|image|>` token.
        assistant_opener: (marker_len,) long, the token ids that open an assistant message (e.g. Llama 3's
            `<|start_header_id|> assistant <|end_header_id|>`, from `turns.assistant_turn_opener`); empty: none.

    Returns:
        (batch, text_len) bool, before intersecting with the rows that see an image.
    """
    latest_image = _latest(input_ids == image_token_id)
    latest_opener = _latest(_opener_starts(input_ids, assistant_opener))
    return (latest_image >= 0) & (latest_opener < latest_image)

"""Trimming never costs memory: scoring within a fixed buffer, selections identical to the unbounded scoring.

`reference_head_attention` is the scoring as it was before the buffer (chunks of ROW_CHUNK rows over the whole
batch and every head at once): the bounded scoring must give the same scores bit for bit wherever it sums the same
rows at a time, and the same kept sets where a tiny buffer makes it sum fewer rows at a time.
Peaks are measured with torch's profiler (`profile_memory=True`), as the benchmark does.
"""

from __future__ import annotations

import pytest
import torch

import trimllama
from trimllama import testbed
from trimllama.adapters import mllama as mllama_adapter
from trimllama.bench.memory import PeakMemory
from trimllama.bench.model import ModelShape, build_model, make_inputs
from trimllama.selection import ROW_CHUNK, SCORING_BUFFER_BYTES, head_attention, headwise_union
from trimllama.testing import tiny_mllama

MIB = 2**20
CPU = torch.device("cpu")


def reference_head_attention(query, key, mask, rows, scaling, reduce="sum"):
    """The unbounded scoring: (batch, heads, ROW_CHUNK rows, image_tokens) buffers, a new one per step."""
    batch, heads, text_len, head_dim = query.shape
    kv_heads, image_tokens = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    key_t = key.transpose(-1, -2)
    scores = query.new_zeros((batch, heads, image_tokens), dtype=torch.float32)
    for start in range(0, text_len, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, text_len)
        chunk_rows = rows[:, start:stop]
        if not chunk_rows.any():
            continue
        q = query[:, :, start:stop].to(key.dtype).reshape(batch, kv_heads, groups * (stop - start), head_dim)
        logits = torch.matmul(q, key_t).float().view(batch, heads, stop - start, image_tokens)
        logits = logits * scaling + mask[:, :, start:stop].float()
        probs = logits.softmax(dim=-1) * chunk_rows[:, None, :, None]
        if reduce == "sum":
            scores += probs.sum(dim=2)
        else:
            scores = torch.maximum(scores, probs.amax(dim=2))
    return scores


def random_scoring_inputs(batch, heads, kv_heads, text_len, tokens, head_dim, dtype, seed):
    """Query, key, additive mask (padding columns, blind rows) and taking-part rows, as the adapter passes them."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, text_len, head_dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, tokens, head_dim, generator=generator).to(dtype)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(batch, 1, text_len, tokens, dtype=dtype)
    mask[0, :, :, tokens // 2 :] = lowest  # padding tiles of sample 0
    mask[:, :, 0] = lowest  # the row before the image sees nothing
    rows = torch.rand(batch, text_len, generator=generator) > 0.3
    rows[:, 0] = False
    if batch > 1:
        rows[-1] = False  # a text-only sample
    return query, key, mask, rows


# (batch, heads, kv_heads, text_len, image_tokens, head_dim): GQA and MHA, one and several row chunks
SHAPES = [(3, 8, 2, 300, 401, 16), (2, 32, 8, 520, 401, 8), (5, 4, 4, 70, 99, 32), (1, 6, 3, 513, 50, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_bounded_scores_equal_the_unbounded_scores_bit_for_bit(dtype, shape, reduce):
    batch, heads, kv_heads, text_len, tokens, head_dim = shape
    query, key, mask, rows = random_scoring_inputs(*shape, dtype, seed=sum(shape))
    expected = reference_head_attention(query, key, mask, rows, 0.3, reduce)
    groups, item = heads // kv_heads, dtype.itemsize
    one_group = groups * min(ROW_CHUNK, text_len) * (tokens + head_dim) * item + (ROW_CHUNK + 2) * tokens * 4
    # one KV group of one sample per chunk, then a few, then the default, then everything at once
    for buffer in (one_group, 3 * one_group, SCORING_BUFFER_BYTES, 2**34):
        scores = head_attention(query, key, mask, rows, 0.3, reduce, buffer_bytes=buffer)
        assert torch.equal(scores, expected), (buffer, (scores - expected).abs().max())
    assert torch.equal(head_attention(query, key, mask, rows, 0.3, reduce), expected)  # positional signature


@pytest.mark.parametrize("seed", range(12))
def test_a_buffer_below_one_group_of_rows_keeps_the_same_sets(seed):
    """Below one KV group x ROW_CHUNK rows, rows are summed in smaller steps: float sums may differ in the last
    bit, the kept sets do not."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads = [(2, 8, 2), (3, 32, 8), (1, 4, 4)][seed % 3]
    text_len = int(torch.randint(ROW_CHUNK + 1, 3 * ROW_CHUNK, (1,), generator=generator))
    query, key, mask, rows = random_scoring_inputs(batch, heads, kv_heads, text_len, 401, 16, torch.float32, seed)
    valid = (mask[:, 0] == 0).any(dim=1)
    expected = reference_head_attention(query, key, mask, rows, 0.25)
    scores = head_attention(query, key, mask, rows, 0.25, buffer_bytes=2**17)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    for count in (1, 40, 100, 200):
        counts = torch.full((batch,), count)
        assert torch.equal(headwise_union(scores, counts, valid), headwise_union(expected, counts, valid))


def transient_peak(function, *args, **kwargs) -> int:
    """Largest increase of live CPU tensor bytes while `function` runs, less its result."""
    with PeakMemory(CPU) as memory:
        result = function(*args, **kwargs)
    return memory.peak_bytes - result.nbytes


@pytest.mark.parametrize("buffer", [None, 4 * MIB])
def test_scoring_memory_stays_within_the_buffer_at_any_batch_and_prompt_length(buffer):
    """At batch 1 and 6, prompts of 40 and 520 rows: the unbounded scoring would hold up to ~0.3 GiB here."""
    bound = SCORING_BUFFER_BYTES if buffer is None else buffer
    setting = {} if buffer is None else {"buffer_bytes": buffer}
    for batch in (1, 6):
        for text_len in (40, 520):
            query, key, mask, rows = random_scoring_inputs(batch, 32, 8, text_len, 802, 16, torch.float32, seed=batch)
            peak = transient_peak(head_attention, query, key, mask, rows, 0.25, **setting)
            assert peak <= bound, (batch, text_len, peak / MIB)
            peak = transient_peak(mllama_adapter._last_row_attention, query, key, mask, rows, 0.25, **setting)
            assert peak <= bound + query[:, :, :1].nbytes + mask[:, :, :1].nbytes, (batch, text_len, peak / MIB)


# ------------------------------------------------------------------ the whole prefill, public API only

# Llama-3.2-11B-Vision's head layout (32 query heads, 8 KV heads) at a small width; 4 tiles x 401 image tokens
SMALL_11B_LAYOUT = ModelShape(
    hidden_size=256,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=512,
    num_layers=10,  # cross-attention at layers 3 and 8
    vocab_size=256,
    image_size=80,
    patch_size=4,
)


@pytest.fixture(scope="module")
def bench_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_model(SMALL_11B_LAYOUT, CPU, torch.float32, share_weights=False, seed=0)  # gates open (1.0)
    finally:
        torch.set_num_threads(threads)


def prefill_peak(model, inputs) -> tuple[int, torch.Tensor]:
    with torch.inference_mode(), PeakMemory(CPU) as memory:
        logits = model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            cross_attention_states=inputs.cross_attention_states,
            cross_attention_mask=inputs.cross_attention_mask,
            use_cache=True,
            logits_to_keep=1,
        ).logits
    return memory.peak_bytes, logits


@pytest.mark.parametrize("batch, prompt", [(4, 300), (8, 600)])
def test_trimmed_prefill_costs_at_most_a_tenth_of_a_gib_more_than_untrimmed(bench_model, batch, prompt):
    assert SMALL_11B_LAYOUT.tokens_per_tile == 401 and SMALL_11B_LAYOUT.tokens_per_image == 1604
    inputs = make_inputs(bench_model, batch, prompt, seed=batch)
    untrimmed, untrimmed_logits = prefill_peak(bench_model.model, inputs)
    with trimllama.trim(bench_model.model, trimllama.HeadwiseTopK(budget=401)) as handle:
        trimmed, trimmed_logits = prefill_peak(bench_model.model, inputs)
    assert handle.stats.image_tokens_after == [401] * batch
    assert not torch.allclose(trimmed_logits, untrimmed_logits)  # the later layers' gates are open: trimming shows
    assert trimmed - untrimmed <= 0.1 * 2**30, (untrimmed / MIB, trimmed / MIB)


def test_image_turn_with_a_compacted_scoring_layer_costs_at_most_a_tenth_of_a_gib_more(bench_model):
    """query_rows="image_turn" with trim_scoring_layer: the scoring layer gets its own copy of the mask, whose rows
    past the image's message lose the dropped columns; an assistant turn opens halfway through every prompt."""
    inputs = make_inputs(bench_model, 8, 600, seed=8)
    opener = (7, 8)
    inputs.input_ids[:, 300:302] = torch.tensor(opener)
    assert not (inputs.input_ids[:, 2:] == bench_model.model.config.image_token_index).any()
    untrimmed, _ = prefill_peak(bench_model.model, inputs)
    method = trimllama.HeadwiseTopK(budget=401, query_rows="image_turn")
    logits = {}
    for compacted in (False, True):
        adapter = mllama_adapter.MllamaAdapter(
            bench_model.model, method, trim_scoring_layer=compacted, turn_markers={"image_turn": opener}
        )
        with adapter:
            peak, logits[compacted] = prefill_peak(bench_model.model, inputs)
        assert adapter.stats.image_tokens_after == [401] * 8
    assert not torch.allclose(logits[True], logits[False])  # the rows past the message see only the kept tokens
    assert peak - untrimmed <= 0.1 * 2**30, (untrimmed / MIB, peak / MIB)


def test_the_shipped_testbed_keeps_what_the_unbounded_scoring_keeps(monkeypatch):
    if not (testbed.CHECKPOINT_DIR / "model.safetensors").exists():
        pytest.skip(f"testbed checkpoint missing in {testbed.CHECKPOINT_DIR}")
    model, processor = testbed.load_testbed()
    questions = testbed.make_questions(8, seed=5)
    inputs = processor(
        images=[[q.image] for q in questions],
        text=[testbed.build_prompt(processor, q.question) for q in questions],
        return_tensors="pt",
        padding=True,
    )
    kept = {}
    for name, buffer in (("bounded", SCORING_BUFFER_BYTES), ("small", 2**20), ("reference", None)):
        if buffer is None:
            unbounded = lambda *args, buffer_bytes: reference_head_attention(*args)  # noqa: E731
            monkeypatch.setattr(mllama_adapter, "head_attention", unbounded)
            buffer = SCORING_BUFFER_BYTES
        method = trimllama.HeadwiseTopK(head_k=0.1)
        with torch.no_grad(), trimllama.trim(model, method, scoring_buffer_bytes=buffer) as handle:
            model(**inputs)
        kept[name] = handle.kept
    for name in ("bounded", "small"):
        assert all(torch.equal(a, b) for a, b in zip(kept[name], kept["reference"])), name


@pytest.mark.parametrize("value", [2**20 - 1, 0, -5, 2.0**21, True, "32MiB", None])
def test_scoring_buffer_setting_is_checked(value):
    model = tiny_mllama(seed=0)
    with pytest.raises(trimllama.InvalidSettingError, match="scoring_buffer_bytes"):
        trimllama.trim(model, "headwise_topk", scoring_buffer_bytes=value)
    assert not hasattr(model, "_trimllama_handle")

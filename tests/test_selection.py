"""The pure selection functions, on random tensors (no model)."""

import pytest
import torch

from trimllama.selection import (
    counts_from_setting,
    fill_to_budget,
    head_attention,
    headwise_union,
    keep_to_index,
    random_keep,
    top_count,
)


def test_top_count_keeps_exactly_the_best_valid_tokens():
    priority = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]])
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    keep = top_count(priority, torch.tensor([2, 1]), valid)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, False]]


def test_headwise_union_is_the_union_of_each_heads_top_k():
    scores = torch.tensor([[[9.0, 1, 2, 3, 0], [0.0, 1, 2, 3, 9]]])  # (batch 1, heads 2, tokens 5)
    valid = torch.ones(1, 5, dtype=torch.bool)
    keep = headwise_union(scores, torch.tensor([1]), valid)
    assert keep.tolist() == [[True, False, False, False, True]]
    keep = headwise_union(scores, torch.tensor([2]), valid)
    assert keep.tolist() == [[True, False, False, True, True]]


def test_padding_tokens_are_never_selected_even_with_the_highest_scores():
    scores = torch.rand(2, 4, 10)
    scores[:, :, 7:] = 100.0
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, 7:] = False
    keep = headwise_union(scores, torch.tensor([10, 3]), valid)
    assert not keep[:, 7:].any()
    assert keep[0].sum() == 7


def test_counts_from_fraction_and_int():
    available = torch.tensor([100, 10, 0])
    assert counts_from_setting(0.25, available).tolist() == [25, 2, 0]
    assert counts_from_setting(0.01, available).tolist() == [1, 1, 0]
    assert counts_from_setting(50, available).tolist() == [50, 10, 0]


def test_fill_to_budget_prefers_the_union_then_fills_by_score():
    preferred = torch.tensor([[True, False, False, True, False]])
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert fill_to_budget(preferred, scores, torch.tensor([1]), valid).tolist() == [[False, False, False, True, False]]
    assert fill_to_budget(preferred, scores, torch.tensor([3]), valid).tolist() == [[True, True, False, True, False]]


def test_random_keep_is_seeded_and_counts_are_exact():
    valid = torch.ones(3, 50, dtype=torch.bool)
    counts = torch.tensor([5, 10, 50])
    first = random_keep(counts, valid, torch.Generator().manual_seed(3))
    again = random_keep(counts, valid, torch.Generator().manual_seed(3))
    other = random_keep(counts, valid, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.sum(-1).tolist() == [5, 10, 50]


def test_keep_to_index_is_sorted_and_padded():
    keep = torch.tensor([[False, True, False, True], [True, False, False, False], [False] * 4])
    index, column_valid = keep_to_index(keep)
    assert index.shape == (3, 2)
    assert index[0].tolist() == [1, 3] and index[1, 0] == 0
    assert column_valid.tolist() == [[True, True], [True, False], [False, False]]


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_head_attention_matches_a_direct_softmax(reduce):
    torch.manual_seed(0)
    batch, heads, kv_heads, text_len, tokens, dim = 2, 4, 2, 300, 7, 8  # more rows than one chunk
    query = torch.randn(batch, heads, text_len, dim)
    key = torch.randn(batch, kv_heads, tokens, dim)
    mask = torch.zeros(batch, 1, text_len, tokens)
    mask[0, :, :, 5:] = torch.finfo(torch.float32).min
    rows = torch.rand(batch, text_len) > 0.3
    scores = head_attention(query, key, mask, rows, 0.5, reduce)
    key_per_head = key.repeat_interleave(heads // kv_heads, dim=1)
    probs = ((query @ key_per_head.transpose(-1, -2)) * 0.5 + mask).softmax(-1) * rows[:, None, :, None]
    expected = probs.sum(2) if reduce == "sum" else probs.amax(2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores[0, :, 5:].abs().max() < 1e-6

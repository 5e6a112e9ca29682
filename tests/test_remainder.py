"""MergeRemainder: one remainder token per tile, equal to its oracle on the untrimmed model."""

import pytest
import torch

import trimllama
from trimllama.testing import SampleSpec, synthetic_batch, tiny_mllama

from oracle import generated_step_logits, keep_mask_from_indices, masked_layers, teacher_forced_logits

SPECS = [
    SampleSpec(tiles=(4, 1), left_pad=0, text_before=2, text_between=3, text_after=4),
    SampleSpec(tiles=(1,), left_pad=3, text_before=1, text_after=5),
]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_mllama(seed=0, attn_implementation=request.param)


@pytest.fixture(scope="module")
def batch(model):
    return synthetic_batch(model, SPECS, seed=1)


def image_features(model, batch) -> torch.Tensor:
    """(batch, image_tokens, hidden): the features the first cross-attention layer receives, untrimmed."""
    captured = {}
    first = model.model.language_model.layers[sorted(model.model.language_model.cross_attention_layers)[0]]

    def hook(module, args, kwargs):
        captured["states"] = kwargs["cross_attention_states"]

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return captured["states"].reshape(batch["input_ids"].shape[0], -1, captured["states"].shape[-1])


def reference_remainders(features, keep, batch, patches):
    """Per tile: the mean of the dropped features of real, seen tiles, bias log(n), source = tile's first token."""
    size, tokens, hidden = features.shape
    seen_tile = batch["cross_attention_mask"].amax(dim=1).reshape(size, -1).bool()  # (batch, images * tiles)
    tiles = seen_tile.shape[1]
    remainder = torch.zeros(size, tiles, hidden)
    bias = torch.full((size, tiles), float("-inf"))
    for b in range(size):
        for t in range(tiles):
            block = slice(t * patches, (t + 1) * patches)
            dropped = ~keep[b, block] & seen_tile[b, t]
            if dropped.any():
                remainder[b, t] = features[b, block][dropped].mean(dim=0)
                bias[b, t] = torch.log(dropped.sum().float())
    source = (torch.arange(tiles) * patches).expand(size, -1)
    return remainder, bias, source


@pytest.mark.parametrize(
    "inner", [trimllama.HeadwiseTopK(head_k=0.1), trimllama.RandomSelect(ratio=0.2, seed=1)], ids=lambda m: m.name
)
@torch.no_grad()
def test_remainder_equals_its_masking_oracle_at_every_step(model, batch, inner):
    with trimllama.trim(model, trimllama.MergeRemainder(inner)) as handle:
        sequences, step_logits = generated_step_logits(model, batch, 5)
        kept, stats = handle.kept, handle.stats
    with trimllama.trim(model, inner) as plain:
        model(**batch)
    assert all(torch.equal(a, b) for a, b in zip(kept, plain.kept)), "kept indices are the wrapped method's"

    patches = model.model.vision_model.num_patches
    features = image_features(model, batch)
    keep = keep_mask_from_indices(kept, features.shape[1])
    remainder, bias, source = reference_remainders(features, keep, batch, patches)
    assert stats.extra_tokens == torch.isfinite(bias).sum(dim=1).tolist() == [5, 1]
    with masked_layers(model, keep, extra_features=remainder, extra_bias=bias, extra_source=source):
        expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_remainder_cache_holds_kept_plus_one_token_per_tile(model, batch):
    method = trimllama.MergeRemainder(trimllama.HeadwiseTopK(budget=10))
    with trimllama.trim(model, method) as handle:
        cache = model(**batch, use_cache=True).past_key_values
    first, *later = sorted(model.model.language_model.cross_attention_layers)
    tiles = batch["cross_attention_mask"].shape[2] * batch["cross_attention_mask"].shape[3]
    for index in later:
        assert cache.layers[index].keys.shape[2] == 10 + tiles
    assert handle.stats.cross_kv_bytes_after == sum(
        cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in [first, *later]
    )


@torch.no_grad()
def test_remainder_of_keep_all_changes_nothing(model, batch):
    reference = model(**batch).logits
    with trimllama.trim(model, trimllama.MergeRemainder(trimllama.KeepAll())) as handle:
        logits = model(**batch).logits
    assert handle.stats.extra_tokens == [0, 0]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_merge_remainder_wraps_only_methods():
    with pytest.raises(trimllama.InvalidSettingError, match="wraps a selection method instance"):
        trimllama.MergeRemainder("headwise_topk")
    assert trimllama.METHODS["merge_remainder"] is trimllama.MergeRemainder

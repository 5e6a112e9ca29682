"""Core behaviour on tiny random Mllama models: exactness, the masking oracle, batches, bytes, removal."""

import pytest
import torch

import trimllama
from trimllama.testing import SampleSpec, select_sample, synthetic_batch, tiny_mllama

from oracle import generated_step_logits, keep_mask_from_indices, masked_layers, teacher_forced_logits

BACKENDS = ["eager", "sdpa"]
# 2 images (4 and 1 tiles), a left-padded 2-tile sample, a 1-tile sample: padding tiles everywhere.
SPECS = [
    SampleSpec(tiles=(4, 1), left_pad=0, text_before=2, text_between=3, text_after=4),
    SampleSpec(tiles=(2,), left_pad=4, text_before=1, text_after=5),
    SampleSpec(tiles=(1,), left_pad=2, text_before=0, text_after=6),
]
NEW_TOKENS = 5


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return tiny_mllama(seed=0, attn_implementation=request.param)


@pytest.fixture(scope="module")
def batch(model):
    return synthetic_batch(model, SPECS, seed=1)


def num_image_tokens(model, batch) -> int:
    _, images, tiles = batch["aspect_ratio_mask"].shape[:1] + batch["aspect_ratio_mask"].shape[1:]
    return images * tiles * model.model.vision_model.num_patches


@torch.no_grad()
def test_keep_all_reproduces_the_untrimmed_model_bit_for_bit(model, batch):
    logits = model(**batch).logits
    sequences, step_logits = generated_step_logits(model, batch, NEW_TOKENS)
    with trimllama.trim(model, trimllama.KeepAll()) as handle:
        trimmed_logits = model(**batch).logits
        trimmed_sequences, trimmed_step_logits = generated_step_logits(model, batch, NEW_TOKENS)
    assert torch.equal(logits, trimmed_logits)
    assert torch.equal(sequences, trimmed_sequences)
    assert torch.equal(step_logits, trimmed_step_logits)
    assert handle.stats.cross_kv_bytes_after == handle.stats.cross_kv_bytes_before


METHODS_UNDER_ORACLE = [
    trimllama.HeadwiseTopK(head_k=0.1),
    trimllama.HeadwiseTopK(head_k=3),
    trimllama.HeadwiseTopK(head_k=0.25, budget=12),
    trimllama.RandomSelect(ratio=0.3, seed=5),
]


@pytest.mark.parametrize("method", METHODS_UNDER_ORACLE, ids=lambda m: m.label())
@pytest.mark.parametrize("trim_scoring_layer", [False, True])
@torch.no_grad()
def test_trimmed_generation_equals_the_masking_oracle_at_every_step(model, batch, method, trim_scoring_layer):
    with trimllama.trim(model, method, trim_scoring_layer=trim_scoring_layer) as handle:
        sequences, step_logits = generated_step_logits(model, batch, NEW_TOKENS)
        kept = handle.kept
    keep = keep_mask_from_indices(kept, num_image_tokens(model, batch))
    assert all(k.numel() < num_image_tokens(model, batch) for k in kept)
    with masked_layers(model, keep):
        if trim_scoring_layer:
            # the first layer scores on the full prefill, then decodes over the kept columns only
            first = sorted(model.model.language_model.cross_attention_layers)[:1]
            with masked_layers(model, keep, layers=first, decode_only=True):
                expected = stepwise_logits(model, batch, sequences)
        else:
            expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)


def stepwise_logits(model, batch, sequences):
    """(batch, steps, vocab): a cached prefill, then one decode step per generated token."""
    prompt_len = batch["input_ids"].shape[1]
    out = model(**batch, use_cache=True)
    cache, logits, attention_mask = out.past_key_values, [out.logits[:, -1]], batch["attention_mask"]
    for step in range(sequences.shape[1] - prompt_len - 1):
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=sequences[:, prompt_len + step : prompt_len + step + 1],
            attention_mask=attention_mask,
            cross_attention_mask=batch["cross_attention_mask"][:, -1:],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


@torch.no_grad()
def test_batch_results_equal_per_sample_results(model, batch):
    method = trimllama.HeadwiseTopK(head_k=0.15)
    with trimllama.trim(model, method) as handle:
        _, batch_logits = generated_step_logits(model, batch, NEW_TOKENS)
        batch_kept = handle.kept
        counts = [k.numel() for k in batch_kept]
        for index in range(len(SPECS)):
            _, alone_logits = generated_step_logits(model, select_sample(batch, index), NEW_TOKENS)
            assert torch.equal(handle.kept[0], batch_kept[index])
            torch.testing.assert_close(batch_logits[index : index + 1], alone_logits, rtol=0, atol=1e-4)
    assert len(set(counts)) > 1, "the batch should mix different kept counts"


@torch.no_grad()
def test_padding_tiles_are_never_kept(model, batch):
    patches = model.model.vision_model.num_patches
    tile_of_token = torch.arange(num_image_tokens(model, batch)) // patches  # flattened (image, tile)
    real_tile = batch["aspect_ratio_mask"].reshape(len(SPECS), -1).bool()
    for method in [trimllama.HeadwiseTopK(head_k=1.0), trimllama.RandomSelect(ratio=1.0), trimllama.HeadwiseTopK(budget=17)]:
        with trimllama.trim(model, method) as handle:
            model(**batch)
        for sample, kept in enumerate(handle.kept):
            assert real_tile[sample, tile_of_token[kept]].all()
            assert torch.equal(kept, kept.sort().values)
        if method.budget is None:
            assert handle.stats.image_tokens_after == handle.stats.image_tokens_valid


@torch.no_grad()
def test_budget_keeps_exactly_n_tokens_per_sample(model, batch):
    with trimllama.trim(model, trimllama.HeadwiseTopK(head_k=0.05, budget=20)) as handle:
        model(**batch)
    assert [k.numel() for k in handle.kept] == [20, 20, 17]  # the 1-tile sample holds only 17: all kept


@torch.no_grad()
def test_random_select_is_seeded_and_matches_counts(model, batch):
    kept = []
    for seed in (1, 1, 2):
        with trimllama.trim(model, trimllama.RandomSelect(ratio=0.2, seed=seed)) as handle:
            model(**batch)
        kept.append(handle.kept)
    assert all(torch.equal(a, b) for a, b in zip(kept[0], kept[1]))
    assert not all(torch.equal(a, b) for a, b in zip(kept[0], kept[2]))
    headwise = trimllama.HeadwiseTopK(head_k=0.1)
    with trimllama.trim(model, headwise) as handle:
        model(**batch)
    with trimllama.trim(model, trimllama.RandomSelect(like=headwise)) as matched:
        model(**batch)
    assert [k.numel() for k in matched.kept] == [k.numel() for k in handle.kept]


@torch.no_grad()
def test_cross_attention_cache_bytes_shrink_to_the_kept_fraction(model):
    batch = synthetic_batch(model, [SampleSpec(tiles=(4,)), SampleSpec(tiles=(4,))], seed=2)
    budget = 17
    untrimmed = model(**batch, use_cache=True).past_key_values
    with trimllama.trim(model, trimllama.HeadwiseTopK(budget=budget)) as handle:
        trimmed = model(**batch, use_cache=True).past_key_values
    text_model = model.model.language_model
    first, *later = sorted(text_model.cross_attention_layers)
    total = num_image_tokens(model, batch)

    def layer_bytes(cache, index):
        return cache.layers[index].keys.nbytes + cache.layers[index].values.nbytes

    for index in later:
        assert layer_bytes(trimmed, index) * total == layer_bytes(untrimmed, index) * budget
    assert layer_bytes(trimmed, first) == layer_bytes(untrimmed, first)
    all_cross = [first, *later]
    assert handle.stats.cross_kv_bytes_before == sum(layer_bytes(untrimmed, i) for i in all_cross)
    assert handle.stats.cross_kv_bytes_after == sum(layer_bytes(trimmed, i) for i in all_cross)
    assert sum(handle.stats.sample_cross_kv_bytes_after) == handle.stats.cross_kv_bytes_after


@torch.no_grad()
def test_trim_scoring_layer_compacts_the_first_layers_cache_too(model):
    batch = synthetic_batch(model, [SampleSpec(tiles=(4,))], seed=2)
    with trimllama.trim(model, trimllama.HeadwiseTopK(budget=10), trim_scoring_layer=True) as handle:
        cache = model(**batch, use_cache=True).past_key_values
    first = sorted(model.model.language_model.cross_attention_layers)[0]
    assert cache.layers[first].keys.shape[2] == 10
    assert handle.stats.cross_kv_bytes_after == sum(handle.stats.sample_cross_kv_bytes_after)


@torch.no_grad()
def test_sampling_generation_runs_and_is_reproducible(model, batch):
    with trimllama.trim(model, trimllama.HeadwiseTopK()):
        torch.manual_seed(0)
        first = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=20)
        torch.manual_seed(0)
        second = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=20)
    assert torch.equal(first, second)


@torch.no_grad()
def test_text_only_sample_in_an_image_batch(model):
    batch = synthetic_batch(model, [SampleSpec(tiles=(2,)), SampleSpec(tiles=())], seed=3)
    with trimllama.trim(model, trimllama.HeadwiseTopK()) as handle:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert handle.kept[1].numel() == 0 and handle.kept[0].numel() > 0
    assert handle.stats.image_tokens_valid[1] == 0


@torch.no_grad()
def test_remove_restores_the_exact_untrimmed_behaviour(model, batch):
    before = model(**batch).logits
    handle = trimllama.trim(model, trimllama.HeadwiseTopK(head_k=0.05))
    trimmed = model(**batch).logits
    handle.remove()
    handle.remove()  # idempotent
    after = model(**batch).logits
    assert not torch.equal(before, trimmed)
    assert torch.equal(before, after)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hooks_are_scoped_to_one_instance():
    first, second = tiny_mllama(seed=0), tiny_mllama(seed=0)
    batch = synthetic_batch(first, SPECS[:1], seed=1)
    with torch.no_grad():
        reference = second(**batch).logits
        with trimllama.trim(first, trimllama.HeadwiseTopK(head_k=0.05)):
            assert torch.equal(second(**batch).logits, reference)
            assert not torch.equal(first(**batch).logits, reference)

"""The test matrix over every registered method (default settings) on a tiny model."""

import pytest
import torch

import trimllama
from trimllama.selection import evenly_spaced, mass_threshold, per_tile_top
from trimllama.testing import SampleSpec, synthetic_batch, tiny_mllama

from oracle import generated_step_logits, keep_mask_from_indices, masked_layers, teacher_forced_logits

ALL_METHODS = sorted(trimllama.METHODS)
PLAIN_METHODS = [name for name in ALL_METHODS if name != "merge_remainder"]


@pytest.fixture(scope="module")
def model():
    return tiny_mllama(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def batch(model):
    return synthetic_batch(model, [SampleSpec(tiles=(3, 1)), SampleSpec(tiles=(2,), left_pad=2)], seed=4)


@pytest.mark.parametrize("name", ALL_METHODS)
@torch.no_grad()
def test_every_method_generates_and_keeps_sorted_real_tokens(model, batch, name):
    method = trimllama.METHODS[name]()
    with trimllama.trim(model, method) as handle:
        output = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert output.shape == (2, batch["input_ids"].shape[1] + 3)
    patches = model.model.vision_model.num_patches
    real_tile = batch["aspect_ratio_mask"].reshape(2, -1).bool()
    for sample, kept in enumerate(handle.kept):
        assert kept.dtype == torch.long and torch.equal(kept, kept.sort().values)
        if name != "keep_all":
            assert real_tile[sample, kept // patches].all(), "a padding tile was kept"
    assert handle.stats.cross_kv_bytes_after <= handle.stats.cross_kv_bytes_before or name == "merge_remainder"


@pytest.mark.parametrize("name", PLAIN_METHODS)
@torch.no_grad()
def test_every_plain_method_equals_the_masking_oracle(model, batch, name):
    with trimllama.trim(model, trimllama.METHODS[name]()) as handle:
        sequences, step_logits = generated_step_logits(model, batch, 3)
    keep = keep_mask_from_indices(handle.kept, handle.stats.image_tokens_before[0])
    with masked_layers(model, keep):
        expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)


def test_evenly_spaced_keeps_exact_counts_spread_out():
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 6:] = False
    keep = evenly_spaced(torch.tensor([4, 3]), valid)
    assert keep[0].nonzero().flatten().tolist() == [0, 3, 6, 9]
    assert keep[1].nonzero().flatten().tolist() == [0, 2, 4]


def test_per_tile_top_gives_every_tile_its_share():
    scores = torch.arange(8.0).view(1, 8)  # two tiles of 4; the second scores higher everywhere
    keep = per_tile_top(scores, 0.5, torch.ones(1, 8, dtype=torch.bool), patches=4)
    assert keep.view(2, 4).sum(dim=-1).tolist() == [2, 2]


def test_mass_threshold_keeps_the_smallest_set_holding_the_mass():
    scores = torch.tensor([[[0.6, 0.3, 0.05, 0.05], [0.05, 0.05, 0.1, 0.8]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert mass_threshold(scores, 0.5, valid).tolist() == [[True, False, False, True]]
    assert mass_threshold(scores, 0.85, valid).tolist() == [[True, True, True, True]]

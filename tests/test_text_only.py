"""Text-only prompts pass through a trimmed model exactly as untrimmed, with every method.

What "exact" means, row by row:
- A batch without any image: Mllama skips its cross-attention layers, so there is nothing to trim.
  Trimmed logits and `generate` sequences equal the untrimmed model's bit for bit; stats report zero
  image tokens.
- A text-only row in a batch that holds images (mixed batch): that row sees no image, but in
  transformers' Mllama its cross-attention still runs over its (zero) padding image with an all-zero
  mask, and only the MLP output of the layer is zeroed (see shared/method.md), so even the untrimmed
  batched model does not equal the untrimmed model on that row alone. The exact reference for every
  row, text-only included, is the masking oracle on the same batch (tests/oracle.py): a selection
  method keeps none of the row's tokens, so in the later layers the row attends to nothing. KeepAll
  keeps every token and equals the untrimmed batch bit for bit.
"""

import pytest
import torch

import trimllama
from trimllama.testing import SampleSpec, synthetic_batch, tiny_mllama

from oracle import generated_step_logits, keep_mask_from_indices, masked_layers, teacher_forced_logits

NEW_TOKENS = 6
METHOD_NAMES = sorted({cls.name for cls in trimllama.METHODS.values()})


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_mllama(seed=0, attn_implementation=request.param)


@pytest.fixture(scope="module")
def text_batch(model):
    """Two text-only rows of different lengths (the second left-padded)."""
    batch = synthetic_batch(model, [SampleSpec(tiles=(), text_after=9), SampleSpec(tiles=(), left_pad=3, text_after=5)])
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("name", METHOD_NAMES)
@torch.no_grad()
def test_text_only_batch_equals_the_untrimmed_model(model, text_batch, name):
    logits = model(**text_batch).logits
    sequences, step_logits = generated_step_logits(model, text_batch, NEW_TOKENS)
    assert len({tuple(row) for row in sequences[:, -NEW_TOKENS:].tolist()}) == 2, "rows must differ to compare"
    with trimllama.trim(model, name) as handle:
        assert torch.equal(model(**text_batch).logits, logits)
        trimmed_sequences, trimmed_step_logits = generated_step_logits(model, text_batch, NEW_TOKENS)
    assert torch.equal(trimmed_sequences, sequences)
    assert torch.equal(trimmed_step_logits, step_logits)
    stats = handle.stats
    assert stats.image_tokens_before == stats.image_tokens_after == stats.extra_tokens == [0, 0]
    assert stats.cross_kv_bytes_before == stats.cross_kv_bytes_after == 0
    assert [kept.numel() for kept in handle.kept] == [0, 0]


MIXED = [
    SampleSpec(tiles=(), left_pad=2, text_after=7),
    SampleSpec(tiles=(2,), text_before=1, text_after=5),
    SampleSpec(tiles=(1, 3), left_pad=1, text_before=2, text_between=2, text_after=3),
]


@pytest.mark.parametrize(
    "method",
    [trimllama.HeadwiseTopK(head_k=0.2), trimllama.RandomSelect(ratio=0.3, seed=1), trimllama.Floor()],
    ids=lambda method: method.label(),
)
@torch.no_grad()
def test_mixed_batch_equals_the_masking_oracle(model, method):
    batch = synthetic_batch(model, MIXED, seed=3)
    num_tokens = batch["cross_attention_mask"].shape[2] * batch["cross_attention_mask"].shape[3]
    num_tokens *= model.model.vision_model.num_patches
    with trimllama.trim(model, method) as handle:
        sequences, step_logits = generated_step_logits(model, batch, NEW_TOKENS)
        kept, stats = handle.kept, handle.stats
    assert kept[0].numel() == 0 and stats.image_tokens_valid[0] == stats.image_tokens_after[0] == 0
    keep = keep_mask_from_indices(kept, num_tokens)
    with masked_layers(model, keep):
        expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_mixed_batch_with_keep_all_equals_the_untrimmed_batch(model):
    batch = synthetic_batch(model, MIXED, seed=3)
    sequences, step_logits = generated_step_logits(model, batch, NEW_TOKENS)
    with trimllama.trim(model, trimllama.KeepAll()):
        trimmed_sequences, trimmed_step_logits = generated_step_logits(model, batch, NEW_TOKENS)
    assert torch.equal(trimmed_sequences, sequences) and torch.equal(trimmed_step_logits, step_logits)


@torch.no_grad()
def test_a_decode_step_over_an_unplanned_image_cache_is_refused(model):
    """The one case where trimmed state is genuinely missing: the prefill ran before trim()."""
    batch = synthetic_batch(model, [SampleSpec(tiles=(2,))], seed=0)
    cache = model(**batch, use_cache=True).past_key_values
    step = dict(
        input_ids=batch["input_ids"][:, -1:],
        attention_mask=torch.cat([batch["attention_mask"], batch["attention_mask"][:, -1:]], dim=1),
        cross_attention_mask=batch["cross_attention_mask"][:, -1:],
        past_key_values=cache,
    )
    with trimllama.trim(model), pytest.raises(trimllama.MissingImageError, match="no trimming plan"):
        model(**step)

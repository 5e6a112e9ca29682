"""Bad input gets a clear exception that names the problem."""

import pytest
import torch
from torch import nn

import trimllama
from trimllama.testing import SampleSpec, synthetic_batch, tiny_mllama


@pytest.fixture(scope="module")
def model():
    return tiny_mllama(seed=0)


@pytest.fixture(scope="module")
def batch(model):
    return synthetic_batch(model, [SampleSpec(tiles=(2,))], seed=0)


def test_unsupported_model_is_named():
    with pytest.raises(trimllama.UnsupportedModelError, match="cannot trim a Linear.*MllamaForConditionalGeneration"):
        trimllama.trim(nn.Linear(2, 2), trimllama.KeepAll())


def test_a_model_with_one_cross_attention_layer_is_refused():
    single = tiny_mllama(cross_attention_layers=(1,), num_hidden_layers=3)
    with pytest.raises(trimllama.UnsupportedModelError, match="at least 2 cross-attention layers"):
        trimllama.trim(single)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(head_k=0), "head_k=0 is out of range"),
        (dict(head_k=-3), "head_k=-3 is out of range"),
        (dict(head_k=1.5), r"head_k=1.5 is out of range: a fraction must lie in \(0, 1\]"),
        (dict(head_k=0.0), "head_k=0.0 is out of range"),
        (dict(head_k="a lot"), "head_k must be an int count or a float fraction"),
        (dict(head_k=True), "head_k must be an int count or a float fraction"),
        (dict(budget=0), "budget=0 is out of range"),
        (dict(budget=2.5), "budget must be an int number of tokens"),
        (dict(reduce="mean"), "reduce must be 'sum' or 'max'"),
    ],
)
def test_out_of_range_settings(settings, message):
    with pytest.raises(trimllama.InvalidSettingError, match=message):
        trimllama.HeadwiseTopK(**settings)
    assert issubclass(trimllama.InvalidSettingError, ValueError)


def test_random_select_settings_are_checked():
    with pytest.raises(trimllama.InvalidSettingError, match="ratio=2.0 is out of range"):
        trimllama.RandomSelect(ratio=2.0)
    with pytest.raises(trimllama.InvalidSettingError, match="like must be a selection method"):
        trimllama.RandomSelect(like="headwise_topk")


def test_unknown_method_name(model):
    with pytest.raises(trimllama.UnknownMethodError, match="unknown selection method 'fastest'.*headwise_topk"):
        trimllama.trim(model, "fastest")
    with pytest.raises(KeyError):
        trimllama.METHODS["fastest"]


def test_registry_accepts_names_and_class_names(model):
    assert trimllama.METHODS["HeadwiseTopK"] is trimllama.METHODS["headwise_topk"] is trimllama.HeadwiseTopK
    assert "KeepAll" in trimllama.METHODS and "RandomSelect" in trimllama.METHODS
    with trimllama.trim(model, "headwise_topk", head_k=0.1) as handle:
        assert handle.method == trimllama.HeadwiseTopK(head_k=0.1)


@torch.no_grad()
def test_mask_shape_mismatch(model, batch):
    wrong = dict(batch, cross_attention_mask=batch["cross_attention_mask"][:, :, :, :3])
    with trimllama.trim(model):
        with pytest.raises(trimllama.ShapeMismatchError, match="cross_attention_mask has"):
            model(**wrong)
        with pytest.raises(trimllama.ShapeMismatchError, match="needs cross_attention_mask"):
            model(**dict(batch, cross_attention_mask=None))


@torch.no_grad()
def test_decode_mask_for_other_images_is_refused(model, batch):
    with trimllama.trim(model):
        cache = model(**batch, use_cache=True).past_key_values
        other = synthetic_batch(model, [SampleSpec(tiles=(2, 1))], seed=0)["cross_attention_mask"][:, -1:]
        with pytest.raises(trimllama.ShapeMismatchError, match="does not match the trimmed prefill"):
            model(input_ids=batch["input_ids"][:, -1:], cross_attention_mask=other, past_key_values=cache)


@torch.no_grad()
def test_static_cache_is_not_supported_yet(model, batch):
    with trimllama.trim(model):
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            model.generate(**batch, max_new_tokens=2, cache_implementation="static")


@torch.no_grad()
def test_torch_compile_is_refused_with_not_implemented_error(model, batch):
    """Issue 15: compiling a trimmed model failed after a minute inside the compiler; now the documented
    NotImplementedError, whether the whole module or only its forward is compiled."""
    try:
        with trimllama.trim(model):
            for compiled in (torch.compile(model), torch.compile(model.forward)):
                with pytest.raises(NotImplementedError, match="does not support torch.compile"):
                    compiled(**batch)
        untrimmed = model(**batch).logits
        with trimllama.trim(model, trimllama.KeepAll()):
            assert torch.equal(model(**batch).logits, untrimmed)  # eager trimming is untouched by the check
    finally:
        torch._dynamo.reset()


def test_trimming_twice_is_refused(model):
    with trimllama.trim(model):
        with pytest.raises(RuntimeError, match="already trimmed"):
            trimllama.trim(model)

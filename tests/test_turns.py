"""query_rows="last_turn" and "image_turn": the turn markers from the chat template, the row masks, and trimming
under the oracle."""

import pytest
import torch

import trimllama
from trimllama.errors import InvalidSettingError
from trimllama.selection import image_turn_rows, last_turn_rows
from trimllama.testbed import make_questions
from trimllama.testbed.build import make_tokenizer
from trimllama.turns import assistant_turn_opener, user_turn_opener

from multitoken import multitoken_testbed
from oracle import generated_step_logits, keep_mask_from_indices, masked_layers, teacher_forced_logits

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class _WithTemplate:
    """A processor-like object: a tokenizer plus a chat template of our choosing."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template = tokenizer, chat_template


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def testbed(request):
    return multitoken_testbed(seed=1, attn_implementation=request.param)


def conversation(processor, questions) -> str:
    """A chat-template prompt: the first question with the image, one answered turn per earlier question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0].question}]}]
    for earlier, question in zip(questions, questions[1:]):
        messages += [{"role": "assistant", "content": earlier.answer}, {"role": "user", "content": question.question}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def batch(testbed):
    _, processor = testbed
    questions = make_questions(6, seed=77)
    # 3, 1 and 2 turns: different lengths, so the shorter prompts are left-padded
    chats = [questions[0:3], questions[3:4], questions[4:6]]
    texts = [conversation(processor, chat) for chat in chats]
    return processor(images=[[chat[0].image] for chat in chats], text=texts, return_tensors="pt", padding=True)


def test_the_user_turn_marker_comes_from_the_chat_template(testbed):
    _, processor = testbed
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(list(user_turn_opener(processor))) == ["<|begin_of_text|>", "question", ":"]
    llama3 = user_turn_opener(_WithTemplate(tokenizer, LLAMA3_STYLE))
    assert tokenizer.convert_ids_to_tokens(list(llama3)) == ["<|start_header_id|>", "user", "<|end_header_id|>"]
    with pytest.raises(InvalidSettingError, match="chat template") as error:
        user_turn_opener(make_tokenizer())  # a bare tokenizer: no chat template
    assert error.value.setting == "query_rows"
    no_marker = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(InvalidSettingError, match="no marker"):
        user_turn_opener(_WithTemplate(tokenizer, no_marker))


def test_last_turn_rows_start_at_the_last_marker():
    ids = torch.tensor([[9, 5, 1, 6, 7, 5, 1, 6, 8], [0, 0, 0, 9, 5, 1, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    rows = last_turn_rows(ids, torch.tensor([5, 1, 6]))
    assert rows.long().tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],  # no marker: no row
    ]


def test_the_assistant_turn_marker_comes_from_the_chat_template(testbed):
    _, processor = testbed
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(list(assistant_turn_opener(processor))) == ["answer", ":"]
    llama3 = assistant_turn_opener(_WithTemplate(tokenizer, LLAMA3_STYLE))
    assert tokenizer.convert_ids_to_tokens(list(llama3)) == ["<|start_header_id|>", "assistant", "<|end_header_id|>"]
    with pytest.raises(InvalidSettingError, match="query_rows=image_turn needs a tokenizer with a chat template") as error:
        assistant_turn_opener(make_tokenizer())
    assert error.value.setting == "query_rows"
    no_marker = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(InvalidSettingError, match="no marker that opens an assistant message"):
        assistant_turn_opener(_WithTemplate(tokenizer, no_marker))


# hand-built ids for image_turn_rows: 3 = <|image|>, (7, 8) = the assistant opener, 5 = a user opener, 2 = padding
IMAGE, OPENER = 3, torch.tensor([7, 8])


def _image_turn(*sequences: list[int]) -> list[list[int]]:
    """image_turn_rows of left-padded `sequences`, as lists of 0/1."""
    length = max(len(ids) for ids in sequences)
    ids = torch.tensor([[2] * (length - len(row)) + row for row in sequences])
    return image_turn_rows(ids, IMAGE, OPENER).long().tolist()


def test_image_turn_rows_are_the_message_that_holds_the_image():
    single = [5, 3, 10, 11, 1, 7, 8, 12]  # the generation prompt (7 8 12) does not score
    three_turns = [5, 3, 10, 1, 7, 8, 20, 1, 5, 11, 1, 7, 8, 21, 1, 5, 12, 1, 7, 8]
    assert _image_turn(single) == [[0, 1, 1, 1, 1, 0, 0, 0]]
    assert _image_turn(three_turns) == [[0, 1, 1, 1] + [0] * 16]
    # later turns never change the rows of the earlier ones
    assert _image_turn(three_turns[:6])[0] == _image_turn(three_turns)[0][:6]


def test_image_turn_rows_with_two_images_in_two_turns():
    ids = [5, 3, 10, 1, 7, 8, 20, 1, 5, 3, 11, 1, 7, 8]
    assert _image_turn(ids) == [[0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0]]
    assert _image_turn([5, 3, 3, 10, 7, 8]) == [[0, 1, 1, 1, 0, 0]]  # two images in one message


def test_image_turn_rows_without_an_opener_after_the_image():
    assert _image_turn([0, 3, 10, 11]) == [[0, 1, 1, 1]]  # raw text: every row from the image on
    assert _image_turn([7, 8, 3, 10]) == [[0, 0, 1, 1]]  # an opener before the image ends nothing
    assert _image_turn([5, 3, 7, 10, 8, 7, 8]) == [[0, 1, 1, 1, 1, 0, 0]]  # only the whole marker ends a message
    no_marker = image_turn_rows(torch.tensor([[5, 3, 10, 7, 8]]), IMAGE, torch.zeros(0, dtype=torch.long))
    assert no_marker.long().tolist() == [[0, 1, 1, 1, 1]]
    assert _image_turn([5, 10, 7, 8]) == [[0, 0, 0, 0]]  # no image: no row


def test_image_turn_rows_with_left_padding():
    assert _image_turn([5, 3, 10, 7, 8], [5, 3, 10, 1, 7, 8, 20, 1, 5, 3, 11, 7, 8], [3, 7, 8]) == [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0] * 10 + [1, 0, 0],
    ]


def test_query_rows_is_validated_and_built_from_loose_settings():
    with pytest.raises(InvalidSettingError, match="query_rows") as error:
        trimllama.HeadwiseTopK(query_rows="first_turn")
    assert error.value.setting == "query_rows"
    with pytest.raises(InvalidSettingError, match="order"):
        trimllama.HeadwiseTopK(order="middle")
    method = trimllama.build_method("headwise_topk", head_k=0.1, query_rows="last_turn", merge_remainder=True)
    assert method.method.query_rows == "last_turn"
    assert trimllama.build_method("mean_heads_topk", query_rows="last_turn").query_rows == "last_turn"
    with pytest.raises(InvalidSettingError, match="query_rows"):
        trimllama.build_method("headwise_topk", query_rows=3)


def test_last_turn_without_a_tokenizer_is_refused_at_trim(testbed):
    model, _ = testbed
    with pytest.raises(InvalidSettingError, match="tokenizer") as error:
        trimllama.trim(model, trimllama.HeadwiseTopK(query_rows="last_turn"))
    assert error.value.setting == "query_rows"
    assert not hasattr(model, "_trimllama_handle")


@torch.no_grad()
def test_a_prompt_without_the_marker_is_refused(testbed):
    model, processor = testbed
    question = make_questions(1, seed=3)[0]
    inputs = processor(images=[[question.image]], text=["<|image|> what color is the circle ?"], return_tensors="pt")
    with trimllama.trim(model, trimllama.HeadwiseTopK(query_rows="last_turn"), tokenizer=processor):
        with pytest.raises(InvalidSettingError, match="no user-turn marker"):
            model(**inputs)


@torch.no_grad()
def test_last_turn_trimming_equals_the_masking_oracle_with_left_padding(testbed, batch):
    model, processor = testbed
    method = trimllama.HeadwiseTopK(head_k=0.05, query_rows="last_turn")
    with trimllama.trim(model, method, tokenizer=processor) as handle:
        sequences, step_logits = generated_step_logits(model, batch, 4)
        kept = handle.kept
    with trimllama.trim(model, trimllama.HeadwiseTopK(head_k=0.05)) as handle:
        model(**batch)
        kept_all_rows = handle.kept
    # in the multi-turn samples the earlier turns no longer score
    assert not torch.equal(kept[0], kept_all_rows[0]) or not torch.equal(kept[2], kept_all_rows[2])
    keep = keep_mask_from_indices(kept, handle.stats.image_tokens_before[0])
    with masked_layers(model, keep):
        expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)
    assert step_logits.shape[1] == 4 and len(set(sequences[:, -4:].flatten().tolist())) > 1  # decode steps differ


@torch.no_grad()
def test_last_turn_in_a_batch_equals_each_sample_alone(testbed, batch):
    model, processor = testbed
    method = trimllama.HeadwiseTopK(head_k=0.05, query_rows="last_turn")
    with trimllama.trim(model, method, tokenizer=processor) as handle:
        model(**batch)
        batched = handle.kept
        for sample in range(3):
            alone = {key: value[sample : sample + 1] for key, value in batch.items()}
            pad = int((alone["attention_mask"][0] == 0).sum())
            alone = {key: value[:, pad:] if key in ("input_ids", "attention_mask", "cross_attention_mask") else value
                     for key, value in alone.items()}
            model(**alone)
            assert torch.equal(handle.kept[0], batched[sample])

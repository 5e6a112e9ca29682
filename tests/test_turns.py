"""query_rows="last_turn" and "image_turn": the turn markers from the chat template, the row masks, and trimming
under the oracle."""

import contextlib

import pytest
import torch

import trimllama
from trimllama.errors import InvalidSettingError
from trimllama.selection import image_turn_rows, last_turn_rows
from trimllama.testbed import make_questions
from trimllama.testbed.build import make_tokenizer
from trimllama.testing import select_sample
from trimllama.turns import assistant_turn_opener, user_turn_opener

from multitoken import multitoken_testbed
from oracle import (
    extend_for_generated,
    generated_step_logits,
    keep_mask_from_indices,
    masked_layers,
    rows_after_their_image_turn,
    teacher_forced_logits,
)

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


def conversation(processor, questions, image_turns=(0,)) -> str:
    """A chat-template prompt: one answered turn per earlier question; the turns in `image_turns` hold their
    question's image."""
    messages = []
    for turn, question in enumerate(questions):
        if turn:
            messages.append({"role": "assistant", "content": questions[turn - 1].answer})
        text = [{"type": "text", "text": question.question}]
        content = [{"type": "image"}, *text] if turn in image_turns else question.question
        messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(processor, chats) -> dict:
    """A left-padded batch of conversations: (questions, image_turns) each."""
    texts = [conversation(processor, questions, turns) for questions, turns in chats]
    images = [[q.image for turn, q in enumerate(questions) if turn in turns] for questions, turns in chats]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def image_turn_batch(testbed):
    """3, 1 and 2 turns, the last with a second image in its second turn: left padding, and late rows that see
    the first image and others that see the second."""
    _, processor = testbed
    questions = make_questions(6, seed=78)
    return encode(processor, [(questions[0:3], (0,)), (questions[3:4], (0,)), (questions[4:6], (0, 1))])


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
            model(**select_sample(batch, sample))
            assert torch.equal(handle.kept[0], batched[sample])


# ------------------------------------------------------------------ query_rows="image_turn" on the testbed

IMAGE_TURN_METHODS = [
    trimllama.HeadwiseTopK(head_k=0.05, query_rows="image_turn"),
    # one token per sample: in the two-image sample the late rows of one image see no kept column at all
    trimllama.HeadwiseTopK(head_k=1, budget=1, query_rows="image_turn"),
]


def late_rows(processor, full: dict) -> torch.Tensor:
    """The oracle's rows that see only the kept columns in the scoring layer: past their image's user message,
    found token by token from the testbed's own ids (`<|image|>`, then `answer :` opens the reply)."""
    image, opener = processor.tokenizer.convert_tokens_to_ids(["<|image|>", "answer", ":"])[0], ["answer", ":"]
    opener_ids = processor.tokenizer.convert_tokens_to_ids(opener)
    sees_image = full["cross_attention_mask"].flatten(2).any(dim=-1)
    return rows_after_their_image_turn(full["input_ids"], image, opener_ids, sees_image)


@pytest.mark.parametrize("method", IMAGE_TURN_METHODS, ids=lambda m: m.label())
@pytest.mark.parametrize("trim_scoring_layer", [False, True])
@torch.no_grad()
def test_image_turn_trimming_equals_the_masking_oracle_at_every_step(testbed, image_turn_batch, method, trim_scoring_layer):
    """With trim_scoring_layer the oracle is one forward over prompt + answer in which the scoring layer masks the
    dropped columns in every row past its image's user message: generate's cached decode steps must equal it."""
    model, processor = testbed
    batch = image_turn_batch
    with trimllama.trim(model, method, tokenizer=processor, trim_scoring_layer=trim_scoring_layer) as handle:
        sequences, step_logits = generated_step_logits(model, batch, 4)
        kept = handle.kept
    keep = keep_mask_from_indices(kept, handle.stats.image_tokens_before[0])
    first = sorted(model.model.language_model.cross_attention_layers)[:1]
    with masked_layers(model, keep), contextlib.ExitStack() as scoring_layer:
        if trim_scoring_layer:
            rows = late_rows(processor, extend_for_generated(batch, sequences[:, :-1]))
            scoring_layer.enter_context(masked_layers(model, keep, layers=first, prefill_rows=rows))
        expected = teacher_forced_logits(model, batch, sequences)
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-4)
    assert len(set(sequences[:, -4:].flatten().tolist())) > 1  # decode steps differ


@torch.no_grad()
def test_image_turn_scores_only_the_message_that_holds_the_image(testbed, image_turn_batch):
    model, processor = testbed
    kept = {}
    for query_rows in ("all", "last_turn", "image_turn"):
        with trimllama.trim(model, trimllama.HeadwiseTopK(head_k=0.05, query_rows=query_rows), tokenizer=processor) as handle:
            model(**image_turn_batch)
        kept[query_rows] = handle.kept
    assert not torch.equal(kept["image_turn"][0], kept["all"][0])  # 3 turns: the later turns no longer score
    assert not torch.equal(kept["image_turn"][0], kept["last_turn"][0])
    assert not torch.equal(kept["image_turn"][2], kept["all"][2])  # each image scored by its own message


@pytest.mark.parametrize("trim_scoring_layer", [False, True])
@torch.no_grad()
def test_image_turn_in_a_batch_equals_each_sample_alone(testbed, image_turn_batch, trim_scoring_layer):
    model, processor = testbed
    method = trimllama.HeadwiseTopK(head_k=0.05, query_rows="image_turn")
    with trimllama.trim(model, method, tokenizer=processor, trim_scoring_layer=trim_scoring_layer) as handle:
        _, batched_logits = generated_step_logits(model, image_turn_batch, 3)
        batched = handle.kept
        for sample in range(3):
            alone = select_sample(image_turn_batch, sample)
            images = int(alone["aspect_ratio_mask"][0].any(dim=-1).sum())  # the batch pads the image axis to 2
            alone = {key: value[:, :images] if key.startswith(("pixel", "aspect")) else value for key, value in alone.items()}
            alone["cross_attention_mask"] = alone["cross_attention_mask"][:, :, :images]
            _, alone_logits = generated_step_logits(model, alone, 3)
            assert torch.equal(handle.kept[0], batched[sample])
            torch.testing.assert_close(batched_logits[sample : sample + 1], alone_logits, rtol=0, atol=1e-4)


@torch.no_grad()
def test_later_turns_never_change_the_kept_set_and_first_questions_do(testbed):
    model, processor = testbed
    image = make_questions(1, seed=40)[0].image
    first, other_first, second, other_second = make_questions(4, seed=41)
    for question in (first, other_first):
        question.image = image
    chats = [([first], (0,)), ([other_first], (0,)), ([first, second], (0,)), ([first, other_second], (0,))]
    kept = {}
    for query_rows in ("all", "image_turn"):
        method = trimllama.HeadwiseTopK(head_k=0.05, query_rows=query_rows)
        with trimllama.trim(model, method, tokenizer=processor) as handle:
            kept[query_rows] = []
            for chat in chats:  # one at a time: no padding, the same image in every prompt
                model(**encode(processor, [chat]))
                kept[query_rows].append(handle.kept[0])
    one, other_one, two, other_two = kept["image_turn"]
    assert not torch.equal(one, other_one)  # the first question decides
    assert torch.equal(one, two) and torch.equal(one, other_two)  # the second turns do not
    assert not torch.equal(kept["all"][0], kept["all"][2])  # with every row scoring they would


@torch.no_grad()
def test_turn_two_from_scratch_equals_turn_one_cached_plus_its_extension(testbed):
    """trim_scoring_layer=True: the scoring layer's cache holds only the kept tokens, as an engine's pool does."""
    model, processor = testbed
    questions = make_questions(2, seed=42)
    turn_one, turn_two = encode(processor, [(questions[:1], (0,))]), encode(processor, [(questions, (0,))])
    length = turn_one["input_ids"].shape[1]
    assert torch.equal(turn_two["input_ids"][:, :length], turn_one["input_ids"])
    method = trimllama.HeadwiseTopK(head_k=0.05, query_rows="image_turn")
    with trimllama.trim(model, method, tokenizer=processor, trim_scoring_layer=True) as handle:
        scratch = model(**turn_two).logits[:, length:]
        kept_two = handle.kept[0]
        cache = model(**turn_one, use_cache=True).past_key_values
        assert torch.equal(handle.kept[0], kept_two)
        extension = model(
            input_ids=turn_two["input_ids"][:, length:],
            attention_mask=turn_two["attention_mask"],
            cross_attention_mask=turn_two["cross_attention_mask"][:, length:],
            past_key_values=cache,
        ).logits
    torch.testing.assert_close(extension, scratch, rtol=0, atol=1e-4)
    assert kept_two.numel() < handle.stats.image_tokens_valid[0]


def test_image_turn_needs_the_chat_template(testbed):
    model, _ = testbed
    with pytest.raises(InvalidSettingError, match="query_rows=image_turn needs the chat template") as error:
        trimllama.trim(model, trimllama.HeadwiseTopK(query_rows="image_turn"))
    assert error.value.setting == "query_rows"
    with pytest.raises(InvalidSettingError, match="query_rows=image_turn needs a tokenizer with a chat template"):
        trimllama.trim(model, "mean_heads_topk", query_rows="image_turn", tokenizer=make_tokenizer())
    assert not hasattr(model, "_trimllama_handle")


def test_each_turn_of_a_conversation_extends_the_previous_prompt(testbed):
    """The chat template renders an earlier turn's prompt (generation prompt included) as the start of the next
    one, token for token: what lets a prefix cache hold a conversation. (The testbed's template once dropped the
    space before an assistant reply's ` answer :`, merging it with a question's last word when no `?` ended it.)"""
    _, processor = testbed
    questions = ["what color is the square", "how many shapes are there", "is the circle left of the square"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]}]
    prompts = []
    for answer, question in zip(["red", "3"], questions[1:]):
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        messages += [
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            {"role": "user", "content": [{"type": "text", "text": question}]},
        ]
    prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    ids = [processor.tokenizer.encode(text, add_special_tokens=False) for text in prompts]
    for earlier, later in zip(ids, ids[1:]):
        assert later[: len(earlier)] == earlier
    assert processor.tokenizer.unk_token_id not in ids[-1]

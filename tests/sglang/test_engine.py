"""trimllama's Mllama in SGLang's engine (tiny CPU checkpoint) against stock SGLang and the Hugging Face path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, data_url
from PIL import Image
from tiny_checkpoint import hf_model
from transformers import AutoProcessor

from trimllama import HeadwiseTopK, trim

PATCHES = 197  # (112 / 8)^2 + 1 tokens per tile
MAX_TILES = 4
TILES = {"four": 4, "four_b": 4, "two": 2, "one": 1}
QUESTIONS = ["what color is the square", "how many circles are there"]


def prompt(question: str, images: int = 1) -> str:
    """The raw prompt the checkpoint's chat template writes for one user turn."""
    return "<|image|>" * images + f"<|begin_of_text|>question : {question} answer :"


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_model(checkpoint), AutoProcessor.from_pretrained(checkpoint)


def hf_answer(hf, text: str, path: str, budget: int | None) -> tuple[list[int], list[int] | None]:
    """Greedy token ids and kept indices of the Hugging Face path, aligned to SGLang's semantics.

    `hf_model` takes the vision features as SGLang does (the input of layer i); here every text row sees every real
    tile, as SGLang passes no cross-attention mask (and trimllama's slots hold real tiles only).
    """
    model, processor = hf
    inputs = processor(images=[Image.open(path)], text=text, return_tensors="pt")
    tiles = int(inputs["aspect_ratio_mask"].sum())
    inputs["cross_attention_mask"][..., :tiles] = 1
    length = inputs["input_ids"].shape[1]
    if budget is None:
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, length:].tolist(), None
    with trim(model, HeadwiseTopK(budget=budget), trim_scoring_layer=True) as handle:
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return output[0, length:].tolist(), handle.kept[0].tolist()


def test_override_reserves_the_budget(stock_server, trimmed_server, image_files):
    """prompt_tokens shrink by exactly (stock slots - min(budget, real tokens)) per image: the override is active."""
    for name in ("four", "two", "one"):
        stock = stock_server.generate(prompt(QUESTIONS[0]), image_files[name])["meta_info"]["prompt_tokens"]
        trimmed = trimmed_server.generate(prompt(QUESTIONS[0]), image_files[name])["meta_info"]["prompt_tokens"]
        assert stock - trimmed == MAX_TILES * PATCHES - min(BUDGET, TILES[name] * PATCHES), name
    two_images = [image_files["four"], image_files["two"]]
    stock = stock_server.generate(prompt(QUESTIONS[1], 2), two_images)["meta_info"]["prompt_tokens"]
    trimmed = trimmed_server.generate(prompt(QUESTIONS[1], 2), two_images)["meta_info"]["prompt_tokens"]
    assert stock - trimmed == 2 * (MAX_TILES * PATCHES - BUDGET)


def test_budget_over_every_token_equals_stock(stock_server, full_budget_server, image_files):
    """A budget >= all tokens of a 4-tile image keeps them all: the same token ids as stock SGLang."""
    answers = {}
    for name in ("four", "four_b"):
        for question in QUESTIONS:
            stock = stock_server.generate(prompt(question), image_files[name])
            full = full_budget_server.generate(prompt(question), image_files[name])
            assert full["output_ids"] == stock["output_ids"], (name, question)
            assert full["meta_info"]["prompt_tokens"] == stock["meta_info"]["prompt_tokens"]
            answers[name, question] = tuple(stock["output_ids"])
    assert len(set(answers.values())) == len(answers), "the answers must depend on the image and the question"
    assert min(len(answer) for answer in answers.values()) >= 4


@pytest.mark.parametrize(("name", "question"), [("four", QUESTIONS[0]), ("four", QUESTIONS[1]), ("two", QUESTIONS[0]), ("one", QUESTIONS[0])])
def test_trimmed_equals_hf_path(trimmed_server, hf, image_files, name, question):
    """Token ids and kept indices equal `trim(model, HeadwiseTopK(budget), trim_scoring_layer=True)`.

    The same image with a second question is scored again (its pad ids hash the prompt, so the radix cache does
    not hand it the first question's trimmed K/V).
    """
    expected, kept = hf_answer(hf, prompt(question), image_files[name], BUDGET)
    trimmed_server.flush_cache()  # earlier tests may have cached this image and prompt
    before = len(trimmed_server.kept_records())
    answer = trimmed_server.generate(prompt(question), image_files[name])
    records = trimmed_server.kept_records()[before:]
    assert answer["output_ids"] == expected
    assert len(expected) >= 4
    assert [record["kept"] for record in records] == [[kept]]


def test_trimming_changes_answers(hf, image_files):
    """The comparisons above can fail: the budget changes the Hugging Face path's answer."""
    changed = [hf_answer(hf, prompt(q), image_files["four"], BUDGET)[0] != hf_answer(hf, prompt(q), image_files["four"], None)[0] for q in QUESTIONS]
    assert any(changed)


def test_concurrent_openai_requests_equal_lone(trimmed_server, image_files):
    """16 concurrent chat requests (fresh prefills, batched) give the answers of the same requests alone."""
    import openai

    client = openai.OpenAI(base_url=f"{trimmed_server.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    distinct = [(name, question) for name in ("four", "four_b", "two", "one") for question in QUESTIONS]

    def ask(case: tuple[str, str]) -> str:
        name, question = case
        content = [{"type": "image_url", "image_url": {"url": data_url(image_files[name])}}, {"type": "text", "text": question}]
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
        )
        return reply.choices[0].message.content

    trimmed_server.flush_cache()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, distinct * 2))
    trimmed_server.flush_cache()
    lone = [ask(case) for case in distinct]
    assert together == lone * 2
    assert len(set(lone)) > 1


def row_mask_case(server, image_files) -> tuple[list[int], list[int]]:
    """An image request alone, then in one prefill batch after a text-only request whose prefix is cached.

    Both go in one /generate batch; the servers run with SGLANG_ENABLE_COLOCATED_BATCH_GEN, so SGLang holds the
    scheduler's input until the whole batch is tokenized and the two requests meet in one prefill batch (no timing).
    """
    text_only = "<|begin_of_text|>question : " + " ".join(["what color is the square"] * 6) + " answer :"
    image_prompt = prompt(QUESTIONS[1])
    lone = server.generate(image_prompt, image_files["four"])["output_ids"]
    server.flush_cache()
    server.generate(text_only)
    shared_batches = server.prefill_batches(2)
    _, batched = server.generate([text_only, image_prompt], [None, image_files["four"]])
    assert server.prefill_batches(2) == shared_batches + 1, "the two requests did not share a prefill batch"
    return lone, batched["output_ids"]


def test_row_mask_miscount_on_stock_fixed_by_trimllama(stock_server, trimmed_server, image_files):
    """Stock SGLang zeroes the image request's cross-attention in that batch; trimllama counts rows right."""
    lone, batched = row_mask_case(stock_server, image_files)
    assert batched != lone
    lone, batched = row_mask_case(trimmed_server, image_files)
    assert batched == lone

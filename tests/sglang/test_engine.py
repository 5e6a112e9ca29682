"""trimllama's Mllama in SGLang's engine (tiny CPU checkpoint) against stock SGLang and the Hugging Face path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, MAX_TILES, PATCHES, data_url, image_slots, prompt
from tiny_checkpoint import hf_answer

TILES = {"four": 4, "four_b": 4, "two": 2, "one": 1}
QUESTIONS = ["what color is the square", "how many circles are there"]


def test_override_reserves_the_slots(stock_server, trimmed_server, image_files):
    """prompt_tokens = text + the image block's slots: stock max_tiles x patches per image; trimmed
    min(budget, real tokens) per image, packed 2 layer rows of 5 to a slot (so the override is active)."""
    text_tokens = stock_server.generate(prompt(QUESTIONS[0]), image_files["one"])["meta_info"]["prompt_tokens"] - MAX_TILES * PATCHES
    for name in ("four", "two", "one"):
        stock = stock_server.generate(prompt(QUESTIONS[0]), image_files[name])["meta_info"]["prompt_tokens"]
        trimmed = trimmed_server.generate(prompt(QUESTIONS[0]), image_files[name])["meta_info"]["prompt_tokens"]
        assert stock == text_tokens + MAX_TILES * PATCHES, name
        assert trimmed == text_tokens + image_slots(min(BUDGET, TILES[name] * PATCHES)), name
    two_images = [image_files["four"], image_files["two"]]
    stock = stock_server.generate(prompt(QUESTIONS[1], 2), two_images)["meta_info"]["prompt_tokens"]
    trimmed = trimmed_server.generate(prompt(QUESTIONS[1], 2), two_images)["meta_info"]["prompt_tokens"]
    assert stock - trimmed == 2 * MAX_TILES * PATCHES - image_slots(2 * BUDGET)


def test_server_info_names_the_override(stock_server, trimmed_server):
    info = trimmed_server.server_info()["trimllama"]
    assert info["model"] == "trimllama.integrations.sglang.model.MllamaForConditionalGeneration"
    assert info["method"].startswith(f"headwise_topk(head_k=0.25, budget={BUDGET}")
    assert (info["layout"], info["scoring_rows"]) == ("image_pool", "image_turn")
    assert info["pool"] == {"decoder_layers": 5, "cross_attention_layers": [1, 3], "slots_per_image_token": 0.4, "slots_per_text_token": 1}
    assert "trimllama" not in stock_server.server_info()
    assert "trimllama: serving Mllama with headwise_topk" in trimmed_server.log.read_text()


@pytest.mark.parametrize(("name", "question"), [("four", QUESTIONS[0]), ("four", QUESTIONS[1]), ("two", QUESTIONS[0]), ("one", QUESTIONS[0])])
def test_trimmed_equals_hf_path(trimmed_server, hf, image_files, name, question):
    """Token ids and kept indices equal `trim(model, HeadwiseTopK(budget, query_rows="image_turn"),
    trim_scoring_layer=True)`: the image's user message scores, later rows and steps see the kept tokens only."""
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


BAD_REQUESTS = {
    "an image without an <|image|> token": ("<|begin_of_text|>question : what color answer :", "four"),
    "two images, one token": (prompt("what color"), ["four", "two"]),
    "one image, two tokens": (prompt("what color", images=2), "four"),
    "an image with empty text": ("", "four"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_requests_are_refused_and_the_server_keeps_serving(trimmed_server, image_files, case):
    """Each is a 400 naming the problem (stock SGLang's scheduler dies on the first); the next request is served."""
    text, names = BAD_REQUESTS[case]
    images = [image_files[name] for name in names] if isinstance(names, list) else image_files[names]
    good = trimmed_server.generate(prompt(QUESTIONS[0]), image_files["two"])["output_ids"]
    response = trimmed_server.post_generate(text, images)
    assert response.status_code == 400, response.text
    assert "<|image|> token(s) for" in response.json()["error"]["message"]
    assert trimmed_server.generate(prompt(QUESTIONS[0]), image_files["two"])["output_ids"] == good

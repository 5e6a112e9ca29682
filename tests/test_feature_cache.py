"""The serve feature cache: a follow-up about the same image skips the vision tower and answers as without it."""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from trimllama import HeadwiseTopK, MergeRemainder  # noqa: E402
from trimllama.serve.feature_cache import FeatureCache  # noqa: E402
from trimllama.serve.generation import Engine, SamplingParams  # noqa: E402
from trimllama.serve.prompts import Conversation, encode_conversation  # noqa: E402
from trimllama.serve.trimming import TrimSetting  # noqa: E402
from trimllama.testbed import make_conversations, make_questions  # noqa: E402

from multitoken import multitoken_testbed, save_multitoken_testbed  # noqa: E402
from serving import TIMEOUT, Server, data_url, metric, png_bytes  # noqa: E402

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def testbed():
    return multitoken_testbed(seed=3)


@pytest.fixture(scope="module")
def dialogues():
    return make_conversations(3, seed=31)


def first_turn(dialogue) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": dialogue.first.question}]}]


def follow_up(dialogue, answer: str) -> list[dict]:
    return [
        *first_turn(dialogue),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": dialogue.second.question},
    ]


class Job:
    def __init__(self, prompt) -> None:
        self.prompt, self.sampling, self.result = prompt, SamplingParams(max_tokens=MAX_TOKENS), None

    def cancelled(self) -> bool:
        return False

    def delta(self, text: str) -> None:
        pass

    def finish(self, result) -> None:
        self.result = result


def answers(engine, processor, conversations, setting) -> list[str]:
    jobs = [Job(encode_conversation(processor, Conversation(messages, [image]))) for messages, image in conversations]
    engine.generate(jobs, setting)
    assert all(job.result.completion_tokens == MAX_TOKENS for job in jobs), "answers must run several tokens"
    return [job.result.text for job in jobs]


def test_the_cache_never_exceeds_its_byte_limit_and_evicts_the_least_recently_used():
    entry = torch.zeros(10, 4)  # 160 bytes
    cache = FeatureCache(max_bytes=400)
    for key in "abc":
        cache.put(key, entry)
        assert cache.bytes <= 400
    assert len(cache) == 2 and cache.evicted == 1 and cache.get("a") is None
    assert cache.get("b") is not None  # b is now the most recently used
    cache.put("d", entry)
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    assert (cache.hits, cache.misses, cache.evicted) == (3, 2, 2) and cache.bytes == 320
    cache.put("huge", torch.zeros(200, 4))  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2 and cache.bytes == 320


def held_bytes(cache: FeatureCache) -> int:
    """Bytes of the storages the cache's entries keep alive (each counted once), not their counted sizes."""
    storages = {entry.untyped_storage().data_ptr(): entry.untyped_storage().nbytes() for entry in cache._entries.values()}
    return sum(storages.values())


@torch.no_grad()
def test_entries_hold_exactly_the_bytes_they_are_counted_for(testbed):
    """Issue 24 item 2: after one batch of 8 new images, a cache with room for 2 entries holds at most its limit
    (not 2 entries pinning the batch's whole feature tensor, 8x their counted size)."""
    model, processor = testbed
    images = [question.image for question in make_questions(8, seed=41)]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    jobs = [Job(encode_conversation(processor, Conversation(prompt, [image]))) for image in images]
    entry_bytes = FeatureCache(max_bytes=2**30)
    Engine(model, processor, entry_bytes).generate(jobs, TrimSetting(None))
    assert len(entry_bytes) == 8
    size = entry_bytes.bytes // 8
    cache = FeatureCache(max_bytes=2 * size)
    Engine(model, processor, cache).generate(jobs, TrimSetting(None))
    assert len(cache) == 2 and cache.bytes == 2 * size
    assert held_bytes(cache) == cache.bytes, f"2 entries hold {held_bytes(cache)} bytes, counted as {cache.bytes}"
    view = torch.zeros(8, 10, 4)[0]  # a view of a tensor 8x its size
    small = FeatureCache(max_bytes=1000)
    small.put("view", view)
    assert held_bytes(small) == small.bytes == view.nbytes


@pytest.mark.parametrize(
    "method",
    [None, HeadwiseTopK(head_k=0.05), HeadwiseTopK(head_k=0.05, query_rows="last_turn"), MergeRemainder(HeadwiseTopK(head_k=0.05))],
    ids=lambda m: m.label() if m else "untrimmed",
)
@torch.no_grad()
def test_follow_ups_with_the_cache_answer_as_without_it_and_skip_the_vision_tower(testbed, dialogues, method):
    model, processor = testbed
    setting = TrimSetting(method)
    plain = Engine(model, processor)
    cache = FeatureCache(max_bytes=2**30)
    cached = Engine(model, processor, cache)
    turns = [(first_turn(d), d.first.image) for d in dialogues]
    first = answers(plain, processor, turns, setting)
    assert answers(cached, processor, turns, setting) == first
    assert cache.misses == len(dialogues) and cache.hits == 0
    vision_calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *args: vision_calls.append(1))
    try:
        # the follow-ups, batched with a new image (so that one slot misses)
        later = [(follow_up(d, answer), d.first.image) for d, answer in zip(dialogues, first)]
        later.append((first_turn(dialogues[0]), make_questions(1, seed=99)[0].image))
        with_cache = answers(cached, processor, later, setting)
        assert len(vision_calls) == 1, "the vision tower ran for more than the one new image"
        assert cache.hits == len(dialogues) and cache.misses == len(dialogues) + 1
        without = answers(plain, processor, later, setting)
    finally:
        hook.remove()
    assert with_cache == without


def test_serve_follow_up_hits_the_cache_and_answers_as_the_uncached_engine(testbed, dialogues, tmp_path_factory):
    model, processor = testbed
    directory = save_multitoken_testbed(tmp_path_factory.mktemp("multitoken"), seed=3)
    server = Server("--model", str(directory), "--served-model-name", "mt", "--method", "headwise_topk",
                    "--head-k", "0.05", "--feature-cache-bytes", str(2**20))  # fmt: skip
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        dialogue = dialogues[0]
        url = data_url(png_bytes(dialogue.first.image))
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": dialogue.first.question}]}  # fmt: skip

        def ask(messages, trim_options=None):
            extra = {"trim": trim_options} if trim_options else None
            reply = client.chat.completions.create(
                model="mt", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
            )
            return reply.choices[0].message.content

        answer = ask([user])
        conversation = [user, {"role": "assistant", "content": answer}, {"role": "user", "content": dialogue.second.question}]
        second = ask(conversation)
        last_turn = ask(conversation, {"method": "headwise_topk", "head_k": 0.05, "query_rows": "last_turn"})
        metrics = server.get("/metrics").text
        assert metric(metrics, "trimllama_feature_cache_hits_total") == 2
        assert metric(metrics, "trimllama_feature_cache_misses_total") == 1
        assert 0 < metric(metrics, "trimllama_feature_cache_bytes") <= 2**20
    finally:
        server.stop()
    reference = Engine(model, processor)  # no cache: the vision tower runs for every turn
    setting = TrimSetting(HeadwiseTopK(head_k=0.05))
    with torch.no_grad():
        assert answers(reference, processor, [(first_turn(dialogue), dialogue.first.image)], setting) == [answer]
        expected = answers(reference, processor, [(follow_up(dialogue, answer), dialogue.first.image)], setting)
        last_turn_setting = TrimSetting(HeadwiseTopK(head_k=0.05, query_rows="last_turn"))
        expected_last_turn = answers(reference, processor, [(follow_up(dialogue, answer), dialogue.first.image)], last_turn_setting)
    assert second == expected[0]
    assert last_turn == expected_last_turn[0]


def test_serve_refuses_a_negative_feature_cache_size(capsys):
    from trimllama.cli import main

    assert main(["serve", "--feature-cache-bytes", "-1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--feature-cache-bytes" in error and len(error.splitlines()) == 1

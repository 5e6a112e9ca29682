"""Conversations: later turns reuse an image's trimmed K/V and every earlier turn from the radix cache, and no answer
depends on what is cached (query_rows="image_turn", the engine's default)."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, MAX_TILES, PATCHES, follow_up, image_slots, prompt, running
from tiny_checkpoint import hf_answer

FIRST = ["what color is the square", "how many circles are there"]
LATER = [("red", "what shape is left of the circle"), ("3", "is there a blue square")]


def conversation(first: str, turns: int) -> list[str]:
    """The prompts of a conversation's turns: each the previous one, a fixed answer, then the next question."""
    prompts = [prompt(first)]
    for answer, question in LATER[: turns - 1]:
        prompts.append(follow_up(prompts[-1], answer, question))
    return prompts


@pytest.fixture(scope="module")
def per_prompt_server(checkpoint, workdir):
    """Today's per-prompt keying: every prompt row scores, so the image's K/V are keyed on the whole prompt."""
    with running(checkpoint, workdir, "per-prompt", ["--budget", str(BUDGET), "--param", "query_rows=all"]) as server:
        yield server


@pytest.mark.parametrize("first", FIRST)
def test_each_turn_equals_its_flushed_self_and_reuses_the_cache(stock_server, trimmed_server, image_files, first):
    """Turns 2 and 3 answer as they do after a cache flush, and their cached tokens cover the image's slots and every
    earlier turn's prompt, exactly as stock SGLang's do (less the image slots each layout takes)."""
    prompts = conversation(first, 3)
    image = image_files["four"]
    text_reused = {}
    for server, slots in ((trimmed_server, image_slots(BUDGET)), (stock_server, MAX_TILES * PATCHES)):
        server.flush_cache()
        cached_run = [server.generate(text, image) for text in prompts]  # each turn finds the ones before
        flushed_run = []
        for text in prompts:
            server.flush_cache()
            flushed_run.append(server.generate(text, image))
        assert [r["output_ids"] for r in cached_run] == [r["output_ids"] for r in flushed_run]
        for previous, turn in zip(cached_run, cached_run[1:]):
            assert turn["meta_info"]["cached_tokens"] >= previous["meta_info"]["prompt_tokens"]
        text_reused[server is stock_server] = [turn["meta_info"]["cached_tokens"] - slots for turn in cached_run[1:]]
    assert text_reused[False] == text_reused[True]


def test_later_turns_keep_the_first_turns_tokens(trimmed_server, image_files):
    """Different first questions keep different tokens of the same image; a conversation's later turns, encoded
    from scratch, keep exactly what its first turn kept."""
    kept = {}
    for first in FIRST:
        for turn, text in enumerate(conversation(first, 3)):
            trimmed_server.flush_cache()
            before = len(trimmed_server.kept_records())
            trimmed_server.generate(text, image_files["four"])
            (record,) = trimmed_server.kept_records()[before:]
            kept[first, turn] = record["kept"]
    for first in FIRST:
        assert kept[first, 0] == kept[first, 1] == kept[first, 2]
    assert kept[FIRST[0], 0] != kept[FIRST[1], 0]


@pytest.mark.parametrize("turns", [2, 3])
def test_follow_up_turns_equal_the_hf_path(trimmed_server, hf, image_files, turns):
    """The last turn's token ids and kept indices equal the Hugging Face path with the same rule."""
    text = conversation(FIRST[1], turns)[-1]
    expected, kept = hf_answer(hf, text, image_files["four"], BUDGET)
    trimmed_server.flush_cache()
    before = len(trimmed_server.kept_records())
    assert trimmed_server.generate(text, image_files["four"])["output_ids"] == expected
    assert [record["kept"] for record in trimmed_server.kept_records()[before:]] == [[kept]]


def test_the_cache_key_holds_the_scoring_rows(trimmed_server, per_prompt_server, image_files):
    """Without a flush, a second prompt on the same image is encoded again when its scoring rows differ, and answers
    as it does alone: image_turn keys on the image's user message, per-prompt keying on the whole prompt. (A key on
    the image alone would hand the second prompt the first one's K/V: no new record, another answer.)"""
    first, second = prompt(FIRST[0]), prompt(FIRST[1])
    same_message = follow_up(first, "red", "what shape is left of the circle")
    for server, reencoded in ((trimmed_server, [second]), (per_prompt_server, [second, same_message])):
        alone = {}
        for text in (second, same_message):
            server.flush_cache()
            alone[text] = server.generate(text, image_files["four"])["output_ids"]
        server.flush_cache()
        server.generate(first, image_files["four"])
        for text in (second, same_message):
            before = len(server.kept_records())
            assert server.generate(text, image_files["four"])["output_ids"] == alone[text]
            assert len(server.kept_records()) - before == (1 if text in reencoded else 0), text

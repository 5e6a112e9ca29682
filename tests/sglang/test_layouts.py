"""The image pool changes where K/V live, never what is computed: it equals SGLang's own layout and stock SGLang."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, FULL_BUDGET, MAX_TILES, PATCHES, image_slots, prompt, running

QUESTIONS = ["what color is the square", "how many circles are there"]
TEXT_ONLY = "<|begin_of_text|>question : " + " ".join(["is there a red circle"] * 3) + " answer :"


@pytest.fixture(scope="module")
def none_server(checkpoint, workdir):
    with running(checkpoint, workdir, "none", ["--method", "none"]) as server:
        yield server


@pytest.fixture(scope="module")
def shared_server(checkpoint, workdir):
    with running(checkpoint, workdir, "shared", ["--budget", str(BUDGET), "--shared-pool"]) as server:
        yield server


@pytest.fixture(scope="module")
def full_budget_server(checkpoint, workdir):
    with running(checkpoint, workdir, "full", ["--budget", str(FULL_BUDGET)]) as server:
        yield server


def cases(image_files) -> list[tuple[str | list[str], object]]:
    """1-, 2- and 4-tile images, two images in one request, and a batch of a text-only and an image request."""
    return [
        (prompt(QUESTIONS[0]), image_files["four"]),
        (prompt(QUESTIONS[1]), image_files["four_b"]),
        (prompt(QUESTIONS[0]), image_files["two"]),
        (prompt(QUESTIONS[1]), image_files["one"]),
        (prompt(QUESTIONS[1], 2), [image_files["four"], image_files["two"]]),
        ([TEXT_ONLY, prompt(QUESTIONS[0])], [None, image_files["one"]]),
    ]


def answers(server, image_files) -> list:
    server.flush_cache()
    results = []
    for text, images in cases(image_files):
        result = server.generate(text, images)
        results.append([r["output_ids"] for r in result] if isinstance(result, list) else result["output_ids"])
    return results


def test_method_none_in_the_image_pool_equals_stock(stock_server, none_server, image_files):
    """Every image token kept (padding tiles too, as SGLang's own Mllama): stock's token ids, in 2/5 of the slots."""
    expected = answers(stock_server, image_files)
    assert answers(none_server, image_files) == expected
    assert min(len(ids) for ids in expected[:5]) >= 4  # decode steps read the packed slots
    assert len({tuple(ids) for ids in expected[:5]}) == 5
    stock = stock_server.generate(prompt(QUESTIONS[0]), image_files["one"])["meta_info"]["prompt_tokens"]
    packed = none_server.generate(prompt(QUESTIONS[0]), image_files["one"])["meta_info"]["prompt_tokens"]
    assert stock - packed == MAX_TILES * PATCHES - image_slots(MAX_TILES * PATCHES)


def test_budget_over_every_token_equals_stock(stock_server, full_budget_server, image_files):
    """A budget >= all tokens of a 4-tile image keeps them all: selection changes nothing (4-tile images have no
    padding tiles, which stock SGLang attends to and trimllama never keeps)."""
    for name in ("four", "four_b"):
        for question in QUESTIONS:
            stock = stock_server.generate(prompt(question), image_files[name])
            full = full_budget_server.generate(prompt(question), image_files[name])
            assert full["output_ids"] == stock["output_ids"], (name, question)
    assert f"budget {FULL_BUDGET} >= every image's {MAX_TILES * PATCHES} tokens: nothing is trimmed" in full_budget_server.log.read_text()


def test_image_pool_equals_shared_pool(trimmed_server, shared_server, image_files):
    """The same selection in both layouts: the same kept tokens and token ids, fewer slots in the image pool."""
    dumped = len(trimmed_server.kept_records()), len(shared_server.kept_records())
    assert answers(trimmed_server, image_files) == answers(shared_server, image_files)
    kept_pool = [record["kept"] for record in trimmed_server.kept_records()[dumped[0] :]]
    kept_shared = [record["kept"] for record in shared_server.kept_records()[dumped[1] :]]
    assert kept_pool == kept_shared and len(kept_pool) == len(cases(image_files))
    pool = trimmed_server.generate(prompt(QUESTIONS[0]), image_files["four"])["meta_info"]["prompt_tokens"]
    shared = shared_server.generate(prompt(QUESTIONS[0]), image_files["four"])["meta_info"]["prompt_tokens"]
    assert shared - pool == BUDGET - image_slots(BUDGET)

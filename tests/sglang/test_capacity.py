"""The image pool under pressure: many more image requests than the pool holds at once, all sent together."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from conftest import POOL_SLOTS, prompt

from trimllama.testing import random_image

REQUESTS = 96
CHECKED_ALONE = (0, 1, 47, 95)


@pytest.fixture(scope="module")
def own_images(workdir) -> list[str]:
    """A 4-tile image per request, so no request reuses another's cached image K/V."""
    paths = []
    for seed in range(REQUESTS):
        paths.append(str(workdir / f"capacity-{seed}.png"))
        random_image(2, 2, seed=1000 + seed).save(paths[-1])
    return paths


def pool_state(server) -> float:
    """Free plus evictable slots, read right after a small text request (SGLang updates its gauges when it logs)."""
    server.flush_cache()
    server.generate("<|begin_of_text|>question : what answer :", max_new_tokens=1)
    return server.metric("sglang:kv_available_tokens") + server.metric("sglang:kv_evictable_tokens")


def burst(server, own_images) -> tuple[int, list[list[int]]]:
    """All requests in one /generate batch, 8 new tokens each: SGLang's own peak `#running-req` and the answers."""
    start = len(server.log_lines())
    results = server.generate([prompt("what color is the square")] * REQUESTS, own_images, max_new_tokens=8, ignore_eos=True)
    return server.running_peak(start), [result["output_ids"] for result in results]


def test_image_pool_holds_far_more_requests(stock_server, trimmed_server, own_images):
    """At the same pool (4,096 slots): stock holds ~14 4-tile requests at once; `--budget 64` in the image pool, where
    an image token costs 2 of a slot's 5 layer rows, at least 5.5 times as many. Every request completes with its
    lone answer, and the pool's free + evictable slots end where they started (nothing leaks)."""
    peaks = {}
    for name, server in (("stock", stock_server), ("trimmed", trimmed_server)):
        before = pool_state(server)
        peaks[name], batched = burst(server, own_images)
        assert all(len(ids) == 8 for ids in batched)
        assert pool_state(server) == before
        assert before >= POOL_SLOTS - 16
        if name == "trimmed":
            for index in CHECKED_ALONE:
                server.flush_cache()
                assert server.generate(prompt("what color is the square"), own_images[index], ignore_eos=True)["output_ids"] == batched[index]
    assert peaks["stock"] >= 10
    assert peaks["trimmed"] >= 5.5 * peaks["stock"], peaks

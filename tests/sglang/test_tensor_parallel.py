"""`--tp 2` (gloo collectives on CPU): what is guaranteed, and what is not.

Guaranteed: every rank keeps exactly the same tokens (the per-head scores are all-gathered, so every rank runs the
same `select` on the same numbers). Not guaranteed: the same tokens as `--tp 1`. The row-parallel projections sum in
another order, so scores move in their last bits and a token tied with the cut-off may swap with its neighbour (an
outside check reported 2 of 15 requests differing by one or two tokens). Asserted: the kept sets overlap almost entirely,
and where they are equal the answers are too.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, prompt, running

CASES = [(name, question) for name in ("four", "four_b", "two", "one") for question in ("is there a red circle", "how many squares are there")]


@pytest.fixture(scope="module")
def tp2_server(checkpoint, workdir):
    with running(checkpoint, workdir, "tp2", ["--budget", str(BUDGET)], tp=2) as server:
        yield server


def test_ranks_agree_and_tp2_keeps_almost_what_tp1_keeps(trimmed_server, tp2_server, image_files):
    equal_sets = 0
    for name, question in CASES:
        trimmed_server.flush_cache()
        tp2_server.flush_cache()
        before = len(trimmed_server.kept_records()), len(tp2_server.kept_records())
        one = trimmed_server.generate(prompt(question), image_files[name])["output_ids"]
        two = tp2_server.generate(prompt(question), image_files[name])["output_ids"]
        (kept_one,) = [record["kept"] for record in trimmed_server.kept_records()[before[0] :]]
        ranks = tp2_server.kept_records()[before[1] :]
        assert sorted(record["rank"] for record in ranks) == [0, 1]
        assert ranks[0]["kept"] == ranks[1]["kept"], "the ranks must keep the same tokens"
        kept_two = ranks[0]["kept"]
        overlap = sum(len(set(a) & set(b)) for a, b in zip(kept_one, kept_two)) / sum(len(a) for a in kept_one)
        assert overlap >= 0.9, (name, question, overlap)
        if kept_two == kept_one:
            equal_sets += 1
            assert two == one, (name, question)
    assert equal_sets >= len(CASES) // 2

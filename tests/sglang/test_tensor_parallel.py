"""`--tp 2` keeps the same tokens and gives the same token ids as `--tp 1` (gloo collectives on CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt")

from conftest import BUDGET, running


@pytest.fixture(scope="module")
def tp2_server(checkpoint, workdir):
    with running(checkpoint, workdir, "tp2", ["--budget", str(BUDGET)], tp=2) as server:
        yield server


def test_tp2_equals_tp1(trimmed_server, tp2_server, image_files):
    for name, question in [("four", "is there a red circle"), ("two", "is there a blue square")]:
        text = f"<|image|><|begin_of_text|>question : {question} answer :"
        one = trimmed_server.generate(text, image_files[name])
        kept_one = trimmed_server.kept_records()[-1]["kept"]
        before = len(tp2_server.kept_records())
        two = tp2_server.generate(text, image_files[name])
        records = tp2_server.kept_records()[before:]
        assert two["output_ids"] == one["output_ids"]
        assert sorted(record["rank"] for record in records) == [0, 1]
        assert all(record["kept"] == kept_one for record in records)

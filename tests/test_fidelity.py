"""On the shipped, trained testbed: trimming by attention beats random at equal counts where it can be told
apart, and remainder tokens bring counting back. Assertions are relative to the measured untrimmed accuracy."""

import pytest
import torch

import trimllama
from trimllama.harness.evaluate import Arm, answer_questions, score
from trimllama.testbed import CHECKPOINT_DIR, answer_matches, build_prompt, load_testbed, make_questions

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="the testbed checkpoint is not in this checkout"
)

QUESTIONS, SEED = 240, 31337
QUARTER = trimllama.HeadwiseTopK(head_k=0.08)  # keeps about a quarter (0.24) of the tokens on the testbed
FIFTH = trimllama.HeadwiseTopK(head_k=0.07)  # keeps about a fifth (0.20)


@pytest.fixture(scope="module")
def results():
    torch.set_num_threads(2)
    model, processor = load_testbed()
    questions = make_questions(QUESTIONS, seed=SEED)
    arms = {
        "untrimmed": Arm("untrimmed", None, None),
        "floor": Arm("floor", None, trimllama.Floor()),
        "quarter": Arm("headwise_topk", QUARTER.head_k, QUARTER),
        "quarter_random": Arm("random", QUARTER.head_k, trimllama.RandomSelect(like=QUARTER, seed=0)),
        "fifth": Arm("headwise_topk", FIFTH.head_k, FIFTH),
        "fifth_remainder": Arm("headwise_topk + remainder", FIFTH.head_k, trimllama.MergeRemainder(FIFTH)),
    }
    out = {}
    for key, arm in arms.items():
        answers, kept, extra = answer_questions(model, processor, questions, arm.method, build_prompt, batch_size=48)
        out[key] = score(arm, questions, answers, kept, extra, answer_matches)
    return out


def test_settings_keep_about_a_quarter_and_a_fifth(results):
    assert 0.18 <= results["quarter"].kept_fraction <= 0.32
    assert 0.13 <= results["fifth"].kept_fraction <= 0.25
    assert results["quarter_random"].kept_fraction == pytest.approx(results["quarter"].kept_fraction)


def test_headwise_beats_count_matched_random_where_the_floor_is_low(results):
    """Where the floor is >= 20 points below untrimmed, attention beats random at equal counts by >= 10 points.

    Counting is the documented exception (README, "Fidelity testbed"): at a quarter of the tokens
    HeadwiseTopK keeps every object patch (measured recall 1.00) and still loses counting accuracy; on
    these questions it does not beat count-matched random (0.65 against 0.67; untrimmed 0.87), though
    it does by 11-13 points on the README's 1,000. Counting reads the share of the later layers' attention mass
    that lands on objects against background, and dropping background tokens changes that share;
    the remainder test below shows that summarising the dropped tokens brings it back.
    """
    untrimmed, floor = results["untrimmed"].per_type, results["floor"].per_type
    informative = [t for t in untrimmed if untrimmed[t] - floor[t] >= 0.2 and t != "count"]
    if not informative:
        pytest.skip(f"no question type but counting separates methods on this checkpoint: untrimmed {untrimmed}, floor {floor}")
    for qtype in informative:
        headwise, random = results["quarter"].per_type[qtype], results["quarter_random"].per_type[qtype]
        assert headwise >= random + 0.10, f"{qtype}: headwise {headwise:.3f} vs random {random:.3f}"


def test_remainder_closes_half_the_counting_gap_at_a_fifth_of_the_tokens(results):
    untrimmed = results["untrimmed"].per_type["count"]
    plain, remainder = results["fifth"].per_type["count"], results["fifth_remainder"].per_type["count"]
    gap = untrimmed - plain
    if gap < 0.05:
        pytest.skip(f"plain trimming loses no counting accuracy here ({plain:.3f} vs {untrimmed:.3f}): no gap to close")
    assert remainder - plain >= 0.5 * gap, f"count: untrimmed {untrimmed:.3f}, plain {plain:.3f}, remainder {remainder:.3f}"

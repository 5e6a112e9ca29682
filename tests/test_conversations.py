"""Issue 19 on the shipped testbed: two-turn conversations, the reused first-turn kept set, and the paper's
open checks (least attended tokens; the kept fraction per type and per tile count)."""

import pytest
import torch

import trimllama
from trimllama.harness.evaluate import Arm, answer_questions, build_arms, score
from trimllama.harness.evaluate_conversations import ConversationArm, FixedKeep, _generate, first_messages, run_arm
from trimllama.loading import chat_text
from trimllama.testbed import CHECKPOINT_DIR, answer_matches, build_prompt, load_testbed, make_conversations, make_questions

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="the testbed checkpoint is not in this checkout"
)


@pytest.fixture(scope="module")
def testbed():
    torch.set_num_threads(2)
    return load_testbed()


def test_conversations_ask_about_two_different_objects_of_one_image():
    dialogues = make_conversations(40, seed=5)
    assert [d.second.question for d in dialogues] == [d.second.question for d in make_conversations(40, seed=5)]
    assert {d.qtype for d in dialogues} == {"color", "shape", "count", "relation"}
    for d in dialogues:
        assert d.first.image is d.second.image and d.first.objects is d.second.objects
        (target,) = d.first.target_indices
        assert target not in d.second.target_indices
        named = d.first.objects[target]
        if d.first.qtype == "color":
            assert d.first.answer == named.color and sum(o.shape == named.shape for o in d.first.objects) == 1
        else:
            assert d.first.answer == named.shape and sum(o.color == named.color for o in d.first.objects) == 1


@torch.no_grad()
def test_the_reused_arm_keeps_the_first_turns_set_on_the_second_turn(testbed):
    model, processor = testbed
    dialogues = make_conversations(6, seed=8)
    images = [[d.first.image] for d in dialogues]
    texts = [chat_text(processor, first_messages(d.first)) for d in dialogues]
    _, _, keep = _generate(model, processor, images, texts, trimllama.HeadwiseTopK(head_k=0.05))
    follow_ups = [chat_text(processor, first_messages(d.second)) for d in dialogues]
    _, kept, reused = _generate(model, processor, images, follow_ups, None, keep=keep)
    assert torch.equal(reused, keep) and 0 < sum(kept) / len(kept) < 0.3
    result = run_arm(model, processor, dialogues, ConversationArm("untrimmed", None, None), answer_matches)
    assert result.first_turn_accuracy >= 0.8 and set(result.per_type) <= {"color", "shape", "count", "relation"}
    assert isinstance(FixedKeep(keep=keep), trimllama.SelectionMethod)


@torch.no_grad()
def test_least_attended_tokens_answer_colour_far_worse_than_the_most_attended(testbed):
    """The feature-order check: only the robust part (measured 0.93 against 0.55 on 150 colour questions)."""
    model, processor = testbed
    questions = make_questions(96, seed=4242, qtypes=("color",))
    accuracy = {}
    for order in ("most", "least"):
        method = trimllama.HeadwiseTopK(head_k=0.05, order=order)
        answers, kept, extra = answer_questions(model, processor, questions, method, build_prompt, batch_size=48)
        accuracy[order] = score(Arm(order, 0.05, method), questions, answers, kept, extra, answer_matches)
    most, least = accuracy["most"], accuracy["least"]
    assert most.accuracy >= least.accuracy + 0.2, f"most {most.accuracy:.3f}, least {least.accuracy:.3f}"
    assert set(most.kept_by_tiles) <= {"1", "2", "3", "4"} and set(most.kept_by_type) == {"color"}


def test_least_attended_arms_come_with_their_own_count_matched_random():
    curves = [arm.curve for arm in build_arms(["headwise_topk"], [0.05], least_attended=True)]
    assert curves == [
        "untrimmed", "floor", "headwise_topk", "random (count-matched)",
        "headwise_topk (least attended)", "random (matched to least attended)",
    ]  # fmt: skip

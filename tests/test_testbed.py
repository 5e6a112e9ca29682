"""Tests of the fidelity testbed (trimllama.testbed): data, processor, shipped checkpoint, accuracy.

Fast on CPU (the whole file runs in well under a minute on 2 cores). Tests that need the
shipped checkpoint are skipped, with a reason, only if the checkpoint directory is missing.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")

import trimllama  # noqa: E402
from trimllama import testbed  # noqa: E402
from trimllama.testbed import build, data  # noqa: E402

HAVE_CKPT = (testbed.CHECKPOINT_DIR / "config.json").exists() and (
    testbed.CHECKPOINT_DIR / "model.safetensors"
).exists()
needs_ckpt = pytest.mark.skipif(
    not HAVE_CKPT, reason=f"testbed checkpoint missing in {testbed.CHECKPOINT_DIR} (run trimllama.testbed.train)"
)

# Held-out evaluation set: seeds used in training are 0..steps (batches) and 10_000_019 (its
# periodic evaluation); this one is disjoint.
EVAL_SEED = 424_242
EVAL_N = 200

# The target was >= 0.95 overall and >= 0.90 per type; the shipped checkpoint reaches it for
# color and shape only (see README, "Fidelity testbed"). These floors are what it measures on this
# held-out set (overall 0.815, color 1.00, shape 0.98, count 0.80, relation 0.48; shuffled images
# 0.18), less a margin of about 0.1: a regression of the checkpoint or of the loading path fails them.
MIN_OVERALL = 0.72
MIN_PER_TYPE = {"color": 0.9, "shape": 0.88, "count": 0.7, "relation": 0.38}
# Untrimmed minus Floor per type on the same questions, less a margin. Measured: colour 1.00 - 0.50, count
# 0.80 - 0.44 (shape 0.98 - 0.98, relation 0.48 - 0.42: no gap to assert).
MIN_FLOOR_GAP = {"color": 0.35, "count": 0.2}


# --------------------------------------------------------------------------- data


def test_generator_is_deterministic_and_covers_all_types():
    a = testbed.make_questions(24, seed=7)
    b = testbed.make_questions(24, seed=7)
    c = testbed.make_questions(24, seed=8)
    assert [(q.question, q.answer, q.qtype, q.tiles) for q in a] == [(q.question, q.answer, q.qtype, q.tiles) for q in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))
    assert set(q.qtype for q in a) == set(testbed.QUESTION_TYPES)
    assert {"color", "shape", "count", "relation"} <= set(testbed.QUESTION_TYPES)


def test_questions_are_consistent_with_their_scenes():
    qs = testbed.make_questions(200, seed=11)
    tiles_seen = Counter(q.num_tiles for q in qs)
    assert set(tiles_seen) == {1, 2, 3, 4}
    for q in qs:
        assert q.answer in testbed.ANSWERS_BY_TYPE[q.qtype]
        assert " " not in q.answer
        h, w = q.tiles[0] * data.TILE_SIZE, q.tiles[1] * data.TILE_SIZE
        assert q.image.size == (w, h)
        for ob in q.objects:
            x0, y0, x1, y1 = ob.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # objects are small: at most 16x16 px of a 112x112 tile (2% of a tile's area)
            assert (x1 - x0) * (y1 - y0) <= 16 * 16
        words = q.question.split()
        if q.qtype == "color":
            shape = words[words.index("the") + 1]
            assert [o.shape for o in q.objects].count(shape) == 1
            assert next(o.color for o in q.objects if o.shape == shape) == q.answer
        elif q.qtype == "shape":
            color = words[words.index("the") + 1]
            assert [o.color for o in q.objects].count(color) == 1
            assert next(o.shape for o in q.objects if o.color == color) == q.answer
        elif q.qtype == "count":
            color = words[2]
            assert sum(o.color == color for o in q.objects) == int(q.answer)
        elif q.qtype == "relation":
            color = words[words.index("the") + 1]
            anchor = [o for o in q.objects if o.color == color]
            assert len(anchor) == 1
            left = [o for o in q.objects if o.center[0] < anchor[0].center[0]]
            assert len(left) == 1 and left[0].shape == q.answer
        assert q.target_boxes or (q.qtype == "count" and q.answer == "0")
    # answers are balanced enough that no answer dominates a type
    for t in testbed.QUESTION_TYPES:
        ans = Counter(q.answer for q in qs if q.qtype == t)
        assert max(ans.values()) / sum(ans.values()) < 0.45, (t, ans)


# --------------------------------------------------------------------------- processor


def _processors():
    procs = [("built", build.make_processor())]
    if HAVE_CKPT:
        from transformers import AutoProcessor

        procs.append(("shipped", AutoProcessor.from_pretrained(testbed.CHECKPOINT_DIR)))
    return procs


@pytest.mark.parametrize("which", ["built", "shipped"])
def test_processor_tiles_images_with_padding_tiles(which):
    procs = dict(_processors())
    if which not in procs:
        pytest.skip(f"testbed checkpoint missing in {testbed.CHECKPOINT_DIR}")
    proc = procs[which]
    proc.tokenizer.padding_side = "left"
    rng = __import__("random").Random(0)
    qs = [data.make_question(rng, "color", tiles=t) for t in data.TILE_LAYOUTS]
    enc = proc(images=[[q.image] for q in qs], text=[testbed.build_prompt(proc, q.question) for q in qs],
               return_tensors="pt", padding=True)
    B = len(qs)
    assert enc["pixel_values"].shape == (B, 1, 4, 3, data.TILE_SIZE, data.TILE_SIZE)
    n_tiles = enc["aspect_ratio_mask"][:, 0].sum(-1).tolist()
    assert n_tiles == [q.num_tiles for q in qs] == [1, 2, 2, 3, 4]
    assert (enc["aspect_ratio_mask"] == 0).any()  # padding tiles occur in the batch
    # aspect ratio ids follow the supported list [[1,1],[1,2],[1,3],[1,4],[2,1],[2,2],[3,1],[4,1]] + 1
    assert enc["aspect_ratio_ids"][:, 0].tolist() == [1, 2, 5, 3, 6]
    cam = enc["cross_attention_mask"]
    assert cam.shape[:3] == (B, enc["input_ids"].shape[1], 1) and cam.shape[3] == 4
    # every real text position after <|image|> sees exactly the real tiles
    for i, q in enumerate(qs):
        ids = enc["input_ids"][i].tolist()
        pos = ids.index(build.IMAGE_ID)
        assert cam[i, pos:, 0].sum(-1).tolist() == [q.num_tiles] * (len(ids) - pos)
        assert cam[i, :pos].sum() == 0
    # the prompt: image token, bos, then words; left padding
    toks = proc.tokenizer.convert_ids_to_tokens(enc["input_ids"][-1])
    assert toks[:2] == [build.IMAGE, build.BOS] and toks[-2:] == ["answer", ":"]


def test_prompt_and_chat_template_agree():
    proc = build.make_processor()
    q = "what color is the triangle ?"
    prompt = testbed.build_prompt(proc, q)
    assert prompt == "<|image|><|begin_of_text|>question : what color is the triangle ? answer :"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == prompt
    assert testbed.answer_matches(" red", "red")
    assert testbed.answer_matches("Red blue", "red")
    assert not testbed.answer_matches("blue red", "red")
    assert not testbed.answer_matches("", "0")


# --------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def loaded():
    if not HAVE_CKPT:
        pytest.skip(f"testbed checkpoint missing in {testbed.CHECKPOINT_DIR} (run trimllama.testbed.train)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return testbed.load_testbed()


@needs_ckpt
def test_checkpoint_loads_offline_and_is_consistent(loaded):
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    model, proc = loaded
    assert isinstance(model, MllamaForConditionalGeneration)
    assert isinstance(proc, MllamaProcessor)
    cfg = model.config
    tok = proc.tokenizer
    assert cfg.image_token_index == tok.convert_tokens_to_ids("<|image|>") == proc.image_token_id
    assert cfg.text_config.eos_token_id == tok.eos_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.text_config.bos_token_id == tok.bos_token_id
    assert len(cfg.text_config.cross_attention_layers) >= 3
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert model.model.vision_model.num_patches == (data.TILE_SIZE // data.PATCH_SIZE) ** 2 + 1
    assert cfg.vision_config.max_num_tiles == 4
    for i in cfg.text_config.cross_attention_layers:  # gates are trained, not the zero init
        assert float(model.model.language_model.layers[i].cross_attn_attn_gate.detach().abs()) > 0.05
    size = sum(f.stat().st_size for f in testbed.CHECKPOINT_DIR.iterdir() if f.is_file())
    assert size < 20 * 2**20


def _accuracy(model, proc, questions, shuffle_images=False, batch_size=50, method=None):
    per: dict[str, list[bool]] = {}
    for i in range(0, len(questions), batch_size):
        qs = questions[i:i + batch_size]
        imgs = [q.image for q in qs]
        if shuffle_images:
            imgs = imgs[1:] + imgs[:1]  # each question gets its neighbour's image
        enc = proc(images=[[im] for im in imgs], text=[testbed.build_prompt(proc, q.question) for q in qs],
                   return_tensors="pt", padding=True)
        with torch.no_grad(), (trimllama.trim(model, method) if method is not None else contextlib.nullcontext()):
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        gen = proc.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for q, g in zip(qs, gen):
            per.setdefault(q.qtype, []).append(testbed.answer_matches(g, q.answer))
    res = {t: float(np.mean(v)) for t, v in per.items()}
    res["overall"] = float(np.mean([x for v in per.values() for x in v]))
    return res


@pytest.fixture(scope="module")
def eval_questions():
    return testbed.make_questions(EVAL_N, seed=EVAL_SEED)


@pytest.fixture(scope="module")
def real_acc(loaded, eval_questions):
    model, proc = loaded
    return _accuracy(model, proc, eval_questions)


@pytest.fixture(scope="module")
def floor_acc(loaded, eval_questions):
    model, proc = loaded
    return _accuracy(model, proc, eval_questions, method=trimllama.Floor())


@pytest.fixture(scope="module")
def shuffled_acc(loaded, eval_questions):
    model, proc = loaded
    return _accuracy(model, proc, eval_questions, shuffle_images=True)


@needs_ckpt
def test_heldout_accuracy_meets_target(real_acc):
    print("held-out accuracy", real_acc)
    assert real_acc["overall"] >= MIN_OVERALL, real_acc
    for t, floor in MIN_PER_TYPE.items():
        assert real_acc[t] >= floor, (t, real_acc)



@needs_ckpt
def test_later_cross_attention_layers_carry_colour_and_count(real_acc, floor_acc):
    """Issue 28's floor gap, as far as the shipped checkpoint reaches it: with the later cross-attention layers given
    no image token (`Floor`), colour and count fall by at least 20 points; shape and relation do not (the first
    cross-attention layer answers them alone; README, "Fidelity testbed")."""
    print("floor accuracy", floor_acc)
    for qtype, gap in MIN_FLOOR_GAP.items():
        assert real_acc[qtype] - floor_acc[qtype] >= gap, (qtype, real_acc, floor_acc)


@needs_ckpt
def test_follow_up_questions_are_answered(loaded):
    """The checkpoint was fine-tuned on two-turn conversations: second turns (the first answer given) score 0.825
    on these 120 (the checkpoint before that fine-tuning: 0.57). The floor is that less about 0.1."""
    from trimllama.testbed import train

    model, processor = loaded
    second_turn = train.evaluate(model, processor, data.make_conversations(120, seed=EVAL_SEED))
    print("second-turn accuracy", second_turn)
    assert second_turn["overall"] >= 0.72, second_turn

@needs_ckpt
def test_shuffled_images_fall_to_chance(real_acc, shuffled_acc, eval_questions):
    """With each question paired with another question's image the answers must collapse to
    about the majority-answer rate: the model cannot answer from the text alone."""
    print("shuffled-image accuracy", shuffled_acc)
    assert shuffled_acc["overall"] <= 0.30
    assert real_acc["overall"] - shuffled_acc["overall"] >= 0.15
    for t in ("color", "shape", "count"):  # relation is too weak for a 0.2 gap on 200 questions
        assert real_acc[t] - shuffled_acc[t] >= 0.2, (t, real_acc[t], shuffled_acc[t])
    for t in testbed.QUESTION_TYPES:
        ans = Counter(q.answer for q in eval_questions if q.qtype == t)
        majority = max(ans.values()) / sum(ans.values())
        assert shuffled_acc[t] <= majority + 0.2, (t, shuffled_acc[t], majority)


def test_conversation_batches_train_the_second_answer():
    """A conversation's training text is the chat template's second turn with the first answer given, then the
    second answer and EOS: the two positions `train` puts its loss on."""
    from trimllama.testbed import train

    processor = build.make_processor()
    conversation = data.make_conversations(1, seed=5)[0]
    batch = train.make_batch(processor, [conversation, conversation.second], with_answers=True)
    answer_id = processor.tokenizer.convert_tokens_to_ids(conversation.second.answer)
    first_answer_id = processor.tokenizer.convert_tokens_to_ids(conversation.first.answer)
    assert batch["input_ids"][:, -2:].tolist() == [[answer_id, build.EOS_ID]] * 2
    conversation_ids = batch["input_ids"][0].tolist()
    assert first_answer_id in conversation_ids and conversation_ids.count(build.BOS_ID) == 2
    assert build.BOS_ID in batch["input_ids"][1].tolist() and batch["input_ids"][1].tolist().count(build.BOS_ID) == 1


@needs_ckpt
def test_fine_tuning_starts_from_the_checkpoint_and_never_saves_worse(tmp_path):
    """`--init-from` evaluates the starting checkpoint first and saves a later step only when it scores at least
    as high (single questions and second turns averaged)."""
    import json

    from trimllama.testbed import train

    out = tmp_path / "out"
    train.main(["--init-from", str(testbed.CHECKPOINT_DIR), "--out", str(out), "--work-dir", str(tmp_path / "work"),
                "--conversations", "0.5", "--steps", "2", "--batch-size", "4", "--eval-n", "8", "--eval-every", "1",
                "--threads", "1", "--curriculum", "0"])
    history = torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)["history"]
    assert [record["step"] for record in history] == [0, 1, 2]
    summary = json.loads((out / "training_summary.json").read_text())
    scores = [(r["overall"] + r["second_turn"]["overall"]) / 2 for r in history]
    assert summary["best_step"] == max(r["step"] for r, score in zip(history, scores) if score == max(scores))
    assert set(summary["second_turn_accuracy_200"]) == {*data.QUESTION_TYPES, "overall"}
    assert set(summary["validation_floor_200"]) == {*data.QUESTION_TYPES, "overall"}
    assert "--init-from" in summary["commands"][0]["command"] and summary["commands"][0]["from_step"] == 0


def test_training_batches_depend_only_on_seed_and_step():
    """A resumed run (or one with --workers) sees the batches it would have seen."""
    from trimllama.testbed import train

    processor = build.make_processor()
    first, second = (train.TrainingBatches(processor, seed=3, steps=10, batch_size=3, curriculum=0.3, conversations=0.5)
                     for _ in range(2))
    (inputs, labels), (again, labels_again) = first[4], second[4]
    assert all(torch.equal(inputs[key], again[key]) for key in inputs)
    assert all(torch.equal(a, b) for a, b in zip(labels, labels_again)) and len(labels) == 3
    assert not torch.equal(first[5][0]["input_ids"], inputs["input_ids"]) or not torch.equal(first[5][0]["pixel_values"], inputs["pixel_values"])

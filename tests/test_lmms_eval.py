"""The lmms-eval plugin: lmms-eval's own CLI on a local testbed task scores exactly what `trimllama eval` scores.

Needs the `eval` extra (`pip install -e ".[eval]"`), which installs lmms-eval and the `lmms_eval.models`
entry point. Whole file: about 40 s on 2 CPU cores, most of it lmms-eval's start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")

import yaml  # noqa: E402  (installed with lmms-eval)
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from trimllama import HeadwiseTopK, MergeRemainder, RandomSelect  # noqa: E402
from trimllama.cli import main  # noqa: E402
from trimllama.harness.evaluate import answer_questions  # noqa: E402
from trimllama.integrations import lmms_eval_manifest  # noqa: E402
from trimllama.integrations.lmms_eval_model import (  # noqa: E402
    Decoding,
    StopOnStrings,
    TrimmedLlamaVision,
    build_method,
    request_images,
)
from trimllama.integrations.lmms_tasks import TASK_NAME, write_testbed_task  # noqa: E402
from trimllama.integrations.lmms_tasks.utils import doc_to_visual, process_results  # noqa: E402
from trimllama.testbed import CHECKPOINT_DIR, QUESTION_TYPES, build_prompt, make_questions  # noqa: E402

QUESTIONS, SEED, BATCH = 40, 7, 8
# lmms-eval run name -> (method model args, the matching `trimllama eval` curve and its method)
ARMS = {
    "untrimmed": ("method=none", "untrimmed", None),
    "headwise": ("method=headwise_topk,head_k=0.1", "headwise_topk", HeadwiseTopK(head_k=0.1)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The testbed is tiny: one thread is as fast, and stays fast when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untrimmed() -> TrimmedLlamaVision:
    return TrimmedLlamaVision(pretrained="testbed", batch_size=4)


def make_requests(plugin: TrimmedLlamaVision, docs: list[dict], gen_kwargs: dict) -> list[Instance]:
    """generate_until requests over `docs` (each with "images" and "question"), as lmms-eval builds them."""
    plugin.task_dict = {"toy": {"test": docs}}
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), lambda doc: doc["images"], doc_id, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


def question_docs(questions) -> list[dict]:
    return [{"images": [q.image], "question": q.question} for q in questions]


def read_run(directory) -> tuple[dict, list[str]]:
    """(results JSON, generated answers in document order) of one lmms-eval run's output directory."""
    results = json.loads(next(directory.rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in next(directory.rglob("*_samples_*.jsonl")).read_text().splitlines()]
    return results, [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]


def test_lmms_eval_cli_scores_what_trimllama_eval_scores(tmp_path, capsys):
    plugins = {entry.name: entry.value for entry in entry_points(group="lmms_eval.models")}
    assert plugins.get("trimllama") == "trimllama.integrations:lmms_eval_manifest", (
        "the lmms_eval.models entry point `trimllama` is not installed: pip install -e '.[eval]'"
    )
    checkpoint = shutil.copytree(CHECKPOINT_DIR, tmp_path / "checkpoint")  # one snapshot for every reader
    task_dir = write_testbed_task(tmp_path / "task", QUESTIONS, SEED).parent
    runs = [
        dict(
            model="trimllama",
            model_args=f"pretrained={checkpoint},{args}",
            tasks=TASK_NAME,
            include_path=str(task_dir),
            batch_size=BATCH,
            output_path=str(tmp_path / name),
            log_samples=True,
        )
        for name, (args, _, _) in ARMS.items()
    ]
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(runs))
    # offline, a private datasets cache, and one thread (fastest for the tiny testbed, and light on a busy machine)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "lmms_eval", "--config", str(tmp_path / "runs.yaml")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = completed.stdout[-4000:] + completed.stderr[-4000:]
    assert completed.returncode == 0 and all(any((tmp_path / name).rglob("*_results.json")) for name in ARMS), log

    settings = f"--methods headwise_topk --settings 0.1 --no-matched-random --questions {QUESTIONS} --seed {SEED}"
    arguments = ["eval", "--model", str(checkpoint), *settings.split(), "--batch-size", str(BATCH), "--json"]
    assert main([*arguments, "--out", str(tmp_path / "eval")]) == 0
    reference = {record["curve"]: record for record in json.loads(capsys.readouterr().out)["results"]}
    questions = make_questions(QUESTIONS, seed=SEED)
    plugin = TrimmedLlamaVision(pretrained=str(checkpoint))
    kept = {}
    for name, (_, curve, method) in ARMS.items():
        results, answers = read_run(tmp_path / name)
        scores = results["results"][TASK_NAME]
        assert scores["accuracy,none"] == reference[curve]["accuracy"], name
        per_type = {qtype: scores[f"accuracy_{qtype},none"] for qtype in QUESTION_TYPES}
        assert per_type == reference[curve]["per_type"], name
        kept[name] = results["throughput"]["avg_kept_fraction"]
        assert kept[name] == pytest.approx(reference[curve]["kept_fraction"], abs=1e-12), name
        expected, _, _ = answer_questions(plugin.model, plugin.processor, questions, method, build_prompt, BATCH)
        assert answers == expected, name
    assert kept["untrimmed"] == 1.0 and kept["headwise"] < 0.5


def test_merge_remainder_and_count_matched_random_batch_like_trimllama_eval():
    plugin = TrimmedLlamaVision(
        pretrained="testbed", method="random", like="headwise_topk", head_k=0.1, merge_remainder=True, batch_size=4
    )
    assert plugin.method == MergeRemainder(RandomSelect(like=HeadwiseTopK(head_k=0.1)))
    questions = make_questions(6, seed=3)
    answers = plugin.generate_until(make_requests(plugin, question_docs(questions), {"max_new_tokens": 4}))
    expected, kept, extra = answer_questions(plugin.model, plugin.processor, questions, plugin.method, build_prompt, 4)
    assert answers == expected
    records = plugin.kept_records
    assert [r.kept_fraction for r in records] == pytest.approx(kept) and [r.extra_tokens for r in records] == extra
    assert all(r.extra_tokens > 0 for r in records)


def test_images_of_any_count_and_text_only_requests(untrimmed):
    one, two, three = make_questions(3, seed=5)
    docs = [
        {"images": [one.image, two.image], "question": one.question},
        {"images": [], "question": two.question},
        {"images": [three.image], "question": three.question},
    ]
    expected_tokens = [(one.num_tiles + two.num_tiles) * untrimmed.num_patches, three.num_tiles * untrimmed.num_patches]
    trimmed = TrimmedLlamaVision(pretrained="testbed", method="headwise_topk", head_k=0.1, batch_size=4)
    for plugin in (untrimmed, trimmed):
        before = len(plugin.kept_records)
        answers = plugin.generate_until(make_requests(plugin, docs, {"max_new_tokens": 4}))
        records = plugin.kept_records[before:]
        assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
        assert [(r.doc_id, r.image_tokens) for r in records] == [(0, expected_tokens[0]), (2, expected_tokens[1])]
    assert all(r.kept_tokens < r.image_tokens for r in trimmed.kept_records)


def test_prompt_uses_chat_template_or_passes_the_context_through(untrimmed):
    question = make_questions(1, seed=1)[0].question
    trained = build_prompt(None, question)
    assert untrimmed.prompt(question, 1) == trained  # the testbed's chat template renders its trained prompt
    assert untrimmed.prompt(question, 2) == "<|image|>" + trained
    assert untrimmed.prompt(trained, 1) == trained  # a context that already holds <|image|> is left alone
    with pytest.raises(ValueError, match="holds 1 <|image|> tokens for 2 images"):
        untrimmed.prompt(trained, 2)
    raw = TrimmedLlamaVision(pretrained="testbed", apply_chat_template=False)
    assert raw.prompt(question, 2) == "<|image|><|image|><|begin_of_text|>" + question


def test_until_cuts_and_max_new_tokens_caps(untrimmed):
    questions = make_questions(8, seed=11)
    requests = make_requests(untrimmed, question_docs(questions), {"max_new_tokens": 4})
    answers = untrimmed.generate_until(requests)
    text = next(answer for answer in answers if len(answer.strip()) > 1).strip()
    stop = text[1]
    cut = untrimmed.generate_until(
        make_requests(untrimmed, question_docs(questions), {"max_new_tokens": 4, "until": [stop]})
    )
    assert cut == [answer[: answer.find(stop)] if stop in answer else answer for answer in answers]
    untrimmed.generate_until(make_requests(untrimmed, question_docs(questions), {"max_new_tokens": 1}))
    assert get_logged_metrics_history()[-1]["total_gen_tokens"] == len(questions)

    tokenizer = untrimmed.tokenizer
    ids = tokenizer(["question : red answer", "question : blue blue"], return_tensors="pt")["input_ids"]
    assert StopOnStrings(("answer",), tokenizer, prompt_length=2)(ids, None).tolist() == [True, False]


def test_testbed_task_files_hold_the_questions(tmp_path):
    config = write_testbed_task(tmp_path, questions=4, seed=7)
    docs = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    questions = make_questions(4, seed=7)
    assert [(d["question"], d["answer"], d["qtype"]) for d in docs] == [
        (q.question, q.answer, q.qtype) for q in questions
    ]
    assert all(np.array_equal(np.asarray(doc_to_visual(d)[0]), np.asarray(q.image)) for d, q in zip(docs, questions))
    assert process_results(docs[0], [f" {questions[0].answer} answer"]) == {
        "accuracy": 1.0,
        f"accuracy_{docs[0]['qtype']}": 1.0,
    }
    assert f"task: {TASK_NAME}" in config.read_text()
    assert lmms_eval_manifest().simple_class_path == "trimllama.integrations.lmms_eval_model.TrimmedLlamaVision"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(method="none", head_k=0.1), "head_k has no effect with method=none"),
        (dict(method="none", merge_remainder=True), "merge_remainder has no effect"),
        (dict(method="floor", budget=8), "method floor takes no budget"),
        (dict(method="headwise_topk", head_k=0), "head_k"),
        (dict(method="headwise_topk", like="random"), "like=random is for method=random only, not headwise_topk"),
        (dict(method="random", like="none"), "like=none matches nothing"),
        (dict(method="none", like="headwise_topk"), "like has no effect with method=none"),
        (dict(method="headwise_topk", name="x"), "name is not a method setting"),
        (dict(method="headwise_topk", image_tokens=5), "image_tokens is not a method setting"),
        (dict(method="headwise_topk", query_rows="first_turn"), "query_rows must be one of all, last_turn, image_turn"),
    ],
)
def test_bad_method_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        build_method(**arguments)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(colour="red"), r"unknown model argument\(s\) colour; accepted: pretrained, method"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(batch_size="auto"), "batch_size must be a positive integer, got 'auto'"),
        (dict(max_new_tokens=-1), "max_new_tokens must be a positive integer"),
        (dict(apply_chat_template="maybe"), "apply_chat_template must be auto, true or false"),
        (dict(dtype="int8"), "dtype must be auto or one of float32, bfloat16, float16, got 'int8'"),
        (dict(method="headwise_topk", name="x"), "name is not a method setting"),
        (dict(method="headwise_topk", image_tokens=5), "image_tokens is not a method setting"),
    ],
)
def test_bad_model_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        TrimmedLlamaVision(pretrained="testbed", **arguments)


def test_any_setting_of_the_method_is_a_model_argument():
    plugin = TrimmedLlamaVision.create_from_arg_string("pretrained=testbed,method=headwise_topk,head_k=0.1,query_rows=image_turn")
    assert plugin.method == HeadwiseTopK(head_k=0.1, query_rows="image_turn")


def test_other_bad_inputs(tmp_path):
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="is a 'llama' model; this plugin runs Llama-3.2-Vision"):
        TrimmedLlamaVision(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size given twice: 4 in --model_args and 8 in --batch_size"):
        TrimmedLlamaVision.create_from_arg_string("pretrained=testbed,batch_size=4", {"batch_size": "8"})
    assert (
        TrimmedLlamaVision.create_from_arg_string("pretrained=testbed,batch_size=4", {"batch_size": 1}).batch_size == 4
    )
    with pytest.raises(ValueError, match="a request has a str visual .* only images are supported"):
        request_images(["clip.mp4"])
    with pytest.raises(ValueError, match="num_beams > 1"):
        Decoding.from_gen_kwargs({"num_beams": 2}, 16)

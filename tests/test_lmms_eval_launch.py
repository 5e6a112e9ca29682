"""lmms-eval under `accelerate launch`, the standard multi-process launcher, with 2 CPU processes.

Every installed package must import for the launcher to start (it imports timm, which imports torchvision). The
two ranks split the documents; rank 0 gathers the samples and the kept-token summary of both. About 60 s on
2 CPU cores, most of it two lmms-eval start-ups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra)")
pytest.importorskip("accelerate")

from trimllama import HeadwiseTopK  # noqa: E402
from trimllama.harness.evaluate import answer_questions  # noqa: E402
from trimllama.harness.server_process import free_port  # noqa: E402
from trimllama.integrations.lmms_tasks import TASK_NAME, write_testbed_task  # noqa: E402
from trimllama.testbed import CHECKPOINT_DIR, build_prompt, load_testbed, make_questions  # noqa: E402

QUESTIONS, SEED, BATCH = 12, 7, 4


def test_accelerate_launch_two_cpu_processes_answers_every_document_once(tmp_path):
    checkpoint = shutil.copytree(CHECKPOINT_DIR, tmp_path / "checkpoint")
    task_dir = write_testbed_task(tmp_path / "task", QUESTIONS, SEED).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "lmms_eval",
        "--model", "trimllama",
        "--model_args", f"pretrained={checkpoint},method=headwise_topk,head_k=0.1",
        "--tasks", TASK_NAME, "--include_path", str(task_dir),
        "--batch_size", str(BATCH), "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = completed.stdout[-4000:] + completed.stderr[-4000:]
    assert completed.returncode == 0, log
    assert "ModuleNotFoundError" not in log and "does not exist" not in log, log

    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_*.jsonl")).read_text().splitlines()]
    assert sorted(sample["doc_id"] for sample in samples) == list(range(QUESTIONS))  # both ranks' documents, once
    answers = [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
    model, processor = load_testbed()
    expected, _, _ = answer_questions(model, processor, make_questions(QUESTIONS, seed=SEED), HeadwiseTopK(head_k=0.1), build_prompt, BATCH)
    assert answers == expected
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert 0 < results["throughput"]["avg_kept_fraction"] < 0.5

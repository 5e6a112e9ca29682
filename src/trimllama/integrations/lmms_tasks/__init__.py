"""A local lmms-eval task from the testbed's held-out questions, for the `trimllama` lmms-eval model.

`write_testbed_task(directory, questions, seed)` writes `make_questions(questions, seed)` as PNG images, a
JSONL file and a task yaml into `directory`; then

    python -m lmms_eval --model trimllama --model_args pretrained=testbed --include_path DIRECTORY \\
        --tasks trimllama_testbed

scores the same questions, prompts (the testbed's chat template renders its trained prompt) and answers
(`trimllama.testbed.answer_matches`) as `trimllama eval --questions N --seed S`, with `max_new_tokens` 4.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...testbed import QUESTION_TYPES, make_questions

TASK_NAME = "trimllama_testbed"
DATA_FILE = "questions.jsonl"
UTILS = "trimllama.integrations.lmms_tasks.utils"


def task_yaml(task: str, questions: int, seed: int) -> str:
    """The lmms-eval task config: local JSON data next to it, accuracy overall and per question type."""
    metrics = "".join(
        f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"
        for name in ["accuracy", *(f"accuracy_{qtype}" for qtype in QUESTION_TYPES)]
    )
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {DATA_FILE}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {UTILS}.doc_to_visual\n"
        f"doc_to_text: !function {UTILS}.doc_to_text\n"
        "doc_to_target: answer\n"
        f"process_results: !function {UTILS}.process_results\n"
        "generation_kwargs:\n"
        "  max_new_tokens: 4\n"
        "  do_sample: false\n"
        f"metric_list:\n{metrics}"
        "metadata:\n"
        "  version: 1.0\n"
        f"  questions: {questions}\n"
        f"  seed: {seed}\n"
    )


def write_testbed_task(directory: str | Path, questions: int = 1000, seed: int = 2024, task: str = TASK_NAME) -> Path:
    """Write the task for `make_questions(questions, seed)` into `directory`; returns the yaml's path.

    Same defaults as `trimllama eval` (1000 questions, seed 2024).
    """
    if questions < 1:
        raise ValueError(f"questions must be at least 1, got {questions}")
    directory = Path(directory).resolve()
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, question in enumerate(make_questions(questions, seed=seed)):
        path = images / f"{index:05d}.png"
        question.image.save(path)
        record = dict(question_id=index, question=question.question, answer=question.answer, qtype=question.qtype)
        lines.append(json.dumps(dict(record, image=str(path))))
    (directory / DATA_FILE).write_text("\n".join(lines) + "\n")
    config = directory / f"{task}.yaml"
    config.write_text(task_yaml(task, questions, seed))
    return config

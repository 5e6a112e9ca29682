"""Document functions of the local lmms-eval testbed task (the yaml names them with `!function`)."""

from __future__ import annotations

from PIL import Image

from ...testbed import answer_matches


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The question's image, read back from the PNG the task writer saved (lossless: the same pixels)."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The bare question; the model's chat template renders the testbed's trained prompt around it."""
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 if the first generated word is the answer (`trimllama.testbed.answer_matches`), overall and for the
    question's type."""
    correct = float(answer_matches(results[0], doc["answer"]))
    return {"accuracy": correct, f"accuracy_{doc['qtype']}": correct}

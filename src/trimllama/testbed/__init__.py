"""Fidelity testbed: a small, genuinely trained ``MllamaForConditionalGeneration``.

The model was trained from scratch (``python -m trimllama.testbed.train``) on procedurally
generated visual questions about small coloured shapes (``trimllama.testbed.data``), and is
shipped as a regular Hugging Face checkpoint in ``CHECKPOINT_DIR``. It uses the real HF Mllama
architecture (tiles, padding tiles, gated cross-attention layers, GQA), so trimming methods can
be checked for fidelity on a model whose answers provably depend on small image regions.

Importing this package is light: torch/transformers are only imported by ``load_testbed``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .data import (
    ANSWERS_BY_TYPE,
    QUESTION_TYPES,
    Conversation,
    Question,
    SceneObject,
    make_conversations,
    make_questions,
)

CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "checkpoint"

__all__ = [
    "ANSWERS_BY_TYPE",
    "CHECKPOINT_DIR",
    "Conversation",
    "QUESTION_TYPES",
    "Question",
    "SceneObject",
    "answer_matches",
    "build_prompt",
    "load_testbed",
    "make_conversations",
    "make_questions",
]


def load_testbed(device="cpu", dtype=None, attn_implementation: str = "sdpa", checkpoint_dir=None):
    """Load the shipped checkpoint: returns ``(model, processor)``, as ``trimllama.loading.load_model`` loads any.

    ``model`` is a ``MllamaForConditionalGeneration`` in eval mode; ``processor`` a
    ``MllamaProcessor`` whose tokenizer pads on the left (for batched generation).
    ``dtype`` (a ``torch.dtype`` or its name) defaults to ``torch.float32``.
    """
    from ..loading import DTYPES, load_model

    path = Path(checkpoint_dir) if checkpoint_dir is not None else CHECKPOINT_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"testbed checkpoint not found in {path}")
    names = {value: name for name, value in DTYPES.items()}
    dtype = "float32" if dtype is None else names.get(dtype, dtype)
    model, processor, _ = load_model(str(path), str(device), dtype, attn_implementation)
    return model, processor


def build_prompt(processor, question: str) -> str:
    """The exact prompt text the testbed was trained on, for one image and one question:

        ``<|image|><|begin_of_text|>question : {question} answer :``

    The answer the model generates is one word/digit followed by ``<|end_of_text|>``.
    ``processor`` is accepted for API symmetry (the chat template saved with the processor
    renders the same string); ``None`` is allowed.
    """
    from .build import PROMPT_TEMPLATE

    q = " ".join(question.strip().lower().split())
    return PROMPT_TEMPLATE.format(question=q)


_WORD = re.compile(r"[a-z0-9]+")


def answer_matches(generated: str, answer: str) -> bool:
    """A generation is correct when its first word equals the answer (case-insensitive)."""
    words = _WORD.findall(generated.lower())
    return bool(words) and words[0] == answer.strip().lower()

"""Integrations with evaluation harnesses. Each one imports its harness lazily, so trimllama works without it.

lmms-eval (`pip install "trimllama[eval]"`): the model `trimllama`, class `TrimmedLlamaVision` in
`trimllama.integrations.lmms_eval_model`, is registered through the `lmms_eval.models` entry point, which
points at `lmms_eval_manifest`. `trimllama.integrations.lmms_tasks` writes a local lmms-eval task from the
testbed's held-out questions.
"""

from __future__ import annotations

LMMS_EVAL_MODEL_ID = "trimllama"
LMMS_EVAL_MODEL_CLASS = "trimllama.integrations.lmms_eval_model.TrimmedLlamaVision"


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: a `ModelManifest` naming the plugin model (imported on use only)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_MODEL_CLASS)

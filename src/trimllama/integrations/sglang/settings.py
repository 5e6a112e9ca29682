"""The selection settings of the SGLang engine: validated by the launcher, read back in every rank's process.

They travel as JSON in one environment variable, `{"method": name, "settings": {loose settings}}`, and are
resolved by `trimllama.methods.build_method` on both sides, so the engine runs exactly what the launcher checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import InvalidSettingError
from ...methods import MergeRemainder, SelectionMethod, build_method
from ...methods.base import scores_last_turn

SETTINGS_VARIABLE = "TRIMLLAMA_SGLANG_SETTINGS"
KEPT_DUMP_VARIABLE = "TRIMLLAMA_SGLANG_KEPT_DUMP"  # a file each rank appends the kept indices of every image to
EXTERNAL_PACKAGE = __name__.rpartition(".")[0]  # what SGLANG_EXTERNAL_MODEL_PACKAGE names


@dataclass(frozen=True)
class EngineSettings:
    """A method name and its loose settings (`head_k`, `budget`, any `--param`), as `build_method` takes them."""

    method: str = "headwise_topk"
    settings: dict = field(default_factory=dict)

    def build(self) -> SelectionMethod | None:
        """The method to run in the engine, or None for `none` (the engine's own slots, no selection).

        Raises:
            InvalidSettingError: settings `build_method` refuses; a method without a fixed `budget` (the engine
                reserves each image's slots before any forward pass); `MergeRemainder` (its extra columns need a
                per-column attention bias that SGLang's attention does not take); `query_rows="last_turn"`.
        """
        method = build_method(self.method, **self.settings)
        if method is None:
            return None
        if isinstance(method, MergeRemainder):
            raise InvalidSettingError(
                "MergeRemainder (merge_remainder) is not supported on SGLang: its remainder tokens need a "
                "per-column attention bias that SGLang's attention does not take",
            )
        if scores_last_turn(method):
            raise InvalidSettingError(
                "query_rows=last_turn is not supported on SGLang yet: the engine scores every text row of the "
                "prefill that encodes the image",
                setting="query_rows",
            )
        if "budget" not in {f.name for f in dataclasses.fields(method)}:
            raise InvalidSettingError(
                f"method {method.name} has no budget: SGLang reserves each image's slots before the forward pass, "
                "so only methods that keep exactly --budget tokens per image run in it (headwise_topk, random)",
                setting="method",
            )
        if method.budget is None:
            raise InvalidSettingError(
                f"budget is required with method {method.name} on SGLang: the engine reserves budget slots per "
                "image before the forward pass",
                setting="budget",
            )
        return method

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "settings": self.settings}, sort_keys=True)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> EngineSettings:
        """The settings the launcher put in `SETTINGS_VARIABLE`; the method `none` when it is unset."""
        raw = environ.get(SETTINGS_VARIABLE)
        if raw is None:
            return cls(method="none")
        try:
            data = json.loads(raw)
            return cls(method=data["method"], settings=dict(data["settings"]))
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidSettingError(f"{SETTINGS_VARIABLE} is not valid trimllama settings JSON: {error}") from None


def reserved_tokens(method: SelectionMethod, real_tokens: int) -> int:
    """Slots (and kept tokens) of one image with `real_tokens` tokens in real tiles: min(budget, real tokens)."""
    return min(method.budget, real_tokens)

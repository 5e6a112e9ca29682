"""The settings of the SGLang engine: validated by the launcher, read back in every rank's process.

They travel as JSON in one environment variable, `{"method": name, "settings": {loose settings}, "layout": ...}`,
and are resolved by `trimllama.methods.build_method` on both sides, so the engine runs exactly what the launcher
checked. Nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import InvalidSettingError
from ...methods import MergeRemainder, SelectionMethod, method_from_settings
from ...methods.base import query_rows_of
from .layout import LAYOUTS

SGLANG_VERSION = "0.5.23"  # the SGLang release whose Mllama, pool and processor the override is written against
SETTINGS_VARIABLE = "TRIMLLAMA_SGLANG_SETTINGS"
KEPT_DUMP_VARIABLE = "TRIMLLAMA_SGLANG_KEPT_DUMP"  # tests: a file each rank appends the kept indices to (read at start-up)
EXTERNAL_PACKAGE = __name__.rpartition(".")[0]  # what SGLANG_EXTERNAL_MODEL_PACKAGE names
ENGINE_QUERY_ROWS = "image_turn"  # the engine's default scoring rows: conversations reuse an image's trimmed K/V


@dataclass(frozen=True)
class EngineSettings:
    """A method name and its loose settings (`head_k`, `budget`, any `--param`), as `build_method` takes them, and
    the pool layout of image tokens ("image_pool" or SGLang's "shared" one, see `layout`)."""

    method: str = "headwise_topk"
    settings: dict = field(default_factory=dict)
    layout: str = "image_pool"

    def build(self) -> SelectionMethod | None:
        """The method to run in the engine, or None for `none` (every image token kept, no selection).

        A method that scores text rows gets `query_rows="image_turn"` unless the settings name its rows.

        Raises:
            InvalidSettingError: settings `build_method` refuses; a method without a fixed `budget` (the engine
                reserves each image's slots before any forward pass); `MergeRemainder` (its extra columns need a
                per-column attention bias that SGLang's attention does not take); `query_rows="last_turn"` (it
                would key an image's K/V on every later turn); an unknown layout.
        """
        if self.layout not in LAYOUTS:
            raise InvalidSettingError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}", setting="layout")
        method = method_from_settings(self.method, self.settings)
        if method is None:
            return None
        if isinstance(method, MergeRemainder):
            raise InvalidSettingError(
                "MergeRemainder (merge_remainder) is not supported on SGLang: its remainder tokens need a "
                "per-column attention bias that SGLang's attention does not take",
            )
        if "last_turn" in query_rows_of(method):
            raise InvalidSettingError(
                "query_rows=last_turn is not supported on SGLang: the kept set would change with every turn, so no "
                "turn could reuse an image's cached K/V (query_rows=image_turn scores the image's own message)",
                setting="query_rows",
            )
        fields = {f.name for f in dataclasses.fields(method)}
        if "budget" not in fields:
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
        if "query_rows" in fields and "query_rows" not in self.settings:
            method = dataclasses.replace(method, query_rows=ENGINE_QUERY_ROWS)
        return method

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "settings": self.settings, "layout": self.layout}, sort_keys=True)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> EngineSettings:
        """The settings the launcher put in `SETTINGS_VARIABLE`; the method `none` when it is unset."""
        raw = environ.get(SETTINGS_VARIABLE)
        if raw is None:
            return cls(method="none")
        try:
            data = json.loads(raw)
            return cls(method=data["method"], settings=dict(data["settings"]), layout=data.get("layout", "image_pool"))
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidSettingError(f"{SETTINGS_VARIABLE} is not valid trimllama settings JSON: {error}") from None


def image_tokens(method: SelectionMethod | None, real_tokens: int, all_tokens: int) -> int:
    """Tokens one image keeps (and stores) in the engine: `min(budget, its real tokens)`; without a method, every
    token of its `max_tiles` tiles, padding tiles included, as SGLang's own Mllama (its text attends to them)."""
    return all_tokens if method is None else min(method.budget, real_tokens)


def scored_rows(method: SelectionMethod | None) -> str:
    """The `query_rows` rule the engine scores and keys images by ("image_turn" for methods that read no rows)."""
    return getattr(method, "query_rows", ENGINE_QUERY_ROWS)

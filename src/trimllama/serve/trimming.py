"""The trimming one request runs under: its `trim` object resolved to a `TrimSetting`."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import adapter_for
from ..errors import TrimllamaError, UnknownMethodError
from ..methods import SelectionMethod, check_fits_image, method_from_settings
from ..methods.base import query_rows_of
from ..turns import turn_markers
from .errors import APIError, invalid
from .schemas import TrimOptions


@dataclass(frozen=True)
class TrimSetting:
    """The trimming one request runs under; requests batch together only when these are equal."""

    method: SelectionMethod | None
    trim_scoring_layer: bool = False

    @property
    def key(self) -> str:
        """Equal for equal settings (dataclass reprs list every field)."""
        return f"{self.method!r}|{self.trim_scoring_layer}"

    @property
    def label(self) -> str:
        if self.method is None:
            return "none"
        return self.method.label() + (" +scoring layer" if self.trim_scoring_layer else "")



def resolve_trim(options: TrimOptions | None, default: TrimSetting) -> TrimSetting:
    """The TrimSetting a request's `trim` object describes (the server default without one).

    `trimllama.build_method` resolves the method; its errors become 400s naming the field.
    """
    if options is None:
        return default
    scoring = default.trim_scoring_layer if options.trim_scoring_layer is None else options.trim_scoring_layer
    settings = dict(options.model_extra or {}, head_k=options.head_k, budget=options.budget)
    try:
        method = method_from_settings(options.method, dict(settings, merge_remainder=options.merge_remainder))
    except TrimllamaError as error:
        raise trim_error(error) from None
    if method is None and options.trim_scoring_layer:
        raise invalid(
            "'trim.trim_scoring_layer': it has no effect with method none (the untrimmed model)",
            "trim.trim_scoring_layer",
            "invalid_trim_setting",
        )
    return TrimSetting(method, scoring and method is not None)


def check_fits(setting: TrimSetting, model, inputs: dict) -> None:
    """Refuse an int count larger than the request's image tokens, as the CLI does (`check_fits_image`)."""
    if setting.method is None or "cross_attention_mask" not in inputs:
        return
    try:
        check_fits_image(setting.method, adapter_for(model).image_tokens(model, inputs)[0])
    except TrimllamaError as error:
        raise trim_error(error) from None


def check_turns(setting: TrimSetting, processor) -> None:
    """Refuse `query_rows="last_turn"` / `"image_turn"` up front when the model's chat template lacks the turn marker
    it reads (a 400, not a failed batch)."""
    try:
        turn_markers(processor, query_rows_of(setting.method))
    except TrimllamaError as error:
        raise trim_error(error) from None


def trim_error(error: TrimllamaError) -> APIError:
    """A 400 naming the `trim` field a `build_method` error is about."""
    if isinstance(error, UnknownMethodError):
        return invalid(f"'trim.method': {error}", "trim.method", "unknown_method")
    setting = getattr(error, "setting", None)
    param = f"trim.{setting}" if setting else "trim"
    return invalid(f"'{param}': {error}", param, "invalid_trim_setting")

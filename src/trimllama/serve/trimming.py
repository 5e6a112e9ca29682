"""The trimming one request runs under: its `trim` object resolved to a `TrimSetting`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import TrimllamaError
from ..methods import METHODS, MergeRemainder, SelectionMethod, get_method
from .errors import invalid
from .schemas import DEFAULT_TRIM_METHOD, TrimOptions, _short


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

    Checked like the CLI's options: unknown methods, settings the method does not take, and
    out-of-range values are 400s naming the field.
    """
    if options is None:
        return default
    scoring = default.trim_scoring_layer if options.trim_scoring_layer is None else options.trim_scoring_layer
    extras = dict(options.model_extra or {})
    given = {"head_k": options.head_k, "budget": options.budget, **extras}
    given = {key: value for key, value in given.items() if value is not None}
    if options.method.lower() == "none":
        flags = sorted(given) + (["merge_remainder"] if options.merge_remainder else [])
        if flags:
            raise invalid(f"'trim': {', '.join(flags)} has no effect with method none (the untrimmed model)", "trim")
        return TrimSetting(None, False)
    if options.method not in METHODS:
        raise invalid(
            f"'trim.method': unknown method {options.method!r}; registered methods: {', '.join(METHODS)}, or none",
            "trim.method",
            "unknown_method",
        )
    cls = METHODS[options.method]
    wrap = options.merge_remainder or cls is MergeRemainder
    if cls is MergeRemainder:
        cls = METHODS[DEFAULT_TRIM_METHOD]
    settings = _method_settings(cls, given)
    try:
        method = get_method(cls, **settings)
        if wrap:
            method = MergeRemainder(method=method)
    except TrimllamaError as error:
        raise invalid(f"'trim': {error}", "trim", "invalid_trim_setting") from None
    return TrimSetting(method, scoring)


def _method_settings(cls: type[SelectionMethod], given: dict) -> dict:
    """Map request keys to the method's constructor fields (`head_k` is `ratio` for random)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    settings = {}
    for key, value in given.items():
        name = "ratio" if key == "head_k" and "head_k" not in fields and "ratio" in fields else key
        if name not in fields:
            raise invalid(
                f"'trim.{key}': method {cls.name} has no setting {key!r} "
                f"(its settings: {', '.join(sorted(fields)) or 'none'})",
                f"trim.{key}",
                "invalid_trim_setting",
            )
        default = fields[name].default
        if isinstance(value, (dict, list)) or (default not in (None, dataclasses.MISSING) and not _same_kind(value, default)):
            expected = type(default).__name__ if default not in (None, dataclasses.MISSING) else "a number, string or boolean"
            raise invalid(f"'trim.{key}': expected {expected}, got {_short(value)}", f"trim.{key}", "invalid_trim_setting")
        settings[name] = value
    return settings


def _same_kind(value: object, default: object) -> bool:
    """Whether a JSON value fits a setting whose default is `default` (an int fits a float setting)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))

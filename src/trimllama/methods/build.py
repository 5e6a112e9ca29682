"""`build_method(name, **settings)`: a method from loose settings, as the CLI, the server and lmms-eval give them.

The one place that knows the loose spellings every front-end accepts:

- `name="none"` (or "untrimmed"): the untrimmed model, returned as None; any setting next to it is refused.
- `head_k`: HeadwiseTopK's per-head count or fraction, and the `ratio` of methods that have one (random, ...).
- `budget`: exactly N tokens per sample. With HeadwiseTopK it ranks the per-head union (head_k) and cuts or
  fills it to N, so both count; where a budget replaces the ratio (random), giving both is refused.
- `merge_remainder=True`, or `name="merge_remainder"` with the inner method's settings (inner method: HeadwiseTopK):
  the method wrapped in `MergeRemainder`.
- `like=<method name>` (random only): keep as many tokens per sample as that method does; `head_k` / `budget`
  then configure that method.
- any other field of the method, checked against its default's type (an int fits a float setting).
- `image_tokens`: the non-padding image tokens of the input, if known; an int count larger than that is refused
  (`check_fits_image`).

`method_from_settings(name, settings, image_tokens)` is what a front-end calls with the loose settings it collected in
one mapping (the CLI's options and `--param`s, a request's `trim` object, lmms-eval's model arguments): names that are
not settings (`RESERVED`: `name`, `method`, `image_tokens`) are refused there, as `build_method` refuses `name` and
`method` among its own keywords.

Every refusal is a named error (`UnknownMethodError`, `InvalidSettingError` with `.setting`), one message text;
each front-end only maps it to its own form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..errors import InvalidSettingError, UnknownMethodError
from .base import SelectionMethod, nested_methods
from .merge_remainder import MergeRemainder
from .random_select import RandomSelect

UNTRIMMED_NAMES = ("none", "untrimmed")
DEFAULT_INNER = "headwise_topk"  # what `merge_remainder` wraps when no inner method is named
COUNT_SETTINGS = ("head_k", "ratio", "budget")  # settings that may be an int count of image tokens
RESERVED = {  # names a front-end may be given as settings that are none: why each is not one
    "name": "the method is named apart from its settings",
    "method": "the method is named apart from its settings",
    "image_tokens": "the input's image tokens are counted from the input",
}


def setting_names() -> set[str]:
    """Every name `build_method` may take as a setting of some registered method (loose spellings included)."""
    from . import METHODS

    fields = {field.name for cls in METHODS.values() for field in dataclasses.fields(cls)}
    return fields | {"head_k", "merge_remainder", "like"}


def method_from_settings(
    name: str | None, settings: Mapping[str, object], image_tokens: int | None = None
) -> SelectionMethod | None:
    """`build_method(name, image_tokens=image_tokens, **settings)` for loose settings collected in one mapping,
    whose keys may be any text: a name in `RESERVED` is one `InvalidSettingError` instead of a clash with
    `build_method`'s own arguments."""
    _refuse_reserved(settings)
    return build_method(name, image_tokens=image_tokens, **settings)


def _refuse_reserved(settings: Mapping[str, object]) -> None:
    for key in settings:
        if key in RESERVED:
            raise InvalidSettingError(f"{key} is not a method setting: {RESERVED[key]}", setting=key)


def build_method(
    name: str | None = "headwise_topk",
    /,
    *,
    merge_remainder: bool = False,
    like: str | SelectionMethod | None = None,
    image_tokens: int | None = None,
    **settings,
) -> SelectionMethod | None:
    """The method that `name` and the loose `settings` describe, or None for the untrimmed model.

    Args:
        name: a registered method name (`trimllama.METHODS`, any spelling it accepts), "merge_remainder",
            or "none" / "untrimmed" (also None).
        merge_remainder: wrap the method in `MergeRemainder`.
        like: random only; the name (or instance) of the method whose per-sample kept counts to match.
        image_tokens: non-padding image tokens of the input, for the range check of int counts.
        **settings: `head_k`, `budget` and any field of the method; None values count as not given. `name` and
            `method` are refused (`RESERVED`).

    Raises:
        UnknownMethodError: `name` (or `like`) is not registered.
        InvalidSettingError: a setting the method does not take, of the wrong type, out of range, or one
            that has no effect; `.setting` names it.
    """
    from . import METHODS

    _refuse_reserved(settings)
    merge_remainder = False if merge_remainder is None else merge_remainder
    if not isinstance(merge_remainder, bool):
        raise InvalidSettingError(f"merge_remainder expects bool, got {merge_remainder!r}", setting="merge_remainder")
    settings = {key: value for key, value in settings.items() if value is not None}
    name = "none" if name is None else str(name)
    if name.lower() in UNTRIMMED_NAMES:
        ignored = [*settings, *(["merge_remainder"] if merge_remainder else []), *(["like"] if like else [])]
        if ignored:
            raise InvalidSettingError(
                f"{', '.join(ignored)} has no effect with method=none "
                "(settings have no effect with method none, the untrimmed model)",
                setting=ignored[0],
            )
        return None
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(METHODS)}, or none")
    cls = METHODS[name]
    if cls is MergeRemainder:
        cls, merge_remainder = METHODS[DEFAULT_INNER], True
    if like is not None:
        method = _count_matched(cls, like, settings)
    else:
        method = cls(**_constructor_settings(cls, settings))
    if merge_remainder:
        method = MergeRemainder(method=method)
    if image_tokens is not None:
        check_fits_image(method, image_tokens)
    return method


def check_fits_image(method: SelectionMethod | None, image_tokens: int) -> None:
    """Refuse an int count (head_k, ratio, budget; wrapped methods too) larger than the input's image tokens."""
    for inner in nested_methods(method):
        for name in COUNT_SETTINGS:
            value = getattr(inner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > image_tokens:
                raise InvalidSettingError(
                    f"{name} {value} is out of range: the image(s) have {image_tokens} image tokens in real tiles",
                    setting=name,
                )


def _count_matched(cls: type[SelectionMethod], like: str | SelectionMethod, settings: dict) -> SelectionMethod:
    """RandomSelect matching the counts of `like`, which `settings` configure."""
    if not isinstance(like, (str, SelectionMethod)):
        raise InvalidSettingError(f"like must name a method (e.g. like=headwise_topk), got {like!r}", setting="like")
    shown = like if isinstance(like, str) else like.label()
    if cls is not RandomSelect:
        raise InvalidSettingError(f"like={shown} is for method=random only, not {cls.name}", setting="like")
    if isinstance(like, SelectionMethod):
        matched = like
        if settings:
            raise InvalidSettingError(f"{', '.join(settings)} configure the method named by like; like is an instance", setting="like")
    else:
        matched = build_method(like, **settings)
        if matched is None:
            raise InvalidSettingError("like=none matches nothing; give the method whose kept counts to match", setting="like")
    return RandomSelect(like=matched)


def _constructor_settings(cls: type[SelectionMethod], given: dict) -> dict:
    """Loose keys -> the constructor fields of `cls`, each value checked against its field's default."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    if "head_k" in given and "budget" in given and "head_k" not in fields and "budget" in fields:
        raise InvalidSettingError(
            f"head_k and budget together: method {cls.name} keeps exactly budget tokens and would ignore head_k "
            f"(its ratio); give one of them",
            setting="budget",
        )
    settings = {}
    for key, value in given.items():
        name = "ratio" if key == "head_k" and "head_k" not in fields and "ratio" in fields else key
        if name not in fields:
            raise InvalidSettingError(
                f"method {cls.name} takes no {key} (method {cls.name} has no setting {key!r}; "
                f"its settings: {', '.join(sorted(fields)) or 'none'})",
                setting=key,
            )
        default = fields[name].default
        if isinstance(value, (dict, list)) or (default not in (None, dataclasses.MISSING) and not _same_kind(value, default)):
            expected = type(default).__name__ if default not in (None, dataclasses.MISSING) else "a number, string or boolean"
            raise InvalidSettingError(f"{key} expects {expected}, got {value!r}", setting=key)
        settings[name] = value
    return settings


def _same_kind(value: object, default: object) -> bool:
    """Whether a loose value fits a setting whose default is `default` (an int fits a float setting)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))

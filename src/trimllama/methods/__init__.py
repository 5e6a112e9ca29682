"""Registry of selection methods: `METHODS[name] -> class`.

Adding a method: one new file with a `SelectionMethod` dataclass, plus one line in `_REGISTERED`.
`build_method` (methods/build.py) turns the loose settings of the CLI, the server and lmms-eval into a method.
Lookups ignore case, `_` and `-`, and accept the class name too (`"HeadwiseTopK"` == `"headwise_topk"`).
"""

from __future__ import annotations

from ..errors import UnknownMethodError
from .attention_mass import AttentionMass
from .base import ExtraTokens, ImageTokens, SelectionMethod
from .build import RESERVED, build_method, check_fits_image, method_from_settings, setting_names
from .class_token import ClassTokenAttention
from .feature_norm import FeatureNorm
from .floor import Floor
from .headwise import HeadwiseTopK
from .keep_all import KeepAll
from .last_token import LastTokenAttention
from .mean_heads import MeanHeadsTopK
from .merge_remainder import MergeRemainder
from .random_select import RandomSelect
from .tile_balanced import TileBalanced
from .uniform_stride import UniformStride

_REGISTERED: list[type[SelectionMethod]] = [
    HeadwiseTopK,
    KeepAll,
    RandomSelect,
    Floor,
    MergeRemainder,
    UniformStride,
    TileBalanced,
    MeanHeadsTopK,
    LastTokenAttention,
    ClassTokenAttention,
    FeatureNorm,
    AttentionMass,
]


def _normalise(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


class MethodRegistry(dict):
    """A `name -> class` dict whose lookups also accept class names and ignore case and separators."""

    def _resolve(self, name: object) -> str | None:
        if not isinstance(name, str):
            return None
        wanted = _normalise(name)
        for key, cls in self.items():
            if wanted in (_normalise(key), _normalise(cls.__name__)):
                return key
        return None

    def __getitem__(self, name: str) -> type[SelectionMethod]:
        key = self._resolve(name)
        if key is None:
            known = ", ".join(self)
            raise UnknownMethodError(f"unknown selection method {name!r}; registered methods: {known}")
        return dict.__getitem__(self, key)

    def __contains__(self, name: object) -> bool:
        return self._resolve(name) is not None

    def get(self, name, default=None):
        return self[name] if name in self else default


METHODS = MethodRegistry({cls.name: cls for cls in _REGISTERED})


def get_method(method: str | SelectionMethod, **settings) -> SelectionMethod:
    """A method instance from an instance (returned as is) or a registered name plus settings."""
    if isinstance(method, SelectionMethod):
        if settings:
            raise TypeError("settings are given to the method's constructor, not next to an instance")
        return method
    if isinstance(method, type) and issubclass(method, SelectionMethod):
        return method(**settings)
    return METHODS[method](**settings)


__all__ = [
    "METHODS",
    "AttentionMass",
    "ClassTokenAttention",
    "FeatureNorm",
    "LastTokenAttention",
    "MeanHeadsTopK",
    "TileBalanced",
    "UniformStride",
    "ExtraTokens",
    "Floor",
    "HeadwiseTopK",
    "ImageTokens",
    "KeepAll",
    "MergeRemainder",
    "RandomSelect",
    "SelectionMethod",
    "build_method",
    "check_fits_image",
    "get_method",
    "method_from_settings",
    "setting_names",
    "RESERVED",
]

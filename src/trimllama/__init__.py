"""trimllama: training-free trimming of the cross-attended image features of Llama-3.2-Vision.

    import trimllama
    with trimllama.trim(model, trimllama.HeadwiseTopK(head_k=0.25)) as handle:
        output = model.generate(**inputs, max_new_tokens=32)
    handle.kept, handle.stats
"""

from .adapters import SampleStats, TrimStats
from .errors import (
    AlreadyTrimmedError,
    InvalidSettingError,
    MissingImageError,
    ShapeMismatchError,
    TrimllamaError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .handle import TrimHandle, trim
from .methods import (
    METHODS,
    ExtraTokens,
    Floor,
    HeadwiseTopK,
    ImageTokens,
    KeepAll,
    MergeRemainder,
    RandomSelect,
    SelectionMethod,
    build_method,
    get_method,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AlreadyTrimmedError",
    "ExtraTokens",
    "Floor",
    "HeadwiseTopK",
    "ImageTokens",
    "InvalidSettingError",
    "KeepAll",
    "MergeRemainder",
    "MissingImageError",
    "RandomSelect",
    "SampleStats",
    "SelectionMethod",
    "ShapeMismatchError",
    "TrimHandle",
    "TrimStats",
    "TrimllamaError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "build_method",
    "get_method",
    "trim",
]

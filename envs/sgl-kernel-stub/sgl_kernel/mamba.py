"""`sgl_kernel.mamba` without kernels (see the package docstring)."""

from __future__ import annotations

from typing import Callable, NoReturn

from . import missing


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):
        raise AttributeError(name)
    return missing(f"mamba.{name}")

"""An `sgl_kernel` that imports but has no kernels, for SGLang's CPU engine.

With `SGLANG_USE_CPU_ENGINE=1` some SGLang modules import `sgl_kernel` at import time although the Mllama paths
on CPU never call it; PyPI's sgl-kernel ships CUDA kernels only. Every attribute of this package is a function
that raises NotImplementedError naming what was called, so a path that does need a kernel fails loudly.
"""

from __future__ import annotations

from typing import Callable, NoReturn


def missing(name: str) -> Callable[..., NoReturn]:
    """A stand-in for the kernel `name` that raises when called."""

    def kernel(*args, **kwargs) -> NoReturn:
        raise NotImplementedError(f"sgl_kernel.{name} has no CPU implementation (trimllama's stub sgl_kernel)")

    kernel.__name__ = name.rsplit(".", 1)[-1]
    kernel.__qualname__ = name
    return kernel


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):
        raise AttributeError(name)
    return missing(name)

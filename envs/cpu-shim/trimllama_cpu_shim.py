"""Lets PyPI's torchvision (a CUDA build) import next to a CPU-only torch.

PyPI serves torchvision for Linux x86_64 only as a CUDA build. Beside a CPU torch its compiled
operators cannot load, and `torchvision._meta_registrations` then fails on
`register_fake("torchvision::nms")` for an operator that does not exist, so every package that
imports torchvision (transformers' image processors, timm, accelerate's launcher, SGLang) fails.

This module is loaded at interpreter start by `trimllama_cpu_shim.pth`. It does nothing until
`torchvision._meta_registrations` is imported; then, only if torchvision's compiled operators are
missing, it defines the schemas (no kernels) of the two operators that module needs. Calling them
still fails with torch's "no kernel" error; nothing on trimllama's paths calls them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries: list = []  # keeps the torch.library registrations alive


def define_missing_operators() -> list[str]:
    """Define the schemas torchvision needs when its compiled operators did not load; return their names."""
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():
        return []
    library = torch.library.Library("torchvision", "FRAGMENT")
    defined = []
    for name, schema in _SCHEMAS.items():
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not _has_schema(f"torchvision::{name}"):
            library.define(schema)
            defined.append(name)
    _libraries.append(library)
    return defined


def _has_schema(qualified_name: str) -> bool:
    import torch

    return any(schema.name == qualified_name for schema in torch._C._jit_get_all_schemas())


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        define_missing_operators()
        self._wrapped.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module once, then step aside
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())

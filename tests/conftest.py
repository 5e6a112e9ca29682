import importlib.metadata

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _installed(distribution: str) -> bool:
    """Whether a distribution is installed (not find_spec: this folder's sglang/ would pass for a namespace package)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tests/sglang run only in an SGLang environment (scripts/sglang-cpu-env.sh VENV; VENV/bin/python -m pytest tests/sglang)
collect_ignore = [] if _installed("sglang") else ["sglang"]

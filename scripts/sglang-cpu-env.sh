#!/usr/bin/env bash
# Build a CPU environment for `trimllama sglang` at VENV_DIR, from the checkout this script lives in:
# SGLang 0.5.23 with the CPU build of torch 2.13.0 and transformers 5.23.0, every package pinned in
# requirements/sglang-cpu.txt, the two CPU shims (envs/cpu-shim: torchvision's operator schemas; envs/sgl-kernel-stub:
# an importable sgl_kernel without kernels) and trimllama itself (editable, so the checkout's code is what runs).
#
#   scripts/sglang-cpu-env.sh .venv-sglang && .venv-sglang/bin/python -m pytest tests/sglang
#
# Everything is installed with --no-deps from the pinned list: SGLang's own metadata pins torch 2.14.1 (a CUDA build)
# and transformers 5.19.0, which must not come in. About 2 minutes and 2.2 GB.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$1
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --no-deps -r "$repo/requirements/sglang-cpu.txt"
"${pip[@]}" install --no-deps "$repo/envs/cpu-shim" "$repo/envs/sgl-kernel-stub"
"${pip[@]}" install --no-deps -e "$repo"
# every requirement is met except SGLang's own pins (CUDA kernels, torch 2.14.1, transformers 5.19.0)
unmet=$("$venv/bin/python" -m pip check 2>&1 | grep -v -E "^(sglang [0-9.]+ (requires|has requirement) |No broken requirements)" || true)
[ -z "$unmet" ] || { echo "unmet requirements outside SGLang's own pins:"; echo "$unmet"; exit 1; } >&2
# SGLang ignores an external model that fails to import (and serves its own): import it here
SGLANG_USE_CPU_ENGINE=1 "$venv/bin/python" -W ignore -c "import trimllama.integrations.sglang.model, trimllama.integrations.sglang.processor"
echo "built $venv: $("$venv/bin/python" -c 'import sglang, torch, transformers; print(f"sglang {sglang.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"

#!/usr/bin/env bash
# The efficiency benchmark on one GPU at the real Llama-3.2-11B-Vision shape (40 layers, bf16, random weights),
# peak memory from the CUDA caching allocator: bench.json, bench.png and bench.md in OUT_DIR.
#
#   benchmarks/gpu_memory.sh WHEEL_DIR OUT_DIR
#
# For a machine without network whose image has torch (with CUDA) and an older transformers: WHEEL_DIR holds
# the transformers 5.23.0 wheel, the trimllama wheel, and any dependency the image lacks at the needed version
# (see NOTES: how to build the folder). They go into a venv over the image's packages (--system-site-packages):
# the two wheels with --no-deps, then the dependencies they still miss from WHEEL_DIR only (--no-index).
# Settings (environment): BATCH_SIZES (1,8,32), PROMPT_LENS (32,256,1024), FRACTIONS (0.25), REPEATS (2),
# NEW_TOKENS (8), MEMORY_BUDGET (60GiB), BENCH_TIMEOUT (420 s), VENV (a fresh folder under /tmp).
# About 4 to 6 minutes on one H200 with the defaults (the 40-layer model alone is about 20 GB of bf16 weights).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 WHEEL_DIR OUT_DIR" >&2
    exit 2
fi
wheels=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
shopt -s nullglob
transformers_wheels=("$wheels"/transformers-5.23.0-*.whl)
trimllama_wheels=("$wheels"/trimllama-*.whl)
if [[ ${#transformers_wheels[@]} -ne 1 || ${#trimllama_wheels[@]} -ne 1 ]]; then
    echo "$0: $wheels needs exactly one transformers-5.23.0-*.whl and one trimllama-*.whl" >&2
    exit 2
fi

venv=${VENV:-$(mktemp -d /tmp/trimllama-gpu-venv.XXXXXX)}
python3 -m venv --system-site-packages "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
"${pip[@]}" install --no-index --no-deps "${transformers_wheels[0]}" "${trimllama_wheels[0]}"
# Dependencies the image does not satisfy (e.g. huggingface-hub >= 1.31 for transformers 5.23), from WHEEL_DIR only;
# those the image already satisfies are left as they are.
"${pip[@]}" install --no-index --find-links "$wheels" "${transformers_wheels[0]}" "${trimllama_wheels[0]}"

"$venv/bin/python" - <<'EOF'
import torch, transformers, trimllama
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
assert transformers.__version__ == "5.23.0", transformers.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trimllama {trimllama.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"${pip[@]}" freeze > "$out/pip-freeze.txt"

timeout "${BENCH_TIMEOUT:-420}" "$venv/bin/trimllama" bench --full --device cuda --dtype bfloat16 \
    --batch-sizes "${BATCH_SIZES:-1,8,32}" \
    --prompt-len "${PROMPT_LENS:-32,256,1024}" \
    --fractions "${FRACTIONS:-0.25}" \
    --repeats "${REPEATS:-2}" \
    --new-tokens "${NEW_TOKENS:-8}" \
    --memory-budget "${MEMORY_BUDGET:-60GiB}" \
    --out "$out"
echo "wrote $out/bench.json, $out/bench.png, $out/bench.md"

#!/usr/bin/env bash
# The package works as a wheel outside the checkout: build the sdist and wheel, `twine check` them, install the
# wheel (non-editable, with the lock's versions as constraints) into a fresh venv in a temporary directory, and run
# `trimllama methods`, `trimllama demo` and `trimllama generate` on the shipped checkpoint from there.
#
#   scripts/check-wheel.sh          # run from anywhere; needs `build` and `twine` (the test extra) in the current python
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; exit 1; }
"$python" -m twine check --strict "$work"/dist/*
grep -E '^[A-Za-z0-9_.-]+==' "$repo/requirements/lock-cpu.txt" > "$work/constraints.txt"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$work/constraints.txt" "$work"/dist/*.whl
cd "$work"  # away from the checkout: only the installed wheel can answer
export HF_HUB_OFFLINE=1
"$work/venv/bin/python" - <<'PY'
import trimllama, pathlib, sys
location = pathlib.Path(trimllama.__file__).resolve()
assert "site-packages" in location.parts, f"trimllama imported from {location}, not from the installed wheel"
PY
"$work/venv/bin/trimllama" methods > "$work/methods.txt"
grep -q headwise_topk "$work/methods.txt"
"$work/venv/bin/trimllama" demo --questions 4 > "$work/demo.txt"
"$work/venv/bin/python" -c "
from trimllama.testbed import make_questions
make_questions(1, seed=0)[0].image.save('picture.png')"
"$work/venv/bin/trimllama" generate --image picture.png --prompt "What colour is the circle?" --max-new-tokens 4 --json > "$work/generate.json"
"$work/venv/bin/python" -c "
import json; record = json.load(open('generate.json'))
assert record['answer'] is not None and record['image_tokens_after'] < record['image_tokens_before'], record"
echo "wheel check passed: $(ls "$work"/dist | tr '\n' ' ')"

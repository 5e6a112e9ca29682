#!/usr/bin/env bash
# Run the core tests (KeepAll bit-exact, masking oracle, batch == per-sample, generate, remove) against other
# transformers releases, each in a small overlay venv: its own transformers on top of the current environment's
# packages, which stay untouched.
#
#   scripts/test-transformers.sh 5.19.0 5.24.0      # from an activated environment made with the README's install
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
base_site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
core_tests=(tests/test_core.py tests/test_remainder.py tests/test_versions.py)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for version in "$@"; do
  venv="$work/transformers-$version"
  python3 -m venv --without-pip "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # the overlay's own site-packages comes first on sys.path; the base environment (and its .pth files) after it
  echo "import site; site.addsitedir('$base_site')" > "$site/zz_base_environment.pth"
  "$python" -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check --no-deps "transformers==$version"
  found=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
  [ "$found" = "$version" ] || { echo "overlay for $version imports transformers $found"; exit 1; }
  echo "== core tests on transformers $version"
  (cd "$repo" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "${core_tests[@]}")
done

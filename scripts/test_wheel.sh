#!/usr/bin/env bash
# Builds an sdist and, from it, a wheel (pypa/build, no isolation: against the
# torch installed here), checks what each holds (scripts/check_dist.py),
# installs the wheel into a fresh virtual environment outside the checkout and
# runs the tests against it (scripts/run_installed_tests.sh).
#
#   scripts/test_wheel.sh [quick|full]      # artefacts in dist/
#
# The venvs see the system's site-packages (torch, pytest, setuptools, ninja:
# nothing is downloaded but pypa/build itself); my_mps_ops in the test venv is
# the wheel's, which the tests check.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=$(pwd -P)
PYTHON=${PYTHON:-python3}
PROFILE=${1:-quick}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/my_mps_ops_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

start=$(date +%s)
"$PYTHON" -m venv --system-site-packages "$WORK/buildenv"
# The venv's own bundled setuptools (Python < 3.12) would shadow the system's newer one.
"$WORK/buildenv/bin/python" -m pip uninstall -q -y setuptools
"$WORK/buildenv/bin/python" -m pip install -q build
rm -f dist/my_mps_ops-*.whl dist/my_mps_ops-*.tar.gz
# The wheel is built from the unpacked sdist, so a file missing from the sdist fails here.
MAX_JOBS=${MAX_JOBS:-2} "$WORK/buildenv/bin/python" -m build --no-isolation --outdir dist . > "$WORK/build.log" 2>&1 \
  || { tail -50 "$WORK/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s: $(ls dist/my_mps_ops-*)"
"$PYTHON" scripts/check_dist.py dist/my_mps_ops-*.whl dist/my_mps_ops-*.tar.gz

"$PYTHON" -m venv --system-site-packages "$WORK/venv"
(cd "$WORK" && "$WORK/venv/bin/python" -m pip install -q "$PROJECT"/dist/my_mps_ops-*.whl)
(cd "$WORK" && "$WORK/venv/bin/python" -m my_mps_ops)
PYTHON="$WORK/venv/bin/python" bash scripts/run_installed_tests.sh "$PROJECT" "$PROFILE"
echo "test_wheel.sh: $(( $(date +%s) - start )) s in all"

#!/usr/bin/env bash
# Runs the tests against the my_mps_ops installed in $PYTHON's environment (a
# wheel), from a copy of test/ outside the checkout, with the checkout made
# off-limits: the package must be the installed one, and opening, listing or
# running anything under the checkout fails the test that does it
# (test/conftest.py, support.forbid_reads_under).
#
#   scripts/run_installed_tests.sh PROJECT_DIR [quick|full] [pytest args...]
#
# quick (CI, about 3 minutes on 2 cores): what an installation can get wrong
# (the binary, the embedded shaders through the emulator, the emulator's
# headers and the strict front end's data files, the version and info, a fresh
# process loading an AOTInductor package, a C++ program linking the installed
# op library, the CPU copies) plus one op family on every backend; `make test` runs the whole suite on the checkout just before.
# full: the whole suite (about 6 minutes).
set -euo pipefail
PROJECT=$(cd "${1:?usage: run_installed_tests.sh PROJECT_DIR [quick|full] [pytest args...]}" && pwd -P)
PROFILE=${2:-quick}
shift $(( $# >= 2 ? 2 : 1 ))
PYTHON=${PYTHON:-python3}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/my_mps_ops_installed_tests.XXXXXX")
case "$WORK/" in "$PROJECT"/*) echo "the test copy must be outside the checkout" >&2; exit 2;; esac
trap 'rm -rf "$WORK"' EXIT
cp -r "$PROJECT/test" "$WORK/test"
# The examples are user code the tests build and run against the installation
# (the LibTorch consumer, the torchrun script); not part of the package.
cp -r "$PROJECT/examples" "$WORK/examples"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
printf '[pytest]\ntestpaths = test\npythonpath = test\n' > "$WORK/pytest.ini"

case "$PROFILE" in
  quick)
    SELECTION=(test/integration/test_packaging.py test/integration/test_build.py test/integration/test_aoti.py
               test/integration/test_models.py test/emulator/test_strict_msl.py::test_embedded_shader_passes
               test/emulator/test_emulator_core.py test/ops/test_glu.py
               test/ops/test_cpu_isa.py::test_default_runs_the_best_copy_this_cpu_has
               test/ops/test_cpu_isa.py::test_unknown_cap_is_refused
               test/integration/test_cpp_consumer.py) ;;
  full) SELECTION=(test) ;;
  *) echo "profile: quick or full, not $PROFILE" >&2; exit 2 ;;
esac

cd "$WORK"
export MY_MPS_OPS_TEST_INSTALLED=1 MY_MPS_OPS_TEST_FORBID_ROOT="$PROJECT"
"$PYTHON" -c "import my_mps_ops, sys; print('testing', my_mps_ops.__file__, 'with', sys.executable)"
"$PYTHON" -m pytest -q -ra -p no:cacheprovider "${SELECTION[@]}" "$@"

#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite (CPU, 8 virtual devices).
#   scripts/test.sh              the CI suite (end-to-end runs marked slow are excluded)
#   scripts/test.sh --slow       only the slow end-to-end runs
#   scripts/test.sh -k resume    any other pytest arguments
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup_env.sh
args=("$@")
if [ "${1:-}" = "--slow" ]; then args=(-m slow "${@:2}"); fi
# Tests run in parallel worker processes (pytest-xdist): most of their time is compiling,
# which one process does on one core. TEST_WORKERS=0 runs them in this process (--pdb, -s).
workers=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist=worksteal)
set +e
JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "${args[@]}"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests for these arguments" >&2
  exit 0
fi
exit $rc

#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies if it is missing or older than pyproject.toml,
# and installs the system packages the code sandbox needs (bubblewrap, libseccomp).
# `scripts/setup_env.sh --tpu` also creates .venv-tpu (with libtpu, for TPU memory plans).
# Idempotent: a second run does nothing but check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: creating .venv with $("$python" --version) and the pinned dependencies" >&2
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi

# --tpu: also .venv-tpu, the same plus libtpu (XLA:TPU) for TPU memory plans without a TPU
# (experiments.aot --topology, tests/test_tpu_plan.py). Kept apart from .venv because libtpu
# then loads in every JAX start that is not JAX_PLATFORMS=cpu.
if [ "${1:-}" = "--tpu" ] && { [ ! -f .venv-tpu/.installed ] || [ pyproject.toml -nt .venv-tpu/.installed ]; }; then
  echo "setup: creating .venv-tpu (the pinned dependencies + libtpu)" >&2
  "$python" -m venv .venv-tpu
  echo '*' > .venv-tpu/.gitignore  # git ignores the venv's files
  .venv-tpu/bin/python -m pip install -q --upgrade pip
  .venv-tpu/bin/python -m pip install -q -e '.[tpu]' pytest==9.2.0
  touch .venv-tpu/.installed
fi

# System packages for the sandbox (instructjax/codex): bubblewrap and libseccomp.
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; } \
      || echo "setup: WARNING: could not install ${missing[*]}; the code sandbox will refuse to run" >&2
  else
    echo "setup: WARNING: ${missing[*]} missing and cannot be installed here (no root/apt-get)." >&2
    echo "       Install them yourself (Debian/Ubuntu: sudo apt-get install ${missing[*]};" >&2
    echo "       Fedora: sudo dnf install bubblewrap libseccomp). Only the code sandbox needs them." >&2
  fi
fi

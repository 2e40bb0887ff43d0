#!/usr/bin/env bash
# Sets up the environment if needed, then runs the main job on the embedded world:
#   pretrain -> SFT -> comparisons -> reward model -> PPO, PPO-ptx, DPO -> evaluation.
# Extra arguments are passed to experiments.instructgpt (e.g. --workdir=runs/mine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup_env.sh
exec .venv/bin/python -m experiments.instructgpt \
  --flagfile=experiments/configs/demo.flags "$@"

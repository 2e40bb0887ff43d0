#!/usr/bin/env bash
# Runs one experiment on every worker of a TPU VM pod slice; jax.distributed reads the
# slice's topology itself (--jax_distributed_auto).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh experiments.pretrain --flagfile=... --workdir=gs://...
# Env: TPU_NAME, ZONE (required), PROJECT (optional), REPO_DIR on the workers (default ~/instructjax),
#      DRY_RUN=1 prints the gcloud command. Each worker logs to $REPO_DIR/launch_logs/worker_<hostname>.log.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
[ $# -ge 1 ] || { echo "usage: TPU_NAME=... ZONE=... $0 MODULE [flags...]" >&2; exit 2; }
module=$1; shift
repo=${REPO_DIR:-~/instructjax}
remote="cd $repo && mkdir -p launch_logs && .venv/bin/python -m $module $* --jax_distributed_auto > launch_logs/worker_\$(hostname).log 2>&1"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all --command="$remote")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
command -v gcloud >/dev/null || { echo "gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 1; }
exec "${cmd[@]}"

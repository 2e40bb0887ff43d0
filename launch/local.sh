#!/usr/bin/env bash
# Starts N processes of one experiment on this machine, joined by jax.distributed over
# loopback: the CPU stand-in for a multi-host run.
#   NPROC=2 DEVICES_PER_PROC=4 launch/local.sh experiments.pretrain --flagfile=... --workdir=...
# Env: NPROC (required), DEVICES_PER_PROC (CPU virtual devices per process, default 1),
#      PORT (coordinator port, default 12355), LOG_DIR (default ./launch_logs), DRY_RUN=1.
set -euo pipefail
: "${NPROC:?set NPROC, the number of processes}"
[ $# -ge 1 ] || { echo "usage: NPROC=N $0 MODULE [flags...]" >&2; exit 2; }
module=$1; shift
port=${PORT:-12355}
log_dir=${LOG_DIR:-launch_logs}
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < NPROC; i++)); do
  cmd=("$python" -m "$module" "$@" --coordinator_address="127.0.0.1:$port"
       --num_processes="$NPROC" --process_id="$i" --host_devices="${DEVICES_PER_PROC:-1}")
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "${cmd[*]} > $log_dir/process_$i.log"; continue; fi
  JAX_PLATFORMS=cpu "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
# jax.distributed processes ignore SIGTERM: stop them with SIGKILL if this script is stopped.
trap 'kill -9 "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ $status -eq 0 ] || echo "a process failed (exit $status); logs in $log_dir/" >&2
exit $status

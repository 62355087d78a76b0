#!/usr/bin/env bash
# N processes of an mmjax command on this machine, each with D CPU devices, joined
# by JAX's distributed runtime (gloo collectives): the multi-host code path, locally.
#
#   launch/local_multiprocess.sh 2 4 mmjax train --config configs/demo.py --workdir /tmp/run
#
# Process 0 prints to the terminal; process i>0 logs to $MMJAX_LOG_DIR/process_i.log
# (default /tmp). If any process fails, the others are stopped and its code returned.
# MMJAX_PIN_CORES=1 pins process i to its share of this machine's cores (taskset), as
# separate hosts would have them, instead of all processes contending for all cores.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS mmjax <command> [args...]" >&2
  exit 2
fi
N=$1; D=$2; shift 2
PORT=${MMJAX_PORT:-$((20000 + RANDOM % 20000))}
LOG_DIR=${MMJAX_LOG_DIR:-/tmp}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$D ${XLA_FLAGS:-}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
CORES=$(nproc)
for ((i = 0; i < N; i++)); do
  args=("$@" --coordinator "localhost:$PORT" --num-processes "$N" --process-id "$i")
  if [[ "${MMJAX_PIN_CORES:-0}" == 1 ]]; then
    per=$(( CORES / N > 0 ? CORES / N : 1 ))
    first=$(( (i * per) % CORES ))
    args=(taskset -c "$first-$(( first + per - 1 ))" "${args[@]}")
  fi
  if [[ $i -eq 0 ]]; then
    "${args[@]}" &
  else
    "${args[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then
    rc=$?
    [[ $status -eq 0 ]] && status=$rc
    cleanup
  fi
done
exit $status

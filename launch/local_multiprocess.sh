#!/usr/bin/env bash
# N capjax processes on this machine, on the CPU, joined by jax.distributed
# over loopback (gloo collectives): multi-process runs without a cluster.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#       --config=configs/shapes.py --workdir=runs/shapes_mp [--mode=decode ...]
#
# Process 0 writes to this terminal, the others to LOG_DIR/process_<i>.log.
# If one process fails, the others are stopped and its exit status returned.
set -euo pipefail

: "${NUM_PROCESSES:?set NUM_PROCESSES, the number of processes (e.g. 2)}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"  # simulated CPU devices each
# (added to the XLA_FLAGS of the environment, whose other flags are kept)
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t capjax-processes-XXXXXX)}"
if [ $# -eq 0 ]; then
  echo "usage: NUM_PROCESSES=N $0 --config=CONFIG --workdir=DIR [FLAGS...]" >&2
  exit 2
fi
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES=$NUM_PROCESSES is not a positive number" >&2
  exit 2
fi
# A free loopback port for process 0's coordinator.
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$LOG_DIR"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 143' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=(env JAX_PLATFORMS=cpu
       "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
       "$PYTHON" -m capjax.main "--coordinator_address=127.0.0.1:$PORT"
       "--num_processes=$NUM_PROCESSES" "--process_id=$i" "$@")
  echo "+ ${cmd[*]}" >&2
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
[ "$NUM_PROCESSES" -gt 1 ] && echo "logs of processes 1..: $LOG_DIR" >&2

for ((left = NUM_PROCESSES; left > 0; left--)); do
  if ! wait -n; then
    status=$?
    echo "error: a process exited with status $status; stopping the others" \
         "(logs: $LOG_DIR)" >&2
    exit "$status"
  fi
done
pids=()

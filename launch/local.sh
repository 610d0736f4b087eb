#!/usr/bin/env bash
# Start NUM_PROCESSES processes of the main job on this machine, joined by jax.distributed over
# 127.0.0.1 (multi-process testing on CPU; one process per GPU on a multi-GPU node).
#
#   launch/local.sh NUM_PROCESSES [python -m diffjax.main arguments...]
#   launch/local.sh 2 --workdir runs/digits-2proc --config.training.batch_size=128
#
# Environment:
#   DIFFJAX_PORT            coordinator port (default: a free one)
#   DIFFJAX_LOG_DIR         per-process logs process_<i>.log (default: <workdir>/logs, else ./logs)
#   DIFFJAX_GPU_PER_PROCESS 1: process i sees only GPU i (CUDA_VISIBLE_DEVICES=i)
#   DIFFJAX_FAIL_GRACE      seconds the others get to stop by themselves after one process fails
#                           (default 30), then they are killed
# Exit status: 0 if every process exited 0, else the first non-zero status seen. SIGTERM/SIGINT
# to this script is forwarded to every process (each checkpoints and exits with 143).
set -u

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [diffjax.main arguments...]  (NUM_PROCESSES: a positive integer; got '${1:-}')" >&2
  exit 2
fi
NUM_PROCESSES=$1
shift
PYTHON=${PYTHON:-python}
PORT=${DIFFJAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
GRACE=${DIFFJAX_FAIL_GRACE:-30}

WORKDIR=""
prev=""
for a in "$@"; do
  case "$a" in
    --workdir=*) WORKDIR=${a#--workdir=} ;;
  esac
  [ "$prev" = "--workdir" ] && WORKDIR=$a
  prev=$a
done
LOG_DIR=${DIFFJAX_LOG_DIR:-${WORKDIR:+$WORKDIR/}logs}
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  (
    export DIFFJAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" DIFFJAX_NUM_PROCESSES=$NUM_PROCESSES DIFFJAX_PROCESS_ID=$i
    if [ "${DIFFJAX_GPU_PER_PROCESS:-0}" = 1 ]; then export CUDA_VISIBLE_DEVICES=$i; fi
    # process 0 also writes to this terminal; the others only to their logs
    if [ "$i" -eq 0 ]; then
      exec "$PYTHON" -m diffjax.main "$@" > >(tee "$LOG_DIR/process_$i.log") 2>&1
    else
      exec "$PYTHON" -m diffjax.main "$@" > "$LOG_DIR/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done
echo "launch/local.sh: $NUM_PROCESSES processes (pids ${pids[*]}) on 127.0.0.1:$PORT, logs in $LOG_DIR" >&2

forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
remaining=$NUM_PROCESSES
deadline=""
while [ "$remaining" -gt 0 ]; do
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    [ -z "$pid" ] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"; rc=$?
      pids[$idx]=""
      remaining=$((remaining - 1))
      if [ "$rc" -ne 0 ]; then
        echo "launch/local.sh: process $idx exited with status $rc (log: $LOG_DIR/process_$idx.log)" >&2
        if [ "$status" -eq 0 ]; then
          status=$rc
          deadline=$((SECONDS + GRACE))
        fi
      fi
    fi
  done
  if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ] && [ "$remaining" -gt 0 ]; then
    echo "launch/local.sh: killing the $remaining process(es) still running ${GRACE}s after the failure" >&2
    for pid in "${pids[@]}"; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; done
    deadline=""
  fi
  [ "$remaining" -gt 0 ] && sleep 0.5
done
exit "$status"

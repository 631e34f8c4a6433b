#!/usr/bin/env bash
# Multi-process / multi-node training through Paddle's own launcher (python -m paddle.distributed.launch).
#
#   scripts/launch.sh [--nproc N] [--nnodes N --master HOST:PORT --rank R] [--log-dir DIR] CONFIG [key=value ...]
#
# Single node, 2 processes:   scripts/launch.sh --nproc 2 configs/tiny_text.yaml parallel.expert=2
# Two nodes x 8 GPUs (run on each node, rank 0 and 1):
#   scripts/launch.sh --nproc 8 --nnodes 2 --master 10.0.0.1:6170 --rank 0 configs/reference/ernie4_5_21b_a3b.yaml
# The parallel layout comes from the config's `parallel:` section; `parallel.data` null = all remaining ranks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
NPROC=1; NNODES=1; MASTER=""; RANK=""; LOG_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --master) MASTER="$2"; shift 2 ;;
    --rank) RANK="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then echo "error: launch.sh: missing CONFIG (see --help)" >&2; exit 2; fi
ARGS=(--nproc_per_node "$NPROC")
if [ "$NNODES" != 1 ]; then
  if [ -z "$MASTER" ] || [ -z "$RANK" ]; then echo "error: launch.sh: --nnodes > 1 needs --master and --rank" >&2; exit 2; fi
  ARGS+=(--nnodes "$NNODES" --master "$MASTER" --rank "$RANK")
fi
[ -n "$LOG_DIR" ] && ARGS+=(--log_dir "$LOG_DIR")
# one thread per process unless the user says otherwise: N processes share the node's cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
MAIN="$("$PY" -c 'import os, ernie5; print(os.path.join(os.path.dirname(ernie5.__file__), "__main__.py"))')"
exec "$PY" -m paddle.distributed.launch "${ARGS[@]}" "$MAIN" train "$@"

#!/usr/bin/env bash
# The first command to run on a machine with GPUs: every GPU-only path once (Paddle's attention kernels under the
# packed-document and scale-wise masks, FlashMask, bf16 AMP, FP8, and on 2+ GPUs NCCL all-to-all, TP and PP) on a
# tiny config, each compared with its CPU reference; one PASS / FAIL / SKIP line per path, exit 0 iff no FAIL.
#
#   PYTHON=/path/to/python scripts/gpu_check.sh [--cpu] [--workdir DIR] [--only NAME ...]
#
# PYTHON: an environment with paddlepaddle-gpu and ernie5's dependencies (e.g. `pip install -e ".[gpu]"`); it is
# used as it is, nothing is installed. Without PYTHON the repo's .venv is set up as scripts/test.sh does (that
# installs the CPU wheel: fine for --cpu, not for GPUs). No GPU: one line, exit 2; `--cpu` then runs everything
# on CPU (2 gloo ranks for the multi-device checks), the half the test suite runs (tests/test_gpu_check.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CPU=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
  cd "$ROOT"
else
  source "$ROOT/scripts/_venv.sh"  # cd's to the repo root
  PY="$ROOT/.venv/bin/python"
fi
export NVIDIA_TF32_OVERRIDE="${NVIDIA_TF32_OVERRIDE:-0}"  # fp32 references need fp32 GEMMs, not TF32
GPUS="$("$PY" -c 'import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)' \
  2>/dev/null | tail -n 1)" || GPUS=0
case "$GPUS" in ''|*[!0-9]*) GPUS=0 ;; esac
if [ "$GPUS" -ge 1 ]; then
  MULTI="multi-device checks on 2 of them"
  [ "$GPUS" -ge 2 ] || MULTI="multi-device checks skipped (they need 2)"
  echo "== $GPUS GPU(s): single-device checks, $MULTI"
  exec "$PY" -m ernie5.tools.gpu_check --device gpu ${ARGS[@]+"${ARGS[@]}"}
fi
if [ "$CPU" = 1 ]; then
  echo "== no GPU: running the CPU half (--device cpu, 2 gloo ranks)"
  exec "$PY" -m ernie5.tools.gpu_check --device cpu --nproc 2 ${ARGS[@]+"${ARGS[@]}"}
fi
BUILD="$("$PY" -c 'import paddle; print(f"paddle {paddle.__version__}, CUDA build: {paddle.is_compiled_with_cuda()}")' \
  2>/dev/null | tail -n 1)" || BUILD="$PY"
echo "gpu_check: no GPU visible ($BUILD): nothing to check (scripts/gpu_check.sh --cpu runs the CPU half)" >&2
exit 2

#!/usr/bin/env bash
# The GPU check of the CUDA kernels (issue 20), in one command on a fresh GPU machine that has a CUDA
# build of torch, nvcc and this repository's .venv, but no network; about 8 minutes at most:
#   1 env        python -m lorabench env (versions, GPU, kernel backends)
#   2 build      the extension for the local GPU's architecture only (LORABENCH_CUDA_ARCHS), in place
#   3 tests      every CUDA test: tests/kernels -k cuda (the cuda backend's property tests, the nvcc
#                compile test, the device and dtype checks)
#   4 sanitizer  compute-sanitizer memcheck and racecheck on one call of every kernel
#                (tools/gpu_kernel_calls.py), where compute-sanitizer is installed
#   5 bench      NF4 / int4 GEMV (batch 1 and 8; 4096x4096, 4096x11008: the vectorised x loads),
#                lora_linear, dora_linear forward+backward (the 2-D DoRA gradient kernel), BGMV/SGMV
#                (bench serving: decode batch 64 and prefill 8 x 32, then decode batch 1, where BGMV
#                splits `in` across blocks, and one 512-token prefill, SGMV's grouped GEMM), JSON into OUT
# Each step's log and its seconds go to OUT (default results/kernels/gpu); the exit status is the number
# of failed steps. --dry-run (on a CPU, in CI): every step but the CUDA build and the CUDA-only ones; the
# kernel calls then run on the CPU backend and the benchmarks on tiny shapes, into a temporary OUT.
#
# Usage: tools/gpu_check.sh [--dry-run] [--out DIR]   (PYTHON=path/to/python overrides .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; valid: --dry-run, --out DIR" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_check.sh: no python at $PY (make the Quickstart's .venv or set PYTHON)" >&2
  exit 2
fi
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="$(mktemp -d)"; else OUT=results/kernels/gpu; fi
fi
mkdir -p "$OUT"
: > "$OUT/steps.txt"
FAILED=0
START=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: runs it with its log in OUT/NAME.log and one line in OUT/steps.txt
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local line="$name rc=$rc $(( $(date +%s) - t0 )) s"
  echo "$line" | tee -a "$OUT/steps.txt"
  if [ $rc -ne 0 ]; then FAILED=$((FAILED + 1)); tail -20 "$OUT/$name.log"; fi
}
skip() { echo "$1 skipped: $2" | tee -a "$OUT/steps.txt"; }

step env 60 "$PY" -m lorabench env

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  skip build "dry run (the CUDA build needs a GPU machine)"
else
  DEVICE=cuda
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null)
  if [ -z "$ARCH" ]; then
    echo "gpu_check.sh: torch sees no CUDA GPU here; run with --dry-run on a CPU" >&2
    exit 2
  fi
  step build 240 env LORABENCH_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
  step build_has_cuda 60 "$PY" -c "import lorabench._C as c; assert c.with_cuda, 'the extension was built without CUDA'"
fi

if [ "$DRY" = 1 ]; then  # the CUDA tests collect and skip; nvcc's compile test already runs in the main suite
  step tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels -k "cuda and not test_cuda_compile"
else
  step tests 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels -k cuda
fi

if [ "$DRY" = 1 ]; then
  step kernel_calls 120 "$PY" tools/gpu_kernel_calls.py --device cpu
  skip sanitizer "dry run (compute-sanitizer needs a GPU)"
elif command -v compute-sanitizer > /dev/null 2>&1; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tools/gpu_kernel_calls.py --device cuda
  done
else
  skip sanitizer "compute-sanitizer is not on PATH"
fi

if [ "$DRY" = 1 ]; then
  QUANT=(--tokens 1 --shapes 128x64 --rounds 1 --sample 0.001 --option bw_gib=0.01)
  LORA=(--tokens 1 --shapes 128x64 --ranks 4 --rounds 1 --sample 0.001 --modes fwd)
  SERVING=(--n-adapters 1,2 --rounds 1 --decode-batch 2 --prefill-batch 1 --prefill-len 8)
  SERVING1=(--n-adapters 1 --rounds 1 --decode-batch 1 --prefill-batch 1 --prefill-len 8)
  DTYPE=float32
else
  QUANT=(--tokens 1,8 --shapes 4096x4096,4096x11008 --rounds 5)
  LORA=(--tokens 1,16,512 --shapes 4096x4096 --ranks 16 --rounds 5)
  SERVING=(--preset llama-7b-2l --n-adapters 1,8,32 --rounds 3)
  SERVING1=(--preset llama-7b-2l --n-adapters 1,8 --rounds 3 --decode-batch 1 --prefill-batch 1 --prefill-len 512)
  DTYPE=bfloat16
fi
for op in nf4_linear int4_linear; do
  step "bench_$op" 120 "$PY" -m lorabench bench kernels --op "$op" --device "$DEVICE" --dtype "$DTYPE" "${QUANT[@]}" --out "$OUT"
done
step bench_lora_linear 120 "$PY" -m lorabench bench kernels --op lora_linear --device "$DEVICE" --dtype "$DTYPE" "${LORA[@]}" --out "$OUT"
step bench_dora_linear 120 "$PY" -m lorabench bench kernels --op dora_linear --device "$DEVICE" --dtype "$DTYPE" "${LORA[@]}" --out "$OUT"
step bench_serving 180 "$PY" -m lorabench bench serving --device "$DEVICE" --dtype "$DTYPE" "${SERVING[@]}" --out "$OUT"
step bench_serving_batch1 120 "$PY" -m lorabench bench serving --device "$DEVICE" --dtype "$DTYPE" "${SERVING1[@]}" --out "$OUT/batch1"

echo "gpu_check.sh: $FAILED failed step(s) in $(( $(date +%s) - START )) s; logs and JSON in $OUT"
exit $FAILED

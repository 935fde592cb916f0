#!/usr/bin/env bash
# make gpu-check: everything this project can learn from one short session on a machine with one CUDA GPU and
# no network (written for an H100/H200: Python 3.12, torch 2.11+cu130, Triton 3.6, nvcc 13). It has never run on a
# GPU: its run time there is an estimate (docs/development.rst, "GPU checks").
#
#   1. preflight: a CUDA device, torch, triton and nvcc; the device, versions and nvidia-smi go to the output
#      (no CUDA device: exit status 2, nothing else runs);
#   2. builds fusedloss._C with its CUDA kernels for this GPU's architecture (in place, nothing installed);
#   3. runs tests/test_gpu.py in two phases (test: every family's values and gradients; test_compile: the
#      torch.compile(fullgraph=True) models): the triton and cuda backends on CUDA tensors against torch,
#      pytorch-crf and the float64 reference, for the softmax losses, the linear head, the CRF, the sigmoid and
#      multi-label losses and the vocabulary-parallel losses on a world of one; each check's max error against
#      float64 goes to test_gpu_errors.jsonl;
#   4. runs the GPU benchmark grids: cross entropy N=8192, V = 128256, 262144 and 32000, bf16, forward+backward,
#      against eager, torch.compile and Liger-Kernel when importable, with the achieved HBM bandwidth of every row
#      against a device copy of the same bytes timed in the same run; the fused linear head; the CRF
#      (log-likelihood forward+backward, decode) against pytorch-crf at B=32, T=128/512, K=9/73; the sigmoid and
#      multi-label losses at 8192x1024 bf16 against torch and eager;
#   5. writes summary.md: one table per family and backend (time, GB/s, % of copy, max error against float64),
#      the tests' failures and the goals of the project checked against these figures.
#
# Everything goes to one folder: $OUT if set (the device runner collects it), else gpu-check-out/<date>.
# Wheels the machine may lack (pytorch-crf, pytest and its dependencies, ninja) come from vendor/wheels,
# installed with --no-index into a folder of the output, never into the machine's Python. Every phase has a time
# limit (580 s in all, so that the whole run stays under 10 minutes) and the script goes on after a failed phase,
# so one run reports as much as it can; the exit status is that of the first failed phase.
#
#   PYTHON   the interpreter with torch (default python3)
#   PHASES   the phases to run (default "build test bench")
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
PHASES=${PHASES:-"build test bench"}
OUT=${OUT:-$ROOT/gpu-check-out/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
START=$(date +%s)
STATUS=0

say() { echo "gpu-check [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
phase() {  # phase NAME SECONDS COMMAND...: runs COMMAND with a time limit, output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  say "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" | sed "s/^/  $name| /" | tee -a "$LOG"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "$name: TIMED OUT after ${limit}s"; fi
  say "$name: exit status $rc"
  echo "$name $rc" >> "$OUT/phases.txt"
  if [ $rc -ne 0 ] && [ $STATUS -eq 0 ]; then STATUS=$rc; fi
  return $rc
}

# ---------------------------------------------------------------------------------------------- 1. preflight
if ! "$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton not importable")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
             "gpu-check needs a machine with one CUDA GPU")
props = torch.cuda.get_device_properties(0)
print(f"device {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
      f"{props.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
EOF
then
  cat "$OUT/environment.txt" | tee -a "$LOG"
  say "FAILED preflight: $(tail -n 1 "$OUT/environment.txt")"
  say "results (environment only) in $OUT"
  exit 2
fi
cat "$OUT/environment.txt" | tee -a "$LOG"
(nvidia-smi; nvcc --version) >> "$OUT/environment.txt" 2>&1

# The wheels the machine lacks, from the working tree (no network).
SITE="$OUT/site-packages"
missing=()
"$PY" -c "import torchcrf" 2>/dev/null || missing+=(vendor/wheels/pytorch_crf-*.whl)
"$PY" -c "import pytest" 2>/dev/null || missing+=(vendor/wheels/pytest-*.whl vendor/wheels/pluggy-*.whl
                                                  vendor/wheels/iniconfig-*.whl vendor/wheels/packaging-*.whl)
# ninja compiles the extension's sources in parallel (without it setuptools compiles them one by one).
command -v ninja > /dev/null || [ "$(uname -m)" != x86_64 ] || missing+=(vendor/wheels/ninja-*manylinux*x86_64*.whl)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing from vendor/wheels into $SITE: ${missing[*]}"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}" >> "$LOG" 2>&1 ||
    say "could not install the vendored wheels (see $LOG)"
fi
# fusedloss from the working tree: python/ holds the package (and, after the build, _C); the Triton kernels
# are fusedloss.triton_kernels once installed, so a link in a staging folder stands in for the install.
STAGE="$OUT/stage"
mkdir -p "$STAGE"
rm -rf "$STAGE/fusedloss"
cp -r python/fusedloss "$STAGE/fusedloss"
rm -rf "$STAGE/fusedloss/triton_kernels"
cp -r triton_kernels "$STAGE/fusedloss/triton_kernels"
rm -f "$STAGE"/fusedloss/_C*.so  # a CPU build of the working tree, if any: the build phase provides this one
export PYTHONPATH="$STAGE:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export TRITON_INTERPRET=0
export PYTHONDONTWRITEBYTECODE=1

# ---------------------------------------------------------------------------------------------- 2. build
if [[ " $PHASES " == *" build "* ]]; then
  ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
  export PY OUT STAGE
  export TORCH_CUDA_ARCH_LIST="$ARCH" FUSEDLOSS_STRICT_BUILD=1 MAX_JOBS=$(nproc)
  # (timeout runs programs, not shell functions: the build is one bash -c.)
  phase build 90 bash -c '
    "$PY" setup.py -q build_ext --build-temp "$OUT/build" --build-lib "$OUT/build-lib" &&
    cp "$OUT"/build-lib/fusedloss/_C*.so "$STAGE/fusedloss/" &&
    "$PY" -c "import fusedloss, fusedloss._C as C; assert C.WITH_CUDA; print(fusedloss.available_backends())"'
fi

# ---------------------------------------------------------------------------------------------- 3. tests
if [[ " $PHASES " == *" test "* ]]; then
  # Two runs, so that a slow torch.compile cannot take the numerical checks' report with it (a run that times out
  # writes no XML report; the error records of test_gpu_errors.jsonl are appended as each check runs).
  export FUSEDLOSS_GPU_CHECK_OUT="$OUT"
  rm -f "$OUT/test_gpu_errors.jsonl"
  phase test 160 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not test_compile" \
    --junitxml "$OUT/test_gpu.xml" -rfEs
  phase test_compile 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "test_compile" \
    --junitxml "$OUT/test_gpu_compile.xml" -rfEs
fi

# ---------------------------------------------------------------------------------------------- 4. benchmarks
if [[ " $PHASES " == *" bench "* ]]; then
  # One run per shape, the goal's shape first, so that a phase that runs out of time loses only its own rows.
  for vocab in 128256 262144 32000; do
    phase "bench_cross_entropy_$vocab" 25 "$PY" -m fusedloss.bench --device cuda --ops cross_entropy \
      --shapes "8192x$vocab" --dtype bfloat16 --repeats 10 --warmup 3 --no-progress \
      --out "$OUT" --name "cross_entropy_8192x${vocab}_{device}"
  done
  # torch.compile (cold Inductor compiles of forward and backward) at the goal's shape, with eager and fusedloss
  # timed again in the same process.
  phase bench_cross_entropy_compile 50 "$PY" -m fusedloss.bench --device cuda --ops cross_entropy \
    --shapes 8192x128256 --dtype bfloat16 --compile --repeats 10 --warmup 3 --no-progress \
    --out "$OUT" --name "cross_entropy_compile_8192x128256_{device}"
  # The fused linear head at the large-model shape, per backend, against eager, torch's chunked head, Liger's and
  # Cut Cross-Entropy's (when importable).
  phase bench_linear_cross_entropy 45 "$PY" -m fusedloss.bench --device cuda --ops linear_cross_entropy \
    --shapes 8192x4096x128256 --dtype bfloat16 --repeats 5 --warmup 2 --no-progress \
    --out "$OUT" --name "linear_cross_entropy_8192x4096x128256_{device}"
  for length in 128 512; do
    phase "bench_crf_T$length" 25 "$PY" -m fusedloss.bench --device cuda --ops crf_nll,crf_decode \
      --shapes "32x${length}x9,32x${length}x73" --dtype float32 --repeats 10 --warmup 2 --no-progress \
      --out "$OUT" --name "crf_T${length}_{device}"
  done
  # The sigmoid and multi-label losses (the Triton backend; the cuda backend declines them) against torch and eager.
  phase bench_sigmoid 30 "$PY" -m fusedloss.bench --device cuda \
    --ops bce_pos_weight,sigmoid_focal,multilabel_soft_margin,zlpr,ghmc_10,bi_tempered_0.8_1.2 \
    --shapes 8192x1024 --dtype bfloat16 --repeats 10 --warmup 2 --no-progress --out "$OUT" --name "sigmoid_{device}"
fi

# ---------------------------------------------------------------------------------------------- 5. summary
"$PY" scripts/gpu_check_summary.py "$OUT" > "$OUT/summary.md" 2>> "$LOG" || say "summary failed (see $LOG)"
cat "$OUT/summary.md" | tee -a "$LOG"
rm -rf "$STAGE" "$OUT/build" "$OUT/build-lib"
say "done, exit status $STATUS; everything is in $OUT"
exit $STATUS

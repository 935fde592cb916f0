#!/usr/bin/env bash
# Builds fusedloss._C as a CUDAExtension against the CUDA build of torch, with the nvcc on PATH, for sm_80 and
# sm_90, on a machine without a GPU: the compile and link check of csrc/cuda (kernels and their torch
# bindings). Opt-in (`make cuda-build-check`), not part of the test suite: the first run installs the CUDA
# build of torch into its own venv, several GB from PyPI.
#
#   CUDA_VENV    the venv to use or create (default .venv-cuda)
#   TORCH_SPEC   the torch to install there (default torch==2.13.0; PyPI's default Linux wheel is the CUDA one)
#
# The build goes to build/cuda-check (not the source tree), so the CPU build of .venv stays as it is; it is kept
# between runs, so a second run compiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ]; then
  echo "cuda-build-check: nvcc is not on PATH" >&2
  exit 2
fi
if [ -z "${CUDA_HOME:-}" ]; then
  # The toolkit root as nvcc itself reports it (nvcc on PATH may be a wrapper script outside the toolkit).
  echo > "${TMPDIR:-/tmp}/fusedloss_probe.cu"
  CUDA_HOME=$(readlink -f "$("$NVCC" --dryrun -c "${TMPDIR:-/tmp}/fusedloss_probe.cu" 2>&1 | sed -n 's/^#\$ TOP=//p')")
  rm -f "${TMPDIR:-/tmp}/fusedloss_probe.cu"
  export CUDA_HOME
fi
echo "cuda-build-check: CUDA_HOME=$CUDA_HOME"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "cuda-build-check: installing $TORCH_SPEC (the CUDA build: several GB) into $VENV"
  "$VENV/bin/pip" --isolated install -q "$TORCH_SPEC" numpy setuptools wheel ninja
fi
"$VENV/bin/python" -m pip --isolated install -q setuptools wheel ninja numpy >/dev/null

"$VENV/bin/python" - <<'PY'
import torch
print(f"cuda-build-check: torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
"$NVCC" --version | tail -1

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export FUSEDLOSS_STRICT_BUILD=1
export MAX_JOBS=${MAX_JOBS:-2}
BUILD=build/cuda-check  # kept between runs: ninja rebuilds what changed
start=$(date +%s)
"$VENV/bin/python" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
echo "cuda-build-check: built in $(( $(date +%s) - start )) s"

# The built module loads without a GPU, says it has CUDA kernels, and registers them for every device op.
PYTHONPATH="$BUILD/lib:python" "$VENV/bin/python" - <<'PY'
import importlib.util, os, re, subprocess
import torch
so = [f for f in os.listdir("build/cuda-check/lib/fusedloss") if f.startswith("_C")]
spec = importlib.util.spec_from_file_location("fusedloss._C", os.path.join("build/cuda-check/lib/fusedloss", so[0]))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.WITH_CUDA, "fusedloss._C was built without CUDA"
ops = ["softmax_loss_forward", "crf_log_likelihood_forward", "crf_log_likelihood_backward", "crf_viterbi",
       "crf_marginals", "crf_partial_log_likelihood_forward", "crf_partial_log_likelihood_backward",
       "crf_log_partition_forward", "crf_log_partition_backward", "crf_kbest_viterbi"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
# cuobjdump of the toolkit, or the one the triton wheel bundles (a minimal toolkit may lack it).
cuobjdump = os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump")
if not os.path.exists(cuobjdump):
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
listing = subprocess.run([cuobjdump, "--list-elf", spec.origin], capture_output=True, text=True, check=True).stdout
archs = sorted(set(re.findall(r"sm_\d+", listing)))
assert {"sm_80", "sm_90"} <= set(archs), f"expected sm_80 and sm_90 cubins, found {archs}"
print("cuda-build-check: cubins for", ", ".join(archs))
print("cuda-build-check: OK, CUDA kernels registered for", ", ".join(ops))
PY

"""Build of fusedloss.

The Python package lives in python/fusedloss; the Triton kernels in triton_kernels/ are installed
as fusedloss.triton_kernels. The fusedloss._C extension is built from csrc/ (CppExtension, or
CUDAExtension when torch has CUDA and nvcc is present). FUSEDLOSS_NO_EXT=1 skips it, and a failed
build only warns: the pure-Python package stays importable (FUSEDLOSS_STRICT_BUILD=1 makes it fail).
It needs torch 2.5 or later (python/fusedloss/_floor.py says why).

Install into an environment that already has torch: pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions_and_cmdclass():
    if os.environ.get("FUSEDLOSS_NO_EXT", "0") not in ("", "0"):
        return [], {}
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpu_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fusedloss: torch not importable, skipping the _C extension", file=sys.stderr)
        return [], {}

    # torch >= 2.10 headers are C++20. -fno-trapping-math lets the compiler if-convert (and so vectorize) the
    # branch-free selects of the kernels' exp; nothing here reads floating-point exception flags. -g0 drops the
    # debug information Python's CFLAGS ask for: with torch's headers it triples compile time and .so size.
    # -Wno-psabi: GCC notes that functions taking or returning 32- and 64-byte vectors pass them differently with
    # and without AVX; the kernels' vector helpers are always inlined, so no such call exists.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-g0", "-Wno-psabi"]
    # Vector ISA: the extension is built for baseline x86-64 (the wheel must run on any x86-64); the jobs'
    # loops are compiled again for AVX2 + FMA and for AVX-512 and picked at run time (csrc/cpu/isa.h).
    # FUSEDLOSS_NATIVE=1 opts into -march=native for a local build.
    if os.environ.get("FUSEDLOSS_NATIVE", "0") not in ("", "0"):
        cxx_flags.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("FUSEDLOSS_NO_CUDA", "0") in ("", "0")
    )
    if with_cuda:
        define_macros.append(("FUSEDLOSS_WITH_CUDA", "1"))
        # torch's CUDA flags define __CUDA_NO_HALF_CONVERSIONS__ and friends, which remove the conversions between
        # __half / __nv_bfloat16 and float that the shared kernels (csrc/kernels, written for any 16-bit type
        # convertible to float) rely on; undefine them, as the standalone compile of csrc/cuda (CMake) does.
        # No --use_fast_math: it turns exp/log/pow/division into approximations with flush-to-zero, and the
        # kernels promise torch-level error (docs/fidelity.md).
        nvcc_flags = ["-O3", "-std=c++20", "-U__CUDA_NO_HALF_OPERATORS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "-U__CUDA_NO_HALF2_OPERATORS__"]
        ext = cpp_extension.CUDAExtension(
            "fusedloss._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fusedloss._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    strict = os.environ.get("FUSEDLOSS_STRICT_BUILD", "0") not in ("", "0")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds fusedloss._C; a failure warns and leaves the pure-Python package installable
        (FUSEDLOSS_STRICT_BUILD=1 makes it fail instead, for development and CI of the kernels)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 (any compiler/linker failure)
                if strict:
                    raise
                print(f"fusedloss: WARNING: building fusedloss._C failed ({exc}); "
                      "the cpp/cuda backends will be unavailable", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if strict:
                    raise
                print(f"fusedloss: WARNING: building {ext.name} failed ({exc})", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


def _readme():
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    name="fusedloss",
    version="0.1.0",
    description="Fused loss kernels (cross entropy, focal, CRF, multi-label) for PyTorch",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fusedloss." + p for p in find_packages("python/fusedloss")] + ["fusedloss", "fusedloss.triton_kernels"],
    package_dir={"fusedloss": "python/fusedloss", "fusedloss.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["matplotlib", "tqdm", "pytorch-crf"],
                    "transformers": ["transformers>=5,<6"]},
    entry_points={"console_scripts": ["fusedloss-bench=fusedloss.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

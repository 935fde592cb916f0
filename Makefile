# The two commands of the README: `make bench` (main job) and `make test` (the test suite); `make docs` builds
# the documentation.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch a venv gets, and the requirements installed after it. CI makes a second venv with the oldest
# supported torch: `make venv VENV=.venv-floor TORCH=torch==2.5.1 REQUIREMENTS=requirements-floor.txt`.
TORCH ?= torch==2.13.0
REQUIREMENTS ?= requirements-test.txt

.PHONY: venv bench test docs ctest lint clean cuda-build-check triton-build-check gpu-check

# The extension's build log is shown (no -q); FUSEDLOSS_STRICT_BUILD=1 (CI) makes a failed compile an error.
$(VENV)/.installed: setup.py $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

bench: venv
	$(VENV)/bin/fusedloss-bench --quick --out bench-out

test: venv
	$(PY) -m pytest -q tests

# The documentation (Sphinx: autodoc + napoleon, myst-parser for the Markdown pages) into docs/_build/html; every
# warning is an error.
docs: venv
	$(PY) -m pip install -q -r docs/requirements.txt
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

ctest:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j2
	cd build/cmake && ctest --output-on-failure

# Opt-in checks of the GPU code on a machine without a GPU (not part of `make test`):
# cuda-build-check builds fusedloss._C as a CUDAExtension for sm_80/sm_90 in .venv-cuda (installs the
# CUDA build of torch there on first use: several GB); triton-build-check compiles every Triton kernel
# for sm_90 at every launch configuration and reports register spills.
cuda-build-check:
	scripts/cuda_build_check.sh

triton-build-check: venv
	FUSEDLOSS_GPU_COMPILE_CHECK=1 $(PY) -m pytest -q -s tests/test_triton_build.py

# On a machine with one CUDA GPU (no network needed; its own Python with torch, PYTHON=...): builds the
# extension, runs tests/test_gpu.py and the GPU benchmarks, writes everything to $OUT (docs/development.rst).
gpu-check:
	scripts/gpu_check.sh

lint: venv
	$(VENV)/bin/ruff check python triton_kernels tests benchmarks examples

clean:
	rm -rf build $(VENV) *.egg-info python/fusedloss/_C*.so

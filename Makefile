# The two commands of the README: `make bench` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv bench test ctest lint clean

$(VENV)/.installed: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

bench: venv
	$(VENV)/bin/fusedloss-bench --quick --out bench-out

test: venv
	$(PY) -m pytest -q tests

ctest:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j2
	cd build/cmake && ctest --output-on-failure

lint: venv
	$(VENV)/bin/ruff check python triton_kernels tests benchmarks examples

clean:
	rm -rf build $(VENV) *.egg-info python/fusedloss/_C*.so

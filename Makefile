# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
CMAKE_CUDA_ARCHITECTURES ?= 80;90
# Keras is tested on all three of its backends; torch is pinned to a CPU build where one is at hand.
KERAS_BACKENDS_SPEC ?= jax torch==2.13.0

.PHONY: demo test bench kernels lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" $(KERAS_BACKENDS_SPEC)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastsplit demo

# The whole suite under Keras' default backend (TensorFlow), slow cases included (the big
# keras.applications models), then the Keras tests again under JAX and PyTorch without the
# slow cases: Keras fixes its backend once per process.
test: $(STAMP)
	$(PY) -m pytest
	KERAS_BACKEND=jax $(PY) -m pytest tests/keras -q -m "not slow"
	KERAS_BACKEND=torch $(PY) -m pytest tests/keras -q -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

kernels:
	cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$(CMAKE_CUDA_ARCHITECTURES)"
	cmake --build build

lint: $(STAMP)
	$(VENV)/bin/ruff check fastsplit tests benchmarks

clean:
	rm -rf build .pytest_cache .benchmarks

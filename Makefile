# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
CMAKE_CUDA_ARCHITECTURES ?= 80;90
# Keras is tested on all three of its backends; torch is pinned to a CPU build where one is at hand.
KERAS_BACKENDS_SPEC ?= jax torch==2.13.0
KERAS_HUB_SPEC ?= keras-hub==0.32.0 regex tokenizers

.PHONY: demo test bench kernels lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" $(KERAS_BACKENDS_SPEC)
	# keras_hub for the transformer tests only, without its dependencies: they would pull the full tensorflow
	# and tensorflow-text next to tensorflow-cpu. regex and tokenizers are what it needs to import and build
	# backbones (keras-hub 0.32 needs Python >= 3.11; without it those tests skip).
	$(PY) -m pip install -q --no-deps $(KERAS_HUB_SPEC) || echo "keras_hub not installed: tests/keras/test_keras_hub.py skips its backbones"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastsplit demo

# The whole suite under Keras' default backend (TensorFlow), slow cases included (the big
# keras.applications models), and the Keras tests again under JAX and PyTorch without the
# slow cases: Keras fixes its backend once per process. The three run side by side (their
# tests are mostly single-threaded Python, so two cores give close to twice the speed); the
# JAX and PyTorch logs are printed after, in full where they failed.
test: $(STAMP)
	@KERAS_BACKEND=jax $(PY) -m pytest tests/keras -q -m "not slow" -p no:cacheprovider > .pytest-jax.log 2>&1 & jax=$$!; \
	KERAS_BACKEND=torch $(PY) -m pytest tests/keras -q -m "not slow" -p no:cacheprovider > .pytest-torch.log 2>&1 & torch=$$!; \
	$(PY) -m pytest; tf=$$?; \
	wait $$jax; j=$$?; wait $$torch; t=$$?; \
	for b in jax torch; do echo "== Keras tests under $$b"; \
		if grep -qE "(failed|error)" .pytest-$$b.log; then cat .pytest-$$b.log; else tail -n 4 .pytest-$$b.log; fi; done; \
	echo "exit status: TensorFlow (all tests) $$tf, JAX $$j, PyTorch $$t"; \
	test $$tf -eq 0 && test $$j -eq 0 && test $$t -eq 0

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

kernels:
	cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$(CMAKE_CUDA_ARCHITECTURES)"
	cmake --build build

lint: $(STAMP)
	$(VENV)/bin/ruff check fastsplit tests benchmarks

clean:
	rm -rf build .pytest_cache .benchmarks

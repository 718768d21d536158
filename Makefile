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

# The Keras tests under each of Keras' backends (TensorFlow, the default, with the slow cases:
# the big keras.applications models; JAX and PyTorch without them: Keras fixes its backend once
# per process) and the backend-free core tests, as four processes side by side: the tests are
# mostly single-threaded Python, so two cores run them in about half the time, and the core
# tests keep the second core busy once the short passes end. Logs of the background passes are
# printed after, in full where they failed. JAX spends most of its pass compiling tiny models
# anew after every growth event: LLVM's level-0 optimisation compiles them about a third faster
# (measured side by side on the 2-core VM; TensorFlow's pass is unaffected), and the tests'
# arrays are too small for the generated code's speed to matter.
test: $(STAMP)
	@$(PY) -m pytest tests --ignore=tests/keras -q > .pytest-core.log 2>&1 & core=$$!; \
	XLA_FLAGS=--xla_backend_optimization_level=0 KERAS_BACKEND=jax $(PY) -m pytest tests/keras -q -m "not slow" -p no:cacheprovider > .pytest-jax.log 2>&1 & jax=$$!; \
	KERAS_BACKEND=torch $(PY) -m pytest tests/keras -q -m "not slow" -p no:cacheprovider > .pytest-torch.log 2>&1 & torch=$$!; \
	$(PY) -m pytest tests/keras -p no:cacheprovider; tf=$$?; \
	wait $$core; c=$$?; wait $$jax; j=$$?; wait $$torch; t=$$?; \
	for b in core jax torch; do echo "== tests: $$b"; \
		if grep -qE "(failed|error)" .pytest-$$b.log; then cat .pytest-$$b.log; else tail -n 4 .pytest-$$b.log; fi; done; \
	echo "exit status: Keras tests under TensorFlow $$tf, JAX $$j, PyTorch $$t; core tests $$c"; \
	test $$tf -eq 0 && test $$c -eq 0 && test $$j -eq 0 && test $$t -eq 0

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

kernels:
	cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$(CMAKE_CUDA_ARCHITECTURES)"
	cmake --build build

lint: $(STAMP)
	$(VENV)/bin/ruff check fastsplit tests benchmarks

clean:
	rm -rf build .pytest_cache .benchmarks

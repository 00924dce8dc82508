# Two commands do all the set-up:  make test  |  make demo
# Each creates .venv when it is missing and makes sure Fashion-MNIST is present.

PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's notes about this machine's missing extra index folders are noise, not failures
QUIET_PIP := sed '/is ignored: it is neither a file nor a directory/d'
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# torch/torchvision pinned to the wheels this machine holds; pyproject.toml itself accepts newer.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_RUN := runs/demo
# the default recipe plans its epochs to finish training within this
DEMO_BUDGET := 15m

RT_VENV := .venv-runtime
RT_MODELS := .venv-runtime-models
LINTED := fmtl tests benchmarks

# A real browser for the serve page test (Debian's chromium + chromedriver); skipped where it cannot install.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "browser: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "browser: installing Debian's chromium and chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "browser: chromium not installed and apt-get unavailable: the page test will skip"; \
	fi

.PHONY: browser setup data test test-full test-fast test-runtime demo lint docs format bench clean

# The full development install: training side, runtime side, test tools, linter.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, torchvision, accelerate, onnxruntime, fmtl"
	touch $(STAMP)

# Fashion-MNIST: found via FMTL_DATA_DIR or Debian's package; installed with apt-get when we can.
data:
	@if [ -n "$$FMTL_DATA_DIR" ] && [ -f "$$FMTL_DATA_DIR/train-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST: $$FMTL_DATA_DIR"; \
	elif [ -f $(DATA_FILE) ]; then \
		echo "Fashion-MNIST: $(dir $(DATA_FILE))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST not installed and apt-get unavailable: fmtl will try torchvision's download"; \
	fi

# What CI runs: lint and format check, the full suite, then the runtime suite in a torch-free install.
test: lint test-full test-runtime

test-full: setup data browser
	$(PY) -m pytest -q

# The quick subset: everything but the trainings and multi-process launches.
test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

# A clean venv with only the runtime install (the README's `pip install .`): torch must not be
# importable there, and tests/runtime must pass on models the full install writes.
test-runtime: setup browser
	rm -rf $(RT_VENV) $(RT_MODELS)
	$(PYTHON) -m venv $(RT_VENV)
	$(RT_VENV)/bin/python -m pip install --quiet . 2>&1 | $(QUIET_PIP)
	@for m in torch torchvision accelerate onnx; do \
		if $(RT_VENV)/bin/python -c "import $$m" 2>/dev/null; then echo "runtime install has $$m"; exit 1; fi; \
	done; echo "runtime install: no torch, torchvision, accelerate or onnx"
	$(RT_VENV)/bin/python -m pip install --quiet ".[test]" 2>&1 | $(QUIET_PIP)
	$(PY) tests/runtime/onnx_fixtures.py $(RT_MODELS)
	cd tests && FMTL_TEST_MODELS=$(CURDIR)/$(RT_MODELS) ../$(RT_VENV)/bin/python -m pytest -q -p no:cacheprovider runtime

# ruff, the import-layer contracts of pyproject.toml ([tool.importlinter]), and the documentation's links
lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports --no-cache
	$(MAKE) --no-print-directory docs

# The documentation site (docs/, mkdocs.yml) into build/site; --strict fails on a broken link or anchor.
# tests/test_docs.py checks the relative links of README.md and of the other READMEs, which mkdocs does not see.
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir build/site  # not --quiet: it hides the warnings --strict fails on

format: setup
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

# The main job: train the default recipe within DEMO_BUDGET, export (an int8 twin too, unless it loses more than
# a point of accuracy: then only the fp32 file stays), and classify a folder of sample images.
demo: setup data
	run=$(DEMO_RUN)-$$(date +%Y%m%d-%H%M%S) && \
	$(VENV)/bin/fmtl train --budget $(DEMO_BUDGET) --output $$run && \
	{ $(VENV)/bin/fmtl export --onnx $$run --quantize int8 || test -f export/$$(basename $$run).onnx; } && \
	rm -rf runs/demo-samples && $(VENV)/bin/fmtl samples runs/demo-samples -n 12 >/dev/null && \
	$(VENV)/bin/fmtl infer runs/demo-samples --model export/$$(basename $$run).onnx -k 3

bench: setup data
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf runs .pytest_cache $(RT_VENV) $(RT_MODELS)

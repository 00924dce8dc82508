# Two commands do all the set-up:  make test  |  make demo
# Each creates .venv when it is missing and makes sure Fashion-MNIST is present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# torch/torchvision pinned to the wheels this machine holds; pyproject.toml itself accepts newer.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_RUN := runs/demo

.PHONY: setup data test test-fast demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored" || true
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

test: setup data
	$(PY) -m pytest -q

# The quick subset: everything but the trainings and multi-process launches.
test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check fmtl tests benchmarks

# The main job: train the default recipe, export (an int8 twin too, unless it loses more than
# a point of accuracy: then only the fp32 file stays), and classify a folder of sample images.
demo: setup data
	run=$(DEMO_RUN)-$$(date +%Y%m%d-%H%M%S) && \
	$(VENV)/bin/fmtl train --output $$run && \
	{ $(VENV)/bin/fmtl export --onnx $$run --quantize int8 || test -f export/$$(basename $$run).onnx; } && \
	rm -rf runs/demo-samples && $(VENV)/bin/fmtl samples runs/demo-samples -n 12 >/dev/null && \
	$(VENV)/bin/fmtl infer runs/demo-samples --model export/$$(basename $$run).onnx -k 3

bench: setup data
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf runs .pytest_cache

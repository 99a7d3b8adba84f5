# Set-up and test on a fresh machine: `make test`. Serve the demo model: `make serve`.
# CONSTRAINTS pins the CPU torch wheel on CPU-only machines; on a GPU machine
# with its own torch, run `make test CONSTRAINTS=`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

SERVE_ARGS ?=

.PHONY: install test serve bench gpu-check clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	$(PY) -m layers.cpu_kernels
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Serves the small demo checkpoint (built on first use) on 127.0.0.1:30000.
serve: install
	$(PY) -m runtime.launch_server --model-path "$$($(PY) -c 'from runtime.demo_model import demo_model_path; print(demo_model_path("qwen3", "small"))')" $(SERVE_ARGS)

bench: install
	$(PY) -m benchmark.bench_one_batch --batch-size 16 --input-len 128 --output-len 128 --compare-hf

# The prepared GPU check (benchmark/gpu_check.py): report into $(OUT).
OUT ?= gpu-report
gpu-check: install
	$(PY) -m benchmark.gpu_check $(OUT)

clean:
	rm -rf $(VENV) *.egg-info

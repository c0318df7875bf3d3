# One-command set-up and entry points. Every target below depends on `setup`, which is idempotent:
# it only reinstalls when pyproject.toml changed since the last successful install.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# cyvlfeat builds against the numpy and cython already in the venv, hence no build isolation.
$(STAMP): pyproject.toml infra/install_vlfeat.sh
	@infra/install_vlfeat.sh
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "discoattr needs Python >= 3.10"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q setuptools wheel numpy cython scipy
	$(BIN)/pip install -q --no-build-isolation cyvlfeat
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check infra pretrain shards transfer scripts tests

test: lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python pretrain/run.py --run-dir $(RUN_DIR)
	$(BIN)/python transfer/voc07.py --ckpt $(RUN_DIR)/final.safetensors --run-dir $(RUN_DIR)/transfer
	$(BIN)/python -m transfer.export_sets vocboxes --voc runs/transfer/voc-generated/VOCdevkit \
		--out $(RUN_DIR)/classify-data
	$(BIN)/python scripts/classify_table.py --ckpt $(RUN_DIR)/final.safetensors --data $(RUN_DIR)/classify-data \
		--root $(RUN_DIR)/classify -- --set data.splits=3

bench: setup
	$(BIN)/python scripts/bench_shards.py
	$(BIN)/python scripts/bench_cluster.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_transfer.py
	$(BIN)/python scripts/bench_eval.py

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Two commands for a fresh machine:  `make run` (set up + main job)  and  `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LIBRARY ?= data/library
TASKS ?= data/tasks/demo.jsonl
# A few BIG-bench natural-instructions tasks from different families, plus two JSON tasks.
DEMO_TASKS ?= subtask004,subtask033,subtask041,subtask045,sports_understanding,date_understanding

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build in pyproject; GPU users install a CUDA torch first (README).
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# Main job: a library round trip on the real default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2).
run: setup
	$(BIN)/loramint models prepare --name smollm2-135m
	$(BIN)/loramint tasks import-bigbench $(DEMO_TASKS) --out $(TASKS) --max_examples 300
	$(BIN)/loramint train-experts --config configs/experts/demo.yaml --tasks $(TASKS) --library $(LIBRARY)
	$(BIN)/loramint library list --library $(LIBRARY)
	$(BIN)/loramint library search "Answer questions about how long everyday events last" --library $(LIBRARY) --k 3
	$(BIN)/loramint library search "Is this sentence about sports plausible?" --library $(LIBRARY) --k 3
	$(BIN)/loramint library search "Rewrite the sentence in other words" --library $(LIBRARY) --k 3

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_index.py

clean:
	rm -rf $(VENV) data

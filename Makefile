# Two commands for a fresh machine:  `make run` (set up + main job)  and  `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LIBRARY ?= data/library
TASKS ?= data/tasks/demo.jsonl
# A few corpus tasks from different families (loramint data tasks lists them all).
DEMO_TASKS ?= evals.anagrams,evals.born-first,evals.bias_detection,proc.sort_words,proc.weekday_of_date,proc.add

.PHONY: setup run demo library test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build in pyproject; GPU users install a CUDA torch first (README).
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

# Main job: restore the default library + generator from artifacts/ and serve them on 127.0.0.1:8000 with
# an API key kept in data/api-key (made once, mode 600); the server prints curl commands that work as they are.
KEY_FILE ?= data/api-key
run: setup
	$(BIN)/loramint setup
	@test -s $(KEY_FILE) || (mkdir -p $(dir $(KEY_FILE)) && umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))" > $(KEY_FILE))
	LORAMINT_API_KEYS="$$(cat $(KEY_FILE))" LORAMINT_KEY_COMMAND='$$(cat $(KEY_FILE))' $(BIN)/loramint serve --config configs/service/default.yaml

# A small library round trip on the real default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2): corpus
# tasks exported, one expert trained per task, the library searched.
demo: setup
	$(BIN)/loramint models prepare --name smollm2-135m
	$(BIN)/loramint data export $(DEMO_TASKS) --out $(TASKS)
	$(BIN)/loramint train-experts --config configs/experts/demo.yaml --tasks $(TASKS) --library $(LIBRARY)
	$(BIN)/loramint library list --library $(LIBRARY)
	$(BIN)/loramint library search "Answer questions about how long everyday events last" --library $(LIBRARY) --k 3
	$(BIN)/loramint library search "Is this sentence about sports plausible?" --library $(LIBRARY) --k 3
	$(BIN)/loramint library search "Rewrite the sentence in other words" --library $(LIBRARY) --k 3

# An expert library over the seen tasks of the default suite (the shipped corpus, configs/suites/corpus.yaml).
# Resumable: run it again after an interruption and only the missing experts are trained.
# The corpus library (resumable): SHARDS processes of one CPU thread each build it together (docs/experts.md),
# then its summary is written to benchmarks/results/library.json.
SHARDS ?= $(shell nproc 2>/dev/null || echo 1)
library: setup
	$(BIN)/loramint models prepare --name smollm2-135m
	$(BIN)/loramint suite prepare configs/suites/corpus.yaml
	pids=""; for i in $$(seq 0 $$(($(SHARDS) - 1))); do \
	  OMP_NUM_THREADS=1 $(BIN)/loramint train-experts --config configs/experts/corpus.yaml --report null \
	    --shard $$i/$(SHARDS) & pids="$$pids $$!"; \
	done; status=0; for p in $$pids; do wait $$p || status=1; done; exit $$status
	$(BIN)/loramint library summary --library data/library-corpus --out benchmarks/results/library.json

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_index.py

clean:
	rm -rf $(VENV) data

# Everything builds from nothing: `make test` on a fresh clone creates .venv and installs the pinned torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint format demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mmalign tests benchmarks
	$(BIN)/ruff format --check mmalign tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format mmalign tests benchmarks
	$(BIN)/ruff check --fix mmalign tests benchmarks

demo: $(STAMP)
	$(BIN)/mmalign demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rewards.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

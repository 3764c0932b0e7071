# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# GPU machines: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128` (torch's CUDA 12.8 wheels).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
BIN := $(VENV)/bin
STAMP := $(VENV)/.steerscale-installed
CONFIG ?= configs/quickstart.yaml
RESULTS ?= results/quickstart
PYTEST_ARGS ?=

# Small L-BFGS problems in the fitter run ~30x slower when OpenBLAS spreads them over busy cores.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: setup demo test test-slow test-gpu test-peers test-oldest peers-venv bench clean-results

# torch goes in first, on its own: a bare `torch` requirement with no torch installed pulls a
# multi-GB CUDA build. The stamp makes a second `make` reuse the venv until pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_FROM)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/steerscale ladder build
	$(BIN)/steerscale run $(CONFIG)
	$(BIN)/steerscale report $(RESULTS)
	@echo "results: $(RESULTS)/cells/   fits: $(RESULTS)/fits.json   report: $(RESULTS)/report/report.html"

# The suite: unit tests, real tiny models, and a real local-Ray sweep end to end (~12-16 min on 2 cores).
test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The CUDA paths (fp32 parity with the CPU, bf16/fp16 training, reruns, quarter-GPU workers, an
# out-of-memory cell): on a GPU machine, e.g. `make test-gpu TORCH=torch TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
# `make test` runs them too where a GPU is visible, and skips them where none is (CI).
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu -rs $(PYTEST_ARGS)

# Fault injection with real processes (kill -9 workers and drivers, a `ray start --head` cluster),
# and the quick benchmarks (which compare against steering-vectors in .venv-peers).
test-slow: setup peers-venv
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

peers-venv:
	test -x .venv-peers/bin/python || TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" bash tests/peers/run_peer_tests.sh -q

# Parity against peers that pin old versions (steering-vectors needs transformers<5) runs in its own venv.
test-peers:
	TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" bash tests/peers/run_peer_tests.sh

# The oldest transformers and peft that pyproject.toml admits, in their own venv: the quick tier
# passes there too (legacy tuple caches, no Gemma 3, HybridCache), not just on today's releases.
OLDEST ?= transformers==4.44.2 peft==0.12.0
OLDEST_STAMP := .venv-oldest/.steerscale-installed
$(OLDEST_STAMP): pyproject.toml
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet "$(TORCH)" $(TORCH_FROM)
	.venv-oldest/bin/python -m pip install --quiet -e ".[dev]" $(OLDEST)
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	.venv-oldest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider -W ignore::FutureWarning $(PYTEST_ARGS)

# Side-by-side timings against the peers (HF Trainer+PEFT, steering-vectors, Ray Tune, scipy);
# writes benchmarks/RESULTS.md. `make bench BENCH_ARGS=--quick` for the 5-minute version (into RESULTS-partial.md).
BENCH_ARGS ?=
bench: setup peers-venv
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean-results:
	rm -rf results

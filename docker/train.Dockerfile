# GPU training image: OpenRLHF 0.11.2 + vLLM + DeepSpeed + flash-attn + openrlhf-passk, on the NVIDIA
# PyTorch image that OpenRLHF's own dockerfile/Dockerfile builds from.
# Base 26.03-py3: vLLM 0.22+ needs torch 2.11 and 25.11 ships torch 2.10, so on 25.11 vLLM 0.29.0
# replaces torch and the image's other torch-linked packages keep a mismatched ABI (upstream moved to
# 26.03 in June 2026 for this reason). Build from the repository root (scripts/build_images.sh tags by
# version and commit):
#   docker build -f docker/train.Dockerfile -t openrlhf-passk-train:0.1.0 .
# Also used as the Ray image by the KubeRay RayJob (head, GPU workers and job submitter).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.03-py3
FROM ${BASE_IMAGE}

ARG OPENRLHF_VERSION=0.11.2
ARG VLLM_VERSION=0.29.0
ARG DEEPSPEED_VERSION=0.19.6
ARG FLASH_ATTN_VERSION=2.8.3
# Building flash-attn from source takes hours: pass a prebuilt wheel that matches the torch/CUDA/Python
# that vLLM installs, e.g. --build-arg FLASH_ATTN_WHEEL=https://.../flash_attn-2.8.3+cu...-linux_x86_64.whl
ARG FLASH_ATTN_WHEEL=""
ARG APP_UID=1001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# wget: KubeRay's default readiness/liveness probes for Ray pods call it. The base image moves with
# its tag, so apt versions are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# Same clean-up as OpenRLHF's image: these base-image packages conflict with vLLM's torch and
# transformers pins (torchao since transformers 5.15).
RUN pip uninstall -y xgboost transformer_engine flash_attn pynvml opencv-python-headless torchao || true

# OpenRLHF, vLLM and DeepSpeed first (they settle the final torch); OpenRLHF's own requirements are read
# from its metadata, without flash-attn, so pip never builds flash-attn against a torch about to change.
RUN pip install --no-deps "openrlhf==${OPENRLHF_VERSION}" \
    && python -c "import importlib.metadata as m; from packaging.requirements import Requirement as R; rs = [R(s) for s in m.requires('openrlhf')]; print('\n'.join(str(r).split(';')[0] for r in rs if r.name != 'flash-attn' and (r.marker is None or r.marker.evaluate({'extra': 'vllm'}))))" >/tmp/openrlhf-requirements.txt \
    && pip install -r /tmp/openrlhf-requirements.txt "vllm==${VLLM_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" \
    && rm /tmp/openrlhf-requirements.txt

# flash-attn LAST, against the final torch (as upstream does), then import its CUDA extension: an ABI
# mismatch fails the build here instead of at the first packed forward pass on a GPU.
# The flash-attn wheel is a URL (its version is in the file name), so DL3013 cannot apply to it.
# hadolint ignore=DL3013
RUN if [[ -n "${FLASH_ATTN_WHEEL}" ]]; then \
           pip install --no-deps "${FLASH_ATTN_WHEEL}"; \
       else \
           pip install --no-deps --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
       fi \
    && python -c "import torch, flash_attn, flash_attn_2_cuda; print('torch', torch.__version__, 'flash-attn', flash_attn.__version__)"

# This package, with the scripts (train_*.sh, ...) on PATH and the reward file at a fixed path:
# /opt/openrlhf-passk/openrlhf_passk/rewards/maze.py
WORKDIR /opt/openrlhf-passk
COPY pyproject.toml README.md ./
COPY openrlhf_passk ./openrlhf_passk
COPY scripts ./scripts
# "." is this repository at the commit being built (DL3013 wants a version pin for PyPI packages).
# hadolint ignore=DL3013
RUN pip install ".[server,eval]" \
    && python -c "import openrlhf, openrlhf_passk, vllm, deepspeed, flash_attn, flash_attn_2_cuda" \
    && openrlhf-passk --version

# Which release and commit this image is (scripts/build_images.sh passes both; also in the tag).
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="openrlhf-passk-train" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"

# Non-root user; /workspace holds relative data/ and runs/ when no volume is mounted, /cache the
# Hugging Face / Triton caches (world-writable so compose can run the container as the host's uid).
RUN useradd --uid "${APP_UID}" --create-home --shell /bin/bash passk \
    && mkdir -p /workspace /cache \
    && chown passk:passk /workspace \
    && chmod 1777 /cache
ENV PATH=/opt/openrlhf-passk/scripts:${PATH} \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache
USER ${APP_UID}
WORKDIR /workspace

# The install is intact (all three packages findable). OPENRLHF_PASSK_DISABLE=1 keeps our import hook
# (which loads torch on the first openrlhf lookup) out of this check, so it stays well under a second.
HEALTHCHECK --interval=60s --timeout=30s --start-period=30s --retries=3 \
    CMD ["env", "OPENRLHF_PASSK_DISABLE=1", "python", "-c", "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('openrlhf', 'openrlhf_passk', 'vllm')))"]

CMD ["bash"]

# GPU training image: OpenRLHF 0.11.2 + vLLM + DeepSpeed + openrlhf-passk, on the NVIDIA PyTorch image
# that OpenRLHF's own dockerfile/Dockerfile builds from (its tag as of the newest version read: 25.11).
# Build from the repository root:
#   docker build -f docker/train.Dockerfile -t openrlhf-passk-train:0.1.0 .
# Also used as the Ray image by the KubeRay RayJob (head, GPU workers and job submitter).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
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

# Same clean-up as OpenRLHF's image: these base-image packages conflict with vLLM's torch pins.
RUN pip uninstall -y xgboost transformer_engine flash_attn pynvml opencv-python-headless || true

# The flash-attn wheel is a URL (its version is in the file name), so DL3013 cannot apply to it.
# hadolint ignore=DL3013
RUN pip install "vllm==${VLLM_VERSION}" \
    && if [[ -n "${FLASH_ATTN_WHEEL}" ]]; then \
           pip install "${FLASH_ATTN_WHEEL}"; \
       else \
           pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
       fi \
    && pip install "openrlhf[vllm]==${OPENRLHF_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" "vllm==${VLLM_VERSION}"

# This package, with the scripts (train_*.sh, ...) on PATH and the reward file at a fixed path:
# /opt/openrlhf-passk/openrlhf_passk/rewards/maze.py
WORKDIR /opt/openrlhf-passk
COPY pyproject.toml README.md ./
COPY openrlhf_passk ./openrlhf_passk
COPY scripts ./scripts
# "." is this repository at the commit being built (DL3013 wants a version pin for PyPI packages).
# hadolint ignore=DL3013
RUN pip install ".[server,eval]" \
    && python -c "import openrlhf, openrlhf_passk, vllm, deepspeed" \
    && openrlhf-passk --version

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

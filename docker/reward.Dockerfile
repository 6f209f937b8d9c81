# Small CPU image for the maze reward server (FastAPI + uvicorn), and for the data-preparation Job.
# Build from the repository root:
#   docker build -f docker/reward.Dockerfile -t openrlhf-passk-reward:0.1.0 .   (or scripts/build_images.sh)
# The verifier and the maze generator are pure Python: the package is installed without its torch
# dependency (which would add gigabytes), and the build fails below if the server ever needs it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY openrlhf_passk ./openrlhf_passk
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG APP_UID=1001
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REWARD_PORT=5000

COPY --from=build /wheels /wheels
# The wheel is this repository at the commit being built; DL3013 (pin versions) is about PyPI packages.
# hadolint ignore=DL3013
RUN pip install --no-deps /wheels/*.whl \
    && pip install "fastapi==0.165.0" "uvicorn==0.54.0" "pydantic==2.14.4" "tqdm==4.70.1" \
    && rm -rf /wheels \
    && python -c "import sys; sys.modules['torch'] = None; import openrlhf_passk.rewards.server, openrlhf_passk.tasks.maze_cli"

# The data-preparation Job runs this script from the same image.
COPY scripts/prepare_maze_data.sh /opt/openrlhf-passk/scripts/prepare_maze_data.sh
COPY scripts/lib/common.sh /opt/openrlhf-passk/scripts/lib/common.sh
ENV PATH=/opt/openrlhf-passk/scripts:${PATH}

RUN useradd --uid "${APP_UID}" --no-create-home --shell /usr/sbin/nologin passk
USER ${APP_UID}
WORKDIR /tmp
EXPOSE 5000

# No curl/wget in the slim image: probe /health with the standard library. If you change --port,
# set REWARD_PORT to match.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ['REWARD_PORT'], timeout=4)"]

# Which release and commit this image is (scripts/build_images.sh passes both; also in the tag).
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="openrlhf-passk-reward" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"

ENTRYPOINT ["openrlhf-passk", "serve-reward"]
CMD ["--task", "maze", "--host", "0.0.0.0", "--port", "5000"]

# syntax=docker/dockerfile:1
#
# Diff-Prompt grounding service image (deploy/README.md).
#
#   docker build -t diffprompt:gpu .                                      # CUDA + onnxruntime-gpu + TensorRT
#   docker build -t diffprompt:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                --build-arg REQUIREMENTS=requirements/serve.txt .          # CPU only (onnxruntime)
#
# Stage `export` (python + the CPU torch wheel + `.[train]`) exports the committed pipeline
# checkpoint to ONNX artifacts with a fixed DDIM step count each. The runtime stage installs only
# the serving requirements (no torch) into a venv, copies the code and the artifacts, and runs
# `python -m diffprompt.service` as a non-root user.
#
# tests/deploy/test_deploy_dockerfile.py runs hadolint on this file and replays the runtime stage's pip
# install lines (from this file) in a fresh venv, then serves a tiny artifact from that venv.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG EXPORT_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# export: checkpoints/ -> /artifacts/<name>-<steps>steps/ (manifest.json + ONNX graphs)
# ---------------------------------------------------------------------------------------------
FROM ${EXPORT_IMAGE} AS export

# torch as in the Makefile (TORCH ?= torch==2.13.0), the CPU wheel: exporting needs no GPU.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The pipeline directory to export (diffprompt train-prompts writes checkpoints/diffprompt) and the
# DDIM step counts, one artifact each; the runtime serves DIFFPROMPT_ARTIFACT_DIR among them.
ARG PIPELINE=checkpoints/diffprompt
ARG EXPORT_STEPS="25 5"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY diffprompt/ diffprompt/
COPY training/ training/
COPY model_export/ model_export/
# DL3013 (pin pip versions) does not apply: this installs the local project, whose dependency bounds
# are pyproject.toml's (torch is already pinned above).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]"

COPY checkpoints/ checkpoints/
RUN test -d "${PIPELINE}" \
        || { echo "${PIPELINE} is missing: train it (diffprompt train-prompts) or pass --build-arg PIPELINE=..." >&2; exit 1; } \
    && echo "${EXPORT_STEPS}" | xargs diffprompt export --pipeline "${PIPELINE}" --out /artifacts --no-progress --steps \
    && chmod -R a+rX /artifacts

# ---------------------------------------------------------------------------------------------
# runtime: the serving requirements only (no torch), code, artifacts; non-root
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# requirements/serve-gpu.txt (onnxruntime-gpu + TensorRT) on the CUDA base,
# requirements/serve.txt (onnxruntime) for the CPU image.
ARG REQUIREMENTS=requirements/serve-gpu.txt

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The CUDA base images have no Python; python:*-slim bases have one (nothing is installed then).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# DL3008 (pin apt versions) is ignored above on purpose: BASE_IMAGE is a build argument (Ubuntu CUDA
# images or Debian python slim), so no single version pin exists for both; the base image tag fixes
# the distribution release and so the Python minor version.

RUN groupadd --system --gid 10001 diffprompt \
    && useradd --system --uid 10001 --gid diffprompt --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin diffprompt \
    && mkdir -p /var/cache/diffprompt/tensorrt \
    && chown -R diffprompt:diffprompt /var/cache/diffprompt

ENV VIRTUAL_ENV=/opt/venv
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "${VIRTUAL_ENV}"

WORKDIR /app
COPY requirements/ requirements/
RUN pip install --no-cache-dir -r "${REQUIREMENTS}"
# TensorRT's pip wheels put libnvinfer*.so in site-packages (tensorrt_libs/), where onnxruntime's
# TensorRT provider does not look: register that directory with the dynamic loader (GPU image only;
# the CPU image has no such library and the file stays empty).
RUN find "${VIRTUAL_ENV}" -name 'libnvinfer.so.*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/zz-tensorrt-wheel.conf \
    && ldconfig

# The code the server imports, on PYTHONPATH (not pip-installed: the serving requirements above are
# the whole dependency set). training/ is needed for its torch-free tokenizer and preprocessing.
COPY diffprompt/ diffprompt/
COPY training/ training/
COPY model_export/ model_export/
COPY service/ service/
COPY --from=export /artifacts /artifacts

# Defaults; every DIFFPROMPT_* setting is in service/README.md. The shutdown timeout fits `docker stop`'s
# default 10 s grace period; docker-compose.yml and deploy/k8s/ set longer ones with a drain delay.
ENV PYTHONPATH=/app \
    DIFFPROMPT_HOST=0.0.0.0 \
    DIFFPROMPT_PORT=8000 \
    DIFFPROMPT_ARTIFACT_DIR=/artifacts/diffprompt-5steps \
    DIFFPROMPT_PROVIDERS=tensorrt,cuda,cpu \
    DIFFPROMPT_ENGINE_CACHE_DIR=/var/cache/diffprompt/tensorrt \
    DIFFPROMPT_SHUTDOWN_DRAIN_S=0 \
    DIFFPROMPT_SHUTDOWN_TIMEOUT_S=8 \
    DIFFPROMPT_LOG_LEVEL=info

LABEL org.opencontainers.image.title="diffprompt-service" \
      org.opencontainers.image.description="Diff-Prompt visual grounding API (FastAPI + onnxruntime/TensorRT)" \
      org.opencontainers.image.licenses="Apache-2.0"

# TensorRT engine + timing cache: keep it on a volume, or every start rebuilds the engines (minutes).
# /artifacts is baked in; mount another export over it (read-only) to serve other weights.
VOLUME ["/var/cache/diffprompt/tensorrt"]
EXPOSE 8000
# Numeric, so Kubernetes' runAsNonRoot can verify it (user and group `diffprompt`, created above).
USER 10001:10001

# Liveness only (the process is up and its model has not failed); readiness (/readyz, warmed up)
# is the load balancer's business: docker-compose.yml and deploy/k8s/ probe it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('DIFFPROMPT_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "diffprompt.service"]

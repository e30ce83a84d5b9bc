# Diff-Prompt grounding service image (deploy/README.md).
#
#   docker build -t diffprompt:gpu .                                     # CUDA base + diffprompt[serve,gpu]
#   docker build -t diffprompt:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                --build-arg EXTRAS=serve,cpu .                            # CPU only (onnxruntime)
#   bash deploy/local-engine.sh build                                     # no image registry (CI): local Debian
#                                                                         # base, the CPU image and Prometheus
#
# Needs BuildKit (RUN --mount): Docker >= 23 builds with it, Docker 20.10 with DOCKER_BUILDKIT=1. There is no
# `# syntax=` line on purpose: it would make BuildKit pull the Dockerfile frontend from Docker Hub, and the
# engine's built-in frontend reads everything here.
#
# Stages: `wheel` builds the project's wheel; `export` installs it with the `train` and `cpu` extras on the CPU
# torch wheel and exports the committed pipeline checkpoint to ONNX artifacts (one per DDIM step count);
# `runtime` installs the same wheel with `[${EXTRAS}]` (serve + cpu or gpu, never torch) into a venv, copies the
# artifacts in, and runs `python -m diffprompt.service` as a non-root user.
#
# Package index and CA configuration come as optional BuildKit secrets, mounted only while pip/apt run and
# never written to a layer: `pip-conf` (a pip.conf, mounted as /etc/pip.conf), `ca-bundle` (a CA bundle the
# pip.conf's `cert` names as /run/secrets/ca-bundle), `apt-conf` (apt settings such as a proxy). Without them
# pip uses PyPI with its own CA bundle. deploy/local-engine.sh writes them from the host's configuration.
#
# tests/deploy/test_deploy_dockerfile.py runs hadolint on this file and replays the wheel and runtime install
# steps (read from this file) in a fresh venv that then serves a tiny artifact. `make test IMAGE_TESTS=1` (CI)
# builds it for real (deploy/local-engine.sh) and tests/deploy/test_deploy_image.py runs the image.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG EXPORT_IMAGE=python:3.11-slim-bookworm
# A folder of wheels pip may take torch from (find-links), as an image: `scratch` (none: torch comes from
# TORCH_INDEX_URL) or one deploy/local-engine.sh imports from the wheel the host's pip already has.
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS torch-wheels

# ---------------------------------------------------------------------------------------------
# wheel: the project's wheel (/dist/diffprompt-<version>-py3-none-any.whl); its metadata carries every
# dependency, by extra
# ---------------------------------------------------------------------------------------------
FROM ${EXPORT_IMAGE} AS wheel

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/build
COPY pyproject.toml README.md ./
COPY diffprompt/ diffprompt/
COPY training/ training/
COPY model_export/ model_export/
COPY service/ service/
RUN --mount=type=secret,id=pip-conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca-bundle \
    --mount=type=cache,id=diffprompt-pip-wheel,target=/root/.cache/pip,sharing=locked \
    /opt/build/bin/pip wheel --no-deps --wheel-dir /dist . \
    && test "$(find /dist -name 'diffprompt-*.whl' | wc -l)" = 1

# ---------------------------------------------------------------------------------------------
# export: checkpoints/ -> /artifacts/<name>-<steps>steps/ (manifest.json + ONNX graphs)
# ---------------------------------------------------------------------------------------------
FROM ${EXPORT_IMAGE} AS export

# torch as in the Makefile (TORCH ?= torch==2.13.0), the CPU build (`+cpu`): exporting needs no GPU, and a CUDA
# build would pull gigabytes of nvidia-* wheels. TORCH_INDEX_URL: the index that has it (PyTorch's CPU index);
# empty = the index pip is configured with, plus the torch-wheels folder.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The pipeline directory to export (diffprompt train-prompts writes checkpoints/diffprompt) and the
# DDIM step counts, one artifact each; the runtime serves DIFFPROMPT_ARTIFACT_DIR among them.
ARG PIPELINE=checkpoints/diffprompt
ARG EXPORT_STEPS="25 5"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/venv
# ORT_DISABLE_TELEMETRY: `diffprompt export` checks the graphs with onnxruntime; no telemetry from the build.
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1
RUN python3 -m venv "${VIRTUAL_ENV}"

# The build fails if what got installed is not a CPU build (torch.version.cuda set, or nvidia-* wheels).
RUN --mount=type=bind,from=torch-wheels,target=/wheels \
    --mount=type=secret,id=pip-conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca-bundle \
    --mount=type=cache,id=diffprompt-pip-export,target=/root/.cache/pip,sharing=locked \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --find-links /wheels "torch==${TORCH_VERSION}+cpu" \
    && python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build' if torch.version.cuda else 0)" \
    && { ! pip list --format=freeze | grep -i '^nvidia-'; }

# `train` + `cpu`: `diffprompt export` checks every graph it writes with onnxruntime (the CPU build).
# DL3013 (pin pip versions) does not apply: this installs the project's own wheel, whose dependency bounds are
# pyproject.toml's (torch is already installed above and satisfies the `train` extra).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=secret,id=pip-conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca-bundle \
    --mount=type=cache,id=diffprompt-pip-export,target=/root/.cache/pip,sharing=locked \
    set -- /dist/diffprompt-*.whl && pip install "$1[train,cpu]" \
    && python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

WORKDIR /src
COPY checkpoints/ checkpoints/
RUN test -d "${PIPELINE}" \
        || { echo "${PIPELINE} is missing: train it (diffprompt train-prompts) or pass --build-arg PIPELINE=..." >&2; exit 1; } \
    && echo "${EXPORT_STEPS}" | xargs diffprompt export --pipeline "${PIPELINE}" --out /artifacts --no-progress --steps \
    && chmod -R a+rX /artifacts

# ---------------------------------------------------------------------------------------------
# runtime: the wheel with the serving extras only (no torch), artifacts; non-root
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# The wheel's extras: `serve` (FastAPI, uvicorn, Prometheus client) and one onnxruntime build, `gpu`
# (onnxruntime-gpu + TensorRT, the CUDA base) or `cpu` (onnxruntime). Never both: they ship the same module.
ARG EXTRAS=serve,gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The CUDA base images have no Python; python:*-slim and the local Debian base have one (nothing is installed).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-conf,target=/etc/apt/apt.conf.d/99build \
    --mount=type=secret,id=ca-bundle \
    if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi
# DL3008 (pin apt versions) is ignored above on purpose: BASE_IMAGE is a build argument (Ubuntu CUDA
# images or Debian), so no single version pin exists for all; the base image fixes the distribution
# release and so the Python minor version.

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

# The package and its serving dependencies, from the wheel's metadata; the build fails if torch got in, or if
# the installed set is inconsistent (pip check).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=secret,id=pip-conf,target=/etc/pip.conf \
    --mount=type=secret,id=ca-bundle \
    --mount=type=cache,id=diffprompt-pip-runtime,target=/root/.cache/pip,sharing=locked \
    set -- /dist/diffprompt-*.whl && pip install "$1[${EXTRAS}]" \
    && pip check \
    && { ! pip show torch >/dev/null 2>&1 || { echo "torch must not be in the runtime image" >&2; exit 1; }; }
# DL3013 (pin pip versions) is ignored above for the same reason as in the export stage: the project's own wheel.

# TensorRT's pip wheels put libnvinfer*.so in site-packages (tensorrt_libs/), where onnxruntime's
# TensorRT provider does not look: register that directory with the dynamic loader (GPU image only;
# the CPU image has no such library and the file stays empty).
RUN find "${VIRTUAL_ENV}" -name 'libnvinfer.so.*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/zz-tensorrt-wheel.conf \
    && ldconfig

COPY --from=export /artifacts /artifacts

# Defaults; every DIFFPROMPT_* setting is in service/README.md. The shutdown timeout fits `docker stop`'s
# default 10 s grace period; docker-compose.yml and deploy/k8s/ set longer ones with a drain delay.
# ORT_DISABLE_TELEMETRY: onnxruntime >= 1.29 sends usage telemetry from Linux too, and flushes it at exit; where
# the container cannot resolve its endpoint (no egress) that exit waits for a 5 s DNS timeout, which does not fit
# `docker stop`'s grace period. 1 = nothing is collected, stored or sent.
ENV ORT_DISABLE_TELEMETRY=1 \
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
# The service reads an optional `.env` from its working directory; the image ships none.
WORKDIR /
# Numeric, so Kubernetes' runAsNonRoot can verify it (user and group `diffprompt`, created above).
USER 10001:10001

# Liveness only (the process is up and its model has not failed); readiness (/readyz, warmed up)
# is the load balancer's business: docker-compose.yml and deploy/k8s/ probe it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('DIFFPROMPT_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "diffprompt.service"]

# syntax=docker/dockerfile:1
# The GPU worker: CUDA torch + torchvision + OpenCV and the project with its `worker` extra.
# Build from the repository root:
#   docker build -f infra/worker.Dockerfile -t backdrop-worker:0.1.0 .
#   docker build -f infra/worker.Dockerfile --build-arg BAKE_MODEL=deeplabv3_resnet101 \
#       -t backdrop-worker:0.1.0-resnet101 .     # weights baked in: no download at start
#
# python:slim rather than a CUDA base image: the Linux x86_64 torch wheels on PyPI are the CUDA
# build and carry their own CUDA runtime (the nvidia-* wheels), so the host needs only the
# NVIDIA driver and the container toolkit. TORCH_INDEX_URL picks another build (e.g. the
# PyTorch index's cu126 or cpu wheels). The same image runs on CPU (BACKDROP_DEVICE=cpu).
#
# Layers, from least to most often rebuilt: torch (gigabytes), the other dependencies (read
# from pyproject.toml alone), the optional baked weights (only worker/weights.py feeds it),
# then the code.
FROM python:3.11.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/cache/torch \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The torch hub cache is a named volume in compose; a volume takes its owner from the image's
# directory, so it must exist, owned by the runtime user, before the volume is first mounted.
RUN groupadd --gid 10001 backdrop \
    && useradd --create-home --uid 10001 --gid 10001 backdrop \
    && mkdir -p /cache/torch /opt/backdrop/weights \
    && chown backdrop:backdrop /cache/torch

WORKDIR /app

ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

# Every other dependency, from pyproject.toml alone (empty packages stand in for the code),
# so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
# The onnx extra runs the class-agnostic models (u2net, u2netp, isnet-general-use) on
# onnxruntime's CPU build; a GPU image may build with EXTRAS=worker and add onnxruntime-gpu.
ARG EXTRAS=worker,onnx
# DL3013 asks for pinned pip packages: this installs the local project, whose dependencies
# pyproject.toml constrains (torch and torchvision exactly).
# hadolint ignore=DL3013
RUN mkdir producer worker \
    && touch producer/__init__.py worker/__init__.py \
    && pip install ".[$EXTRAS]" \
    && pip uninstall -y backdrop \
    && rm -rf producer worker build ./*.egg-info

# Optional: the model's published weights, downloaded and sha256-verified at build time by the
# same code as `backdrop models pull` (worker/weights.py needs nothing else of the project).
FROM base AS weights
ARG BAKE_MODEL=""
COPY producer/__init__.py producer/catalog.py producer/errors.py ./producer/
COPY worker/__init__.py worker/weights.py ./worker/
RUN if [ -n "$BAKE_MODEL" ]; then \
        TORCH_HOME=/tmp/torch python -c "import shutil, sys; from worker.weights import pull; \
shutil.copyfile(pull(sys.argv[1]).path, '/opt/backdrop/weights/baked.pth')" "$BAKE_MODEL" \
        && rm -rf /tmp/torch; \
    fi

FROM base
ARG BAKE_MODEL=""
COPY --from=weights /opt/backdrop/weights /opt/backdrop/weights
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Baked: the worker loads the baked file (a BACKDROP_WEIGHTS set at run time still wins).
# Not baked: BACKDROP_WEIGHTS is empty, so the torch hub cache or a verified download is used.
ENV BACKDROP_MODEL=${BAKE_MODEL:-deeplabv3_resnet101} \
    BACKDROP_WEIGHTS=${BAKE_MODEL:+/opt/backdrop/weights/baked.pth} \
    BACKDROP_WORKER_METRICS_PORT=9100 \
    BACKDROP_WORKER_METRICS_HOST=0.0.0.0

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 9100
# Healthy while this container's Celery node answers a broadcast ping (a light client: no
# torch import). The start period covers loading, or first fetching, the weights.
HEALTHCHECK --interval=30s --timeout=20s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "celery -b \"$BACKDROP_BROKER_URL\" inspect ping --timeout 10 | grep -q \"@$HOSTNAME: OK\""]
# Celery handles SIGTERM itself: a warm shutdown that stops consuming and finishes the jobs
# in hand (see the stop grace periods in docker-compose.yml and infra/k8s).
CMD ["backdrop", "worker"]

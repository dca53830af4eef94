# syntax=docker/dockerfile:1
# The GPU worker: torch + torchvision + OpenCV and the project with its `worker` extra.
#
# python:slim rather than a CUDA base image: the Linux x86_64 torch wheels on PyPI carry their
# own CUDA runtime (the nvidia-* wheels), so the host only needs the NVIDIA driver and the
# container toolkit (compose reserves the GPU). Build from the repository root:
#   docker build -f infra/worker.Dockerfile -t backdrop-worker:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/cache/torch \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The torch hub cache is a named volume in compose; a volume takes its owner from the image's
# directory, so it must exist, owned by the runtime user, before the volume is first mounted.
RUN useradd --create-home --uid 10001 backdrop \
    && mkdir -p /cache/torch \
    && chown backdrop:backdrop /cache/torch

WORKDIR /app

# Its own layer: gigabytes that change far less often than the code.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install ".[worker]"

USER backdrop
CMD ["backdrop", "worker"]

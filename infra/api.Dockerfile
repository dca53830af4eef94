# syntax=docker/dockerfile:1
# The producer side (HTTP API, CLI, migrations): no torch, no OpenCV, so it stays small.
# Build from the repository root:
#   docker build -f infra/api.Dockerfile -t backdrop-api:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 backdrop \
    && useradd --create-home --uid 10001 --gid 10001 backdrop

WORKDIR /app

# The dependencies, from pyproject.toml alone (empty packages stand in for the code), so that
# a code change does not reinstall them. The base install only: the `worker` extra (torch,
# OpenCV) is deliberately left out.
COPY pyproject.toml README.md ./
RUN mkdir producer worker \
    && touch producer/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y backdrop \
    && rm -rf producer worker build ./*.egg-info

COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["backdrop", "api", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1
#
# onnxgate image. Builds the project wheel in a throwaway stage, installs it into /opt/venv,
# and copies only that venv into the runtime stage.
#
#   docker build -t onnxgate .                                   # CPU (onnxruntime)
#   docker build -t onnxgate:gpu --build-arg VARIANT=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .   # GPU (onnxruntime-gpu)
#   docker run --rm -p 8000-8002:8000-8002 -v "$PWD/models:/models:ro" \
#     -v "$PWD/tokens:/etc/onnxgate/tokens:ro" onnxgate      # tokens/tokens.yaml: digests only
#
# The image listens on 0.0.0.0, so its default config (/etc/onnxgate/gateway.yaml, no token in
# it) wants tokens: it names the tokens file /etc/onnxgate/tokens/tokens.yaml, which you mount
# (`tokens: [{name, sha256, scopes}]`, digests from `printf %s "$TOKEN" | sha256sum`); without it
# the gateway does not start. Your own config: mount it and pass `--config PATH` with the other
# flags after the image name (they replace CMD).
#
# BASE_IMAGE is the base of both stages, so the venv's interpreter is the same in each; a base
# without Python (CUDA images) gets the distribution's python3 (>= 3.11) and venv module.
# VARIANT=gpu installs `onnxgate[gpu]` and keeps onnxruntime-gpu as the only `onnxruntime`.
# No registry to pull a base from: deploy/README.md, "Podman (no registry)" (a local debootstrap base).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# The apt-get branch runs only on a base without Python (CUDA images), and its packages come
# from whichever distribution BASE_IMAGE is: a version pin would hold for one base only.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/buildenv \
    && /opt/buildenv/bin/pip install build \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN /opt/buildenv/bin/python -m build --wheel --outdir /dist . \
    && wheel="$(ls /dist/onnxgate-*.whl)" \
    && if [ "$VARIANT" = "gpu" ]; then \
        /opt/venv/bin/pip install "${wheel}[gpu]" \
        && /opt/venv/bin/pip uninstall -y onnxruntime onnxruntime-gpu \
        && /opt/venv/bin/pip install --no-deps "onnxruntime-gpu>=1.17"; \
    elif [ "$VARIANT" = "cpu" ]; then \
        /opt/venv/bin/pip install "${wheel}"; \
    else \
        echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1; \
    fi

FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="onnxgate" \
      org.opencontainers.image.description="ONNX models over the Open Inference Protocol (gRPC + HTTP)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.onnxgate.variant="${VARIANT}"
# No version pins on the distribution python3, as in the builder stage.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 onnxgate \
    && useradd --system --uid 10001 --gid onnxgate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin onnxgate \
    && mkdir -p /models /etc/onnxgate/tokens \
    && printf '%s\n' '# The image default: tokens from a mounted file (digests only); see the Dockerfile.' \
        'security:' '  tokens_file: /etc/onnxgate/tokens/tokens.yaml' > /etc/onnxgate/gateway.yaml
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
# Healthy = ready (models loaded, not draining). No curl in slim images: Python's urllib,
# which raises on any non-2xx status.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["onnxgate", "serve"]
CMD ["--config", "/etc/onnxgate/gateway.yaml", "--model-repository", "/models", "--host", "0.0.0.0"]

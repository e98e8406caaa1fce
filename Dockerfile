# syntax=docker/dockerfile:1
# The gateway image: `docker build -t gateway .`, then
# `docker run -p 8000:8000 -e NATS_URL=nats://<host>:4222 gateway` (or `docker compose up`).
# Two stages: uv installs exactly uv.lock into /app/.venv; the runtime copies only that venv.

# uv pinned to the version CI uses (.ci/run), so the lock file is read the same way.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# Python minor and Debian release pinned; the patch release floats for security fixes.
# Build and runtime use the same base: the venv's interpreter links to /usr/local/bin/python3.
FROM python:3.11-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# 1. Dependencies only: what `gateway serve` needs, no dependency group (dev, load) and no
#    extra (demo: nats-server), not the project. Rebuilt only when pyproject.toml or
#    uv.lock change, not on every code change. Bind targets are absolute: buildah (podman)
#    rejects relative ones, BuildKit accepts both.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    uv sync --locked --no-dev --no-default-groups --no-install-project

# 2. The application, installed as a regular (non-editable) package: the runtime
#    image needs the venv only, not the source tree.
COPY pyproject.toml uv.lock README.md ./
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-default-groups --no-editable

FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway
# Owned by root and read-only for the service user: the code cannot be changed at run time.
COPY --from=build /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000
WORKDIR /app
USER 10001:10001
EXPOSE 8000

# Liveness only: /health answers 200 while the process serves, even with NATS down
# (readiness is /ready). slim has no curl, so Python's urllib does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8000') + '/health', timeout=2)"]

# OCI labels from build arguments: CI passes the version, the repository URL and the commit
# (`--build-arg VERSION=... --build-arg SOURCE=... --build-arg REVISION=...`). Last, so a
# new commit rebuilds no layer but this metadata.
ARG VERSION=dev
ARG SOURCE=""
ARG REVISION=unknown
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}"

# Exec form: no shell in between, so `docker stop`'s SIGTERM reaches the gateway itself
# and starts its graceful drain (SPEC: shutdown).
CMD ["gateway", "serve"]

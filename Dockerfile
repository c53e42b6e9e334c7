# syntax=docker/dockerfile:1
#
# bitrix-sidecar container image.
#
#   docker build -t bitrix-sidecar:0.1.0 .
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#       -t bitrix-sidecar:0.1.0 .
#
# Two stages: "build" turns the source into a wheel and installs it with its dependencies
# (binary wheels only, so nothing is compiled) into a virtual environment under /opt/venv;
# "runtime" is a fresh slim Python image that receives only that environment. No compiler,
# no source tree, no build cache and no pip inside the environment reach the final image.
#
# At run time the image writes nothing outside the token store's volume, so it runs with a
# read-only root filesystem (Kubernetes: readOnlyRootFilesystem: true; Docker: --read-only):
# bytecode is compiled at install time and PYTHONDONTWRITEBYTECODE stops any __pycache__ write.

ARG PYTHON_IMAGE=python:3.12-slim

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): the README is the package's long
# description, so pyproject.toml needs it.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar

# The wheel of this project only; then a pip-less virtual environment that the build stage's
# own pip installs into. --only-binary: every dependency must come as a wheel, so a missing
# wheel fails the build here instead of silently needing a compiler.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --only-binary=:all: \
        /wheels/bitrix_sidecar-*.whl \
 && /opt/venv/bin/bitrix-sidecar --version

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bitrix-sidecar" \
      org.opencontainers.image.description="A token-keeping reverse proxy for the Bitrix24 REST API: apps call 127.0.0.1:8080/rest/<method> with no credentials." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.documentation="README.md and deploy/k8s/README.md in the source repository"

# A fixed, non-root uid/gid (Kubernetes' runAsNonRoot can verify a numeric USER), and the
# store's directory, owned by it and private. Kubernetes mounts a volume over it (fsGroup
# makes that writable); Docker initializes a named volume from it.
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/bitrix-sidecar

COPY --from=build /opt/venv /opt/venv

# Settings for a container; every other setting comes from the environment at run time
# (BITRIX_PORTAL, BITRIX_CLIENT_ID, BITRIX_CLIENT_SECRET_FILE, ... see README.md).
# The proxy (SIDECAR_LISTEN) stays on its default, 127.0.0.1:8080: whoever reaches it acts as
# the app, so only containers sharing the network namespace (a pod) may. The admin listener
# (metrics, probes, status; never a token) listens on all interfaces for Prometheus and probes.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_ADMIN_LISTEN=0.0.0.0:9090 \
    SIDECAR_DB=/var/lib/bitrix-sidecar/tokens.db

# SQLite keeps tokens.db, tokens.db-wal and tokens.db-shm here: the directory must be writable.
VOLUME ["/var/lib/bitrix-sidecar"]

USER 10001:10001

# 8080: the proxy, on loopback inside the container unless SIDECAR_LISTEN says otherwise;
# never publish it. 9090: the admin listener.
EXPOSE 8080 9090

# Liveness, not readiness: a sidecar waiting for a person to authorize it is healthy. The
# subcommand asks /healthz with the standard library, so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bitrix-sidecar", "healthcheck"]

ENTRYPOINT ["bitrix-sidecar"]
CMD ["run"]

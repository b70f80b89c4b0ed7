# cloudbeds-proxy container image.
#
#   docker build -t cloudbeds-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#       -e CBPROXY_CLIENT_ID=... -e CBPROXY_CLIENT_SECRET_FILE=/run/secrets/client_secret ... \
#       cloudbeds-proxy
#
# Two stages: the builder installs the project and every dependency into a virtual
# environment, /opt/cloudbeds-proxy (no pip inside it); the runtime copies that one
# directory, so the runtime stage never runs pip or a build backend, never reaches PyPI,
# and no wheel or build file lands in any of its layers (a COPY then `rm` would leave
# them in the layer below). Both stages use the same pinned base, so the environment's
# python symlink and compiled extensions fit the second.
#
# BASE_IMAGE swaps the base of both stages for a Debian bookworm image with python3,
# pip and venv (what the container tests build where no registry is reachable); its
# default is the production base.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The whole (filtered, see .dockerignore) context: pyproject.toml names README.md as the
# long description, and the package lives in proxy/.
COPY . .
# The base's own pip installs into the environment (`--python`, pip >= 22.3).
RUN python -m venv --without-pip /opt/cloudbeds-proxy \
    && pip --python /opt/cloudbeds-proxy/bin/python install .


FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/cloudbeds-proxy/bin:$PATH

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and mounted
# secrets can be made readable with fsGroup 10001.
RUN groupadd --system --gid 10001 cbproxy \
    && useradd --system --uid 10001 --gid cbproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cbproxy \
    && mkdir -p /var/lib/cloudbeds-proxy \
    && chown cbproxy:cbproxy /var/lib/cloudbeds-proxy \
    && chmod 0700 /var/lib/cloudbeds-proxy

COPY --from=builder /opt/cloudbeds-proxy /opt/cloudbeds-proxy

# Inside a container the proxy must listen on every interface (the default, 127.0.0.1,
# is for running it directly on a host). Publish the port on the host's loopback only
# (-p 127.0.0.1:8080:8080): whoever reaches this port uses the Cloudbeds credential.
ENV CBPROXY_HOST=0.0.0.0 \
    CBPROXY_PORT=8080 \
    CBPROXY_SHUTDOWN_GRACE=25 \
    CBPROXY_STATE_FILE=/var/lib/cloudbeds-proxy/state.db

# Without Redis the proxy keeps connections and tokens in CBPROXY_STATE_FILE: refresh
# tokens that Cloudbeds rotated exist nowhere else, so the directory is a volume (and the
# only place the user may write on a read-only root filesystem, besides /tmp).
VOLUME ["/var/lib/cloudbeds-proxy"]
WORKDIR /var/lib/cloudbeds-proxy

USER 10001:10001
EXPOSE 8080

# Liveness only: /_proxy/healthz touches neither Redis nor Cloudbeds. The slim image has
# no curl; urlopen raises (exit 1) on a refused connection or any non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CBPROXY_PORT', '8080') + '/_proxy/healthz', timeout=4)"]

# On SIGTERM the proxy stops accepting, lets requests in flight finish for up to
# CBPROXY_SHUTDOWN_GRACE seconds (25 here), releases any refresh lock it holds and
# exits 0. The orchestrator's own grace must EXCEED CBPROXY_SHUTDOWN_GRACE, or it
# SIGKILLs the proxy mid-request and a held lock is left to expire:
#   docker run/stop:  --stop-timeout / -t 30   (Docker's default is only 10 s)
#   compose:          stop_grace_period: 30s   (see docker-compose.yml)
#   Kubernetes:       terminationGracePeriodSeconds > 25 (see config/kubernetes.yaml)
# Lower CBPROXY_SHUTDOWN_GRACE rather than raising only one side.
STOPSIGNAL SIGTERM

ENTRYPOINT ["cloudbeds-proxy"]
CMD ["serve"]

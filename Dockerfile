# cloudbeds-proxy container image.
#
#   docker build -t cloudbeds-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 --stop-timeout 30 \
#       -e CBPROXY_CLIENT_ID=... -e CBPROXY_CLIENT_SECRET_FILE=/run/secrets/client_secret ... \
#       cloudbeds-proxy
#
# Two stages: the builder turns the project and every dependency into wheels; the
# runtime installs them offline (--no-index), so the runtime stage never runs a build
# backend and never reaches PyPI. Both stages use the same pinned base so the wheels
# built in the first fit the second.

FROM python:3.11.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The whole (filtered, see .dockerignore) context: pyproject.toml names README.md as the
# long description, and the package lives in proxy/.
COPY . .
RUN pip wheel --wheel-dir /wheels .


FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and mounted
# secrets can be made readable with fsGroup 10001.
RUN groupadd --system --gid 10001 cbproxy \
    && useradd --system --uid 10001 --gid cbproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cbproxy

COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-index --find-links=/tmp/wheels /tmp/wheels/cloudbeds_proxy-*.whl \
    && rm -rf /tmp/wheels

# Inside a container the proxy must listen on every interface (the default, 127.0.0.1,
# is for running it directly on a host). Publish the port on the host's loopback only
# (-p 127.0.0.1:8080:8080): whoever reaches this port uses the Cloudbeds credential.
ENV CBPROXY_HOST=0.0.0.0 \
    CBPROXY_PORT=8080 \
    CBPROXY_SHUTDOWN_GRACE=25

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

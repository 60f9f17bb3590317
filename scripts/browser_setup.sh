#!/usr/bin/env bash
# Install what the browser tests (tests/test_webapp.py, marker `browser`) need: Debian's
# chromium and the Python playwright package in .venv; and Debian's bubblewrap, the sandbox
# `fedpersona device join` runs the server's ClientApp code in (client/federation/sandbox.py),
# which the device tests exercise.
#
# Only the Python package: `playwright install` downloads a browser build from outside the
# package registries; the tests drive /usr/bin/chromium through executable_path instead.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pin of pyproject.toml's test extra (one source of truth), else this one.
PIN=$(grep -o '"playwright==[^"]*"' pyproject.toml | tr -d '"' | cut -d= -f3 || true)
PLAYWRIGHT=${PLAYWRIGHT_VERSION:-${PIN:-1.65.2}}

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  if ! command -v apt-get >/dev/null || { [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; }; then
    # Not Debian, or no way to install system packages: the browser tests skip and say why
    # (FEDPERSONA_REQUIRE_BROWSER=1 turns that into a failure, as CI does).
    echo "browser_setup: no /usr/bin/chromium and no apt-get as root: browser tests will skip"
    exit 0
  fi
  echo "browser_setup: installing Debian chromium"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi

if ! command -v bwrap >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "browser_setup: installing Debian bubblewrap (the ClientApp sandbox)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      bubblewrap >/dev/null || echo "browser_setup: bubblewrap could not be installed"
  else
    echo "browser_setup: no bwrap and no apt-get as root: the sandbox tests will skip"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "browser_setup: .venv is missing; run scripts/setup.sh first" >&2
  exit 1
fi
if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
  echo "browser_setup: installing playwright==$PLAYWRIGHT (Python package only)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "playwright==$PLAYWRIGHT"
fi
echo "browser_setup: $(/usr/bin/chromium --version 2>/dev/null | head -1); playwright $(
  .venv/bin/python -c 'from importlib.metadata import version; print(version("playwright"))')"

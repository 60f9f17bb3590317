#!/usr/bin/env bash
# The Docker Compose deployment, end to end on this host, through the project's own commands:
# build, `fedpersona server init` and `server start` in the `server` container, each device's
# key made on the device (`device key`) and registered by the operator (`fedpersona server
# devices add` on this host, on the same federation folder), the devices' stores (`device
# init|import|privacy set`), `device join --part …` in three containers per device, then
# `fedpersona server run`: 2 federated rounds of the tiny model with SecAgg+ through TLS and
# node authentication; the device stores checked; down (the volumes and ./federation stay).
# Run it again and it reuses the images, the federation, the registrations and the stores:
# each device then has 2 more rounds.
#
#   bash deploy/compose_check.sh                        # official Flower images
#   FEDPERSONA_LOCAL_BASE=local/debian-python:bookworm bash deploy/compose_check.sh
#
# Needs: a running Docker engine with compose v2 (`docker compose version`), and the project's
# environment (`bash scripts/setup.sh`: the operator's `fedpersona server` commands run on the
# host). FEDPERSONA_LOCAL_BASE: where no image registry is reachable, build Flower's superexec
# image from this local Python 3.11 base (deploy/flwr-local.Dockerfile) and use it; this
# host's extra CAs (/usr/local/share/ca-certificates) and a CPU torch wheel from
# $PIP_FIND_LINKS are handed to the build. Host networking (deploy/compose.host.yml) unless
# COMPOSE_BRIDGE=1. Starts only containers of the `fedpersona` project and stops them all
# (`down`), also on failure; writes federation/ and secrets/ in the project (ignored by git).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
FP=${FP:-$(dirname "$PY")/fedpersona}
WORK=${WORK:-$ROOT/runs/compose-check}
FLWR_VERSION=$("$PY" -c 'import flwr; print(flwr.__version__)')
FILES=(-f docker-compose.yml)
[ "${COMPOSE_BRIDGE:-0}" = 1 ] || FILES+=(-f deploy/compose.host.yml)
compose() { docker compose "${FILES[@]}" "$@"; }
say() { printf '\n== %s\n' "$*"; }
now() { date +%s; }
T0=$(now)

docker info >/dev/null 2>&1 || { echo "no Docker engine answers (docker info)" >&2; exit 2; }
docker compose version >/dev/null || { echo "docker compose v2 is needed" >&2; exit 2; }
mkdir -p "$WORK"
cleanup() {  # on failure: keep every container's log, then stop and remove the containers
  compose logs --no-color --timestamps >"$WORK/compose.log" 2>&1 || true
  echo "containers' logs: $WORK/compose.log" >&2
  compose down --timeout 20 >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ---- images ---------------------------------------------------------------------------------
if [ -n "${FEDPERSONA_LOCAL_BASE:-}" ]; then
  say "local Flower $FLWR_VERSION superexec image FROM $FEDPERSONA_LOCAL_BASE"
  cp /usr/local/share/ca-certificates/*.crt deploy/ca/ 2>/dev/null || true
  for d in ${PIP_FIND_LINKS:-}; do cp "$d"/torch-2.13.0+cpu-cp311-*.whl deploy/wheels/ 2>/dev/null || true; done
  docker build -q --network host -f deploy/flwr-local.Dockerfile --target superexec \
    --build-arg BASE="$FEDPERSONA_LOCAL_BASE" --build-arg FLWR_VERSION="$FLWR_VERSION" \
    -t "local/flwr-superexec:$FLWR_VERSION" . >/dev/null
  export FEDPERSONA_SUPEREXEC_BASE=local/flwr-superexec:$FLWR_VERSION
  if ls deploy/wheels/torch-*.whl >/dev/null 2>&1; then
    export FEDPERSONA_TORCH_INDEX_URL=${FEDPERSONA_TORCH_INDEX_URL:-https://pypi.org/simple}
  fi
fi

# ---- the federation folder and the passphrases (once) -----------------------------------------
# ./federation is the `server` container's --dir and the operator's on this host; the
# containers' user (uid 49999) writes it.
mkdir -p federation
if [ "$(id -u)" = 0 ]; then chown 49999:49999 federation; fi
# Each device worker's passphrase: a secret file (0400, the containers' user), never an
# environment variable.
mkdir -p -m 700 secrets
for i in 0 1; do
  if [ ! -f "secrets/passphrase-$i" ]; then
    (umask 277; "$PY" -c 'import secrets; print(secrets.token_hex(24))' > "secrets/passphrase-$i")
    if [ "$(id -u)" = 0 ]; then chown 49999:49999 "secrets/passphrase-$i"; fi
  fi
done

say "build"
t=$(now); compose build >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
BUILD_S=$(( $(now) - t ))

if [ ! -f federation/certs/ca.crt ]; then
  say "fedpersona server init (once)"
  compose run --rm --no-deps -T server server init --dir /federation \
    --host server --host 127.0.0.1 --host localhost
fi

say "up: fedpersona server start"
t=$(now)
compose up -d --wait --wait-timeout 300 server

say "each device's key, made on the device; the operator registers it (once)"
for i in 0 1; do
  compose run --rm --no-deps -T supernode-$i device key --data-dir /node >"$WORK/device-$i.pub"
  if out=$("$FP" server devices add "$WORK/device-$i.pub" --dir federation 2>&1); then
    echo "device $i: $out"
  elif grep -qi "already" <<<"$out"; then
    echo "device $i: registered already"
  else
    echo "$out" >&2; exit 1
  fi
done

say "the devices' owners: init, import their writing, privacy policy (once)"
for i in 0 1; do
  if compose run --rm --no-deps -T --entrypoint python "worker-$i" -c \
      "import sys; from client.store import LocalStore; sys.exit(not LocalStore.exists('/device'))"; then
    echo "device $i: store exists"
    continue
  fi
  # The Shakespeare role of user i as the owner's chat history (what `device import` reads).
  "$PY" - "$i" "$WORK/writing-$i.jsonl" <<'EOF'
import json, sys
from client.federation.simulated import simulated_user
from common.config import parse_run_config
user = simulated_user(parse_run_config({}), int(sys.argv[1]), 2)
with open(sys.argv[2], "w") as f:
    for s in (*user.train, *user.test):
        turn = [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.reply}]
        f.write(json.dumps({"messages": turn}) + "\n")
EOF
  chmod 644 "$WORK/writing-$i.jsonl"
  run=(compose run --rm --no-deps -T -v "$WORK/writing-$i.jsonl:/tmp/writing.jsonl:ro"
       "worker-$i" device)
  "${run[@]}" init --model tiny --data-dir /device
  "${run[@]}" import /tmp/writing.jsonl --data-dir /device
  # A federation of 2 (the default minimum cohort is larger), and a lifetime user-level ε cap
  # that lets this check run ~20 times (each run spends 2 rounds; public Shakespeare text):
  # the device declines any round past it, as it would past its default cap of 1.
  "${run[@]}" privacy set --min-cohort 2 --epsilon-cap 4 --data-dir /device
  rm -f "$WORK/writing-$i.jsonl"
done

rounds_of() {  # rounds device $1's store has trained
  compose run --rm --no-deps -T --entrypoint python "worker-$1" -c "
from client.store import LocalStore
from common.crypto import resolve_secret
with LocalStore.open('/device', resolve_secret()) as s:
    d = s.get_json('device') or {}
    print(d.get('rounds_trained', 0), int(s.get_blob('personal') is not None))" | tail -1
}
declare -A BEFORE
for i in 0 1; do BEFORE[$i]=$(rounds_of "$i" | cut -d' ' -f1); done

say "up: the devices (device join: worker, SuperNode, ClientApp executor each)"
compose up -d --wait --wait-timeout 600
UP_S=$(( $(now) - t ))

say "fedpersona server run: 2 rounds, tiny model, SecAgg+"
name=compose-$(date +%Y%m%d-%H%M%S)
cat >"$WORK/run.toml" <<EOF
"model.name" = "tiny"
"num-server-rounds" = 2
"data.max-seq-len" = 48
"data.max-test-samples" = 4
"train.local-steps" = 4
"train.batch-size" = 2
"dp.clip-norm" = 0.005
"dp.honest-fraction" = 0.5
"round-timeout" = 300
"output.run-name" = "$name"
EOF
t=$(now)
"$FP" server run --dir federation --run-config "$WORK/run.toml" 2>&1 | tee "$WORK/run.log"
RUN_S=$(( $(now) - t ))
grep -q "fedpersona: strategy=" "$WORK/run.log" || { echo "the ServerApp did not start" >&2; exit 1; }
[ -f "federation/runs/$name/summary.json" ] || { echo "no summary in federation/runs/$name" >&2; exit 1; }
"$FP" server status --dir federation

say "the device stores after the run"
ok=1
for i in 0 1; do
  read -r after personal <<<"$(rounds_of "$i")"
  echo "device $i: rounds trained ${BEFORE[$i]} -> $after, personal adapter stored: $personal"
  [ "$after" -eq $(( BEFORE[$i] + 2 )) ] && [ "$personal" = 1 ] || ok=0
done
for i in 0 1; do  # the worker's output is in its service's log, on the device
  compose exec -T "worker-$i" fedpersona device status --data-dir /device || ok=0
  compose exec -T "worker-$i" cat /device/join.log
done >"$WORK/workers.log" 2>&1
[ "$(grep -c 'secagg answered in' "$WORK/workers.log")" -ge 16 ] || { echo "SecAgg+ stages missing" >&2; ok=0; }

say "down (volumes stay)"
compose down --timeout 20
trap - EXIT
docker volume ls --format '{{.Name}}' | grep -q '^fedpersona_device-0$' || { echo "volume lost" >&2; ok=0; }
printf '\nbuild %ss · up %ss · 2 rounds %ss · total %ss\n' "$BUILD_S" "$UP_S" "$RUN_S" "$(( $(now) - T0 ))"
[ "$ok" = 1 ] && echo "COMPOSE CHECK PASSED" || { echo "COMPOSE CHECK FAILED" >&2; exit 1; }

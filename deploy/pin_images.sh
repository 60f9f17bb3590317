#!/usr/bin/env bash
# Pin the images docker-compose.yml uses to the digests a registry serves for their tags now.
#
#   bash deploy/pin_images.sh [deploy/images.env]      # on a machine that reaches the registry
#   docker compose --env-file deploy/images.env build && docker compose --env-file deploy/images.env up -d
#
# For every image variable of docker-compose.yml (FEDPERSONA_*_BASE, FEDPERSONA_*_IMAGE) it
# pulls the default tag, reads the digest the registry gave it (for a multi-architecture tag
# that is the index's digest: every architecture stays pinned) and writes
# `VARIABLE=repository@sha256:…` lines. With the file, `docker compose` builds FROM and runs
# exactly those images: a tag moved on the registry later changes nothing until this script
# runs again. Review the file's diff like a dependency update, then commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-deploy/images.env}
pairs=$(grep -oE '\$\{FEDPERSONA_[A-Z_]+(BASE|IMAGE):-[^}]+\}' docker-compose.yml |
  sed -E 's/^\$\{([A-Z_]+):-(.*)\}$/\1 \2/' | sort -u)
[ -n "$pairs" ] || { echo "no image variables found in docker-compose.yml" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
echo "# written by deploy/pin_images.sh on $(date -u +%Y-%m-%dT%H:%MZ); image tags pinned to digests" >"$tmp"
while read -r var image; do
  repo=${image%:*}
  docker pull --quiet "$image" >/dev/null
  digest=$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" |
    grep -E "^(docker\.io/)?(library/)?${repo}@sha256:[0-9a-f]{64}$" | head -n 1 || true)
  if [ -z "$digest" ]; then
    echo "no registry digest for $image (pulled from a registry?)" >&2
    exit 1
  fi
  printf '# %s\n%s=%s@%s\n' "$image" "$var" "$repo" "${digest#*@}" >>"$tmp"
done <<<"$pairs"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out"

#!/usr/bin/env bash
# The main job: boot a sandbox, run a container in it, list it, take everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${PYTHON:-python3}
bulkhead() { "$PY" -m bulkhead.cli "$@"; }
name=${1:-demo}
trap 'bulkhead sandbox down "$name" >/dev/null 2>&1 || true' EXIT
bulkhead sandbox up "$name"
# shellcheck disable=SC2016  # $(hostname) is for the container's shell, not this one
bulkhead run --sandbox "$name" --name hello -- sh -c 'echo hello from $(hostname); uname -r; id'
bulkhead ps "$name"
bulkhead sandbox down "$name"
trap - EXIT

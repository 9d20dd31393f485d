#!/usr/bin/env bash
# The main job: boot a sandbox, show what is inside it, take it down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${PYTHON:-python3}
bulkhead() { "$PY" -m bulkhead.cli "$@"; }
name=${1:-demo}
trap 'bulkhead sandbox down "$name" >/dev/null 2>&1 || true' EXIT
bulkhead sandbox up "$name"
bulkhead sandbox info "$name"
bulkhead sandbox down "$name"
trap - EXIT

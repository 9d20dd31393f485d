#!/usr/bin/env bash
# The whole test suite: lint, generated-code freshness, unit and native tests,
# then the QEMU boot tests against the freshly built guest image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
exec "$PY" -m pytest -p no:cacheprovider "$@"

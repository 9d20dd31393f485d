#!/usr/bin/env bash
# Soak: run some QEMU tests round after round, each round on freshly booted
# sandboxes, until one fails or ROUNDS rounds have passed. For faults too rare
# for one CI run to show (the vsock ring fault fixed in e8db328 failed about one
# round in 70 of the default selection).
#
#   bash scripts/soak.sh [ROUNDS [PYTEST-ARGS...]]
#
# ROUNDS 0 (the default) means until the first failure. Without PYTEST-ARGS a
# round is the stdio-heavy container tests over vsock. A line a round goes to
# $SOAK_DIR/status (default /tmp/bulkhead-soak); a failing round's whole pytest
# output is kept as failed-N.log, which has each sandbox's monitor and console
# log (qemu-test/conftest.py adds them to a failing test's report).
# Run scripts/bootstrap.sh once first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

rounds=${1:-0}
if [[ ! "$rounds" =~ ^[0-9]+$ ]]; then
  echo "soak: ROUNDS must be a number (0: until a failure), not '$rounds'" >&2
  exit 2
fi
shift $(($# > 0 ? 1 : 0))
if (($# == 0)); then
  export BULKHEAD_QEMU_TRANSPORTS=${BULKHEAD_QEMU_TRANSPORTS:-vsock}
  set -- qemu-test/test_containers.py -k "echo_hostname or signals_give or missing_command \
or user_env or stdin_round_trip or ten_thousand or binary_output or one_hundred"
fi

dir=${SOAK_DIR:-/tmp/bulkhead-soak}
mkdir -p "$dir"
n=0
while ((rounds == 0 || n < rounds)); do
  n=$((n + 1))
  started=$SECONDS
  "$PY" -m pytest -p no:cacheprovider -q -x "$@" >"$dir/round.log" 2>&1
  rc=$?
  summary=$(tail -n 1 "$dir/round.log")
  if ((rc == 0)); then
    echo "round $n ok in $((SECONDS - started)) s: $summary" | tee -a "$dir/status"
  elif ((rc == 5)); then
    echo "soak: pytest selected no tests with: $*" >&2
    exit 2
  else
    cp "$dir/round.log" "$dir/failed-$n.log"
    echo "round $n FAILED ($summary): $dir/failed-$n.log" | tee -a "$dir/status"
    exit 1
  fi
done
echo "soak: $n rounds clean" | tee -a "$dir/status"

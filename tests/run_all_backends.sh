#!/usr/bin/env bash
# Runs the whole suite once per Keras backend; fails if any backend fails or
# collects no test (pytest exit code 5 is a failure here, never a pass).
set -u
cd "$(dirname "$0")/.."
status=0
summary=""
# Oracles that do not depend on the backend are computed in the first pass and
# reused by the others (tests/helpers.py: backend_independent).
KERAS_GEMMA_ORACLE_CACHE="$(mktemp -d)"
export KERAS_GEMMA_ORACLE_CACHE
trap 'rm -rf "$KERAS_GEMMA_ORACLE_CACHE"' EXIT
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
  code=$?
  summary+="KERAS_BACKEND=$backend: pytest exit code $code"$'\n'
  if [ "$code" -ne 0 ]; then status=1; fi
done
printf '%s' "$summary"
exit $status

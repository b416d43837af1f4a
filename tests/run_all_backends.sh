#!/usr/bin/env bash
# Runs the whole suite once per Keras backend; fails if any backend fails or
# collects no test (pytest exit code 5 is a failure here, never a pass).
set -u
cd "$(dirname "$0")/.."
status=0
summary=""
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider tests "$@"
  code=$?
  summary+="KERAS_BACKEND=$backend: pytest exit code $code"$'\n'
  if [ "$code" -ne 0 ]; then status=1; fi
done
printf '%s' "$summary"
exit $status

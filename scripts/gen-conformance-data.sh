#!/usr/bin/env bash
# Generate the ONNX node-test conformance data and ORT's reference results.
#
#   1. scripts/setup-python.sh                (venv with pinned onnx/onnxruntime)
#   2. tests/conformance/gen_node_tests.py    -> $DATA   (skipped if $DATA/.complete)
#   3. tests/conformance/ort_rates.py         -> $DATA/ort_results.tsv (skipped if present)
#
#   DATA = ${KILN_CACHE:-$HOME/.cache/kiln}/node-tests-onnx-1.23.2
#
# Progress goes to stderr; the last (only) stdout line is $DATA, so
#   DATA=$(scripts/gen-conformance-data.sh)
# works. Delete $DATA (or just ort_results.tsv) to force regeneration.
set -euo pipefail

ONNX_VERSION=1.23.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DATA="$CACHE/node-tests-onnx-$ONNX_VERSION"
RESULTS="$DATA/ort_results.tsv"

log() { printf 'gen-conformance-data: %s\n' "$*" >&2; }

VENV="$("$ROOT/scripts/setup-python.sh" </dev/null | tail -n 1)"
PY="$VENV/bin/python"

if [[ -f "$DATA/.complete" && "$(head -n 1 "$DATA/.complete")" == "$ONNX_VERSION" ]]; then
  log "node tests present in $DATA"
else
  log "generating node tests into $DATA"
  "$PY" "$ROOT/tests/conformance/gen_node_tests.py" "$DATA" </dev/null >&2
fi

if [[ -f "$RESULTS" ]]; then
  log "ORT results present: $RESULTS"
else
  log "running node tests through onnxruntime -> $RESULTS"
  "$PY" "$ROOT/tests/conformance/ort_rates.py" "$DATA" "$RESULTS" </dev/null >&2
fi

printf '%s\n' "$DATA"

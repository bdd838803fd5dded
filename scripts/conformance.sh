#!/usr/bin/env bash
# Regenerates docs/conformance.md (Kiln vs ONNX Runtime vs candle-onnx, same data and rule) and,
# with --write-expected, tests/conformance/expected_pass.txt.
# candle-onnx's build needs protoc: a system one, or grpcio-tools' (scripts/protoc.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROTOC="$(bash scripts/protoc.sh | tail -n 1)"
export PROTOC
DATA="$(bash scripts/gen-conformance-data.sh </dev/null | tail -n 1)"
extra=()
if [[ "${1:-}" == "--write-expected" ]]; then
  extra+=(--write-expected tests/conformance/expected_pass.txt)
fi
mkdir -p "${CARGO_TARGET_DIR:-target}"
cargo run -q -p kiln-conformance --features candle-baseline -- \
  --data "$DATA" --candle --write-doc docs/conformance.md --results "${CARGO_TARGET_DIR:-target}/conformance-results.tsv" "${extra[@]}"

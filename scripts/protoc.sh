#!/usr/bin/env bash
# Prints the path of a protoc for candle-onnx's build (scripts/bench.sh, scripts/conformance.sh): $PROTOC if set,
# a system protoc if there is one, else a wrapper around the protoc that grpcio-tools bundles in the serve venv
# (scripts/setup-python.sh serve), so no apt package is needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PROTOC:-}" ]]; then
  echo "$PROTOC"
elif command -v protoc >/dev/null 2>&1; then
  command -v protoc
else
  SERVE_VENV="$(bash scripts/setup-python.sh serve </dev/null | tail -n 1)"
  dir="${CARGO_TARGET_DIR:-target}/protoc-wrapper"
  mkdir -p "$dir"
  printf '#!/bin/sh\nexec "%s/bin/python" -m grpc_tools.protoc "$@"\n' "$(cd "$SERVE_VENV" && pwd)" >"$dir/protoc"
  chmod +x "$dir/protoc"
  echo "$(cd "$dir" && pwd)/protoc"
fi

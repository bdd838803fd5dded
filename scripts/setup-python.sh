#!/usr/bin/env bash
# Create (once) the Python venv used by the ONNX conformance tooling
# (tests/conformance/*.py) and print its path as the last stdout line.
#
#   venv:   ${KILN_CACHE:-$HOME/.cache/kiln}/venv-v1
#   python: ${KILN_PYTHON:-python3}   (needs >= 3.10 for these wheels)
#
# Idempotent: a marker file inside the venv records the pinned requirement set;
# when it matches, the script exits immediately. Progress goes to stderr, so
#   VENV=$(scripts/setup-python.sh)
# captures just the path.
set -euo pipefail

# Pinned set (what pip resolved for onnx 1.23.2 + onnxruntime 1.32.0).
# Transitive deps are pinned too so generated test data is reproducible.
# Changing this list triggers a reinstall on the next run.
REQUIREMENTS=(
  "onnx==1.23.2"
  "onnxruntime==1.32.0"
  "numpy==2.4.6"
  "ml_dtypes==0.6.0"
  "protobuf==7.36.2"
  "flatbuffers==25.12.19"
  "packaging==26.4"
  "typing_extensions==4.16.0"
)

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
VENV="$CACHE/venv-v1"
MARKER="$VENV/.kiln-setup-complete"
PYTHON="${KILN_PYTHON:-python3}"
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}")"

log() { printf 'setup-python: %s\n' "$*" >&2; }

if [[ -f "$MARKER" && -x "$VENV/bin/python" && "$(cat "$MARKER")" == "$WANT" ]]; then
  printf '%s\n' "$VENV"
  exit 0
fi

mkdir -p "$CACHE"

# Reuse an existing venv only if its interpreter still runs; otherwise rebuild.
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' </dev/null >/dev/null 2>&1; then
  log "existing venv at $VENV is broken; recreating"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || { log "error: $PYTHON not found (set KILN_PYTHON)"; exit 1; }
  log "creating venv at $VENV with $("$PYTHON" --version 2>&1)"
  if ! "$PYTHON" -m venv "$VENV" </dev/null >&2; then
    log "error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    rm -rf "$VENV"
    exit 1
  fi
fi

rm -f "$MARKER"
log "installing ${REQUIREMENTS[*]}"
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
  "$VENV/bin/python" -m pip install --quiet "${REQUIREMENTS[@]}" </dev/null >&2

# Smoke test before declaring success.
"$VENV/bin/python" -c 'import numpy, onnx, onnxruntime; print("setup-python: numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)' </dev/null >&2

printf '%s\n' "$WANT" >"$MARKER"
printf '%s\n' "$VENV"

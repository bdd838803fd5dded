#!/usr/bin/env bash
# `kiln optimize` end to end: optimizes the light models (and the cached MiniLM / PP-OCR models
# when present), then checks each output with onnx.checker and runs it in ONNX Runtime against
# the original (tests/optimize/check_optimized.py, tolerance 1e-4); `--precision fp16` outputs are
# checked the same way with the fp16 rule (docs/precision.md).
#
# Needs the Python venv (scripts/setup-python.sh) and a built `kiln` (built here if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VENV="$(bash scripts/setup-python.sh </dev/null | tail -n 1)"
PY="$VENV/bin/python"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build -q -p kiln-cli
KILN="$TARGET/debug/kiln"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

check() { # model level extra-args-for-check...
  local model="$1" level="$2"; shift 2
  local out="$OUT/$(basename "$model" .onnx)-$level.onnx"
  echo "== $(basename "$model") --level $level"
  # A 64 MiB fold limit lets ConstantOfShape weights fold so Conv+BN fusion can fire.
  "$KILN" optimize "$model" "$out" --level "$level" --fold-limit 67108864 | grep -E '\*|total|^rule'
  "$PY" tests/optimize/check_optimized.py "$model" "$out" "$@" 2> >(grep -v -e Warning -e 'W:onnxruntime' >&2)
}

check_fp16() { # model extra-args-for-check...: `--precision fp16` at --level extended
  local model="$1"; shift
  local out="$OUT/$(basename "$model" .onnx)-fp16.onnx"
  echo "== $(basename "$model") --precision fp16"
  "$KILN" optimize "$model" "$out" --level extended --precision fp16 | grep -E '^fp16|total'
  "$PY" tests/optimize/check_optimized.py "$model" "$out" --fp16 "$@" 2> >(grep -v -e Warning -e 'W:onnxruntime' >&2)
}

for level in basic extended all; do
  check models/light/squeezenet.onnx "$level"
done
check models/light/resnet50.onnx extended
check_fp16 models/light/squeezenet.onnx
check_fp16 models/light/resnet50.onnx

# Real models from models/fetch.sh in $KILN_MODELS (scripts/test.sh sets it; default: fetch.sh's
# directory), checked when present.
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
MODELS="${KILN_MODELS:-$CACHE/models-v1}"
find_model() { find "$MODELS" -name "$1" 2>/dev/null | head -n 1 || true; }
m="$(find_model paraphrase-MiniLM-L3-v2.onnx)"
if [[ -n "$m" ]]; then
  check "$m" extended --dim batch_size=2 --dim sequence_length=7
  check_fp16 "$m" --dim batch_size=2 --dim sequence_length=7
fi
m="$(find_model ch_PP-OCRv4_det_infer.onnx)"
if [[ -n "$m" ]]; then
  check "$m" extended --shape x=1x3x64x64
  check_fp16 "$m" --shape x=1x3x64x64
fi
m="$(find_model ch_PP-OCRv4_rec_infer.onnx)"
if [[ -n "$m" ]]; then check "$m" extended --shape x=1x3x48x160; fi
# fp16 through If bodies (Silero VAD: the network lives in the branches), on its reference inputs.
m="$MODELS/silero_vad.onnx"
if [[ -f "$m" && -d "${m%.onnx}.ref/sr16k_b1/inputs" ]]; then check_fp16 "$m" --inputs "${m%.onnx}.ref/sr16k_b1/inputs"; fi
echo "optimize: all outputs valid and matching"

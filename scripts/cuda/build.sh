#!/usr/bin/env bash
# Builds the `kiln` binary, the conformance runner, kiln-runtime's test binary (the fused CUDA
# kernel tests, src/cuda_kernels/tests.rs) and the fused kernel microbenchmark with the `cuda` feature on a machine without a GPU (pip
# CUDA 13.0 toolchain from scripts/cuda/setup.sh, sm_90 = H100/H200), then strips and packs them for the GPU
# machine (run there by scripts/cuda/gpu-check.sh): dist/kiln-gpu.tgz (kiln, kiln-conformance),
# dist/kiln-gpu-kernels.tgz (kernel tests, benchmark) and dist/kiln-gpu-session.tar.xz (all four, for
# KILN_GPU_CHECK=session).
# Every build here uses the workspace's default members, as CI's scripts/cuda/ci-check.sh does, so they share
# one candle-kernels build (~8.5 min of the ~13-minute first build on 2 cores) in the same target dir; a
# narrower selection (-p ...) resolves build-dependency features differently and compiles it again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
eval "$(bash scripts/cuda/setup.sh --env)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}"
cargo build --release --features cuda "$@"
# The lib test binary of kiln-runtime (its path has a hash: take it from cargo's JSON messages).
tests_bin="$(cargo test --release --features cuda --lib --no-run --message-format=json "$@" |
  grep 'crates/kiln-runtime#' | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/"executable":"\(.*\)"/\1/')"
[[ -x "$tests_bin" ]] || { echo "build.sh: no kiln-runtime test binary found" >&2; exit 1; }
cargo build --release --features cuda --example fused_kernel_bench "$@"
mkdir -p dist
strip -o dist/kiln "$CARGO_TARGET_DIR/release/kiln"
strip -o dist/kiln-conformance "$CARGO_TARGET_DIR/release/kiln-conformance"
strip -o dist/kiln-runtime-tests "$tests_bin"
strip -o dist/fused-kernel-bench "$CARGO_TARGET_DIR/release/examples/fused_kernel_bench"
tar czf dist/kiln-gpu.tgz -C dist kiln kiln-conformance
# The fused kernel checks in their own archive, so a GPU run of only those carries ~30 MB.
tar czf dist/kiln-gpu-kernels.tgz -C dist kiln-runtime-tests fused-kernel-bench
# Everything for KILN_GPU_CHECK=session, all GPU checks in one command (xz: the four binaries in about
# 40 MB, so that with dist/node-tests.tgz and the working tree it stays under 64 MiB to copy over).
tar cJf dist/kiln-gpu-session.tar.xz -C dist kiln kiln-conformance kiln-runtime-tests fused-kernel-bench
# The node tests for the conformance run there (generated here: the GPU machine has no network).
data="$(bash scripts/gen-conformance-data.sh </dev/null | tail -n 1)"
tar czf dist/node-tests.tgz -C "$(dirname "$data")" "$(basename "$data")"
# Real models that fit the carry limit beside the rest (PP-OCRv4 det/rec, Silero VAD, ~18 MB) with their
# onnxruntime references, for gpu-evidence.py --real-models (the GPU machine cannot fetch them).
venv="$(bash scripts/setup-python.sh </dev/null | tail -n 1)"
models="$(PYTHON="$venv/bin/python" bash models/fetch.sh </dev/null | tail -n 1)"
"$venv/bin/python" models/make_reference.py "$models" </dev/null >/dev/null
real=(ch_PP-OCRv4_det_infer ch_PP-OCRv4_rec_infer silero_vad)
tar czhf dist/real-models.tgz -C "$models" $(for m in "${real[@]}"; do echo "$m.onnx" "$m.ref"; done)
ls -la dist/kiln-gpu.tgz dist/kiln-gpu-kernels.tgz dist/kiln-gpu-session.tar.xz dist/node-tests.tgz dist/real-models.tgz

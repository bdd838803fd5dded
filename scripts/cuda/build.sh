#!/usr/bin/env bash
# Builds the `kiln` binary, the conformance runner, kiln-runtime's test binary (the fused CUDA
# kernel tests, src/cuda_kernels/tests.rs) and the fused kernel microbenchmark with the `cuda` feature on a machine without a GPU (pip
# CUDA 13.0 toolchain from scripts/cuda/setup.sh, sm_90 = H100/H200), then strips and packs them into
# dist/kiln-gpu.tgz (kiln, kiln-conformance) and dist/kiln-gpu-kernels.tgz (kernel tests, benchmark)
# for the GPU machine (run there by scripts/cuda/gpu-check.sh).
# First build ~35 min on 2 cores (candle-kernels); later builds are incremental. The kiln-runtime
# test build resolves build-dependency features differently from the kiln-cli build, so its first
# run compiles candle-kernels once more (about 20 min); both stay cached in the target dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
eval "$(bash scripts/cuda/setup.sh --env)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}"
cargo build --release --features cuda -p kiln-cli -p kiln-conformance --features kiln-conformance/cuda "$@"
# The lib test binary of kiln-runtime (its path has a hash: take it from cargo's JSON messages).
tests_bin="$(cargo test --release --features cuda -p kiln-runtime --lib --no-run --message-format=json "$@" |
  grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/"executable":"\(.*\)"/\1/')"
[[ -x "$tests_bin" ]] || { echo "build.sh: no kiln-runtime test binary found" >&2; exit 1; }
cargo build --release --features cuda -p kiln-runtime --example fused_kernel_bench "$@"
mkdir -p dist
strip -o dist/kiln "$CARGO_TARGET_DIR/release/kiln"
strip -o dist/kiln-conformance "$CARGO_TARGET_DIR/release/kiln-conformance"
strip -o dist/kiln-runtime-tests "$tests_bin"
strip -o dist/fused-kernel-bench "$CARGO_TARGET_DIR/release/examples/fused_kernel_bench"
tar czf dist/kiln-gpu.tgz -C dist kiln kiln-conformance
# The fused kernel checks in their own archive, so a GPU run of only those carries ~30 MB.
tar czf dist/kiln-gpu-kernels.tgz -C dist kiln-runtime-tests fused-kernel-bench
ls -la dist/kiln-gpu.tgz dist/kiln-gpu-kernels.tgz

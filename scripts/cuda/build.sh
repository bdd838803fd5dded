#!/usr/bin/env bash
# Builds the `kiln` binary and the conformance runner with the `cuda` feature on a machine without a
# GPU (pip CUDA 13.0 toolchain from scripts/cuda/setup.sh, sm_90 = H100/H200), then strips and packs
# them into dist/kiln-gpu.tgz for the GPU machine (run there with scripts/cuda/gpu-run.sh).
# First build ~35 min on 2 cores (candle-kernels); later builds are incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
eval "$(bash scripts/cuda/setup.sh --env)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}"
cargo build --release --features cuda -p kiln-cli -p kiln-conformance --features kiln-conformance/cuda "$@"
mkdir -p dist
strip -o dist/kiln "$CARGO_TARGET_DIR/release/kiln"
strip -o dist/kiln-conformance "$CARGO_TARGET_DIR/release/kiln-conformance"
tar czf dist/kiln-gpu.tgz -C dist kiln kiln-conformance
ls -la dist/kiln-gpu.tgz

#!/usr/bin/env bash
# CI's CUDA check on a machine without a GPU (called by .ci/run after scripts/test.sh):
#   1. the pip CUDA 13.0 build toolchain (scripts/cuda/setup.sh: nvcc, headers, link-time libraries and a
#      stub libcuda; ~1.2 GB, cached in $KILN_CUDA_PREFIX),
#   2. `cargo build --release --features cuda` (Kiln's kernels/*.cu through nvcc to PTX, candle's CUDA
#      backend and candle-kernels) in its own target dir, cached outside the clone
#      ($KILN_CUDA_TARGET_DIR, default /var/tmp/kiln-target-cuda: the first build takes ~30 min on 2 cores,
#      later ones recompile only Kiln's crates),
#   3. the libraries' unit tests in that build, started with the stub libcuda (every cu* call returns
#      CUDA_ERROR_NO_DEVICE): the PTX check (`ptx_entry_points_match_the_launchers`: every kernel the
#      launchers name is in the embedded PTX with the parameters they push) runs for real, the GPU tests
#      must print `skipped: no CUDA device`,
#   4. the built `kiln` with the stub: it runs a shipped model on the CPU (output checked against the
#      expected file, which must not be a uniform softmax) and answers `--device cuda` with one clear
#      error line, no panic.
# The test build uses the same package selection as the build (the workspace's default members), so
# candle-kernels is compiled once: another selection resolves build-dependency features differently and
# would compile it again.
# Usage: bash scripts/cuda/ci-check.sh [PYTHON]   (PYTHON: an interpreter with pip and numpy; default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${1:-${PYTHON:-python3}}"

PYTHON="$PY" bash scripts/cuda/setup.sh >/dev/null
eval "$(bash scripts/cuda/setup.sh --env)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${KILN_CUDA_TARGET_DIR:-/var/tmp/kiln-target-cuda}"
start=$(date +%s)
cargo build --release --features cuda
echo "cuda-check: cargo build --release --features cuda: $(( $(date +%s) - start )) s"

# The binaries need libcuda.so.1 to start at all; the stub answers every call with CUDA_ERROR_NO_DEVICE.
export LD_LIBRARY_PATH="$CUDA_ROOT/lib:${KILN_CUDA_PREFIX:-/opt/cuda-pip}/nogpu-lib"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

cargo test -q --release --features cuda --lib
cargo test -q --release --features cuda --lib -- cuda_kernels:: device_memory:: --nocapture --test-threads 1 --format pretty \
  >"$out/gpu-tests" 2>&1 || { cat "$out/gpu-tests" >&2; exit 1; }
ran="$(grep -cE '^test (cuda_kernels|device_memory)::' "$out/gpu-tests" || true)"
skipped="$(grep -c 'skipped: no CUDA device' "$out/gpu-tests" || true)"
grep -q '^test cuda_kernels::tests::ptx_entry_points_match_the_launchers .* ok$' "$out/gpu-tests" || {
  cat "$out/gpu-tests" >&2; echo "cuda-check: the PTX check did not run" >&2; exit 1; }
if [[ "$skipped" -lt 1 ]]; then
  cat "$out/gpu-tests" >&2; echo "cuda-check: no GPU test printed its skip reason" >&2; exit 1
fi
echo "cuda-check: $ran CUDA unit tests passed without a GPU; $skipped of them skipped with: $(grep -m1 -o 'skipped: no CUDA device.*' "$out/gpu-tests")"

kiln="$CARGO_TARGET_DIR/release/kiln"

"$kiln" run models/light/squeezenet.onnx --input data_0=models/light/input_1x3x224x224.npy --output-dir "$out"
"$PY" - "$out/softmaxout_1.npy" models/light/squeezenet_expected.npy <<'EOF'
import sys
import numpy as np
got, want = np.load(sys.argv[1]), np.load(sys.argv[2])
assert got.shape == want.shape, (got.shape, want.shape)
# A uniform expected softmax (std/mean 0) would only check the shape; the shipped one is at 5.1.
cv = float(want.std() / want.mean())
assert cv > 0.5, f"expected output too close to uniform (std/mean {cv:.3g}): regenerate with models/make_light.py"
err = float(np.abs(got - want).max())
assert np.allclose(got, want, rtol=1e-3, atol=1e-5), err
print(f"cuda-check: the CUDA build runs SqueezeNet on the CPU, max abs error {err:.2e} (expected output std/mean {cv:.2f})")
EOF

set +e
"$kiln" inspect models/light/squeezenet.onnx --device cuda >"$out/stdout" 2>"$out/stderr"
rc=$?
set -e
if [[ $rc -ne 1 ]] || [[ "$(wc -l <"$out/stderr")" -ne 1 ]] || ! grep -q '^error: loading models/light/squeezenet.onnx on cuda:0' "$out/stderr" ||
  grep -q panicked "$out/stderr"; then
  echo "cuda-check: expected exit 1 and one 'error: loading ... on cuda:0' line without a GPU; got exit $rc:" >&2
  cat "$out/stderr" >&2
  exit 1
fi
echo "cuda-check: without a GPU, --device cuda says: $(cat "$out/stderr")"

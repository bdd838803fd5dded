#!/usr/bin/env bash
# Runs on the GPU machine (no cargo there): unpacks dist/kiln-gpu.tgz and dist/kiln-gpu-kernels.tgz
# (scripts/cuda/build.sh) and dist/node-tests.tgz (the generated node tests), then records in $OUT:
#   nvidia-smi.txt, fused-kernels.txt (kiln-runtime's fused CUDA kernel tests against the CPU
#   kernels), fused-kernel-bench.txt (GB/s, TFLOP/s of each fused kernel),
#   conformance-{cuda,cpu}.txt + results TSVs, light-models.txt, gpu-evidence.{md,json,txt}
# KILN_GPU_CHECK=kernels runs only the fused kernel tests and benchmark: it needs only
# dist/kiln-gpu-kernels.tgz (carry just that file, ~30 MB).
# KILN_GPU_CHECK=evidence runs only scripts/cuda/gpu-evidence.py (correctness against onnxruntime and speed
# against PyTorch on a BERT-base-shaped encoder and a CNN, about 8 min, writes gpu-evidence.md): it needs only
# dist/kiln-gpu.tgz. The full run ends with it too.
# KILN_GPU_CHECK=session runs every GPU check in one command for a machine available for about 15 minutes
# (its start included): it needs dist/kiln-gpu-session.tar.xz, dist/node-tests.tgz and dist/real-models.tgz
# (scripts/cuda/build.sh; about 58 MB with the working tree, under 64 MiB), with a 600 s timeout. In
# priority order, each step limited by what is left of KILN_GPU_BUDGET (default 540 s): fused kernel tests,
# kernel microbenchmark, gpu-evidence.py (correctness vs onnxruntime, speed vs PyTorch), then the node suite
# on cuda:0 (with every test that did not pass and its message), then per-node profiles of the batch-64
# encoder/CNN cells (kiln-profile.txt) with the time left. Writes 8 files to $OUT (the card's
# nvidia-smi lines head fused-kernels.txt).
# KILN_GPU_CHECK=profile (same archives, 168 s on an H200): the node suite on cuda:0, gpu-evidence.py, then
# `kiln bench --profile` of the batch-64 encoder/CNN cells into kiln-profile.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/kiln-gpu-out}"
mkdir -p "$OUT" /tmp/kiln-gpu
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; } > "$OUT/nvidia-smi.txt" 2>&1
RUN="bash scripts/cuda/gpu-run.sh"
peaks() {
  # Peaks for the "% of peak" column: HBM bandwidth and FP32 CUDA-core (non-tensor) TFLOP/s, the
  # units these kernels run on, and dense fp16 tensor-core TFLOP/s for the cuBLAS f16 products
  # (datasheet figures, SXM parts; H100 PCIe: 2000 GB/s, 51 and 756 TFLOP/s).
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)" in
    *H200*) export KILN_PEAK_GBPS=4800 KILN_PEAK_TFLOPS=67 KILN_PEAK_TC_TFLOPS=989 ;;
    *H100*PCIe*) export KILN_PEAK_GBPS=2000 KILN_PEAK_TFLOPS=51 KILN_PEAK_TC_TFLOPS=756 ;;
    *H100*) export KILN_PEAK_GBPS=3350 KILN_PEAK_TFLOPS=67 KILN_PEAK_TC_TFLOPS=989 ;;
  esac
}
# The node suite on cuda:0 (timeout $1 s) into conformance-cuda.txt: the summary, then every test
# that did not pass with its message (from --results).
conformance_cuda() {
  tar xzf dist/node-tests.tgz -C /tmp/kiln-gpu || return
  timeout "$1" $RUN /tmp/kiln-gpu/kiln-conformance --data /tmp/kiln-gpu/node-tests-onnx-1.23.2 \
    --device cuda:0 --timeout 30 --results /tmp/kiln-gpu/results-cuda.tsv > "$OUT/conformance-cuda.txt" 2>&1
  echo "exit $?" >> "$OUT/conformance-cuda.txt"
  tail -n 3 "$OUT/conformance-cuda.txt"
  { echo "== tests that did not pass (name, status, message)"
    awk -F'\t' '$2 != "pass" && $3 != "ok"' /tmp/kiln-gpu/results-cuda.tsv | cut -c1-400; } >> "$OUT/conformance-cuda.txt"
}
# Per-node profiles (`kiln bench --profile` waits for each node's kernels) of the batch-64 cells of the
# models gpu-evidence.py exported, into kiln-profile.txt, while `left` allows.
profiles() {
  for cell in encoder:fp16 cnn:fp16 encoder:fp32; do
    IFS=: read -r model precision <<< "$cell"
    [[ -f "/tmp/kiln-evidence/models/$model.onnx" ]] || continue
    (( $(left) > 15 )) || break
    echo "== kiln bench $model --precision $precision --dim batch=64 --profile" >> "$OUT/kiln-profile.txt"
    timeout $(( $(left) - 5 )) $RUN /tmp/kiln-gpu/kiln bench "/tmp/kiln-evidence/models/$model.onnx" --device cuda \
      --precision "$precision" --level all --dim batch=64 -n 10 --warmup 3 --profile --top 15 \
      >> "$OUT/kiln-profile.txt" 2>&1
    echo "exit $?" >> "$OUT/kiln-profile.txt"
  done
}
if [[ "${KILN_GPU_CHECK:-all}" == session ]]; then
  end=$(( SECONDS + ${KILN_GPU_BUDGET:-540} ))
  left() { echo $(( end - SECONDS )); }
  tar xJf dist/kiln-gpu-session.tar.xz -C /tmp/kiln-gpu || exit 1
  # The card first (nvidia-smi.txt's lines: 8 files is the most that come back).
  mv "$OUT/nvidia-smi.txt" "$OUT/fused-kernels.txt"
  timeout 100 $RUN /tmp/kiln-gpu/kiln-runtime-tests cuda_kernels:: device_memory:: --test-threads 1 --nocapture \
    >> "$OUT/fused-kernels.txt" 2>&1
  echo "exit $?" >> "$OUT/fused-kernels.txt"
  tail -n 3 "$OUT/fused-kernels.txt"
  peaks
  timeout 60 $RUN /tmp/kiln-gpu/fused-kernel-bench > "$OUT/fused-kernel-bench.txt" 2>&1
  echo "exit $?" >> "$OUT/fused-kernel-bench.txt"
  tail -n 3 "$OUT/fused-kernel-bench.txt"
  # Evidence: what is left less ~130 s for the node suite and the profiles; the script keeps to its
  # budget.
  budget=$(( $(left) - 130 ))
  real=()
  if [[ -f dist/real-models.tgz ]] && mkdir -p /tmp/kiln-gpu/real-models &&
    tar xzf dist/real-models.tgz -C /tmp/kiln-gpu/real-models; then
    real=(--real-models /tmp/kiln-gpu/real-models)
  fi
  if (( budget > 120 )); then
    timeout -k 10 $(( budget + 30 )) python3 scripts/cuda/gpu-evidence.py /tmp/kiln-gpu/kiln --out "$OUT" \
      --budget "$budget" --compile-budget 90 "${real[@]}" > "$OUT/gpu-evidence.txt" 2>&1
    echo "exit $?" >> "$OUT/gpu-evidence.txt"
    tail -n 3 "$OUT/gpu-evidence.txt"
  fi
  if (( $(left) > 30 )); then
    conformance_cuda $(( $(left) > 95 ? 60 : $(left) - 5 ))
  fi
  profiles
  tail -n 30 "$OUT/kiln-profile.txt" 2>/dev/null
  ls -la "$OUT"
  exit 0
fi
if [[ "${KILN_GPU_CHECK:-all}" == profile ]]; then
  # A follow-up to a session run (fused kernels already checked): the node suite on cuda:0 with every
  # non-passing test and its message, the evidence run, then per-node profiles of the batch-64 cells
  # (`kiln bench --profile` waits for each node's kernels). Same archives as the session run; 7 files.
  end=$(( SECONDS + ${KILN_GPU_BUDGET:-420} ))
  left() { echo $(( end - SECONDS )); }
  tar xJf dist/kiln-gpu-session.tar.xz -C /tmp/kiln-gpu || exit 1
  conformance_cuda 90
  real=()
  mkdir -p /tmp/kiln-gpu/real-models && tar xzf dist/real-models.tgz -C /tmp/kiln-gpu/real-models &&
    real=(--real-models /tmp/kiln-gpu/real-models)
  budget=$(( $(left) - 90 ))
  timeout -k 10 $(( budget + 30 )) python3 scripts/cuda/gpu-evidence.py /tmp/kiln-gpu/kiln --out "$OUT" \
    --budget "$budget" --compile-budget 60 "${real[@]}" > "$OUT/gpu-evidence.txt" 2>&1
  echo "exit $?" >> "$OUT/gpu-evidence.txt"
  tail -n 3 "$OUT/gpu-evidence.txt"
  profiles
  tail -n 40 "$OUT/kiln-profile.txt"
  ls -la "$OUT"
  exit 0
fi
evidence() {
  # The script keeps to its own 480 s budget; the timeout is a backstop.
  timeout -k 10 560 python3 scripts/cuda/gpu-evidence.py /tmp/kiln-gpu/kiln --out "$OUT" > "$OUT/gpu-evidence.txt" 2>&1
  echo "exit $?" >> "$OUT/gpu-evidence.txt"
  tail -n 3 "$OUT/gpu-evidence.txt"
}
if [[ "${KILN_GPU_CHECK:-all}" == evidence ]]; then
  tar xzf dist/kiln-gpu.tgz -C /tmp/kiln-gpu
  evidence
  ls -la "$OUT"
  exit 0
fi
[[ -f dist/kiln-gpu-kernels.tgz ]] && tar xzf dist/kiln-gpu-kernels.tgz -C /tmp/kiln-gpu
if [[ -x /tmp/kiln-gpu/kiln-runtime-tests ]]; then
  timeout 300 $RUN /tmp/kiln-gpu/kiln-runtime-tests cuda_kernels --test-threads 1 --nocapture \
    > "$OUT/fused-kernels.txt" 2>&1
  echo "exit $?" >> "$OUT/fused-kernels.txt"
  tail -n 3 "$OUT/fused-kernels.txt"
fi
if [[ -x /tmp/kiln-gpu/fused-kernel-bench ]]; then
  peaks
  timeout 120 $RUN /tmp/kiln-gpu/fused-kernel-bench > "$OUT/fused-kernel-bench.txt" 2>&1
  echo "exit $?" >> "$OUT/fused-kernel-bench.txt"
fi
if [[ "${KILN_GPU_CHECK:-all}" == kernels ]]; then
  ls -la "$OUT"
  exit 0
fi
tar xzf dist/kiln-gpu.tgz -C /tmp/kiln-gpu
tar xzf dist/node-tests.tgz -C /tmp/kiln-gpu
DATA=/tmp/kiln-gpu/node-tests-onnx-1.23.2
for dev in cuda:0 cpu; do
  tag=${dev%%:*}
  timeout 240 $RUN /tmp/kiln-gpu/kiln-conformance --data "$DATA" --device "$dev" --timeout 30 \
    --results "$OUT/results-$tag.tsv" > "$OUT/conformance-$tag.txt" 2>&1
  echo "exit $?" >> "$OUT/conformance-$tag.txt"
done
{
  for m in resnet50:gpu_0/data_0:gpu_0_softmax_1 squeezenet:data_0:softmaxout_1; do
    IFS=: read -r name input output <<< "$m"
    for dev in cuda:0 cpu; do
      $RUN /tmp/kiln-gpu/kiln run "models/light/$name.onnx" --device "$dev" \
        --input "$input=models/light/input_1x3x224x224.npy" --output-dir "/tmp/kiln-gpu/out-$name-${dev%%:*}" 2>&1
      python3 - "$name" "/tmp/kiln-gpu/out-$name-${dev%%:*}/$output.npy" "$dev" <<'PY'
import sys, numpy as np
name, path, dev = sys.argv[1:]
got = np.load(path); want = np.load(f"models/light/{name}_expected.npy")
err = float(np.max(np.abs(got - want))); scale = float(np.max(np.abs(want)))
print(f"{name} on {dev}: max abs err {err:.3g} (output scale {scale:.3g}), allclose(rtol=1e-3, atol=1e-5) = {np.allclose(got, want, rtol=1e-3, atol=1e-5)}")
PY
    done
  done
} > "$OUT/light-models.txt" 2>&1
evidence
ls -la "$OUT"

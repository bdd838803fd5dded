#!/usr/bin/env bash
# Compile check for kernels/*.cu without a GPU: nvcc --ptx for compute_80 and compute_90, then
# ptxas on each PTX for sm_80 / sm_90 (catches syntax, type, register and shared-memory errors
# that the PTX JIT would otherwise only report on the GPU). Prints each kernel's register, shared
# memory and spill use. Skips (exit 0) with the reason when no nvcc is found.
#
#   bash tests/kernels/compile.sh            # NVCC, else nvcc on PATH, else scripts/cuda/setup.sh's
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x /opt/cuda-pip/site/nvidia/cu13/bin/nvcc ]]; then
    NVCC=/opt/cuda-pip/site/nvidia/cu13/bin/nvcc
  fi
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "skipped: no nvcc found (set NVCC, put nvcc on PATH, or run scripts/cuda/setup.sh)"
  exit 0
fi
PTXAS="$(dirname "$NVCC")/ptxas"
[[ -x "$PTXAS" ]] || PTXAS="$(command -v ptxas || true)"
if [[ -z "$PTXAS" ]]; then
  echo "skipped: nvcc at $NVCC but no ptxas next to it or on PATH"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
shopt -s nullglob
sources=(kernels/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no kernels/*.cu"
  exit 1
fi
for cc in 80 90; do
  for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    ptx="$tmp/$name.$cc.ptx"
    if ! "$NVCC" --ptx -arch="compute_$cc" -O3 -std=c++17 --expt-relaxed-constexpr -Werror all-warnings \
        -o "$ptx" "$src" 2> "$tmp/err"; then
      echo "FAIL nvcc compute_$cc $src"; cat "$tmp/err"; fail=1; continue
    fi
    if ! "$PTXAS" -arch="sm_$cc" -v --warn-on-spills -o /dev/null "$ptx" 2> "$tmp/err"; then
      echo "FAIL ptxas sm_$cc $src"; cat "$tmp/err"; fail=1; continue
    fi
    if grep -q "warning" "$tmp/err"; then
      echo "FAIL ptxas sm_$cc $src (warnings)"; grep "warning" "$tmp/err"; fail=1; continue
    fi
    entries="$(grep -c '^\.visible \.entry' "$ptx")"
    regs="$(grep -o 'Used [0-9]* registers' "$tmp/err" | awk '{print $2}' | sort -n | tail -1 || true)"
    smem="$(grep -o '[0-9]* bytes smem' "$tmp/err" | awk '{print $1}' | sort -n | tail -1 || true)"
    echo "ok   sm_$cc $name: $entries kernels, max ${regs:-0} registers, max ${smem:-0} bytes static smem, no spills"
  done
done
exit $fail

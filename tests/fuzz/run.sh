#!/usr/bin/env bash
# Differential op fuzzing against ONNX Runtime (tests/fuzz/op_fuzz.py): draws random single-node
# models per kernel family, takes ONNX Runtime's outputs as the reference, runs Kiln over them with
# kiln-conformance and exits non-zero on any mismatch, panic or hang, and on any model ONNX Runtime
# rejects as invalid that Kiln runs without an error.
#
#   tests/fuzz/run.sh [--cases N] [--seed S] [--family NAME]... [--out DIR] [--release]
#
# Defaults: 50 cases per family (700 models, ~15 s on 2 cores after the build), seed 0,
# DIR = target/op-fuzz. Prints a per-family table.
# First a self-test: two models whose kernel panics (fault injection) must be reported by the runner
# as panics, in both comparison and expected-error mode, with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

CASES=50
SEED=0
OUT=target/op-fuzz
PROFILE=()
GEN=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cases) CASES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --family) GEN+=(--family "$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --release) PROFILE=(--release); shift ;;
    *) echo "usage: $0 [--cases N] [--seed S] [--family NAME]... [--out DIR] [--release]" >&2; exit 2 ;;
  esac
done

VENV=$(bash scripts/setup-python.sh)
RUNNER=(cargo run -q "${PROFILE[@]}" -p kiln-conformance --)

SELF="$OUT-selftest"
rm -rf "$SELF"
"$VENV/bin/python" tests/fuzz/op_fuzz.py "$SELF" --self-test
if KILN_FAULT_INJECTION=1 "${RUNNER[@]}" --data "$SELF" --exact-tol --expect-errors "$SELF/ort_errors.tsv" \
  --results "$SELF/results.tsv" --strict >"$SELF/log.txt" 2>&1; then
  cat "$SELF/log.txt" >&2
  echo "op fuzz self-test: FAILED: the runner passed models whose kernel panics" >&2
  exit 1
fi
if [[ "$(grep -c $'\t\\(expect-error:\\)\\?panic\t' "$SELF/results.tsv")" != 2 ]]; then
  cat "$SELF/log.txt" "$SELF/results.tsv" >&2
  echo "op fuzz self-test: FAILED: both fault-injection panics must be reported as panics" >&2
  exit 1
fi
echo "op fuzz self-test: kernel panics are reported as failures"
"$VENV/bin/python" tests/fuzz/op_fuzz.py "$OUT" --seed "$SEED" --cases "$CASES" "${GEN[@]}"
rc=0
"${RUNNER[@]}" --data "$OUT" --exact-tol \
  --expect-errors "$OUT/ort_errors.tsv" --results "$OUT/kiln_results.tsv" --timeout 30 --strict || rc=$?
"$VENV/bin/python" tests/fuzz/op_fuzz.py "$OUT" --report
if [[ $rc -ne 0 ]]; then
  echo "op fuzz: FAILED (cases in $OUT; rerun one with: cargo run -p kiln-conformance -- --data $OUT --exact-tol --filter NAME -v)" >&2
fi
exit $rc

#!/usr/bin/env python3
"""Checks `kiln quantize` output (`--mode int8-weight`, `--mode dynamic-int8` with --dynamic,
`--mode int4-weight` with --int4, or `--mode static-int8` with --static).

1. onnx.checker accepts it and it has int8 weights (at least --min-int8 of them): DequantizeLinear
   of an int8 constant, with --dynamic MatMulInteger of one, with --int4 com.microsoft MatMulNBits
   of a uint8 constant.
2. ONNX Runtime runs it (its own QDQ handling is the reference for the file's meaning); each
   output is close to the fp32 original's: cosine similarity >= 0.99 and
   max|int8 - fp32| <= 0.1 * max|fp32| (the tolerance crates/kiln/tests/int8.rs states and justifies).
   With --int4: cosine >= 0.95 and max|diff| <= 0.25 * max|fp32|: 16 levels per block of 32 values
   put each weight within 1/30 of its block's range of the original (MiniLM-L3's hidden states:
   cosine 0.976-0.978, the same as ONNX Runtime's own MatMul4BitsQuantizer gives at block 32).
3. With --kiln PATH: `kiln run` on the quantized file matches ONNX Runtime on the same file within
   --atol (relative to max(1, max|ort|)): Kiln's int8 MatMul kernel computes what the file says.
   With --dynamic: cosine >= 0.999 instead. Both engines multiply the integers exactly, but a float
   difference of one ulp before a DynamicQuantizeLinear can move an activation across a rounding
   boundary, which then differs by one quantization step.
   With --static: the same cosine >= 0.999 (every QuantizeLinear is such a boundary), and the file
   must also quantize activations (QuantizeLinear nodes).
--min-cosine / --max-abs-fraction replace the bounds of 2. for a model whose quantized file is known
to be further from fp32 (min-max static int8 of a transformer), so 3. still checks Kiln against ORT.

usage: check_quantized.py ORIGINAL.onnx QUANTIZED.onnx [--kiln BIN] [--min-int8 N] [--dynamic | --int4 | --static]
                          [--dim NAME=SIZE ...] [--shape INPUT=AxB ...]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "optimize"))
from check_optimized import feeds  # noqa: E402  (same synthetic inputs as the optimize check)

MIN_COSINE = 0.99
MAX_ABS_FRACTION = 0.1
INT4_MIN_COSINE = 0.95
INT4_MAX_ABS_FRACTION = 0.25


def clean(name):
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("quantized")
    ap.add_argument("--kiln")
    ap.add_argument("--min-int8", type=int, default=1)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--dynamic", action="store_true", help="dynamic-int8 output (MatMulInteger)")
    ap.add_argument("--int4", action="store_true", help="int4-weight output (MatMulNBits)")
    ap.add_argument("--static", action="store_true", help="static-int8 output (QDQ activations)")
    ap.add_argument("--min-cosine", type=float, help="ORT on the file vs fp32: cosine bound (default per mode)")
    ap.add_argument("--max-abs-fraction", type=float, help="ORT on the file vs fp32: max|diff| / max|fp32| bound")
    ap.add_argument("--dim", action="append", default=[])
    ap.add_argument("--shape", action="append", default=[], help="INPUT=1x3x48x320")
    a = ap.parse_args()
    q = onnx.load(a.quantized)
    onnx.checker.check_model(q)
    inits = {i.name: i for i in q.graph.initializer}
    op, slot = ("MatMulInteger", 1) if a.dynamic else ("DequantizeLinear", 0)
    code_type, kind = onnx.TensorProto.INT8, "int8"
    if a.int4:
        op, slot, code_type, kind = "MatMulNBits", 1, onnx.TensorProto.UINT8, "int4"
    n_int8 = sum(
        1
        for n in q.graph.node
        if n.op_type == op and n.input[slot] in inits and inits[n.input[slot]].data_type == code_type
    )
    print(f"{n_int8} {kind} {op} weights")
    if a.static:
        n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
        print(f"{n_q} QuantizeLinear activations")
        if n_q == 0:
            print("no quantized activation")
            return 1
    min_cosine, max_abs_fraction = (INT4_MIN_COSINE, INT4_MAX_ABS_FRACTION) if a.int4 else (MIN_COSINE, MAX_ABS_FRACTION)
    if a.min_cosine is not None:
        min_cosine = a.min_cosine
    if a.max_abs_fraction is not None:
        max_abs_fraction = a.max_abs_fraction
    ok = n_int8 >= a.min_int8
    dims = {k: int(v) for k, v in (d.split("=") for d in a.dim)}
    shapes = {k: [int(n) for n in v.split("x")] for k, v in (d.split("=") for d in a.shape)}
    orig = onnx.load(a.original)
    x = feeds(orig, dims, shapes, np.random.default_rng(0))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(a.original, so, providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(a.quantized, so, providers=["CPUExecutionProvider"]).run(None, x)
    ok &= len(ref) == len(got)
    for r, g, o in zip(ref, got, orig.graph.output):
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        denom = np.linalg.norm(r64) * np.linalg.norm(g64)
        cos = float(r64 @ g64 / denom) if denom > 0 else 1.0
        diff = float(np.max(np.abs(r64 - g64))) if r.size else 0.0
        bound = max_abs_fraction * (float(np.max(np.abs(r64))) if r.size else 0.0)
        good = r.shape == g.shape and cos >= min_cosine and diff <= bound
        ok &= good
        print(f"ort {kind} vs fp32 {o.name}: cosine {cos:.6f} max|diff| {diff:.3g} (bound {bound:.3g}) {'ok' if good else 'OUT OF TOLERANCE'}")
    if a.kiln:
        with tempfile.TemporaryDirectory() as tmp:
            args = [a.kiln, "run", a.quantized, "-o", tmp]
            for name, v in x.items():
                p = os.path.join(tmp, clean(name) + ".in.npy")
                np.save(p, v)
                args += ["-i", f"{name}={p}"]
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
            for g, o in zip(got, q.graph.output):
                k = np.load(os.path.join(tmp, clean(o.name) + ".npy"))
                k64, g64 = k.astype(np.float64).ravel(), g.astype(np.float64).ravel()
                diff = float(np.max(np.abs(k64 - g64))) if g.size else 0.0
                scale = max(1.0, float(np.max(np.abs(g)))) if g.size else 1.0
                if a.dynamic or a.static:
                    denom = np.linalg.norm(k64) * np.linalg.norm(g64)
                    cos = float(k64 @ g64 / denom) if denom > 0 else 1.0
                    good = k.shape == g.shape and cos >= 0.999
                    what = f"cosine {cos:.6f}, max|diff| {diff:.3g}"
                else:
                    good = k.shape == g.shape and diff <= a.atol * scale
                    what = f"max|diff| {diff:.3g}"
                ok &= good
                print(f"kiln vs ort on the {kind} file {o.name}: {what} {'ok' if good else 'MISMATCH'}")
    print(f"checker ok; {kind} outputs", "within tolerance" if ok else "OUT OF TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

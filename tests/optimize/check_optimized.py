#!/usr/bin/env python3
"""Checks `kiln optimize` output: onnx.checker accepts it and ONNX Runtime runs it with outputs
matching the original model's within a tolerance.

usage: check_optimized.py ORIGINAL.onnx OPTIMIZED.onnx [--atol 1e-4] [--dim NAME=SIZE ...]
                          [--shape INPUT=1x3x48x320 ...] [--inputs DIR] [--fp16]

--fp16 checks a `kiln optimize --precision fp16` output: the graph inputs and outputs keep the
original's dtypes, the model stores float16 initializers, and each output passes when
max|diff| <= 1e-2 * max|ref| or max|diff| <= 1e-4 (the rule of crates/kiln/tests/fp16_models.rs).

Inputs are synthesized from the original's declared inputs (symbolic dims from --dim, else 1;
integer inputs drawn from [0, 100), ones for inputs named *mask*, floats from a fixed-seed normal); prints the largest
difference per output and exits 1 on a mismatch or a checker/runtime error.
"""
import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def feeds(model, dims, shapes, rng):
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = list(shapes.get(vi.name, []))
        for d in tt.shape.dim if not shape else []:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(dims.get(d.dim_param, 1))
        dt = DTYPES[tt.elem_type]
        if np.issubdtype(dt, np.integer) and "mask" in vi.name:
            out[vi.name] = np.ones(shape, dtype=dt)
        elif np.issubdtype(dt, np.integer):
            out[vi.name] = rng.integers(0, 100, size=shape).astype(dt)
        elif dt == np.bool_:
            out[vi.name] = np.ones(shape, dtype=dt)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(dt)
    return out


def count_weights(graph):
    """(float16, float32) tensors among initializers and Constant values, nested graphs included."""
    tensors = list(graph.initializer)
    n16 = n32 = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                tensors.append(attr.t)
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                a, b = count_weights(g)
                n16, n32 = n16 + a, n32 + b
    n16 += sum(t.data_type == onnx.TensorProto.FLOAT16 for t in tensors)
    n32 += sum(t.data_type == onnx.TensorProto.FLOAT for t in tensors)
    return n16, n32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("optimized")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--dim", action="append", default=[])
    ap.add_argument("--shape", action="append", default=[], help="INPUT=1x3x48x320")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--inputs", help="a directory of NAME.npy inputs to use instead of synthesized ones")
    a = ap.parse_args()
    dims = {k: int(v) for k, v in (d.split("=") for d in a.dim)}
    opt = onnx.load(a.optimized)
    onnx.checker.check_model(opt)
    orig = onnx.load(a.original)
    if a.fp16:
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]
        inits = {i.name for i in opt.graph.initializer}
        opt_io = [x for x in io(opt) if x[0] not in inits]
        orig_io = [x for x in io(orig) if x[0] not in {i.name for i in orig.graph.initializer}]
        if opt_io != orig_io:
            print(f"fp16 model changed the graph inputs/outputs: {opt_io} != {orig_io}")
            return 1
        n16, n32 = count_weights(opt.graph)
        print(f"fp16 model: {n16} float16 weights (initializers, Constants, bodies included), {n32} float32 kept")
        if n16 == 0:
            print("fp16 model has no float16 weight")
            return 1
    shapes = {k: [int(n) for n in v.split("x")] for k, v in (d.split("=") for d in a.shape)}
    if a.inputs:
        x = {p[:-4]: np.load(os.path.join(a.inputs, p)) for p in sorted(os.listdir(a.inputs)) if p.endswith(".npy")}
    else:
        x = feeds(orig, dims, shapes, np.random.default_rng(0))
    so = ort.SessionOptions()
    # Compare the models as written: ORT's own rewrites off on both sides.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(a.original, so, providers=["CPUExecutionProvider"]).run(None, x)
    got = ort.InferenceSession(a.optimized, so, providers=["CPUExecutionProvider"]).run(None, x)
    ok = len(ref) == len(got)
    for r, g, o in zip(ref, got, orig.graph.output):
        diff = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        if a.fp16:
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            good = r.shape == g.shape and r.dtype == g.dtype and (diff <= 1e-2 * scale or diff <= 1e-4)
        else:
            scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
            good = r.shape == g.shape and diff <= a.atol * scale
        ok &= good
        print(f"{o.name}: shape {r.shape} max|diff| {diff:.3g} {'ok' if good else 'MISMATCH'}")
    print("checker ok; outputs", "match" if ok else "DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Differential op fuzzing: random single-node ONNX models, ONNX Runtime as the reference.

Usage: op_fuzz.py OUTDIR [--seed S] [--cases N] [--family NAME ...]
       op_fuzz.py OUTDIR --report        (per-family table after kiln-conformance --results)
       op_fuzz.py OUTDIR --self-test     (two fault-injection cases whose kernel panics)

For every kernel family (see FAMILIES) it draws N random single-node models (shapes, attributes and
values, with degenerate cases on purpose: 1x1 images, width-1 inputs, kernels larger than the input,
stride > kernel, zero-sized dims, huge pads, negative axes, values at f32 max) and runs each through
ONNX Runtime (CPU EP, graph optimizations disabled, 1 thread). Case i of a family is drawn from an RNG
seeded with (seed, family, i), so a case does not depend on --cases or on other families.

Written to OUTDIR, in the ONNX node-test layout `kiln-conformance --data` reads:

    OUTDIR/<name>/model.onnx
    OUTDIR/<name>/test_data_set_0/input_K.pb, output_K.pb   (outputs only where ORT succeeded)
    OUTDIR/<name>/meta.json        {"rtol", "atol", "inputs", "outputs", "family"}
    OUTDIR/manifest.tsv            name, family, op, "ok" | "ort-error" | "excluded"
    OUTDIR/ort_errors.tsv          name, kind, ORT's message: cases ORT rejects (model or run)
    OUTDIR/excluded.tsv            name, reason: cases not run at all (ORT wrong / spec ambiguous)

`kind` in ort_errors.tsv: `invalid` (onnx.checker with full shape inference rejects the model too, or
ORT refuses the input data: out-of-range indices and the like; Kiln must return an error) or
`ort-unsupported` (a valid model ORT's CPU EP has no implementation for; Kiln may run it, and must
not panic or hang). `kiln-conformance --expect-errors OUTDIR/ort_errors.tsv` checks both.

Tolerances (meta.json, read exactly with `kiln-conformance --exact-tol`):
  * data movement (Gather*, Scatter* without reduction, Slice, Pad, Concat, Split, Transpose,
    MaxPool, nearest Resize, ReduceMax/Min): exact (rtol 0, atol 0): the same values must come out;
  * element-wise: rtol 1e-5, atol 1e-6 (one rounding each side, Pow/Div may differ in the last ulp);
  * accumulations (Conv, ConvTranspose, MatMul, Gemm, pools, Resize linear/cubic, Sum/Mean/L2/...
    reductions, RNNs, Attention, LayerNorm, Softmax): rtol 1e-4 and atol 1e-5 * max(1, sqrt(K)) with
    K the number of terms summed into one output: with different summation orders (blocked GEMM with
    FMA vs ORT's MLAS) the rounding error of a K-term f32 sum of O(1) values grows like sqrt(K) *
    eps * |terms|, and an output that cancels to near zero has no relative bound. ReduceProd gets
    rtol 1e-4 * max(1, K/8) (relative error grows linearly in the product length). RNNs run
    K = input + hidden per step over up to 6 steps through tanh/sigmoid, which contracts errors.

The Kiln bugs this found are pinned as Rust tests in crates/kiln/tests/op_fuzz_regressions.rs (case
draws change whenever a generator changes, so (family, seed, i) is not a stable regression id).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F32MAX = np.finfo(np.float32).max

# Cases skipped with a reason (ONNX Runtime is wrong or the spec is ambiguous): `excluded_reason`.


class Case:
    def __init__(self, op, inputs, attrs=None, outputs=1, out_types=None, opset=18, tol=(1e-4, 1e-5),
                 domain="", deg=False):
        self.op = op
        self.inputs = inputs  # list of (name, ndarray | None); None = omitted optional input ("")
        self.attrs = attrs or {}
        self.outputs = outputs if isinstance(outputs, list) else [f"y{i}" for i in range(outputs)]
        self.out_types = out_types or [TensorProto.FLOAT] * len(self.outputs)
        self.opset = opset
        self.tol = tol
        self.domain = domain
        self.deg = deg
        # If ORT fails: None = classify by the checker and ORT's message, else this kind.
        self.error_kind = None

    def model(self):
        node_inputs = [n if a is not None else "" for n, a in self.inputs]
        # Trailing omitted optional inputs are dropped.
        while node_inputs and node_inputs[-1] == "":
            node_inputs.pop()
        node_outputs = list(self.outputs)
        node = helper.make_node(self.op, node_inputs, [o for o in node_outputs], domain=self.domain,
                                **{k: v for k, v in self.attrs.items() if v is not None})
        g_in = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                for n, a in self.inputs if a is not None]
        g_out = [helper.make_tensor_value_info(o, t, None) for o, t in zip(self.outputs, self.out_types) if o]
        graph = helper.make_graph([node], "fuzz", g_in, g_out)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                              producer_name="kiln-op-fuzz")
        m.ir_version = 10 if self.opset >= 21 else 8
        return m


def fl(rng, shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def special(rng, shape):
    """Values including f32 max/min, zeros, tiny numbers."""
    a = fl(rng, shape, -2, 2)
    if a.size:
        pool = np.array([F32MAX, -F32MAX, 0.0, -0.0, 1e-38, 3.0e38, -1e30, 1.0], np.float32)
        m = rng.random(a.shape) < 0.3
        a[m] = rng.choice(pool, size=int(m.sum()))
    return a


# Element types for data-movement ops, drawn from a second RNG stream per case (so adding it did not
# change the shapes and values of the float cases).
_DT_RNG = None
DATA_TYPES = [np.float32, np.float32, np.float32, np.float32, np.float32, np.int64, np.int32, np.uint8,
              np.bool_, np.float16]


# Every 7th case (i % 7 == 3) is drawn larger (channels, spatial sizes, GEMM dims, sequence lengths) so
# the blocked GEMM, im2col and fused attention paths see sizes past their block boundaries.
_BIG = False


def upto(small, big):
    return big if _BIG else small


def data_dtype():
    return DATA_TYPES[int(_DT_RNG.integers(len(DATA_TYPES)))]


def as_dtype(a, dt):
    """A float array (from fl/special) as element type dt."""
    if dt == np.float32:
        return a
    if dt == np.bool_:
        return np.asarray(a > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        if dt == np.float16:
            return np.asarray(a.astype(np.float16))
        info = np.iinfo(dt)
        return np.asarray(np.clip(np.nan_to_num(a.astype(np.float64) * 100), info.min, info.max).astype(dt))


def tproto(dt):
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def acc_tol(k):
    return (1e-4, 1e-5 * max(1.0, math.sqrt(k)))


EXACT = (0.0, 0.0)
ELEM = (1e-5, 1e-6)


def pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def ints(v):
    return [int(x) for x in v]


# ----------------------------------------------------------------------------------------------
# Conv / ConvTranspose

def _spatial(rng, deg):
    nd = pick(rng, [2, 2, 2, 1, 1, 3])
    if deg:
        sp = [int(rng.integers(1, 4)) for _ in range(nd)]
    else:
        sp = [int(rng.integers(1, upto(10, 24) if nd < 3 else upto(6, 10))) for _ in range(nd)]
    return nd, sp


def gen_conv(rng, deg):
    nd, sp = _spatial(rng, deg)
    n = int(rng.integers(1, 3))
    kind = pick(rng, ["normal", "depthwise", "grouped", "normal"])
    if kind == "depthwise":
        g = int(rng.integers(1, upto(5, 20)))
        c, m = g, g * int(rng.integers(1, 3))
    elif kind == "grouped":
        g = int(rng.integers(2, 4))
        c, m = g * int(rng.integers(1, upto(3, 9))), g * int(rng.integers(1, upto(3, 9)))
    else:
        g, c, m = 1, int(rng.integers(1, upto(5, 33))), int(rng.integers(1, upto(5, 33)))
    k = [int(rng.integers(1, 6 if deg else 4)) for _ in range(nd)]
    strides = [int(rng.integers(1, 5 if deg else 3)) for _ in range(nd)]
    dil = [int(rng.integers(1, 3)) for _ in range(nd)]
    auto_pad = pick(rng, ["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    attrs = {"group": g, "strides": strides, "dilations": dil}
    if rng.random() < 0.7:
        attrs["kernel_shape"] = k
    if auto_pad == "NOTSET":
        hi = 2 * max(k) + 2 if deg else max(k)
        attrs["pads"] = [int(rng.integers(0, hi)) for _ in range(2 * nd)]
    else:
        attrs["auto_pad"] = auto_pad
    x = fl(rng, [n, c] + sp)
    w = fl(rng, [m, c // g] + k)
    b = fl(rng, [m]) if rng.random() < 0.6 else None
    if deg and rng.random() < 0.3:
        x = special(rng, x.shape)
    kk = (c // g) * int(np.prod(k))
    return Case("Conv", [("x", x), ("w", w), ("b", b)], attrs, tol=acc_tol(kk), deg=deg)


def gen_conv_transpose(rng, deg):
    nd, sp = _spatial(rng, deg)
    n = int(rng.integers(1, 3))
    g = pick(rng, [1, 1, 2, 3])
    c = g * int(rng.integers(1, 3))
    m = g * int(rng.integers(1, 3))
    k = [int(rng.integers(1, 5)) for _ in range(nd)]
    strides = [int(rng.integers(1, 4)) for _ in range(nd)]
    dil = [int(rng.integers(1, 3)) for _ in range(nd)]
    attrs = {"group": g, "strides": strides, "dilations": dil}
    if rng.random() < 0.7:
        attrs["kernel_shape"] = k
    mode = pick(rng, ["pads", "pads", "pads", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape"])
    if mode == "pads":
        attrs["pads"] = [int(rng.integers(0, max(k) + (2 if deg else 0))) for _ in range(2 * nd)]
    elif mode == "output_shape":
        full = [strides[i] * (sp[i] - 1) + (k[i] - 1) * dil[i] + 1 for i in range(nd)]
        attrs["output_shape"] = [max(1, f + int(rng.integers(-2, strides[i]))) for i, f in enumerate(full)]
    else:
        attrs["auto_pad"] = mode
    if rng.random() < 0.4:
        attrs["output_padding"] = [int(rng.integers(0, max(strides[i], dil[i]))) for i in range(nd)]
    x = fl(rng, [n, c] + sp)
    w = fl(rng, [c, m // g] + k)
    b = fl(rng, [m]) if rng.random() < 0.6 else None
    kk = (c // g) * int(np.prod(k))
    case = Case("ConvTranspose", [("x", x), ("w", w), ("b", b)], attrs, tol=acc_tol(kk), deg=deg)
    if any(p >= s for p, s in zip(attrs.get("output_padding", []), strides)):
        # ORT refuses output_padding >= stride ("may be too large for stride"); the spec does not
        # (PyTorch allows output_padding < max(stride, dilation)).
        case.error_kind = "ort-unsupported"
    return case


# ----------------------------------------------------------------------------------------------
# Pools

def gen_pool(rng, deg):
    op = pick(rng, ["MaxPool", "MaxPool", "AveragePool", "AveragePool", "LpPool", "GlobalAveragePool",
                    "GlobalMaxPool", "GlobalLpPool"])
    nd, sp = _spatial(rng, deg)
    x = fl(rng, [int(rng.integers(1, 3)), int(rng.integers(1, 4))] + sp)
    if deg and op in ("MaxPool", "GlobalMaxPool") and rng.random() < 0.5:
        x = special(rng, x.shape)
    if op.startswith("Global"):
        attrs = {"p": int(rng.integers(1, 4))} if op == "GlobalLpPool" else {}
        k = int(np.prod(sp))
        tol = EXACT if op == "GlobalMaxPool" else acc_tol(k)
        return Case(op, [("x", x)], attrs, opset=19, tol=tol, deg=deg)
    k = [int(rng.integers(1, 5 if deg else 4)) for _ in range(nd)]
    strides = [int(rng.integers(1, 5 if deg else 3)) for _ in range(nd)]
    attrs = {"kernel_shape": k}
    if rng.random() < 0.8:
        attrs["strides"] = strides
    if op != "LpPool" or rng.random() < 0.5:
        if rng.random() < 0.4:
            attrs["dilations"] = [int(rng.integers(1, 3)) for _ in range(nd)]
    auto_pad = pick(rng, ["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    if auto_pad == "NOTSET":
        # Pads below the kernel size (ORT and the spec's reference require pad < kernel for pools).
        attrs["pads"] = [int(rng.integers(0, k[i % nd])) for i in range(2 * nd)]
    else:
        attrs["auto_pad"] = auto_pad
    if rng.random() < 0.4:
        attrs["ceil_mode"] = 1
    outputs = 1
    out_types = None
    tol = acc_tol(int(np.prod(k)))
    if op == "MaxPool":
        tol = EXACT
        if rng.random() < 0.3:
            attrs["storage_order"] = int(rng.integers(0, 2))
        if rng.random() < 0.4:
            outputs = 2
            out_types = [TensorProto.FLOAT, TensorProto.INT64]
    elif op == "AveragePool":
        if rng.random() < 0.5:
            attrs["count_include_pad"] = 1
    else:
        attrs["p"] = int(rng.integers(1, 4))
    return Case(op, [("x", x)], attrs, outputs=outputs, out_types=out_types, opset=19, tol=tol, deg=deg)


# ----------------------------------------------------------------------------------------------
# Resize

def gen_resize(rng, deg):
    mode = pick(rng, ["nearest", "nearest", "linear", "linear", "cubic"])
    rank = pick(rng, [4, 4, 4, 3, 2, 5]) if mode == "nearest" else pick(rng, [4, 4, 4, 2, 3])
    shape = [int(rng.integers(1, 3)), int(rng.integers(1, 3))] + [
        int(rng.integers(1, 3 if deg else 7)) for _ in range(rank - 2)]
    shape = shape[:rank] if rank >= 2 else shape
    x = fl(rng, shape)
    ctm = pick(rng, ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                     "asymmetric", "tf_crop_and_resize"])
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if mode == "nearest":
        attrs["nearest_mode"] = pick(rng, ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
    if mode == "cubic":
        attrs["cubic_coeff_a"] = pick(rng, [-0.75, -0.5])
        if rng.random() < 0.3:
            attrs["exclude_outside"] = 1
    if mode != "nearest" and rng.random() < 0.2:
        attrs["antialias"] = 1
    # Only the spatial (last two or fewer) axes are resized for linear/cubic; nearest may resize any.
    resized = list(range(rank)) if mode == "nearest" and rng.random() < 0.3 else list(range(max(0, rank - 2), rank))
    roi = None
    if ctm == "tf_crop_and_resize":
        lo = rng.uniform(-0.3, 0.5, size=rank)
        hi = rng.uniform(0.5, 1.3, size=rank)
        for a in range(rank):
            if a not in resized:
                lo[a], hi[a] = 0.0, 1.0
        roi = np.concatenate([lo, hi]).astype(np.float32)
        attrs["extrapolation_value"] = float(pick(rng, [0.0, -1.5]))
    use_sizes = rng.random() < 0.4
    scales = sizes = None
    if use_sizes:
        sizes = np.array([shape[a] if a not in resized else int(rng.integers(1, 3 * shape[a] + 2))
                          for a in range(rank)], np.int64)
        if rng.random() < 0.3 and len(resized) >= 2:
            attrs["keep_aspect_ratio_policy"] = pick(rng, ["not_larger", "not_smaller"])
    else:
        opts = [0.5, 0.6, 1.0, 1.5, 2.0, 3.0, 0.25, 1.7] + ([0.1, 5.0] if deg else [])
        scales = np.array([1.0 if a not in resized else pick(rng, opts) for a in range(rank)], np.float32)
    tol = EXACT if mode == "nearest" else acc_tol(16)
    inputs = [("x", x), ("roi", roi), ("scales", scales), ("sizes", sizes)]
    return Case("Resize", inputs, attrs, opset=19, tol=tol, deg=deg)


# ----------------------------------------------------------------------------------------------
# Gather / Scatter

def _shape(rng, rank, deg, hi=5):
    s = [int(rng.integers(1, hi)) for _ in range(rank)]
    if deg and rank and rng.random() < 0.3:
        s[int(rng.integers(rank))] = 0
    return s


def gen_gather(rng, deg):
    op = pick(rng, ["Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND"])
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank, deg)
    data = fl(rng, shape) if not deg else special(rng, shape)
    dt = data_dtype()
    data = as_dtype(data, dt)
    out_t = [tproto(dt)]
    oob = deg and rng.random() < 0.25  # an out-of-range index: ORT errors, Kiln must error

    def idx(dim, size):
        if dim == 0:
            return np.zeros(size, np.int64)
        v = rng.integers(-dim, dim, size=size).astype(np.int64)
        if oob and v.size:
            v.flat[int(rng.integers(v.size))] = pick(rng, [dim, -dim - 1, dim + 7])
        return v

    if op == "Gather":
        axis = int(rng.integers(-rank, rank))
        ishape = [] if rng.random() < 0.2 else _shape(rng, int(rng.integers(1, 3)), deg, 4)
        ind = idx(shape[axis], ishape).reshape(ishape)
        if shape[axis] == 0 and ind.size:
            ind = np.zeros([0], np.int64)
        itype = pick(rng, [np.int64, np.int32])
        return Case(op, [("data", data), ("indices", ind.astype(itype))], {"axis": axis}, out_types=out_t, opset=18,
                    tol=EXACT, deg=deg)
    if op == "GatherElements":
        axis = int(rng.integers(-rank, rank))
        ishape = [int(rng.integers(0 if deg else 1, s + 1)) if i != axis % rank else int(rng.integers(1, 5))
                  for i, s in enumerate(shape)]
        if shape[axis] == 0:
            ishape[axis % rank] = 0
        ind = idx(shape[axis], ishape).reshape(ishape)
        return Case(op, [("data", data), ("indices", ind)], {"axis": axis}, out_types=out_t, opset=18, tol=EXACT,
                    deg=deg)
    if op == "GatherND":
        b = int(rng.integers(0, rank))
        b = min(b, rank - 1)
        k = int(rng.integers(1, rank - b + 1))
        outer = _shape(rng, int(rng.integers(0, 2)), False, 4)
        ishape = shape[:b] + outer + [k]
        ind = np.stack([idx(shape[b + j], ishape[:-1]).reshape(ishape[:-1]) for j in range(k)], -1) \
            if int(np.prod(ishape[:-1])) else np.zeros(ishape, np.int64)
        return Case(op, [("data", data), ("indices", ind.astype(np.int64))], {"batch_dims": b}, out_types=out_t,
                    opset=18, tol=EXACT, deg=deg)
    red = pick(rng, ["none", "none", "add", "mul", "max", "min"])
    if red != "none" and dt != np.float32:
        # Reductions keep the float data (ORT has no bool/uint8 Scatter reductions).
        data, dt, out_t = data.astype(np.float32), np.float32, [TensorProto.FLOAT]
    tol = EXACT if red in ("none", "max", "min") else ELEM
    if op == "ScatterElements":
        axis = int(rng.integers(-rank, rank))
        ishape = [int(rng.integers(1, s + 1)) if s else 0 for s in shape]
        if red == "none":
            # Distinct targets along the axis (duplicates make the result order-dependent).
            ind = np.zeros(ishape, np.int64)
            d = shape[axis]
            for pos in np.ndindex(*[s for i, s in enumerate(ishape) if i != axis % rank]):
                perm = rng.permutation(d)[: ishape[axis]]
                sl = list(pos)
                sl.insert(axis % rank, slice(None))
                ind[tuple(sl)] = perm - (d if rng.random() < 0.3 else 0)
            if oob and ind.size:
                ind.flat[0] = shape[axis] + 3
        else:
            ind = idx(shape[axis], ishape).reshape(ishape)
        upd = as_dtype(fl(rng, ishape), dt)
        return Case(op, [("data", data), ("indices", ind), ("updates", upd)], {"axis": axis, "reduction": red},
                    out_types=out_t, opset=18, tol=tol, deg=deg)
    # ScatterND
    k = int(rng.integers(1, rank + 1))
    outer = _shape(rng, int(rng.integers(1, 3)), False, 4)
    n = int(np.prod(outer))
    lead = shape[:k]
    total = int(np.prod(lead))
    if total == 0:
        n, outer = 0, [0]
    if red == "none" and n > total:
        outer, n = [total], total
    if red == "none":
        flat = rng.permutation(total)[:n]
    else:
        flat = rng.integers(0, max(total, 1), size=n)
    ind = np.stack(np.unravel_index(flat, lead), -1).astype(np.int64) if n else np.zeros([0, k], np.int64)
    ind = ind.reshape(outer + [k])
    if rng.random() < 0.3 and ind.size:
        ind = ind - np.array(lead, np.int64) * (rng.random(ind.shape) < 0.5)
    if oob and ind.size:
        ind.flat[0] = lead[0] + 2
    upd = as_dtype(fl(rng, outer + shape[k:]), dt)
    return Case(op, [("data", data), ("indices", ind), ("updates", upd)], {"reduction": red}, out_types=out_t,
                opset=18, tol=tol, deg=deg)


# ----------------------------------------------------------------------------------------------
# Slice / Pad

def gen_slice(rng, deg):
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank, deg, 7)
    dt = data_dtype()
    x = as_dtype(fl(rng, shape), dt)
    naxes = int(rng.integers(1, rank + 1))
    axes = rng.permutation(rank)[:naxes]
    axes = np.array([a - rank if rng.random() < 0.4 else a for a in axes], np.int64)
    big = np.iinfo(np.int64).max
    starts, ends, steps = [], [], []
    for a in axes:
        d = shape[a]
        st = int(pick(rng, [1, 1, 1, 2, 3, -1, -2] + ([5, -4] if deg else [])))
        cand = [int(rng.integers(-d - 3, d + 3)), 0, -1, d]
        s0 = pick(rng, cand + ([big, -big] if deg else []))
        e0 = pick(rng, cand + [big if st > 0 else -big, -big if st > 0 else big])
        starts.append(s0)
        ends.append(e0)
        steps.append(st)
    inputs = [("x", x), ("starts", np.array(starts, np.int64)), ("ends", np.array(ends, np.int64))]
    if rng.random() < 0.8 or any(s != 1 for s in steps):
        inputs.append(("axes", axes))
        inputs.append(("steps", np.array(steps, np.int64)))
    if rng.random() < 0.2:
        # int32 indices (out-of-range values clipped to the int32 range first)
        i32 = np.iinfo(np.int32)
        inputs = [(n, np.clip(a, i32.min, i32.max).astype(np.int32) if n != "x" else a) for n, a in inputs]
    return Case("Slice", inputs, {}, out_types=[tproto(dt)], opset=18, tol=EXACT, deg=deg)


def gen_pad(rng, deg):
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank, deg, 5)
    dt = data_dtype()
    x = as_dtype(fl(rng, shape) if not deg else special(rng, shape), dt)
    mode = pick(rng, ["constant", "constant", "reflect", "edge", "wrap"])
    use_axes = rng.random() < 0.3
    axes = rng.permutation(rank)[: int(rng.integers(1, rank + 1))] if use_axes else np.arange(rank)
    if use_axes and rng.random() < 0.5:
        axes = np.array([a - rank for a in axes])
    hi = 9 if deg else 3
    pads = [int(rng.integers(-2 if rng.random() < 0.3 else 0, hi)) for _ in range(2 * len(axes))]
    if mode == "reflect" and not deg:
        pads = [min(p, shape[axes[i % len(axes)]] - 1) if p > 0 else p for i, p in enumerate(pads)]
    inputs = [("x", x), ("pads", np.array(pads, np.int64))]
    if mode == "constant" and rng.random() < 0.7:
        inputs.append(("value", as_dtype(np.array(pick(rng, [0.0, 1.5, -F32MAX]), np.float32), dt)))
    elif use_axes:
        inputs.append(("value", None))
    if use_axes:
        inputs.append(("axes", np.array(axes, np.int64)))
    case = Case("Pad", inputs, {"mode": mode}, out_types=[tproto(dt)], opset=19, tol=EXACT, deg=deg)
    if mode != "constant":
        k = len(axes)
        for i, a in enumerate(axes):
            b, e = pads[i], pads[k + i]
            if shape[a] - max(0, -b) - max(0, -e) <= 0 and shape[a] + b + e > 0:
                case.error_kind = "invalid"
    return case


# ----------------------------------------------------------------------------------------------
# Reductions

REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"]


def gen_reduce(rng, deg):
    op = pick(rng, REDUCE_OPS)
    rank = int(rng.integers(0 if deg else 1, 5))
    shape = _shape(rng, rank, deg, upto(6, 30))
    if op in ("ReduceLogSum",):
        x = fl(rng, shape, 0.1, 2.0)
    elif op == "ReduceProd":
        x = fl(rng, shape, 0.5, 1.5)
    else:
        x = fl(rng, shape)
    if deg and op in ("ReduceMax", "ReduceMin", "ReduceLogSumExp") and rng.random() < 0.5:
        x = special(rng, shape)
    attrs = {"keepdims": int(rng.integers(0, 2))}
    inputs = [("x", x)]
    r = rng.random()
    if r < 0.2 or rank == 0:
        naxes = None  # absent axes input: reduce all, or noop
        if rng.random() < 0.5:
            attrs["noop_with_empty_axes"] = 1
    else:
        naxes = int(rng.integers(0 if deg else 1, rank + 1))
        axes = rng.permutation(rank)[:naxes]
        axes = np.array([a - rank if rng.random() < 0.4 else a for a in axes], np.int64)
        if naxes == 0 and rng.random() < 0.5:
            attrs["noop_with_empty_axes"] = 1
        inputs.append(("axes", axes))
    red = shape if naxes is None else [shape[a] for a in inputs[1][1]] if len(inputs) > 1 else shape
    k = max(1, int(np.prod(red))) if red else 1
    if op in ("ReduceMax", "ReduceMin"):
        tol = EXACT
    elif op == "ReduceProd":
        tol = (1e-4 * max(1.0, k / 8), 1e-6)
    else:
        tol = acc_tol(k)
    return Case(op, inputs, attrs, opset=18, tol=tol, deg=deg)


# ----------------------------------------------------------------------------------------------
# MatMul / Gemm

def gen_matmul(rng, deg):
    if rng.random() < 0.5:
        m, k, n = (int(rng.integers(0 if deg else 1, upto(9, 80))) for _ in range(3))
        ta, tb = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        a = fl(rng, [k, m] if ta else [m, k])
        b = fl(rng, [n, k] if tb else [k, n])
        attrs = {"transA": ta, "transB": tb}
        if rng.random() < 0.5:
            attrs["alpha"] = float(pick(rng, [0.5, -1.25, 2.0, 0.0]))
        if rng.random() < 0.5:
            attrs["beta"] = float(pick(rng, [0.5, -1.0, 3.0, 0.0]))
        cshape = pick(rng, [None, [], [1], [n], [1, n], [m, 1], [m, n], [1, 1]])
        c = fl(rng, cshape) if cshape is not None else None
        return Case("Gemm", [("a", a), ("b", b), ("c", c)], attrs, opset=13, tol=acc_tol(k), deg=deg)
    m, k, n = (int(rng.integers(0 if deg else 1, upto(9, 80))) for _ in range(3))
    batch = _shape(rng, int(rng.integers(0, 3)), False, 4)
    ba = [d if rng.random() < 0.7 else 1 for d in batch]
    bb = [d if rng.random() < 0.7 else 1 for d in batch]
    if rng.random() < 0.3 and ba:
        ba = ba[int(rng.integers(len(ba))):]
    sa = ba + [m, k]
    sb = bb + [k, n]
    if rng.random() < 0.15:
        sa = [k]
    elif rng.random() < 0.15:
        sb = [k]
    return Case("MatMul", [("a", fl(rng, sa)), ("b", fl(rng, sb))], {}, opset=13, tol=acc_tol(k), deg=deg)


# ----------------------------------------------------------------------------------------------
# RNN / GRU / LSTM

def gen_rnn(rng, deg):
    op = pick(rng, ["RNN", "GRU", "LSTM"])
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    seq = int(rng.integers(1, upto(6, 12)))
    batch = int(rng.integers(1, 4))
    inp = int(rng.integers(1, upto(5, 20)))
    hid = int(rng.integers(1, upto(5, 40)))
    direction = pick(rng, ["forward", "reverse", "bidirectional"])
    nd = 2 if direction == "bidirectional" else 1
    layout = 1 if rng.random() < 0.25 else 0
    x = fl(rng, [batch, seq, inp] if layout else [seq, batch, inp])
    w = fl(rng, [nd, gates * hid, inp])
    r = fl(rng, [nd, gates * hid, hid])
    b = fl(rng, [nd, 2 * gates * hid]) if rng.random() < 0.7 else None
    sl = None
    if rng.random() < 0.5:
        sl = rng.integers(1, seq + 1, size=batch).astype(np.int32)
    h0 = fl(rng, [batch, nd, hid] if layout else [nd, batch, hid]) if rng.random() < 0.5 else None
    attrs = {"hidden_size": hid, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if rng.random() < 0.2:
        attrs["clip"] = float(pick(rng, [0.5, 2.0]))
    inputs = [("x", x), ("w", w), ("r", r), ("b", b), ("seq_lens", sl), ("h0", h0)]
    if op == "GRU":
        attrs["linear_before_reset"] = int(rng.integers(0, 2))
    if op == "RNN" and rng.random() < 0.3:
        attrs["activations"] = [pick(rng, ["Tanh", "Relu", "Sigmoid"]) for _ in range(nd)]
    if op == "LSTM":
        c0 = fl(rng, [batch, nd, hid] if layout else [nd, batch, hid]) if rng.random() < 0.5 else None
        p = fl(rng, [nd, 3 * hid]) if rng.random() < 0.3 else None
        inputs += [("c0", c0), ("p", p)]
        if rng.random() < 0.2:
            attrs["input_forget"] = 1
    nout = 3 if op == "LSTM" else 2
    outs = [f"y{i}" for i in range(nout)]
    if rng.random() < 0.3:
        outs[0] = ""  # Y omitted: only the last state
    return Case(op, inputs, attrs, outputs=outs, opset=14, tol=acc_tol(inp + hid), deg=deg)


# ----------------------------------------------------------------------------------------------
# Attention (opset 23)

def gen_attention(rng, deg):
    b = int(rng.integers(1, 3))
    hkv = int(rng.integers(1, 3))
    hq = hkv * int(rng.integers(1, 3))
    sq = int(rng.integers(1, upto(6, 48)))
    skv = int(rng.integers(1, upto(6, 48)))
    d = int(rng.integers(1, upto(9, 80)))
    dv = d if rng.random() < 0.7 else int(rng.integers(1, upto(9, 80)))
    three_d = rng.random() < 0.3
    attrs = {}
    if three_d:
        q = fl(rng, [b, sq, hq * d])
        k = fl(rng, [b, skv, hkv * d])
        v = fl(rng, [b, skv, hkv * dv])
        attrs["q_num_heads"] = hq
        attrs["kv_num_heads"] = hkv
    else:
        q = fl(rng, [b, hq, sq, d])
        k = fl(rng, [b, hkv, skv, d])
        v = fl(rng, [b, hkv, skv, dv])
    past = rng.random() < 0.25
    pskv = int(rng.integers(1, 4)) if past else 0
    total = skv + pskv
    mask = None
    mk = pick(rng, [None, None, "bool", "float"])
    if mk is not None:
        mshape = pick(rng, [[sq, total], [1, sq, total], [b, 1, sq, total], [b, hq, sq, total]])
        if mk == "bool":
            mask = rng.random(mshape) < 0.75
            if not deg:
                mask[..., 0] = True  # no fully masked row unless degenerate
        else:
            mask = fl(rng, mshape, -2, 1)
    if rng.random() < 0.3:
        attrs["is_causal"] = 1
    if rng.random() < 0.3:
        attrs["scale"] = float(pick(rng, [0.5, 0.125, 1.0]))
    if rng.random() < 0.15:
        attrs["softcap"] = float(pick(rng, [1.0, 5.0]))
    inputs = [("q", q), ("k", k), ("v", v), ("mask", mask)]
    outs = ["y"]
    if past:
        inputs.append(("past_key", fl(rng, [b, hkv, pskv, d])))
        inputs.append(("past_value", fl(rng, [b, hkv, pskv, dv])))
        outs += ["present_key", "present_value"]
    return Case("Attention", inputs, attrs, outputs=outs, opset=23, tol=acc_tol(max(d, total)), deg=deg)


# ----------------------------------------------------------------------------------------------
# Softmax / LayerNormalization

def gen_norm(rng, deg):
    op = pick(rng, ["Softmax", "LogSoftmax", "LayerNormalization", "LayerNormalization"])
    rank = int(rng.integers(1, 5))
    shape = _shape(rng, rank, deg, upto(7, 40))
    x = fl(rng, shape, -4, 4)
    axis = int(rng.integers(-rank, rank))
    if op != "LayerNormalization":
        if deg and rng.random() < 0.5:
            x = special(rng, shape)
        return Case(op, [("x", x)], {"axis": axis}, opset=13, tol=acc_tol(shape[axis]), deg=deg)
    norm = shape[axis:]
    scale = fl(rng, norm)
    bias = fl(rng, norm) if rng.random() < 0.6 else None
    attrs = {"axis": axis}
    if rng.random() < 0.4:
        attrs["epsilon"] = float(pick(rng, [1e-3, 1e-12, 0.5]))
    outs = ["y"]
    types = [TensorProto.FLOAT]
    if rng.random() < 0.3:
        outs += ["mean", "inv_std"]
        types += [TensorProto.FLOAT, TensorProto.FLOAT]
    k = max(1, int(np.prod(norm)))
    return Case(op, [("x", x), ("scale", scale), ("bias", bias)], attrs, outputs=outs, out_types=types, opset=17,
                tol=acc_tol(k), deg=deg)


# ----------------------------------------------------------------------------------------------
# Concat / Split / Transpose

def gen_shape_ops(rng, deg):
    op = pick(rng, ["Concat", "Split", "Transpose"])
    rank = int(rng.integers(1, 6 if op == "Transpose" else 5))
    shape = _shape(rng, rank, deg, 5)
    dt = data_dtype()
    if op == "Transpose":
        x = as_dtype(fl(rng, shape) if not deg else special(rng, shape), dt)
        attrs = {"perm": ints(rng.permutation(rank))} if rng.random() < 0.8 else {}
        return Case(op, [("x", x)], attrs, out_types=[tproto(dt)], opset=18, tol=EXACT, deg=deg)
    axis = int(rng.integers(-rank, rank))
    if op == "Concat":
        n = int(rng.integers(1, 5))
        ins = []
        for i in range(n):
            s = list(shape)
            s[axis] = int(rng.integers(0 if deg else 1, 4))
            ins.append((f"x{i}", as_dtype(fl(rng, s), dt)))
        return Case(op, ins, {"axis": axis}, out_types=[tproto(dt)], opset=18, tol=EXACT, deg=deg)
    d = shape[axis]
    x = as_dtype(fl(rng, shape), dt)
    if rng.random() < 0.5:
        n = int(rng.integers(1, 4))
        parts = rng.multinomial(d, [1 / n] * n) if d else np.zeros(n, np.int64)
        if not deg and d >= n:
            parts = np.maximum(parts, 0)
        return Case(op, [("x", x), ("split", parts.astype(np.int64))], {"axis": axis}, outputs=n,
                    out_types=[tproto(dt)] * n, opset=18, tol=EXACT, deg=deg)
    n = int(rng.integers(1, 5))
    return Case(op, [("x", x)], {"axis": axis, "num_outputs": n}, outputs=n, out_types=[tproto(dt)] * n, opset=18,
                tol=EXACT, deg=deg)


# ----------------------------------------------------------------------------------------------
# Element-wise broadcasting

def _bshapes(rng, deg, n):
    rank = int(rng.integers(0, 5))
    full = _shape(rng, rank, deg, 5)
    out = []
    for _ in range(n):
        r = int(rng.integers(0, rank + 1))
        s = full[rank - r:]
        s = [1 if rng.random() < 0.3 else d for d in s]
        out.append(s)
    rng.shuffle(out)
    return out


def gen_elementwise(rng, deg):
    op = pick(rng, ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Less",
                    "Greater", "Equal", "PRelu", "Mod", "Add", "Mul"])
    nin = {"Sum": int(rng.integers(1, 4)), "Mean": int(rng.integers(1, 4)), "Max": int(rng.integers(1, 4)),
           "Min": int(rng.integers(1, 4)), "Where": 3}.get(op, 2)
    shapes = _bshapes(rng, deg, nin)
    dtype = np.float32
    if op in ("Add", "Sub", "Mul", "Max", "Min", "Less", "Equal", "Mod") and rng.random() < 0.3:
        dtype = pick(rng, [np.int64, np.int32])
    ins = []
    for i, s in enumerate(shapes):
        if dtype != np.float32:
            a = rng.integers(-20, 20, size=s).astype(dtype)
            if op == "Mod":
                a[a == 0] = 3
        elif op == "Pow" and i == 0:
            a = fl(rng, s, 0.1, 3.0)
        elif op == "Pow":
            a = fl(rng, s, -2, 2)
        elif op == "Where" and i == 0:
            a = rng.random(s) < 0.5
        elif op == "Div" and i == 1:
            a = fl(rng, s, 0.5, 2) * np.where(rng.random(s) < 0.5, -1, 1).astype(np.float32)
        elif op == "Mod":
            a = fl(rng, s, -5, 5) if i == 0 else fl(rng, s, 0.5, 2)
        elif deg and rng.random() < 0.5 and op in ("Add", "Sub", "Max", "Min", "Where", "Less", "Greater", "Equal"):
            a = special(rng, s)
        else:
            a = fl(rng, s, -3, 3)
        ins.append((f"x{i}", np.asarray(a)))
    attrs = {}
    if op == "Mod":
        attrs["fmod"] = 1 if dtype == np.float32 else int(rng.integers(0, 2))
    if op == "PRelu":
        # PRelu's slope broadcasts unidirectionally to X.
        xs = ins[0][1]
        slope_shape = list(xs.shape[len(xs.shape) - int(rng.integers(0, xs.ndim + 1)):])
        slope_shape = [1 if rng.random() < 0.4 else d for d in slope_shape]
        ins[1] = ("x1", fl(rng, slope_shape))
    out_t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if op in ("Less", "Greater", "Equal"):
        out_t = TensorProto.BOOL
    tol = EXACT if op in ("Add", "Sub", "Mul", "Max", "Min", "Where", "Less", "Greater", "Equal", "PRelu") else ELEM
    if op in ("Sum", "Mean") and nin > 2:
        tol = ELEM
    return Case(op, ins, attrs, out_types=[out_t], opset=18, tol=tol, deg=deg)


FAMILIES = {
    "conv": gen_conv,
    "convtranspose": gen_conv_transpose,
    "pool": gen_pool,
    "resize": gen_resize,
    "gather": gen_gather,
    "slice": gen_slice,
    "pad": gen_pad,
    "reduce": gen_reduce,
    "matmul": gen_matmul,
    "rnn": gen_rnn,
    "attention": gen_attention,
    "norm": gen_norm,
    "shape": gen_shape_ops,
    "elementwise": gen_elementwise,
}

# Messages of ORT failures on models that are valid ONNX but that ORT's CPU EP does not implement.
ORT_UNSUPPORTED = [
    "NOT_IMPLEMENTED",
    "not supported",  # e.g. Conv dilations with SAME_* auto_pad
    "Not implemented",
    "only support",
    "are not supported",  # RNN/GRU/LSTM layout=1 ("Batchwise recurrent operations ... are not supported")
    # Pad reflect/edge/wrap on an input with a zero-sized axis: ORT refuses the whole tensor even when
    # that axis is not padded; the spec leaves it undefined, an empty result is as good as an error.
    "zero effective input extent",
    "Unexpected mode of 3",
    # Pad reflect with pads >= the axis length (or on a length-1 axis): ORT refuses; numpy's (and the
    # ONNX reference's) reflect keeps reflecting, which is what Kiln does.
    "exceeds maximum allowed",
    "Pad reflect requires axis length >= 2",
    # MaxPool/AveragePool SAME_* where the formula's total padding is negative (kernel smaller than
    # the stride leaves input unread): ORT refuses; the output size ceil(in/stride) is well defined.
    "padding values must be non-negative",
    # LayerNormalization over an empty normalized shape: the output is empty; ORT refuses the model.
    "Size of X.shape[axis:] must be at least 1, got 0",
]


INT_MAXES = (np.iinfo(np.int32).max, np.iinfo(np.int64).max)


def nearest_near_tie(case: Case) -> bool:
    """Resize nearest: an output whose source neighbour differs when its coordinate is computed in
    float32 (as ORT does) and in float64 (as the reference and Kiln do): a near-tie."""
    at = case.attrs
    if at.get("mode", "nearest") != "nearest":
        return False
    ins = {n: a for n, a in case.inputs}
    x = ins["x"]
    ctm = at.get("coordinate_transformation_mode", "half_pixel")
    nm = at.get("nearest_mode", "round_prefer_floor")
    if ins.get("scales") is not None:
        scales = [float(f) for f in ins["scales"]]
    else:
        sizes = [int(o) for o in ins["sizes"]]
        scales = [o / d for o, d in zip(sizes, x.shape)]
        if at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            f = (min if at["keep_aspect_ratio_policy"] == "not_larger" else max)(scales)
            scales = [f] * x.ndim
    for a, (d, sc) in enumerate(zip(x.shape, scales)):
        if sc == 1.0 or d == 0:
            continue
        ow = sc * d
        out = int(math.floor(ow + 1e-9)) if ins.get("scales") is not None else int(round(ow))
        for y in range(out):
            picks = []
            # float64; float32 dividing by the scale; float32 multiplying by its reciprocal
            for t, recip in ((np.float64, False), (np.float32, False), (np.float32, True)):
                one, half, yy, dd, sct = t(1), t(0.5), t(y), t(d), t(sc)
                oww, outt = t(ow), t(out)
                inv = one / sct

                def over(v):
                    return v * inv if recip else v / sct  # noqa: B023 - evaluated in this iteration

                if ctm == "half_pixel":
                    xo = over(yy + half) - half
                elif ctm == "half_pixel_symmetric":
                    xo = dd / t(2) * (one - outt / oww) + over(yy + half) - half
                elif ctm == "pytorch_half_pixel":
                    xo = over(yy + half) - half if ow > 1 else -half
                elif ctm == "asymmetric":
                    xo = over(yy)
                elif ctm == "align_corners":
                    xo = t(0) if ow == 1 else yy * (dd - one) / (oww - one)
                else:
                    xo = t(0)
                xo = float(xo)
                if nm == "floor":
                    picks.append(math.floor(xo))
                elif nm == "ceil":
                    picks.append(math.ceil(xo))
                else:
                    frac = xo - math.floor(xo)
                    picks.append((math.floor(xo), frac > 0.5 or (frac == 0.5 and nm == "round_prefer_ceil")))
            if picks[0] != picks[1] or picks[0] != picks[2]:
                return True
            if ctm == "half_pixel_symmetric":
                # ORT computes this mode's offset from a float32 adjustment (out / (in * scale)) and
                # lands below an exact tie the float64 formula hits (e.g. scale 0.6 on 5, floor).
                xo64 = d / 2 * (1 - out / ow) + (y + 0.5) / sc - 0.5
                edge = 0.0 if nm in ("floor", "ceil") else 0.5
                frac = xo64 - math.floor(xo64)
                if min(abs(frac - edge), abs(frac - edge - 1), abs(frac - edge + 1)) < 1e-5:
                    return True
    return False


def excluded_reason(family: str, case: Case) -> str | None:
    """Cases where ORT is wrong or the spec is ambiguous; skipped with this reason."""
    ins = {n: a for n, a in case.inputs}
    at = case.attrs
    if case.op == "Slice" and ins.get("steps") is not None:
        for e, st in zip(ins["ends"].tolist(), ins["steps"].tolist()):
            if st < 0 and e in INT_MAXES:
                return ("Slice: ORT reads an end of INT_MAX with a negative step as 'to the beginning'; the spec "
                        "and the ONNX reference clamp it to dim-1 (an empty slice)")
    if case.op in ("AveragePool", "MaxPool", "LpPool") and at.get("auto_pad", "NOTSET").startswith("SAME") \
            and any(d != 1 for d in at.get("dilations", [])):
        return ("pool SAME_* with dilations: ORT sizes the padding without the dilation (output smaller than "
                "ceil(in/stride), even empty); the spec says ceil(in/stride)")
    if case.op == "Resize":
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        x = ins["x"]
        if ins.get("scales") is not None:
            sc = [float(f) for f in ins["scales"]]
        elif at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            ratios = [int(o) / d for o, d in zip(ins["sizes"], x.shape)]
            one = min(ratios) if at["keep_aspect_ratio_policy"] == "not_larger" else max(ratios)
            sc = [one] * x.ndim
        else:
            sc = [int(o) / d for o, d in zip(ins["sizes"], x.shape)]
        frac = any(abs(d * f - round(d * f)) > 1e-6 for d, f in zip(x.shape, sc))
        if ctm in ("align_corners", "pytorch_half_pixel", "tf_crop_and_resize") and frac:
            return ("Resize align_corners/pytorch_half_pixel/tf_crop_and_resize with a fractional in*scale: ORT "
                    "uses the integer output length, the ONNX reference and node tests (e.g. "
                    "resize_downsample_scales_linear_align_corners, which ORT fails) use in*scale")
    if case.op == "Resize" and nearest_near_tie(case):
        return ("Resize nearest with a source coordinate at a rounding boundary up to float error: float32 "
                "coordinate arithmetic (ORT) and float64 (the ONNX reference, Kiln) pick different neighbours")
    if case.op == "Resize" and at.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        x, roi = ins["x"], ins["roi"]
        r = x.ndim
        if ins.get("sizes") is not None:
            same = [int(o) == d for o, d in zip(ins["sizes"], x.shape)]
            if at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
                same = [True] * r  # the policy may bring any axis back to scale 1
        else:
            same = [float(f) == 1.0 for f in ins["scales"]]
        if any(same[a] and (roi[a] != 0.0 or roi[r + a] != 1.0) for a in range(r)):
            return ("Resize tf_crop_and_resize with scale 1 on a cropped axis: ORT copies that axis (ignores "
                    "the roi); the ONNX reference crops it")
    if case.op == "Resize" and at.get("coordinate_transformation_mode") == "pytorch_half_pixel":
        x = ins["x"]
        outs = ins["sizes"] if ins.get("sizes") is not None else [
            math.floor(d * float(f)) for d, f in zip(x.shape, ins["scales"])]
        if any(int(o) == 1 and d != 1 for o, d in zip(outs, x.shape)):
            return ("Resize pytorch_half_pixel to length 1: the spec text maps it to 0, the ONNX reference to -0.5 "
                    "(Kiln follows the reference)")
    if case.op in REDUCE_OPS and case.op == "ReduceMean":
        x = ins["x"]
        axes = ins.get("axes")
        noop = at.get("noop_with_empty_axes", 0) and (axes is None or len(axes) == 0)
        red = list(range(x.ndim)) if axes is None or len(axes) == 0 else [int(a) % x.ndim for a in axes]
        if not noop and any(x.shape[a] == 0 for a in red) or (not noop and x.size == 0 and not red):
            return "ReduceMean over an empty set: the spec says undefined (ORT gives 0, Kiln NaN)"
    if case.op == "Attention" and at.get("is_causal") and ins.get("past_key") is not None:
        q, k = ins["q"], ins["k"]
        sq, skv = (q.shape[1], k.shape[1]) if q.ndim == 3 else (q.shape[2], k.shape[2])
        if sq != skv:
            return ("Attention is_causal with a past cache and new K/V longer or shorter than Q: ORT aligns the "
                    "causal mask bottom-right (offset total_kv - q_len), the ONNX reference offsets it by the past "
                    "length (Kiln follows the reference)")
    return None


def draw(family: str, seed: int, i: int) -> Case:
    global _DT_RNG, _BIG
    _BIG = i % 7 == 3
    fam_id = zlib.crc32(family.encode())
    rng = np.random.default_rng([seed, fam_id, i])
    _DT_RNG = np.random.default_rng([seed, fam_id, i, 1])
    deg = i % 3 == 2
    return FAMILIES[family](rng, deg)


def ort_run(model_bytes, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def classify(model, msg: str) -> str:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        if all(o.type.tensor_type.HasField("shape") for o in inferred.graph.output):
            onnx.checker.check_model(inferred)
        else:
            for node in model.graph.node:
                onnx.checker.check_node(node)
    except Exception:  # noqa: BLE001 - any checker or inference failure means an invalid model
        return "invalid"
    if any(s in msg for s in ORT_UNSUPPORTED):
        return "ort-unsupported"
    return "invalid"


def write_case(outdir, name, case: Case, model, outputs, family):
    d = os.path.join(outdir, name)
    os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
    with open(os.path.join(d, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    present = [(n, a) for n, a in case.inputs if a is not None]
    for k, (n, a) in enumerate(present):
        with open(os.path.join(d, "test_data_set_0", f"input_{k}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(a, n).SerializeToString())
    outs = [o for o in case.outputs if o]
    if outputs is not None:
        for k, (n, a) in enumerate(zip(outs, outputs)):
            with open(os.path.join(d, "test_data_set_0", f"output_{k}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(np.asarray(a), n).SerializeToString())
    meta = {
        "rtol": case.tol[0],
        "atol": case.tol[1],
        "inputs": [{"name": n, "kind": "tensor"} for n, _ in present],
        "outputs": [{"name": n, "kind": "tensor"} for n in outs],
        "family": family,
        "op": case.op,
    }
    with open(os.path.join(d, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def report(outdir: str) -> int:
    """Per-family table from manifest.tsv and kiln_results.tsv (written by kiln-conformance --results)."""
    fam_of = {}
    table: dict[str, dict[str, int]] = {}
    cols = ["cases", "ort-ok", "kiln-pass", "mismatch", "kiln-error", "panic", "ort-error",
            "clean-error", "accepted", "bad", "excluded"]
    with open(os.path.join(outdir, "manifest.tsv"), encoding="utf-8") as f:
        for line in f:
            name, fam, _op, state = line.rstrip("\n").split("\t")
            fam_of[name] = fam
            row = table.setdefault(fam, dict.fromkeys(cols, 0))
            row["cases"] += 1
            row[{"ok": "ort-ok", "ort-error": "ort-error", "excluded": "excluded"}[state]] += 1
    path = os.path.join(outdir, "kiln_results.tsv")
    failures = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                name, tag = parts[0], parts[1]
                row = table[fam_of[name]]
                if tag.startswith("expect-error:"):
                    outcome, ok = tag.split(":", 1)[1], parts[2]
                    if ok == "bad":
                        row["bad"] += 1
                        failures.append(line.rstrip())
                    if outcome in ("error", "unsupported"):
                        row["clean-error"] += 1
                    elif outcome == "fail":
                        row["accepted"] += 1
                    elif outcome == "panic":
                        row["panic"] += 1
                    continue
                key = {"pass": "kiln-pass", "fail": "mismatch", "error": "kiln-error",
                       "unsupported": "kiln-error", "panic": "panic"}[tag]
                row[key] += 1
                if tag != "pass":
                    failures.append(line.rstrip())
    print("| family | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    tot = dict.fromkeys(cols, 0)
    for fam in sorted(table):
        print(f"| {fam} | " + " | ".join(str(table[fam][c]) for c in cols) + " |")
        for c in cols:
            tot[c] += table[fam][c]
    print("| total | " + " | ".join(str(tot[c]) for c in cols) + " |")
    for line in failures:
        print("FAILED " + line[:400])
    return 0


def write_self_test(outdir: str) -> None:
    """Two cases whose Kiln kernel panics (ai.kiln.testing::Fault with its trigger value; needs
    KILN_FAULT_INJECTION=1): one with an expected output, one listed in ort_errors.tsv. Both must
    come out of kiln-conformance as `panic` failures, with the runner carrying on to the end."""
    os.makedirs(outdir)
    x = np.array([1.0, 13.0], np.float32)
    rows = []
    for name, listed in (("selftest_panic_compare", False), ("selftest_panic_expect_error", True)):
        node = helper.make_node("Fault", ["x"], ["y"], domain="ai.kiln.testing")
        graph = helper.make_graph([node], "fault", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                        helper.make_opsetid("ai.kiln.testing", 1)])
        model.ir_version = 8
        case = Case("Fault", [("x", x)], outputs=["y"], tol=EXACT)
        write_case(outdir, name, case, model, None if listed else [x], "selftest")
        if listed:
            rows.append((name, "invalid", "self-test"))
    with open(os.path.join(outdir, "ort_errors.tsv"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write("\t".join(row) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("outdir")
    ap.add_argument("--report", action="store_true",
                    help="print the per-family table of an OUTDIR kiln-conformance has run over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=20, help="cases per family")
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    ap.add_argument("--self-test", action="store_true",
                    help="write only the two panicking fault-injection cases (see write_self_test)")
    args = ap.parse_args()
    if args.self_test:
        write_self_test(os.path.abspath(args.outdir))
        return 0
    if args.report:
        return report(os.path.abspath(args.outdir))
    fams = args.family or list(FAMILIES)
    for f in fams:
        if f not in FAMILIES:
            print(f"unknown family {f}; known: {' '.join(FAMILIES)}", file=sys.stderr)
            return 2
    outdir = os.path.abspath(args.outdir)
    marker = os.path.join(outdir, ".op_fuzz")
    if os.path.isdir(outdir):
        if not os.path.exists(marker) and os.listdir(outdir):
            print(f"error: {outdir} exists and was not written by op_fuzz.py", file=sys.stderr)
            return 2
        shutil.rmtree(outdir)
    os.makedirs(outdir)
    open(marker, "w", encoding="utf-8").close()
    jobs = [(f, args.seed, i, f"{f}_{args.seed}_{i:04d}") for f in fams for i in range(args.cases)]
    manifest, errors, excluded = [], [], []
    counts: dict[str, list[int]] = {}
    for family, seed, i, name in jobs:
        c = counts.setdefault(family, [0, 0, 0])
        try:
            case = draw(family, seed, i)
        except ValueError as e:  # a draw that numpy cannot build (should not happen)
            print(f"{name}: draw failed: {e}", file=sys.stderr)
            raise
        name = f"{name}_{case.op}"
        why = excluded_reason(family, case)
        if why:
            excluded.append((name, why))
            manifest.append((name, family, case.op, "excluded"))
            continue
        model = case.model()
        feeds = {n: a for n, a in case.inputs if a is not None}
        try:
            outs = ort_run(model.SerializeToString(), feeds)
        except Exception as e:  # noqa: BLE001 - ORT raises several exception types
            msg = " ".join(str(e).split())[:400]
            kind = case.error_kind or classify(model, msg)
            write_case(outdir, name, case, model, None, family)
            errors.append((name, kind, msg))
            manifest.append((name, family, case.op, "ort-error"))
            c[1] += 1
            continue
        if case.op in ("Conv", "ConvTranspose") and not all(np.isfinite(o).all() for o in outs):
            # f32-max inputs overflow the sums; whether an output is +-inf or NaN (inf - inf) depends
            # on the summation order, which the spec does not fix.
            excluded.append((name, "Conv/ConvTranspose sums that overflow: inf or NaN depends on the summation order"))
            manifest.append((name, family, case.op, "excluded"))
            continue
        write_case(outdir, name, case, model, outs, family)
        manifest.append((name, family, case.op, "ok"))
        c[0] += 1
    with open(os.path.join(outdir, "manifest.tsv"), "w", encoding="utf-8") as f:
        for row in manifest:
            f.write("\t".join(row) + "\n")
    with open(os.path.join(outdir, "ort_errors.tsv"), "w", encoding="utf-8") as f:
        for row in errors:
            f.write("\t".join(row) + "\n")
    with open(os.path.join(outdir, "excluded.tsv"), "w", encoding="utf-8") as f:
        for row in excluded:
            f.write("\t".join(row) + "\n")
    for fam in fams:
        ok, err, _ = counts.get(fam, [0, 0, 0])
        print(f"op_fuzz: {fam:<14} {ok:>5} cases with an ORT reference, {err:>4} ORT errors")
    print(f"op_fuzz: {len(jobs)} cases, {len(errors)} ORT errors, {len(excluded)} excluded -> {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

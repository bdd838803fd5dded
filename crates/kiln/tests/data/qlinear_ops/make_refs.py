#!/usr/bin/env python3
"""One-node models of ONNX Runtime's QOperator 8-bit operators (com.microsoft QLinearAdd, QLinearMul,
QLinearSigmoid, QLinearSoftmax, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat,
QGemm), ONNX
QLinearConv with constant filters, and onnxruntime's outputs for them, for crates/kiln/tests/qlinear_ops.rs.

    make_refs.py [OUT_DIR]          (default: this file's directory)

Writes OUT_DIR/models/<case>.onnx (scales and zero points are initializers, as ONNX Runtime's
quantizer writes them) and OUT_DIR/refs.json:
    {"onnxruntime": version, "cases": [{"name", "model", "inputs": [{"name", "dtype", "dims",
     "values"}], "outputs": [{"name", "dtype", "dims", "values"}]}]}
Inputs are random (numpy default_rng(0)), uint8 and int8.

Needs numpy, onnx and onnxruntime (the pinned venv: onnx 1.23, onnxruntime 1.32).
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
MS = "com.microsoft"
NP2ONNX = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8, np.float32: TensorProto.FLOAT,
           np.int32: TensorProto.INT32}
cases = []


def qrand(shape, dt):
    lo, hi = (0, 256) if dt == np.uint8 else (-128, 128)
    return rng.integers(lo, hi, size=shape).astype(dt)


def zp(dt, v):
    return np.array(v, dtype=dt)


def add_case(name, op, attrs, inputs, consts, out_dtype, domain=MS):
    """inputs: ordered (name, array or None); names in consts become initializers."""
    node_inputs, graph_inputs, inits, feeds = [], [], [], {}
    for nm, arr in inputs:
        if arr is None:
            node_inputs.append("")
            continue
        node_inputs.append(nm)
        if nm in consts:
            inits.append(numpy_helper.from_array(arr, nm))
        else:
            graph_inputs.append(helper.make_tensor_value_info(nm, NP2ONNX[arr.dtype.type], list(arr.shape)))
            feeds[nm] = arr
    node = helper.make_node(op, node_inputs, ["y"], name=f"{name}_node", domain=domain, **attrs)
    out = helper.make_tensor_value_info("y", NP2ONNX[out_dtype], None)
    graph = helper.make_graph([node], name, graph_inputs, [out], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8, producer_name="make_refs.py")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feeds)
    os.makedirs(os.path.join(OUT, "models"), exist_ok=True)
    onnx.save(model, os.path.join(OUT, "models", f"{name}.onnx"))
    case = {"name": name, "model": f"models/{name}.onnx", "inputs": [], "outputs": []}
    for nm, arr in feeds.items():
        case["inputs"].append({"name": nm, "dtype": np.dtype(arr.dtype).name, "dims": list(arr.shape),
                               "values": [int(v) for v in arr.reshape(-1)]})
    vals = [int(v) for v in got.reshape(-1)] if got.dtype.kind in "iu" else [float(f"{v:.8g}") for v in got.reshape(-1)]
    case["outputs"].append({"name": "y", "dtype": np.dtype(got.dtype).name, "dims": list(got.shape), "values": vals})
    cases.append(case)
    print(f"ok   {name}")


def scale(v):
    return np.array(v, dtype=np.float32)


for dt, tag in [(np.uint8, "u8"), (np.int8, "s8")]:
    z = (128, 120, 131, 125) if dt == np.uint8 else (0, -5, 3, -2)
    for op in ["QLinearAdd", "QLinearMul"]:
        for sa, sb in [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 16, 7, 7), (16, 1, 1))]:
            name = f"{op[7:].lower()}_{tag}_{'x'.join(map(str, sb))}"
            sc = scale(0.05) if op == "QLinearMul" else scale(0.03)
            add_case(name, op, {}, [("a", qrand(sa, dt)), ("a_s", scale(0.021)), ("a_z", zp(dt, z[0])),
                                    ("b", qrand(sb, dt)), ("b_s", scale(0.017)), ("b_z", zp(dt, z[1])),
                                    ("c_s", sc), ("c_z", zp(dt, z[2]))],
                     {"a_s", "a_z", "b_s", "b_z", "c_s", "c_z"}, dt)
    x = qrand((2, 8, 5, 6), dt)
    unary_ins = [("x", x), ("x_s", scale(0.04)), ("x_z", zp(dt, z[0])), ("y_s", scale(1 / 255)), ("y_z", zp(dt, z[3] if dt == np.int8 else 0))]
    add_case(f"sigmoid_{tag}", "QLinearSigmoid", {}, unary_ins, {"x_s", "x_z", "y_s", "y_z"}, dt)
    leaky_ins = [("x", x), ("x_s", scale(0.04)), ("x_z", zp(dt, z[0])), ("y_s", scale(0.03)), ("y_z", zp(dt, z[2]))]
    add_case(f"leaky_relu_{tag}", "QLinearLeakyRelu", {"alpha": 0.1}, leaky_ins, {"x_s", "x_z", "y_s", "y_z"}, dt)
    pool_ins = lambda arr: [("x", arr), ("x_s", scale(0.04)), ("x_z", zp(dt, z[0])), ("y_s", scale(0.013)), ("y_z", zp(dt, z[2]))]
    consts = {"x_s", "x_z", "y_s", "y_z"}
    add_case(f"global_average_pool_{tag}", "QLinearGlobalAveragePool", {"channels_last": 0},
             pool_ins(qrand((2, 16, 7, 7), dt)), consts, dt)
    add_case(f"global_average_pool_nhwc_{tag}", "QLinearGlobalAveragePool", {"channels_last": 1},
             pool_ins(qrand((2, 7, 7, 16), dt)), consts, dt)
    add_case(f"average_pool_{tag}", "QLinearAveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
             pool_ins(qrand((1, 4, 9, 10), dt)), consts, dt)
    add_case(f"average_pool_include_pad_ceil_{tag}", "QLinearAveragePool",
             {"kernel_shape": [2, 2], "strides": [2, 2], "count_include_pad": 1, "ceil_mode": 1, "pads": [0, 0, 1, 1]},
             pool_ins(qrand((1, 3, 7, 7), dt)), consts, dt)
    add_case(f"concat_{tag}", "QLinearConcat", {"axis": 1},
             [("y_s", scale(0.05)), ("y_z", zp(dt, z[2])),
              ("x0", qrand((2, 3, 4), dt)), ("x0_s", scale(0.05)), ("x0_z", zp(dt, z[2])),
              ("x1", qrand((2, 5, 4), dt)), ("x1_s", scale(0.02)), ("x1_z", zp(dt, z[0])),
              ("x2", qrand((2, 1, 4), dt)), ("x2_s", scale(0.11)), ("x2_z", zp(dt, z[1]))],
             {"y_s", "y_z", "x0_s", "x0_z", "x1_s", "x1_z", "x2_s", "x2_z"}, dt)

# QGemm as the quantizer writes it for Gemm (uint8 activations, int8 weights, transB, int32 bias), per-tensor
# and per-column weight scales, quantized and float outputs, alpha.
for name, per_col, quant_out, alpha, ta in [("qgemm_u8s8_q", False, True, 1.0, 0), ("qgemm_u8s8_percol_q", True, True, 1.0, 0),
                                            ("qgemm_u8s8_float", False, False, 1.0, 0), ("qgemm_u8s8_alpha_transa_q", True, True, 0.5, 1)]:
    m, k, nn = 3, 40, 12
    a = qrand((k, m) if ta else (m, k), np.uint8)
    b = qrand((nn, k), np.int8)
    b_s = (rng.uniform(0.002, 0.01, size=nn) if per_col else np.array(0.006)).astype(np.float32)
    b_z = np.zeros(nn if per_col else (), np.int8)
    c = rng.integers(-2000, 2000, size=nn).astype(np.int32)
    ins = [("a", a), ("a_s", scale(0.02)), ("a_z", zp(np.uint8, 121)), ("b", b), ("b_s", b_s), ("b_z", b_z), ("c", c)]
    if quant_out:
        ins += [("y_s", scale(0.15)), ("y_z", zp(np.uint8, 118))]
    add_case(name, "QGemm", {"transB": 1, "transA": ta, "alpha": alpha}, ins,
             {"a_s", "a_z", "b", "b_s", "b_z", "c", "y_s", "y_z"}, np.uint8 if quant_out else np.float32)

# QLinearConv with a constant filter (Kiln's packed integer path; group > 1 takes the reference path): uint8
# and int8 inputs, per-tensor and per-channel filter scales, pads, strides, dilations, bias.
for name, xdt, per_ch, attrs, group, xshape, kshape in [
    ("qconv_u8_3x3_pad", np.uint8, False, {"pads": [1, 1, 1, 1]}, 1, (1, 5, 9, 8), (7, 5, 3, 3)),
    ("qconv_u8_percol_stride2", np.uint8, True, {"pads": [1, 0, 2, 1], "strides": [2, 2]}, 1, (2, 4, 11, 10), (6, 4, 3, 3)),
    ("qconv_u8_1x1", np.uint8, True, {}, 1, (1, 16, 6, 6), (24, 16, 1, 1)),
    ("qconv_s8_dilated", np.int8, False, {"pads": [2, 2, 2, 2], "dilations": [2, 2]}, 1, (1, 3, 8, 9), (4, 3, 3, 3)),
    ("qconv_u8_depthwise", np.uint8, True, {"pads": [1, 1, 1, 1]}, 6, (1, 6, 7, 7), (6, 1, 3, 3)),
    ("qconv_u8_7x7_stride2", np.uint8, False, {"pads": [3, 3, 3, 3], "strides": [2, 2]}, 1, (1, 3, 20, 20), (16, 3, 7, 7)),
    ("qconv_u8_deep", np.uint8, False, {"pads": [1, 1, 1, 1]}, 1, (1, 256, 5, 5), (8, 256, 3, 3)),
    ("qconv_u8_large", np.uint8, False, {"pads": [1, 1, 1, 1]}, 1, (1, 32, 24, 24), (40, 32, 3, 3)),
]:
    m = kshape[0]
    x = qrand(xshape, xdt)
    w = qrand(kshape, np.int8)
    w_s = (rng.uniform(0.002, 0.01, size=m) if per_ch else np.array(0.005)).astype(np.float32)
    w_z = np.zeros(m if per_ch else (), np.int8)
    bias = rng.integers(-3000, 3000, size=m).astype(np.int32)
    xz = zp(xdt, 125 if xdt == np.uint8 else -3)
    yz = zp(xdt, 120 if xdt == np.uint8 else 2)
    ins = [("x", x), ("x_s", scale(0.02)), ("x_z", xz), ("w", w), ("w_s", w_s), ("w_z", w_z), ("y_s", scale(0.09)),
           ("y_z", yz), ("bias", bias)]
    add_case(name, "QLinearConv", dict(attrs, group=group), ins,
             {"x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z", "bias"}, xdt, domain="")

# Later additions draw from their own generator, so the cases above keep their inputs.
rng = np.random.default_rng(1)
# QLinearConv depthwise with 16 channels (Kiln's channels-last depthwise path) at stride 2.
m = 16
x, w = qrand((1, m, 9, 9), np.uint8), qrand((m, 1, 3, 3), np.int8)
ins = [("x", x), ("x_s", scale(0.02)), ("x_z", zp(np.uint8, 125)), ("w", w),
       ("w_s", rng.uniform(0.002, 0.01, size=m).astype(np.float32)), ("w_z", np.zeros(m, np.int8)),
       ("y_s", scale(0.03)), ("y_z", zp(np.uint8, 120)), ("bias", rng.integers(-3000, 3000, size=m).astype(np.int32))]
add_case("qconv_u8_depthwise16_stride2", "QLinearConv", {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": m}, ins,
         {"x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z", "bias"}, np.uint8, domain="")
# QLinearSoftmax as the quantizer writes it for attention scores (opset 13 semantics: the last axis) and
# with opset 12's flattening of the axes from `axis` on; output scale 1/256 as onnxruntime requires.
for dt, tag in [(np.uint8, "u8"), (np.int8, "s8")]:
    yz = zp(dt, 0 if dt == np.uint8 else -128)
    for name, attrs, shape in [(f"softmax_{tag}", {"axis": -1, "opset": 13}, (2, 3, 5, 16)),
                               (f"softmax_opset12_{tag}", {"axis": 1, "opset": 12}, (2, 3, 8))]:
        add_case(name, "QLinearSoftmax", attrs,
                 [("x", qrand(shape, dt)), ("x_s", scale(0.08)), ("x_z", zp(dt, 131 if dt == np.uint8 else 3)),
                  ("y_s", scale(1 / 256)), ("y_z", yz)], {"x_s", "x_z", "y_s", "y_z"}, dt)

with open(os.path.join(OUT, "refs.json"), "w") as f:
    json.dump({"onnxruntime": ort.__version__, "cases": cases}, f, separators=(",", ":"))
print(f"{len(cases)} cases")

"""Builds a MobileNetV2-shaped classifier (torchvision's layer plan: width 1.0, inverted residual blocks,
ReLU6 as Clip(0, 6), BatchNorm folded into the conv biases as exported models have it) with the onnx
helper API and random He-scaled weights (fixed seed), for benchmarks of the mobile-CNN class:

    python models/make_mobilenetv2.py OUT_DIR      # writes mobilenetv2.onnx and mobilenetv2_input.npy

Input `input` [N, 3, 224, 224] (N dynamic), output `logits` [N, 1000]. onnxruntime runs the model once
as a check (the logits' standard deviation is printed: far from 0, so the weights give a spread).
"""
import os
import sys

import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
rng = np.random.default_rng(0)
nodes, inits = [], []
cnt = [0]
def name(p): cnt[0] += 1; return f"{p}{cnt[0]}"
def const(arr):
    n = name("w"); inits.append(numpy_helper.from_array(arr.astype(np.float32), n)); return n
def conv(x, cin, cout, k, s, g=1, act=True):
    w = rng.standard_normal((cout, cin // g, k, k)) * np.sqrt(2.0 / (cin // g * k * k))
    b = rng.standard_normal(cout) * 0.05
    y = name("c")
    nodes.append(helper.make_node("Conv", [x, const(w), const(b)], [y], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=g))
    if act:
        z = name("r"); nodes.append(helper.make_node("Clip", [y, const(np.array(0.0)), const(np.array(6.0))], [z])); y = z
    return y
x = "input"
h = conv(x, 3, 32, 3, 2)
cin = 32
cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
for t, c, n, s in cfg:
    for i in range(n):
        st = s if i == 0 else 1
        hid = cin * t
        y = h
        if t != 1: y = conv(y, cin, hid, 1, 1)
        y = conv(y, hid, hid, 3, st, g=hid)
        y = conv(y, hid, c, 1, 1, act=False)
        if st == 1 and cin == c:
            z = name("add"); nodes.append(helper.make_node("Add", [h, y], [z])); y = z
        h = y; cin = c
h = conv(h, cin, 1280, 1, 1)
p = name("gap"); nodes.append(helper.make_node("GlobalAveragePool", [h], [p]))
f = name("fl"); nodes.append(helper.make_node("Flatten", [p], [f]))
w = rng.standard_normal((1000, 1280)) * 0.03
nodes.append(helper.make_node("Gemm", [f, const(w), const(np.zeros(1000))], ["logits"], transB=1))
g = helper.make_graph(nodes, "mbv2", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
onnx.checker.check_model(m)
out = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(out, exist_ok=True)
onnx.save(m, os.path.join(out, "mobilenetv2.onnx"))
np.save(os.path.join(out, "mobilenetv2_input.npy"), rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
import onnxruntime as ort
o = ort.InferenceSession(os.path.join(out, "mobilenetv2.onnx")).run(None, {"input": np.load(os.path.join(out, "mobilenetv2_input.npy"))})[0]
print(f"make_mobilenetv2.py: {out}/mobilenetv2.onnx, logits {list(o.shape)}, std {o.std():.3f}")

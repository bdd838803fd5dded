#!/usr/bin/env python3
"""Writes a small opset-17 model with a Gemm (transB, bias), a MatMul on a 3-D activation and a
weight shared by two MatMuls, for tests/quantize/run.sh. usage: make_gemm.py OUT.onnx"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(1)
w_gemm = rng.standard_normal((96, 128)).astype(np.float32) * 0.1  # [N, K] with transB
bias = rng.standard_normal(96).astype(np.float32)
w_mm = rng.standard_normal((96, 80)).astype(np.float32) * 0.1
nodes = [
    helper.make_node("Gemm", ["x", "w_gemm", "bias"], ["h"], transB=1, alpha=0.5),
    helper.make_node("Relu", ["h"], ["hr"]),
    helper.make_node("MatMul", ["hr", "w_mm"], ["y1"]),
    helper.make_node("Reshape", ["hr", "shape3"], ["h3"]),
    helper.make_node("MatMul", ["h3", "w_mm"], ["y2"]),
]
graph = helper.make_graph(
    nodes,
    "gemm_matmul",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
    [
        helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", 80]),
        helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, None, 80]),
    ],
    [
        numpy_helper.from_array(w_gemm, "w_gemm"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(w_mm, "w_mm"),
        numpy_helper.from_array(np.array([2, -1, 96], dtype=np.int64), "shape3"),
    ],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])

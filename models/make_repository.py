"""Builds the tiny models of the example model repository served by `kiln serve`
(models/repository/<model>/<version>/model.onnx) and checks each with onnxruntime.

    $(scripts/setup-python.sh | tail -1)/bin/python models/make_repository.py

- mlp: a 4 -> 16 -> 3 classifier (MatMul, Add, Relu, Softmax) with a dynamic batch dim;
  outputs `logits` and `probabilities`. Its config.toml turns dynamic batching on.
- simple: Triton's classic example model: two INT32 [1, 16] inputs, OUTPUT0 = INPUT0 + INPUT1,
  OUTPUT1 = INPUT0 - INPUT1; no batching.

The weights come from a fixed seed, so re-running the script rewrites identical files.
The config.toml files are written by hand and left alone.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "repository")
OPSET = [helper.make_opsetid("", 17)]


def save(model: onnx.ModelProto, name: str, version: int) -> str:
    onnx.checker.check_model(model, full_check=True)
    d = os.path.join(REPO, name, str(version))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    onnx.save(model, path)
    return path


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((4, 16)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((16, 3)) * 0.5).astype(np.float32)
    b2 = (rng.standard_normal(3) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    return helper.make_model(graph, opset_imports=OPSET, producer_name="kiln-make-repository")


def simple() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
    ]
    graph = helper.make_graph(
        nodes,
        "simple",
        [helper.make_tensor_value_info(n, TensorProto.INT32, [1, 16]) for n in ["INPUT0", "INPUT1"]],
        [helper.make_tensor_value_info(n, TensorProto.INT32, [1, 16]) for n in ["OUTPUT0", "OUTPUT1"]],
    )
    return helper.make_model(graph, opset_imports=OPSET, producer_name="kiln-make-repository")


def main() -> None:
    path = save(mlp(), "mlp", 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    logits, probs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert logits.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    print(f"mlp: {os.path.getsize(path)} bytes, probabilities[0] = {probs[0]}")

    path = save(simple(), "simple", 1)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    out0, out1 = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"INPUT0": a, "INPUT1": b}
    )
    assert (out0 == a + b).all() and (out1 == a - b).all()
    print(f"simple: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()

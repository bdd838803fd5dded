"""Builds the two small real-architecture models in models/light/ from the ResNet-50 and SqueezeNet
graphs that ship in the `onnx` wheel (opset 9), with synthetic weights that give a spread in the
outputs, and computes their expected outputs with onnxruntime.

The wheel's graphs make every weight with `ConstantOfShape(value=0.02)`, so all output channels are
equal and the softmax output is exactly uniform (0.001 everywhere): a golden test on it only checks
shapes. Here each of those nodes becomes a small opset-9 generator,

    Tile(base * scale [+ shift], [r]) -> Slice(starts=[k], ends=[k + n]) -> Reshape(shape)

over one shared `kiln_light_base` initializer of P values drawn uniformly from [-1, 1] (fixed seed),
scaled on those P values (one Mul [+ Add] per distinct scale), each tensor starting at its own
offset k. The files stay small (115 KB and 26 KB; the full weights would be ~100 MB for ResNet-50)
and the weights differ between channels. Scales: conv / Gemm weights He-style (sqrt(6 / fan_in), times
0.7 for ResNet-50), BatchNorm scale 1 +- 0.2 (0.2 +- 0.04 on each residual branch's last BatchNorm, so
the residual sum stays bounded), BatchNorm mean +-0.1, variance 1 +- 0.3, biases +-0.1; the classifier
weights are rescaled so the logits have a standard deviation of 2 and the softmax is far from uniform
without being one-hot (std/mean of the probabilities: 14 for ResNet-50, 5.1 for SqueezeNet).

Input: what ONNX's own test runner fed these models (arange(n) / n as float32, 1x3x224x224).
Expected outputs: onnxruntime 1.32 (CPU, all graph optimizations), checked against onnxruntime with
graph optimizations disabled. Run with the venv from scripts/setup-python.sh:

    $(bash scripts/setup-python.sh | tail -1)/bin/python models/make_light.py
"""
import os

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnx import helper

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "light")
SRC = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
BASE = "kiln_light_base"
P = 1021  # prime, so a tensor's period never lines up with its rows
SEED = 20240611
# Softmax spread both tests check: std / mean of the 1000 probabilities (0 for a uniform softmax).
MIN_CV = 0.5
# Gain on the He scale of the conv weights: 0.7 keeps ResNet-50's activations within a few units up to
# the last stage (its BatchNorms use fixed statistics, so nothing renormalizes them).
WEIGHT_GAIN = {"resnet50": 0.7, "squeezenet": 1.0}
# The classifier weights (the layer that feeds the softmax) are rescaled so the logits have this
# standard deviation: the probabilities then span a few orders of magnitude.
LOGIT_STD = 2.0


def kind_of(name: str) -> str:
    """The weight kind from a Caffe2-style name: w, b, s (BN scale), rm (BN mean), riv (BN var)."""
    stem = name[: -len("_0")] if name.endswith("_0") else name
    return stem.rsplit("_", 1)[-1]


def scale_shift(model: str, name: str, shape: list[int], classifier: tuple[str, float]) -> tuple[float, float]:
    kind = kind_of(name)
    if kind == "w":
        fan_in = int(np.prod(shape[1:]))
        gain = classifier[1] if name == classifier[0] else WEIGHT_GAIN[model]
        return gain * float(np.sqrt(6.0 / fan_in)), 0.0
    if kind == "s":
        if "branch2c" in name:  # last BatchNorm of a residual branch
            return 0.04, 0.2
        return 0.2, 1.0
    if kind == "rm":
        return 0.1, 0.0
    if kind == "riv":
        return 0.3, 1.0
    if kind == "b":
        return 0.1, 0.0
    raise ValueError(f"unexpected weight {name}")


def regenerate(model_name: str, model: onnx.ModelProto, classifier_gain: float) -> onnx.ModelProto:
    g = model.graph
    rng = np.random.default_rng([SEED, sum(map(ord, model_name))])
    shapes = {
        i.name: [int(d) for d in onnx.numpy_helper.to_array(i)] for i in g.initializer if i.name.endswith("__SHAPE")
    }
    # The classifier: the last Conv / Gemm's weight input.
    classifier = ([n for n in g.node if n.op_type in ("Conv", "Gemm")][-1].input[1], classifier_gain)
    base = rng.uniform(-1.0, 1.0, size=P).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(base, BASE)]
    consts = {}

    def const(value: np.ndarray) -> str:
        """One initializer per distinct small constant."""
        key = (value.dtype.str, value.tobytes())
        if key not in consts:
            consts[key] = f"kiln_c{len(consts)}"
            inits.append(onnx.numpy_helper.from_array(value, consts[key]))
        return consts[key]

    nodes = []
    bases = {}

    def scaled_base(scale: float, shift: float) -> str:
        """base * scale (+ shift), computed once per distinct pair on the P-element base."""
        if (scale, shift) not in bases:
            name = f"kiln_base{len(bases)}"
            scaled = name if shift == 0.0 else f"{name}_scaled"
            nodes.append(helper.make_node("Mul", [BASE, const(np.array(scale, np.float32))], [scaled]))
            if shift != 0.0:
                nodes.append(helper.make_node("Add", [scaled, const(np.array(shift, np.float32))], [name]))
            bases[(scale, shift)] = name
        return bases[(scale, shift)]

    for idx, node in enumerate(g.node):
        if node.op_type != "ConstantOfShape":
            nodes.append(node)
            continue
        out = node.output[0]
        shape = shapes[node.input[0]]
        n = int(np.prod(shape))
        k = (idx * 389) % P
        reps = -(-(k + n) // P)
        scale, shift = scale_shift(model_name, out, shape, classifier)
        t = f"kiln_gen{idx}"
        nodes += [
            helper.make_node("Tile", [scaled_base(scale, shift), const(np.array([reps], np.int64))], [f"{t}_tiled"]),
            helper.make_node("Slice", [f"{t}_tiled"], [f"{t}_flat"], starts=[k], ends=[k + n], axes=[0]),
            helper.make_node("Reshape", [f"{t}_flat", node.input[0]], [out]),
        ]
    # The wheel's models also carry a few small weights as initializers (ResNet-50: the first
    # BatchNorms; SqueezeNet: some conv biases), all equal or nearly so: replace them the same way.
    for init in g.initializer:
        if init.name.endswith("__SHAPE") or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 1:
            continue
        if kind_of(init.name) not in ("b", "s", "rm", "riv"):
            continue
        scale, shift = scale_shift(model_name, init.name, list(init.dims), classifier)
        values = shift + scale * rng.uniform(-1.0, 1.0, size=tuple(init.dims))
        init.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), init.name))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    # IR version 3 (as shipped): every initializer is also a graph input.
    g.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits)
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feed: dict, level) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3  # the wheel's ResNet-50 has one unused initializer
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def logits(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    """The softmax input, through onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    softmax = [n for n in probe.graph.node if n.op_type == "Softmax"][-1]
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(softmax.input[0], onnx.TensorProto.FLOAT, None))
    return run_ort(probe, feed, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    shape = (1, 3, 224, 224)
    n = int(np.prod(shape))
    x = (np.arange(n).reshape(shape) / n).astype(np.float32)
    np.save(os.path.join(OUT, "input_1x3x224x224.npy"), x)
    for name in ["resnet50", "squeezenet"]:
        src = os.path.join(SRC, f"light_{name}.onnx")
        model = regenerate(name, onnx.load(src), 1.0)
        inits = {i.name for i in model.graph.initializer}
        feed_name = [i.name for i in model.graph.input if i.name not in inits][0]
        feed = {feed_name: x}
        # Logits scale with the classifier weights (Relu and average pooling are positively
        # homogeneous; the +-0.1 biases are small next to the target), so one rescale suffices.
        gain = LOGIT_STD / float(logits(model, feed).std())
        model = regenerate(name, onnx.load(src), gain)
        dst = os.path.join(OUT, f"{name}.onnx")
        onnx.save(model, dst)
        expected = run_ort(model, feed, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        plain = run_ort(model, feed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        np.save(os.path.join(OUT, f"{name}_expected.npy"), expected)
        p = expected.ravel().astype(np.float64)
        z = logits(model, feed)
        cv = p.std() / p.mean()
        err = float(np.max(np.abs(plain - expected)))
        print(
            f"{name}: input '{feed_name}' {x.shape}, output {expected.shape}: min {p.min():.3g} max {p.max():.3g} "
            f"std/mean {cv:.3g}, logit std {z.std():.3g} (classifier gain {gain:.3g}), top-5 {np.argsort(-p)[:5].tolist()}; "
            f"max |ort all - ort disabled| = {err:.3g}; {os.path.getsize(dst)} bytes"
        )
        assert np.allclose(plain, expected, rtol=1e-4, atol=1e-6), err
        assert cv > MIN_CV, f"{name}: softmax output too close to uniform (std/mean {cv:.3g})"


if __name__ == "__main__":
    main()

"""Copies two small real-architecture models that ship in the `onnx` wheel (ResNet-50 and SqueezeNet
with synthetic weights, opset 9) into models/light/, with the input ONNX's own test runner feeds them
(arange(n)/n as float32) and the expected outputs shipped beside them in the wheel; checks both
against onnxruntime. Run with the venv from scripts/setup-python.sh:

    $(scripts/setup-python.sh | tail -1)/bin/python models/make_light.py
"""
import os
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "light")
SRC = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    shape = (1, 3, 224, 224)
    n = int(np.prod(shape))
    x = (np.arange(n).reshape(shape) / n).astype(np.float32)
    np.save(os.path.join(OUT, "input_1x3x224x224.npy"), x)
    for name in ["resnet50", "squeezenet"]:
        src = os.path.join(SRC, f"light_{name}.onnx")
        dst = os.path.join(OUT, f"{name}.onnx")
        shutil.copyfile(src, dst)
        expected = onnx.numpy_helper.to_array(onnx.load_tensor(os.path.join(SRC, f"light_{name}_output_0.pb")))
        np.save(os.path.join(OUT, f"{name}_expected.npy"), expected)
        model = onnx.load(dst)
        inits = {i.name for i in model.graph.initializer}
        feed_name = [i.name for i in model.graph.input if i.name not in inits][0]
        sess = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
        got = sess.run(None, {feed_name: x})[0]
        err = float(np.max(np.abs(got - expected)))
        print(f"{name}: input '{feed_name}' {x.shape}, output {expected.shape}, max |ort - expected| = {err:.3g}")
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    main()

"""Quantizes real models with ONNX Runtime's own quantizer, the way Kiln's users get int8 models today, for
Kiln's golden tests (crates/kiln/tests/real_models.rs) and benchmarks:

    python models/make_quantized.py MODELS_DIR [--with-bert-base]

For each source model present in MODELS_DIR (MiniLM-L3, bert-tiny, the If-less 16 kHz Silero VAD; bert-base
too with --with-bert-base, for scripts/bench.sh: ~20 s) writes MODELS_DIR/<stem>.dyn-int8.onnx with
`onnxruntime.quantization.quantize_dynamic` at its defaults (QOperator form: DynamicQuantizeLinear on the
activations, MatMulInteger / ConvInteger with int8 per-tensor weights, Cast and Mul back to float).

It also writes a generated BiLSTM tagger (`bilstm-tagger.onnx`: embedding Gather, a bidirectional LSTM with
hidden 96, a MatMul + Add head; random weights from a fixed seed, built with onnx.helper) and its quantized
forms `bilstm-tagger.dyn-int8.onnx` (per-direction weight scales) and `bilstm-tagger.dyn-int8-per-channel.onnx`
(per gate column): the quantizer turns the LSTM into com.microsoft DynamicQuantizeLSTM, as it does in the
BiLSTM text and OCR models users quantize.

Static int8 (`quantize_static` at its defaults: int8 activations and int8 weights, per tensor, min-max calibration on 8
random image batches of 1 x 3 x 96 x 96 from a fixed seed) of three zoo CNNs (ResNet-18, MobileNetV2,
EfficientNet-B0, when models/make_zoo.py has written them) in both of the quantizer's forms:
`<stem>.static-int8-qop.onnx` (QOperator: QLinearConv, QLinearAdd, QLinearMul, QLinearSigmoid,
QLinearGlobalAveragePool, QGemm) and `<stem>.static-int8-qdq.onnx` (QuantizeLinear/DequantizeLinear pairs
around the float ops). The same two forms of MiniLM-L3 (a transformer: QLinearMatMul / QDQ MatMuls), calibrated
on 8 batches of 1 x 16 random token ids below 1000 from a fixed seed.

Existing files are kept: each output is a pure function of its source and the pinned onnxruntime (1.32.0).
"""
import argparse
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

ORT_VERSION = "1.32.0"
SOURCES = ["paraphrase-MiniLM-L3-v2", "bert-tiny", "silero_vad_16k_op15"]
STATIC_SOURCES = ["zoo-resnet18", "zoo-mobilenetv2", "zoo-efficientnet-b0"]
STATIC_TEXT_SOURCES = ["paraphrase-MiniLM-L3-v2"]


class ImageBatches(CalibrationDataReader):
    """8 batches of 1 x 3 x 96 x 96 (plane waves plus noise, about unit variance) for input `x`."""

    def __init__(self):
        rng = np.random.default_rng(20261205)
        yy, xx = np.mgrid[0:96, 0:96] / 96
        batches = []
        for _ in range(8):
            freq = rng.uniform(0.5, 4.0, (1, 3, 2, 1, 1))
            img = np.sin(2 * np.pi * (freq[:, :, 0] * xx + freq[:, :, 1] * yy + rng.uniform(0, 1, (1, 3, 1, 1))))
            batches.append({"x": (img + 0.3 * rng.standard_normal(img.shape)).astype(np.float32)})
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


class TokenBatches(CalibrationDataReader):
    """8 batches of 1 x 16 token ids below 1000 (masks all ones) for input_ids / attention_mask."""

    def __init__(self):
        rng = np.random.default_rng(20261206)
        self.it = iter(
            [
                {
                    "input_ids": rng.integers(0, 1000, (1, 16)).astype(np.int64),
                    "attention_mask": np.ones((1, 16), np.int64),
                }
                for _ in range(8)
            ]
        )

    def get_next(self):
        return next(self.it, None)


def write_atomic(dst: str, write) -> None:
    """Calls write(tmp) for a temp file beside dst and renames it: an interrupted run leaves no half file."""
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(dst) or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"make_quantized.py: {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


def bilstm_tagger() -> onnx.ModelProto:
    """tokens [B, S] int64 -> logits [B, S, 20]: Gather(embedding 1000 x 64) -> [S, B, 64] -> bidirectional
    LSTM (hidden 96) -> [B, S, 192] -> MatMul + Add."""
    rng = np.random.default_rng(20261204)
    vocab, emb, hidden, tags = 1000, 64, 96, 20

    def init(name, *shape, fan_in):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    inits = [
        init("embedding", vocab, emb, fan_in=1),
        init("lstm_W", 2, 4 * hidden, emb, fan_in=emb),
        init("lstm_R", 2, 4 * hidden, hidden, fan_in=hidden),
        init("lstm_B", 2, 8 * hidden, fan_in=100),
        init("head_W", 2 * hidden, tags, fan_in=2 * hidden),
        init("head_B", tags, fan_in=100),
        numpy_helper.from_array(np.array([0, 0, 2 * hidden], np.int64), "head_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),
        helper.make_node("Transpose", ["embedded"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["time_major", "lstm_W", "lstm_R", "lstm_B"], ["lstm_Y"], hidden_size=hidden,
                         direction="bidirectional"),
        helper.make_node("Transpose", ["lstm_Y"], ["batch_major"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["batch_major", "head_shape"], ["features"]),
        helper.make_node("MatMul", ["features", "head_W"], ["head_mm"]),
        helper.make_node("Add", ["head_mm", "head_B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "bilstm_tagger",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", tags])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="make_quantized.py")
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models_dir")
    ap.add_argument("--with-bert-base", action="store_true")
    args = ap.parse_args()
    assert ort.__version__ == ORT_VERSION, f"onnxruntime {ort.__version__}, want {ORT_VERSION}"
    tagger = os.path.join(args.models_dir, "bilstm-tagger.onnx")
    if not os.path.exists(tagger):
        write_atomic(tagger, lambda tmp: onnx.save(bilstm_tagger(), tmp))
    jobs = [(stem, ".dyn-int8", {}) for stem in SOURCES + (["bert-base"] if args.with_bert_base else [])]
    jobs += [("bilstm-tagger", ".dyn-int8", {}), ("bilstm-tagger", ".dyn-int8-per-channel", {"per_channel": True})]
    for stem, suffix, kwargs in jobs:
        src = os.path.join(args.models_dir, f"{stem}.onnx")
        dst = os.path.join(args.models_dir, f"{stem}{suffix}.onnx")
        if not os.path.exists(src) or os.path.exists(dst):
            continue
        write_atomic(dst, lambda tmp: quantize_dynamic(src, tmp, **kwargs))
    static = [(stem, ImageBatches) for stem in STATIC_SOURCES] + [(stem, TokenBatches) for stem in STATIC_TEXT_SOURCES]
    for stem, reader in static:
        for suffix, fmt in [(".static-int8-qop", QuantFormat.QOperator), (".static-int8-qdq", QuantFormat.QDQ)]:
            src = os.path.join(args.models_dir, f"{stem}.onnx")
            dst = os.path.join(args.models_dir, f"{stem}{suffix}.onnx")
            if not os.path.exists(src) or os.path.exists(dst):
                continue
            write_atomic(dst, lambda tmp: quantize_static(src, tmp, reader(), quant_format=fmt))


if __name__ == "__main__":
    main()

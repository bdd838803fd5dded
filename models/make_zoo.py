"""Builds a small zoo of public CNN architectures with random weights (onnx helper API + numpy, fixed seed per
model), shaped like what `torch.onnx.export` (opset 17, eval mode, BatchNorm folded into the Conv bias) writes for
the torchvision / ultralytics models, for Kiln's golden tests (crates/kiln/tests/real_models.rs) and benchmarks:

    python models/make_zoo.py MODELS_DIR [--force]

writes MODELS_DIR/<stem>.onnx for
    zoo-mobilenetv2         MobileNetV2 1.0: Conv + Clip(0, 6) (ReLU6), inverted residuals with depthwise 3x3,
                            GlobalAveragePool, Flatten, Gemm to 1000 classes (14 MB)
    zoo-mobilenetv3-small   MobileNetV3-Small: HardSwish, squeeze-excite with HardSigmoid, depthwise 3x3 / 5x5,
                            Gemm + HardSwish + Gemm classifier (10 MB)
    zoo-efficientnet-b0     EfficientNet-B0: SiLU as Sigmoid + Mul, MBConv with squeeze-excite (21 MB)
    zoo-shufflenetv2        ShuffleNetV2 x1.0: Split, Concat, channel shuffle as Reshape (shape from Shape /
                            Gather / Concat) -> Transpose -> Reshape, MaxPool stem, ReduceMean head (9 MB)
    zoo-resnet18            ResNet-18: 7x7 stem, MaxPool, basic blocks, 1x1 stride-2 downsample (47 MB)
    zoo-yolo-tiny           a YOLOv8n-sized detector (width 0.25, depth 0.33): Conv + SiLU, C2f (Split, Concat),
                            SPPF (3 x MaxPool 5x5), FPN/PAN with Resize (nearest, x2), three 1x1 head convs of
                            3 x 85 channels at strides 8 / 16 / 32, raw maps (no decoding, no NMS) (10 MB)
    zoo-crnn                a CRNN for text lines: conv stack down to height 1 with 2x2 and (2, 1) pools, Squeeze /
                            Transpose to [T, N, C], bidirectional LSTM then bidirectional GRU (hidden 128, initial
                            states from ConstantOfShape), Transpose / Reshape between them, MatMul + Add to
                            37 classes, LogSoftmax (26 MB)

    zoo-resnet50            ResNet-50 (v1.5): bottleneck blocks of 1x1 / 3x3 (strided) / 1x1 convs (102 MB)
    zoo-vit-tiny            a ViT-Tiny/16 for 96x96 images: patch Conv, class token (Shape / Expand / Concat),
                            position embeddings, 12 pre-norm blocks (LayerNormalization, qkv MatMul, Reshape /
                            Transpose to 3 heads, Softmax attention, GELU as Erf), Gemm head (23 MB)
    zoo-wav2vec2-frontend   wav2vec 2.0 base's conv feature encoder (seven Conv1d of 512 channels, GroupNorm as
                            InstanceNormalization, GELU) and feature projection (LayerNorm, Linear to 768) (19 MB)
    zoo-gru-seq2seq         a GRU encoder-decoder: embeddings of `src` / `tgt` tokens, the encoder GRU's last state
                            starts the decoder GRU (hidden 256), Linear to 1000 logits per target step (3 MB)

Inputs: `x` float32 [N, 3, H, W] for the image models (H and W dynamic; multiples of 32 for zoo-yolo-tiny, whose
FPN concatenates upsampled maps; 96x96 for zoo-vit-tiny), `x` [N, 1, 32, W] for zoo-crnn, `x` [N, samples] (16 kHz
audio) for zoo-wav2vec2-frontend, int64 `src` [N, S] and `tgt` [N, T] for zoo-gru-seq2seq. Outputs: `logits`
[N, 1000]; zoo-yolo-tiny `p3` / `p4` / `p5` [N, 255, H/s, W/s]; zoo-crnn `log_probs` [W/4 + 1, N, 37];
zoo-wav2vec2-frontend `features` [N, frames, 768]; zoo-gru-seq2seq `logits` [N, T, 1000].

Weights: each Conv's weights are He-normal, then a BatchNorm is folded into them from the statistics of the conv's
output on 8 calibration images (float64 numpy, evaluated while the graph is built; see `Builder.folded`), so every
layer's output has about unit scale at any depth; the last BatchNorm of a residual branch has gamma 0.5. The
LSTM / GRU take torch's U(-1/sqrt(hidden), 1/sqrt(hidden)) init. Logits and detection maps have std ~1 (see
LOGIT_STD). Each model is checked with onnx.checker (full_check) and run once through onnxruntime: outputs finite,
std between 0.1 and 100, different for two different inputs.
Existing files are kept (the weights are a pure function of the seed); --force rewrites them (then rerun
make_reference.py with --force too, it keeps existing references).
"""
import argparse
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ORT_VERSION = "1.32.0"

# The conv nets are built eagerly: every value also has a float64 numpy result on a few calibration images, and
# each Conv's BatchNorm is folded from the statistics of its own output there, as `model.eval()` folds the running
# statistics of a trained network. Scales are rounded to 2^(k/16) and shifts to 2^-12 so the weights do not depend on
# the last bits of the BLAS sums.
CALIBRATION_IMAGES = 8


def smooth_images(rng, shape) -> np.ndarray:
    """Random plane waves plus noise, about unit variance (an ImageNet-normalized photo's range)."""
    n, c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([
        np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
                  for _ in range(c)]) for _ in range(n)])
    return img + 0.3 * rng.standard_normal(img.shape)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of 8, never down by more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_np(x: np.ndarray, w: np.ndarray, stride, pads, groups: int) -> np.ndarray:
    """Conv2d without bias in float64: im2col + matmul (groups 1) or per-tap sums (depthwise)."""
    (sh, sw), (ph, pw) = stride, pads
    n, c, _, _ = x.shape
    cout, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = win.shape[2], win.shape[3]
    if groups == 1:
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        return (cols @ w.reshape(cout, -1).T).reshape(n, oh, ow, cout).transpose(0, 3, 1, 2)
    assert groups == c == cout, "only dense and depthwise convs"
    out = np.zeros((n, c, oh, ow))
    for i in range(kh):
        for j in range(kw):
            out += win[:, :, :, :, i, j] * w[None, :, 0, i, j, None, None]
    return out


def maxpool_np(x: np.ndarray, k, stride, pads) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = k, stride, pads
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].max(axis=(4, 5))


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Builder:
    """Nodes and initializers of one graph, named the way torch.onnx names them (`/scope/Op`, `/scope/Op_output_0`),
    and the float64 value of every activation on the calibration images (`val`) while one is known."""

    def __init__(self, seed: int, input_shape):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.used = {"x"}
        self.shared = {}
        self.val = {"x": smooth_images(np.random.default_rng(seed + 1), (CALIBRATION_IMAGES,) + tuple(input_shape))}

    def unique(self, name: str) -> str:
        out, i = name, 0
        while out in self.used:
            i += 1
            out = f"{name}_{i}"
        self.used.add(out)
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, *values: int) -> str:
        """A shared 1-D int64 constant (torch.onnx deduplicates equal constants the same way)."""
        key = ("i64",) + values
        if key not in self.shared:
            self.shared[key] = self.const(f"onnx::Const_{len(self.shared)}", np.array(values, np.int64))
        return self.shared[key]

    def index(self, value: int) -> str:
        """A shared 0-d int64 constant (a Gather index)."""
        key = ("i64 scalar", value)
        if key not in self.shared:
            self.shared[key] = self.const(f"onnx::Const_{len(self.shared)}", np.array(value, np.int64))
        return self.shared[key]

    def scalar(self, value: float) -> str:
        key = ("f32", value)
        if key not in self.shared:
            self.shared[key] = self.const(f"onnx::Const_{len(self.shared)}", np.array(value, np.float32))
        return self.shared[key]

    def op(self, op_type: str, inputs, scope: str, outputs: int = 1, fn=None, **attrs):
        """Appends a node; fn, given the values of its activation inputs (not the constants), computes its value."""
        node = self.unique(f"/{scope}/{op_type}")
        outs = [self.unique(f"{node}_output_{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node, **attrs))
        args = [self.val[i] for i in inputs if i in self.val]
        if fn is not None and args:
            values = fn(*args)
            for out, value in zip(outs, values if outputs > 1 else [values]):
                self.val[out] = value
        return outs[0] if outputs == 1 else outs

    def rename(self, old: str, new: str) -> str:
        """Gives a value the graph output's name (torch.onnx names the producing node's output after it)."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name == old:
                        names[i] = new
        return new

    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def folded(self, y: np.ndarray, axes, gain: float):
        """Scale and shift of a folded BatchNorm for the raw output y (channels on axis 1): gamma about `gain`,
        beta ~ N(0, 0.1). Per channel, the scale divides by the root mean square over `axes` and the shift is beta:
        the channel means stay, as in He initialization, because centering every channel as well makes a deep random
        net amplify perturbations (one float32 rounding) by about 1.2x per layer. When y has few elements per
        channel (squeeze-excite and classifier layers on pooled features), the whole layer is centered and scaled
        by its std instead."""
        channels = y.shape[1]
        gamma = gain * np.exp(0.2 * self.rng.standard_normal(channels))
        beta = 0.1 * self.rng.standard_normal(channels)
        if y.size // channels >= 16:
            mean, std = np.zeros(channels), np.sqrt(np.mean(y**2, axis=axes))
            std = np.maximum(std, 0.3 * np.sqrt(np.mean(std**2)))  # a nearly dead channel is not blown up
        else:
            mean, std = np.full(channels, y.mean()), np.full(channels, y.std())
        scale = 2.0 ** (np.round(16 * np.log2(gamma / std)) / 16)
        shift = np.round((beta - mean * scale) * 4096) / 4096
        return scale, shift

    def conv(self, x: str, scope: str, cin: int, cout: int, k, stride=1, groups: int = 1, pad=None,
             gain: float = 1.0) -> str:
        """Conv with a folded BatchNorm (see `folded`); pad defaults to torch's (k - 1) // 2 on every side."""
        (kh, kw), stride = pair(k), pair(stride)
        pads = ((kh - 1) // 2, (kw - 1) // 2) if pad is None else pair(pad)
        w = self.rng.standard_normal((cout, cin // groups, kh, kw)) / np.sqrt(cin // groups * kh * kw)
        y = conv_np(self.val[x], w, stride, pads, groups)
        scale, shift = self.folded(y, (0, 2, 3), gain)
        wname = self.const(f"{scope}.weight", (w * scale[:, None, None, None]).astype(np.float32))
        bname = self.const(f"{scope}.bias", shift.astype(np.float32))
        ph, pw = pads
        out = self.op("Conv", [x, wname, bname], scope, dilations=[1, 1], group=groups, kernel_shape=[kh, kw],
                      pads=[ph, pw, ph, pw], strides=list(stride))
        self.val[out] = y * scale[None, :, None, None] + shift[None, :, None, None]
        return out

    def gemm(self, x: str, scope: str, cin: int, cout: int, gain: float = 1.0) -> str:
        """nn.Linear on a 2-D input: Gemm with the weight [out, in] and transB=1; outputs of std about `gain` on
        the calibration images."""
        w = self.rng.standard_normal((cout, cin)) / np.sqrt(cin)
        y = self.val[x] @ w.T
        scale, shift = self.folded(y, (0,), gain)
        wname = self.const(f"{scope}.weight", (w * scale[:, None]).astype(np.float32))
        bname = self.const(f"{scope}.bias", shift.astype(np.float32))
        out = self.op("Gemm", [x, wname, bname], scope, alpha=1.0, beta=1.0, transB=1)
        self.val[out] = y * scale + shift
        return out

    def add(self, a: str, b: str, scope: str) -> str:
        return self.op("Add", [a, b], scope, fn=np.add)

    def concat(self, xs, scope: str) -> str:
        return self.op("Concat", xs, scope, fn=lambda *v: np.concatenate(v, axis=1), axis=1)

    def split(self, x: str, scope: str, sizes) -> list:
        return self.op("Split", [x, self.ints(*sizes)], scope, outputs=len(sizes),
                       fn=lambda v: np.split(v, np.cumsum(sizes)[:-1], axis=1), axis=1)

    def relu(self, x: str, scope: str) -> str:
        return self.op("Relu", [x], scope, fn=lambda v: np.maximum(v, 0))

    def relu6(self, x: str, scope: str) -> str:
        return self.op("Clip", [x, self.scalar(0.0), self.scalar(6.0)], scope, fn=lambda v: np.clip(v, 0, 6))

    def silu(self, x: str, scope: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x], scope, fn=sigmoid)], scope, fn=np.multiply)

    def hardswish(self, x: str, scope: str) -> str:
        return self.op("HardSwish", [x], scope, fn=lambda v: v * np.clip(v + 3, 0, 6) / 6)

    def hardsigmoid(self, x: str, scope: str) -> str:
        return self.op("HardSigmoid", [x], scope, fn=lambda v: np.clip(v / 6 + 0.5, 0, 1), alpha=1.0 / 6.0,
                       beta=0.5)

    def maxpool(self, x: str, scope: str, k, stride, pad) -> str:
        k, stride, pad = pair(k), pair(stride), pair(pad)
        return self.op("MaxPool", [x], scope, fn=lambda v: maxpool_np(v, k, stride, pad), ceil_mode=0,
                       dilations=[1, 1], kernel_shape=list(k), pads=list(pad) * 2, strides=list(stride))

    def global_pool(self, x: str, scope: str) -> str:
        return self.op("GlobalAveragePool", [x], scope, fn=lambda v: v.mean(axis=(2, 3), keepdims=True))

    def classifier_head(self, x: str, channels: int, scope: str = "classifier.1", gain: float = None) -> str:
        """adaptive_avg_pool2d(1) -> torch.flatten(x, 1) -> Linear(channels, 1000), logits of std `gain`
        (default LOGIT_STD) on the calibration images."""
        x = self.global_pool(x, "avgpool")
        x = self.op("Flatten", [x], "Flatten", fn=lambda v: v.reshape(v.shape[0], -1), axis=1)
        return self.gemm(x, scope, channels, 1000, gain=LOGIT_STD if gain is None else gain)

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln make_zoo.py")
        model.ir_version = 8
        return model


# Spread of the class logits on the calibration images. A difference of one float32 rounding still grows through
# 50 random layers, so engines that sum in different orders differ by ~1e-5 of the output scale: outputs of std ~1
# keep that well inside the golden tests' 1e-4 absolute rule.
LOGIT_STD = 1.0
# Gamma of the last BatchNorm in a residual branch: the sum grows by 1.25x in variance per block.
RESIDUAL_GAIN = 0.5


def image_input(channels: int = 3):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])


def logits_output(b: Builder, x: str):
    b.rename(x, "logits")
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])]


def mobilenetv2() -> onnx.ModelProto:
    b = Builder(20261210, (3, 128, 128))
    x = b.relu6(b.conv("x", "features.0.0", 3, 32, 3, 2), "features.0.2")
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    cin, idx = 32, 1
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            residual = stride == 1 and cin == c
            h, j = x, 0
            if t != 1:
                h = b.relu6(b.conv(h, f"{p}.0.0", cin, hidden, 1), f"{p}.0.2")
                j = 1
            h = b.relu6(b.conv(h, f"{p}.{j}.0", hidden, hidden, 3, stride, groups=hidden), f"{p}.{j}.2")
            h = b.conv(h, f"{p}.{j + 1}", hidden, c, 1, gain=RESIDUAL_GAIN if residual else 1.0)
            x = b.add(x, h, f"features.{idx}") if residual else h
            cin, idx = c, idx + 1
    x = b.relu6(b.conv(x, f"features.{idx}.0", 320, 1280, 1), f"features.{idx}.2")
    logits = b.classifier_head(x, 1280)
    return b.model("mobilenetv2", [image_input()], logits_output(b, logits))


def squeeze_excite(b: Builder, x: str, scope: str, channels: int, squeeze: int, silu: bool) -> str:
    """torchvision.ops.SqueezeExcitation: scale = gate(fc2(act(fc1(avgpool(x))))); scale * x."""
    s = b.global_pool(x, f"{scope}/avgpool")
    s = b.conv(s, f"{scope}.fc1", channels, squeeze, 1)
    s = b.silu(s, f"{scope}/activation") if silu else b.relu(s, f"{scope}/activation")
    s = b.conv(s, f"{scope}.fc2", squeeze, channels, 1)
    if silu:
        s = b.op("Sigmoid", [s], f"{scope}/scale_activation", fn=sigmoid)
    else:
        s = b.hardsigmoid(s, f"{scope}/scale_activation")
    return b.op("Mul", [s, x], scope, fn=np.multiply)


def mobilenetv3_small() -> onnx.ModelProto:
    b = Builder(20261211, (3, 128, 128))
    x = b.hardswish(b.conv("x", "features.0.0", 3, 16, 3, 2), "features.0.2")
    # input, kernel, expanded, out, squeeze-excite, hardswish (else ReLU), stride
    config = [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
              (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
              (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
              (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1)]
    for idx, (cin, k, exp, cout, se, hs, stride) in enumerate(config, start=1):
        p = f"features.{idx}.block"
        act = b.hardswish if hs else b.relu
        residual = stride == 1 and cin == cout
        h, j = x, 0
        if exp != cin:
            h = act(b.conv(h, f"{p}.0.0", cin, exp, 1), f"{p}.0.2")
            j = 1
        h = act(b.conv(h, f"{p}.{j}.0", exp, exp, k, stride, groups=exp), f"{p}.{j}.2")
        if se:
            j += 1
            h = squeeze_excite(b, h, f"{p}.{j}", exp, make_divisible(exp // 4), silu=False)
        h = b.conv(h, f"{p}.{j + 1}.0", exp, cout, 1, gain=RESIDUAL_GAIN if residual else 1.0)
        x = b.add(h, x, f"features.{idx}/block") if residual else h
    x = b.hardswish(b.conv(x, "features.12.0", 96, 576, 1), "features.12.2")
    x = b.global_pool(x, "avgpool")
    x = b.op("Flatten", [x], "Flatten", fn=lambda v: v.reshape(v.shape[0], -1), axis=1)
    x = b.hardswish(b.gemm(x, "classifier.0", 576, 1024), "classifier.1")
    logits = b.gemm(x, "classifier.3", 1024, 1000, gain=LOGIT_STD)
    return b.model("mobilenetv3_small", [image_input()], logits_output(b, logits))


def efficientnet_b0() -> onnx.ModelProto:
    b = Builder(20261212, (3, 128, 128))
    x = b.silu(b.conv("x", "features.0.0", 3, 32, 3, 2), "features.0.2")
    # expand ratio, kernel, stride, input, output, layers
    stages = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    for si, (t, k, s, cin0, cout, n) in enumerate(stages, start=1):
        for li in range(n):
            cin, stride = (cin0, s) if li == 0 else (cout, 1)
            p = f"features.{si}.{li}.block"
            exp = make_divisible(cin * t)
            residual = stride == 1 and cin == cout
            h, j = x, 0
            if exp != cin:
                h = b.silu(b.conv(h, f"{p}.0.0", cin, exp, 1), f"{p}.0.2")
                j = 1
            h = b.silu(b.conv(h, f"{p}.{j}.0", exp, exp, k, stride, groups=exp), f"{p}.{j}.2")
            h = squeeze_excite(b, h, f"{p}.{j + 1}", exp, max(1, cin // 4), silu=True)
            h = b.conv(h, f"{p}.{j + 2}.0", exp, cout, 1, gain=RESIDUAL_GAIN if residual else 1.0)
            x = b.add(h, x, f"features.{si}.{li}") if residual else h
    x = b.silu(b.conv(x, "features.8.0", 320, 1280, 1), "features.8.2")
    logits = b.classifier_head(x, 1280)
    return b.model("efficientnet_b0", [image_input()], logits_output(b, logits))


def channel_shuffle(b: Builder, x: str, scope: str, channels: int) -> str:
    """x.view(n, 2, c / 2, h, w).transpose(1, 2).view(n, -1, h, w), with n, h, w read from Shape as torch traces."""
    shape = b.op("Shape", [x], scope)
    n, h, w = (b.op("Unsqueeze", [b.op("Gather", [shape, b.index(d)], scope, axis=0), b.ints(0)], scope)
               for d in (0, 2, 3))
    five = b.op("Concat", [n, b.ints(2), b.ints(channels // 2), h, w], scope, axis=0)
    y = b.op("Reshape", [x, five], scope)
    y = b.op("Transpose", [y], scope, perm=[0, 2, 1, 3, 4])
    four = b.op("Concat", [n, b.ints(-1), h, w], scope, axis=0)
    out = b.op("Reshape", [y, four], scope)
    v = b.val[x]
    nv, _, hv, wv = v.shape
    b.val[out] = v.reshape(nv, 2, channels // 2, hv, wv).transpose(0, 2, 1, 3, 4).reshape(v.shape)
    return out


def shufflenetv2() -> onnx.ModelProto:
    b = Builder(20261213, (3, 128, 128))
    x = b.relu(b.conv("x", "conv1.0", 3, 24, 3, 2), "conv1.2")
    x = b.maxpool(x, "maxpool", 3, 2, 1)
    cin = 24
    for si, (repeats, cout) in enumerate([(4, 116), (8, 232), (4, 464)], start=2):
        bf = cout // 2
        for i in range(repeats):
            p = f"stage{si}.{i}"
            if i == 0:
                a = b.conv(x, f"{p}.branch1.0", cin, cin, 3, 2, groups=cin)
                a = b.relu(b.conv(a, f"{p}.branch1.2", cin, bf, 1), f"{p}/branch1/branch1.4")
                h, c2 = x, cin
            else:
                a, h = b.split(x, p, (bf, bf))
                c2 = bf
            h = b.relu(b.conv(h, f"{p}.branch2.0", c2, bf, 1), f"{p}/branch2/branch2.2")
            h = b.conv(h, f"{p}.branch2.3", bf, bf, 3, 2 if i == 0 else 1, groups=bf)
            h = b.relu(b.conv(h, f"{p}.branch2.5", bf, bf, 1), f"{p}/branch2/branch2.7")
            x = channel_shuffle(b, b.concat([a, h], p), p, cout)
            cin = cout
    x = b.relu(b.conv(x, "conv5.0", 464, 1024, 1), "conv5.2")
    x = b.op("ReduceMean", [x], "ReduceMean", fn=lambda v: v.mean(axis=(2, 3)), axes=[2, 3], keepdims=0)
    logits = b.gemm(x, "fc", 1024, 1000, gain=LOGIT_STD)
    return b.model("shufflenetv2", [image_input()], logits_output(b, logits))


def resnet18() -> onnx.ModelProto:
    b = Builder(20261214, (3, 128, 128))
    x = b.relu(b.conv("x", "conv1", 3, 64, 7, 2), "relu")
    x = b.maxpool(x, "maxpool", 3, 2, 1)
    cin = 64
    for li, cout in enumerate([64, 128, 256, 512], start=1):
        for i in range(2):
            p = f"layer{li}.{i}"
            stride = 2 if li > 1 and i == 0 else 1
            h = b.relu(b.conv(x, f"{p}.conv1", cin, cout, 3, stride), f"{p}/relu")
            h = b.conv(h, f"{p}.conv2", cout, cout, 3, gain=RESIDUAL_GAIN)
            identity = b.conv(x, f"{p}.downsample.0", cin, cout, 1, stride) if stride != 1 or cin != cout else x
            x = b.relu(b.add(h, identity, p), f"{p}/relu_1")
            cin = cout
    logits = b.classifier_head(x, 512, scope="fc")
    return b.model("resnet18", [image_input()], logits_output(b, logits))


def yolo_tiny() -> onnx.ModelProto:
    b = Builder(20261215, (3, 128, 128))

    def conv(x, scope, cin, cout, k=1, s=1, gain=1.0):
        """ultralytics Conv: Conv2d(bias=False) + BatchNorm2d (folded) + SiLU."""
        return b.silu(b.conv(x, f"{scope}.conv", cin, cout, k, s, gain=gain), f"{scope}/act")

    def c2f(x, scope, cin, cout, n, shortcut):
        c = cout // 2
        y = b.split(conv(x, f"{scope}.cv1", cin, 2 * c), scope, (c, c))
        for i in range(n):
            h = conv(y[-1], f"{scope}.m.{i}.cv1", c, c, 3)
            h = conv(h, f"{scope}.m.{i}.cv2", c, c, 3, gain=RESIDUAL_GAIN if shortcut else 1.0)
            y.append(b.add(y[-1], h, f"{scope}/m.{i}") if shortcut else h)
        return conv(b.concat(y, scope), f"{scope}.cv2", (2 + n) * c, cout)

    def sppf(x, scope, cin, cout):
        y = [conv(x, f"{scope}.cv1", cin, cin // 2)]
        for _ in range(3):
            y.append(b.maxpool(y[-1], f"{scope}/m", 5, 1, 2))
        return conv(b.concat(y, scope), f"{scope}.cv2", cin // 2 * 4, cout)

    def upsample(x, scope):
        return b.op("Resize", [x, "", b.const(f"{scope}.scales", np.array([1, 1, 2, 2], np.float32))], scope,
                    fn=lambda v: v.repeat(2, axis=2).repeat(2, axis=3),
                    coordinate_transformation_mode="asymmetric", cubic_coeff_a=-0.75, mode="nearest",
                    nearest_mode="floor")

    x = conv("x", "model.0", 3, 16, 3, 2)
    x = conv(x, "model.1", 16, 32, 3, 2)
    x = c2f(x, "model.2", 32, 32, 1, True)
    x = conv(x, "model.3", 32, 64, 3, 2)
    p3 = c2f(x, "model.4", 64, 64, 2, True)
    x = conv(p3, "model.5", 64, 128, 3, 2)
    p4 = c2f(x, "model.6", 128, 128, 2, True)
    x = conv(p4, "model.7", 128, 256, 3, 2)
    x = c2f(x, "model.8", 256, 256, 1, True)
    p5 = sppf(x, "model.9", 256, 256)
    x = b.concat([upsample(p5, "model.10"), p4], "model.11")
    n4 = c2f(x, "model.12", 384, 128, 1, False)
    x = b.concat([upsample(n4, "model.13"), p3], "model.14")
    out3 = c2f(x, "model.15", 192, 64, 1, False)
    x = b.concat([conv(out3, "model.16", 64, 64, 3, 2), n4], "model.17")
    out4 = c2f(x, "model.18", 192, 128, 1, False)
    x = b.concat([conv(out4, "model.19", 128, 128, 3, 2), p5], "model.20")
    out5 = c2f(x, "model.21", 384, 256, 1, False)
    outputs = []
    for i, (y, c, stride) in enumerate([(out3, 64, 8), (out4, 128, 16), (out5, 256, 32)]):
        # raw maps of std ~0.5 at 96x96 (~1 at 64x64, where the borders weigh more): see LOGIT_STD
        name = b.rename(b.conv(y, f"model.22.m.{i}", c, 255, 1, gain=0.5), f"p{i + 3}")
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 255, f"H/{stride}", f"W/{stride}"]))
    return b.model("yolo_tiny", [image_input()], outputs)


def crnn() -> onnx.ModelProto:
    b = Builder(20261216, (1, 32, 100))
    hidden, classes = 128, 37
    # (out channels, kernel, padding, pool after: None, "2x2" or "2x1")
    stack = [(64, 3, 1, "2x2"), (128, 3, 1, "2x2"), (256, 3, 1, None), (256, 3, 1, "2x1"), (512, 3, 1, None),
             (512, 3, 1, "2x1"), (512, 2, 0, None)]
    x, cin = "x", 1
    for i, (cout, k, pad, pool) in enumerate(stack):
        x = b.relu(b.conv(x, f"cnn.conv{i}", cin, cout, k, pad=pad), f"cnn/relu{i}")
        if pool == "2x2":
            x = b.maxpool(x, f"cnn/pooling{i}", 2, 2, 0)
        elif pool == "2x1":
            x = b.maxpool(x, f"cnn/pooling{i}", 2, (2, 1), (0, 1))
        cin = cout
    x = b.op("Squeeze", [x, b.ints(2)], "Squeeze", fn=lambda v: v[:, :, 0, :])
    x = b.op("Transpose", [x], "Transpose", fn=lambda v: v.transpose(2, 0, 1), perm=[2, 0, 1])  # [T, N, 512]

    def uniform(shape, bound):
        return b.rng.uniform(-bound, bound, shape).astype(np.float32)

    def rnn(x, scope, op, gates, cin, **attrs):
        """nn.LSTM / nn.GRU (bidirectional, zero initial state, torch's U(-1/sqrt(hidden), 1/sqrt(hidden))
        init) -> [T, N, 2 * hidden] as torch.onnx emits it."""
        k = 1.0 / np.sqrt(hidden)
        batch = b.op("Gather", [b.op("Shape", [x], scope), b.index(1)], scope, axis=0)
        batch = b.op("Unsqueeze", [batch, b.ints(0)], scope)
        state_shape = b.op("Concat", [b.ints(2), batch, b.ints(hidden)], scope, axis=0)
        zeros = numpy_helper.from_array(np.zeros(1, np.float32))
        h0 = b.op("ConstantOfShape", [state_shape], scope, value=zeros)
        w = b.const(f"{scope}.W", uniform((2, gates * hidden, cin), k))
        r = b.const(f"{scope}.R", uniform((2, gates * hidden, hidden), k))
        bias = b.const(f"{scope}.B", uniform((2, 2 * gates * hidden), k))
        inputs = [x, w, r, bias, "", h0] + ([h0] if op == "LSTM" else [])
        y = b.op(op, inputs, scope, outputs=3 if op == "LSTM" else 2, direction="bidirectional",
                 hidden_size=hidden, **attrs)[0]
        y = b.op("Transpose", [y], scope, perm=[0, 2, 1, 3])
        return b.op("Reshape", [y, b.ints(0, 0, -1)], scope)

    x = rnn(x, "rnn.0", "LSTM", 4, 512)
    x = rnn(x, "rnn.1", "GRU", 3, 2 * hidden, linear_before_reset=1)
    # nn.Linear on [T, N, 256]: MatMul with the transposed weight + Add; GRU outputs have std ~0.25
    w = b.const("embedding.weight_T", b.normal((2 * hidden, classes), 4.0 / np.sqrt(2 * hidden)))
    x = b.op("MatMul", [x, w], "embedding")
    x = b.op("Add", [b.const("embedding.bias", b.normal((classes,), 0.1)), x], "embedding")
    x = b.op("LogSoftmax", [x], "LogSoftmax", axis=2)
    out = helper.make_tensor_value_info(b.rename(x, "log_probs"), TensorProto.FLOAT, ["T", "N", classes])
    return b.model("crnn", [image_input(1)], [out])


def resnet50() -> onnx.ModelProto:
    """torchvision ResNet-50 (v1.5: the stride on the 3x3 conv of each bottleneck)."""
    b = Builder(20261217, (3, 96, 96))
    x = b.relu(b.conv("x", "conv1", 3, 64, 7, 2), "relu")
    x = b.maxpool(x, "maxpool", 3, 2, 1)
    cin = 64
    for li, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        cout = 4 * width
        for i in range(blocks):
            p = f"layer{li}.{i}"
            stride = 2 if li > 1 and i == 0 else 1
            h = b.relu(b.conv(x, f"{p}.conv1", cin, width, 1), f"{p}/relu")
            h = b.relu(b.conv(h, f"{p}.conv2", width, width, 3, stride), f"{p}/relu_1")
            h = b.conv(h, f"{p}.conv3", width, cout, 1, gain=RESIDUAL_GAIN)
            identity = b.conv(x, f"{p}.downsample.0", cin, cout, 1, stride) if stride != 1 or cin != cout else x
            x = b.relu(b.add(h, identity, p), f"{p}/relu_2")
            cin = cout
    logits = b.classifier_head(x, 2048, scope="fc")
    return b.model("resnet50", [image_input()], logits_output(b, logits))


def gelu(b: Builder, x: str, scope: str) -> str:
    """nn.GELU() as torch.onnx writes it at opset 17: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    e = b.op("Erf", [b.op("Div", [x, b.scalar(float(np.float32(np.sqrt(2.0))))], scope)], scope)
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [e, b.scalar(1.0)], scope)], scope), b.scalar(0.5)], scope)


def linear(b: Builder, x: str, scope: str, cin: int, cout: int, std: float = None) -> str:
    """nn.Linear on a 3-D input: MatMul with the transposed weight + Add of the bias (torch.onnx's form);
    weights N(0, 1/cin) unless `std` is given."""
    w = b.const(f"{scope}.weight_T", b.normal((cin, cout), 1.0 / np.sqrt(cin) if std is None else std))
    y = b.op("MatMul", [x, w], scope)
    return b.op("Add", [b.const(f"{scope}.bias", b.normal((cout,), 0.02)), y], scope)


def layer_norm(b: Builder, x: str, scope: str, dim: int) -> str:
    gamma = b.const(f"{scope}.weight", (1.0 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32))
    beta = b.const(f"{scope}.bias", b.normal((dim,), 0.02))
    return b.op("LayerNormalization", [x, gamma, beta], scope, axis=-1, epsilon=1e-6)


def vit_tiny() -> onnx.ModelProto:
    """A timm-style ViT-Tiny/16 (dim 192, 12 blocks, 3 heads, MLP 768) for 96x96 images (36 patches + a class
    token, learned position embeddings): patch Conv, Concat with the expanded class token, pre-norm blocks with
    LayerNormalization, fused qkv MatMul, Reshape / Transpose to heads, scaled scores, Softmax, GELU (Erf) MLP;
    the class token's final LayerNorm feeds a Gemm to 1000 classes."""
    b = Builder(20261218, (3, 96, 96))
    dim, heads, depth, mlp, tokens = 192, 3, 12, 768, 37
    hd = dim // heads
    w = b.const("patch_embed.proj.weight", b.normal((dim, 3, 16, 16), 1.0 / np.sqrt(3 * 16 * 16)))
    x = b.op("Conv", ["x", w, b.const("patch_embed.proj.bias", b.normal((dim,), 0.02))], "patch_embed/proj",
             dilations=[1, 1], group=1, kernel_shape=[16, 16], pads=[0, 0, 0, 0], strides=[16, 16])
    x = b.op("Reshape", [x, b.ints(0, dim, -1)], "patch_embed")
    x = b.op("Transpose", [x], "patch_embed", perm=[0, 2, 1])  # [N, 36, dim]
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x], "cls"), b.index(0)], "cls", axis=0), b.ints(0)],
                 "cls")
    cls_shape = b.op("Concat", [batch, b.ints(1, 1)], "cls", axis=0)
    cls = b.op("Expand", [b.const("cls_token", b.normal((1, 1, dim), 1.0)), cls_shape], "cls")
    x = b.op("Concat", [cls, x], "Concat", axis=1)
    x = b.op("Add", [x, b.const("pos_embed", b.normal((1, tokens, dim), 0.5))], "pos")
    for i in range(depth):
        p = f"blocks.{i}"
        h = layer_norm(b, x, f"{p}.norm1", dim)
        qkv = linear(b, h, f"{p}.attn.qkv", dim, 3 * dim)
        qkv = b.op("Reshape", [qkv, b.ints(0, tokens, 3, heads, hd)], f"{p}/attn")
        qkv = b.op("Transpose", [qkv], f"{p}/attn", perm=[2, 0, 3, 1, 4])  # [3, N, heads, tokens, hd]
        q, k, v = (b.op("Gather", [qkv, b.index(j)], f"{p}/attn", axis=0) for j in range(3))
        kt = b.op("Transpose", [k], f"{p}/attn", perm=[0, 1, 3, 2])
        s = b.op("Mul", [b.op("MatMul", [q, kt], f"{p}/attn"), b.scalar(float(np.float32(hd ** -0.5)))],
                 f"{p}/attn")
        a = b.op("MatMul", [b.op("Softmax", [s], f"{p}/attn", axis=-1), v], f"{p}/attn")
        a = b.op("Reshape", [b.op("Transpose", [a], f"{p}/attn", perm=[0, 2, 1, 3]), b.ints(0, tokens, dim)],
                 f"{p}/attn")
        x = b.op("Add", [x, linear(b, a, f"{p}.attn.proj", dim, dim, std=0.5 / np.sqrt(dim))], p)
        h = layer_norm(b, x, f"{p}.norm2", dim)
        h = gelu(b, linear(b, h, f"{p}.mlp.fc1", dim, mlp), f"{p}/mlp/act")
        x = b.op("Add", [x, linear(b, h, f"{p}.mlp.fc2", mlp, dim, std=0.5 / np.sqrt(mlp))], p)
    x = layer_norm(b, x, "norm", dim)
    x = b.op("Gather", [x, b.index(0)], "Gather", axis=1)  # the class token: [N, dim]
    w = b.const("head.weight", b.normal((1000, dim), LOGIT_STD / np.sqrt(dim)))
    x = b.op("Gemm", [x, w, b.const("head.bias", b.normal((1000,), 0.02))], "head", alpha=1.0, beta=1.0, transB=1)
    return b.model("vit_tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 96, 96])],
                   logits_output(b, x))


def wav2vec2_frontend() -> onnx.ModelProto:
    """wav2vec 2.0 base's feature encoder and projection (what speech models put in front of their transformer):
    raw 16 kHz audio [N, samples] -> Unsqueeze -> seven Conv1d layers of 512 channels without bias (kernels 10, 3,
    3, 3, 3, 2, 2; strides 5, 2, 2, 2, 2, 2, 2), GroupNorm(512 groups) after the first (exported as Reshape ->
    InstanceNormalization -> Reshape -> Mul -> Add), GELU (Erf) after each -> Transpose -> LayerNorm -> Linear(512,
    768) -> features [N, frames, 768], one frame per 320 samples."""
    b = Builder(20261219, (1, 1, 1))
    dim = 512
    x = b.op("Unsqueeze", ["x", b.ints(1)], "Unsqueeze")
    cin = 1
    for i, (k, s) in enumerate([(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]):
        p = f"feature_extractor.conv_layers.{i}"
        w = b.const(f"{p}.conv.weight", b.normal((dim, cin, k), np.sqrt(2.0 / (cin * k))))
        x = b.op("Conv", [x, w], f"{p}/conv", dilations=[1], group=1, kernel_shape=[k], pads=[0, 0], strides=[s])
        if i == 0:
            shape = b.op("Shape", [x], f"{p}/layer_norm")
            g = b.op("Reshape", [x, b.ints(0, dim, -1)], f"{p}/layer_norm")
            g = b.op("InstanceNormalization", [g, b.const(f"{p}.norm.ones", np.ones(dim, np.float32)),
                                               b.const(f"{p}.norm.zeros", np.zeros(dim, np.float32))],
                     f"{p}/layer_norm", epsilon=1e-5)
            g = b.op("Reshape", [g, shape], f"{p}/layer_norm")
            g = b.op("Mul", [g, b.const(f"{p}.layer_norm.weight", (1.0 + 0.1 * b.normal((dim, 1), 1.0)))],
                     f"{p}/layer_norm")
            x = b.op("Add", [g, b.const(f"{p}.layer_norm.bias", b.normal((dim, 1), 0.1))], f"{p}/layer_norm")
        x = gelu(b, x, f"{p}/activation")
        cin = dim
    x = b.op("Transpose", [x], "Transpose", perm=[0, 2, 1])
    x = layer_norm(b, x, "feature_projection.layer_norm", dim)
    x = linear(b, x, "feature_projection.projection", dim, 768)
    out = helper.make_tensor_value_info(b.rename(x, "features"), TensorProto.FLOAT, ["N", "frames", 768])
    return b.model("wav2vec2_frontend", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "samples"])],
                   [out])


def gru_seq2seq() -> onnx.ModelProto:
    """A GRU encoder-decoder (teacher forcing): token embeddings (vocabulary 1000, 128 wide) for `src` [N, S] and
    `tgt` [N, T] -> Transpose to time-major -> encoder GRU (hidden 256) whose last state starts the decoder GRU ->
    Squeeze / Transpose -> Linear(256, 1000) -> logits [N, T, 1000]. torch.nn.GRU's init and
    linear_before_reset=1, as torch.onnx writes it."""
    b = Builder(20261220, (1, 1, 1))
    vocab, emb, hidden = 1000, 128, 256
    k = 1.0 / np.sqrt(hidden)

    def uniform(shape):
        return b.rng.uniform(-k, k, shape).astype(np.float32)

    def embed(tokens, scope):
        table = b.const(f"{scope}.weight", b.normal((vocab, emb), 1.0))
        x = b.op("Gather", [table, tokens], scope, axis=0)
        return b.op("Transpose", [x], scope, perm=[1, 0, 2])  # [S, N, emb]

    def gru(x, scope, h0):
        w, r = b.const(f"{scope}.W", uniform((1, 3 * hidden, emb))), b.const(f"{scope}.R", uniform((1, 3 * hidden, hidden)))
        bias = b.const(f"{scope}.B", uniform((1, 6 * hidden)))
        return b.op("GRU", [x, w, r, bias, "", h0], scope, outputs=2, hidden_size=hidden, linear_before_reset=1)

    src = embed("src", "encoder.embedding")
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", ["src"], "encoder"), b.index(0)], "encoder", axis=0),
                               b.ints(0)], "encoder")
    h0 = b.op("ConstantOfShape", [b.op("Concat", [b.ints(1), batch, b.ints(hidden)], "encoder", axis=0)], "encoder",
              value=numpy_helper.from_array(np.zeros(1, np.float32)))
    _, state = gru(src, "encoder.gru", h0)
    y, _ = gru(embed("tgt", "decoder.embedding"), "decoder.gru", state)
    y = b.op("Transpose", [b.op("Squeeze", [y, b.ints(1)], "decoder")], "decoder", perm=[1, 0, 2])  # [N, T, hidden]
    y = linear(b, y, "decoder.out", hidden, vocab, std=3.0 / np.sqrt(hidden))
    ins = [helper.make_tensor_value_info("src", TensorProto.INT64, ["N", "S"]),
           helper.make_tensor_value_info("tgt", TensorProto.INT64, ["N", "T"])]
    out = helper.make_tensor_value_info(b.rename(y, "logits"), TensorProto.FLOAT, ["N", "T", vocab])
    return b.model("gru_seq2seq", ins, [out])


def check_audio(rng) -> dict:
    t = np.arange(4000) / 16000
    rows = [0.5 * np.sin(2 * np.pi * (200 + 300 * i + 800 * t) * t) + 0.05 * rng.standard_normal(t.size) for i in range(2)]
    return {"x": np.stack(rows).astype(np.float32)}


def check_tokens(rng) -> dict:
    return {"src": rng.integers(0, 1000, (2, 9)).astype(np.int64), "tgt": rng.integers(0, 1000, (2, 7)).astype(np.int64)}


def images(*shape):
    return lambda rng: {"x": smooth_images(rng, shape).astype(np.float32)}


# stem -> (builder, the build-time check's inputs (two samples) from a generator, axis of the batch in the outputs)
MODELS = {
    "zoo-mobilenetv2": (mobilenetv2, images(2, 3, 96, 96), 0),
    "zoo-mobilenetv3-small": (mobilenetv3_small, images(2, 3, 96, 96), 0),
    "zoo-efficientnet-b0": (efficientnet_b0, images(2, 3, 96, 96), 0),
    "zoo-shufflenetv2": (shufflenetv2, images(2, 3, 96, 96), 0),
    "zoo-resnet18": (resnet18, images(2, 3, 96, 96), 0),
    "zoo-yolo-tiny": (yolo_tiny, images(2, 3, 64, 96), 0),
    "zoo-crnn": (crnn, images(2, 1, 32, 100), 1),
    "zoo-resnet50": (resnet50, images(2, 3, 96, 96), 0),
    "zoo-vit-tiny": (vit_tiny, images(2, 3, 96, 96), 0),
    "zoo-wav2vec2-frontend": (wav2vec2_frontend, check_audio, 0),
    "zoo-gru-seq2seq": (gru_seq2seq, check_tokens, 0),
}


def sanity_check(path: str, make_feeds, batch_axis: int) -> str:
    """Runs the model once in onnxruntime on two random samples (smooth images, chirps or token ids); every output
    must be finite, have a std in [0.1, 100], and differ between the two samples. Returns a summary."""
    feeds = make_feeds(np.random.default_rng(7))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    summary = []
    for name, out in zip(names, sess.run(names, feeds)):
        std = float(out.std())
        a, b = np.take(out, 0, axis=batch_axis), np.take(out, 1, axis=batch_axis)
        assert np.isfinite(out).all(), f"{path}: {name} is not finite"
        assert 0.1 <= std <= 100, f"{path}: {name} std {std}"
        assert np.abs(a - b).max() > 0.01 * std, f"{path}: {name} does not depend on the input"
        summary.append(f"{name} {list(out.shape)} std {std:.2f} max|x| {np.abs(out).max():.1f}")
    return ", ".join(summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models_dir")
    ap.add_argument("--force", action="store_true", help="rewrite existing models")
    args = ap.parse_args()
    assert ort.__version__ == ORT_VERSION, f"onnxruntime {ort.__version__}, want {ORT_VERSION}"
    os.makedirs(args.models_dir, exist_ok=True)
    for stem, (build, make_feeds, batch_axis) in MODELS.items():
        path = os.path.join(args.models_dir, f"{stem}.onnx")
        if os.path.exists(path) and not args.force:
            continue
        model = build()
        onnx.checker.check_model(model, full_check=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=args.models_dir)
        os.close(fd)
        try:
            onnx.save(model, tmp)
            os.chmod(tmp, 0o644)
            summary = sanity_check(tmp, make_feeds, batch_axis)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"make_zoo.py: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB): {summary}")


if __name__ == "__main__":
    main()

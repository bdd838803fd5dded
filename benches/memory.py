"""Peak resident memory of Kiln and ONNX Runtime on the same model and inputs, each in a fresh process.

    python benches/memory.py KILN_BINARY MODELS_DIR [--threads N]

For every model found in MODELS_DIR it writes random inputs (from the model's declared inputs: symbolic
dims from the table below, integer ids small, masks all ones, past KV of length 0), then runs
`kiln run` and a Python process that loads the model into onnxruntime and runs it once, both on those
inputs, and reads each process's own peak resident set (`VmHWM` of /proc/self/status at the end of
the run: `kiln run` prints it; `ru_maxrss` would also count the pages of the parent a child was forked
from). ONNX Runtime's figure includes the Python interpreter with numpy and onnxruntime imported; that
baseline is measured alone and printed beside it. Prints a markdown table. Linux only.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

# file, label, symbolic-dim values (by name; others 1), fixed input shapes by input name
MODELS = [
    ("paraphrase-MiniLM-L3-v2.onnx", "paraphrase-MiniLM-L3-v2, 1 x 64 tokens", {}, {"*ids*": (1, 64), "*mask*": (1, 64)}),
    ("bert-base.onnx", "bert-base (random weights), 1 x 64 tokens", {}, {"*": (1, 64)}),
    ("llm/smollm2-135m/model.onnx", "SmolLM2-135M, 8-token prefill", {"sequence_length": 8, "total_sequence_length": 8, "past_sequence_length": 0}, {}),
    ("ch_PP-OCRv4_det_infer.onnx", "PP-OCRv4 det, 1x3x320x320", {}, {"*": (1, 3, 320, 320)}),
    ("ch_PP-OCRv4_rec_infer.onnx", "PP-OCRv4 rec, 1x3x48x320", {}, {"*": (1, 3, 48, 320)}),
    ("silero_vad.onnx", "Silero VAD v5, 576 samples", {}, {"input": (1, 576), "state": (2, 1, 128), "sr": ()}),
    ("zoo-resnet18.onnx", "zoo-resnet18, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-mobilenetv2.onnx", "zoo-mobilenetv2, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-mobilenetv3-small.onnx", "zoo-mobilenetv3-small, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-shufflenetv2.onnx", "zoo-shufflenetv2, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-efficientnet-b0.onnx", "zoo-efficientnet-b0, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-yolo-tiny.onnx", "zoo-yolo-tiny, 320x320", {"H": 320, "W": 320}, {}),
    ("zoo-crnn.onnx", "zoo-crnn, 1x32x320", {"H": 32, "W": 320}, {}),
    ("zoo-resnet50.onnx", "zoo-resnet50, 224x224", {"H": 224, "W": 224}, {}),
    ("zoo-vit-tiny.onnx", "zoo-vit-tiny, 96x96", {}, {}),
    ("zoo-wav2vec2-frontend.onnx", "zoo-wav2vec2-frontend, 1 s of 16 kHz audio", {"samples": 16000}, {}),
    ("zoo-gru-seq2seq.onnx", "zoo-gru-seq2seq, 32 + 32 tokens", {"S": 32, "T": 32}, {}),
]

ORT_RUN = r"""
import sys, numpy as np, onnxruntime as ort
model, d, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
s.run(None, {i.name: np.load(f"{d}/{i.name}.npy") for i in s.get_inputs()})
print("process resident peak", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], "kB")
"""
ORT_BASELINE = "import numpy, onnxruntime\n" + ORT_RUN.splitlines()[-1]
MAKE_INPUTS = "import sys; sys.path.insert(0, sys.argv[1]); import memory; memory.make_inputs(*sys.argv[2:])"


def match(pattern, name):
    if pattern == "*":
        return True
    if pattern.startswith("*") and pattern.endswith("*"):
        return pattern[1:-1] in name
    return pattern == name


def make_inputs(model, label, out):
    import onnxruntime as ort

    dims, shapes = next((d, sh) for f, lab, d, sh in MODELS if lab == label)
    rng = np.random.default_rng(0)
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for i in s.get_inputs():
        shape = next((v for p, v in shapes.items() if match(p, i.name)), None)
        if shape is None:
            shape = tuple(d if isinstance(d, int) else dims.get(d, 1) for d in i.shape)
        t = i.type
        if "int64" in t or "int32" in t:
            dt = np.int64 if "int64" in t else np.int32
            if "mask" in i.name:
                a = np.ones(shape, dt)
            elif "position" in i.name:
                a = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
            elif i.name == "sr":
                a = np.array(16000, dt)
            else:
                a = rng.integers(1, 100, size=shape).astype(dt)
        else:
            a = rng.standard_normal(shape).astype(np.float32) * (0.0 if "past" in i.name else 1.0)
        np.save(os.path.join(out, f"{i.name}.npy"), a)
    return [i.name for i in s.get_inputs()]


def peak_mib(cmd, env=None):
    """Runs `cmd` and returns the `process resident peak` it printed, in MiB."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {p.stderr.strip()[-300:]}")
    for line in p.stdout.splitlines():
        if "resident peak" in line:
            value = line.split("resident peak")[1].split()
            return float(value[0]) / (1024.0 if value[1] == "kB" else 1.0)
    raise RuntimeError(f"no resident peak in the output of {cmd[0]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("models")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    base = peak_mib([sys.executable, "-c", ORT_BASELINE])
    print(f"Peak resident memory (MiB, `VmHWM` of a fresh process: load, build, one run), {args.threads} thread(s).")
    print(f"ONNX Runtime's process includes Python with numpy and onnxruntime imported: {base:.0f} MiB alone.")
    print()
    print("| model | file MB | Kiln | ORT | Kiln / ORT | ORT less Python |")
    print("|---|---|---|---|---|---|")
    for file, label, dims, shapes in MODELS:
        path = os.path.join(args.models, file)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as d:
            # In a child: loading the model here would make this process large.
            here = os.path.dirname(os.path.abspath(__file__))
            subprocess.run([sys.executable, "-c", MAKE_INPUTS, here, path, label, d], check=True)
            names = sorted(f[:-4] for f in os.listdir(d) if f.endswith(".npy"))
            kiln_cmd = [args.kiln, "run", path, "-o", os.path.join(d, "out")]
            for n in names:
                kiln_cmd += ["-i", f"{n}={os.path.join(d, n + '.npy')}"]
            try:
                k = peak_mib(kiln_cmd, env)
                o = peak_mib([sys.executable, "-c", ORT_RUN, path, d, str(args.threads)])
            except RuntimeError as e:
                print(f"| {label} | | fails: {str(e).splitlines()[0][:80]} | | | |")
                continue
        mb = os.path.getsize(path) / 1e6
        print(f"| {label} | {mb:.1f} | {k:.0f} | {o:.0f} | {k / o:.2f} | {o - base:.0f} |")


if __name__ == "__main__":
    main()

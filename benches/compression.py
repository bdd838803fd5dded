"""Every `kiln quantize` / `kiln prune` mode on a text encoder, a CNN and an OCR recognizer: file size,
latency of Kiln and ONNX Runtime on the same file, and accuracy against the fp32 original.

    python benches/compression.py KILN_BINARY MODELS_DIR [--only NAME[,NAME...]] [--threads 1]

Per model the inputs are those of benches/memory.py (one sample), and static int8 calibrates on four
more samples of the same shapes (standard-normal floats, token ids below 1000, masks of ones). For
each variant: the file's size; `kiln bench -n 50` p50 and onnxruntime's median of 50 runs, interleaved
per variant (ratios only: the dev machine is noisy); and the cosine similarity of each output of Kiln
running the variant with onnxruntime running the fp32 original (the lowest over the outputs), with
the largest absolute difference beside it. Prints a markdown table per model.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import latency  # noqa: E402
import memory  # noqa: E402

MODELS = [
    ("paraphrase-MiniLM-L3-v2.onnx", "paraphrase-MiniLM-L3-v2, 1 x 64 tokens", "text encoder"),
    ("zoo-resnet18.onnx", "zoo-resnet18, 224x224", "CNN"),
    ("ch_PP-OCRv4_rec_infer.onnx", "PP-OCRv4 rec, 1x3x48x320", "OCR recognizer"),
]

VARIANTS = [
    ("fp32", None),
    ("fp16", ["quantize", "--mode", "fp16"]),
    ("dynamic int8", ["quantize", "--mode", "dynamic-int8"]),
    ("static int8 (minmax)", ["quantize", "--mode", "static-int8"]),
    ("int4-weight", ["quantize", "--mode", "int4-weight"]),
    ("pruned 50%", ["prune", "--amount", "0.5"]),
    ("pruned 2:4", ["prune", "--structured", "2:4"]),
]


def calibration(sample_dir, out, n=4):
    rng = np.random.default_rng(7)
    for i in range(n):
        d = os.path.join(out, str(i))
        os.makedirs(d)
        for f in sorted(os.listdir(sample_dir)):
            if not f.endswith(".npy"):
                continue
            x = np.load(os.path.join(sample_dir, f))
            if np.issubdtype(x.dtype, np.floating):
                y = rng.standard_normal(x.shape).astype(x.dtype)
            elif "mask" in f:
                y = np.ones_like(x)
            else:
                y = rng.integers(0, 1000, size=x.shape).astype(x.dtype)
            np.save(os.path.join(d, f), y)


def kiln_outputs(kiln, path, d, out):
    cmd = [kiln, "run", path, "-o", out]
    for f in sorted(os.listdir(d)):
        if f.endswith(".npy"):
            cmd += ["-i", f"{f[:-4]}={d}/{f}"]
    subprocess.run(cmd, check=True, capture_output=True)


def clean(name):
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("models")
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    args = ap.parse_args()
    only = [o for o in args.only.split(",") if o]
    variants = [v for v in args.variants.split(",") if v]
    for file, label, kind in MODELS:
        path = os.path.join(args.models, file)
        if (only and not any(o in file for o in only)) or not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as d:
            inputs = os.path.join(d, "inputs")
            os.makedirs(inputs)
            memory.make_inputs(path, label, inputs)
            cal = os.path.join(d, "calibration")
            calibration(inputs, cal)
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = {i.name: np.load(f"{inputs}/{i.name}.npy") for i in s.get_inputs()}
            names = [o.name for o in s.get_outputs()]
            ref = s.run(None, feeds)
            print(f"\n#### {label} ({kind}), {args.threads} thread(s)\n")
            print("| variant | file MB | Kiln ms | ORT ms | Kiln / ORT | min cosine vs fp32 | max abs diff |")
            print("|---|---|---|---|---|---|---|")
            for name, cmd in VARIANTS:
                if variants and name not in variants:
                    continue
                target = path
                if cmd:
                    target = os.path.join(d, clean(name) + ".onnx")
                    extra = ["--calibration", cal] if "static-int8" in cmd else []
                    full = [args.kiln, cmd[0], path, target] + cmd[1:] + extra
                    if cmd[0] == "quantize":
                        full.append("--no-report")
                    r = subprocess.run(full, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"| {name} | failed: {r.stderr.strip().splitlines()[-1]} | | | | | |", flush=True)
                        continue
                size = os.path.getsize(target) / 1e6
                try:
                    k = latency.kiln_p50(args.kiln, target, inputs, args.threads, [], n=50)
                except subprocess.CalledProcessError as e:
                    k = float("nan")
                    print(f"<!-- kiln bench failed on {name}: {e.stderr.strip()[-200:]} -->")
                try:
                    o = latency.ort_p50(target, inputs, args.threads, n=50)
                except Exception as e:  # noqa: BLE001 (an ORT load error is reported, not fatal)
                    o = float("nan")
                    print(f"<!-- onnxruntime failed on {name}: {str(e)[:200]} -->")
                out = os.path.join(d, "out-" + clean(name))
                os.makedirs(out)
                kiln_outputs(args.kiln, target, inputs, out)
                cosines, diffs = [], []
                for n, r in zip(names, ref):
                    g = np.load(os.path.join(out, clean(n) + ".npy")).astype(np.float64).ravel()
                    r = r.astype(np.float64).ravel()
                    den = np.linalg.norm(g) * np.linalg.norm(r)
                    cosines.append(float(g @ r / den) if den > 0 else 1.0)
                    diffs.append(float(np.max(np.abs(g - r))) if r.size else 0.0)
                print(
                    f"| {name} | {size:.1f} | {k:.2f} | {o:.2f} | {k / o:.2f} | {min(cosines):.6f} | {max(diffs):.3g} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

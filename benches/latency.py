"""Kiln beside ONNX Runtime on the models of benches/memory.py, same inputs, runs interleaved.

    python benches/latency.py KILN_BINARY MODELS_DIR [--only NAME[,NAME...]] [--rounds N] [--threads 1,2]
                              [--baseline-env VAR=VALUE] [--baseline-kiln OTHER_KILN_BINARY]

Per model and thread count (1, 2), each round runs `kiln bench --run-on-caller` (the library's
default: the calling thread walks the plan), `kiln bench` (each inference on a pool worker) and
onnxruntime's median of 100 runs in this process, one after the other, so load from other processes
falls on all three alike. Prints a markdown table of p50 milliseconds and Kiln (pool) / ORT.

`--baseline-env VAR=VALUE` replaces the first column by `kiln bench` with that environment variable set
(an A/B of one switch, e.g. `KILN_NHWC=1`), still interleaved with the other two; `--baseline-kiln PATH`
by `kiln bench` of another build (an A/B of two commits).

`--variants SUFFIX[,SUFFIX...]` runs, instead of each model `NAME.onnx`, the files `NAME.SUFFIX.onnx`
beside it that exist (e.g. `static-int8-qdq,static-int8-qop`: the zoo CNNs as ONNX Runtime's static
quantizer writes them, models/make_quantized.py) on the model's inputs.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory  # noqa: E402


def ort_p50(path, d, threads, n=100):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.load(f"{d}/{i.name}.npy") for i in s.get_inputs()}
    for _ in range(10):
        s.run(None, feeds)
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - a)
    return float(np.median(ts)) * 1e3


def kiln_p50(kiln, path, d, threads, extra, n=100, env=None):
    cmd = [kiln, "bench", path, "--threads", str(threads), "-n", str(n)] + extra
    for f in sorted(os.listdir(d)):
        if f.endswith(".npy"):
            cmd += ["-i", f"{f[:-4]}={d}/{f}"]
    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=full_env).stdout
    line = next(l for l in out.splitlines() if l.startswith("latency"))
    return float(line.split()[5])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("models")
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--baseline-env", default="")
    ap.add_argument("--baseline-kiln", default="")
    ap.add_argument("--variants", default="")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    only = [o for o in args.only.split(",") if o]
    threads = [int(t) for t in args.threads.split(",") if t]
    base_env = dict([args.baseline_env.split("=", 1)]) if args.baseline_env else None
    first = f"Kiln, {args.baseline_env}" if base_env else "Kiln, caller walks the plan"
    if args.baseline_kiln:
        first = f"Kiln, {args.baseline_kiln}"
    print(f"| model | threads | {first} | Kiln, run on the pool | ORT | Kiln (pool) / ORT |")
    print("|---|---|---|---|---|---|")
    for file, label, _, _ in memory.MODELS:
        path = os.path.join(args.models, file)
        if (only and not any(o in file for o in only)) or not os.path.exists(path):
            continue
        runs = [(path, label)]
        if variants:
            stem = path[: -len(".onnx")]
            runs = [(f"{stem}.{v}.onnx", f"{label}, {v}") for v in variants if os.path.exists(f"{stem}.{v}.onnx")]
        with tempfile.TemporaryDirectory() as d:
            memory.make_inputs(path, label, d)
            for (run, name), t in [(r, t) for r in runs for t in threads]:
                rows = []
                for _ in range(args.rounds):
                    if args.baseline_kiln:
                        c = kiln_p50(args.baseline_kiln, run, d, t, [], env=base_env)
                    elif base_env:
                        c = kiln_p50(args.kiln, run, d, t, [], env=base_env)
                    else:
                        c = kiln_p50(args.kiln, run, d, t, ["--run-on-caller"])
                    p = kiln_p50(args.kiln, run, d, t, [])
                    rows.append((c, p, ort_p50(run, d, t)))
                col = lambda i: " / ".join(f"{r[i]:.2f}" for r in rows)  # noqa: E731
                ratio = " / ".join(f"{p / o:.2f}" for _, p, o in rows)
                print(f"| {name} | {t} | {col(0)} | {col(1)} | {col(2)} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

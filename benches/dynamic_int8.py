"""Dynamic int8 beside fp32, Kiln beside ONNX Runtime, on files from ONNX Runtime's `quantize_dynamic`.

    python benches/dynamic_int8.py KILN_BINARY MODELS_DIR [--rounds 2] [--threads 1,2]

MODELS_DIR holds `paraphrase-MiniLM-L3-v2.onnx` and `bert-base.onnx` with their `.dyn-int8.onnx`
twins (models/fetch.sh, models/make_bert.py, models/make_quantized.py). Per model, input and thread
count, each round runs one after the other: `kiln bench` p50 on the fp32 file and on the int8 file,
the int8 file again with `KILN_NO_AMX=1` (the AVX-512 VNNI kernel instead of AMX; only where the CPU
has AMX), and onnxruntime's median of the same number of runs on both files (Python, default graph
optimizations, `intra_op_num_threads` = threads), so load from other processes falls on all alike.
Token ids are uniform below 1000, masks all ones. Prints a markdown table of ms (one value per round)
and the ratios of the per-column minima.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import kiln_p50, ort_p50  # noqa: E402

CASES = [
    ("paraphrase-MiniLM-L3-v2", "MiniLM-L3", (8, 64)),
    ("bert-base", "bert-base", (1, 128)),
    ("bert-base", "bert-base", (8, 64)),
]


def has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    amx = has_amx()
    cols = ["Kiln fp32", "Kiln int8"] + (["Kiln int8, KILN_NO_AMX=1"] if amx else []) + ["ORT fp32", "ORT int8"]
    print("| model, input | threads | " + " | ".join(cols) + " | Kiln int8 / ORT int8 | Kiln fp32 / Kiln int8 |")
    print("|" + "---|" * (len(cols) + 4))
    rng = np.random.default_rng(3)
    for stem, label, (b, s) in CASES:
        fp32 = os.path.join(args.models, f"{stem}.onnx")
        int8 = os.path.join(args.models, f"{stem}.dyn-int8.onnx")
        with tempfile.TemporaryDirectory() as d:
            np.save(os.path.join(d, "input_ids.npy"), rng.integers(0, 1000, (b, s)).astype(np.int64))
            np.save(os.path.join(d, "attention_mask.npy"), np.ones((b, s), np.int64))
            runs = 10 if "bert" in stem and b * s > 256 else 30
            for t in [int(x) for x in args.threads.split(",")]:
                got = {c: [] for c in cols}
                for _ in range(args.rounds):
                    got["Kiln fp32"].append(kiln_p50(args.kiln, fp32, d, t, [], runs))
                    got["Kiln int8"].append(kiln_p50(args.kiln, int8, d, t, [], runs))
                    if amx:
                        got["Kiln int8, KILN_NO_AMX=1"].append(kiln_p50(args.kiln, int8, d, t, [], runs, {"KILN_NO_AMX": "1"}))
                    got["ORT fp32"].append(ort_p50(fp32, d, t, runs))
                    got["ORT int8"].append(ort_p50(int8, d, t, runs))
                best = {c: min(v) for c, v in got.items()}
                cells = [", ".join(f"{x:.1f}" for x in got[c]) for c in cols]
                print(
                    f"| {label}, {b} x {s} | {t} | " + " | ".join(cells)
                    + f" | {best['Kiln int8'] / best['ORT int8']:.2f} | {best['Kiln fp32'] / best['Kiln int8']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

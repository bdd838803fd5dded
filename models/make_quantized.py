"""Quantizes real models with ONNX Runtime's own quantizer, the way Kiln's users get int8 models today, for
Kiln's golden tests (crates/kiln/tests/real_models.rs) and benchmarks:

    python models/make_quantized.py MODELS_DIR [--with-bert-base]

For each source model present in MODELS_DIR (MiniLM-L3 and bert-tiny; bert-base too with --with-bert-base,
for scripts/bench.sh: ~20 s) writes MODELS_DIR/<stem>.dyn-int8.onnx with
`onnxruntime.quantization.quantize_dynamic` at its defaults (QOperator form: DynamicQuantizeLinear on the
activations, MatMulInteger with int8 per-tensor weights, Cast and Mul back to float). Existing files are kept:
the output is a pure function of the source model and the pinned onnxruntime (1.32.0).
"""
import argparse
import os
import tempfile

import onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic

ORT_VERSION = "1.32.0"
SOURCES = ["paraphrase-MiniLM-L3-v2", "bert-tiny"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models_dir")
    ap.add_argument("--with-bert-base", action="store_true")
    args = ap.parse_args()
    assert ort.__version__ == ORT_VERSION, f"onnxruntime {ort.__version__}, want {ORT_VERSION}"
    for stem in SOURCES + (["bert-base"] if args.with_bert_base else []):
        src = os.path.join(args.models_dir, f"{stem}.onnx")
        dst = os.path.join(args.models_dir, f"{stem}.dyn-int8.onnx")
        if not os.path.exists(src) or os.path.exists(dst):
            continue
        # Written beside the target and renamed, so an interrupted run leaves no half file.
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=args.models_dir)
        os.close(fd)
        quantize_dynamic(src, tmp)
        os.replace(tmp, dst)
        print(f"make_quantized.py: {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

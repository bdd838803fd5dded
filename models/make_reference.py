"""Writes deterministic inputs and ONNX Runtime's outputs for the real models in a directory (models/fetch.sh,
models/make_bert.py, models/make_quantized.py and models/make_zoo.py put them there), for Kiln's golden tests (crates/kiln/tests/real_models.rs):

    python models/make_reference.py MODELS_DIR [--force]

For every known model file present in MODELS_DIR and every case below it writes
    MODELS_DIR/<model stem>.ref/<case>/inputs/<input name>.npy
    MODELS_DIR/<model stem>.ref/<case>/expected/<output name>.npy   (characters outside [A-Za-z0-9_.-] become _)
    MODELS_DIR/<model stem>.ref/<case>/.complete                      (written last; existing cases are skipped)
One .npy per tensor (not .npz) so the Rust side reads them with plain `npyz`.
ONNX Runtime runs on CPU with all graph optimizations disabled and one thread, so the reference is the graph as
written.
"""
import argparse
import os
import re
import shutil

import numpy as np
import onnxruntime as ort

ORT_VERSION = "1.32.0"


def clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def token_batch(rng, batch: int, seq: int, pad_to=None):
    """[CLS] random word pieces [SEP], then zero padding; attention mask 1 on real tokens."""
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    lengths = pad_to if pad_to is not None else [seq] * batch
    for b, n in enumerate(lengths):
        ids[b, 0] = 101
        ids[b, 1 : n - 1] = rng.integers(1000, 30000, n - 2)
        ids[b, n - 1] = 102
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def text_image(rng, batch: int, height: int, width: int, channels: int = 3):
    """Light noisy background with dark bars of random size (text-line-like), normalized like PaddleOCR."""
    img = np.full((batch, channels, height, width), 0.9, np.float32)
    for b in range(batch):
        for _ in range(6):
            h = int(rng.integers(4, max(5, height // 3)))
            w = int(rng.integers(8, max(9, width // 2)))
            y = int(rng.integers(0, height - h))
            x = int(rng.integers(0, width - w))
            img[b, :, y : y + h, x : x + w] = rng.uniform(0.0, 0.3)
    img += rng.normal(0.0, 0.05, img.shape).astype(np.float32)
    return {"x": ((img - 0.5) / 0.5).astype(np.float32)}


def photo(rng, batch: int, height: int, width: int):
    """Random plane waves per channel plus pixel noise: about unit variance, like an ImageNet-normalized photo."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    freq = rng.uniform(0.5, 4.0, (batch, 3, 2, 1, 1))
    phase = rng.uniform(0.0, 1.0, (batch, 3, 1, 1))
    img = np.sin(2 * np.pi * (freq[:, :, 0] * xx + freq[:, :, 1] * yy + phase))
    img += 0.3 * rng.standard_normal(img.shape)
    return {"x": img.astype(np.float32)}


def audio(rng, batch: int, samples: int, sr: int):
    """A chirp plus noise per batch row, with a small random recurrent state."""
    t = np.arange(samples, dtype=np.float64) / sr
    rows = []
    for b in range(batch):
        f0 = 200.0 + 150.0 * b
        rows.append(0.5 * np.sin(2 * np.pi * (f0 + 800.0 * t) * t) + 0.05 * rng.standard_normal(samples))
    return {
        "input": np.stack(rows).astype(np.float32),
        "state": (0.1 * rng.standard_normal((2, batch, 128))).astype(np.float32),
        "sr": np.array(sr, np.int64),
    }


def tokens(rng, batch: int, seq: int):
    return {"tokens": rng.integers(0, 1000, (batch, seq)).astype(np.int64)}


def cases(stem: str, rng):
    """(case name, feeds) per model; None when the stem is not a known model."""
    # models/make_quantized.py names its outputs <source stem>.dyn-int8: same inputs as the source.
    if stem.startswith("paraphrase-MiniLM-L3-v2") or stem.startswith("bert-"):
        return [
            ("b1_s11", token_batch(rng, 1, 11)),
            ("b3_s16_padded", token_batch(rng, 3, 16, pad_to=[16, 9, 4])),
        ]
    if stem.startswith("bilstm-tagger"):
        return [("b1_s7", tokens(rng, 1, 7)), ("b4_s33", tokens(rng, 4, 33))]
    if stem == "ch_PP-OCRv4_det_infer":
        return [("b1_96x128", text_image(rng, 1, 96, 128)), ("b2_64x96", text_image(rng, 2, 64, 96))]
    if stem == "ch_PP-OCRv4_rec_infer":
        return [("b1_48x160", text_image(rng, 1, 48, 160)), ("b2_48x96", text_image(rng, 2, 48, 96))]
    # models/make_zoo.py: image classifiers take any size (global pooling before the classifier); zoo-yolo-tiny
    # needs multiples of 32 (its FPN concatenates upsampled maps); zoo-crnn takes text lines of height 32
    if stem == "zoo-yolo-tiny":
        return [("b1_96x128", photo(rng, 1, 96, 128)), ("b2_64x64", photo(rng, 2, 64, 64))]
    if stem == "zoo-resnet50":
        # small images: the golden test runs at four levels in a debug build
        return [("b1_32x32", photo(rng, 1, 32, 32)), ("b2_32x40", photo(rng, 2, 32, 40))]
    if stem == "zoo-vit-tiny":  # learned position embeddings for 36 patches: 96x96 only
        return [("b1_96x96", photo(rng, 1, 96, 96)), ("b2_96x96", photo(rng, 2, 96, 96))]
    if stem == "zoo-wav2vec2-frontend":
        return [("b1_3200", {"x": audio(rng, 1, 3200, 16000)["input"]}),
                ("b2_1600", {"x": audio(rng, 2, 1600, 16000)["input"]})]
    if stem == "zoo-gru-seq2seq":
        return [("b1_s9_t5", {"src": tokens(rng, 1, 9)["tokens"], "tgt": tokens(rng, 1, 5)["tokens"]}),
                ("b3_s13_t11", {"src": tokens(rng, 3, 13)["tokens"], "tgt": tokens(rng, 3, 11)["tokens"]})]
    if stem == "zoo-crnn":
        return [("b1_32x64", text_image(rng, 1, 32, 64, channels=1)),
                ("b3_32x100", text_image(rng, 3, 32, 100, channels=1))]
    if stem.startswith("zoo-"):
        return [("b1_96x96", photo(rng, 1, 96, 96)), ("b2_64x80", photo(rng, 2, 64, 80))]
    if stem.startswith("silero_vad"):
        # v5 takes 512 (16 kHz) / 256 (8 kHz) new samples plus 64 / 32 samples of context; `sr` picks the If branch
        out = [("sr16k_b1", audio(rng, 1, 576, 16000)), ("sr16k_b2", audio(rng, 2, 576, 16000))]
        if "16k" not in stem:
            out += [("sr8k_b1", audio(rng, 1, 288, 8000)), ("sr8k_b2", audio(rng, 2, 288, 8000))]
        return out
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models_dir")
    ap.add_argument("--force", action="store_true", help="rewrite existing cases")
    args = ap.parse_args()
    assert ort.__version__ == ORT_VERSION, f"onnxruntime {ort.__version__}, want {ORT_VERSION}"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    for file in sorted(os.listdir(args.models_dir)):
        if not file.endswith(".onnx"):
            continue
        stem = file[: -len(".onnx")]
        rng = np.random.default_rng(sum(stem.encode()))
        todo = cases(stem, rng)
        if todo is None:
            print(f"make_reference.py: no cases for {file}, skipped")
            continue
        sess = None
        for case, feeds in todo:
            root = os.path.join(args.models_dir, f"{stem}.ref", case)
            if os.path.exists(os.path.join(root, ".complete")) and not args.force:
                continue
            if sess is None:
                sess = ort.InferenceSession(
                    os.path.join(args.models_dir, file), opts, providers=["CPUExecutionProvider"]
                )
            names = [o.name for o in sess.get_outputs()]
            outs = sess.run(names, feeds)
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(os.path.join(root, "inputs"))
            os.makedirs(os.path.join(root, "expected"))
            for name, value in feeds.items():
                assert clean(name) == name, f"input name {name!r} is not file-safe"
                np.save(os.path.join(root, "inputs", f"{name}.npy"), value)
            for name, value in zip(names, outs):
                np.save(os.path.join(root, "expected", f"{clean(name)}.npy"), value)
            with open(os.path.join(root, ".complete"), "w") as f:
                f.write(f"onnxruntime {ORT_VERSION}\n")
            shapes = ", ".join(f"{n} {list(o.shape)}" for n, o in zip(names, outs))
            print(f"make_reference.py: {stem}/{case}: {shapes}")


if __name__ == "__main__":
    main()

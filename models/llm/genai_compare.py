#!/usr/bin/env python3
"""Logits of a make_genai.py model (GroupQueryAttention form) vs Kiln's decomposed model, on plain onnxruntime.

    genai_compare.py GENAI_DIR DECOMPOSED_DIR [--prompt-tokens 10] [--decode-steps 4] [--threads 2]

Both come from the same GGUF weights (make_genai.py stages exactly make_smollm2.py's dequantized tensors), so
the fp32 GenAI build should agree with DECOMPOSED_DIR/model.onnx to float32 rounding. Runs each model's
prefill on the first --prompt-tokens ids of the chat prompt (tokenized with DECOMPOSED_DIR/tokenizer.json),
then --decode-steps greedy steps feeding the previous step's present.* back as past (GenAI graph: separate
past/present, not og's shared buffer; attention_mask all ones; no position_ids input: GQA derives positions
from seqlens_k = sum(mask) - 1). Prints max |diff| of the last position's logits and of all prefill positions,
the argmax agreement, and the decode-step diffs. Needs onnxruntime, numpy, tokenizers.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(os.path.join(path, "model.onnx"), so, providers=["CPUExecutionProvider"])


def empty_past(sess, kv_heads, head_dim):
    return {i.name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}


def step(sess, ids, total, past, with_pos):
    feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64), **past}
    if with_pos:
        feed["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None]
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed)))
    new_past = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    return outs["logits"], new_past


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("genai_dir")
    ap.add_argument("decomposed_dir")
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(a.decomposed_dir, "tokenizer.json"))
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False).ids[: a.prompt_tokens]
    cfg = json.load(open(os.path.join(a.decomposed_dir, "config.json")))
    kvh, hd = cfg["num_key_value_heads"], cfg["head_dim"]

    g, d = session(a.genai_dir, a.threads), session(a.decomposed_dir, a.threads)
    print("genai inputs:", [(i.name, i.type, i.shape) for i in g.get_inputs()[:3]], "...")
    lg, pg = step(g, ids, len(ids), empty_past(g, kvh, hd), False)
    ld, pd = step(d, ids, len(ids), empty_past(d, kvh, hd), True)
    diff = np.abs(lg - ld)
    print(f"prefill {len(ids)} tokens {ids}: last-position logits max|diff| {diff[0, -1].max():.3e} "
          f"(max|logit| {np.abs(ld[0, -1]).max():.2f}), all positions max|diff| {diff.max():.3e}, "
          f"argmax equal at {int((lg.argmax(-1) == ld.argmax(-1)).sum())}/{len(ids)} positions")
    k0 = np.abs(pg["past_key_values.0.key"] - pd["past_key_values.0.key"]).max()
    v0 = np.abs(pg["past_key_values.0.value"] - pd["past_key_values.0.value"]).max()
    print(f"present.0.key max|diff| {k0:.3e} (both after RoPE), present.0.value max|diff| {v0:.3e}")
    total = len(ids)
    nxt = int(ld[0, -1].argmax())
    for s in range(a.decode_steps):
        total += 1
        lg, pg = step(g, [nxt], total, pg, False)
        ld, pd = step(d, [nxt], total, pd, True)
        print(f"decode step {s + 1} (token {nxt}, total {total}): logits max|diff| {np.abs(lg - ld).max():.3e}, "
              f"argmax genai {int(lg[0, -1].argmax())} decomposed {int(ld[0, -1].argmax())}")
        nxt = int(ld[0, -1].argmax())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Check a model directory written by make_smollm2.py with onnxruntime (the reference Kiln is compared with).

    verify_smollm2.py DIR [--tokens 20] [--threads 2] [--ignore-eos]

1. chat: applies tokenizer_config.json's chat_template (jinja2, add_generation_prompt) to
   "What is the capital of France?", encodes it with tokenizer.json (`tokenizers`), greedy-decodes
   up to --tokens tokens (stopping at an eos id unless --ignore-eos) through the past_key_values loop and
   prints the text with prefill / per-token times;
   on a model with all of the GGUF's layers the answer must contain "Paris".
2. incremental: the prompt run at once vs token by token with past gives the same logits (max |diff| <= 1e-4).
3. chunked: the prompt in two chunks (second chunk with past > 0, seq > 1) vs at once (<= 1e-4).
4. left padding: a batch of two prompts of different lengths, the shorter left-padded (attention_mask 0,
   position_ids = cumsum(mask) - 1), prefill plus 3 greedy decode steps vs each prompt alone (<= 1e-4).
Exits non-zero when a check fails. Needs numpy, onnxruntime, tokenizers, jinja2.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

TOL = 1e-4


class Decoder:
    def __init__(self, model_dir, threads):
        import onnxruntime as ort

        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = json.load(f)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        t0 = time.perf_counter()
        self.sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t0
        self.L = self.cfg["num_hidden_layers"]
        self.kvh = self.cfg["num_key_value_heads"]
        self.hd = self.cfg["head_dim"]
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def empty_past(self, batch):
        z = np.zeros((batch, self.kvh, 0, self.hd), np.float32)
        return [z] * (2 * self.L)

    def step(self, ids, mask, pos, past):
        """ids/pos [B, S], mask [B, past+S] (int64); past: list of 2L arrays -> (logits, present list)."""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.L):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.sess.run(self.out_names, feed)
        return out[0], out[1:]


def i64(a):
    return np.asarray(a, dtype=np.int64)


def chat_ids(model_dir, question):
    import jinja2
    from tokenizers import Tokenizer

    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    text = env.from_string(tcfg["chat_template"]).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True,
        bos_token=tcfg["bos_token"], eos_token=tcfg["eos_token"])
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return text, tok.encode(text, add_special_tokens=False).ids, tok


def greedy(dec, prompt, n, stop_ids):
    ids = i64([prompt])
    past = dec.empty_past(1)
    t0 = time.perf_counter()
    logits, past = dec.step(ids, np.ones_like(ids), i64([np.arange(len(prompt))]), past)
    prefill = time.perf_counter() - t0
    out, steps = [], []
    total = len(prompt)
    nxt = int(np.argmax(logits[0, -1]))
    while True:
        out.append(nxt)
        if nxt in stop_ids or len(out) >= n:
            break
        t0 = time.perf_counter()
        total += 1
        logits, past = dec.step(i64([[nxt]]), np.ones((1, total), np.int64), i64([[total - 1]]), past)
        steps.append(time.perf_counter() - t0)
        nxt = int(np.argmax(logits[0, -1]))
    return out, prefill, steps


def check(name, diff, failures):
    ok = diff <= TOL
    print(f"  {name}: max |diff| {diff:.2e} {'ok' if ok else 'FAIL'} (tolerance {TOL:g})")
    if not ok:
        failures.append(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ignore-eos", action="store_true", help="decode all --tokens tokens (for timing)")
    a = ap.parse_args()
    failures = []
    dec = Decoder(a.model_dir, a.threads)
    with open(os.path.join(a.model_dir, "generation_config.json")) as f:
        stop = set() if a.ignore_eos else set(json.load(f)["eos_token_id"])
    full = dec.L == dec.cfg["kiln"]["num_hidden_layers_in_source"]
    print(f"verify_smollm2: {a.model_dir}: {dec.L} layers, {dec.cfg['kiln']['weights']} weights, "
          f"session load {dec.load_s:.2f} s, {a.threads} threads")

    # 1. chat
    text, prompt, tok = chat_ids(a.model_dir, "What is the capital of France?")
    out, prefill, steps = greedy(dec, prompt, a.tokens, stop)
    answer = tok.decode(out, skip_special_tokens=True)
    per_tok = 1000 * float(np.mean(steps)) if steps else float("nan")
    print(f"  chat: prompt {len(prompt)} tokens, prefill {1000 * prefill:.0f} ms, decode {len(steps)} steps "
          f"{per_tok:.1f} ms/token")
    print(f"  chat: generated ids {out}")
    print(f"  chat: answer {answer!r}")
    if full:
        if "Paris" in answer:
            print("  chat: contains 'Paris' ok")
        else:
            print("  chat: does not contain 'Paris' FAIL")
            failures.append("paris")

    # 2. incremental vs at once, 3. chunked
    P = len(prompt)
    ids = i64([prompt])
    whole, _ = dec.step(ids, np.ones_like(ids), i64([np.arange(P)]), dec.empty_past(1))
    past, inc = dec.empty_past(1), []
    for t in range(P):
        lg, past = dec.step(i64([[prompt[t]]]), np.ones((1, t + 1), np.int64), i64([[t]]), past)
        inc.append(lg[:, 0])
    check("incremental (token by token with past) vs prompt at once",
          float(np.abs(np.stack(inc, 1) - whole).max()), failures)
    c = P // 2
    lg1, past = dec.step(ids[:, :c], np.ones((1, c), np.int64), i64([np.arange(c)]), dec.empty_past(1))
    lg2, _ = dec.step(ids[:, c:], np.ones((1, P), np.int64), i64([np.arange(c, P)]), past)
    check(f"chunked prefill ({c} + {P - c} tokens, past > 0) vs at once",
          float(np.abs(np.concatenate([lg1, lg2], 1) - whole).max()), failures)

    # 4. left padding: batch of [chat prompt, a shorter prompt] vs each alone, prefill + 3 decode steps
    short = tok.encode("<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False).ids
    seqs = [prompt, short]
    n_steps = 3
    alone = []
    for s in seqs:
        o, _, _ = greedy(dec, s, n_steps + 1, set())
        lg_steps = []
        ids1, past1 = i64([s]), dec.empty_past(1)
        lg, past1 = dec.step(ids1, np.ones_like(ids1), i64([np.arange(len(s))]), past1)
        lg_steps.append(lg[0, -1])
        for k in range(n_steps):
            tot = len(s) + k + 1
            lg, past1 = dec.step(i64([[o[k]]]), np.ones((1, tot), np.int64), i64([[tot - 1]]), past1)
            lg_steps.append(lg[0, -1])
        alone.append((o, lg_steps, lg))
    W = max(len(s) for s in seqs)
    mask = i64([[0] * (W - len(s)) + [1] * len(s) for s in seqs])
    bids = i64([[0] * (W - len(s)) + s for s in seqs])  # pad id never attended to
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    lg, past = dec.step(bids, mask, pos, dec.empty_past(2))
    diffs = [max(float(np.abs(lg[b, -1] - alone[b][1][0]).max()) for b in range(2))]
    # the real (unpadded) positions of the short prompt against its own at-once run
    ids_s = i64([short])
    whole_s, _ = dec.step(ids_s, np.ones_like(ids_s), i64([np.arange(len(short))]), dec.empty_past(1))
    diffs.append(float(np.abs(lg[1, W - len(short):] - whole_s[0]).max()))
    for k in range(n_steps):
        nxt = i64([[alone[b][0][k]] for b in range(2)])
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        lg, past = dec.step(nxt, mask, pos, past)
        diffs.append(max(float(np.abs(lg[b, -1] - alone[b][1][k + 1]).max()) for b in range(2)))
    check(f"left-padded batch (lengths {len(prompt)}, {len(short)}; prefill + {n_steps} decode steps) vs alone",
          max(diffs), failures)

    if failures:
        print(f"verify_smollm2: FAILED: {', '.join(failures)}")
        sys.exit(1)
    print("verify_smollm2: all checks passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ONNX Runtime GenAI baseline: og.Generator greedy loop on a make_genai.py model dir, timed.

    genai_bench.py MODEL_DIR [--tokens 128] [--threads N] [--prompt TEXT] [--raw] [--stop-at-eos]
                   [--runs 1] [--warmup-tokens 8]

Prompt: "What is the capital of France?" through the model's chat template (og Tokenizer.apply_chat_template,
which reads chat_template.jinja; add_generation_prompt) unless --raw (then the text is tokenized as is).
Generates --tokens new tokens greedily (do_sample false). EOS is ignored by default: search options
min_length = max_length = prompt + tokens (og masks the EOS logits until min_length), so every run does the same
work; --stop-at-eos lets EOS end the run. The KV buffer is og's shared past/present buffer sized to max_length.
--threads N overlays model.decoder.session_options.intra_op_num_threads = N (and inter_op 1) on the
genai_config.json through og.Config.overlay (0 = onnxruntime's default).

Timing (og's loop: append_tokens(prompt) runs the prefill forward; the first generate_next_token() only picks
a token from those logits; each later call runs one decode forward on the previous token, then picks):
  prefill ms   = append_tokens + first generate_next_token
  decode ms/tok = the remaining tokens-1 generate_next_token calls, averaged (median also printed)
A warm-up generation of --warmup-tokens tokens runs first (untimed: allocations, kernel packing).
Prints the generated text (special tokens dropped by og's decode) and the text up to the first EOS.

Needs onnxruntime-genai (see make_genai.py). Example:
    nice -n 19 /var/tmp/genaivenv/bin/python models/llm/genai_bench.py $MODELS/llm/smollm2-135m-genai-fp32 --threads 2
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--threads", type=int, default=0, help="intra_op_num_threads (0 = onnxruntime default)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--raw", action="store_true", help="tokenize the prompt as is, no chat template")
    ap.add_argument("--stop-at-eos", action="store_true", help="let EOS end generation (default: ignore EOS)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    a = ap.parse_args()

    t0 = time.perf_counter()
    cfg = og.Config(a.model_dir)
    if a.threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    tok = og.Tokenizer(model)
    load_s = time.perf_counter() - t0

    if a.raw:
        text = a.prompt
    else:
        text = tok.apply_chat_template(json.dumps([{"role": "user", "content": a.prompt}]),
                                       add_generation_prompt=True)
    ids = np.asarray(tok.encode(text), dtype=np.int32)
    eos = set(int(e) for e in tok.eos_token_ids)
    P = len(ids)

    def run(n):
        params = og.GeneratorParams(model)
        opts = {"do_sample": False, "max_length": P + n, "batch_size": 1}
        if not a.stop_at_eos:
            opts["min_length"] = P + n
        params.set_search_options(**opts)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        t_append = time.perf_counter() - t
        steps, out = [], []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
            out.append(int(gen.get_next_tokens()[0]))
        return t_append, steps, out

    if a.warmup_tokens:
        run(a.warmup_tokens)
    print(f"genai_bench: {a.model_dir}  og {og.__version__}  threads {a.threads or 'default'}  "
          f"load {load_s * 1e3:.0f} ms  prompt {P} tokens  new {a.tokens}"
          f"{'' if a.stop_at_eos else ' (EOS ignored)'}")
    for r in range(a.runs):
        t_append, steps, out = run(a.tokens)
        prefill = (t_append + steps[0]) * 1e3
        dec = [s * 1e3 for s in steps[1:]]
        mean = sum(dec) / len(dec) if dec else float("nan")
        med = statistics.median(dec) if dec else float("nan")
        total = (t_append + sum(steps)) * 1e3
        print(f"run {r}: prefill {prefill:.1f} ms ({P} tokens; append_tokens {t_append * 1e3:.1f} ms), "
              f"decode {mean:.2f} ms/token (median {med:.2f}, {len(dec)} steps, {1e3 / mean:.1f} tok/s), "
              f"total {total:.0f} ms for {len(out)} tokens")
    first_eos = next((i for i, t in enumerate(out) if t in eos), len(out))
    print("text up to EOS: " + json.dumps(tok.decode(np.asarray(out[:first_eos], dtype=np.int32))))
    print("generated text: " + json.dumps(tok.decode(np.asarray(out, dtype=np.int32))))
    print("token ids: " + " ".join(map(str, out[:40])) + (" ..." if len(out) > 40 else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""llama.cpp baseline (through llama-cpp-python) on the GGUF the SmolLM2 ONNX is built from, timed like
Kiln's `llm_bench --decode` and genai_bench.py: single-stream greedy decode, ms/token.

    llamacpp_bench.py GGUF [--tokens 128] [--threads N] [--prompt-tokens 32] [--runs 2]

llama.cpp keeps the GGUF's quantized weights (SmolLM2-135M-Instruct.Q4_1.gguf: 4-bit blocks with a scale
and a minimum, ~5 bits per weight), so it reads about a sixth of the bytes Kiln's f32 ONNX reads per token:
compare it as what a user of that file gets, not as the same arithmetic.

Protocol: a prompt of --prompt-tokens token ids (the chat prompt's ids, cut or repeated), evaluated in one
`eval` (prefill), then --tokens greedy steps, each one `eval` of the previous token and an argmax over the
logits; the end-of-sequence token is not special (every run does the same work). One untimed warm-up run.
Prints prefill ms and decode ms/token (mean and median) per run.

Needs llama-cpp-python (`pip install llama-cpp-python==0.3.36`, a source build of llama.cpp; see README.md).
"""
import argparse
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=args.prompt_tokens + args.tokens + 8,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=max(args.prompt_tokens, 8),
        logits_all=False,
        verbose=False,
    )
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
    prompt = (ids * (args.prompt_tokens // len(ids) + 1))[: args.prompt_tokens]

    vocab = llm.n_vocab()

    def last_argmax():
        # The last evaluated token's logits, straight from llama.cpp's context (logits_all is off).
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def run(n_new):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        prefill = time.perf_counter() - t0
        steps = []
        out = [tok]
        for _ in range(n_new - 1):
            t = time.perf_counter()
            llm.eval([tok])
            tok = last_argmax()
            steps.append(time.perf_counter() - t)
            out.append(tok)
        return prefill, steps, out

    run(8)
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {args.threads} threads, {args.gguf}")
    for r in range(args.runs):
        prefill, steps, out = run(args.tokens)
        print(
            f"run {r}: prefill of {len(prompt)} tokens {prefill * 1e3:.1f} ms, decode {len(steps)} steps "
            f"{statistics.mean(steps) * 1e3:.2f} ms/token (median {statistics.median(steps) * 1e3:.2f})"
        )
    print("text:", llm.detokenize(out).decode(errors="replace")[:200].replace("\n", " "))


if __name__ == "__main__":
    main()

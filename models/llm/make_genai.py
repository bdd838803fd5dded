#!/usr/bin/env python3
"""Build the ONNX Runtime GenAI export form of SmolLM2-135M-Instruct from Kiln's GGUF (Q4_1 weights).

    make_genai.py GGUF OUTDIR [--precision fp32|int4] [--layers N] [--cache-dir DIR] [--keep-staging]
                  [--extra KEY=VALUE ...]

OUTDIR/ (what `python -m onnxruntime_genai.models.builder ... -e cpu` writes)
  model.onnx (+ model.onnx.data, external weights)   decoder: com.microsoft GroupQueryAttention with the
      rotary embedding inside (do_rotary=1, cos/sin caches as initializers), SkipSimplifiedLayerNormalization,
      fp32 MatMul weights or (int4) MatMulNBits; inputs input_ids, attention_mask, past_key_values.{i}.key/value
      f32 [batch, 3, past, 64]; outputs logits, present.{i}.key/value.
  genai_config.json       the og.Generator runtime config (I/O names, head counts, eos/bos/pad, search defaults)
  tokenizer_config.json, chat_template.jinja   what transformers' save_pretrained writes (og's
                          Tokenizer.apply_chat_template reads chat_template.jinja)
  tokenizer.json, generation_config.json       Kiln's, copied from the staging dir (see below)
  kiln_genai.json         provenance: GGUF sha256, builder command line, package versions

How: the builder's own GGUF loader (onnxruntime_genai/models/loaders/gguf.py) takes only float16/float32 GGUF
tensors (it wraps `tensor.data` raw, so Q4_1 blocks do not reshape), so this script first writes a Hugging
Face-format directory OUTDIR.hf-staging/ from the GGUF -- config.json (LlamaForCausalLM, tied embeddings),
model.safetensors (the GGUF weights dequantized to float32 with llama.cpp's q/k row permutation undone, the
same numbers make_smollm2.py puts in Kiln's decomposed model.onnx), tokenizer.json / tokenizer_config.json /
generation_config.json (rebuilt from the GGUF metadata as in make_smollm2.py) -- then runs

    python -m onnxruntime_genai.models.builder -i OUTDIR.hf-staging -o OUTDIR -p PRECISION -e cpu \
        -c CACHE --extra_options hf_token=false [KEY=VALUE ...]

which loads that directory with transformers' AutoModelForCausalLM (offline, no hub access needed).
--layers N writes a staging config with num_hidden_layers = N and only the first N blocks' weights (a fast
test model; its text is not meaningful). --precision int4 quantizes every MatMul (lm_head included) and,
with tied embeddings, the embedding Gather to 4-bit blocks (builder defaults for CPU: block_size 32,
accuracy_level 4, symmetric) -- re-quantization of already 4-bit-quantized weights, so not lossless.

Needs (one venv; see models/llm/README.md): onnxruntime-genai (CPU wheel, brings its builder), onnxruntime,
onnx, onnx_ir, torch, transformers, safetensors, gguf, numpy. E.g.
    python3 -m venv /var/tmp/genaivenv
    /var/tmp/genaivenv/bin/pip install onnxruntime-genai onnxruntime onnx onnx_ir torch transformers gguf numpy
    /var/tmp/genaivenv/bin/python models/llm/make_genai.py $MODELS/llm/SmolLM2-135M-Instruct.Q4_1.gguf \
        $MODELS/llm/smollm2-135m-genai-fp32
It imports read_gguf / unpermute / geometry / build_tokenizer from make_smollm2.py next to it.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_smollm2 import build_tokenizer, geometry, read_gguf, unpermute  # noqa: E402

GENAI_BUILDER_VERSION = 1


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hf_dir(gguf_path, hf_dir, n_layers=None):
    """GGUF -> Hugging Face LlamaForCausalLM directory (float32 safetensors, config, tokenizer files)."""
    from safetensors.numpy import save_file

    meta, T = read_gguf(gguf_path)
    geo = geometry(meta, n_layers)
    L, H, KVH = geo["layers"], geo["heads"], geo["kv_heads"]
    os.makedirs(hf_dir, exist_ok=True)

    W = {"model.embed_tokens.weight": T["token_embd.weight"], "model.norm.weight": T["output_norm.weight"]}
    tied = "output.weight" not in T
    if not tied:
        W["lm_head.weight"] = T["output.weight"]
    for i in range(L):
        g, p = f"blk.{i}.", f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = T[g + "attn_norm.weight"]
        W[p + "self_attn.q_proj.weight"] = unpermute(T[g + "attn_q.weight"], H)
        W[p + "self_attn.k_proj.weight"] = unpermute(T[g + "attn_k.weight"], KVH)
        W[p + "self_attn.v_proj.weight"] = T[g + "attn_v.weight"]
        W[p + "self_attn.o_proj.weight"] = T[g + "attn_output.weight"]
        W[p + "post_attention_layernorm.weight"] = T[g + "ffn_norm.weight"]
        W[p + "mlp.gate_proj.weight"] = T[g + "ffn_gate.weight"]
        W[p + "mlp.up_proj.weight"] = T[g + "ffn_up.weight"]
        W[p + "mlp.down_proj.weight"] = T[g + "ffn_down.weight"]
    W = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in W.items()}
    save_file(W, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})

    tok_json, tokens, _types = build_tokenizer(meta)
    tid = lambda key: int(meta[key]) if key in meta else None  # noqa: E731
    bos, eos, unk, pad = (tid(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    eos_ids = [eos] + [i for i, t in enumerate(tokens) if t == "<|endoftext|>" and i != eos]
    write_json(os.path.join(hf_dir, "tokenizer.json"), tok_json)
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": geo["max_pos"],
        "additional_special_tokens": [a["content"] for a in tok_json["added_tokens"] if a["special"]],
    })
    write_json(os.path.join(hf_dir, "generation_config.json"), {
        "bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad, "do_sample": False,
    })
    write_json(os.path.join(hf_dir, "config.json"), {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": L,
        "hidden_size": geo["hidden"],
        "intermediate_size": geo["ffn"],
        "num_attention_heads": H,
        "num_key_value_heads": KVH,
        "head_dim": geo["head_dim"],
        "vocab_size": geo["vocab"],
        "max_position_embeddings": geo["max_pos"],
        "rope_theta": geo["theta"],
        "rope_scaling": None,
        "rms_norm_eps": geo["eps"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    })
    return geo, meta


def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime-genai", "onnxruntime", "onnx", "onnx_ir", "torch", "transformers", "gguf"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--precision", choices=["fp32", "int4"], default="fp32")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N transformer blocks")
    ap.add_argument("--cache-dir", default=None, help="builder cache (default OUTDIR.cache, removed afterwards)")
    ap.add_argument("--keep-staging", action="store_true", help="keep OUTDIR.hf-staging (HF-format weights)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more builder --extra_options, e.g. block_size=64 accuracy_level=1")
    a = ap.parse_args()

    out = os.path.abspath(a.out_dir.rstrip("/"))
    staging = out + ".hf-staging"
    cache = os.path.abspath(a.cache_dir) if a.cache_dir else out + ".cache"
    t0 = time.time()
    geo, meta = write_hf_dir(a.gguf, staging, a.layers)
    t_stage = time.time() - t0
    print(f"make_genai: staging {staging} ({geo['layers']} layers) in {t_stage:.1f} s", file=sys.stderr)

    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", staging, "-o", out,
           "-p", a.precision, "-e", "cpu", "-c", cache, "--extra_options", "hf_token=false", *a.extra]
    print("make_genai: " + " ".join(cmd), file=sys.stderr)
    t1 = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env)
    t_build = time.time() - t1

    shutil.copy(os.path.join(staging, "generation_config.json"), os.path.join(out, "generation_config.json"))
    # transformers 5's GPT2Tokenizer re-serializes tokenizer.json with a plain ByteLevel pre-tokenizer, dropping
    # the Digits(individual) split llama.cpp's "smollm" pre-tokenizer does (then `tokenizers` splits ' ½' as
    # 'ĠÂ','½' instead of 'Ġ','Â½'); put Kiln's tokenizer.json (45/45 llama.cpp ids) back.
    shutil.copy(os.path.join(staging, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    write_json(os.path.join(out, "kiln_genai.json"), {
        "builder": "models/llm/make_genai.py",
        "builder_version": GENAI_BUILDER_VERSION,
        "gguf_file": os.path.basename(a.gguf),
        "gguf_sha256": sha256(a.gguf),
        "gguf_name": meta.get("general.name"),
        "precision": a.precision,
        "execution_provider": "cpu",
        "num_hidden_layers": geo["layers"],
        "num_hidden_layers_in_source": geo["layers_in_gguf"],
        "builder_command": ["python", "-m", "onnxruntime_genai.models.builder", "-i", "<staging>", "-o", "<out>",
                            "-p", a.precision, "-e", "cpu", "-c", "<cache>", "--extra_options", "hf_token=false",
                            *a.extra],
        "versions": versions(),
    })
    if not a.keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    if not a.cache_dir:
        shutil.rmtree(cache, ignore_errors=True)
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(f"make_genai: {out}: {a.precision}, {geo['layers']} layers, {size / 1e6:.1f} MB "
          f"({', '.join(files)}); staging {t_stage:.1f} s, builder {t_build:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

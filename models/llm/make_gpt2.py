#!/usr/bin/env python3
"""Build a tiny GPT-2-style decoder with random weights, in the Hugging Face optimum GPT-2 export form,
as a second decoder for Kiln's paged-attention rewrite (the first is make_smollm2.py's Llama form).

    make_gpt2.py OUT_DIR [--layers 2] [--heads 4] [--hidden 128] [--vocab 1000] [--seed 0]
                 [--max-pos 256] [--attention-op] [--check]

OUT_DIR/
  model.onnx   decoder with KV cache, standard ai.onnx ops only (opset 17), same I/O as make_smollm2.py:
      inputs : input_ids int64 [batch, seq], attention_mask int64 [batch, past+seq],
               position_ids int64 [batch, seq],
               past_key_values.{i}.key / .value float32 [batch, heads, past, head_dim]   (i = 0..layers-1)
      outputs: logits float32 [batch, seq, vocab],
               present.{i}.key / .value float32 [batch, heads, past+seq, head_dim]
      First step: past tensors with past = 0. Mask / left padding as make_smollm2.py
      (position_ids = max(cumsum(mask) - 1, 0)).
  config.json  HF GPT2Config keys plus the Llama-style names Kiln's model.rs reads
               (num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads = heads, head_dim,
               vocab_size, max_position_embeddings, eos_token_id) and a "kiln" section (I/O names, builder).

Architecture (GPT-2, what torch.onnx / optimum write for GPT2LMHeadModel), per layer:
  h = LayerNormalization(x)                                  (ln_1, eps 1e-5)
  q, k, v = Split(Add(MatMul(h, c_attn.W), c_attn.b), [D, D, D], axis=2)          (fused QKV)
  q, k, v = Transpose(Reshape(., [0, 0, H, HD]), perm=[0, 2, 1, 3])
  present.k = Concat(past.k, k, axis=2); present.v = Concat(past.v, v, axis=2)   (multi-head, no repeat)
  probs = Softmax(Add(Div(MatMul(q, Transpose(present.k, [0, 1, 3, 2])), sqrt(HD)), bias), axis=-1)
  x = x + Add(MatMul(Reshape(Transpose(MatMul(probs, present.v))), c_proj.W), c_proj.b)
  x = x + c_proj2(gelu_new(c_fc(LayerNormalization(x))))     (gelu_new: tanh form written out, 4*D inner)
with x0 = Gather(wte, input_ids) + Gather(wpe, position_ids), a final LayerNormalization and the lm_head
tied to wte (MatMul by Transpose(wte)). `bias` is one additive mask [batch, 1, seq, past+seq] shared by
the layers, built from attention_mask as in make_smollm2.py: 0 where key slot j <= past + s and
attention_mask[b, j] == 1, else float32 min.

--attention-op writes each layer's attention as ONNX's own Attention operator (opset 23; the model's
opset is then 23 and its IR version 11) instead of the Concat ... Softmax ... MatMul chain:
  y, present.k, present.v = Attention(q, k, v, pad, past.k, past.v, is_causal=1, scale=1/sqrt(HD))
in the 4-D form (q, k, v [B, H, S, HD] from the same Reshape/Transpose; no q_num_heads/kv_num_heads,
which the spec reserves for 3-D inputs), no qk_matmul_output, and y merged back as above. Causality
is the operator's: bottom-right aligned, query s attends key j iff j <= past + s. `pad` is the boolean
attention_mask [B, 1, seq, past+seq] (Cast(Unsqueeze(attention_mask)) to bool, Expanded over the query
rows because onnxruntime 1.32 refuses a mask whose q axis is 1), which the spec intersects with the
causal frontier, so left padding works as in the decomposed form. Only a padded query row
differs: every key is masked there, and Attention-23 defines its output as 0 (the decomposed form
averages over all keys); nothing reads those rows. models/llm/gpt2-tiny-attn23/ is the default build
of this variant (`make_gpt2.py models/llm/gpt2-tiny-attn23 --attention-op`).

Weights: numpy default_rng(seed), projections N(0, 1/fan_in), token embedding N(0, 0.25) (so the tied
lm_head gives logits with std ~3: a peaked, not near-uniform softmax), positions N(0, 0.1), LayerNorm
gamma 1 + N(0, 0.1), small biases. The output is byte-for-byte reproducible for given arguments.

--check runs onnxruntime on the result: an independent numpy forward pass = the ONNX logits, prompt at
once = token by token with past = two chunks, a left-padded batch (prefill + 3 decode steps) = each row
alone (all within 1e-4), logits spread, and that every layer has the attention chain the rewrite
(crates/kiln-graph/src/passes/paged_attention.rs) looks for. With --attention-op it checks instead that
every layer is one Attention reading its past inputs, writing its present outputs, causal, and
compares the logits and present K/V with the decomposed build of the same weights (prompt at once,
a second chunk with past, the padded batch's real rows). Needs numpy and onnx (+ onnxruntime for
--check); no torch.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILDER_VERSION = 1
OPSET = 17
OPSET_ATTENTION = 23  # ONNX Attention (with past_key / past_value) exists from opset 23
LN_EPS = 1e-5
TOL = 1e-4


def make_weights(L, D, V, max_pos, seed):
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    n = lambda shape, std: f32(rng.normal(0.0, std, shape))  # noqa: E731
    W = {"wte": n((V, D), 0.25), "wpe": n((max_pos, D), 0.1)}
    for i in range(L):
        p = f"h.{i}."
        W[p + "ln_1.g"], W[p + "ln_1.b"] = f32(1 + rng.normal(0, 0.1, D)), n(D, 0.02)
        W[p + "c_attn.W"], W[p + "c_attn.b"] = n((D, 3 * D), D ** -0.5), n(3 * D, 0.02)
        W[p + "c_proj.W"], W[p + "c_proj.b"] = n((D, D), D ** -0.5), n(D, 0.02)
        W[p + "ln_2.g"], W[p + "ln_2.b"] = f32(1 + rng.normal(0, 0.1, D)), n(D, 0.02)
        W[p + "c_fc.W"], W[p + "c_fc.b"] = n((D, 4 * D), D ** -0.5), n(4 * D, 0.02)
        W[p + "mlp_proj.W"], W[p + "mlp_proj.b"] = n((4 * D, D), (4 * D) ** -0.5), n(D, 0.02)
    W["ln_f.g"], W["ln_f.b"] = f32(1 + rng.normal(0, 0.1, D)), n(D, 0.02)
    return W


def build_graph(W, L, H, D, V, max_pos, attention_op=False):
    HD = D // H
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs=None, name=None, **attrs):
        outs = outs or [name + "/out"]
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs[0]

    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    if not attention_op:  # the decomposed chain's scale and mask constants
        c_scale = const("attn_div", np.array(math.sqrt(HD), np.float32))  # GPT-2 divides by sqrt(head_dim)
        c_zero_f = const("zero_f", np.array(0.0, np.float32))
        c_min_f = const("mask_min", np.array(np.finfo(np.float32).min, np.float32))
        c_zero, c_one = const("zero_i", i64(0)), const("one_i", i64(1))
        c_ax0, c_ax1 = const("axes_0", i64([0])), const("axes_1", i64([1]))
    else:
        c_ax1, c_ax2, c_one2 = const("axes_1", i64([1])), const("axes_2", i64([2])), const("ones_2", i64([1, 1]))
    c_ax12 = const("axes_1_2", i64([1, 2]))
    c_split = const("qkv_split", i64([D, D, D]))
    c_shape_h = const("shape_heads", i64([0, 0, H, HD]))
    c_shape_o = const("shape_merge", i64([0, 0, D]))
    # gelu_new(x) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (as torch.onnx writes it)
    c_half = const("gelu_half", np.array(0.5, np.float32))
    c_three = const("gelu_three", np.array(3.0, np.float32))
    c_coef = const("gelu_coef", np.array(0.044715, np.float32))
    c_s2pi = const("gelu_sqrt_2_over_pi", np.array(math.sqrt(2.0 / math.pi), np.float32))
    c_onef = const("gelu_one", np.array(1.0, np.float32))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", H, "past_sequence_length", HD]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", H, "total_sequence_length", HD]))

    wte = const("transformer.wte.weight", W["wte"])
    wpe = const("transformer.wpe.weight", W["wpe"])
    tok = node("Gather", [wte, "input_ids"], name="transformer/wte", axis=0)
    posv = node("Gather", [wpe, "position_ids"], name="transformer/wpe", axis=0)
    x = node("Add", [tok, posv], name="transformer/embed_add")

    def padding_mask():  # [B, 1, 1, T] bool, True where attention_mask[b, j] == 1
        return node("Cast", [node("Unsqueeze", ["attention_mask", c_ax12], name="mask/pad_4d")], name="mask/pad",
                    to=TensorProto.BOOL)

    if attention_op:  # Attention applies causality itself (is_causal); it gets the padding alone, as bool
        # [B, 1, S, T]: the spec broadcasts a [B, 1, 1, T] mask, but onnxruntime 1.32's CPU Attention
        # requires attn_mask's q axis to equal q_sequence_length, so Expand it over the S query rows
        s_dim = node("Slice", [node("Shape", ["input_ids"], name="mask/ids_shape"), c_ax1, c_ax2],
                     name="mask/seq")  # [S]
        q_rows = node("Concat", [c_one2, s_dim, c_ax1], name="mask/q_rows_shape", axis=0)  # [1, 1, S, 1]
        pad = node("Expand", [padding_mask(), q_rows], name="mask/pad_q_rows")
    else:
        # additive attention bias [B, 1, S, T]; query s sits in key slot past + s, T = past + S
        S = node("Gather", [node("Shape", ["input_ids"], name="mask/ids_shape"), c_one], name="mask/seq", axis=0)
        Tt = node("Gather", [node("Shape", ["attention_mask"], name="mask/mask_shape"), c_one], name="mask/total",
                  axis=0)
        past = node("Sub", [Tt, S], name="mask/past")
        q_slot = node("Unsqueeze", [node("Range", [past, Tt, c_one], name="mask/q_range"), c_ax1],
                      name="mask/q_slot")
        k_slot = node("Unsqueeze", [node("Range", [c_zero, Tt, c_one], name="mask/k_range"), c_ax0],
                      name="mask/k_slot")
        causal = node("LessOrEqual", [k_slot, q_slot], name="mask/causal")  # [S, T]
        allowed = node("And", [causal, padding_mask()], name="mask/allowed")  # [B, 1, S, T]
        bias = node("Where", [allowed, c_zero_f, c_min_f], name="mask/bias")

    def decomposed(i, a, q, k, v):
        pk = node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], name=a + "/concat_k", axis=2)
        pv = node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], name=a + "/concat_v", axis=2)
        kt = node("Transpose", [pk], name=a + "/k_t", perm=[0, 1, 3, 2])
        scores = node("Div", [node("MatMul", [q, kt], name=a + "/qk"), c_scale], name=a + "/div_scale")
        probs = node("Softmax", [node("Add", [scores, bias], name=a + "/add_mask")], name=a + "/softmax", axis=-1)
        return node("MatMul", [probs, pv], name=a + "/pv")  # [B, H, S, HD]

    def layernorm(inp, name, g, b):
        return node("LayerNormalization", [inp, const(name + ".weight", g), const(name + ".bias", b)],
                    name=name, axis=-1, epsilon=LN_EPS)

    def linear(inp, name, w, b):
        y = node("MatMul", [inp, const(name + ".weight", w)], name=name + "/MatMul")
        return node("Add", [y, const(name + ".bias", b)], name=name + "/Add")

    for i in range(L):
        p, w = f"transformer.h.{i}", f"h.{i}."
        a = p + ".attn"
        h = layernorm(x, p + ".ln_1", W[w + "ln_1.g"], W[w + "ln_1.b"])
        qkv = linear(h, a + ".c_attn", W[w + "c_attn.W"], W[w + "c_attn.b"])
        q, k, v = (a + "/q", a + "/k", a + "/v")
        node("Split", [qkv, c_split], [q, k, v], name=a + "/split_qkv", axis=2)

        def heads(t, what):
            return node("Transpose", [node("Reshape", [t, c_shape_h], name=f"{a}/{what}_split_heads")],
                        name=f"{a}/{what}_heads", perm=[0, 2, 1, 3])

        q, k, v = heads(q, "q"), heads(k, "k"), heads(v, "v")
        if attention_op:
            ctx = node("Attention", [q, k, v, pad, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                       [a + "/attention", f"present.{i}.key", f"present.{i}.value"], name=a + "/attention",
                       is_causal=1, scale=float(np.float32(1.0 / math.sqrt(HD))))
        else:
            ctx = decomposed(i, a, q, k, v)
        ctx = node("Reshape", [node("Transpose", [ctx], name=a + "/merge_t", perm=[0, 2, 1, 3]), c_shape_o],
                   name=a + "/merge_heads")
        x = node("Add", [x, linear(ctx, a + ".c_proj", W[w + "c_proj.W"], W[w + "c_proj.b"])],
                 name=p + "/residual_attn")

        m = p + ".mlp"
        h = layernorm(x, p + ".ln_2", W[w + "ln_2.g"], W[w + "ln_2.b"])
        f = linear(h, m + ".c_fc", W[w + "c_fc.W"], W[w + "c_fc.b"])
        cube = node("Pow", [f, c_three], name=m + "/gelu/pow")
        inner = node("Add", [f, node("Mul", [cube, c_coef], name=m + "/gelu/mul_coef")], name=m + "/gelu/add")
        th = node("Tanh", [node("Mul", [inner, c_s2pi], name=m + "/gelu/mul_s2pi")], name=m + "/gelu/tanh")
        g = node("Mul", [node("Mul", [f, c_half], name=m + "/gelu/mul_half"),
                         node("Add", [th, c_onef], name=m + "/gelu/add_one")], name=m + "/gelu/out")
        x = node("Add", [x, linear(g, m + ".c_proj", W[w + "mlp_proj.W"], W[w + "mlp_proj.b"])],
                 name=p + "/residual_mlp")

    x = layernorm(x, "transformer.ln_f", W["ln_f.g"], W["ln_f.b"])
    lm = node("Transpose", [wte], name="lm_head/tied_transpose", perm=[1, 0])  # tied: logits = x @ wte^T
    node("MatMul", [x, lm], ["logits"], name="lm_head")

    graph = helper.make_graph(nodes, "gpt2_decoder_with_past", inputs, outputs, inits)
    opset = OPSET_ATTENTION if attention_op else OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="kiln-make_gpt2", producer_version=str(BUILDER_VERSION))
    model.ir_version = 11 if attention_op else 8  # opset 23 needs IR version 11
    return model


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def build(out_dir, L, H, D, V, seed, max_pos, attention_op=False):
    if D % H:
        raise SystemExit(f"make_gpt2: --hidden {D} is not a multiple of --heads {H}")
    W = make_weights(L, D, V, max_pos, seed)
    model = build_graph(W, L, H, D, V, max_pos, attention_op)
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    onnx.save(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    eos = V - 1  # GPT-2's <|endoftext|> is its last id (50256)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        # GPT2Config names
        "n_layer": L, "n_head": H, "n_embd": D, "n_inner": 4 * D, "n_positions": max_pos,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS,
        "scale_attn_weights": True,
        # the generic names Kiln's model.rs reads
        "num_hidden_layers": L,
        "hidden_size": D,
        "intermediate_size": 4 * D,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "head_dim": D // H,
        "vocab_size": V,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "kiln": {
            "builder": "models/llm/make_gpt2.py",
            "builder_version": BUILDER_VERSION,
            "weights": f"random float32, numpy default_rng(seed={seed})",
            "seed": seed,
            "opset": OPSET_ATTENTION if attention_op else OPSET,
            "inputs": ["input_ids", "attention_mask", "position_ids"]
                      + [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")],
            "outputs": ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")],
            "kv_layout": "[batch, num_key_value_heads, sequence, head_dim] float32",
        },
    }
    if attention_op:
        config["kiln"]["attention"] = ("ONNX Attention (opset 23), 4-D, is_causal=1, attn_mask = bool padding "
                                       "from attention_mask, past_key/past_value -> present_key/present_value")
    write_json(os.path.join(out_dir, "config.json"), config)
    return W, config


# ----------------------------------------------------------------------------------------------- checks

def reference_logits(W, cfg, ids, pos):
    """Independent numpy GPT-2 forward (no cache, causal, no padding), float64. ids/pos [B, S]."""
    L, H, D = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    HD = D // H
    w = {k: v.astype(np.float64) for k, v in W.items()}

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + LN_EPS) * g + b

    x = w["wte"][ids] + w["wpe"][pos]
    B, S, _ = x.shape
    causal = np.tril(np.ones((S, S), bool))
    for i in range(L):
        p = f"h.{i}."
        qkv = ln(x, w[p + "ln_1.g"], w[p + "ln_1.b"]) @ w[p + "c_attn.W"] + w[p + "c_attn.b"]
        q, k, v = (t.reshape(B, S, H, HD).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HD)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(0, 2, 1, 3).reshape(B, S, D)
        x = x + ctx @ w[p + "c_proj.W"] + w[p + "c_proj.b"]
        f = ln(x, w[p + "ln_2.g"], w[p + "ln_2.b"]) @ w[p + "c_fc.W"] + w[p + "c_fc.b"]
        g = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        x = x + g @ w[p + "mlp_proj.W"] + w[p + "mlp_proj.b"]
    return ln(x, w["ln_f.g"], w["ln_f.b"]) @ w["wte"].T


def attention_chains(model):
    """Per Softmax: the op chain paged_attention.rs matches, or a reason it would not match."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    readers = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    inits = {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    past = {i for i in graph_inputs if i.startswith("past_key_values.")}

    def concat(v):
        n = prod.get(v)
        ok = (n is not None and n.op_type == "Concat" and len(n.input) == 2 and n.input[0] in graph_inputs
              and [a.i for a in n.attribute if a.name == "axis"][0] in (2, -2))
        return n if ok else None

    def ancestors(v):
        seen, stack, found = set(), [v], set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if x in graph_inputs:
                found.add(x)
            if x in prod:
                stack.extend(prod[x].input)
        return found

    out = []
    for sm in (n for n in g.node if n.op_type == "Softmax"):
        add = prod.get(sm.input[0])
        if add is None or add.op_type != "Add":
            out.append((sm.name, None, "Softmax input is not an Add"))
            continue
        scores, mask = add.input
        div = prod.get(scores)
        if div is None or div.op_type != "Div" or div.input[1] not in inits:
            out.append((sm.name, None, "no Div by a constant"))
            continue
        mm = prod.get(div.input[0])
        kt = prod.get(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
        perm = [list(a.ints) for a in kt.attribute if a.name == "perm"] if kt is not None else []
        ck = concat(kt.input[0]) if kt is not None and kt.op_type == "Transpose" and perm == [[0, 1, 3, 2]] else None
        rd = readers.get(sm.output[0], [])
        cv = concat(rd[0].input[1]) if len(rd) == 1 and rd[0].op_type == "MatMul" else None
        if ck is None or cv is None:
            out.append((sm.name, None, "K or V path is not Transpose/Concat(past, new, axis=2)"))
            continue
        bad = ancestors(mask) & past
        if bad:
            out.append((sm.name, None, f"mask depends on {sorted(bad)}"))
            continue
        d = float(numpy_helper.to_array(next(t for t in g.initializer if t.name == div.input[1])))
        chain = [f"{ck.op_type}({ck.input[0]}, new)", "Transpose[0,1,3,2]", "MatMul(q, Kt)", f"Div({d:.4f})",
                 "Add(mask)", "Softmax(-1)", f"MatMul(probs, {cv.op_type}({cv.input[0]}, new))"]
        out.append((sm.name, chain, f"scale {1 / d:.6f}"))
    return out


def attention_ops(model):
    """Per Attention node: (name, description, problem or None) for what paged_attention.rs accepts."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    out = []
    for n in (n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input) + [""] * (6 - len(n.input))
        problems = []
        if not (ins[4].startswith("past_key_values.") and ins[4] in graph_inputs
                and ins[5].startswith("past_key_values.") and ins[5] in graph_inputs):
            problems.append("past_key/past_value are not graph inputs")
        if len(n.output) < 3 or not {n.output[1], n.output[2]} <= graph_outputs:
            problems.append("present_key/present_value are not graph outputs")
        if len(n.output) > 3 and n.output[3]:
            problems.append("qk_matmul_output is used")
        if attrs.get("is_causal", 0) != 1:
            problems.append("is_causal != 1")
        if "q_num_heads" in attrs or "kv_num_heads" in attrs or attrs.get("softcap", 0.0):
            problems.append("head-count attributes (3-D only) or softcap set")
        seen, stack = set(), [ins[3]] if ins[3] else []
        while stack:  # the mask must not depend on the past K/V
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if x.startswith("past_key_values."):
                problems.append(f"attn_mask depends on {x}")
            if x in prod:
                stack.extend(i for i in prod[x].input if i)
        mask = f"attn_mask {prod[ins[3]].op_type}(...)" if ins[3] in prod else "no attn_mask"
        desc = (f"Attention(q, k, v, {mask}, {ins[4]}, {ins[5]}) -> ({', '.join(n.output[1:3])}), "
                f"is_causal {attrs.get('is_causal', 0)}, scale {attrs.get('scale', float('nan')):.6f}")
        out.append((n.name, desc, "; ".join(problems) or None))
    return out


def check(out_dir, W, cfg, threads=2, attention_op=False):
    import onnxruntime as ort

    L, H, HD, V = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"], cfg["vocab_size"]
    path = os.path.join(out_dir, "model.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    i64 = lambda a: np.asarray(a, np.int64)  # noqa: E731
    empty = lambda b: [np.zeros((b, H, 0, HD), np.float32)] * (2 * L)  # noqa: E731
    ref_sess = None
    if attention_op:  # the decomposed build of the same weights, to compare with
        dec = build_graph(W, L, H, cfg["hidden_size"], V, cfg["max_position_embeddings"], attention_op=False)
        ref_sess = ort.InferenceSession(dec.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def step(ids, mask, pos, past, s=None):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(L):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        o = (s or sess).run(names, feed)
        return o[0], o[1:]

    failures = []

    def report(name, diff):
        ok = diff <= TOL
        print(f"  {name}: max |diff| {diff:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(name)

    model = onnx.load(path)
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"make_gpt2 --check: {path}: {L} layers, {H} heads x {HD}, vocab {V}, "
          f"{os.path.getsize(path) / 1e6:.2f} MB, {len(model.graph.node)} nodes, ORT {ort.__version__}")
    print("  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    matched = 0
    if attention_op:
        for name, desc, problem in attention_ops(model):
            matched += problem is None
            print(f"  {name}: {desc}" + (f": NOT accepted: {problem}" if problem else ""))
    else:
        for name, chain, note in attention_chains(model):
            if chain:
                matched += 1
                print(f"  {name}: " + " -> ".join(chain) + f" ({note})")
            else:
                print(f"  {name}: NOT matched: {note}")
    if matched != L:
        failures.append("attention pattern")

    rng = np.random.default_rng(123)
    prompt = [int(t) for t in rng.integers(0, V - 1, 23)]
    P = len(prompt)
    ids = i64([prompt])
    whole, _ = step(ids, np.ones_like(ids), i64([np.arange(P)]), empty(1))
    ref = reference_logits(W, cfg, ids, i64([np.arange(P)]))
    report("ONNX vs numpy reference forward (prompt at once)", float(np.abs(whole - ref).max()))
    last = whole[0, -1].astype(np.float64)
    pr = np.exp(last - last.max())
    pr /= pr.sum()
    print(f"  logits spread: std {whole.std():.2f}, range [{whole.min():.1f}, {whole.max():.1f}], "
          f"last-token max softmax prob {pr.max():.3f} (uniform {1 / V:.4f})")

    past, inc = empty(1), []
    for t in range(P):
        lg, past = step(i64([[prompt[t]]]), np.ones((1, t + 1), np.int64), i64([[t]]), past)
        inc.append(lg[:, 0])
    report("token by token with past vs prompt at once", float(np.abs(np.stack(inc, 1) - whole).max()))
    c = P // 2
    lg1, past = step(ids[:, :c], np.ones((1, c), np.int64), i64([np.arange(c)]), empty(1))
    lg2, _ = step(ids[:, c:], np.ones((1, P), np.int64), i64([np.arange(c, P)]), past)
    report(f"two chunks ({c} + {P - c}, past > 0) vs at once",
           float(np.abs(np.concatenate([lg1, lg2], 1) - whole).max()))
    if ref_sess is not None:
        d_whole, d_pres = step(ids, np.ones_like(ids), i64([np.arange(P)]), empty(1), ref_sess)
        _, a_pres = step(ids, np.ones_like(ids), i64([np.arange(P)]), empty(1))
        d1, d_past = step(ids[:, :c], np.ones((1, c), np.int64), i64([np.arange(c)]), empty(1), ref_sess)
        d2, _ = step(ids[:, c:], np.ones((1, P), np.int64), i64([np.arange(c, P)]), d_past, ref_sess)
        report("Attention-23 vs decomposed build, same weights: logits, prompt at once",
               float(np.abs(whole - d_whole).max()))
        report("Attention-23 vs decomposed build: present K/V, prompt at once",
               max(float(np.abs(x - y).max()) for x, y in zip(a_pres, d_pres)))
        report(f"Attention-23 vs decomposed build: logits, chunk 2 with past {c}",
               float(np.abs(lg2 - d2).max()))

    # left-padded batch of [prompt, shorter prompt], prefill + 3 greedy decode steps, vs each row alone
    short = prompt[:5] + [int(t) for t in rng.integers(0, V - 1, 4)]
    seqs, n_steps = [prompt, short], 3
    alone = []
    for s in seqs:
        lgs, toks = [], []
        ids1 = i64([s])
        lg, p1 = step(ids1, np.ones_like(ids1), i64([np.arange(len(s))]), empty(1))
        full_prompt = lg[0]
        for k in range(n_steps + 1):
            lgs.append(lg[0, -1])
            if k == n_steps:
                break
            toks.append(int(np.argmax(lg[0, -1])))
            tot = len(s) + k + 1
            lg, p1 = step(i64([[toks[-1]]]), np.ones((1, tot), np.int64), i64([[tot - 1]]), p1)
        alone.append((toks, lgs, full_prompt))
    Wd = max(len(s) for s in seqs)
    mask = i64([[0] * (Wd - len(s)) + [1] * len(s) for s in seqs])
    bids = i64([[0] * (Wd - len(s)) + s for s in seqs])
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    lg, past = step(bids, mask, pos, empty(2))
    diffs = [float(np.abs(lg[1, Wd - len(short):] - alone[1][2]).max()),
             float(np.abs(lg[0] - alone[0][2]).max())]
    finite = bool(np.isfinite(lg).all()) and all(bool(np.isfinite(t).all()) for t in past)
    if ref_sess is not None:
        dlg, dpast = step(bids, mask, pos, empty(2), ref_sess)
        ddiffs = [float(np.abs(lg[1, Wd - len(short):] - dlg[1, Wd - len(short):]).max()),
                  float(np.abs(lg[0] - dlg[0]).max())]
    for k in range(n_steps):
        nxt = i64([[alone[b][0][k]] for b in range(2)])
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        lg, past = step(nxt, mask, pos, past)
        finite = finite and bool(np.isfinite(lg).all()) and all(bool(np.isfinite(t).all()) for t in past)
        diffs.append(max(float(np.abs(lg[b, -1] - alone[b][1][k + 1]).max()) for b in range(2)))
        if ref_sess is not None:
            dlg, dpast = step(nxt, mask, pos, dpast, ref_sess)
            ddiffs.append(float(np.abs(lg - dlg).max()))
    report(f"left-padded batch (lengths {len(prompt)}, {len(short)}; prefill + {n_steps} decode steps) vs alone",
           max(diffs))
    if not finite:
        print("  left-padded batch: non-finite values in logits or present K/V FAIL")
        failures.append("padded batch finite")
    if ref_sess is not None:
        report("Attention-23 vs decomposed build: logits, left-padded batch (real rows, prefill + decode)",
               max(ddiffs))
    if failures:
        print(f"make_gpt2 --check: FAILED: {', '.join(failures)}")
        return False
    print("make_gpt2 --check: all checks passed")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pos", type=int, default=256, help="learned position embeddings (max_position_embeddings)")
    ap.add_argument("--attention-op", action="store_true",
                    help="write each layer's attention as ONNX Attention (opset 23) instead of the decomposed chain")
    ap.add_argument("--check", action="store_true", help="verify with onnxruntime after building")
    a = ap.parse_args()
    W, cfg = build(a.out_dir, a.layers, a.heads, a.hidden, a.vocab, a.seed, a.max_pos, a.attention_op)
    size = os.path.getsize(os.path.join(a.out_dir, "model.onnx"))
    print(f"make_gpt2: {a.out_dir}: {a.layers} layers, {a.heads} heads, hidden {a.hidden}, vocab {a.vocab}, "
          f"model.onnx {size / 1e6:.2f} MB", file=sys.stderr)
    if a.check and not check(a.out_dir, W, cfg, attention_op=a.attention_op):
        sys.exit(1)


if __name__ == "__main__":
    main()

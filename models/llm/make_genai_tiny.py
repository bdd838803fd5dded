#!/usr/bin/env python3
"""Build a tiny Llama-style decoder with random weights in ONNX Runtime GenAI's export form (what
`python -m onnxruntime_genai.models.builder -e cpu` writes; compare genai_inspect.py on a real build), plus
onnxruntime's logits for a short greedy decode as the reference Kiln's tests replay.

    make_genai_tiny.py OUT_DIR [--int4] [--layers 2] [--hidden 64] [--heads 4] [--kv-heads 2]
                       [--vocab 256] [--intermediate 128] [--max-pos 256] [--seed 1]

OUT_DIR/
  model.onnx         opset 22 + com.microsoft 1, IR 10, every weight inside the file. Inputs: input_ids int64
                     [batch, seq], attention_mask int64 [batch, total], past_key_values.{i}.key / .value f32
                     [batch, kv_heads, past, head_dim]. Outputs: logits f32 [batch, seq, vocab],
                     present.{i}.key / .value f32 [batch, kv_heads, total, head_dim] (GQA's present: past's valid
                     rows then the new ones; with past_present_share_buffer the same buffer).
  config.json        HF LlamaForCausalLM fields.
  genai_config.json  as the builder writes it (past_present_share_buffer true, as the real ones).
  reference.json     onnxruntime's logits for one greedy decode (below).

Graph, as the builder writes it for Llama:
  seqlens_k = Cast(ReduceSum(attention_mask, [1], keepdims=0) - 1, int32)
  total_sequence_length = Cast(Gather(Shape(attention_mask), 1), int32)
  x = Gather(Transpose(lm_head.MatMul.weight), input_ids)                       (tied embedding)
  layer 0: h = SimplifiedLayerNormalization(x, input_layernorm.weight)          (axis -1, stash_type 1)
  layer i > 0: h, r = SkipSimplifiedLayerNormalization(r, mlp_out, input_layernorm.weight)  (outputs 0 and 3)
  qkv = MatMul(h, qkv_proj.weight [hidden, (H + 2*KV)*D])                        (packed QKV)
  a, present.i.key, present.i.value = com.microsoft::GroupQueryAttention(qkv, '', '', past.key, past.value,
      seqlens_k, total_sequence_length, cos_cache, sin_cache; num_heads, kv_num_heads, scale = 1/sqrt(D),
      do_rotary 1, rotary_interleaved 0, local_window_size -1, softcap 0)
  h, r = SkipSimplifiedLayerNormalization(r, MatMul(a, o_proj.weight), post_attention_layernorm.weight)
  mlp_out = MatMul(Mul(Mul(g, Sigmoid(g)), MatMul(h, up_proj)), down_proj),  g = MatMul(h, gate_proj)
  final: y = SkipSimplifiedLayerNormalization(r, mlp_out, final_norm_layernorm.weight) (output 0 only)
  logits = MatMul(y, lm_head.MatMul.weight [hidden, vocab])
cos_cache/sin_cache [max_pos, D/2]: cos/sin(t * theta^(-2i/D)), rope_theta 10000.

--int4 (the builder's `-p int4`): every MatMul is com.microsoft::MatMulNBits (bits 4, block_size 32,
accuracy_level 4, symmetric: no zero_points, so 8 is the zero point; codes clip(round(w / s) + 8, 0, 15) with
s = max|w| / 7 per block of 32 along K; B [N, K/32, 16] uint8 with the low nibble first), and the embedding is
com.microsoft::GatherBlockQuantized(Reshape(lm_head.MatMul.weight_Q4, [vocab, hidden/2]), input_ids,
lm_head.MatMul.weight_scales; bits 4, block_size 32, gather_axis 0, quantize_axis 1) over the lm_head's codes.

Weights: numpy default_rng(seed): projections N(0, 1/fan_in) (o_proj, down_proj N(0, 64/fan_in): the layers'
updates outweigh the token's own tied embedding, so greedy decoding does not repeat one token), lm_head (= embedding) N(0, 1) so logits are
spread, norm weights 1 + N(0, 0.1). Byte-for-byte reproducible for given arguments.

reference.json: input ids and onnxruntime's logits (every position) of each step of a greedy decode: a prefill
of 7 tokens (fixed ids from the seed) with empty past, then 5 steps of one token (argmax of the last logits),
each feeding the step's present.* back as past (separate past/present buffers, total = past + 1). For --int4
the reference runs the same graph with accuracy_level 0 (MatMulNBits in f32 on dequantized weights, which is
what Kiln computes); `max_abs_diff_accuracy_level_4` records how far onnxruntime's own accuracy_level 4
(activations quantized to int8 per block) is from it.

Needs numpy, onnx and onnxruntime (the pinned venv: /var/tmp/kcache/venv-llm-v1).
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUILDER_VERSION = 1
EPS = 1e-5
ROPE_THETA = 10000.0
BLOCK = 32
# o_proj / down_proj gain: the layers' updates outweigh the token's own (tied) embedding in the residual,
# so the greedy decode does not just repeat its last token.
GAIN = 8.0


def quantize_int4(w):
    """w [K, N] f32 -> (B [N, K/BLOCK, BLOCK/2] uint8, scales [N, K/BLOCK] f32), symmetric, zero point 8."""
    k, n = w.shape
    assert k % BLOCK == 0
    wt = w.T.reshape(n, k // BLOCK, BLOCK)
    scales = np.abs(wt).max(axis=2) / 7.0
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    q = np.clip(np.round(wt / scales[:, :, None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    return packed, scales


def build(args, accuracy_level=4):
    rng = np.random.default_rng(args.seed)
    hid, H, KV, V, I = args.hidden, args.heads, args.kv_heads, args.vocab, args.intermediate
    D = hid // H
    assert D * H == hid
    nodes, inits = [], []
    int4 = args.int4

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, inputs, outputs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def matmul(x, w, prefix, out=None):
        """MatMul (fp32) or MatMulNBits (int4) of x by the weight w [K, N]."""
        out = out or f"{prefix}/MatMul/output_0"
        if not int4:
            node("MatMul", [x, init(f"{prefix.strip('/').replace('/', '.')}.MatMul.weight", w)], [out],
                 f"{prefix}/MatMul")
            return out
        base = prefix.strip("/").replace("/", ".")
        names = [f"{base}.MatMul.weight_Q4", f"{base}.MatMul.weight_scales"]
        if not any(t.name == names[0] for t in inits):  # the lm_head's codes are the embedding's too
            packed, scales = quantize_int4(w)
            init(names[0], packed)
            init(names[1], scales)
        node("MatMulNBits", [x, *names],
             [out], f"{prefix}/MatMul_Q4", domain="com.microsoft",
             K=w.shape[0], N=w.shape[1], bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
        return out

    def proj(fan_in, fan_out, gain=1.0):
        return rng.normal(0.0, gain / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)

    def norm_w():
        return (1.0 + rng.normal(0.0, 0.1, hid)).astype(np.float32)

    # Weights first, in a fixed order, so fp32 and int4 builds share them.
    lm_head = rng.normal(0.0, 1.0, (hid, V)).astype(np.float32)
    layers = []
    for _ in range(args.layers):
        layers.append(dict(
            ln1=norm_w(), qkv=proj(hid, (H + 2 * KV) * D), o=proj(hid, hid, GAIN), ln2=norm_w(),
            gate=proj(hid, I), up=proj(hid, I), down=proj(I, hid, GAIN)))
    final_ln = norm_w()

    # Mask -> seqlens_k / total_sequence_length.
    sub = "/model/attn_mask_reformat/attn_mask_subgraph"
    one_vec = node("Constant", [], ["/model/constants/INT64/[1]"], "/model/constant_nodes/INT64/[1]",
                   value=numpy_helper.from_array(np.array([1], np.int64)))[0]
    node("ReduceSum", ["attention_mask", one_vec], [f"{sub}/ReduceSum/output_0"], f"{sub}/ReduceSum", keepdims=0)
    node("Sub", [f"{sub}/ReduceSum/output_0", one_vec], [f"{sub}/Sub/output_0"], f"{sub}/Sub")
    seqlens = node("Cast", [f"{sub}/Sub/output_0"], [f"{sub}/Sub/Cast/output_0"], f"{sub}/Sub/Cast",
                   to=TensorProto.INT32)[0]
    node("Shape", ["attention_mask"], [f"{sub}/Shape/output_0"], f"{sub}/Shape")
    one = node("Constant", [], ["/model/constants/INT64/1"], "/model/constant_nodes/INT64/1",
               value=numpy_helper.from_array(np.array(1, np.int64)))[0]
    node("Gather", [f"{sub}/Shape/output_0", one], [f"{sub}/Gather/output_0"], f"{sub}/Gather", axis=0)
    total = node("Cast", [f"{sub}/Gather/output_0"], [f"{sub}/Gather/Cast/output_0"], f"{sub}/Gather/Cast",
                 to=TensorProto.INT32)[0]

    # Embedding (tied to the lm_head).
    if int4:
        packed, scales = quantize_int4(lm_head)
        q4 = init("lm_head.MatMul.weight_Q4", packed)
        sc = init("lm_head.MatMul.weight_scales", scales)
        shape = node("Constant", [], [f"/model/constants/INT64/[{V}, {hid // 2}]"],
                     f"/model/constant_nodes/INT64/[{V}, {hid // 2}]",
                     value=numpy_helper.from_array(np.array([V, hid // 2], np.int64)))[0]
        node("Reshape", [q4, shape], ["/model/embed_tokens/Reshape/output_0"], "/model/embed_tokens/Reshape")
        x = node("GatherBlockQuantized", ["/model/embed_tokens/Reshape/output_0", "input_ids", sc],
                 ["/model/embed_tokens/GatherBlockQuantized/output_0"], "/model/embed_tokens/GatherBlockQuantized",
                 domain="com.microsoft", bits=4, block_size=BLOCK, gather_axis=0, quantize_axis=1)[0]
    else:
        init("lm_head.MatMul.weight", lm_head)
        node("Transpose", ["lm_head.MatMul.weight"], ["/model/embed_tokens/Transpose/output_0"],
             "/model/embed_tokens/Transpose", perm=[1, 0])
        x = node("Gather", ["/model/embed_tokens/Transpose/output_0", "input_ids"],
                 ["/model/embed_tokens/Gather/output_0"], "/model/embed_tokens/Gather")[0]

    # Rotary caches.
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, D, 2, dtype=np.float64) / D))
    freqs = np.outer(np.arange(args.max_pos, dtype=np.float64), inv_freq)
    init("cos_cache", np.cos(freqs).astype(np.float32))
    init("sin_cache", np.sin(freqs).astype(np.float32))

    residual, mlp_out = x, None
    for i, w in enumerate(layers):
        p = f"/model/layers.{i}"
        ln1 = init(f"model.layers.{i}.input_layernorm.weight", w["ln1"])
        if i == 0:
            h = node("SimplifiedLayerNormalization", [x, ln1], [f"{p}/input_layernorm/output_0"],
                     f"{p}/input_layernorm/LayerNorm", axis=-1, epsilon=EPS, stash_type=1)[0]
        else:
            h, _, _, residual = node("SkipSimplifiedLayerNormalization", [residual, mlp_out, ln1],
                                     [f"{p}/input_layernorm/output_0", "", "", f"{p}/input_layernorm/output_3"],
                                     f"{p}/input_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=EPS)
        qkv = matmul(h, w["qkv"], f"{p}/attn/qkv_proj")
        a = node("GroupQueryAttention",
                 [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                  "cos_cache", "sin_cache", "", "", ""],
                 [f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                 f"{p}/attn/GroupQueryAttention", domain="com.microsoft",
                 num_heads=H, kv_num_heads=KV, scale=float(1.0 / np.sqrt(D)), local_window_size=-1,
                 softcap=0.0, do_rotary=1, rotary_interleaved=0)[0]
        o = matmul(a, w["o"], f"{p}/attn/o_proj")
        ln2 = init(f"model.layers.{i}.post_attention_layernorm.weight", w["ln2"])
        h, _, _, residual = node("SkipSimplifiedLayerNormalization", [residual, o, ln2],
                                 [f"{p}/post_attention_layernorm/output_0", "", "",
                                  f"{p}/post_attention_layernorm/output_3"],
                                 f"{p}/post_attention_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=EPS)
        g = matmul(h, w["gate"], f"{p}/mlp/gate_proj")
        u = matmul(h, w["up"], f"{p}/mlp/up_proj")
        node("Sigmoid", [g], [f"{p}/mlp/act_fn/Sigmoid/output_0"], f"{p}/mlp/act_fn/Sigmoid")
        node("Mul", [g, f"{p}/mlp/act_fn/Sigmoid/output_0"], [f"{p}/mlp/act_fn/Mul/output_0"], f"{p}/mlp/act_fn/Mul")
        node("Mul", [f"{p}/mlp/act_fn/Mul/output_0", u], [f"{p}/mlp/Mul/output_0"], f"{p}/mlp/Mul")
        mlp_out = matmul(f"{p}/mlp/Mul/output_0", w["down"], f"{p}/mlp/down_proj")
    p = f"/model/layers.{args.layers}"
    fl = init(f"model.layers.{args.layers}.final_norm_layernorm.weight", final_ln)
    y = node("SkipSimplifiedLayerNormalization", [residual, mlp_out, fl], [f"{p}/final_norm_layernorm/output_0"],
             f"{p}/final_norm_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=EPS)[0]
    if int4:
        matmul(y, lm_head, "/lm_head", out="logits")
    else:
        node("MatMul", [y, "lm_head.MatMul.weight"], ["logits"], "/lm_head/MatMul")

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", V])]
    for kind in ("key", "value"):
        for i in range(args.layers):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", f32, ["batch_size", KV, "past_sequence_length", D]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", f32, ["batch_size", KV, "total_sequence_length", D]))
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10, producer_name="kiln make_genai_tiny.py", producer_version=str(BUILDER_VERSION))
    return model, D


def greedy(model, args, D):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(args.seed + 1)
    ids = rng.integers(0, args.vocab, 7).astype(np.int64)
    past = {f"past_key_values.{i}.{k}": np.zeros((1, args.kv_heads, 0, D), np.float32)
            for i in range(args.layers) for k in ("key", "value")}
    steps, total = [], 0
    step_ids = ids
    for _ in range(6):
        total += len(step_ids)
        feeds = {"input_ids": step_ids[None, :], "attention_mask": np.ones((1, total), np.int64), **past}
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, outs))
        logits = res["logits"]
        steps.append({"input_ids": step_ids.tolist(), "past_length": total - len(step_ids),
                      "logits_shape": list(logits.shape), "logits": logits.reshape(-1)})
        past = {f"past_key_values.{i}.{k}": res[f"present.{i}.{k}"] for i in range(args.layers) for k in ("key", "value")}
        step_ids = np.array([int(np.argmax(logits[0, -1]))], np.int64)
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--int4", action="store_true")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--max-pos", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model, D = build(args)
    # (onnx.checker refuses SimplifiedLayerNormalization in the default domain, as for the real builds.)
    onnx.save(model, os.path.join(args.out, "model.onnx"))

    steps = greedy(build(args, accuracy_level=0)[0] if args.int4 else model, args, D)
    ref = {"builder": "models/llm/make_genai_tiny.py", "builder_version": BUILDER_VERSION,
           "onnxruntime": __import__("onnxruntime").__version__,
           "mode": "greedy; prefill 7 tokens with empty past, then 1 token per step; present fed back as past",
           "steps": []}
    if args.int4:
        acc4 = greedy(model, args, D)
        ref["reference_accuracy_level"] = 0
        ref["max_abs_diff_accuracy_level_4"] = float(max(
            np.abs(a["logits"] - b["logits"]).max() for a, b in zip(steps, acc4)))
        ref["same_tokens_accuracy_level_4"] = all(a["input_ids"] == b["input_ids"] for a, b in zip(steps, acc4))
    for st in steps:
        st = dict(st)
        st["logits"] = [float(f"{v:.7g}") for v in st["logits"]]
        ref["steps"].append(st)
    spread = float(np.std(steps[0]["logits"]))
    assert spread > 1.0, f"logits too flat (std {spread})"
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))

    H, KV = args.heads, args.kv_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": D,
        "num_hidden_layers": args.layers, "vocab_size": args.vocab,
        "max_position_embeddings": args.max_pos, "rope_theta": ROPE_THETA, "rms_norm_eps": EPS,
        "hidden_act": "silu", "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
        "kiln": {"builder": "models/llm/make_genai_tiny.py", "builder_version": BUILDER_VERSION,
                 "precision": "int4" if args.int4 else "fp32", "seed": args.seed,
                 "weights": "random, numpy default_rng(seed)"},
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    genai = {
        "model": {
            "bos_token_id": 1, "context_length": args.max_pos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": D, "hidden_size": args.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": H, "num_hidden_layers": args.layers, "num_key_value_heads": KV,
            },
            "eos_token_id": 2, "pad_token_id": 2, "type": "llama", "vocab_size": args.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": args.max_pos, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }
    with open(os.path.join(args.out, "genai_config.json"), "w") as f:
        json.dump(genai, f, indent=4)
        f.write("\n")
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
    print(json.dumps({"out": args.out, "sizes": sizes, "tokens": [s["input_ids"] for s in steps],
                      **{k: v for k, v in ref.items() if k.startswith(("max_abs", "same_"))}}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One-node models of ONNX Runtime's contrib ops (the GenAI export's and the integer MatMuls with float
output its quantizer and optimizer write) and onnxruntime's outputs for them, for crates/kiln/tests/genai_ops.rs.

    make_refs.py [OUT_DIR]          (default: this file's directory)

Writes OUT_DIR/models/<case>.onnx (one node each; constant operands such as cos/sin caches and
MatMulNBits weights are initializers) and OUT_DIR/refs.json:
    {"onnxruntime": version, "cases": [{"name", "model", "tol", "inputs": [{"name", "dtype", "dims",
     "values"}], "outputs": [{"name", "dims", "values", "valid_rows"?}]}]}
`valid_rows` (GroupQueryAttention presents in the shared-buffer cases) lists, per batch entry, the
rows of present [B, Hk, rows, D] to compare: onnxruntime fed two separate buffers zeroes the rest,
where one shared buffer (and Kiln, when the past is as long as present) keeps the past's rows.
Inputs are random (numpy default_rng(0)); values are written with 7 significant digits.

Needs numpy, onnx and onnxruntime (the pinned venv /var/tmp/kcache/venv-llm-v1: onnx 1.23,
onnxruntime 1.32).
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
MS = "com.microsoft"
NP2ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int32: TensorProto.INT32,
           np.int64: TensorProto.INT64, np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
cases = []


def rnd(*shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def vi(name, arr):
    return helper.make_tensor_value_info(name, NP2ONNX[arr.dtype.type], list(arr.shape))


def add_case(name, op, domain, attrs, inputs, outputs, consts=(), tol=1e-5, valid_rows=None, opset=22):
    """inputs: list of (name, array or None for an omitted input); consts: names among them that
    become initializers (or (name, TensorProto) for exotic types); outputs: names ('' = unwired)."""
    node_inputs, graph_inputs, inits, feeds = [], [], [], {}
    const_names = {c if isinstance(c, str) else c[0] for c in consts}
    for c in consts:
        if not isinstance(c, str):
            inits.append(c[1])
    for nm, arr in inputs:
        if arr is None and nm not in const_names:
            node_inputs.append("")
            continue
        node_inputs.append(nm)
        if nm in const_names:
            if arr is not None:
                inits.append(numpy_helper.from_array(arr, nm))
        else:
            graph_inputs.append(vi(nm, arr))
            feeds[nm] = arr
    node = helper.make_node(op, node_inputs, outputs, name=f"{name}_node", domain=domain, **attrs)
    # Outputs have the first float input's type (the statistics output inv_std_var is float).
    ftype = next(NP2ONNX[a.dtype.type] for _, a in inputs if a is not None and a.dtype.kind == "f")
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT if o == "inv_std_var" else ftype, None)
            for o in outputs if o]
    graph = helper.make_graph([node], name, graph_inputs, outs, inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="make_refs.py")
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - report and skip what onnxruntime refuses
        print(f"SKIP {name}: onnxruntime: {str(e).splitlines()[0][:200]}")
        return
    os.makedirs(os.path.join(OUT, "models"), exist_ok=True)
    onnx.save(model, os.path.join(OUT, "models", f"{name}.onnx"))
    case = {"name": name, "model": f"models/{name}.onnx", "tol": tol, "inputs": [], "outputs": []}
    for nm, arr in feeds.items():
        case["inputs"].append({"name": nm, "dtype": np.dtype(arr.dtype).name, "dims": list(arr.shape),
                               "values": fmt(arr)})
    for o, arr in zip([o for o in outputs if o], got):
        out = {"name": o, "dims": list(arr.shape), "values": fmt(arr)}
        if valid_rows is not None and o.startswith("present"):
            out["valid_rows"] = valid_rows
        case["outputs"].append(out)
    cases.append(case)
    print(f"ok   {name}")


def fmt(arr):
    a = np.asarray(arr).reshape(-1)
    if a.dtype.kind in "iu":
        return [int(v) for v in a]
    return [float(f"{float(v):.7g}") for v in a]


# ---------------------------------------------------------------- GroupQueryAttention
def rope_cache(max_pos, half, theta=10000.0):
    inv = 1.0 / (theta ** (np.arange(half, dtype=np.float64) * 2 / (2 * half)))
    f = np.outer(np.arange(max_pos, dtype=np.float64), inv)
    return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)


def gqa(name, B, S, P, seqlens, total, H=4, Hk=2, D=16, packed=True, rotary=True, interleaved=False,
        window=-1, softcap=0.0, scale=None, pos_ids=None, bias_shape=None, sink=False, smooth=False,
        dtype=np.float32, half=None, tol=1e-5, shared=False):
    attrs = dict(num_heads=H, kv_num_heads=Hk, local_window_size=window, softcap=softcap,
                 do_rotary=int(rotary), rotary_interleaved=int(interleaved))
    if scale is not None:
        attrs["scale"] = scale
    if smooth:
        attrs["smooth_softmax"] = 1
    if packed:
        q, k, v = rnd(B, S, (H + 2 * Hk) * D, dtype=dtype), None, None
    else:
        q, k, v = rnd(B, S, H * D, dtype=dtype), rnd(B, S, Hk * D, dtype=dtype), rnd(B, S, Hk * D, dtype=dtype)
    pk = rnd(B, Hk, P, D, dtype=dtype) if P is not None else None
    pv = rnd(B, Hk, P, D, dtype=dtype) if P is not None else None
    cos, sin = rope_cache(64, half or D // 2) if rotary else (None, None)
    if rotary and dtype != np.float32:
        cos, sin = cos.astype(dtype), sin.astype(dtype)
    inputs = [("query", q), ("key", k), ("value", v), ("past_key", pk), ("past_value", pv),
              ("seqlens_k", np.array(seqlens, np.int32)), ("total_sequence_length", np.array(total, np.int32)),
              ("cos_cache", cos), ("sin_cache", sin),
              ("position_ids", None if pos_ids is None else np.array(pos_ids, np.int64)),
              ("attention_bias", None if bias_shape is None else rnd(*bias_shape, dtype=dtype)),
              ("head_sink", rnd(H, dtype=dtype) if sink else None)]
    consts = ["cos_cache", "sin_cache"] if rotary else []
    valid = [s + 1 for s in seqlens] if shared else None
    add_case(name, "GroupQueryAttention", MS, attrs, inputs, ["output", "present_key", "present_value"],
             consts=consts, tol=tol, valid_rows=valid)


gqa("gqa_prompt_packed", 1, 5, 0, [4], 5)
gqa("gqa_decode_packed", 1, 1, 5, [5], 6)
gqa("gqa_prompt_separate_interleaved", 1, 6, 0, [5], 6, packed=False, interleaved=True)
gqa("gqa_decode_separate_interleaved", 1, 1, 6, [6], 7, packed=False, interleaved=True)
gqa("gqa_prompt_no_past_no_rotary", 2, 4, None, [3, 3], 4, rotary=False)
gqa("gqa_prompt_window", 1, 8, 0, [7], 8, window=3)
gqa("gqa_decode_window", 1, 1, 8, [8], 9, window=3)
gqa("gqa_prompt_softcap_scale", 1, 5, 0, [4], 5, softcap=1.5, scale=0.4)
gqa("gqa_decode_softcap", 1, 1, 5, [5], 6, softcap=1.5)
gqa("gqa_decode_batch2_padded", 2, 1, 6, [6, 3], 7)
gqa("gqa_prompt_batch2_padded", 2, 6, 0, [5, 2], 6)
gqa("gqa_continued_prompt", 1, 3, 4, [6], 7)
gqa("gqa_decode_shared_buffer", 1, 1, 10, [5], 6, shared=True)
gqa("gqa_prompt_shared_buffer", 1, 4, 10, [3], 4, shared=True)
gqa("gqa_decode_position_ids", 1, 1, 5, [5], 6, pos_ids=[[9]])
gqa("gqa_prompt_position_ids", 1, 4, 0, [3], 4, pos_ids=[[3, 4, 5, 6]])
gqa("gqa_prompt_attention_bias", 2, 4, 0, [3, 3], 4, bias_shape=(2, 1, 4, 4))
gqa("gqa_decode_attention_bias", 1, 1, 5, [5], 6, bias_shape=(1, 4, 1, 6))
gqa("gqa_prompt_head_sink", 1, 5, 0, [4], 5, sink=True)
gqa("gqa_decode_head_sink", 1, 1, 5, [5], 6, sink=True)
gqa("gqa_decode_smooth_softmax", 1, 1, 5, [5], 6, smooth=True)
gqa("gqa_prompt_partial_rotary", 1, 5, 0, [4], 5, D=32, half=8)
gqa("gqa_decode_partial_rotary", 1, 1, 5, [5], 6, D=32, half=8, interleaved=True)
gqa("gqa_decode_one_kv_head", 1, 1, 5, [5], 6, Hk=1)
gqa("gqa_decode_mha", 1, 1, 5, [5], 6, H=2, Hk=2, packed=False)
gqa("gqa_prompt_f16", 1, 5, 0, [4], 5, dtype=np.float16, tol=4e-3)
gqa("gqa_decode_f16", 1, 1, 5, [5], 6, dtype=np.float16, tol=4e-3)

# ---------------------------------------------------------------- RMS norms
x = rnd(2, 3, 64)
add_case("sln_last_axis", "SimplifiedLayerNormalization", "", dict(axis=-1, epsilon=1e-5, stash_type=1),
         [("X", x), ("scale", rnd(64))], ["Y", "inv_std_var"], consts=["scale"])
add_case("sln_axis1", "SimplifiedLayerNormalization", "", dict(axis=1, epsilon=1e-3),
         [("X", rnd(2, 3, 16)), ("scale", rnd(3, 16))], ["Y", "inv_std_var"])
# (onnxruntime registers SimplifiedLayerNormalization in the default domain only; the test runs
# sln_last_axis with the node moved to com.microsoft, where Kiln registers it too.)
add_case("sln_f16", "SimplifiedLayerNormalization", "", dict(epsilon=1e-5),
         [("X", rnd(3, 32, dtype=np.float16)), ("scale", rnd(32, dtype=np.float16))], ["Y"], tol=4e-3)
add_case("skip_sln", "SkipSimplifiedLayerNormalization", MS, dict(epsilon=1e-5),
         [("input", rnd(2, 3, 64)), ("skip", rnd(2, 3, 64)), ("gamma", rnd(64))], ["output", "", "", "sum"],
         consts=["gamma"])
add_case("skip_sln_bias", "SkipSimplifiedLayerNormalization", MS, dict(epsilon=1e-4),
         [("input", rnd(2, 3, 32)), ("skip", rnd(2, 3, 32)), ("gamma", rnd(32)), ("bias", rnd(32))],
         ["output", "", "", "sum"])
add_case("skip_sln_broadcast_skip", "SkipSimplifiedLayerNormalization", MS, dict(epsilon=1e-5),
         [("input", rnd(2, 3, 32)), ("skip", rnd(3, 32)), ("gamma", rnd(32))], ["output", "", "", "sum"])
add_case("skip_sln_2d_output0", "SkipSimplifiedLayerNormalization", MS, dict(epsilon=1e-5),
         [("input", rnd(5, 32)), ("skip", rnd(5, 32)), ("gamma", rnd(32))], ["output"])
add_case("skip_sln_f16", "SkipSimplifiedLayerNormalization", MS, dict(epsilon=1e-5),
         [("input", rnd(2, 3, 32, dtype=np.float16)), ("skip", rnd(2, 3, 32, dtype=np.float16)),
          ("gamma", rnd(32, dtype=np.float16))], ["output", "", "", "sum"], tol=4e-3)


# ---------------------------------------------------------------- MatMulNBits
def pack_bits(codes, bits):
    """codes [..., n] (ints < 2^bits) -> bytes [..., ceil(n * bits / 8)], low bits first."""
    *lead, n = codes.shape
    per = 8 // bits
    pad = (-n) % per
    c = np.concatenate([codes, np.zeros((*lead, pad), codes.dtype)], axis=-1).reshape(*lead, -1, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i].astype(np.uint8) << (i * bits)).astype(np.uint8)
    return out


def nbits(name, K, N, bits=4, block=32, zp=None, bias=False, lead=(2, 3), runtime=False, dtype=np.float32,
          tol=2e-5):
    kb = -(-K // block)
    codes = rng.integers(0, 2 ** bits, (N, kb, block)).astype(np.uint8)
    B = pack_bits(codes, bits)
    scales = (rng.random((N, kb)) * 0.1 + 0.01).astype(dtype)
    zpa = None
    if zp == "packed":
        zpa = pack_bits(rng.integers(0, 2 ** bits, (N, kb)).astype(np.uint8), bits)
    elif zp == "float":
        zpa = (rng.random((N, kb)) * 2 ** bits).astype(dtype)
    inputs = [("A", rnd(*lead, K, dtype=dtype)), ("B", B), ("scales", scales), ("zero_points", zpa),
              ("g_idx", None), ("bias", rnd(N, dtype=dtype) if bias else None)]
    consts = [] if runtime else ["B", "scales"] + (["zero_points"] if zpa is not None else [])
    add_case(name, "MatMulNBits", MS, dict(K=K, N=N, bits=bits, block_size=block, accuracy_level=0),
             inputs, ["Y"], consts=consts, tol=tol)


nbits("nbits4_default_zp", 64, 24)
nbits("nbits4_packed_zp", 64, 24, zp="packed")
nbits("nbits4_packed_zp_odd_blocks", 48, 8, block=16, zp="packed")
nbits("nbits4_float_zp", 64, 24, zp="float")
nbits("nbits4_k_not_multiple_of_block", 40, 12, block=16, bias=True)
nbits("nbits4_bias_rank2", 64, 16, bias=True, lead=(5,))
nbits("nbits4_runtime_weight", 64, 16, zp="packed", bias=True, runtime=True)
nbits("nbits8", 48, 16, bits=8, block=16, zp="packed")
nbits("nbits8_default_zp", 32, 16, bits=8, block=16)
nbits("nbits2", 64, 16, bits=2, block=32, zp="packed")
nbits("nbits4_f16", 64, 16, dtype=np.float16, tol=4e-2)


# ---------------------------------------------------------------- GatherBlockQuantized
def gbq(name, data, indices, scales, zp=None, attrs=None, consts=()):
    inputs = [("data", data), ("indices", indices), ("scales", scales), ("zero_points", zp)]
    add_case(name, "GatherBlockQuantized", MS, attrs or {}, inputs, ["output"], consts=list(consts))


V = 10
idx = np.array([[1, 9, -1], [0, 12, -11]], np.int64)  # 12 and -11 are out of range: zeros
gbq("gbq_u8_bits4", pack_bits(rng.integers(0, 16, (V, 64)).astype(np.uint8), 4), idx,
    rnd(V, 2), attrs=dict(bits=4, block_size=32, gather_axis=0, quantize_axis=1), consts=["data"])
gbq("gbq_u8_bits4_zp", pack_bits(rng.integers(0, 16, (V, 64)).astype(np.uint8), 4), idx.astype(np.int32),
    rnd(V, 4), zp=pack_bits(rng.integers(0, 16, (V, 4)).astype(np.uint8), 4),
    attrs=dict(bits=4, block_size=16, gather_axis=0, quantize_axis=1))
gbq("gbq_u8_bits8_zp", rng.integers(0, 256, (V, 48)).astype(np.uint8), idx, rnd(V, 3),
    zp=rng.integers(0, 256, (V, 3)).astype(np.uint8), attrs=dict(bits=8, block_size=16, quantize_axis=-1))
gbq("gbq_u8_bits4_f16", pack_bits(rng.integers(0, 16, (V, 32)).astype(np.uint8), 4), idx,
    rnd(V, 1, dtype=np.float16), attrs=dict(bits=4, block_size=32, quantize_axis=1))
i4 = rng.integers(-8, 8, (V, 64))
i4zp = rng.integers(-8, 8, (V, 2))
gbq("gbq_int4_zp", None, idx, rnd(V, 2), zp=None, attrs=dict(block_size=32, gather_axis=0, quantize_axis=1),
    consts=[("data", helper.make_tensor("data", TensorProto.INT4, [V, 64], i4.reshape(-1).tolist())),
            ("zero_points", helper.make_tensor("zero_points", TensorProto.INT4, [V, 2], i4zp.reshape(-1).tolist()))])
u4 = rng.integers(0, 16, (32, 6))
u4zp = rng.integers(0, 16, (2, 6))
gbq("gbq_uint4_gather_axis1", None, np.array([5, 0, -2], np.int32), rnd(2, 6), zp=None,
    attrs=dict(block_size=16, gather_axis=1, quantize_axis=0),
    consts=[("data", helper.make_tensor("data", TensorProto.UINT4, [32, 6], u4.reshape(-1).tolist())),
            ("zero_points", helper.make_tensor("zero_points", TensorProto.UINT4, [2, 6], u4zp.reshape(-1).tolist()))])


# ---------------------------------------------------------------- integer MatMul with float output
def q8(*shape, signed=True):
    return rng.integers(-128, 128, shape).astype(np.int8) if signed else rng.integers(0, 256, shape).astype(np.uint8)


def mitf(name, K, N, lead=(2, 3), b_signed=True, zps=True, per_col=True, bias=True, runtime=False):
    inputs = [("A", q8(*lead, K, signed=False)), ("B", q8(K, N, signed=b_signed)),
              ("a_scale", np.array(0.0213, np.float32)),
              ("b_scale", (rng.random(N if per_col else ()) * 0.05 + 0.001).astype(np.float32)),
              ("a_zero_point", q8(signed=False) if zps else None),
              ("b_zero_point", (q8(N, signed=b_signed) if per_col else q8(signed=b_signed)) if zps else None),
              ("bias", rnd(N) if bias else None)]
    consts = [] if runtime else ["B", "b_scale"] + (["b_zero_point"] if zps else []) + (["bias"] if bias else [])
    add_case(name, "MatMulIntegerToFloat", MS, {}, inputs, ["Y"], consts=consts, tol=1e-5)


def dqmm(name, K, N, lead=(2, 5), b_signed=True, zp=True, bias=True):
    inputs = [("A", rnd(*lead, K)), ("B", q8(K, N, signed=b_signed)),
              ("b_scale", (rng.random(N) * 0.05 + 0.001).astype(np.float32)),
              ("b_zero_point", q8(N, signed=b_signed) if zp else None), ("bias", rnd(N) if bias else None)]
    consts = ["B", "b_scale"] + (["b_zero_point"] if zp else []) + (["bias"] if bias else [])
    add_case(name, "DynamicQuantizeMatMul", MS, {}, inputs, ["Y"], consts=consts, tol=1e-5)


mitf("mitf_s8_per_column", 40, 37)
mitf("mitf_u8_weight", 33, 20, b_signed=False)
mitf("mitf_no_zero_points_no_bias", 64, 48, zps=False, bias=False, per_col=False)
mitf("mitf_runtime_weight", 24, 40, lead=(7,), runtime=True)
dqmm("dqmm_s8", 48, 40)
dqmm("dqmm_u8_no_zp_no_bias", 20, 33, b_signed=False, zp=False, bias=False)


# ---------------------------------------------------------------- DynamicQuantizeLSTM
def dqlstm(name, S, B, I, H, dirs=1, per_col=False, extras=False, runtime=False, zp=False):
    """ONNX Runtime's quantizer writes W [dirs, I, 4H] and R [dirs, H, 4H] (transposed against LSTM) in
    int8 with scales/zero points per direction or per gate column. onnxruntime also quantizes X and each
    step's h to uint8, Kiln multiplies in f32 with the dequantized weights: the tolerance covers that."""
    direction = {1: "forward", 2: "bidirectional"}[dirs]
    shape = (dirs, 4 * H) if per_col else (dirs,)
    scale = lambda: (rng.random(shape) * 0.004 + 0.002).astype(np.float32)  # noqa: E731
    zero = lambda: (q8(*shape) // 16 if zp else np.zeros(shape, np.int8))  # noqa: E731
    inputs = [("X", rnd(S, B, I)), ("W", q8(dirs, I, 4 * H)), ("R", q8(dirs, H, 4 * H)),
              ("B", rnd(dirs, 8 * H, scale=0.3) if extras else None),
              ("sequence_lens", rng.integers(1, S + 1, B).astype(np.int32) if extras else None),
              ("initial_h", rnd(dirs, B, H, scale=0.5) if extras else None),
              ("initial_c", rnd(dirs, B, H, scale=0.5) if extras else None),
              ("P", rnd(dirs, 3 * H, scale=0.3) if extras else None),
              ("W_scale", scale()), ("W_zero_point", zero()), ("R_scale", scale()), ("R_zero_point", zero())]
    consts = [] if runtime else ["W", "R", "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    add_case(name, "DynamicQuantizeLSTM", MS, {"hidden_size": H, "direction": direction}, inputs,
             ["Y", "Y_h", "Y_c"], consts=consts, tol=2e-2)


dqlstm("dqlstm_forward", 5, 2, 16, 12)
dqlstm("dqlstm_bidirectional_per_column", 4, 3, 10, 8, dirs=2, per_col=True, extras=True)
dqlstm("dqlstm_zero_points_runtime_weights", 3, 2, 12, 6, zp=True, runtime=True)

with open(os.path.join(OUT, "refs.json"), "w") as f:
    json.dump({"onnxruntime": ort.__version__, "generator": "make_refs.py", "cases": cases}, f,
              separators=(",", ":"))
print(f"{len(cases)} cases -> {OUT}/refs.json")

"""Builds BERT-shaped encoders with the `onnx` helper API and numpy (random weights, fixed seed), shaped the way
a PyTorch export of `transformers.BertModel` looks at opset 17: embeddings (Gather + position Slice + Add) and a
LayerNorm written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, then per layer Q/K/V MatMul+Add,
Reshape/Transpose to heads, MatMul QK^T, Div sqrt(d), Add of the additive attention mask ((1 - mask) * -10000),
Softmax, MatMul V, output projection, residual Add + LayerNorm, FFN MatMul+Add, Gelu via Erf, MatMul+Add, residual
+ LayerNorm; a pooler (first token, MatMul+Add, Tanh). Batch and sequence length are dynamic.

    python models/make_bert.py OUT_DIR [--variant base|tiny|all]

writes OUT_DIR/bert-base.onnx (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522: ~440 MB) and/or
OUT_DIR/bert-tiny.onnx (2 layers, hidden 128, 2 heads, FFN 512: ~17 MB, small enough for debug-build tests).
Inputs: input_ids int64 [batch, sequence], attention_mask int64 [batch, sequence].
Outputs: last_hidden_state f32 [batch, sequence, hidden], pooler_output f32 [batch, hidden].
Existing files are kept (the weights are a pure function of the seed).
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VARIANTS = {
    "base": dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512, seed=20261126),
    "tiny": dict(layers=2, hidden=128, heads=2, ffn=512, vocab=30522, positions=512, seed=20261127),
}


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, hint: str, shape, std: float = 0.02) -> str:
        return self.const(hint, (self.rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32))

    def op(self, op_type: str, inputs, hint: str = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.n}", **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int, hint: str) -> str:
        w = self.weight(f"{hint}.weight", (d_in, d_out))
        b = self.weight(f"{hint}.bias", (d_out,))
        return self.op("Add", [self.op("MatMul", [x, w], hint), b], hint)

    def layer_norm(self, x: str, hidden: int, hint: str) -> str:
        # torch.onnx's decomposition of nn.LayerNorm before LayerNormalization existed (eps 1e-12)
        mean = self.op("ReduceMean", [x], f"{hint}.mean", axes=[-1], keepdims=1)
        d = self.op("Sub", [x, mean], f"{hint}.centered")
        sq = self.op("Pow", [d, self.const(f"{hint}.two", np.array(2.0, np.float32))], f"{hint}.sq")
        var = self.op("ReduceMean", [sq], f"{hint}.var", axes=[-1], keepdims=1)
        eps = self.op("Add", [var, self.const(f"{hint}.eps", np.array(1e-12, np.float32))], f"{hint}.var_eps")
        norm = self.op("Div", [d, self.op("Sqrt", [eps], f"{hint}.std")], f"{hint}.norm")
        gamma = self.const(f"{hint}.gamma", (1.0 + self.rng.standard_normal(hidden, dtype=np.float32) * 0.1))
        beta = self.weight(f"{hint}.beta", (hidden,), std=0.1)
        return self.op("Add", [self.op("Mul", [norm, gamma], hint), beta], hint)

    def gelu(self, x: str, hint: str) -> str:
        scaled = self.op("Div", [x, self.const(f"{hint}.sqrt2", np.array(np.sqrt(2.0), np.float32))], hint)
        erf1 = self.op("Add", [self.op("Erf", [scaled], hint), self.const(f"{hint}.one", np.array(1.0, np.float32))])
        half = self.op("Mul", [x, erf1], hint)
        return self.op("Mul", [half, self.const(f"{hint}.half", np.array(0.5, np.float32))], hint)


def build(layers: int, hidden: int, heads: int, ffn: int, vocab: int, positions: int, seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    head_dim = hidden // heads
    # embeddings: word + position (sliced to the sequence length) + token type 0
    word = b.weight("embeddings.word", (vocab, hidden))
    pos_table = b.weight("embeddings.position", (positions, hidden))
    token_type = b.weight("embeddings.token_type0", (hidden,))
    seq = b.op("Gather", ["input_ids_shape", b.const("one_i64", np.array(1, np.int64))], "seq_len", axis=0)
    b.nodes.insert(0, helper.make_node("Shape", ["input_ids"], ["input_ids_shape"], name="Shape_input_ids"))
    seq1 = b.op("Unsqueeze", [seq, b.const("axes0", np.array([0], np.int64))], "seq_len_1d")
    pos = b.op("Slice", [pos_table, b.const("zero_1d", np.array([0], np.int64)), seq1], "position_embeddings")
    x = b.op("Gather", [word, "input_ids"], "word_embeddings", axis=0)
    x = b.op("Add", [b.op("Add", [x, pos], "embeddings"), token_type], "embeddings")
    x = b.layer_norm(x, hidden, "embeddings.ln")
    # additive mask [batch, 1, 1, sequence]
    m = b.op("Unsqueeze", ["attention_mask", b.const("axes12", np.array([1, 2], np.int64))], "mask4d")
    m = b.op("Cast", [m], "mask_f32", to=TensorProto.FLOAT)
    m = b.op("Sub", [b.const("one_f32", np.array(1.0, np.float32)), m], "mask_inv")
    mask = b.op("Mul", [m, b.const("neg", np.array(-10000.0, np.float32))], "mask_add")
    split = b.const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = b.const("hidden_shape", np.array([0, 0, hidden], np.int64))
    scale = b.const("sqrt_head_dim", np.array(np.sqrt(head_dim), np.float32))
    for i in range(layers):
        p = f"layer{i}"

        def heads_of(t: str, perm, hint: str) -> str:
            return b.op("Transpose", [b.op("Reshape", [t, split], hint)], hint, perm=perm)

        q = heads_of(b.linear(x, hidden, hidden, f"{p}.query"), [0, 2, 1, 3], f"{p}.q")
        k = heads_of(b.linear(x, hidden, hidden, f"{p}.key"), [0, 2, 3, 1], f"{p}.kT")
        v = heads_of(b.linear(x, hidden, hidden, f"{p}.value"), [0, 2, 1, 3], f"{p}.v")
        scores = b.op("Div", [b.op("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scores")
        probs = b.op("Softmax", [b.op("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merge], f"{p}.ctx")
        attn = b.linear(ctx, hidden, hidden, f"{p}.attn_out")
        x = b.layer_norm(b.op("Add", [attn, x], f"{p}.res1"), hidden, f"{p}.ln1")
        h = b.gelu(b.linear(x, hidden, ffn, f"{p}.ffn_in"), f"{p}.gelu")
        h = b.linear(h, ffn, hidden, f"{p}.ffn_out")
        x = b.layer_norm(b.op("Add", [h, x], f"{p}.res2"), hidden, f"{p}.ln2")
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="Identity_last_hidden_state"))
    first = b.op("Gather", [x, b.const("zero_i64", np.array(0, np.int64))], "first_token", axis=1)
    pooled = b.op("Tanh", [b.linear(first, hidden, hidden, "pooler")], "pooled")
    b.nodes.append(helper.make_node("Identity", [pooled], ["pooler_output"], name="Identity_pooler_output"))

    graph = helper.make_graph(
        b.nodes,
        "bert",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]),
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden]),
        ],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln make_bert.py")
    model.ir_version = 8
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--variant", choices=["base", "tiny", "all"], default="all")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    for name in names:
        path = os.path.join(args.out_dir, f"bert-{name}.onnx")
        if os.path.exists(path):
            print(f"make_bert.py: {path} exists")
            continue
        model = build(**VARIANTS[name])
        onnx.checker.check_model(model, full_check=True)
        tmp = path + ".tmp"
        onnx.save(model, tmp)
        os.replace(tmp, path)
        print(f"make_bert.py: wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Print the structure of an ONNX Runtime GenAI decoder (what make_genai.py builds).

    genai_inspect.py MODEL_DIR_OR_ONNX [--layer N] [--all-nodes]

Prints: op types with domain and count; graph inputs/outputs (dtype, shape with symbolic dims, first and
last layers' past/present only); the nodes of one layer (default 0) with their inputs, outputs and
attributes; the nodes outside the layers (embedding, attention_mask -> seqlens_k / total_sequence_length
subgraph, final norm, lm_head); initializer shapes feeding MatMulNBits / GatherBlockQuantized.
Reads only the graph (load_external_data=False). Needs onnx.
"""
import argparse
import collections
import os
import re

import onnx
from onnx import helper


def dims(vi):
    t = vi.type.tensor_type
    return [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]


def attr_str(n):
    out = []
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, onnx.TensorProto):
            v = f"tensor{list(v.dims)}"
        out.append(f"{a.name}={v}")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--all-nodes", action="store_true")
    a = ap.parse_args()
    p = os.path.join(a.path, "model.onnx") if os.path.isdir(a.path) else a.path
    m = onnx.load(p, load_external_data=False)
    g = m.graph
    dt = lambda e: onnx.TensorProto.DataType.Name(e)  # noqa: E731
    print(f"# {p}: ir_version {m.ir_version}, opsets {[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}, "
          f"{len(g.node)} nodes, {len(g.initializer)} initializers, producer {m.producer_name} {m.producer_version}")
    print("\n## op types (domain, op, count)")
    c = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in g.node)
    for (d, o), k in sorted(c.items(), key=lambda x: (x[0][0], -x[1], x[0][1])):
        print(f"  {d:14s} {o:34s} {k}")

    def show_io(vis, what):
        print(f"\n## graph {what} ({len(vis)})")
        layer_re = re.compile(r"\.(\d+)\.")
        nl = max([int(layer_re.search(v.name).group(1)) for v in vis if layer_re.search(v.name)] or [0])
        for v in vis:
            mm = layer_re.search(v.name)
            if mm and int(mm.group(1)) not in (0, nl):
                continue
            print(f"  {v.name:28s} {dt(v.type.tensor_type.elem_type):8s} {dims(v)}")
        if nl > 1:
            print(f"  (layers 1..{nl - 1} the same)")

    show_io(g.input, "inputs")
    show_io(g.output, "outputs")

    inits = {t.name: t for t in g.initializer}
    pref = f"/model/layers.{a.layer}/"
    print(f"\n## nodes of layer {a.layer} (inputs -> outputs; attributes)")
    for n in g.node:
        if n.name.startswith(pref) or a.all_nodes:
            ins = [f"{i}{list(inits[i].dims) if i in inits else ''}" for i in n.input]
            print(f"  [{n.domain or 'ai.onnx'}] {n.op_type} {n.name}\n      in : {ins}\n      out: {list(n.output)}"
                  + (f"\n      attrs: {attr_str(n)}" if n.attribute else ""))
    if not a.all_nodes:
        print("\n## nodes outside /model/layers.* (preprocessing, final norm, lm_head)")
        for n in g.node:
            if not n.name.startswith("/model/layers.") or "final_norm" in n.name:
                ins = [f"{i}{list(inits[i].dims) if i in inits else ''}" for i in n.input]
                print(f"  [{n.domain or 'ai.onnx'}] {n.op_type} {n.name}\n      in : {ins}\n      out: {list(n.output)}"
                      + (f"\n      attrs: {attr_str(n)}" if n.attribute else ""))
    print("\n## initializer dtypes")
    print("  " + str(collections.Counter(dt(t.data_type) for t in g.initializer)))


if __name__ == "__main__":
    main()

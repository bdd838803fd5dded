//! Unit tests of the fp16 conversion on hand-built graphs.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

/// A small graph builder: values by name, nodes in order.
#[derive(Default)]
struct B {
    g: Graph,
    ids: HashMap<String, ValueId>,
}

impl B {
    fn v(&mut self, name: &str) -> ValueId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            ..Default::default()
        });
        self.ids.insert(name.into(), id);
        id
    }
    fn input(&mut self, name: &str, dtype: DType) -> &mut Self {
        let id = self.v(name);
        self.g.values[id.index()].dtype = Some(dtype);
        self.g.inputs.push(id);
        self
    }
    fn output(&mut self, name: &str, dtype: DType) -> &mut Self {
        let id = self.v(name);
        self.g.values[id.index()].dtype = Some(dtype);
        self.g.outputs.push(id);
        self
    }
    fn init(&mut self, name: &str, dims: &[usize], vals: &[f32]) -> &mut Self {
        let id = self.v(name);
        let t = TensorData::from_values(name, dims.to_vec(), vals).unwrap();
        self.g.values[id.index()].dtype = Some(DType::F32);
        self.g.initializers.insert(id, t);
        self
    }
    fn node(&mut self, op: &str, ins: &[&str], outs: &[&str], attrs: &[(&str, Attribute)]) -> &mut Self {
        self.node_in("", op, ins, outs, attrs)
    }
    fn node_in(
        &mut self,
        domain: &str,
        op: &str,
        ins: &[&str],
        outs: &[&str],
        attrs: &[(&str, Attribute)],
    ) -> &mut Self {
        let inputs = ins.iter().map(|n| Some(self.v(n))).collect();
        let outputs = outs.iter().map(|n| Some(self.v(n))).collect();
        let attributes: BTreeMap<String, Attribute> = attrs.iter().map(|(k, a)| (k.to_string(), a.clone())).collect();
        let name = format!("{op}_{}", self.g.nodes.len());
        self.g.nodes.push(super::super::edit::make_node(
            name, domain, op, inputs, outputs, attributes,
        ));
        self
    }
    fn convert(&mut self) -> Float16Report {
        convert_to_float16(&mut self.g, &Float16Options::default()).unwrap()
    }
}

fn dtypes(g: &Graph) -> Vec<Option<DType>> {
    infer_dtypes(g, &g.topological_order().unwrap())
}

fn dtype(g: &Graph, v: ValueId) -> Option<DType> {
    dtypes(g)[v.index()]
}

fn node<'g>(g: &'g Graph, op: &str) -> Vec<&'g Node> {
    g.nodes.iter().filter(|n| n.op_type == op).collect()
}

fn input_dtypes(g: &Graph, n: &Node) -> Vec<Option<DType>> {
    let dt = dtypes(g);
    n.inputs.iter().map(|v| v.and_then(|v| dt[v.index()])).collect()
}

fn casts(g: &Graph) -> usize {
    node(g, "Cast").len()
}

#[test]
fn converts_weights_and_keeps_io_dtypes() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .init("w", &[2, 2], &[1.0, 2.0, 3.0, -3.4e38])
        .init("bias", &[2], &[0.5, 1e-9])
        .node("MatMul", &["x", "w"], &["m"], &[])
        .node("Add", &["m", "bias"], &["a"], &[])
        .node("Relu", &["a"], &["y"], &[])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.converted_nodes, 3);
    assert_eq!(r.converted_initializers, 2);
    // Graph inputs and outputs keep their ids, names and f32 dtype.
    assert_eq!(g.inputs, vec![b.ids["x"]]);
    assert_eq!(g.outputs, vec![b.ids["y"]]);
    assert_eq!(g.value(b.ids["x"]).dtype, Some(DType::F32));
    assert_eq!(g.value(b.ids["y"]).dtype, Some(DType::F32));
    // One Cast in (x -> f16), one out (relu f16 -> y).
    assert_eq!(casts(g), 2);
    assert_eq!(r.casts_inserted, 2);
    let out_cast = node(g, "Cast")
        .into_iter()
        .find(|n| n.outputs[0] == Some(b.ids["y"]))
        .unwrap();
    assert_eq!(out_cast.attr("to"), Some(&Attribute::Int(1)));
    for op in ["MatMul", "Add", "Relu"] {
        let n = node(g, op)[0];
        assert!(input_dtypes(g, n).iter().all(|d| *d == Some(DType::F16)), "{op}");
    }
    // The f32 weights are gone, the f16 copies clamp to the finite range.
    assert!(g.initializers.values().all(|t| t.dtype == DType::F16));
    assert!(!g.initializers.contains_key(&b.ids["w"]));
    let w = g.initializers.values().find(|t| t.dims == vec![2, 2]).unwrap();
    let w: Vec<f32> = w.values::<half::f16>().unwrap().iter().map(|v| v.to_f32()).collect();
    assert_eq!(w, vec![1.0, 2.0, 3.0, -65504.0]);
    // Every converted value is declared f16 in the graph.
    assert_eq!(g.value(b.ids["m"]).dtype, Some(DType::F16));
    g.topological_order().unwrap();
}

#[test]
fn kiln_fused_ops_convert_like_the_nodes_they_replace() {
    let mut b = B::default();
    let program = Attribute::Floats(crate::passes::elementwise_chain::encode(&[
        crate::passes::elementwise_chain::Step::Sigmoid,
    ]));
    b.input("x", DType::F32)
        .init("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .init("bias", &[2], &[0.5, 1.0])
        .init("scale", &[2], &[0.1, 0.2])
        .node_in("ai.kiln", "MatMulBias", &["x", "w", "bias"], &["m"], &[])
        .node_in("ai.kiln", "ElementwiseChain", &["m"], &["c"], &[("program", program)])
        .node_in("ai.kiln", "SomethingNew", &["c", "scale"], &["y"], &[])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.converted_nodes, 2);
    for op in ["MatMulBias", "ElementwiseChain"] {
        let n = node(g, op)[0];
        assert!(input_dtypes(g, n).iter().all(|d| *d == Some(DType::F16)), "{op}");
    }
    // An ai.kiln op the conversion does not know keeps its f32 contract behind a Cast.
    let other = node(g, "SomethingNew")[0];
    assert!(input_dtypes(g, other).iter().all(|d| *d == Some(DType::F32)));
    assert_eq!(dtype(g, b.ids["c"]), Some(DType::F16));
    g.topological_order().unwrap();
}

#[test]
fn block_listed_ops_stay_fp32() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .node("Relu", &["x"], &["r"], &[])
        .node("Exp", &["r"], &["e"], &[])
        .node("ReduceSum", &["e"], &["s"], &[("keepdims", Attribute::Int(1))])
        .node("Div", &["e", "s"], &["y"], &[])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.kept_fp32.get("block list"), Some(&2));
    for op in ["Exp", "ReduceSum"] {
        let n = node(g, op)[0];
        assert_eq!(input_dtypes(g, n), vec![Some(DType::F32)], "{op}");
        assert_eq!(dtype(g, n.outputs[0].unwrap()), Some(DType::F32), "{op}");
    }
    // Exp and ReduceSum are adjacent in fp32: no Cast between them; Div converts both inputs.
    let exp_out = node(g, "Exp")[0].outputs[0].unwrap();
    assert_eq!(node(g, "ReduceSum")[0].inputs[0], Some(exp_out));
    let div = node(g, "Div")[0];
    assert_eq!(input_dtypes(g, div), vec![Some(DType::F16), Some(DType::F16)]);
    // x->f16, relu->f32, exp->f16, sum->f16, div->y(f32).
    assert_eq!(casts(g), 5);
}

#[test]
fn cancelling_and_noop_casts_are_removed() {
    // A model that already widens an f16 input: the retargeted Cast becomes a no-op and goes.
    let mut b = B::default();
    b.input("x16", DType::F16)
        .node("Cast", &["x16"], &["x"], &[("to", Attribute::Int(1))])
        .node("Relu", &["x"], &["y"], &[])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.casts_removed, 1);
    assert_eq!(node(g, "Relu")[0].inputs[0], Some(b.ids["x16"]));
    assert_eq!(casts(g), 1, "only the output Cast is left");

    // f16 -> f32 -> f16 made by the pass collapses to nothing.
    let mut b = B::default();
    b.input("h", DType::F16)
        .node("Cast", &["h"], &["f"], &[("to", Attribute::Int(1))])
        .node("Cast", &["f"], &["h2"], &[("to", Attribute::Int(10))])
        .node("Relu", &["h2"], &["y"], &[])
        .output("y", DType::F16);
    let ours: HashSet<String> = b.g.nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(remove_redundant_casts(&mut b.g, &ours), 1);
    eliminate_dead_nodes(&mut b.g);
    assert_eq!(node(&b.g, "Relu")[0].inputs[0], Some(b.ids["h"]));
    assert_eq!(casts(&b.g), 0);

    // The same pair written by the model itself is left alone (f32 -> f16 -> f32 rounds on purpose).
    let mut b = B::default();
    b.input("x", DType::F32)
        .node("Cast", &["x"], &["h"], &[("to", Attribute::Int(10))])
        .node("Cast", &["h"], &["y"], &[("to", Attribute::Int(1))])
        .output("y", DType::F32);
    assert_eq!(remove_redundant_casts(&mut b.g, &HashSet::new()), 0);
}

#[test]
fn index_math_stays_fp32() {
    // Shape -> Cast(float) -> Mul(scale) -> Floor -> Cast(int64): sizes above 2048 are not exact in f16.
    let mut b = B::default();
    b.input("x", DType::F32)
        .init("scale", &[1], &[1.5])
        .node("Shape", &["x"], &["s"], &[])
        .node("Cast", &["s"], &["sf"], &[("to", Attribute::Int(1))])
        .node("Mul", &["sf", "scale"], &["m"], &[])
        .node("Floor", &["m"], &["fl"], &[])
        .node("Cast", &["fl"], &["si"], &[("to", Attribute::Int(7))])
        .node("Relu", &["x"], &["r"], &[])
        .node("Reshape", &["r", "si"], &["y"], &[])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.kept_fp32.get("index math"), Some(&4));
    assert_eq!(g.initializers[&b.ids["scale"]].dtype, DType::F32);
    for op in ["Mul", "Floor"] {
        let n = node(g, op)[0];
        assert!(input_dtypes(g, n).iter().all(|d| *d == Some(DType::F32)), "{op}");
    }
    let cast_int = node(g, "Cast")
        .into_iter()
        .find(|n| n.attr("to") == Some(&Attribute::Int(7)))
        .unwrap();
    assert_eq!(input_dtypes(g, cast_int), vec![Some(DType::F32)]);
    let cast_float = node(g, "Cast")
        .into_iter()
        .find(|n| n.inputs[0] == Some(b.ids["s"]))
        .unwrap();
    assert_eq!(cast_float.attr("to"), Some(&Attribute::Int(1)));
    // The data path converts.
    assert_eq!(input_dtypes(g, node(g, "Relu")[0]), vec![Some(DType::F16)]);
}

#[test]
fn mask_arithmetic_meets_the_f16_path_once() {
    // int mask -> Cast -> (1 - m) * -1e4 stays f32; the Add with the scores converts it once.
    let mut b = B::default();
    b.input("scores", DType::F32)
        .input("mask", DType::I64)
        .init("one", &[], &[1.0])
        .init("big", &[], &[-1e4])
        .node("Cast", &["mask"], &["mf"], &[("to", Attribute::Int(1))])
        .node("Sub", &["one", "mf"], &["inv"], &[])
        .node("Mul", &["inv", "big"], &["bias"], &[])
        .node("Add", &["scores", "bias"], &["a"], &[])
        .node("Softmax", &["a"], &["y"], &[("axis", Attribute::Int(-1))])
        .output("y", DType::F32);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.kept_fp32.get("index math"), Some(&3));
    assert_eq!(
        input_dtypes(g, node(g, "Add")[0]),
        vec![Some(DType::F16), Some(DType::F16)]
    );
    assert_eq!(input_dtypes(g, node(g, "Softmax")[0]), vec![Some(DType::F16)]);
    assert_eq!(
        input_dtypes(g, node(g, "Sub")[0]),
        vec![Some(DType::F32), Some(DType::F32)]
    );
}

#[test]
fn subgraph_nodes_keep_an_f32_contract_and_bodies_convert() {
    // `r` (converted Relu) is an output and is read by name inside the If branches.
    let branch = |name: &str| {
        let mut b = B::default();
        let r = b.v("r");
        // No declared dtype: the conversion takes it from the outer scope.
        b.g.captures.push(r);
        b.node("Neg", &["r"], &[name], &[]).output(name, DType::F32);
        b.g.name = name.into();
        Arc::new(b.g)
    };
    let (then_b, else_b) = (branch("t"), branch("e"));
    let mut b = B::default();
    b.input("x", DType::F32)
        .input("c", DType::Bool)
        .node("Relu", &["x"], &["r"], &[])
        .node(
            "If",
            &["c"],
            &["z"],
            &[
                ("then_branch", Attribute::Graph(then_b.clone())),
                ("else_branch", Attribute::Graph(else_b.clone())),
            ],
        )
        .node("Relu", &["r"], &["y"], &[])
        .output("y", DType::F32)
        .output("z", DType::F32);
    let r_id = b.ids["r"];
    b.g.nodes[1].implicit_inputs.push(r_id);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.kept_fp32.get("subgraph"), Some(&1));
    // The captured value keeps its id, name and f32 dtype; a Cast writes it from the f16 Relu.
    assert_eq!(g.value(r_id).dtype, Some(DType::F32));
    let writer = g.nodes.iter().find(|n| n.outputs.contains(&Some(r_id))).unwrap();
    assert_eq!(writer.op_type, "Cast");
    assert_eq!(input_dtypes(g, writer), vec![Some(DType::F16)]);
    // The second Relu reads the f16 value directly, not a round trip through r.
    let second = node(g, "Relu")
        .into_iter()
        .find(|n| n.outputs[0] == Some(b.ids["y"]) || n.outputs[0] != writer.inputs[0])
        .unwrap();
    assert_eq!(input_dtypes(g, second), vec![Some(DType::F16)]);
    // The bodies convert on their own: Neg in f16, the capture read by name through a Cast, the
    // body output still f32.
    let if_node = node(g, "If")[0];
    assert_eq!(r.converted_nodes, 2 + 2, "two Relus and each body's Neg");
    for attr in ["then_branch", "else_branch"] {
        let Some(Attribute::Graph(body)) = if_node.attr(attr) else {
            panic!("{attr}")
        };
        let cap = body.captures[0];
        assert_eq!(body.value_name(cap), "r");
        assert_eq!(body.value(cap).dtype, Some(DType::F32));
        let neg = node(body, "Neg")[0];
        assert_eq!(input_dtypes(body, neg), vec![Some(DType::F16)]);
        assert_eq!(dtype(body, body.outputs[0]), Some(DType::F32));
        assert_eq!(casts(body), 2);
    }
    g.topological_order().unwrap();
}

#[test]
fn unknown_dtypes_are_left_alone() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .node("SomeCustomOp", &["x"], &["u"], &[])
        .node("Relu", &["u"], &["y"], &[])
        .output("y", DType::F32);
    b.g.nodes[0].domain = "custom.domain".into();
    let r = b.convert();
    assert_eq!(r.kept_fp32.get("other domain"), Some(&1));
    assert_eq!(r.kept_fp32.get("unknown dtype"), Some(&1));
    assert_eq!(casts(&b.g), 0);
}

#[test]
fn layer_norm_statistics_stay_f32() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .init("s", &[2], &[1.0, 1.0])
        .node("LayerNormalization", &["x", "s"], &["y", "mean"], &[])
        .output("y", DType::F32)
        .output("mean", DType::F32);
    b.convert();
    let g = &b.g;
    let ln = node(g, "LayerNormalization")[0];
    assert_eq!(input_dtypes(g, ln), vec![Some(DType::F16), Some(DType::F16)]);
    // y goes through an output Cast; mean is written directly in f32.
    assert_eq!(ln.outputs[1], Some(b.ids["mean"]));
    assert_eq!(casts(g), 2);
}

#[test]
fn run_time_weights_convert_their_value_attribute() {
    // A ConstantOfShape weight read only by a converted MatMul becomes an f16 ConstantOfShape.
    let shape = TensorData::from_values("shape", vec![2], &[2i64, 2]).unwrap();
    let value = TensorData::from_values("v", vec![1], &[0.1f32]).unwrap();
    let mut b = B::default();
    b.input("x", DType::F32)
        .node(
            "ConstantOfShape",
            &["shape"],
            &["w"],
            &[("value", Attribute::Tensor(value))],
        )
        .node("MatMul", &["x", "w"], &["y"], &[])
        .output("y", DType::F32);
    let s = b.ids["shape"];
    b.g.initializers.insert(s, shape);
    b.g.values[s.index()].dtype = Some(DType::I64);
    let r = b.convert();
    let g = &b.g;
    assert!(r.kept_fp32.is_empty(), "{r}");
    let cos = node(g, "ConstantOfShape")[0];
    match cos.attr("value") {
        Some(Attribute::Tensor(t)) => assert_eq!(t.values::<half::f16>(), Some(vec![half::f16::from_f32(0.1)])),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        input_dtypes(g, node(g, "MatMul")[0]),
        vec![Some(DType::F16), Some(DType::F16)]
    );
    assert_eq!(casts(g), 2, "x in, y out");
}

#[test]
fn loop_bodies_convert_behind_an_f32_interface() {
    // body(i, cond, v) -> (cond, v + k) with k captured from the outer Relu.
    let mut body = B::default();
    body.input("i", DType::I64)
        .input("cond", DType::Bool)
        .input("v", DType::F32)
        .node("Identity", &["cond"], &["cond_out"], &[])
        .node("Add", &["v", "k"], &["v_out"], &[])
        .output("cond_out", DType::Bool)
        .output("v_out", DType::F32);
    let k = body.ids["k"];
    body.g.captures.push(k);
    body.g.name = "body".into();
    let body = Arc::new(body.g);
    let mut b = B::default();
    b.input("x", DType::F32)
        .input("m", DType::I64)
        .input("c", DType::Bool)
        .node("Relu", &["x"], &["k"], &[])
        .node("Loop", &["m", "c", "x"], &["y"], &[("body", Attribute::Graph(body))])
        .output("y", DType::F32);
    let k_outer = b.ids["k"];
    b.g.nodes[1].implicit_inputs.push(k_outer);
    let r = b.convert();
    let g = &b.g;
    assert_eq!(r.kept_fp32.get("subgraph"), Some(&1), "{r}");
    let lp = node(g, "Loop")[0];
    assert_eq!(
        input_dtypes(g, lp),
        vec![Some(DType::I64), Some(DType::Bool), Some(DType::F32)]
    );
    assert_eq!(lp.inputs[2], Some(b.ids["x"]), "the Loop reads the f32 input itself");
    assert_eq!(g.value(k_outer).dtype, Some(DType::F32));
    let Some(Attribute::Graph(body)) = lp.attr("body") else {
        panic!("body")
    };
    let add = node(body, "Add")[0];
    assert_eq!(input_dtypes(body, add), vec![Some(DType::F16), Some(DType::F16)]);
    assert_eq!(dtype(body, body.outputs[1]), Some(DType::F32));
    assert_eq!(body.inputs.len(), 3);
    assert_eq!(body.value(body.inputs[2]).dtype, Some(DType::F32));
    // v in, k in, v_out out.
    assert_eq!(casts(body), 3);
    // Names are unique across the model (ONNX's SSA rule).
    let mut names = HashSet::new();
    g.for_each_graph(&mut |sg| {
        for n in &sg.nodes {
            for o in n.outputs.iter().flatten() {
                assert!(
                    names.insert(sg.value_name(*o).to_string()),
                    "{} twice",
                    sg.value_name(*o)
                );
            }
        }
    });
}

impl B {
    fn init_f16(&mut self, name: &str, dims: &[usize], vals: &[f32]) -> &mut Self {
        let id = self.v(name);
        let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
        let t = TensorData::from_values(name, dims.to_vec(), &h).unwrap();
        self.g.values[id.index()].dtype = Some(DType::F16);
        self.g.initializers.insert(id, t);
        self
    }
}

fn f16_tensor(vals: &[f32]) -> TensorData {
    let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
    TensorData::from_values("k", vec![vals.len()], &h).unwrap()
}

/// The node writing `v`.
fn writer(g: &Graph, v: ValueId) -> &Node {
    g.nodes.iter().find(|n| n.outputs.contains(&Some(v))).unwrap()
}

#[test]
fn widening_keeps_f16_io_and_computes_in_f32() {
    let mut b = B::default();
    b.input("x", DType::F16)
        .init_f16("w", &[2, 2], &[1.0, 2.0, 3.0, 0.5])
        .node("MatMul", &["x", "w"], &["m"], &[])
        .node("Cast", &["m"], &["c"], &[("to", Attribute::Int(10))])
        .node(
            "Constant",
            &[],
            &["k"],
            &[("value", Attribute::Tensor(f16_tensor(&[0.25, -1.5])))],
        )
        .node("EyeLike", &["m"], &["e"], &[("dtype", Attribute::Int(10))])
        .node("Add", &["c", "k"], &["a"], &[])
        .node("Add", &["a", "e"], &["y"], &[])
        .output("y", DType::F16);
    let (x, y) = (b.ids["x"], b.ids["y"]);
    b.g.values[b.ids["m"].index()].dtype = Some(DType::F16);
    let r = widen_to_float32(&mut b.g, true).unwrap();
    let g = &b.g;
    assert_eq!(r.initializers, 1);
    assert_eq!(r.attributes, 3, "Cast to, Constant value, EyeLike dtype");
    assert_eq!(r.boundary_casts, 2);
    assert!(r.values >= 2, "w and m were declared f16: {r:?}");
    // The interface is unchanged: same ids, names and f16 dtype.
    assert_eq!((g.inputs.clone(), g.outputs.clone()), (vec![x], vec![y]));
    assert_eq!(g.value(x).dtype, Some(DType::F16));
    assert_eq!(g.value(y).dtype, Some(DType::F16));
    // x is widened once, first; y is narrowed once, last.
    let first = &g.nodes[0];
    assert_eq!((first.op_type.as_str(), first.inputs[0]), ("Cast", Some(x)));
    assert_eq!(first.attr("to"), Some(&Attribute::Int(1)));
    let last = g.nodes.last().unwrap();
    assert_eq!((last.op_type.as_str(), last.outputs[0]), ("Cast", Some(y)));
    assert_eq!(last.attr("to"), Some(&Attribute::Int(10)));
    assert_eq!(writer(g, y).name, last.name);
    // Everything between computes in f32.
    for op in ["MatMul", "Add"] {
        for n in node(g, op) {
            assert!(input_dtypes(g, n).iter().all(|d| *d == Some(DType::F32)), "{op}");
        }
    }
    assert_eq!(node(g, "MatMul")[0].inputs[0], first.outputs[0]);
    let w = &g.initializers[&b.ids["w"]];
    assert_eq!(w.values::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 0.5]);
    assert_eq!(g.value(b.ids["w"]).dtype, Some(DType::F32));
    let cast = writer(g, b.ids["c"]);
    assert_eq!(cast.attr("to"), Some(&Attribute::Int(1)));
    let Some(Attribute::Tensor(k)) = writer(g, b.ids["k"]).attr("value") else {
        panic!("Constant value")
    };
    assert_eq!(k.values::<f32>().unwrap(), vec![0.25, -1.5]);
    assert_eq!(writer(g, b.ids["e"]).attr("dtype"), Some(&Attribute::Int(1)));
    g.topological_order().unwrap();
}

#[test]
fn widening_leaves_graphs_without_f16_alone() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .init("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
        .node("MatMul", &["x", "w"], &["y"], &[])
        .node("Cast", &["y"], &["z"], &[("to", Attribute::Int(16))])
        .output("z", DType::BF16);
    let before = b.g.clone();
    let r = widen_to_float32(&mut b.g, true).unwrap();
    assert!(!r.changed());
    assert_eq!(b.g, before);
}

#[test]
fn widening_follows_captured_inputs_into_subgraphs() {
    // The f16 input `x` is read by name inside both If branches.
    let branch = |name: &str| {
        let mut b = B::default();
        let x = b.v("x");
        b.g.values[x.index()].dtype = Some(DType::F16);
        b.g.captures.push(x);
        b.node("Neg", &["x"], &[name], &[]).output(name, DType::F16);
        b.g.name = name.into();
        Arc::new(b.g)
    };
    let mut b = B::default();
    b.input("x", DType::F16)
        .input("c", DType::Bool)
        .node(
            "If",
            &["c"],
            &["z"],
            &[
                ("then_branch", Attribute::Graph(branch("t"))),
                ("else_branch", Attribute::Graph(branch("e"))),
            ],
        )
        .output("z", DType::F16);
    let x = b.ids["x"];
    b.g.nodes[0].implicit_inputs.push(x);
    widen_to_float32(&mut b.g, true).unwrap();
    let g = &b.g;
    let if_node = node(g, "If")[0];
    let wide = if_node.implicit_inputs[0];
    assert_ne!(wide, x);
    assert_eq!(writer(g, wide).inputs[0], Some(x));
    assert_eq!(g.value(wide).dtype, Some(DType::F32));
    for attr in ["then_branch", "else_branch"] {
        let Some(Attribute::Graph(body)) = if_node.attr(attr) else {
            panic!("{attr}")
        };
        // The body binds the widened outer value by its new name and computes in f32.
        assert_eq!(body.value_name(body.captures[0]), g.value_name(wide));
        assert!(body.values.iter().all(|v| v.dtype != Some(DType::F16)));
    }
    // The If's own output is narrowed back for the caller.
    assert_eq!(writer(g, b.ids["z"]).op_type, "Cast");
    g.topological_order().unwrap();
}

#[test]
fn widening_casts_a_feedable_f16_initializer_instead_of_converting_it() {
    let mut b = B::default();
    b.input("x", DType::F32)
        .init_f16("s", &[1], &[2.0])
        .node("Cast", &["x"], &["xh"], &[("to", Attribute::Int(10))])
        .node("Mul", &["xh", "s"], &["y"], &[])
        .output("y", DType::F16);
    let s = b.ids["s"];
    b.g.inputs.push(s);
    let mut fixed = b.g.clone();
    widen_to_float32(&mut b.g, true).unwrap();
    // IR >= 4: the caller may feed `s`, so it stays f16 and a Cast widens it.
    assert_eq!(b.g.initializers[&s].dtype, DType::F16);
    let mul = node(&b.g, "Mul")[0];
    assert_eq!(writer(&b.g, mul.inputs[1].unwrap()).op_type, "Cast");
    // IR 3: initializers listed as inputs are constants and convert in place.
    widen_to_float32(&mut fixed, false).unwrap();
    assert_eq!(fixed.initializers[&s].dtype, DType::F32);
    assert_eq!(node(&fixed, "Mul")[0].inputs[1], Some(s));
}

//! Graph optimizer rules: each test builds a small graph the rule should rewrite, checks the
//! rewrite happened (op counts), and that the optimized graph computes the same outputs as the
//! original through the engine. Fused `com.microsoft` kernels are exercised here (the ONNX node
//! tests have none).

mod common;

use std::collections::BTreeMap;

use kiln::internals::graph::passes::{self, OptLevel, Options};
use kiln::internals::graph::{Attribute, DType, Graph, Model, Node, Shape, ValueId, ValueInfo, ValueKind};
use kiln::internals::{onnx, runtime};
use kiln::{Level, Session, TensorData};

use common::refs;

/// Builds a graph value by value.
struct B {
    g: Graph,
    feeds: Vec<(String, TensorData)>,
    n: usize,
}

impl B {
    fn new() -> Self {
        B {
            g: Graph {
                name: "test".into(),
                ..Default::default()
            },
            feeds: Vec::new(),
            n: 0,
        }
    }

    fn value(&mut self, name: &str, dtype: Option<DType>, shape: Option<Shape>) -> ValueId {
        self.g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype,
            shape,
        })
    }

    /// A float input with a deterministic feed.
    fn input(&mut self, name: &str, dims: &[usize]) -> ValueId {
        let count: usize = dims.iter().product();
        let vals: Vec<f32> = (0..count).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        self.input_data(TensorData::from_values(name, dims.to_vec(), &vals).unwrap())
    }

    fn input_data(&mut self, t: TensorData) -> ValueId {
        let v = self.value(&t.name, Some(t.dtype), Some(Shape::from_known(&t.dims)));
        self.g.inputs.push(v);
        self.feeds.push((t.name.clone(), t));
        v
    }

    fn init(&mut self, t: TensorData) -> ValueId {
        let v = self.value(&t.name, Some(t.dtype), Some(Shape::from_known(&t.dims)));
        self.g.initializers.insert(v, t);
        v
    }

    fn f32s(&mut self, name: &str, dims: &[usize], vals: &[f32]) -> ValueId {
        self.init(TensorData::from_values(name, dims.to_vec(), vals).unwrap())
    }

    fn scalar(&mut self, name: &str, v: f32) -> ValueId {
        self.f32s(name, &[], &[v])
    }

    fn i64s(&mut self, name: &str, vals: &[i64]) -> ValueId {
        self.init(TensorData::from_values(name, vec![vals.len()], vals).unwrap())
    }

    fn node_in(&mut self, domain: &str, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attribute)>) -> ValueId {
        self.n += 1;
        let out = self.value(&format!("{op}_{}_out", self.n), None, None);
        self.g.nodes.push(Node {
            name: format!("{op}_{}", self.n),
            op_type: op.into(),
            domain: domain.into(),
            inputs: inputs.iter().map(|v| Some(*v)).collect(),
            outputs: vec![Some(out)],
            attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            implicit_inputs: vec![],
        });
        out
    }

    fn node(&mut self, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attribute)>) -> ValueId {
        self.node_in("", op, inputs, attrs)
    }

    fn op(&mut self, op: &str, inputs: &[ValueId]) -> ValueId {
        self.node(op, inputs, vec![])
    }

    fn model(mut self, outputs: &[ValueId], opset: i64) -> (Model, Vec<(String, TensorData)>) {
        self.g.outputs = outputs.to_vec();
        let model = Model {
            graph: self.g,
            opsets: BTreeMap::from([(String::new(), opset)]),
            ir_version: 8,
            producer: "test".into(),
        };
        (model, self.feeds)
    }
}

fn ints(v: &[i64]) -> Attribute {
    Attribute::Ints(v.to_vec())
}

fn op_counts(g: &Graph) -> BTreeMap<String, usize> {
    onnx::op_counts(g)
}

/// Runs a model exactly as written (no optimization).
fn run_as_is(model: Model, feeds: &[(String, TensorData)]) -> Vec<TensorData> {
    Session::builder()
        .optimization(Level::Disabled)
        .build_from_model(model)
        .expect("builds")
        .run(feeds.to_vec())
        .expect("runs")
}

fn assert_close(want: &[TensorData], got: &[TensorData], tol: f64) {
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(got) {
        assert_eq!(w.dims, g.dims, "{}", w.name);
        assert_eq!(w.dtype, g.dtype, "{}", w.name);
        let (a, b) = match w.dtype {
            DType::F32 => (
                w.values::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect::<Vec<_>>(),
                g.values::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect::<Vec<_>>(),
            ),
            _ => (
                w.to_i64_vec().unwrap().into_iter().map(|v| v as f64).collect(),
                g.to_i64_vec().unwrap().into_iter().map(|v| v as f64).collect(),
            ),
        };
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + x.abs()), "{}[{i}]: {x} vs {y}", w.name);
        }
    }
}

/// Optimizes with `options`, checks the outputs against the unoptimized graph, returns the
/// optimized model and report.
fn optimize_and_compare(
    model: &Model,
    feeds: &[(String, TensorData)],
    options: &Options,
    tol: f64,
) -> (Model, passes::Report) {
    let want = run_as_is(model.clone(), feeds);
    let mut opt = model.clone();
    let report = passes::optimize(&mut opt.graph, options, &runtime::CpuConstEval).expect("optimizes");
    // Graph outputs keep their ids and names.
    assert_eq!(opt.graph.outputs, model.graph.outputs);
    let got = run_as_is(opt.clone(), feeds);
    assert_close(&want, &got, tol);
    (opt, report)
}

fn opts(model: &Model, level: OptLevel) -> Options {
    Options::for_model(model, level)
}

fn check(model: &Model, feeds: &[(String, TensorData)], level: OptLevel) -> (BTreeMap<String, usize>, passes::Report) {
    let (opt, report) = optimize_and_compare(model, feeds, &opts(model, level), 1e-5);
    (op_counts(&opt.graph), report)
}

#[test]
fn constant_folding_evaluates_constant_subgraphs_once() {
    let mut b = B::new();
    let x = b.input("x", &[2, 3]);
    let a = b.f32s("a", &[3], &[1.0, 2.0, 3.0]);
    let c = b.node(
        "Constant",
        &[],
        vec![(
            "value",
            Attribute::Tensor(TensorData::from_values("", vec![3], &[0.5f32, 0.25, 2.0]).unwrap()),
        )],
    );
    let s = b.op("Add", &[a, c]);
    let e = b.op("Exp", &[s]);
    let y = b.op("Mul", &[x, e]);
    let (m, feeds) = b.model(&[y], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops, BTreeMap::from([("Mul".to_string(), 1)]));
    assert_eq!(report.count("constant_folding"), 3);
    assert_eq!((report.nodes_before, report.nodes_after), (4, 1));
}

#[test]
fn constant_folding_respects_size_cap_randomness_and_overridable_initializers() {
    let mut b = B::new();
    let x = b.input("x", &[1]);
    let shape = b.i64s("shape", &[256, 256]);
    let big = b.node(
        "ConstantOfShape",
        &[shape],
        vec![(
            "value",
            Attribute::Tensor(TensorData::from_values("", vec![1], &[1.0f32]).unwrap()),
        )],
    );
    let r = b.node("RandomNormal", &[], vec![("shape", ints(&[1]))]);
    let r2 = b.op("Abs", &[r]);
    let w = b.f32s("w", &[1], &[3.0]);
    b.g.inputs.push(w); // overridable: IR >= 4
    let w2 = b.op("Neg", &[w]);
    let s = b.op("ReduceSum", &[big]);
    let y = b.op("Add", &[x, s]);
    let z = b.op("Mul", &[r2, w2]);
    let (m, _) = b.model(&[y, z], 17);
    let mut o = opts(&m, OptLevel::Basic);
    o.max_fold_growth_bytes = 1024;
    let mut g = m.graph.clone();
    let report = passes::optimize(&mut g, &o, &runtime::CpuConstEval).unwrap();
    let ops = op_counts(&g);
    // 256*256 f32 is 256 KiB > 1 KiB: not folded; RandomNormal never; Neg(w) reads an input.
    for op in ["ConstantOfShape", "RandomNormal", "Abs", "Neg", "ReduceSum"] {
        assert_eq!(ops.get(op), Some(&1), "{op}: {ops:?}");
    }
    assert_eq!(report.count("constant_folding"), 0);
    // With the default (64 MiB) cap the ConstantOfShape -> ReduceSum chain folds.
    let mut g = m.graph.clone();
    let report = passes::optimize(&mut g, &opts(&m, OptLevel::Basic), &runtime::CpuConstEval).unwrap();
    assert_eq!(report.count("constant_folding"), 2);
    assert!(!op_counts(&g).contains_key("ConstantOfShape"));
}

#[test]
fn cse_merges_identical_nodes_but_not_random_ones() {
    let mut b = B::new();
    let x = b.input("x", &[2, 4]);
    let r1 = b.node("LeakyRelu", &[x], vec![("alpha", Attribute::Float(0.2))]);
    let r2 = b.node("LeakyRelu", &[x], vec![("alpha", Attribute::Float(0.2))]);
    let r3 = b.node("LeakyRelu", &[x], vec![("alpha", Attribute::Float(0.3))]);
    let e1 = b.op("Exp", &[r1]);
    let e2 = b.op("Exp", &[r2]);
    let s = b.op("Sum", &[e1, e2, r3]);
    let (m, feeds) = b.model(&[s], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops.get("LeakyRelu"), Some(&2));
    assert_eq!(ops.get("Exp"), Some(&1));
    assert_eq!(report.count("common_subexpression_elimination"), 2);

    let mut b = B::new();
    let x = b.input("x", &[2]);
    let r1 = b.node("RandomUniformLike", &[x], vec![]);
    let r2 = b.node("RandomUniformLike", &[x], vec![]);
    let s = b.op("Sub", &[r1, r2]);
    let (m, _) = b.model(&[s], 17);
    let mut g = m.graph.clone();
    passes::optimize(&mut g, &opts(&m, OptLevel::Basic), &runtime::CpuConstEval).unwrap();
    assert_eq!(op_counts(&g).get("RandomUniformLike"), Some(&2));
}

#[test]
fn noop_nodes_disappear_and_graph_outputs_keep_their_names() {
    let mut b = B::new();
    let x = b.input("x", &[2, 3]);
    let i = b.op("Identity", &[x]);
    let c = b.node("Cast", &[i], vec![("to", Attribute::Int(1))]);
    let shape = b.i64s("s", &[0, -1]);
    let r = b.op("Reshape", &[c, shape]);
    let t = b.node("Transpose", &[r], vec![("perm", ints(&[0, 1]))]);
    let d = b.op("Dropout", &[t]);
    let e = b.op("Exp", &[d]);
    // The graph output is an Identity: its producer writes the output instead.
    let out = b.op("Identity", &[e]);
    let (m, feeds) = b.model(&[out], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops, BTreeMap::from([("Exp".to_string(), 1)]));
    assert_eq!(report.count("noop_elimination"), 6);
    let mut opt = m.clone();
    kiln::optimize_model(&mut opt, Level::Basic).unwrap();
    assert_eq!(opt.graph.value_name(opt.graph.outputs[0]), "Identity_7_out");
    // A Cast that changes the type stays.
    let mut b = B::new();
    let x = b.input("x", &[2]);
    let c = b.node("Cast", &[x], vec![("to", Attribute::Int(7))]);
    let (m, feeds) = b.model(&[c], 17);
    let (ops, _) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops.get("Cast"), Some(&1));
}

#[test]
fn static_shape_chains_fold_to_constants() {
    // Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters write `x.view(x.size(0), -1)`.
    let mut b = B::new();
    let x = b.input("x", &[2, 3, 4]);
    let s = b.op("Shape", &[x]);
    let zero = b.init(TensorData::from_values("zero", vec![], &[0i64]).unwrap());
    let d0 = b.node("Gather", &[s, zero], vec![("axis", Attribute::Int(0))]);
    let ax = b.i64s("ax", &[0]);
    let u = b.op("Unsqueeze", &[d0, ax]);
    let minus1 = b.i64s("m1", &[-1]);
    let cat = b.node("Concat", &[u, minus1], vec![("axis", Attribute::Int(0))]);
    let r = b.op("Reshape", &[x, cat]);
    let y = b.op("Relu", &[r]);
    let (m, feeds) = b.model(&[y], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(
        ops,
        BTreeMap::from([("Relu".to_string(), 1), ("Reshape".to_string(), 1)])
    );
    assert_eq!(report.count("shape_folding"), 1);
    assert_eq!(report.count("constant_folding"), 3);
}

#[test]
fn reshape_chains_and_transpose_pairs_collapse() {
    let mut b = B::new();
    let x = b.input("x", &[2, 3, 4]);
    let s1 = b.i64s("s1", &[6, 4]);
    let s2 = b.i64s("s2", &[4, 6]);
    let r1 = b.op("Reshape", &[x, s1]);
    let f = b.op("Exp", &[x]);
    let r2 = b.op("Reshape", &[r1, s2]);
    let t1 = b.node("Transpose", &[f], vec![("perm", ints(&[1, 2, 0]))]);
    let t2 = b.node("Transpose", &[t1], vec![("perm", ints(&[2, 0, 1]))]);
    let t3 = b.node("Transpose", &[t2], vec![("perm", ints(&[0, 2, 1]))]);
    let t4 = b.node("Transpose", &[t3], vec![("perm", ints(&[1, 0, 2]))]);
    let (m, feeds) = b.model(&[r2, t4], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops.get("Reshape"), Some(&1));
    assert_eq!(report.count("reshape_chain"), 1);
    assert_eq!(ops.get("Transpose"), Some(&4), "Transpose merging is an Extended rule");
    let (ops, report) = check(&m, &feeds, OptLevel::Extended);
    // t2(t1) is the identity and disappears; t4(t3) merges into one Transpose.
    assert_eq!(ops.get("Transpose"), Some(&1), "{ops:?}");
    assert!(report.count("transpose_merge") >= 2);
}

/// Conv weights `[m, c, 3, 3]` with varied values.
fn conv_weight(b: &mut B, name: &str, m: usize, c: usize) -> ValueId {
    let vals: Vec<f32> = (0..m * c * 9).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
    b.f32s(name, &[m, c, 3, 3], &vals)
}

#[test]
fn conv_batchnorm_and_activation_fuse() {
    let mut b = B::new();
    let x = b.input("x", &[1, 3, 8, 8]);
    let w = conv_weight(&mut b, "w", 4, 3);
    let cb = b.f32s("cb", &[4], &[0.1, -0.2, 0.3, 0.0]);
    let conv = b.node("Conv", &[x, w, cb], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let gamma = b.f32s("gamma", &[4], &[1.0, 0.5, 2.0, -1.0]);
    let beta = b.f32s("beta", &[4], &[0.0, 0.1, -0.1, 0.3]);
    let mean = b.f32s("mean", &[4], &[0.2, -0.1, 0.0, 0.5]);
    let var = b.f32s("var", &[4], &[1.0, 0.3, 2.0, 0.7]);
    let bn = b.node(
        "BatchNormalization",
        &[conv, gamma, beta, mean, var],
        vec![("epsilon", Attribute::Float(1e-3))],
    );
    let y = b.op("Relu", &[bn]);
    // A branch for every other activation FusedConv supports (distinct weights, or CSE would
    // merge the Convs first).
    let mut outs = vec![y];
    let lo = b.scalar("lo", -0.5);
    let hi = b.scalar("hi", 0.5);
    for (op, attrs, extra) in [
        ("Clip", vec![], vec![lo, hi]),
        ("LeakyRelu", vec![("alpha", Attribute::Float(0.1))], vec![]),
        ("Sigmoid", vec![], vec![]),
        ("Tanh", vec![], vec![]),
        ("HardSigmoid", vec![("alpha", Attribute::Float(0.3))], vec![]),
    ] {
        let w2 = conv_weight(&mut b, &format!("w_{op}"), 2 + outs.len(), 3);
        let c = b.op("Conv", &[x, w2]);
        let mut ins = vec![c];
        ins.extend(extra);
        outs.push(b.node(op, &ins, attrs));
    }
    let (m, feeds) = b.model(&outs, 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Extended);
    assert_eq!(ops, BTreeMap::from([("com.microsoft::FusedConv".to_string(), 6)]));
    assert_eq!(report.count("conv_bn_fusion"), 1);
    assert_eq!(report.count("conv_activation_fusion"), 6);
    // Basic leaves them alone.
    let (ops, _) = check(&m, &feeds, OptLevel::Basic);
    assert_eq!(ops.get("BatchNormalization"), Some(&1));
}

#[test]
fn matmul_add_becomes_gemm_in_2d_only() {
    let mut b = B::new();
    let a = b.input("a", &[3, 4]);
    let w = b.f32s("w", &[4, 5], &(0..20).map(|i| i as f32 / 10.0).collect::<Vec<_>>());
    let bias = b.f32s("bias", &[5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
    let mm = b.op("MatMul", &[a, w]);
    let y = b.op("Add", &[bias, mm]);
    let a3 = b.input("a3", &[2, 3, 4]);
    let mm3 = b.op("MatMul", &[a3, w]);
    let y3 = b.op("Add", &[mm3, bias]);
    let (m, feeds) = b.model(&[y, y3], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Extended);
    assert_eq!(ops.get("Gemm"), Some(&1));
    assert_eq!(ops.get("MatMul"), Some(&1));
    assert_eq!(report.count("matmul_add_fusion"), 1);
}

/// `x` normalized over the last axis the way exporters decompose LayerNorm.
fn decomposed_layer_norm(b: &mut B, x: ValueId, d: usize, pow: bool) -> ValueId {
    let axes = vec![("axes", ints(&[-1]))];
    let mu = b.node("ReduceMean", &[x], axes.clone());
    let diff = b.op("Sub", &[x, mu]);
    let sq = if pow {
        let two = b.scalar("two", 2.0);
        b.op("Pow", &[diff, two])
    } else {
        b.op("Mul", &[diff, diff])
    };
    let var = b.node("ReduceMean", &[sq], axes);
    let eps = b.scalar("eps", 1e-5);
    let ve = b.op("Add", &[var, eps]);
    let s = b.op("Sqrt", &[ve]);
    let n = b.op("Div", &[diff, s]);
    let gamma = b.f32s(
        "gamma",
        &[d],
        &(0..d).map(|i| 1.0 + i as f32 / 10.0).collect::<Vec<_>>(),
    );
    let beta = b.f32s("beta", &[d], &(0..d).map(|i| i as f32 / 20.0).collect::<Vec<_>>());
    let g = b.op("Mul", &[n, gamma]);
    b.op("Add", &[g, beta])
}

#[test]
fn layer_norm_subgraph_becomes_layer_normalization() {
    for pow in [true, false] {
        let mut b = B::new();
        let x = b.input("x", &[2, 3, 8]);
        let y = decomposed_layer_norm(&mut b, x, 8, pow);
        let (m, feeds) = b.model(&[y], 17);
        let (ops, report) = check(&m, &feeds, OptLevel::Extended);
        assert_eq!(
            ops,
            BTreeMap::from([("LayerNormalization".to_string(), 1)]),
            "pow={pow}"
        );
        assert_eq!(report.count("layer_norm_fusion"), 1);
    }
    // Under strict opsets an opset-12 model keeps the subgraph (LayerNormalization is opset 17).
    let mut b = B::new();
    let x = b.input("x", &[2, 8]);
    let y = decomposed_layer_norm(&mut b, x, 8, true);
    let (m, feeds) = b.model(&[y], 12);
    let mut o = opts(&m, OptLevel::Extended);
    o.strict_opsets = true;
    let (opt, _) = optimize_and_compare(&m, &feeds, &o, 1e-5);
    assert!(!op_counts(&opt.graph).contains_key("LayerNormalization"));
}

/// GELU in erf form; `order` picks where the 0.5 multiplies.
fn erf_gelu(b: &mut B, x: ValueId, order: usize) -> ValueId {
    let sqrt2 = b.scalar(&format!("sqrt2_{order}"), std::f32::consts::SQRT_2);
    let one = b.scalar(&format!("one_{order}"), 1.0);
    let half = b.scalar(&format!("half_{order}"), 0.5);
    let d = b.op("Div", &[x, sqrt2]);
    let e = b.op("Erf", &[d]);
    let a = b.op("Add", &[e, one]);
    match order {
        0 => {
            let m = b.op("Mul", &[x, a]);
            b.op("Mul", &[m, half])
        }
        1 => {
            let h = b.op("Mul", &[x, half]);
            b.op("Mul", &[h, a])
        }
        _ => {
            let h = b.op("Mul", &[a, half]);
            b.op("Mul", &[x, h])
        }
    }
}

fn tanh_gelu(b: &mut B, x: ValueId) -> ValueId {
    let three = b.scalar("three", 3.0);
    let k = b.scalar("k", 0.044715);
    let c = b.scalar("c", 0.797_884_6);
    let one = b.scalar("one_t", 1.0);
    let half = b.scalar("half_t", 0.5);
    let cube = b.op("Pow", &[x, three]);
    let kc = b.op("Mul", &[k, cube]);
    let inner = b.op("Add", &[x, kc]);
    let s = b.op("Mul", &[inner, c]);
    let t = b.op("Tanh", &[s]);
    let a = b.op("Add", &[t, one]);
    let h = b.op("Mul", &[half, x]);
    b.op("Mul", &[h, a])
}

#[test]
fn gelu_forms_fuse_to_standard_or_microsoft_gelu() {
    let mut b = B::new();
    let x = b.input("x", &[2, 16]);
    let mut outs: Vec<ValueId> = (0..3).map(|k| erf_gelu(&mut b, x, k)).collect();
    outs.push(tanh_gelu(&mut b, x));
    let (m, feeds) = b.model(&outs, 17);
    // In memory: Kiln's standard Gelu kernel whatever the opset.
    let (ops, report) = check(&m, &feeds, OptLevel::Extended);
    assert_eq!(ops, BTreeMap::from([("Gelu".to_string(), 4)]));
    assert_eq!(report.count("gelu_fusion"), 4);
    // Strict opsets (export) at opset 17: com.microsoft Gelu / FastGelu.
    let mut o = opts(&m, OptLevel::Extended);
    o.strict_opsets = true;
    let (opt, _) = optimize_and_compare(&m, &feeds, &o, 1e-5);
    assert_eq!(
        op_counts(&opt.graph),
        BTreeMap::from([
            ("com.microsoft::FastGelu".to_string(), 1),
            ("com.microsoft::Gelu".to_string(), 3)
        ])
    );
}

#[test]
fn bias_add_and_gelu_fuse_to_bias_gelu() {
    for opset in [17, 20] {
        let mut b = B::new();
        let x = b.input("x", &[2, 3, 8]);
        let bias = b.f32s("bias", &[8], &(0..8).map(|i| i as f32 / 4.0 - 1.0).collect::<Vec<_>>());
        let s = b.op("Add", &[x, bias]);
        let y = erf_gelu(&mut b, s, 0);
        let (m, feeds) = b.model(&[y], opset);
        let mut o = opts(&m, OptLevel::Extended);
        o.strict_opsets = true;
        let (opt, report) = optimize_and_compare(&m, &feeds, &o, 1e-5);
        assert_eq!(
            op_counts(&opt.graph),
            BTreeMap::from([("com.microsoft::BiasGelu".to_string(), 1)]),
            "opset {opset}"
        );
        assert_eq!(report.count("bias_gelu_fusion"), 1);
    }
}

#[test]
fn disabled_does_nothing_and_all_includes_extended() {
    let mut b = B::new();
    let x = b.input("x", &[1, 3, 8, 8]);
    let w = conv_weight(&mut b, "w", 2, 3);
    let c = b.op("Conv", &[x, w]);
    let i = b.op("Identity", &[c]);
    let y = b.op("Relu", &[i]);
    let (m, feeds) = b.model(&[y], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Disabled);
    assert_eq!(ops.len(), 3);
    assert_eq!(report.iterations, 0);
    let (ops, _) = check(&m, &feeds, OptLevel::All);
    assert_eq!(ops, BTreeMap::from([("com.microsoft::FusedConv".to_string(), 1)]));
    // The session reports what it did.
    let s = Session::builder().optimization(Level::All).build_from_model(m).unwrap();
    let r = s.optimization_report();
    assert_eq!((r.nodes_before, r.nodes_after), (3, 1));
}

#[test]
fn export_round_trips_through_the_importer() {
    let mut b = B::new();
    let x = b.input("x", &[1, 3, 8, 8]);
    let w = conv_weight(&mut b, "w", 2, 3);
    let c = b.op("Conv", &[x, w]);
    let y = b.op("Relu", &[c]);
    let (m, feeds) = b.model(&[y], 17);
    let mut opt = m.clone();
    kiln::optimize_model(&mut opt, Level::Extended).unwrap();
    let bytes = onnx::export_model_bytes(&opt).unwrap();
    let back = onnx::load_model_bytes(&bytes).unwrap();
    assert_eq!(back.opsets.get("com.microsoft"), Some(&1));
    assert_eq!(op_counts(&back.graph), op_counts(&opt.graph));
    assert_close(&run_as_is(m, &feeds), &run_as_is(back, &feeds), 1e-5);
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_npy(path: &std::path::Path) -> TensorData {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let vals: Vec<f32> = npy.into_vec().unwrap();
    TensorData::from_values("x", dims, &vals).unwrap()
}

/// The light models: import -> export -> import runs the same, and every level gives the same
/// outputs as the unoptimized model.
#[test]
fn light_models_round_trip_and_match_at_every_level() {
    for name in ["squeezenet", "resnet50"] {
        let path = root().join(format!("models/light/{name}.onnx"));
        let model = onnx::load_model(&path).unwrap();
        let x = read_npy(&root().join("models/light/input_1x3x224x224.npy"));
        let input = model.graph.value_name(model.graph.runtime_inputs()[0]).to_string();
        let feeds = vec![(input, x)];
        let want = run_as_is(model.clone(), &feeds);
        let back = onnx::load_model_bytes(&onnx::export_model_bytes(&model).unwrap()).unwrap();
        assert_close(&want, &run_as_is(back, &feeds), 0.0);
        for level in [Level::Basic, Level::Extended, Level::All] {
            let s = Session::builder()
                .optimization(level)
                .build_from_model(model.clone())
                .unwrap();
            assert_close(&want, &s.run(feeds.clone()).unwrap(), 1e-4);
            let r = s.optimization_report();
            assert!(r.nodes_after < r.nodes_before, "{name} {level:?}: {r}");
            if level >= Level::Extended {
                assert!(r.count("conv_activation_fusion") > 0, "{name}: {r}");
                if name == "resnet50" {
                    // 53 Conv+BN; 16 residual blocks end in Sum + Relu.
                    assert_eq!(r.count("conv_bn_fusion"), 53, "{r}");
                    assert_eq!(r.count("conv_add_activation_fusion"), 16, "{r}");
                }
            }
        }
    }
}

/// A sample of ONNX node tests (when the test data is present): export -> import runs the same
/// (identical outputs on the test's own inputs).
#[test]
fn node_tests_round_trip_through_export() {
    let Some(dir) = std::env::var_os("KILN_NODE_TESTS").map(std::path::PathBuf::from) else {
        eprintln!("KILN_NODE_TESTS not set: skipped");
        return;
    };
    let mut checked = 0;
    let names = [
        "test_conv_with_strides_padding",
        "test_if",
        "test_loop11",
        "test_scan9_sum",
        "test_layer_normalization_2d_axis0",
        "test_gemm_default_no_bias",
        "test_gelu_tanh_1",
        "test_reshape_reordered_all_dims",
        "test_cast_FLOAT_to_FLOAT16",
        "test_constant",
        "test_attention_4d",
        "test_range_float_type_positive_delta_expanded",
    ];
    for name in names {
        let case = dir.join(name);
        let Ok(model) = onnx::load_model(case.join("model.onnx")) else {
            continue;
        };
        let bytes = onnx::export_model_bytes(&model).unwrap_or_else(|e| panic!("{name}: export failed: {e}"));
        let back = onnx::load_model_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(op_counts(&back.graph), op_counts(&model.graph), "{name}");
        assert_eq!(back.graph.inputs.len(), model.graph.inputs.len(), "{name}");
        let inputs: Vec<String> = model
            .graph
            .runtime_inputs()
            .iter()
            .map(|v| model.graph.value_name(*v).to_string())
            .collect();
        let mut feeds = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let path = case.join(format!("test_data_set_0/input_{i}.pb"));
            match onnx::read_value_file(&path, "tensor").unwrap_or_else(|e| panic!("{name}: {e}")) {
                onnx::DataValue::Tensor(t) => feeds.push((input.clone(), t)),
                other => panic!("{name}: {other:?} is not a tensor"),
            }
        }
        let want = run_as_is(model, &feeds);
        let got = run_as_is(back, &feeds);
        assert_eq!(want, got, "{name}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} node tests found under {}", dir.display());
}

/// Real models (MiniLM, PP-OCR) from `KILN_MODELS` (models/fetch.sh): the fusions fire and outputs
/// still match. Without `KILN_MODELS` the test prints `SKIP` per model and passes; with
/// `KILN_MODELS_REQUIRED=1` (scripts/test.sh sets both) a missing model fails it.
#[test]
fn cached_real_models_fuse_and_match() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a [usize])], &'a [&'a str]);
    let cases: [Case; 3] = [
        (
            "paraphrase-MiniLM-L3-v2.onnx",
            &[("input_ids", &[2, 7]), ("attention_mask", &[2, 7])],
            &["gelu_fusion", "bias_gelu_fusion", "attention_fusion"],
        ),
        (
            "ch_PP-OCRv4_det_infer.onnx",
            &[("x", &[1, 3, 64, 64])],
            &["conv_bn_fusion", "conv_activation_fusion"],
        ),
        (
            "ch_PP-OCRv4_rec_infer.onnx",
            &[("x", &[1, 3, 48, 64])],
            &["layer_norm_fusion", "conv_bn_fusion"],
        ),
    ];
    for (file, inputs, rules) in cases {
        let path = match refs::model_file(file) {
            Ok(path) => path,
            Err(reason) => {
                refs::skip_missing(&format!("cached_real_models_fuse_and_match {file}"), &reason);
                continue;
            }
        };
        let model = onnx::load_model(&path).unwrap();
        let feeds: Vec<(String, TensorData)> = inputs
            .iter()
            .map(|(n, dims)| {
                let count: usize = dims.iter().product();
                let t = if n.contains("ids") || n.contains("mask") {
                    let v: Vec<i64> = (0..count)
                        .map(|i| if n.contains("mask") { 1 } else { (i * 7 % 90) as i64 + 1 })
                        .collect();
                    TensorData::from_values(*n, dims.to_vec(), &v)
                } else {
                    let v: Vec<f32> = (0..count).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
                    TensorData::from_values(*n, dims.to_vec(), &v)
                };
                (n.to_string(), t.unwrap())
            })
            .collect();
        let want = run_as_is(model.clone(), &feeds);
        let s = Session::builder()
            .optimization(Level::Extended)
            .build_from_model(model)
            .unwrap();
        let r = s.optimization_report();
        eprintln!("{file}: {r}");
        for rule in rules {
            assert!(r.count(rule) > 0, "{file}: {rule} did not fire: {r}");
        }
        assert_close(&want, &s.run(feeds).unwrap(), 1e-4);
    }
}

#[test]
fn scaled_dot_product_attention_becomes_one_node() {
    let (bsz, s, h, d) = (2, 5, 3, 4);
    for (with_mask, scale_op) in [(true, "Div"), (false, "Mul"), (true, "")] {
        let mut b = B::new();
        let q = b.input("q", &[bsz, s, h, d]);
        let k = b.input("k", &[bsz, s, h, d]);
        let v = b.input("v", &[bsz, s, h, d]);
        let qt = b.node("Transpose", &[q], vec![("perm", ints(&[0, 2, 1, 3]))]);
        let kt = b.node("Transpose", &[k], vec![("perm", ints(&[0, 2, 3, 1]))]);
        let vt = b.node("Transpose", &[v], vec![("perm", ints(&[0, 2, 1, 3]))]);
        let scores = b.op("MatMul", &[qt, kt]);
        let scaled = match scale_op {
            "Div" => {
                let c = b.scalar("c", (d as f32).sqrt());
                b.op("Div", &[scores, c])
            }
            "Mul" => {
                let c = b.scalar("c", 0.3);
                b.op("Mul", &[c, scores])
            }
            _ => scores,
        };
        let logits = if with_mask {
            let mask: Vec<f32> = (0..bsz * s).map(|i| if i % 5 == 4 { -10000.0 } else { 0.0 }).collect();
            let m = b.input_data(TensorData::from_values("mask", vec![bsz, 1, 1, s], &mask).unwrap());
            b.op("Add", &[scaled, m])
        } else {
            scaled
        };
        let p = b.node("Softmax", &[logits], vec![("axis", Attribute::Int(-1))]);
        let y = b.op("MatMul", &[p, vt]);
        let (m, feeds) = b.model(&[y], 17);
        let (ops, report) = check(&m, &feeds, OptLevel::Extended);
        assert_eq!(
            ops,
            BTreeMap::from([("Attention".to_string(), 1), ("Transpose".to_string(), 3)]),
            "mask={with_mask} scale={scale_op}"
        );
        assert_eq!(report.count("attention_fusion"), 1);
        // Export keeps opset 17: the standard Attention (opset 23) is not emitted then.
        let mut o = opts(&m, OptLevel::Extended);
        o.strict_opsets = true;
        let (opt, _) = optimize_and_compare(&m, &feeds, &o, 1e-5);
        assert!(!op_counts(&opt.graph).contains_key("Attention"));
    }
}

#[test]
fn conv_residual_add_and_activation_fuse_in_memory() {
    let mut b = B::new();
    let x = b.input("x", &[1, 2, 6, 6]);
    let w = conv_weight(&mut b, "w", 2, 2);
    let w2 = conv_weight(&mut b, "w2", 2, 2);
    let branch = b.node("Conv", &[x, w2], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let z = b.op("Relu", &[branch]);
    let conv = b.node("Conv", &[z, w], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let s = b.op("Sum", &[z, conv]);
    let y = b.op("Relu", &[s]);
    // A broadcast residual ([2, 1, 1]) takes the kernel's broadcasting path.
    let w3 = conv_weight(&mut b, "w3", 2, 2);
    let conv3 = b.op("Conv", &[x, w3]);
    let r = b.f32s("r", &[2, 1, 1], &[0.5, -0.25]);
    let s3 = b.op("Add", &[conv3, r]);
    let y3 = b.node("LeakyRelu", &[s3], vec![("alpha", Attribute::Float(0.2))]);
    let (m, feeds) = b.model(&[y, y3], 17);
    let (ops, report) = check(&m, &feeds, OptLevel::Extended);
    assert_eq!(
        ops,
        BTreeMap::from([("com.microsoft::FusedConv".to_string(), 3)]),
        "{report}"
    );
    assert_eq!(report.count("conv_add_activation_fusion"), 2);
    // Not under strict opsets: ONNX Runtime's Z must match the Conv output exactly.
    let mut o = opts(&m, OptLevel::Extended);
    o.strict_opsets = true;
    let (opt, _) = optimize_and_compare(&m, &feeds, &o, 1e-5);
    assert_eq!(op_counts(&opt.graph).get("com.microsoft::FusedConv"), Some(&1));
}

/// Every node test whose inputs are tensors: export -> import gives identical outputs (or the
/// same failure), with the optimizer off on both sides.
#[test]
fn all_node_tests_round_trip_through_export() {
    let Some(dir) = std::env::var_os("KILN_NODE_TESTS").map(std::path::PathBuf::from) else {
        eprintln!("KILN_NODE_TESTS not set: skipped");
        return;
    };
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    let (mut same, mut bad) = (0, Vec::new());
    for case in entries {
        let Ok(model) = onnx::load_model(case.join("model.onnx")) else {
            continue;
        };
        let name = case.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let back = match onnx::export_model_bytes(&model).and_then(|b| onnx::load_model_bytes(&b)) {
            Ok(m) => m,
            Err(e) => {
                bad.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut feeds = Vec::new();
        for (i, v) in model.graph.runtime_inputs().iter().enumerate() {
            let path = case.join(format!("test_data_set_0/input_{i}.pb"));
            if let Ok(onnx::DataValue::Tensor(t)) = onnx::read_value_file(&path, "tensor") {
                feeds.push((model.graph.value_name(*v).to_string(), t));
            }
        }
        let run = |m: Model| {
            Session::builder()
                .optimization(Level::Disabled)
                .build_from_model(m)
                .and_then(|s| s.run(feeds.clone()))
                .map_err(|e| e.to_string())
        };
        let (a, b) = (run(model), run(back));
        if a == b {
            same += 1;
        } else {
            bad.push(format!("{name}: {:?} vs {:?}", a.err(), b.err()));
        }
    }
    eprintln!("{same} node tests give the same result after export -> import");
    assert!(
        same > 1000 && bad.is_empty(),
        "{same} same; differ:\n{}",
        bad.join("\n")
    );
}

#[test]
fn scalar_elementwise_chains_become_one_node_with_identical_results() {
    let mut b = B::new();
    let x = b.input("x", &[2, 3, 5]);
    // PP-LCNetV3's tail: x * s + t, HardSwish written out, then * s2 + t2.
    let (s1, t1) = (b.scalar("s1", 1.3), b.f32s("t1", &[1], &[-0.2]));
    let a = b.op("Mul", &[s1, x]);
    let a = b.op("Add", &[a, t1]);
    let (three, zero, six) = (b.scalar("three", 3.0), b.scalar("zero", 0.0), b.scalar("six", 6.0));
    let h = b.op("Add", &[a, three]);
    let h = b.op("Clip", &[h, zero, six]);
    let h = b.op("Mul", &[a, h]);
    let h = b.op("Div", &[h, six]);
    let (s2, one) = (b.scalar("s2", 0.7), b.scalar("one", 1.0));
    let y = b.op("Mul", &[h, s2]);
    let y = b.op("Sub", &[one, y]);
    // A second chain whose first value is also read elsewhere: only the part after it fuses.
    let ten = b.scalar("ten", 10.0);
    let q = b.op("Sub", &[x, ten]);
    let q2 = b.op("Div", &[one, q]);
    let q3 = b.op("Mul", &[q2, s2]);
    let other = b.op("Relu", &[q]);
    let (m, feeds) = b.model(&[y, q3, other], 17);
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::All), 0.0);
    let ops = op_counts(&opt.graph);
    assert_eq!(report.count("elementwise_chain_fusion"), 2, "{report}");
    assert_eq!(ops.get("ai.kiln::ElementwiseChain"), Some(&2), "{ops:?}");
    assert_eq!(ops.get("Sub"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("Relu"), Some(&1), "{ops:?}");
    assert_eq!(ops.values().sum::<usize>(), 4, "{ops:?}");
    // Extended keeps the ops (the fused node is Kiln's own, never exported).
    let (ext, _) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::Extended), 0.0);
    assert!(!op_counts(&ext.graph).contains_key("ai.kiln::ElementwiseChain"));
}

#[test]
fn conv_then_chain_becomes_one_node_with_identical_results() {
    let mut b = B::new();
    let x = b.input("x", &[1, 3, 9, 7]);
    let w = conv_weight(&mut b, "w", 5, 3);
    let cb = b.f32s("cb", &[5], &[0.1, -0.2, 0.3, 0.0, 0.5]);
    let conv = b.node("Conv", &[x, w, cb], vec![("pads", ints(&[1, 1, 1, 1]))]);
    // Scale and bias, then HardSwish written out (the PP-LCNet tail).
    let (s, t) = (b.scalar("s", 1.3), b.scalar("t", -0.2));
    let a = b.op("Mul", &[conv, s]);
    let a = b.op("Add", &[a, t]);
    let (three, zero, six) = (b.scalar("three", 3.0), b.scalar("zero", 0.0), b.scalar("six", 6.0));
    let h = b.op("Add", &[a, three]);
    let h = b.op("Clip", &[h, zero, six]);
    let h = b.op("Mul", &[a, h]);
    let y = b.op("Div", &[h, six]);
    // A Conv whose output is also a graph output keeps its chain apart.
    let w2 = conv_weight(&mut b, "w2", 4, 3);
    let c2 = b.op("Conv", &[x, w2]);
    let y2 = b.op("Mul", &[c2, s]);
    let y2 = b.op("Add", &[y2, t]);
    let (m, feeds) = b.model(&[y, y2, c2], 17);
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::All), 0.0);
    let ops = op_counts(&opt.graph);
    assert_eq!(report.count("conv_chain_fusion"), 1, "{report}");
    assert_eq!(ops.get("ai.kiln::FusedConvChain"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::ElementwiseChain"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("Conv"), Some(&1), "{ops:?}");
    assert_eq!(ops.values().sum::<usize>(), 3, "{ops:?}");
}

#[test]
fn silu_and_hardswish_after_convs_fuse_with_identical_results() {
    let mut b = B::new();
    let x = b.input("x", &[1, 3, 9, 7]);
    // Conv -> SiLU written out (x * Sigmoid(x)), then Conv -> HardSwish, then a lone SiLU on a Relu.
    let w = conv_weight(&mut b, "w", 5, 3);
    let c1 = b.node("Conv", &[x, w], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let s1 = b.op("Sigmoid", &[c1]);
    let y1 = b.op("Mul", &[c1, s1]);
    let w2 = conv_weight(&mut b, "w2", 4, 5);
    let c2 = b.node("Conv", &[y1, w2], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let y2 = b.op("HardSwish", &[c2]);
    let r = b.op("Relu", &[y2]);
    let s3 = b.op("Sigmoid", &[r]);
    let y3 = b.op("Mul", &[s3, r]);
    let (m, feeds) = b.model(&[y3], 17);
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::All), 0.0);
    let ops = op_counts(&opt.graph);
    assert_eq!(report.count("elementwise_chain_fusion"), 3, "{report}");
    assert_eq!(report.count("conv_chain_fusion"), 2, "{report}");
    assert_eq!(ops.get("ai.kiln::FusedConvChain"), Some(&2), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::ElementwiseChain"), Some(&1), "{ops:?}");
    assert_eq!(ops.values().sum::<usize>(), 4, "{ops:?}");
}

#[test]
fn elementwise_chain_keeps_broadcast_rank() {
    // A rank-0 input plus a [1, 1] constant is [1, 1], fused or not.
    let mut b = B::new();
    let x = b.input_data(TensorData::from_values("x", vec![], &[2.5f32]).unwrap());
    let c = b.f32s("c", &[1, 1], &[4.0]);
    let y = b.op("Add", &[x, c]);
    let two = b.scalar("two", 2.0);
    let y = b.op("Mul", &[y, two]);
    let (m, feeds) = b.model(&[y], 17);
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::All), 0.0);
    assert_eq!(report.count("elementwise_chain_fusion"), 1, "{report}");
    let out = Session::builder()
        .optimization(Level::Disabled)
        .build_from_model(opt)
        .unwrap()
        .run(feeds)
        .unwrap();
    assert_eq!(out[0].dims, vec![1, 1]);
    assert_eq!(out[0].values::<f32>().unwrap(), vec![13.0]);
}

#[test]
fn matmul_bias_and_gelu_become_one_node_at_level_all() {
    let mut b = B::new();
    let (k, n) = (40, 37);
    let vals = |seed: usize, len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 113) as f32 / 113.0 - 0.5) * 0.3)
            .collect()
    };
    let x = b.input("x", &[2, 7, k]);
    let w1 = b.f32s("w1", &[k, n], &vals(1, k * n));
    let w2 = b.f32s("w2", &[k, n], &vals(2, k * n));
    let bias = b.f32s("bias", &[n], &vals(3, n));
    // Add with the bias first, then the bias + erf GELU that Extended turns into BiasGelu.
    let mm1 = b.op("MatMul", &[x, w1]);
    let y1 = b.op("Add", &[bias, mm1]);
    let mm2 = b.op("MatMul", &[x, w2]);
    let s = b.op("Add", &[mm2, bias]);
    let y2 = erf_gelu(&mut b, s, 0);
    // A [1, 1, N] bias on a 2-D product would raise its rank: left alone.
    let x2 = b.input("x2", &[5, k]);
    let bias3 = b.f32s("bias3", &[1, 1, n], &vals(4, n));
    let mm3 = b.op("MatMul", &[x2, w1]);
    let y3 = b.op("Add", &[mm3, bias3]);
    let (m, feeds) = b.model(&[y1, y2, y3], 17);
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::All), 1e-5);
    let ops = op_counts(&opt.graph);
    assert_eq!(report.count("matmul_bias_fusion"), 2, "{report}");
    assert_eq!(ops.get("ai.kiln::MatMulBias"), Some(&2), "{ops:?}");
    assert_eq!(ops.get("MatMul"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("Add"), Some(&1), "{ops:?}");
    let gelu = opt.graph.nodes.iter().filter(|nd| {
        nd.op_type == "MatMulBias"
            && matches!(nd.attributes.get("activation"), Some(Attribute::String(s)) if s.as_slice() == b"gelu_erf")
    });
    assert_eq!(gelu.count(), 1);
    // Extended keeps standard / com.microsoft ops only.
    let (ext, _) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::Extended), 1e-5);
    assert!(!op_counts(&ext.graph).contains_key("ai.kiln::MatMulBias"));
}

#[test]
fn an_overridable_matmul_weight_is_not_packed_as_a_constant() {
    // W is an initializer and a graph input (IR >= 4): a fed W must win over the packed default.
    let mut b = B::new();
    let x = b.input("x", &[4, 3]);
    let w = b.f32s("w", &[3, 2], &[1.0; 6]);
    b.g.inputs.push(w);
    let y = b.op("MatMul", &[x, w]);
    let (m, mut feeds) = b.model(&[y], 17);
    let fed = TensorData::from_values("w", vec![3, 2], &[2.0f32, 0.0, 0.0, 2.0, 1.0, 1.0]).unwrap();
    feeds.push(("w".to_string(), fed));
    let session = kiln::Session::builder()
        .optimization(kiln::Level::All)
        .build_from_model(m)
        .unwrap();
    let out = session.run(feeds.clone()).unwrap();
    let got: Vec<f32> = out[0].values().unwrap();
    let xv: Vec<f32> = feeds[0].1.values().unwrap();
    let wv = [2.0f32, 0.0, 0.0, 2.0, 1.0, 1.0];
    let mut want = Vec::new();
    for i in 0..4 {
        for j in 0..2 {
            want.push((0..3).map(|p| xv[i * 3 + p] * wv[p * 2 + j]).sum::<f32>());
        }
    }
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

#[test]
fn dynamic_quantized_matmul_tail_becomes_matmul_integer_to_float_bit_for_bit() {
    // What onnxruntime's quantize_dynamic writes: DynamicQuantizeLinear on the activation,
    // MatMulInteger with an 8-bit weight, Cast to float, Mul by a_scale * w_scale, Add of the bias.
    let (k, n) = (12, 20);
    let mut b = B::new();
    let x = b.input("x", &[2, 5, k]);
    let (xq, xs, xz) = (
        b.value("xq", None, None),
        b.value("xs", None, None),
        b.value("xz", None, None),
    );
    b.g.nodes.push(Node {
        name: "dq".into(),
        op_type: "DynamicQuantizeLinear".into(),
        domain: String::new(),
        inputs: vec![Some(x)],
        outputs: vec![Some(xq), Some(xs), Some(xz)],
        attributes: BTreeMap::new(),
        implicit_inputs: vec![],
    });
    let w_i8: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
    let w1 = b.init(TensorData::from_values("w1", vec![k, n], &w_i8).unwrap());
    let z1 = b.init(TensorData::from_values("z1", vec![], &[3i8]).unwrap());
    let s1: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
    let s1 = b.f32s("s1", &[n], &s1);
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 1.0).collect();
    let bias = b.f32s("bias", &[n], &bias);
    let mm1 = b.node_in("", "MatMulInteger", &[xq, w1, xz, z1], vec![]);
    let c1 = b.node("Cast", &[mm1], vec![("to", Attribute::Int(1))]);
    let sc1 = b.op("Mul", &[xs, s1]);
    let m1 = b.op("Mul", &[c1, sc1]);
    let y1 = b.op("Add", &[m1, bias]);
    // u8 weight, per-tensor scale, scale first in the Mul, no bias.
    let w_u8: Vec<u8> = (0..k * n).map(|i| (i * 29 % 256) as u8).collect();
    let w2 = b.init(TensorData::from_values("w2", vec![k, n], &w_u8).unwrap());
    let z2 = b.init(TensorData::from_values("z2", vec![], &[128u8]).unwrap());
    let s2 = b.scalar("s2", 0.02);
    let mm2 = b.node_in("", "MatMulInteger", &[xq, w2, xz, z2], vec![]);
    let c2 = b.node("Cast", &[mm2], vec![("to", Attribute::Int(1))]);
    let sc2 = b.op("Mul", &[s2, xs]);
    let y2 = b.op("Mul", &[sc2, c2]);
    let (m, feeds) = b.model(&[y1, y2], 17);
    // Tolerance 0: the fused kernel does the graph's Cast, Mul and Add in the same f32 order.
    let (opt, report) = optimize_and_compare(&m, &feeds, &opts(&m, OptLevel::Extended), 0.0);
    assert_eq!(report.count("matmul_integer_to_float_fusion"), 2, "{report}");
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("com.microsoft::MatMulIntegerToFloat"), Some(&2), "{ops:?}");
    for gone in ["MatMulInteger", "Cast", "Mul", "Add"] {
        assert!(!ops.contains_key(gone), "{gone} left: {ops:?}");
    }
}

/// A filter `[m, c, k, k]` with distinct values.
fn filter(b: &mut B, name: &str, m: usize, c: usize, k: usize) -> ValueId {
    let vals: Vec<f32> = (0..m * c * k * k)
        .map(|i| ((i * 7 + m * 3) % 17) as f32 / 17.0 - 0.45)
        .collect();
    b.f32s(name, &[m, c, k, k], &vals)
}

/// Channels-last regions (`nhwc_layout`, CPU f32 sessions at Level All): a network of dense, strided,
/// pointwise and depthwise convs with residuals, squeeze-excite, pools, Concat and Split computes what
/// the NCHW graph computes, with transposes only where values enter or leave the region.
/// Channels-last dense convs with 32 or more output channels run the direct kernel (windows read in
/// place from the zero-padded input): strides, dilations, asymmetric pads, 1x1 with a stride, 5x5,
/// channel counts that leave short column tiles, a residual Add with Relu, and a batch of two.
#[test]
fn nhwc_direct_convs_compute_what_nchw_computes() {
    // Filters scaled by 1/sqrt(fan-in), so eight convs in a row keep values near 1 (the comparison
    // measures the kernels, not the cancellation in a product of large sums).
    let unit_filter = |b: &mut B, name: &str, m: usize, c: usize, k: usize| {
        let s = 1.0 / ((c * k * k) as f32).sqrt();
        let vals: Vec<f32> = (0..m * c * k * k)
            .map(|i| (((i * 7 + m * 3) % 17) as f32 / 17.0 - 0.45) * s)
            .collect();
        b.f32s(name, &[m, c, k, k], &vals)
    };
    let mut b = B::new();
    let x = b.input("x", &[2, 8, 19, 23]);
    let w1 = unit_filter(&mut b, "w1", 32, 8, 3);
    let b1 = b.f32s("b1", &[32], &(0..32).map(|i| i as f32 / 40.0 - 0.4).collect::<Vec<_>>());
    let c1 = b.node(
        "Conv",
        &[x, w1, b1],
        vec![("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
    );
    let c1 = b.op("Relu", &[c1]);
    let w2 = unit_filter(&mut b, "w2", 64, 32, 3);
    let c2 = b.node(
        "Conv",
        &[c1, w2],
        vec![("pads", ints(&[0, 2, 1, 1])), ("dilations", ints(&[2, 1]))],
    );
    let w3 = unit_filter(&mut b, "w3", 32, 64, 1);
    let c3 = b.node("Conv", &[c2, w3], vec![("strides", ints(&[2, 1]))]);
    let w4 = unit_filter(&mut b, "w4", 160, 32, 5);
    let c4 = b.node("Conv", &[c3, w4], vec![("pads", ints(&[2, 2, 2, 2]))]);
    let w5 = unit_filter(&mut b, "w5", 96, 160, 1);
    let c5 = b.op("Conv", &[c4, w5]);
    let w6 = unit_filter(&mut b, "w6", 96, 96, 3);
    let c6 = b.node("Conv", &[c5, w6], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let r = b.op("Add", &[c6, c5]);
    let r = b.op("Relu", &[r]);
    // Enough convs for the region to pay for its two boundary transposes.
    let w7 = unit_filter(&mut b, "w7", 32, 96, 1);
    let c7 = b.op("Conv", &[r, w7]);
    let w8 = unit_filter(&mut b, "w8", 64, 32, 3);
    let c8 = b.node("Conv", &[c7, w8], vec![("strides", ints(&[2, 2]))]);
    let (model, feeds) = b.model(&[c8], 18);
    let mut o = opts(&model, OptLevel::All);
    o.nhwc_convs = true;
    let (opt, _) = optimize_and_compare(&model, &feeds, &o, 1e-4);
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("ai.kiln::ConvNhwc"), Some(&8), "{ops:?}");
}

/// Each connected region is kept or left NCHW on its own: a backbone of eight convs between two
/// boundary transposes goes channels-last although the conv after an op no region takes (a
/// Transpose of the spatial axes) stands alone and stays NCHW.
#[test]
fn nhwc_regions_are_decided_one_by_one() {
    let mut b = B::new();
    let x = b.input("x", &[1, 8, 10, 12]);
    let mut y = x;
    for i in 0..8 {
        let w = filter(&mut b, &format!("w{i}"), 8, 8, 1);
        let c = b.op("Conv", &[y, w]);
        y = b.op("Relu", &[c]);
    }
    let t = b.node("Transpose", &[y], vec![("perm", ints(&[0, 1, 3, 2]))]);
    let w = filter(&mut b, "w_head", 4, 8, 3);
    let head = b.op("Conv", &[t, w]);
    let (model, feeds) = b.model(&[head], 13);
    let mut o = opts(&model, OptLevel::All);
    o.nhwc_convs = true;
    let (opt, _) = optimize_and_compare(&model, &feeds, &o, 1e-5);
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("ai.kiln::ConvNhwc"), Some(&8), "{ops:?}");
    assert_eq!(ops.get("Conv"), Some(&1), "{ops:?}");
}

/// Quantized convs in a channels-last region (`QLinearConvNhwc`, with the per-tensor
/// Quantize/DequantizeLinear and the float ops between them) give exactly the codes and floats of
/// the NCHW graph: dense 3x3 with a stride, pointwise (read in place), depthwise, 5x5 with a
/// dilation and asymmetric pads, depthwise over 4 channels, u8 and i8 filters and activations,
/// per-channel filter scales and zero points, biases, a residual Add + Relu, a batch of two. A grouped conv that is not depthwise
/// stays NCHW between transposes; a conv whose output scale is zero takes the reference path
/// (its saturated codes must match too).
#[test]
fn nhwc_quantized_convs_compute_what_nchw_computes() {
    let mut b = B::new();
    let x = b.input("x", &[2, 8, 13, 11]);
    let mut n = 0;
    let mut scalar = |b: &mut B, v: f32| {
        n += 1;
        b.scalar(&format!("s{n}"), v)
    };
    let u8z = |b: &mut B, name: &str, v: u8| b.init(TensorData::from_values(name, vec![], &[v]).unwrap());
    let i8z = |b: &mut B, name: &str, v: i8| b.init(TensorData::from_values(name, vec![], &[v]).unwrap());
    let bias = |b: &mut B, name: &str, m: usize| {
        let v: Vec<i32> = (0..m as i32).map(|i| (i * 37) % 200 - 100).collect();
        b.init(TensorData::from_values(name, vec![m], &v).unwrap())
    };
    // i8 filter [m, cg, k, k] with one scale and zero point per output channel.
    let i8_filter = |b: &mut B, name: &str, m: usize, cg: usize, k: usize| {
        let v: Vec<i8> = (0..m * cg * k * k).map(|i| ((i * 29 + m) % 61) as i8 - 30).collect();
        let w = b.init(TensorData::from_values(name, vec![m, cg, k, k], &v).unwrap());
        let scales: Vec<f32> = (0..m).map(|i| 0.004 + i as f32 * 0.0003).collect();
        let ws = b.f32s(&format!("{name}_s"), &[m], &scales);
        let zps: Vec<i8> = (0..m).map(|i| (i % 5) as i8 - 2).collect();
        let wz = b.init(TensorData::from_values(format!("{name}_z"), vec![m], &zps).unwrap());
        (w, ws, wz)
    };
    let xs = scalar(&mut b, 0.02);
    let xz = u8z(&mut b, "xz", 128);
    let q = b.op("QuantizeLinear", &[x, xs, xz]);
    // 3x3, stride 2, pads 1: 8 -> 32 channels, u8 output.
    let (w1, w1s, w1z) = i8_filter(&mut b, "w1", 32, 8, 3);
    let (y1s, y1z, b1) = (scalar(&mut b, 0.05), u8z(&mut b, "y1z", 20), bias(&mut b, "b1", 32));
    let c1 = b.node(
        "QLinearConv",
        &[q, xs, xz, w1, w1s, w1z, y1s, y1z, b1],
        vec![("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
    );
    // Depthwise 3x3 (u8 filter, one zero point), no bias.
    let wd: Vec<u8> = (0..32 * 9).map(|i| ((i * 13) % 251) as u8).collect();
    let wd = b.init(TensorData::from_values("wd", vec![32, 1, 3, 3], &wd).unwrap());
    let (wds, wdz) = (scalar(&mut b, 0.003), u8z(&mut b, "wdz", 120));
    let (y2s, y2z) = (scalar(&mut b, 0.04), u8z(&mut b, "y2z", 100));
    let c2 = b.node(
        "QLinearConv",
        &[c1, y1s, y1z, wd, wds, wdz, y2s, y2z],
        vec![("pads", ints(&[1, 1, 1, 1])), ("group", Attribute::Int(32))],
    );
    // Pointwise 32 -> 48 (the input read as the GEMM's rows), then back to floats.
    let (w3, w3s, w3z) = i8_filter(&mut b, "w3", 48, 32, 1);
    let (y3s, y3z, b3) = (scalar(&mut b, 0.05), u8z(&mut b, "y3z", 128), bias(&mut b, "b3", 48));
    let c3 = b.node_in("", "QLinearConv", &[c2, y2s, y2z, w3, w3s, w3z, y3s, y3z, b3], vec![]);
    // A depthwise conv over 4 channels (too few for the channels-last sums: NCHW planes inside).
    let (wa, was, waz) = i8_filter(&mut b, "wa", 4, 48, 1);
    let (yas, yaz) = (scalar(&mut b, 0.05), u8z(&mut b, "yaz", 128));
    let ca = b.node_in("", "QLinearConv", &[c3, y3s, y3z, wa, was, waz, yas, yaz], vec![]);
    let (wb, wbs, wbz) = i8_filter(&mut b, "wb", 4, 1, 3);
    let (ybs, ybz) = (scalar(&mut b, 0.02), u8z(&mut b, "ybz", 128));
    let cb = b.node(
        "QLinearConv",
        &[ca, yas, yaz, wb, wbs, wbz, ybs, ybz],
        vec![("pads", ints(&[1, 1, 1, 1])), ("group", Attribute::Int(4))],
    );
    let (wc, wcs, wcz) = i8_filter(&mut b, "wc", 48, 4, 1);
    let (ycs, ycz) = (scalar(&mut b, 0.02), u8z(&mut b, "ycz", 128));
    let cc = b.node_in("", "QLinearConv", &[cb, ybs, ybz, wc, wcs, wcz, ycs, ycz], vec![]);
    let d3 = b.op("DequantizeLinear", &[cc, ycs, ycz]);
    // A residual branch: pointwise 32 -> 48 from the first conv.
    let (w4, w4s, w4z) = i8_filter(&mut b, "w4", 48, 32, 1);
    let (y4s, y4z) = (scalar(&mut b, 0.06), u8z(&mut b, "y4z", 128));
    let c4 = b.node_in("", "QLinearConv", &[c1, y1s, y1z, w4, w4s, w4z, y4s, y4z], vec![]);
    let d4 = b.op("DequantizeLinear", &[c4, y4s, y4z]);
    let r = b.op("Add", &[d3, d4]);
    let r = b.op("Relu", &[r]);
    // i8 activations: 5x5, dilation (2, 1), asymmetric pads.
    let (rs, rz) = (scalar(&mut b, 0.03), i8z(&mut b, "rz", -3));
    let rq = b.op("QuantizeLinear", &[r, rs, rz]);
    let (w5, w5s, w5z) = i8_filter(&mut b, "w5", 16, 48, 5);
    let (y5s, y5z, b5) = (scalar(&mut b, 0.08), i8z(&mut b, "y5z", 5), bias(&mut b, "b5", 16));
    let c5 = b.node(
        "QLinearConv",
        &[rq, rs, rz, w5, w5s, w5z, y5s, y5z, b5],
        vec![("pads", ints(&[4, 2, 3, 1])), ("dilations", ints(&[2, 1]))],
    );
    // Enough convs for the region to pay for its three boundary transposes.
    let (mut c5, mut ys, mut yz) = (c5, y5s, y5z);
    for i in 0..6 {
        let (w, ws, wz) = i8_filter(&mut b, &format!("wl{i}"), 16, 16, 1);
        let (s, z) = (scalar(&mut b, 0.07), i8z(&mut b, &format!("yl{i}z"), i as i8));
        c5 = b.node_in("", "QLinearConv", &[c5, ys, yz, w, ws, wz, s, z], vec![]);
        (ys, yz) = (s, z);
    }
    let (y5s, y5z) = (ys, yz);
    // Grouped (4 groups of 4 channels): not depthwise, so outside the region.
    let (w6, w6s, w6z) = i8_filter(&mut b, "w6", 8, 4, 3);
    let (y6s, y6z) = (scalar(&mut b, 0.05), i8z(&mut b, "y6z", 0));
    let c6 = b.node(
        "QLinearConv",
        &[c5, y5s, y5z, w6, w6s, w6z, y6s, y6z],
        vec![("pads", ints(&[1, 1, 1, 1])), ("group", Attribute::Int(4))],
    );
    let out6 = b.op("DequantizeLinear", &[c6, y6s, y6z]);
    // A zero output scale: the reference path's saturated codes.
    let (w7, w7s, w7z) = i8_filter(&mut b, "w7", 8, 48, 1);
    let (y7s, y7z) = (scalar(&mut b, 0.0), u8z(&mut b, "y7z", 9));
    let c7 = b.node_in("", "QLinearConv", &[c3, y3s, y3z, w7, w7s, w7z, y7s, y7z], vec![]);
    let (model, feeds) = b.model(&[c5, out6, c7], 13);
    let mut o = opts(&model, OptLevel::All);
    o.nhwc_qconvs = true;
    let (opt, _) = optimize_and_compare(&model, &feeds, &o, 0.0);
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("ai.kiln::QLinearConvNhwc"), Some(&15), "{ops:?}");
    assert_eq!(ops.get("QLinearConv"), Some(&1), "{ops:?}");
}

/// ONNX Runtime's QOperator ops join channels-last regions with the quantized convs and give the
/// NCHW graph's codes exactly: a u8 MaxPool, QLinearSigmoid and QLinearMul (SiLU), a squeeze-excite
/// block (QLinearGlobalAveragePool, two 1x1 convs, a broadcast QLinearMul) and a residual QLinearAdd.
#[test]
fn nhwc_qoperator_ops_compute_what_nchw_computes() {
    const MS: &str = "com.microsoft";
    let mut b = B::new();
    // The second image brighter than the first, so the squeeze-excite scales differ per image.
    let per_image = 3 * 17 * 15;
    let vals: Vec<f32> = (0..2 * per_image)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 9.0 + (i / per_image) as f32 * 1.2)
        .collect();
    let x = b.input_data(TensorData::from_values("x", vec![2, 3, 17, 15], &vals).unwrap());
    let mut n = 0;
    let mut param = |b: &mut B, s: f32, z: u8| {
        n += 1;
        let sv = b.scalar(&format!("s{n}"), s);
        let zv = b.init(TensorData::from_values(format!("z{n}"), vec![], &[z]).unwrap());
        (sv, zv)
    };
    let filter = |b: &mut B, name: &str, m: usize, c: usize, k: usize| {
        let v: Vec<i8> = (0..m * c * k * k).map(|i| ((i * 29 + m) % 61) as i8 - 30).collect();
        let w = b.init(TensorData::from_values(name, vec![m, c, k, k], &v).unwrap());
        let ws = b.f32s(
            &format!("{name}_s"),
            &[m],
            &(0..m).map(|i| 0.004 + i as f32 * 0.0002).collect::<Vec<_>>(),
        );
        let wz = b.init(TensorData::from_values(format!("{name}_z"), vec![], &[0i8]).unwrap());
        (w, ws, wz)
    };
    let conv = |b: &mut B,
                x: ValueId,
                xp: (ValueId, ValueId),
                w: (ValueId, ValueId, ValueId),
                yp: (ValueId, ValueId),
                attrs| { b.node("QLinearConv", &[x, xp.0, xp.1, w.0, w.1, w.2, yp.0, yp.1], attrs) };
    let xp = param(&mut b, 0.02, 128);
    let q = b.op("QuantizeLinear", &[x, xp.0, xp.1]);
    let (w1, p1) = (filter(&mut b, "w1", 16, 3, 3), param(&mut b, 0.05, 10));
    let c1 = conv(
        &mut b,
        q,
        xp,
        w1,
        p1,
        vec![("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
    );
    let m = b.node(
        "MaxPool",
        &[c1],
        vec![("kernel_shape", ints(&[3, 3])), ("pads", ints(&[1, 1, 1, 1]))],
    );
    let (w2, p2) = (filter(&mut b, "w2", 24, 16, 1), param(&mut b, 0.06, 128));
    let c2 = conv(&mut b, m, p1, w2, p2, vec![]);
    // SiLU: c2 * sigmoid(c2).
    let ps = param(&mut b, 1.0 / 255.0, 0);
    let sg = b.node_in(MS, "QLinearSigmoid", &[c2, p2.0, p2.1, ps.0, ps.1], vec![]);
    let pm = param(&mut b, 0.03, 100);
    let silu = b.node_in(MS, "QLinearMul", &[c2, p2.0, p2.1, sg, ps.0, ps.1, pm.0, pm.1], vec![]);
    // Squeeze-excite.
    let pg = param(&mut b, 0.03, 100);
    let gap = b.node_in(MS, "QLinearGlobalAveragePool", &[silu, pm.0, pm.1, pg.0, pg.1], vec![]);
    // Positive filters, so the excitation follows each image's mean.
    let positive = |b: &mut B, name: &str, m: usize, c: usize, scale: f32| {
        let v: Vec<i8> = (0..m * c).map(|i| (i % 7) as i8 + 1).collect();
        let w = b.init(TensorData::from_values(name, vec![m, c, 1, 1], &v).unwrap());
        let ws = b.f32s(&format!("{name}_s"), &[m], &vec![scale; m]);
        let wz = b.init(TensorData::from_values(format!("{name}_z"), vec![], &[0i8]).unwrap());
        (w, ws, wz)
    };
    let (w3, p3) = (positive(&mut b, "w3", 8, 24, 0.2), param(&mut b, 0.05, 128));
    let s1 = conv(&mut b, gap, pg, w3, p3, vec![]);
    let (w4, p4) = (positive(&mut b, "w4", 24, 8, 0.05), param(&mut b, 0.05, 128));
    let s2 = conv(&mut b, s1, p3, w4, p4, vec![]);
    let pe = param(&mut b, 1.0 / 255.0, 0);
    let se = b.node_in(MS, "QLinearSigmoid", &[s2, p4.0, p4.1, pe.0, pe.1], vec![]);
    let px = param(&mut b, 0.03, 110);
    let scaled = b.node_in(
        MS,
        "QLinearMul",
        &[silu, pm.0, pm.1, se, pe.0, pe.1, px.0, px.1],
        vec![],
    );
    // Enough convs for the region, then a residual add.
    let (mut y, mut yp) = (scaled, px);
    for i in 0..8 {
        let (w, p) = (
            filter(&mut b, &format!("wl{i}"), 24, 24, 1),
            param(&mut b, 0.05, 120 + i as u8),
        );
        y = conv(&mut b, y, yp, w, p, vec![]);
        yp = p;
    }
    let pa = param(&mut b, 0.07, 125);
    let sum = b.node_in(MS, "QLinearAdd", &[y, yp.0, yp.1, c2, p2.0, p2.1, pa.0, pa.1], vec![]);
    let pf = param(&mut b, 0.03, 128);
    let head = b.node_in(MS, "QLinearGlobalAveragePool", &[sum, pa.0, pa.1, pf.0, pf.1], vec![]);
    let (mut model, feeds) = b.model(&[head, scaled], 13);
    model.opsets.insert(MS.into(), 1);
    let mut o = opts(&model, OptLevel::All);
    o.nhwc_qconvs = true;
    let (opt, _) = optimize_and_compare(&model, &feeds, &o, 0.0);
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("ai.kiln::QLinearConvNhwc"), Some(&12), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::MaxPoolNhwc"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("Transpose"), Some(&3), "{ops:?}");
}

#[test]
fn nhwc_regions_compute_what_nchw_computes() {
    let mut b = B::new();
    let x = b.input("x", &[2, 3, 37, 30]);
    let w0 = filter(&mut b, "w0", 16, 3, 3);
    let b0 = b.f32s("b0", &[16], &(0..16).map(|i| i as f32 / 20.0 - 0.3).collect::<Vec<_>>());
    let c0 = b.node(
        "Conv",
        &[x, w0, b0],
        vec![("pads", ints(&[1, 1, 1, 1])), ("strides", ints(&[2, 2]))],
    );
    let lo = b.scalar("lo", 0.0);
    let hi = b.scalar("hi", 6.0);
    let a0 = b.op("Clip", &[c0, lo, hi]);
    // Depthwise 3x3 + Relu, then a pointwise projection added to the block's input.
    let wd = filter(&mut b, "wd", 16, 1, 3);
    let d = b.node(
        "Conv",
        &[a0, wd],
        vec![("pads", ints(&[1, 1, 1, 1])), ("group", Attribute::Int(16))],
    );
    let d = b.op("Relu", &[d]);
    let wp = filter(&mut b, "wp", 16, 16, 1);
    let p = b.op("Conv", &[d, wp]);
    let r = b.op("Add", &[p, a0]);
    // Squeeze-excite: GlobalAveragePool -> 1x1 -> Relu -> 1x1 -> HardSigmoid -> Mul.
    let s = b.op("GlobalAveragePool", &[r]);
    let ws1 = filter(&mut b, "ws1", 4, 16, 1);
    let s = b.op("Conv", &[s, ws1]);
    let s = b.op("Relu", &[s]);
    let ws2 = filter(&mut b, "ws2", 16, 4, 1);
    let s = b.op("Conv", &[s, ws2]);
    let s = b.op("HardSigmoid", &[s]);
    let e = b.op("Mul", &[r, s]);
    // A per-channel constant ([C, 1, 1]) and a 5x5 dense conv with a dilation.
    let scale = b.f32s(
        "scale",
        &[16, 1, 1],
        &(0..16).map(|i| 1.0 + i as f32 / 10.0).collect::<Vec<_>>(),
    );
    let e = b.op("Mul", &[e, scale]);
    let w5 = filter(&mut b, "w5", 8, 16, 5);
    let c5 = b.node(
        "Conv",
        &[e, w5],
        vec![("pads", ints(&[4, 3, 4, 2])), ("dilations", ints(&[2, 1]))],
    );
    // Enough convs for the region to pay for its six boundary transposes.
    let mut c5 = c5;
    for i in 0..18 {
        let wi = filter(&mut b, &format!("wl{i}"), 8, 8, 1);
        let ci = b.op("Conv", &[c5, wi]);
        c5 = b.op("Relu", &[ci]);
    }
    // 64 output channels take the `[pixels, K] x [K, M]` GEMM (the others, fewer or not a multiple of
    // 32, the `[M, K] x [K, pixels]` one); the 3x3 back to 8 channels goes through im2col.
    let w64 = filter(&mut b, "w64", 64, 8, 1);
    let c64 = b.op("Conv", &[c5, w64]);
    let wb = filter(&mut b, "wb", 8, 64, 3);
    let c5 = b.node("Conv", &[c64, wb], vec![("pads", ints(&[1, 1, 1, 1]))]);
    let m = b.node(
        "MaxPool",
        &[e],
        vec![
            ("kernel_shape", ints(&[3, 3])),
            ("strides", ints(&[2, 2])),
            ("pads", ints(&[1, 1, 1, 1])),
        ],
    );
    let m = b.op("Sigmoid", &[m]);
    let up = b.node(
        "MaxPool",
        &[c5],
        vec![
            ("kernel_shape", ints(&[3, 3])),
            ("strides", ints(&[2, 2])),
            ("pads", ints(&[1, 1, 1, 1])),
        ],
    );
    let cat = b.node("Concat", &[m, up], vec![("axis", Attribute::Int(1))]);
    let split = b.node(
        "Split",
        &[cat],
        vec![("axis", Attribute::Int(-3)), ("num_outputs", Attribute::Int(2))],
    );
    let split2 = b.value("split_second", None, None);
    b.g.nodes.last_mut().unwrap().outputs.push(Some(split2));
    let avg = b.node(
        "AveragePool",
        &[split],
        vec![
            ("kernel_shape", ints(&[3, 2])),
            ("strides", ints(&[2, 2])),
            ("pads", ints(&[1, 0, 1, 1])),
            ("ceil_mode", Attribute::Int(1)),
            ("count_include_pad", Attribute::Int(1)),
        ],
    );
    let g = b.op("GlobalAveragePool", &[avg]);
    let flat = b.op("Flatten", &[g]);
    // Nearest upsampling by per-axis scales, then a conv.
    let roi = b.f32s("roi", &[0], &[]);
    let sc = b.f32s("sc", &[4], &[1.0, 1.0, 2.0, 1.5]);
    let rz = b.node(
        "Resize",
        &[r, roi, sc],
        vec![("mode", Attribute::String(b"nearest".to_vec()))],
    );
    let wr = filter(&mut b, "wr", 4, 16, 3);
    let cr = b.op("Conv", &[rz, wr]);
    let gr = b.op("GlobalAveragePool", &[cr]);
    // `d` is also a graph output (transposed back under its own name).
    let (model, feeds) = b.model(&[flat, d, cat, split2, gr], 18);
    let mut o = opts(&model, OptLevel::All);
    o.nhwc_convs = true;
    let (opt, report) = optimize_and_compare(&model, &feeds, &o, 1e-4);
    let ops = op_counts(&opt.graph);
    assert_eq!(ops.get("ai.kiln::ConvNhwc"), Some(&27), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::MaxPoolNhwc"), Some(&2), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::AveragePoolNhwc"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("ai.kiln::GlobalAveragePoolNhwc"), Some(&3), "{ops:?}");
    // In: x. Out: the Flatten's input and the graph outputs `d`, `cat`, `split_second`, `gr`.
    assert_eq!(ops.get("Transpose"), Some(&6), "{ops:?}");
    assert!(report.count("nhwc_layout") > 30, "{report}");
    // Off by default, and a graph with one conv stays NCHW.
    let (opt, _) = optimize_and_compare(&model, &feeds, &opts(&model, OptLevel::All), 1e-4);
    assert_eq!(op_counts(&opt.graph).get("ai.kiln::ConvNhwc"), None);
    let mut one = B::new();
    let x = one.input("x", &[1, 3, 8, 8]);
    let w = filter(&mut one, "w", 4, 3, 3);
    let y = one.op("Conv", &[x, w]);
    let (model, feeds) = one.model(&[y], 18);
    let (opt, _) = optimize_and_compare(&model, &feeds, &o, 1e-4);
    assert_eq!(op_counts(&opt.graph).get("ai.kiln::ConvNhwc"), None);
}

//! Weight-only int8 (`Precision::Int8WeightOnly`).
//!
//! Small graphs: the int8 session's output is checked against a product computed here in f64 from
//! the weights quantized by the rule itself (`scale = max|w| / 127` per output channel,
//! `q = round(w / scale)`), so the kernel is checked exactly (to f32 rounding) and the plan is
//! checked to run the int8 kernel rather than an f32 MatMul.
//!
//! Real models (`KILN_MODELS`, see `real_models.rs`): int8 outputs against onnxruntime's fp32
//! references. Tolerance: cosine similarity >= 0.99 over each output and
//! `max |int8 - fp32| <= 0.1 * max |fp32|`. Per-channel int8 rounding puts each weight within
//! `scale / 2 = max|w| / 254` of its value (at most 0.4% of the channel's largest weight), so each
//! MatMul's relative error is of that order; through a few layers that stays well under 1% of the
//! output's energy (cosine >= 0.99) while single elements may move by a few percent of the
//! output's range.

mod common;

use std::path::PathBuf;

use kiln::internals::graph::{Attribute, DType, Graph, Model, Node, Shape, ValueId, ValueInfo, ValueKind};
use kiln::{Precision, RunOptions, Session, TensorData};

use common::refs::cases;

fn value(g: &mut Graph, name: &str, dims: &[usize]) -> ValueId {
    g.add_value(ValueInfo {
        name: name.into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::F32),
        shape: Some(Shape::from_known(dims)),
    })
}

fn data(name: &str, dims: &[usize], seed: usize) -> TensorData {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i + seed) * 7919 % 263) as f32 - 131.0) / 97.0)
        .collect();
    TensorData::from_values(name, dims.to_vec(), &v).unwrap()
}

fn node(g: &mut Graph, op: &str, inputs: &[ValueId], out: ValueId, attrs: Vec<(&str, Attribute)>) {
    g.nodes.push(Node {
        name: format!("{op}_{}", g.nodes.len()),
        op_type: op.into(),
        domain: String::new(),
        inputs: inputs.iter().map(|v| Some(*v)).collect(),
        outputs: vec![Some(out)],
        attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        implicit_inputs: Vec::new(),
    });
}

fn model(g: Graph) -> Model {
    Model {
        ir_version: 8,
        opsets: [(String::new(), 17)].into_iter().collect(),
        graph: g,
        ..Default::default()
    }
}

/// `w` (`[rows, cols]`) dequantized after per-channel int8 quantization along `axis`.
fn int8_reference(w: &TensorData, axis: usize) -> Vec<f64> {
    let v = w.values::<f32>().unwrap();
    let cols = w.dims[1];
    let ch = |i: usize| if axis == 1 { i % cols } else { i / cols };
    let mut max = vec![0f32; w.dims[axis]];
    for (i, x) in v.iter().enumerate() {
        max[ch(i)] = max[ch(i)].max(x.abs());
    }
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            let s = max[ch(i)] / 127.0;
            (x / s).round() as f64 * s as f64
        })
        .collect()
}

/// Row-major `a [rows, k] @ w [k, n]` in f64.
fn matmul_ref(a: &[f32], w: &[f64], rows: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * n];
    for r in 0..rows {
        for j in 0..n {
            y[r * n + j] = (0..k).map(|kk| a[r * k + kk] as f64 * w[kk * n + j]).sum();
        }
    }
    y
}

fn transpose(w: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Runs `m` in int8 with profiling; returns the outputs and the op types that ran.
fn run_int8(m: Model, feeds: Vec<(String, TensorData)>) -> (Vec<TensorData>, Vec<String>) {
    let s = Session::builder()
        .precision(Precision::Int8WeightOnly)
        .run_options(RunOptions {
            profile: true,
            ..Default::default()
        })
        .build_from_model(m)
        .unwrap();
    let (out, stats) = s.run_with_stats(feeds).unwrap();
    (out, stats.op_times.iter().map(|t| t.op.clone()).collect())
}

fn assert_close(got: &TensorData, want: &[f64]) {
    let g = got.values::<f32>().unwrap();
    assert_eq!(g.len(), want.len());
    for (i, (&g, &w)) in g.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0),
            "element {i}: {g} vs {w}"
        );
    }
}

#[test]
fn matmul_with_3d_activation_runs_in_int8() {
    let (k, n) = (96, 80);
    let mut g = Graph::default();
    let a = value(&mut g, "a", &[2, 3, k]);
    let w = value(&mut g, "w", &[k, n]);
    let y = value(&mut g, "y", &[2, 3, n]);
    let wt = data("w", &[k, n], 1);
    let wq = int8_reference(&wt, 1);
    g.initializers.insert(w, wt);
    node(&mut g, "MatMul", &[a, w], y, vec![]);
    g.inputs.push(a);
    g.outputs.push(y);
    let x = data("a", &[2, 3, k], 5);
    let (out, ops) = run_int8(model(g), vec![("a".into(), x.clone())]);
    assert_eq!(ops, ["MatMulInt8Weight"]);
    assert_eq!(out[0].dims, [2, 3, n]);
    assert_close(&out[0], &matmul_ref(&x.values::<f32>().unwrap(), &wq, 6, k, n));
}

#[test]
fn gemm_trans_b_with_bias_and_shared_weight() {
    let (m, k, n) = (5, 96, 70);
    let mut g = Graph::default();
    let a = value(&mut g, "a", &[m, k]);
    let w = value(&mut g, "w", &[n, k]);
    let b = value(&mut g, "b", &[n]);
    let y1 = value(&mut g, "y1", &[m, n]);
    let y2 = value(&mut g, "y2", &[m, n]);
    let wt = data("w", &[n, k], 2);
    let wq = int8_reference(&wt, 0);
    let bt = data("b", &[n], 3);
    g.initializers.insert(w, wt);
    g.initializers.insert(b, bt.clone());
    let gemm_attrs = || vec![("transB", Attribute::Int(1)), ("alpha", Attribute::Float(0.5))];
    node(&mut g, "Gemm", &[a, w, b], y1, gemm_attrs());
    node(&mut g, "Gemm", &[a, w], y2, gemm_attrs());
    g.inputs.push(a);
    g.outputs.extend([y1, y2]);
    let x = data("a", &[m, k], 7);
    let (out, ops) = run_int8(model(g), vec![("a".into(), x.clone())]);
    assert_eq!(ops, ["MatMulInt8Weight", "MatMulInt8Weight"]);
    let prod = matmul_ref(&x.values::<f32>().unwrap(), &transpose(&wq, n, k), m, k, n);
    let bias = bt.values::<f32>().unwrap();
    let want1: Vec<f64> = prod
        .iter()
        .enumerate()
        .map(|(i, p)| 0.5 * p + bias[i % n] as f64)
        .collect();
    let want2: Vec<f64> = prod.iter().map(|p| 0.5 * p).collect();
    assert_close(&out[0], &want1);
    assert_close(&out[1], &want2);
}

#[test]
fn non_constant_weight_and_small_weight_stay_f32() {
    let mut g = Graph::default();
    let a = value(&mut g, "a", &[2, 8]);
    let b = value(&mut g, "b", &[8, 4]);
    let y = value(&mut g, "y", &[2, 4]);
    node(&mut g, "MatMul", &[a, b], y, vec![]);
    g.inputs.extend([a, b]);
    g.outputs.push(y);
    let (xa, xb) = (data("a", &[2, 8], 1), data("b", &[8, 4], 2));
    let (out, ops) = run_int8(model(g), vec![("a".into(), xa.clone()), ("b".into(), xb.clone())]);
    assert_eq!(ops, ["MatMul"]);
    let wb: Vec<f64> = xb.values::<f32>().unwrap().iter().map(|&v| v as f64).collect();
    assert_close(&out[0], &matmul_ref(&xa.values::<f32>().unwrap(), &wb, 2, 8, 4));
}

#[test]
fn wrong_input_shape_is_an_error() {
    let (k, n) = (96, 80);
    let mut g = Graph::default();
    let a = value(&mut g, "a", &[3, k]);
    let w = value(&mut g, "w", &[k, n]);
    let y = value(&mut g, "y", &[3, n]);
    g.initializers.insert(w, data("w", &[k, n], 1));
    node(&mut g, "MatMul", &[a, w], y, vec![]);
    g.inputs.push(a);
    g.outputs.push(y);
    // Drop the declared input shape so the bad feed reaches the kernel.
    g.values[a.index()].shape = None;
    let s = Session::builder()
        .precision(Precision::Int8WeightOnly)
        .build_from_model(model(g))
        .unwrap();
    let err = s.run(vec![("a".into(), data("a", &[3, k + 1], 0))]).unwrap_err();
    assert!(err.to_string().contains("does not fit the weight"), "{err}");
    let err = s.run(vec![("a".into(), data("a", &[], 0))]).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}

// ---- real models ----

const MIN_COSINE: f64 = 0.99;
const MAX_ABS_FRACTION: f64 = 0.1;

/// Cosine similarity and max |a - b| of two f32 tensors.
fn similarity(got: &[f32], want: &[f32]) -> (f64, f64, f64) {
    let (mut dot, mut ng, mut nw, mut max_diff, mut max_ref) = (0.0, 0.0, 0.0, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        dot += g * w;
        ng += g * g;
        nw += w * w;
        max_diff = max_diff.max((g - w).abs());
        max_ref = max_ref.max(w.abs());
    }
    let cos = if ng == 0.0 && nw == 0.0 {
        1.0
    } else {
        dot / (ng.sqrt() * nw.sqrt())
    };
    (cos, max_diff, max_ref)
}

/// Runs every reference case of `stem` in int8 and checks it against onnxruntime's fp32 output.
fn check_int8(stem: &str) {
    let Some(dir) = std::env::var_os("KILN_MODELS").map(PathBuf::from) else {
        assert!(
            std::env::var_os("KILN_MODELS_REQUIRED").is_none(),
            "{stem}: KILN_MODELS is not set (KILN_MODELS_REQUIRED is set)"
        );
        eprintln!("SKIP {stem}: KILN_MODELS is not set (scripts/test.sh sets it up)");
        return;
    };
    let (model, refs) = (dir.join(format!("{stem}.onnx")), dir.join(format!("{stem}.ref")));
    if !model.is_file() || !refs.is_dir() {
        assert!(
            std::env::var_os("KILN_MODELS_REQUIRED").is_none(),
            "{stem}: model or reference missing in {}",
            dir.display()
        );
        eprintln!("SKIP {stem}: model or reference missing in {}", dir.display());
        return;
    }
    // Level All too: its MatMul + bias fusion must not hide the weights from the quantizer.
    for level in [kiln::Level::Basic, kiln::Level::All] {
        check_int8_at(stem, &model, &refs, level);
    }
}

fn check_int8_at(stem: &str, model: &std::path::Path, refs: &std::path::Path, level: kiln::Level) {
    let session = Session::builder()
        .precision(Precision::Int8WeightOnly)
        .optimization(level)
        .run_options(RunOptions {
            profile: true,
            ..Default::default()
        })
        .build_from_file(model)
        .unwrap();
    let mut checked = 0;
    for case in cases(refs) {
        let feeds = case.feeds();
        let (outputs, stats) = session.run_with_stats(feeds).unwrap();
        let int8_ops = stats.op_times.iter().filter(|t| t.op == "MatMulInt8Weight").count();
        assert!(int8_ops > 0, "{stem} at {level:?}: no MatMul ran in int8");
        for (info, got) in session.outputs().iter().zip(&outputs) {
            let want = case.expected(&info.name);
            assert_eq!(got.dims, want.dims, "{stem}: output {}", info.name);
            let (Some(g), Some(w)) = (got.values::<f32>(), want.values::<f32>()) else {
                assert_eq!(got, &want, "{stem}: non-float output {}", info.name);
                continue;
            };
            let (cos, max_diff, max_ref) = similarity(&g, &w);
            eprintln!(
                "int8 {stem}/{}: output '{}' {:?}: cosine {cos:.6}, max |diff| {max_diff:.3e} (max |fp32| {max_ref:.3e}), {int8_ops} int8 MatMuls",
                case.name,
                info.name,
                got.dims
            );
            assert!(
                cos >= MIN_COSINE,
                "{stem}: output {} cosine {cos} < {MIN_COSINE}",
                info.name
            );
            assert!(
                max_diff <= MAX_ABS_FRACTION * max_ref,
                "{stem}: output {} max |diff| {max_diff} > {MAX_ABS_FRACTION} * {max_ref}",
                info.name
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{stem}: no reference case found");
}

#[test]
fn paraphrase_minilm_l3_int8_close_to_fp32() {
    check_int8("paraphrase-MiniLM-L3-v2");
}

#[test]
fn bert_tiny_int8_close_to_fp32() {
    check_int8("bert-tiny");
}

#[test]
fn ppocr_v4_rec_int8_close_to_fp32() {
    check_int8("ch_PP-OCRv4_rec_infer");
}

/// A static-QDQ activation read back by a float operator: `x -> QuantizeLinear -> DequantizeLinear`
/// runs as one `QuantizeDequantize` node at level all (the codes stay for their other reader, here a
/// graph output) and gives the same bits as the pair at level basic, NaN and the range's ends
/// included.
#[test]
fn a_quantize_dequantize_pair_runs_fused_with_the_same_bits() {
    let mut g = Graph::default();
    let x = value(&mut g, "x", &[3, 400]);
    let scalar = |g: &mut Graph, name: &str, t: TensorData| {
        let v = g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(t.dtype),
            shape: Some(Shape::from_known(&[])),
        });
        g.initializers.insert(v, t);
        v
    };
    let s = scalar(&mut g, "s", TensorData::from_values("s", vec![], &[0.0375f32]).unwrap());
    let z = scalar(&mut g, "z", TensorData::from_values("z", vec![], &[121u8]).unwrap());
    let s2 = scalar(
        &mut g,
        "s2",
        TensorData::from_values("s2", vec![], &[0.0375f32]).unwrap(),
    );
    let z2 = scalar(&mut g, "z2", TensorData::from_values("z2", vec![], &[121u8]).unwrap());
    let q = g.add_value(ValueInfo {
        name: "q".into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::U8),
        shape: Some(Shape::from_known(&[3, 400])),
    });
    let y = value(&mut g, "y", &[3, 400]);
    node(&mut g, "QuantizeLinear", &[x, s, z], q, vec![]);
    node(&mut g, "DequantizeLinear", &[q, s2, z2], y, vec![]);
    g.inputs.push(x);
    g.outputs.extend([y, q]);
    let mut xs: Vec<f32> = (0..1200).map(|i| ((i * 7919 % 1201) as f32 - 600.0) * 0.0131).collect();
    xs[..4].copy_from_slice(&[f32::NAN, 1e9, -1e9, 0.01875]);
    let feeds = vec![(
        "x".to_string(),
        TensorData::from_values("x", vec![3, 400], &xs).unwrap(),
    )];
    let run = |level| {
        let s = Session::builder()
            .optimization(level)
            .build_from_model(model(g.clone()))
            .unwrap();
        let fused = s.optimization_report().count("quantize_dequantize_fusion");
        (s.run(feeds.clone()).unwrap(), fused)
    };
    let ((pair, 0), (fused, 1)) = (run(kiln::Level::Basic), run(kiln::Level::All)) else {
        panic!("the rule should fire at level all only");
    };
    assert_eq!(pair[1].values::<u8>().unwrap(), fused[1].values::<u8>().unwrap());
    let (a, b) = (pair[0].values::<f32>().unwrap(), fused[0].values::<f32>().unwrap());
    assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(b[0], (0.0 - 121.0) * 0.0375, "NaN takes the low code");
}

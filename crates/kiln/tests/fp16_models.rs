//! fp16 mode on real models: `Precision::F16` at `Level::Extended` against ONNX Runtime's fp32
//! references (the same cases as `real_models.rs`; see there for `KILN_MODELS` and skipping).
//!
//! Comparison rule, per float output: `max |kiln - ort| <= 1e-2 * max |ort|`, i.e. the error is
//! relative to the output's scale, not to each element. fp16 stores about 3 decimal digits (unit
//! roundoff 4.9e-4), so an element near zero in a tensor of scale 1 carries an absolute error of
//! ~1e-3 that an element-wise relative bound would call a 100% error. An output whose whole scale
//! is tiny (PP-OCR det on an image without text: every probability is below 1e-6, one case is all
//! zeros) passes with `max |kiln - ort| <= 1e-4`, the absolute tolerance of the fp32 golden tests.
//! Integer and bool outputs must be equal; shapes and dtypes (f32, as in the model) must match.
//! The test prints, per output, the max error and the ratio `max|d| / max|ref|` (docs/precision.md
//! quotes them).

mod common;

use kiln::{DType, Level, Precision, Session, TensorData};

use common::refs::{cases, reference_dir};

const REL: f64 = 1e-2;
const ABS_FLOOR: f64 = 1e-4;

/// `(max |d|, max |ref|)` of a float output, or why it does not compare.
fn compare(got: &TensorData, want: &TensorData) -> Result<(f64, f64), String> {
    if got.dims != want.dims {
        return Err(format!("shape {:?}, expected {:?}", got.dims, want.dims));
    }
    if got.dtype != want.dtype {
        return Err(format!("dtype {}, expected {}", got.dtype, want.dtype));
    }
    match want.dtype {
        DType::F32 => {
            let (g, w) = (got.values::<f32>().expect("f32"), want.values::<f32>().expect("f32"));
            let (mut err, mut scale) = (0.0f64, 0.0f64);
            for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
                if g.is_nan() != w.is_nan() || g.is_finite() != w.is_finite() {
                    return Err(format!("element {i}: kiln {g}, onnxruntime {w}"));
                }
                if w.is_finite() {
                    err = err.max((f64::from(g) - f64::from(w)).abs());
                    scale = scale.max(f64::from(w).abs());
                }
            }
            Ok((err, scale))
        }
        DType::I64 => (got.values::<i64>() == want.values::<i64>())
            .then_some((0.0, 0.0))
            .ok_or_else(|| "int64 values differ".to_string()),
        DType::I32 => (got.values::<i32>() == want.values::<i32>())
            .then_some((0.0, 0.0))
            .ok_or_else(|| "int32 values differ".to_string()),
        DType::Bool => (got.values::<bool>() == want.values::<bool>())
            .then_some((0.0, 0.0))
            .ok_or_else(|| "bool values differ".to_string()),
        other => Err(format!("no comparison for dtype {other}")),
    }
}

fn check_model(stem: &str) {
    check_model_at(stem, Level::Extended);
}

/// At `Level::All` the fused `ai.kiln` ops (MatMulBias, FusedConvChain, ElementwiseChain) run in
/// f16 too.
fn check_model_at(stem: &str, level: Level) {
    let Some((model, refs)) = located(stem) else { return };
    let session = Session::builder()
        .optimization(level)
        .precision(Precision::F16)
        .build_from_file(&model)
        .unwrap_or_else(|e| panic!("{stem}: does not compile in fp16: {e}"));
    check_session(stem, &session, &refs);
}

/// The model and reference paths, or `None` (after saying why) when the test skips.
fn located(stem: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    match reference_dir(stem) {
        Ok(p) => Some(p),
        Err(reason) => {
            assert!(
                std::env::var_os("KILN_MODELS_REQUIRED").is_none(),
                "{stem}: {reason} (KILN_MODELS_REQUIRED is set)"
            );
            eprintln!("SKIP {stem}: {reason}");
            None
        }
    }
}

/// Runs every reference case through `session` and checks each output by the rule above.
fn check_session(stem: &str, session: &Session, refs: &std::path::Path) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases(refs) {
        let case_name = &case.name;
        let feeds = case.feeds();
        let outputs = match session.run(feeds) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{stem}/{case_name}: run failed: {e}"));
                continue;
            }
        };
        for (info, got) in session.outputs().iter().zip(&outputs) {
            let want = case.expected(&info.name);
            match compare(got, &want) {
                Ok((err, scale)) => {
                    checked += 1;
                    let ratio = if scale > 0.0 { err / scale } else { err };
                    eprintln!(
                        "fp16 {stem}/{case_name}: output '{}' {:?}: max |d| {err:.3e}, max |ref| {scale:.3e}, ratio {ratio:.2e}",
                        info.name, got.dims
                    );
                    if err > REL * scale && err > ABS_FLOOR {
                        failures.push(format!(
                            "{stem}/{case_name}: output '{}': max |d| {err:.3e} > {REL} * max |ref| {scale:.3e}",
                            info.name
                        ));
                    }
                }
                Err(why) => failures.push(format!("{stem}/{case_name}: output '{}': {why}", info.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 0, "{stem}: no reference case found under {}", refs.display());
}

/// An fp16 file (what `kiln quantize --mode fp16` writes: f16 weights and compute, f32 graph
/// inputs and outputs) in a default CPU session: its f16 arithmetic is widened to f32 at load,
/// so it compiles to the same kernels as the fp32 model (the f16 weights converted once, every
/// Cast between f16 and f32 gone) and its outputs stay within the fp16 tolerance of the
/// references (the weights keep their f16 rounding).
fn check_fp16_file_widened(stem: &str) {
    let Some((path, refs)) = located(stem) else { return };
    let bytes = std::fs::read(&path).unwrap();
    let fp32 = kiln::internals::onnx::load_model_bytes(&bytes).unwrap();
    let mut fp16 = fp32.clone();
    kiln::convert_model_to_float16(&mut fp16).unwrap();
    let has_f16 = |m: &kiln::internals::graph::Model| kiln::internals::graph::passes::float16::has_float16(&m.graph);
    assert!(has_f16(&fp16), "{stem}: the fp16 conversion left no f16 tensor");
    let session = Session::builder().build_from_model(fp16).unwrap();
    let reference = Session::builder().build_from_model(fp32).unwrap();
    assert!(
        session.optimization_report().count(kiln::WIDEN_F16_RULE) > 0,
        "{stem}: not widened: {}",
        session.optimization_report()
    );
    assert_eq!(
        session.plan().len(),
        reference.plan().len(),
        "{stem}: the widened fp16 model should compile to the fp32 model's kernels"
    );
    check_session(stem, &session, &refs);
}

#[test]
fn paraphrase_minilm_l3_fp16_file_runs_widened() {
    check_fp16_file_widened("paraphrase-MiniLM-L3-v2");
}

#[test]
fn ppocr_v4_det_fp16_file_runs_widened() {
    check_fp16_file_widened("ch_PP-OCRv4_det_infer");
}

#[test]
fn silero_vad_fp16_file_runs_widened() {
    check_fp16_file_widened("silero_vad");
}

#[test]
fn paraphrase_minilm_l3_fp16() {
    check_model("paraphrase-MiniLM-L3-v2");
}

#[test]
fn bert_tiny_fp16() {
    check_model("bert-tiny");
}

#[test]
fn paraphrase_minilm_l3_fp16_level_all() {
    check_model_at("paraphrase-MiniLM-L3-v2", Level::All);
}

#[test]
fn bert_tiny_fp16_level_all() {
    check_model_at("bert-tiny", Level::All);
}

#[test]
fn ppocr_v4_det_fp16_level_all() {
    check_model_at("ch_PP-OCRv4_det_infer", Level::All);
}

#[test]
fn ppocr_v4_det_fp16() {
    check_model("ch_PP-OCRv4_det_infer");
}

/// Does not meet the bound: 0.11 (b1) and 0.053 (b2) on the CTC probabilities, at positions where
/// the model is unsure (top-1 0.62). The loss is spread over the whole conv backbone (no single op
/// type kept in fp32 brings it under 1e-2; Conv + Mul + Add together do, i.e. 63% of the nodes);
/// ONNX Runtime running the same fp16 graph (`kiln optimize --precision fp16`) is at 0.059 with
/// its CPU elementwise ops in fp32. See docs/precision.md. Run with `--ignored` to see the numbers.
#[test]
#[ignore = "PP-OCRv4 rec exceeds the fp16 bound (0.11): docs/precision.md"]
fn ppocr_v4_rec_fp16() {
    check_model("ch_PP-OCRv4_rec_infer");
}

#[test]
fn silero_vad_fp16() {
    check_model("silero_vad");
}

#[test]
fn silero_vad_16k_op15_fp16() {
    check_model("silero_vad_16k_op15");
}

#[test]
fn silero_vad_op18_ifless_fp16() {
    check_model("silero_vad_op18_ifless");
}

/// A model whose inputs, outputs and weights are float16 (`y = Softmax(Relu(x * s))`, last axis):
/// on the CPU it runs widened (f16 in and out, f32 in between; the answer is the f32 result
/// rounded once), and `Precision::F16` still runs it in f16 storage.
#[test]
fn f16_io_model_computes_in_f32_between_its_f16_interface() {
    use common::{model, node, value};
    use half::f16;
    use prost::Message;
    let s: Vec<f16> = [0.5f32, -2.0, 3.0].iter().map(|&v| f16::from_f32(v)).collect();
    let s_bytes: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let scale = kiln::internals::onnx::proto::TensorProto {
        name: Some("s".into()),
        data_type: Some(10),
        dims: vec![3],
        raw_data: Some(s_bytes.into()),
        ..Default::default()
    };
    let mut softmax = node("Softmax", "softmax", &["r"], &["y"]);
    softmax.attribute.push(kiln::internals::onnx::proto::AttributeProto {
        name: Some("axis".into()),
        r#type: Some(2),
        i: Some(-1),
        ..Default::default()
    });
    let m = model(
        vec![
            node("Mul", "mul", &["x", "s"], &["p"]),
            node("Relu", "relu", &["p"], &["r"]),
            softmax,
        ],
        vec![value("x", 10, &[2, 3])],
        vec![value("y", 10, &[2, 3])],
        vec![scale],
    );
    let bytes = m.encode_to_vec();
    let xs: Vec<f16> = [1.0f32, 2.5, 0.75, -1.0, -0.5, 4.0]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let x = TensorData::from_values("x", vec![2, 3], &xs).unwrap();
    let mut want = Vec::new();
    for row in xs.chunks(3) {
        let r: Vec<f32> = row
            .iter()
            .zip(&s)
            .map(|(a, b)| (a.to_f32() * b.to_f32()).max(0.0))
            .collect();
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = r.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / sum));
    }
    for precision in [Precision::F32, Precision::F16] {
        let session = Session::builder()
            .precision(precision)
            .build_from_bytes(&bytes)
            .unwrap();
        assert_eq!(session.inputs()[0].dtype, Some(DType::F16));
        assert_eq!(session.outputs()[0].dtype, Some(DType::F16));
        let widened = session.optimization_report().count(kiln::WIDEN_F16_RULE) > 0;
        assert_eq!(widened, precision == Precision::F32, "{precision:?}");
        let out = session.run(vec![("x".into(), x.clone())]).unwrap();
        assert_eq!(out[0].dtype, DType::F16);
        let got: Vec<f16> = out[0].values().unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if precision == Precision::F32 {
                // one rounding of the f32 result (an ulp of f16 for a last-bit difference in exp)
                let (g, w) = (g.to_f32(), f16::from_f32(*w).to_f32());
                assert!((g - w).abs() <= w.abs() * 1e-3, "element {i}: {g} != {w}");
            } else {
                assert!(
                    (g.to_f32() - w).abs() <= 1e-2 * w.abs().max(1e-2),
                    "element {i} (f16): {g} vs {w}"
                );
            }
        }
    }
}

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
    let (model, refs) = match reference_dir(stem) {
        Ok(p) => p,
        Err(reason) => {
            assert!(
                std::env::var_os("KILN_MODELS_REQUIRED").is_none(),
                "{stem}: {reason} (KILN_MODELS_REQUIRED is set)"
            );
            eprintln!("SKIP {stem}: {reason}");
            return;
        }
    };
    let session = Session::builder()
        .optimization(level)
        .precision(Precision::F16)
        .build_from_file(&model)
        .unwrap_or_else(|e| panic!("{stem}: does not compile in fp16: {e}"));
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases(&refs) {
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

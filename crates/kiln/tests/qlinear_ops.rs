//! ONNX Runtime's QOperator 8-bit operators (`com.microsoft` QLinearAdd, QLinearMul, QLinearSigmoid,
//! QLinearSoftmax, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QGemm)
//! against onnxruntime 1.32 on one-node models (`tests/data/qlinear_ops/make_refs.py`: uint8 and int8,
//! broadcasting, NHWC pools, padding and ceil mode, inputs requantized by Concat, Softmax with opset 13
//! and opset 12 semantics; QGemm with per-tensor and per-column weight scales, int32 bias, alpha, transA,
//! quantized and f32 outputs; ONNX QLinearConv with constant filters, on Kiln's packed integer path, the
//! channels-last depthwise path (16 channels) and the plane path (6 channels)).
//!
//! Kiln computes the operators' defining formula in f32 (dequantize, the float op, quantize with
//! round half to even), QLinearAdd with onnxruntime's own arithmetic (scale ratios, fused
//! multiply-adds); onnxruntime's vectorized kernels use fixed-point or lookup-table forms of the
//! others. The outputs must agree exactly or within one quantization step, and at most 2% of a case's
//! elements may take that step (2026-12-05: none of the 38,434 elements does). Malformed parameters
//! give errors, not panics.

use std::path::PathBuf;

use kiln::{Level, Session, TensorData};
use serde_json::Value as Json;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/qlinear_ops")
}

fn refs() -> Json {
    let path = dir().join("refs.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn dims(v: &Json) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn ints(v: &Json) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn tensor(v: &Json) -> TensorData {
    let (name, d, vals) = (v["name"].as_str().unwrap(), dims(&v["dims"]), ints(&v["values"]));
    match v["dtype"].as_str().unwrap() {
        "uint8" => TensorData::from_values(name, d, &vals.iter().map(|&x| x as u8).collect::<Vec<_>>()),
        "int8" => TensorData::from_values(name, d, &vals.iter().map(|&x| x as i8).collect::<Vec<_>>()),
        other => panic!("dtype {other}"),
    }
    .unwrap()
}

/// A case's inputs by name.
fn feeds(case: &Json) -> Vec<(String, TensorData)> {
    case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), tensor(i)))
        .collect()
}

fn values(t: &TensorData) -> Vec<i64> {
    match t.dtype {
        kiln::DType::U8 => t.values::<u8>().unwrap().into_iter().map(i64::from).collect(),
        kiln::DType::I8 => t.values::<i8>().unwrap().into_iter().map(i64::from).collect(),
        d => panic!("output dtype {d}"),
    }
}

fn session(model: &str, level: Level) -> Session {
    Session::builder()
        .optimization(level)
        .build_from_file(dir().join(model))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

#[test]
fn qlinear_ops_match_onnxruntime() {
    let refs = refs();
    let cases = refs["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 43, "refs.json cases");
    let (mut total, mut stepped) = (0usize, 0usize);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let feeds = feeds(case);
        let want = &case["outputs"][0];
        for level in [Level::Disabled, Level::All] {
            let s = session(case["model"].as_str().unwrap(), level);
            let out = match s.run(feeds.clone()) {
                Ok(o) => o,
                Err(e) => {
                    failures.push(format!("{name} at {level:?}: {e}"));
                    continue;
                }
            };
            let got = &out[0];
            assert_eq!(got.dims, dims(&want["dims"]), "{name}: shape");
            if want["dtype"] == "float32" {
                // QGemm without y_scale: f32 out, within 1e-4 relative.
                let g = got.values::<f32>().expect("f32 output");
                let w: Vec<f32> = want["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                let bad = g.iter().zip(&w).position(|(a, b)| {
                    let e = (a - b).abs();
                    e.is_nan() || e > 1e-4 * (1.0 + b.abs())
                });
                if let Some(i) = bad {
                    failures.push(format!(
                        "{name} at {level:?}: element {i}: {} vs onnxruntime {}",
                        g[i], w[i]
                    ));
                }
                continue;
            }
            let want_dt = if want["dtype"] == "uint8" {
                kiln::DType::U8
            } else {
                kiln::DType::I8
            };
            assert_eq!(got.dtype, want_dt, "{name}: dtype");
            let (g, w) = (values(got), ints(&want["values"]));
            let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).max().unwrap_or(0);
            let off = g.iter().zip(&w).filter(|(a, b)| a != b).count();
            if worst > 1 || off * 50 > g.len() {
                failures.push(format!(
                    "{name} at {level:?}: {off} of {} elements differ, by up to {worst}",
                    g.len()
                ));
            }
            if level == Level::All {
                total += g.len();
                stepped += off;
                eprintln!("{name}: {off} of {} elements one step from onnxruntime", g.len());
            }
        }
    }
    eprintln!("{stepped} of {total} elements one step from onnxruntime");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn malformed_parameters_are_errors() {
    let refs = refs();
    let case = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "add_u8_2x3x4x5")
        .unwrap();
    let s = session(case["model"].as_str().unwrap(), Level::Disabled);
    let feeds = feeds(case);
    // int8 data where the zero points are uint8.
    let mut bad = feeds.clone();
    bad[0].1 = TensorData::from_values("a", vec![2, 3, 4, 5], &[1i8; 120]).unwrap();
    let e = s.run(bad).unwrap_err().to_string();
    assert!(e.contains("zero point") || e.contains("int8"), "{e}");
    // Shapes that do not broadcast.
    let mut bad = feeds;
    bad[1].1 = TensorData::from_values("b", vec![2, 3, 4, 6], &[1u8; 144]).unwrap();
    assert!(s.run(bad).is_err());
}

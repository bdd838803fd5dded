//! The shipped models (ResNet-50 and SqueezeNet architectures from the onnx wheel, synthetic weights
//! from models/make_light.py) match onnxruntime's outputs for them, within rtol 1e-3 / atol 1e-5, at
//! every optimization level. The expected outputs must be spread out (a uniform softmax would only
//! check shapes): `expected_outputs_are_spread` fails on a uniform one.

use std::path::PathBuf;

use kiln::{Level, Session, TensorData};

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/light")
}

fn read_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(models_dir().join(name)).expect("shipped file");
    let npy = npyz::NpyFile::new(&bytes[..]).expect("npy");
    let dims = npy.shape().iter().map(|&d| d as usize).collect();
    (dims, npy.into_vec::<f32>().expect("f32 data"))
}

/// Coefficient of variation (std / mean) of the expected softmax output: 0 for a uniform one. The
/// shipped files are at 14 (ResNet-50) and 5.1 (SqueezeNet).
fn spread(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

const MIN_SPREAD: f64 = 0.5;

fn assert_spread(expected: &str) {
    let (_, want) = read_f32(expected);
    let cv = spread(&want);
    assert!(
        cv > MIN_SPREAD,
        "{expected}: std/mean of the expected output is {cv:.3} (<= {MIN_SPREAD}): too close to uniform \
         to check the values; regenerate with models/make_light.py"
    );
}

#[test]
fn expected_outputs_are_spread() {
    assert_spread("resnet50_expected.npy");
    assert_spread("squeezenet_expected.npy");
    // The check itself rejects the uniform softmax the wheel's constant weights gave.
    assert!(spread(&[0.001f32; 1000]) < 1e-6);
}

fn check(model: &str, input: &str, expected: &str) {
    assert_spread(expected);
    let (dims, x) = read_f32("input_1x3x224x224.npy");
    let (edims, want) = read_f32(expected);
    for level in [Level::Disabled, Level::Basic, Level::Extended, Level::All] {
        let s = Session::builder()
            .optimization(level)
            .build_from_file(models_dir().join(model))
            .expect("model loads");
        let t = TensorData::from_values(input, dims.clone(), &x).unwrap();
        let out = s.run(vec![(input.to_string(), t)]).expect("runs");
        assert_eq!(out[0].dims, edims, "{model} at {level:?}");
        let got = out[0].values::<f32>().unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-3 * w.abs(),
                "{model} at {level:?}: element {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn resnet50_matches_reference() {
    check("resnet50.onnx", "gpu_0/data_0", "resnet50_expected.npy");
}

#[test]
fn squeezenet_matches_reference() {
    check("squeezenet.onnx", "data_0", "squeezenet_expected.npy");
}

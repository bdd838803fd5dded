//! The shipped models (ResNet-50 and SqueezeNet architectures from the onnx wheel, synthetic weights)
//! match the outputs onnx ships for them (verified against onnxruntime by models/make_light.py),
//! within rtol 1e-3 / atol 1e-5, at every optimization level.

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

fn check(model: &str, input: &str, expected: &str) {
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

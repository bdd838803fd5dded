//! fp16 mode through the CPU kernels that have f32-only fast paths (`conv_cpu`, `binary_cpu`,
//! `fastmath`'s Erf/Tanh/Sigmoid, Softmax, LayerNormalization): with f16 tensors they must take the
//! generic path, not fail. The reference is the same model at `Precision::F32` (whose kernels the
//! node tests check against ONNX Runtime); the bound is the fp16 rule of docs/precision.md.

mod common;

use common::{f32_tensor, model, node, value};
use kiln::{Level, Precision, Session, TensorData};

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn test_model() -> Vec<u8> {
    let m = model(
        vec![
            node("Conv", "conv", &["x", "w", "b"], &["c"]),
            node("Add", "add_channel", &["c", "cb"], &["a"]),
            node("Erf", "erf", &["a"], &["e"]),
            node("Tanh", "tanh", &["a"], &["t"]),
            node("Sigmoid", "sigmoid", &["a"], &["s"]),
            node("Add", "sum1", &["e", "t"], &["u"]),
            node("Mul", "mul", &["u", "s"], &["v"]),
            node("Softmax", "softmax", &["v"], &["p"]),
            node("LayerNormalization", "ln", &["p", "gamma", "beta"], &["y"]),
            node("Exp", "exp", &["a"], &["z"]),
        ],
        vec![value("x", 1, &[-1, 3, 8, 8])],
        vec![value("y", 1, &[-1, 4, 6, 6]), value("z", 1, &[-1, 4, 6, 6])],
        vec![
            f32_tensor("w", &[4, 3, 3, 3], &values(108, 1, 0.3)),
            f32_tensor("b", &[4], &values(4, 2, 0.5)),
            f32_tensor("cb", &[4, 1, 1], &values(4, 3, 0.5)),
            f32_tensor("gamma", &[6], &values(6, 4, 1.0)),
            f32_tensor("beta", &[6], &values(6, 5, 0.2)),
        ],
    );
    common::bytes(&m)
}

#[test]
fn f16_tensors_take_the_generic_kernel_paths() {
    let bytes = test_model();
    let x = TensorData::from_values("x", vec![2, 3, 8, 8], &values(384, 7, 1.0)).unwrap();
    let run = |p: Precision| {
        let s = Session::builder()
            .optimization(Level::Extended)
            .precision(p)
            .build_from_bytes(&bytes)
            .unwrap();
        s.run(vec![("x".into(), x.clone())]).unwrap()
    };
    let (want, got) = (run(Precision::F32), run(Precision::F16));
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g.dtype, kiln::DType::F32, "outputs keep the model's dtype");
        assert_eq!(g.dims, w.dims);
        let (w, g) = (w.values::<f32>().unwrap(), g.values::<f32>().unwrap());
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = w.iter().zip(&g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-2 * scale, "max |d| {err}, max |ref| {scale}");
        assert!(err > 0.0, "the fp16 run rounds somewhere (else it did not run in f16)");
    }
}

#[test]
fn conversion_report_counts_the_kept_and_converted_nodes() {
    let mut m = kiln::internals::onnx::load_model_bytes(&test_model()).unwrap();
    kiln::optimize_model(&mut m, Level::Extended).unwrap();
    let r = kiln::convert_model_to_float16(&mut m).unwrap();
    assert_eq!(r.kept_fp32.get("block list"), Some(&1), "Exp: {r}");
    assert_eq!(r.converted_initializers, 5, "{r}");
    assert!(r.converted_nodes >= 8, "{r}");
    // x in; y out; a -> Exp and Exp's z are f32 (z is an output, so no Cast after it).
    assert_eq!(r.casts_inserted, 3, "{r}");
}

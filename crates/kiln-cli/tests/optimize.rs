//! `kiln optimize` end to end on the shipped SqueezeNet: the written model re-imports, has the
//! fused ops the report printed, and runs to the shipped expected output. When the Python venv
//! exists (CI: `$KILN_CACHE/venv-v1`), `onnx.checker` and ONNX Runtime check it too.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn optimize_writes_a_valid_smaller_model() {
    let out_path = std::env::temp_dir().join(format!("kiln-optimize-{}.onnx", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["optimize", "models/light/squeezenet.onnx"])
        .arg(&out_path)
        .args(["--level", "extended", "--fold-limit", "67108864"])
        .current_dir(root())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 26 Conv + 26 Relu -> 26 FusedConv; the weight generators (15 Mul on the base, 39 Tile, Slice,
    // Reshape; see models/make_light.py) folded; the Dropout removed.
    assert!(stdout.contains("      26         0  Conv  *"), "{stdout}");
    assert!(
        stdout.contains("       0        26  com.microsoft::FusedConv  *"),
        "{stdout}"
    );
    assert!(stdout.contains("     198        39  total"), "{stdout}");
    assert!(stdout.contains("rule constant_folding: 132"), "{stdout}");
    assert!(stdout.contains("rule conv_activation_fusion: 26"), "{stdout}");

    let model = kiln::internals::onnx::load_model(&out_path).expect("re-imports");
    assert_eq!(model.opsets.get("com.microsoft"), Some(&1));
    let session = kiln::Session::builder()
        .optimization(kiln::Level::Disabled)
        .build_from_model(model)
        .expect("builds");
    let npy = std::fs::read(root().join("models/light/input_1x3x224x224.npy")).unwrap();
    let npy = npyz::NpyFile::new(&npy[..]).unwrap();
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let x = kiln::TensorData::from_values("data_0", dims, &npy.into_vec::<f32>().unwrap()).unwrap();
    let got = session.run(vec![("data_0".into(), x)]).unwrap();
    let want = std::fs::read(root().join("models/light/squeezenet_expected.npy")).unwrap();
    let want: Vec<f32> = npyz::NpyFile::new(&want[..]).unwrap().into_vec().unwrap();
    let got = got[0].values::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 + 1e-3 * b.abs(), "{a} vs {b}");
    }

    let cache = std::env::var_os("KILN_CACHE").map(PathBuf::from);
    let python = cache.map(|c| c.join("venv-v1/bin/python")).filter(|p| p.exists());
    match python {
        Some(py) => {
            let check = Command::new(py)
                .arg("tests/optimize/check_optimized.py")
                .arg("models/light/squeezenet.onnx")
                .arg(&out_path)
                .current_dir(root())
                .output()
                .expect("runs python");
            let text = String::from_utf8_lossy(&check.stdout);
            assert!(
                check.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&check.stderr)
            );
            assert!(text.contains("checker ok; outputs match"), "{text}");
        }
        None => eprintln!("no Python venv under $KILN_CACHE: onnx.checker/onnxruntime check skipped"),
    }
    let _ = std::fs::remove_file(&out_path);
}

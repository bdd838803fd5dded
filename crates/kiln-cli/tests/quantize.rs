//! `kiln quantize` and `kiln prune` end to end on a small generated model: the quantized model
//! re-imports with an int8 DequantizeLinear weight, runs, and the report names the weight; `--mode
//! fp16` keeps f32 IO; `--mode int4-weight` writes MatMulNBits within a block's half step; `--mode
//! static-int8` writes QDQ that Kiln fuses into QLinearConv and that stays close to the original;
//! unstructured pruning reaches the asked fraction and 2:4 leaves two of every four
//! values along the reduction axis; bad arguments are errors.
//! (`tests/quantize/run.sh` checks the output with onnx.checker and ONNX Runtime on real models.)

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::internals::graph::{DType, Graph, Model, Node, Shape, ValueInfo, ValueKind};
use kiln::internals::onnx;
use kiln::TensorData;

/// `y = MatMul(x [2, 64], w [64, 96])`, opset 17.
fn write_model(path: &Path) {
    let mut g = Graph::default();
    let value = |g: &mut Graph, name: &str, dims: &[usize]| {
        g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(DType::F32),
            shape: Some(Shape::from_known(dims)),
        })
    };
    let x = value(&mut g, "x", &[2, 64]);
    let w = value(&mut g, "w", &[64, 96]);
    let y = value(&mut g, "y", &[2, 96]);
    let wv: Vec<f32> = (0..64 * 96).map(|i| ((i * 31 % 101) as f32 - 50.0) / 40.0).collect();
    g.initializers
        .insert(w, TensorData::from_values("w", vec![64, 96], &wv).unwrap());
    g.nodes.push(Node {
        name: "mm".into(),
        op_type: "MatMul".into(),
        domain: String::new(),
        inputs: vec![Some(x), Some(w)],
        outputs: vec![Some(y)],
        attributes: Default::default(),
        implicit_inputs: Vec::new(),
    });
    g.inputs.push(x);
    g.outputs.push(y);
    let m = Model {
        ir_version: 8,
        opsets: [(String::new(), 17)].into_iter().collect(),
        graph: g,
        ..Default::default()
    };
    std::fs::write(path, onnx::export_model_bytes(&m).unwrap()).unwrap();
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-quantize-{}-{name}", std::process::id()))
}

#[test]
fn quantize_writes_int8_weights() {
    let (src, dst) = (tmp("in.onnx"), tmp("out.onnx"));
    write_model(&src);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("quantize")
        .args([&src, &dst])
        .args(["--mode", "int8-weight", "--min-elements", "1024"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("int8  [64, 96] axis 1  w"), "{stdout}");
    // 64*96*4 bytes -> 64*96 + 96*4.
    assert!(
        stdout.contains("quantized 1 weight(s): 0.02 MiB -> 0.01 MiB"),
        "{stdout}"
    );

    let m = onnx::load_model(&dst).expect("re-imports");
    let dq: Vec<&Node> = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .collect();
    assert_eq!(dq.len(), 1);
    let q = &m.graph.initializers[&dq[0].inputs[0].unwrap()];
    assert_eq!((q.dtype, q.dims.as_slice()), (DType::I8, &[64usize, 96][..]));
    let s = kiln::Session::builder().build_from_model(m).expect("builds");
    let x = TensorData::from_values("x", vec![2, 64], &[0.25f32; 128]).unwrap();
    let y = s.run(vec![("x".into(), x)]).expect("runs");
    assert_eq!(y[0].dims, [2, 96]);

    let bad = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("quantize")
        .args([&src, &dst])
        .args(["--mode", "int3"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown --mode 'int3'"));
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
}

#[test]
fn quantize_int4_writes_matmulnbits() {
    let (src, dst) = (tmp("int4-in.onnx"), tmp("int4-out.onnx"));
    write_model(&src);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("quantize")
        .args([&src, &dst])
        .args(["--mode", "int4-weight", "--min-elements", "1024", "--block-size", "32"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("int4  [64, 96] axis 1  w"), "{stdout}");
    let m = onnx::load_model(&dst).expect("re-imports");
    assert_eq!(m.opset("com.microsoft"), Some(1));
    let node = &m.graph.nodes[0];
    assert_eq!(
        (node.domain.as_str(), node.op_type.as_str()),
        ("com.microsoft", "MatMulNBits")
    );
    let codes = &m.graph.initializers[&node.inputs[1].unwrap()];
    // [N, K / block_size, block_size / 2]
    assert_eq!((codes.dtype, codes.dims.as_slice()), (DType::U8, &[96usize, 2, 16][..]));
    // Each weight is within half a quantization step of its block: the product within the sum of
    // |x| * step / 2 over K, bounded here by 5% of the largest output.
    let x: Vec<f32> = (0..128).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect();
    let x = TensorData::from_values("x", vec![2, 64], &x).unwrap();
    let run = |path: &Path| {
        let s = kiln::Session::builder().build_from_file(path).expect("builds");
        s.run(vec![("x".into(), x.clone())]).expect("runs")[0]
            .values::<f32>()
            .expect("f32 output")
    };
    let (want, got) = (run(&src), run(&dst));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err > 0.0 && err <= 5e-2 * scale, "max |d| {err} of max |ref| {scale}");
    let bad = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("quantize")
        .args([&src, &dst])
        .args(["--mode", "int4-weight", "--block-size", "24"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("power of two"));
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
}

#[test]
fn quantize_fp16_halves_the_weights_and_keeps_f32_io() {
    let (src, dst) = (tmp("fp16-in.onnx"), tmp("fp16-out.onnx"));
    write_model(&src);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("quantize")
        .args([&src, &dst])
        .args(["--mode", "fp16"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wrote"), "{stdout}");
    let m = onnx::load_model(&dst).expect("re-imports");
    let w = m.graph.initializers.values().next().expect("the weight");
    assert_eq!((w.dtype, w.dims.as_slice()), (DType::F16, &[64usize, 96][..]));
    let io = |id| m.graph.value(id).dtype;
    assert_eq!(io(m.graph.inputs[0]), Some(DType::F32));
    assert_eq!(io(m.graph.outputs[0]), Some(DType::F32));
    // Same outputs as the f32 model within the fp16 rule (1e-2 of the largest value).
    let x: Vec<f32> = (0..128).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect();
    let x = TensorData::from_values("x", vec![2, 64], &x).unwrap();
    let run = |path: &Path| {
        let s = kiln::Session::builder().build_from_file(path).expect("builds");
        s.run(vec![("x".into(), x.clone())]).expect("runs")[0]
            .values::<f32>()
            .expect("f32 output")
    };
    let (want, got) = (run(&src), run(&dst));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err > 0.0 && err <= 1e-2 * scale, "max |d| {err} of max |ref| {scale}");
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
}

fn prune(args: &[&str], src: &Path, dst: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("prune")
        .args([src, dst])
        .args(args)
        .output()
        .expect("runs")
}

fn pruned_weight(dst: &Path) -> (Model, Vec<f32>) {
    let m = onnx::load_model(dst).expect("re-imports");
    let w = m
        .graph
        .initializers
        .values()
        .next()
        .expect("the weight")
        .values::<f32>()
        .unwrap();
    (m, w)
}

#[test]
fn prune_unstructured_and_two_of_four() {
    let (src, dst) = (tmp("prune-in.onnx"), tmp("prune-out.onnx"));
    write_model(&src);

    let out = prune(&["--amount", "0.75"], &src, &dst);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The generated weight holds 61 zeros already; they are among the smallest.
    assert!(
        stdout.contains("pruned [64, 96]  zeros 61 -> 4608 (75.0%)  w"),
        "{stdout}"
    );
    let (m, w) = pruned_weight(&dst);
    assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 4608);
    assert_eq!(m.graph.nodes.len(), 1, "same ops");
    let s = kiln::Session::builder().build_from_model(m).expect("builds");
    let x = TensorData::from_values("x", vec![2, 64], &[0.5f32; 128]).unwrap();
    assert_eq!(s.run(vec![("x".into(), x)]).expect("runs")[0].dims, [2, 96]);

    let out = prune(&["--structured", "2:4"], &src, &dst);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, w) = pruned_weight(&dst);
    for n in 0..96 {
        for k0 in (0..64).step_by(4) {
            let kept = (k0..k0 + 4).filter(|k| w[k * 96 + n] != 0.0).count();
            assert_eq!(kept, 2, "column {n}, rows {k0}..{}", k0 + 4);
        }
    }

    let out = prune(&["--structured", "2:4", "--exclude", "MatMul"], &src, &dst);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("kept   w: read by excluded node 'mm'"), "{stdout}");

    for bad in [
        &["--amount", "1.5"][..],
        &["--structured", "4:4"],
        &["--structured", "two"],
        &[],
    ] {
        let out = prune(bad, &src, &dst);
        assert!(!out.status.success(), "{bad:?} should fail");
    }
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
}

/// `y = Conv(Relu(Conv(x [1, 4, 10, 10], w1 [8, 4, 3, 3], b1, pads 1)), w2 [6, 8, 1, 1], b2)`.
fn write_conv_model(path: &Path, opset: i64) {
    let mut g = Graph::default();
    let value = |g: &mut Graph, name: &str, dims: &[usize]| {
        g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(DType::F32),
            shape: Some(Shape::from_known(dims)),
        })
    };
    let init = |g: &mut Graph, name: &str, dims: &[usize], seed: usize| {
        let v = value(g, name, dims);
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i + seed) * 37 % 97) as f32 - 48.0) / 60.0).collect();
        g.initializers
            .insert(v, TensorData::from_values(name, dims.to_vec(), &data).unwrap());
        v
    };
    let x = value(&mut g, "x", &[1, 4, 10, 10]);
    let (w1, b1) = (init(&mut g, "w1", &[8, 4, 3, 3], 1), init(&mut g, "b1", &[8], 2));
    let (w2, b2) = (init(&mut g, "w2", &[6, 8, 1, 1], 3), init(&mut g, "b2", &[6], 4));
    let (h, r, y) = (
        value(&mut g, "h", &[1, 8, 10, 10]),
        value(&mut g, "r", &[1, 8, 10, 10]),
        value(&mut g, "y", &[1, 6, 10, 10]),
    );
    let node = |name: &str, op: &str, inputs: Vec<Option<kiln::internals::graph::ValueId>>, out| Node {
        name: name.into(),
        op_type: op.into(),
        domain: String::new(),
        inputs,
        outputs: vec![Some(out)],
        attributes: if op == "Conv" && name == "c1" {
            [(
                "pads".to_string(),
                kiln::internals::graph::Attribute::Ints(vec![1, 1, 1, 1]),
            )]
            .into_iter()
            .collect()
        } else {
            Default::default()
        },
        implicit_inputs: Vec::new(),
    };
    g.nodes.push(node("c1", "Conv", vec![Some(x), Some(w1), Some(b1)], h));
    g.nodes.push(node("relu", "Relu", vec![Some(h)], r));
    g.nodes.push(node("c2", "Conv", vec![Some(r), Some(w2), Some(b2)], y));
    g.inputs.push(x);
    g.outputs.push(y);
    let m = Model {
        ir_version: 8,
        opsets: [(String::new(), opset)].into_iter().collect(),
        graph: g,
        ..Default::default()
    };
    std::fs::write(path, onnx::export_model_bytes(&m).unwrap()).unwrap();
}

/// A little-endian f32 `.npy` file.
fn write_npy(path: &Path, dims: &[usize], data: &[f32]) {
    let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        shape.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn quantize_static_int8_writes_qdq_that_fuses_and_stays_close() {
    let (src, dst, cal) = (tmp("static-in.onnx"), tmp("static-out.onnx"), tmp("static-cal"));
    write_conv_model(&src, 17);
    for s in 0..3 {
        let dir = cal.join(format!("{s}"));
        std::fs::create_dir_all(&dir).unwrap();
        let x: Vec<f32> = (0..400)
            .map(|i| (((i * 13 + s * 7) % 41) as f32 - 20.0) / 10.0)
            .collect();
        write_npy(&dir.join("x.npy"), &[1, 4, 10, 10], &x);
    }
    let quantize = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("quantize")
            .args([&src, &dst])
            .args(["--mode", "static-int8"])
            .args(extra)
            .output()
            .expect("runs")
    };
    let cal_arg = cal.to_string_lossy().into_owned();
    for method in ["minmax", "percentile", "entropy"] {
        let out = quantize(&["--calibration", &cal_arg, "--calibration-method", method]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("quantized 2 weight(s)"), "{stdout}");
        assert!(
            stdout.contains("accuracy against the original (3 calibration samples)"),
            "{stdout}"
        );
        let cosine: f64 = stdout
            .split("cosine ")
            .nth(1)
            .and_then(|s| s.split([',', '\n']).next())
            .and_then(|s| s.trim().parse().ok())
            .expect("a cosine in the report");
        // Entropy calibration clips the tails of each range by design (here the Relu output's,
        // from 2,400 values): less close than min-max on these synthetic weights.
        let floor = if method == "entropy" { 0.9 } else { 0.99 };
        assert!(cosine >= floor, "{method}: cosine {cosine}\n{stdout}");
    }
    // The written graph: int8 per-channel filters with int32 biases, u8 activations, the Relu
    // folded into the first conv's output quantization; Kiln fuses that conv into QLinearConv.
    let m = onnx::load_model(&dst).expect("re-imports");
    let count = |op: &str| m.graph.nodes.iter().filter(|n| n.op_type == op).count();
    assert_eq!((count("Relu"), count("QuantizeLinear"), count("Conv")), (0, 2, 2));
    let dtypes: Vec<DType> = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter_map(|n| m.graph.initializers.get(&n.inputs[0]?).map(|t| t.dtype))
        .collect();
    assert_eq!(dtypes.iter().filter(|d| **d == DType::I8).count(), 2, "{dtypes:?}");
    assert_eq!(dtypes.iter().filter(|d| **d == DType::I32).count(), 2, "{dtypes:?}");
    let mut fused = m.clone();
    let report = kiln::optimize_model(&mut fused, kiln::Level::Extended).expect("optimizes");
    assert!(format!("{report}").contains("qdq_conv_fusion: 1"), "{report}");
    assert_eq!(
        fused.graph.nodes.iter().filter(|n| n.op_type == "QLinearConv").count(),
        1
    );

    // Excluding Conv leaves nothing to quantize; no --calibration and a bad method are errors.
    let out = quantize(&["--calibration", &cal_arg, "--exclude", "Conv"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("quantized 0 weight(s)"));
    let out = quantize(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --calibration"));
    let out = quantize(&["--calibration", &cal_arg, "--calibration-method", "kl"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown calibration 'kl'"));

    // Opset 12 has no per-axis DequantizeLinear: one scalar scale per filter, still fused.
    write_conv_model(&src, 12);
    let out = quantize(&["--calibration", &cal_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("quantized 2 weight(s)"), "{stdout}");
    let m = onnx::load_model(&dst).expect("re-imports");
    for n in m.graph.nodes.iter().filter(|n| n.op_type == "DequantizeLinear") {
        assert!(!n.attributes.contains_key("axis"), "{}", n.name);
        let scale = &m.graph.initializers[&n.inputs[1].unwrap()];
        assert!(scale.dims.is_empty(), "{}: scale {:?}", n.name, scale.dims);
    }
    let mut fused = m.clone();
    let report = kiln::optimize_model(&mut fused, kiln::Level::Extended).expect("optimizes");
    assert!(format!("{report}").contains("qdq_conv_fusion: 1"), "{report}");
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
    let _ = std::fs::remove_dir_all(cal);
}

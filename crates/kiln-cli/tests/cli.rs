//! The `kiln` binary end to end on the shipped SqueezeNet.

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_lists_io_ops_and_support() {
    let (ok, out, _) = kiln(&["inspect", "models/light/squeezenet.onnx"]);
    assert!(ok);
    assert!(out.contains("ai.onnx=9"), "{out}");
    assert!(out.contains("data_0") && out.contains("[1, 3, 224, 224]"), "{out}");
    assert!(out.contains("26  Conv"), "{out}");
    assert!(out.contains("unsupported: none"), "{out}");
}

#[test]
fn inspect_with_a_device_runs_once_and_says_where_nodes_ran() {
    let (ok, out, err) = kiln(&["inspect", "models/light/squeezenet.onnx", "--device", "cpu"]);
    assert!(ok, "{err}");
    assert!(out.contains("26  Conv"), "{out}");
    assert!(
        out.contains("trial run on cpu (level All, precision F32)") && out.contains("every node runs on the CPU"),
        "{out}"
    );
    // A bad --dim is an error, not a guess.
    let (ok, _, err) = kiln(&[
        "inspect",
        "models/light/squeezenet.onnx",
        "--device",
        "cpu",
        "--dim",
        "batch",
    ]);
    assert!(!ok && err.contains("--dim 'batch' should be NAME=SIZE"), "{err}");
    // cuda: without the feature or without a GPU, one clear line; with a GPU, the report.
    let (ok, out, err) = kiln(&["inspect", "models/light/squeezenet.onnx", "--device", "cuda"]);
    if ok {
        assert!(out.contains("trial run on cuda:0"), "{out}");
        assert!(
            out.contains("every node ran on cuda:0") || out.contains("ran on the CPU"),
            "{out}"
        );
        assert!(out.contains("device memory:"), "{out}");
    } else {
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: loading models/light/squeezenet.onnx on cuda:0"),
            "{err}"
        );
    }
}

#[test]
fn run_writes_one_npy_per_output() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-run-{}", std::process::id()));
    let dir_s = dir.to_string_lossy().into_owned();
    let (ok, out, err) = kiln(&[
        "run",
        "models/light/squeezenet.onnx",
        "--input",
        "data_0=models/light/input_1x3x224x224.npy",
        "--output-dir",
        &dir_s,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("peak activation memory"), "{out}");
    let got = std::fs::read(dir.join("softmaxout_1.npy")).expect("output file");
    let want = std::fs::read(root().join("models/light/squeezenet_expected.npy")).unwrap();
    let g = npyz::NpyFile::new(&got[..]).unwrap();
    assert_eq!(g.shape(), &[1, 1000, 1, 1]);
    let g: Vec<f32> = g.into_vec().unwrap();
    let w: Vec<f32> = npyz::NpyFile::new(&want[..]).unwrap().into_vec().unwrap();
    for (a, b) in g.iter().zip(&w) {
        assert!((a - b).abs() <= 1e-5 + 1e-3 * b.abs());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln bench` on the shipped SqueezeNet, two runs after one warm-up, plus `extra` flags.
fn bench_squeezenet(extra: &[&str]) -> String {
    let mut args = vec!["bench", "models/light/squeezenet.onnx", "-n", "2", "--warmup", "1"];
    args.extend_from_slice(extra);
    let (ok, out, err) = kiln(&args);
    assert!(ok, "{args:?}: {err}");
    out
}

#[test]
fn bench_reports_percentiles() {
    let out = bench_squeezenet(&[]);
    assert!(
        out.contains("p50") && out.contains("p99") && out.contains("runs/s"),
        "{out}"
    );
    assert!(out.contains("io: host"), "{out}");
    // IO binding: inputs bound once, outputs left on the device (on the CPU, the same memory).
    let out = bench_squeezenet(&["--io", "device"]);
    assert!(out.contains("io: device") && out.contains("p50"), "{out}");
    // The plan walked by the calling thread, kernels handed to the pool (the default runs every
    // inference on a pool worker), with 2 threads.
    let out = bench_squeezenet(&["--run-on-caller", "--threads", "2"]);
    assert!(out.contains("p50") && out.contains("runs/s"), "{out}");
}

#[test]
fn bench_profile_breaks_time_down_by_operator() {
    let out = bench_squeezenet(&["--threads", "1", "--profile"]);
    assert!(out.contains("threads: 1"), "{out}");
    // SqueezeNet 1.1 has 26 Conv nodes, each fused with its Relu at the default level (all), and
    // computed channels-last where the direct channels-last kernel runs (AVX-512F); the row reports
    // nodes per run.
    let row = if kiln::internals::runtime::sgemm::indexed_available() {
        "ConvNhwc "
    } else {
        "FusedConv "
    };
    let conv = out
        .lines()
        .find(|l| l.starts_with(row))
        .unwrap_or_else(|| panic!("no {row}row in the profile:\n{out}"));
    assert_eq!(conv.split_whitespace().nth(1), Some("26"), "{conv}");
    assert!(out.contains("slowest nodes:"), "{out}");
}

#[test]
fn failures_exit_non_zero_with_one_line() {
    for args in [
        vec!["run", "models/light/missing.onnx"],
        vec!["run", "models/light/squeezenet.onnx"],
        vec![
            "run",
            "models/light/squeezenet.onnx",
            "--input",
            "data_0=/nonexistent.npy",
        ],
        vec![
            "run",
            "models/light/squeezenet.onnx",
            "--device",
            "cuda:0",
            "--input",
            "x=y.npy",
        ],
    ] {
        let (ok, _, err) = kiln(&args);
        assert!(!ok, "{args:?} should fail");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
}

#[test]
fn precision_fp16_runs_benches_and_rejects_unknown_names() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-fp16-{}", std::process::id()));
    let dir_s = dir.to_string_lossy().into_owned();
    let (ok, _, err) = kiln(&[
        "run",
        "models/light/squeezenet.onnx",
        "--precision",
        "fp16",
        "--input",
        "data_0=models/light/input_1x3x224x224.npy",
        "--output-dir",
        &dir_s,
    ]);
    assert!(ok, "{err}");
    // Outputs keep the model's f32 dtype; values within the fp16 rule of docs/precision.md.
    let got = std::fs::read(dir.join("softmaxout_1.npy")).expect("output file");
    let want = std::fs::read(root().join("models/light/squeezenet_expected.npy")).unwrap();
    let g: Vec<f32> = npyz::NpyFile::new(&got[..]).unwrap().into_vec().unwrap();
    let w: Vec<f32> = npyz::NpyFile::new(&want[..]).unwrap().into_vec().unwrap();
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-2 * scale || err <= 1e-4, "max |d| {err}, max |ref| {scale}");
    let _ = std::fs::remove_dir_all(&dir);

    let (ok, out, err) = kiln(&[
        "bench",
        "models/light/squeezenet.onnx",
        "-n",
        "1",
        "--warmup",
        "0",
        "--precision",
        "fp16",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("precision: F16"), "{out}");

    let (ok, _, err) = kiln(&["bench", "models/light/squeezenet.onnx", "--precision", "fp8"]);
    assert!(!ok);
    assert!(err.contains("unknown precision 'fp8'"), "{err}");
}

/// The write end of a pipe whose read end is already closed: every write to it fails with EPIPE,
/// as for `kiln ... | head` once head has exited.
#[cfg(unix)]
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().expect("true runs");
    let writer = reader.stdin.take().expect("pipe");
    reader.wait().expect("true exits");
    Stdio::from(writer)
}

#[cfg(unix)]
#[test]
fn closed_stdout_ends_every_subcommand_quietly() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-epipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.to_string_lossy().into_owned();
    let optimized = dir.join("o.onnx").to_string_lossy().into_owned();
    let quantized = dir.join("q.onnx").to_string_lossy().into_owned();
    let m = "models/light/squeezenet.onnx";
    let input = "data_0=models/light/input_1x3x224x224.npy";
    for args in [
        vec!["inspect", m],
        vec!["inspect", m, "--device", "cpu"],
        vec!["run", m, "--input", input, "--output-dir", &dir_s],
        vec!["bench", m, "-n", "1", "--warmup", "0"],
        vec!["optimize", m, &optimized],
        vec!["quantize", m, &quantized],
        vec!["--help"],
        vec!["--version"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(root())
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?} with stdout closed: {:?}, stderr: {err}",
            out.status
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn default_level_is_all_and_help_says_so() {
    let out = bench_squeezenet(&[]);
    assert!(out.contains("level: All"), "{out}");
    for cmd in ["run", "bench", "inspect", "optimize"] {
        let (ok, out, err) = kiln(&[cmd, "--help"]);
        assert!(ok, "{err}");
        assert!(out.contains("[default: all]"), "kiln {cmd} --help: {out}");
    }
    // `kiln optimize` leaves Kiln-only fusions out of the written model, so its default (all)
    // writes the same model as --level extended.
    let dir = std::env::temp_dir().join(format!("kiln-cli-level-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (all, ext) = (dir.join("all.onnx"), dir.join("extended.onnx"));
    for (path, extra) in [(&all, vec![]), (&ext, vec!["--level", "extended"])] {
        let mut args = vec!["optimize", "models/light/resnet50.onnx", path.to_str().unwrap()];
        args.extend(extra);
        let (ok, _, err) = kiln(&args);
        assert!(ok, "{args:?}: {err}");
    }
    assert!(std::fs::read(&all).unwrap() == std::fs::read(&ext).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// y = Reshape(x, [-1, 4]) with x: [N, 6]: runs for even N, fails for N = 1 (6 elements are not
/// a whole number of rows of 4), which is what `bench` synthesizes when no `--dim` is given.
fn reshape_model(path: &std::path::Path) {
    use kiln::internals::graph::{DType, Dim, Graph, Model, Node, Shape, ValueInfo, ValueKind};
    let mut g = Graph {
        name: "reshape".into(),
        ..Default::default()
    };
    let x = g.add_value(ValueInfo {
        name: "x".into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::F32),
        shape: Some(Shape(vec![Dim::Sym("N".into()), Dim::Known(6)])),
    });
    let shape = g.add_value(ValueInfo {
        name: "shape".into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::I64),
        shape: Some(Shape::from_known(&[2])),
    });
    let y = g.add_value(ValueInfo {
        name: "y".into(),
        kind: ValueKind::Tensor,
        dtype: Some(DType::F32),
        shape: None,
    });
    g.initializers.insert(
        shape,
        kiln::TensorData::from_values("shape", vec![2], &[-1i64, 4]).unwrap(),
    );
    g.nodes.push(Node {
        name: "reshape".into(),
        op_type: "Reshape".into(),
        domain: String::new(),
        inputs: vec![Some(x), Some(shape)],
        outputs: vec![Some(y)],
        attributes: Default::default(),
        implicit_inputs: vec![],
    });
    g.inputs.push(x);
    g.outputs.push(y);
    let model = Model {
        graph: g,
        opsets: [(String::new(), 17)].into_iter().collect(),
        ir_version: 8,
        producer: "kiln-cli test".into(),
    };
    std::fs::write(path, kiln::internals::onnx::export_model_bytes(&model).unwrap()).unwrap();
}

#[test]
fn failures_on_synthesized_inputs_name_the_dims_set_to_one() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-dims-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("reshape.onnx");
    reshape_model(&model);
    let m = model.to_str().unwrap();
    for args in [
        vec!["bench", m, "-n", "1", "--warmup", "0"],
        vec!["bench", m, "-n", "1", "--warmup", "1", "--io", "device"],
        vec!["inspect", m, "--device", "cpu"],
    ] {
        let (ok, _, err) = kiln(&args);
        assert!(!ok, "{args:?} should fail with N = 1");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("symbolic dims to 1: N (input 'x')") && err.contains("--dim N=VALUE"),
            "{args:?}: {err}"
        );
        let mut fixed = args.clone();
        fixed.extend(["--dim", "N=2"]);
        let (ok, _, err) = kiln(&fixed);
        assert!(ok, "{fixed:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln optimize` killed mid-write by the file-size limit (SIGXFSZ, as a full disk or a crash
/// would stop it) leaves the previous output whole, not a truncated model.
#[test]
#[cfg(unix)]
fn an_interrupted_write_never_leaves_a_truncated_output() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.onnx");
    std::fs::write(&out, b"the previous output").unwrap();
    let model = root().join("models/light/squeezenet.onnx");
    // 512-byte blocks: 8 KiB, less than the optimized SqueezeNet.
    let script = format!(
        "ulimit -f 16; exec \"$0\" optimize '{}' '{}'",
        model.display(),
        out.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_kiln")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runs");
    assert!(!status.success(), "the write should have been stopped");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous output");
    // Without the limit the output is replaced by a whole model.
    let (ok, _, err) = kiln(&["optimize", &model.display().to_string(), &out.display().to_string()]);
    assert!(ok, "{err}");
    let written = std::fs::read(&out).unwrap();
    assert!(written.len() > 8192);
    let (ok, text, err) = kiln(&["inspect", &out.display().to_string()]);
    assert!(ok && text.contains("Conv"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

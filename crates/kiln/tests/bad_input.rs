//! Malformed models and inputs get clear errors, never a panic, hang or giant allocation.

mod common;

use common::*;
use kiln::internals::onnx::proto;
use kiln::{Session, TensorData};

fn build(m: &proto::ModelProto) -> kiln::Result<Session> {
    Session::builder().build_from_bytes(&bytes(m))
}

fn err_of(m: &proto::ModelProto) -> String {
    match build(m) {
        Ok(_) => panic!("model should have been rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn garbage_empty_and_truncated_files() {
    for data in [&b""[..], b"\xff\xff\xff\xff garbage", b"\x0a\x80"] {
        let e = Session::builder()
            .build_from_bytes(data)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("ONNX") || e.contains("empty"), "{e}");
    }
    let good = bytes(&small_model());
    for cut in [1, good.len() / 3, good.len() - 1] {
        let r = Session::builder().build_from_bytes(&good[..cut]);
        assert!(r.is_err(), "truncated at {cut} of {} should fail", good.len());
    }
}

#[test]
fn missing_file_names_the_path() {
    let e = Session::builder()
        .build_from_file("/nonexistent/model.onnx")
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("/nonexistent/model.onnx"), "{e}");
}

#[test]
fn dangling_input_names_node_and_value() {
    let mut m = small_model();
    m.graph.as_mut().unwrap().node[1].input[0] = "nowhere".into();
    let e = err_of(&m);
    assert!(e.contains("nowhere") && e.contains("relu") && e.contains("Relu"), "{e}");
}

#[test]
fn cycle_is_detected() {
    let m = model(
        vec![node("Relu", "a", &["x2"], &["x1"]), node("Relu", "b", &["x1"], &["x2"])],
        vec![value("x", 1, &[1])],
        vec![value("x2", 1, &[1])],
        vec![],
    );
    let e = err_of(&m);
    assert!(e.contains("cycle"), "{e}");
}

#[test]
fn wrong_initializer_size() {
    let mut m = small_model();
    m.graph.as_mut().unwrap().initializer[0].float_data = vec![1.0, 2.0];
    let e = err_of(&m);
    assert!(e.contains("'b'") && e.contains("need 16 bytes"), "{e}");
}

#[test]
fn unknown_op_lists_op_domain_and_node() {
    let mut m = small_model();
    let g = m.graph.as_mut().unwrap();
    g.node[1].op_type = Some("FancyOp".into());
    g.node[1].domain = Some("com.example".into());
    let e = err_of(&m);
    assert!(e.contains("com.example::FancyOp") && e.contains("relu"), "{e}");
}

#[test]
fn huge_declared_initializer_dims() {
    let mut m = small_model();
    m.graph.as_mut().unwrap().initializer[0].dims = vec![1 << 40, 1 << 30];
    let e = err_of(&m);
    assert!(e.contains("max_tensor_bytes") && e.contains("'b'"), "{e}");
}

#[test]
fn huge_runtime_shape_is_refused_before_allocating() {
    let m = model(
        vec![node("ConstantOfShape", "cos", &["shape"], &["y"])],
        vec![value("shape", 7, &[3])],
        vec![value("y", 1, &[-1, -1, -1])],
        vec![],
    );
    let s = build(&m).expect("builds");
    let shape = TensorData::from_values("shape", vec![3], &[1i64 << 20, 1 << 20, 1 << 20]).unwrap();
    let e = s.run(vec![("shape".into(), shape)]).expect_err("must fail").to_string();
    assert!(e.contains("exceeds the limit"), "{e}");
    let neg = TensorData::from_values("shape", vec![3], &[2i64, -1, 2]).unwrap();
    assert!(s.run(vec![("shape".into(), neg)]).is_err());
}

#[test]
fn external_data_escaping_the_model_dir_is_rejected() {
    let dir = std::env::temp_dir().join(format!("kiln-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = small_model();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.float_data.clear();
    t.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
    t.external_data = vec![proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some("../../etc/passwd".into()),
    }];
    let path = dir.join("model.onnx");
    std::fs::write(&path, bytes(&m)).unwrap();
    let e = Session::builder()
        .build_from_file(&path)
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("escapes the model directory"), "{e}");

    // A well-formed external file next to the model loads.
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.external_data[0].value = Some("weights.bin".into());
    let raw: Vec<u8> = [0.5f32, -1.0, 0.0, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("weights.bin"), raw).unwrap();
    std::fs::write(&path, bytes(&m)).unwrap();
    let s = Session::builder().build_from_file(&path).expect("external data loads");
    let x = TensorData::from_values("x", vec![1, 4], &[1.0f32, 1.0, 1.0, 1.0]).unwrap();
    let y = s.run(vec![("x".into(), x)]).unwrap();
    assert_eq!(y[0].values::<f32>().unwrap(), small_model_ref(&[1.0, 1.0, 1.0, 1.0]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn input_errors_are_clear() {
    let s = build(&small_model()).unwrap();
    let e = s.run(vec![]).err().unwrap().to_string();
    assert!(e.contains("'x'") && e.contains("missing"), "{e}");
    let wrong_dtype = TensorData::from_values("x", vec![1, 4], &[1i64, 2, 3, 4]).unwrap();
    let e = s.run(vec![("x".into(), wrong_dtype)]).err().unwrap().to_string();
    assert!(e.contains("expected dtype float32, got int64"), "{e}");
    let wrong_shape = TensorData::from_values("x", vec![1, 3], &[1f32, 2., 3.]).unwrap();
    let e = s.run(vec![("x".into(), wrong_shape)]).err().unwrap().to_string();
    assert!(e.contains("does not fit the declared shape"), "{e}");
    let x = TensorData::from_values("x", vec![1, 4], &[1f32, 2., 3., 4.]).unwrap();
    let e = s
        .run(vec![("x".into(), x.clone()), ("zz".into(), x)])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such input"), "{e}");
}

#[test]
fn runtime_shape_errors_name_the_node() {
    let m = model(
        vec![node("Add", "the_add", &["a", "b"], &["y"])],
        vec![value("a", 1, &[-1]), value("b", 1, &[-1])],
        vec![value("y", 1, &[-1])],
        vec![],
    );
    let s = build(&m).unwrap();
    let a = TensorData::from_values("a", vec![3], &[1f32, 2., 3.]).unwrap();
    let b = TensorData::from_values("b", vec![2], &[1f32, 2.]).unwrap();
    let e = s.run(vec![("a".into(), a), ("b".into(), b)]).err().unwrap().to_string();
    assert!(e.contains("the_add") && e.contains("Add"), "{e}");
}

#[test]
fn cpu_sessions_have_no_device_pool() {
    let session = kiln::Session::builder()
        .device_memory_limit(1 << 20)
        .build_from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/light/squeezenet.onnx"
        ))
        .expect("builds on the CPU; the limit only applies to CUDA devices");
    assert_eq!(session.device_memory_stats().expect("stats"), None);
}

#[test]
fn attention_over_the_tensor_limit_is_refused_before_allocating_scores() {
    let mut m = model(
        vec![node("Attention", "attn", &["q", "k", "v"], &["y"])],
        vec![
            value("q", 1, &[1, 1, -1, 8]),
            value("k", 1, &[1, 1, -1, 8]),
            value("v", 1, &[1, 1, -1, 8]),
        ],
        vec![value("y", 1, &[1, 1, -1, 8])],
        vec![],
    );
    m.opset_import[0].version = Some(23);
    let options = kiln::RunOptions {
        max_tensor_bytes: 64 << 20,
        ..Default::default()
    };
    let s = Session::builder()
        .run_options(options)
        .build_from_bytes(&bytes(&m))
        .expect("builds");
    let feed = |name: &str, len: usize| {
        let vals: Vec<f32> = (0..len * 8).map(|i| (i % 7) as f32 * 0.1).collect();
        (
            name.to_string(),
            TensorData::from_values(name, vec![1, 1, len, 8], &vals).unwrap(),
        )
    };
    // 8192 x 8192 scores are 256 MiB: over the 64 MiB limit.
    let e = s
        .run(vec![feed("q", 8192), feed("k", 8192), feed("v", 8192)])
        .expect_err("must be refused")
        .to_string();
    assert!(e.contains("exceeds the limit"), "{e}");
    // A small one still runs on the same session.
    let y = s
        .run(vec![feed("q", 4), feed("k", 4), feed("v", 4)])
        .expect("small attention runs");
    assert_eq!(y[0].dims, vec![1, 1, 4, 8]);
}

#[test]
fn bound_inputs_run_like_host_inputs_and_are_checked_once() {
    let s = build(&small_model()).unwrap();
    let xs = [1.0f32, -2.0, 3.0, -4.0, 0.5, 0.25, -1.0, 8.0];
    let x = TensorData::from_values("x", vec![2, 4], &xs).unwrap();
    let bound = s.bind_inputs(vec![("x".into(), x.clone())]).unwrap();
    for _ in 0..2 {
        let outs = s.run_values(bound.clone()).unwrap();
        s.synchronize().unwrap();
        let y = outs[0].as_tensor().unwrap().to_data("y").unwrap();
        assert_eq!(y.values::<f32>().unwrap(), small_model_ref(&xs));
    }
    assert_eq!(
        s.run(vec![("x".into(), x)]).unwrap()[0].values::<f32>().unwrap(),
        small_model_ref(&xs)
    );
    // The same checks as `run`: wrong dtype, unknown name, missing input.
    let wrong = TensorData::from_values("x", vec![2, 4], &[1i64; 8]).unwrap();
    assert!(s.bind_inputs(vec![("x".into(), wrong)]).is_err());
    let e = s
        .bind_inputs(vec![(
            "nope".into(),
            TensorData::from_values("nope", vec![1], &[1.0f32]).unwrap(),
        )])
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") || e.contains("no such input"), "{e}");
    assert!(s.bind_inputs(vec![]).is_err());
}

fn limit_err(m: &proto::ModelProto, limits: kiln::LoadLimits) -> String {
    match Session::builder().load_limits(limits).build_from_bytes(&bytes(m)) {
        Ok(_) => panic!("the model should be over a limit"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn load_limits_are_checked_and_named() {
    let d = kiln::LoadLimits::default();
    let m = small_model();
    // Under the defaults (and at exactly the limits) it loads.
    let exact = kiln::LoadLimits {
        max_file_bytes: bytes(&m).len() as u64,
        max_nodes: 3,
        max_nesting: 0,
        max_tensor_bytes: 16,
    };
    Session::builder()
        .load_limits(exact)
        .build_from_bytes(&bytes(&m))
        .expect("at the limits");
    let e = limit_err(
        &m,
        kiln::LoadLimits {
            max_file_bytes: 10,
            ..d
        },
    );
    assert!(e.contains("max_file_bytes") && e.contains("limit is 10"), "{e}");
    let e = limit_err(&m, kiln::LoadLimits { max_nodes: 2, ..d });
    assert!(e.contains("max_nodes") && e.contains("is 3"), "{e}");
    let e = limit_err(
        &m,
        kiln::LoadLimits {
            max_tensor_bytes: 8,
            ..d
        },
    );
    assert!(e.contains("max_tensor_bytes") && e.contains("'b'"), "{e}");
    // The file-size limit is checked before the file is read.
    let dir = std::env::temp_dir().join(format!("kiln-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.onnx");
    std::fs::write(&path, bytes(&m)).unwrap();
    let e = Session::builder()
        .load_limits(kiln::LoadLimits {
            max_file_bytes: 10,
            ..d
        })
        .build_from_file(&path)
        .err()
        .expect("over the limit")
        .to_string();
    assert!(e.contains("max_file_bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An If whose then-branch holds an If whose then-branch holds an If ..., `depth` levels; every
/// else-branch is one Identity.
fn nested_ifs(depth: usize) -> proto::ModelProto {
    fn branch(level: usize) -> proto::GraphProto {
        let node = if level == 0 {
            node("Identity", &format!("id{level}"), &["x"], &["y"])
        } else {
            let mut n = node("If", &format!("if{level}"), &["c"], &["y"]);
            for (name, g) in [("then_branch", branch(level - 1)), ("else_branch", branch(0))] {
                n.attribute.push(proto::AttributeProto {
                    name: Some(name.into()),
                    r#type: Some(proto::attribute_proto::AttributeType::Graph as i32),
                    g: Some(g),
                    ..Default::default()
                });
            }
            n
        };
        proto::GraphProto {
            name: Some(format!("b{level}")),
            node: vec![node],
            output: vec![value("y", 1, &[4])],
            ..Default::default()
        }
    }
    let g = branch(depth);
    model(
        g.node,
        vec![value("c", 9, &[]), value("x", 1, &[4])],
        vec![value("y", 1, &[4])],
        vec![],
    )
}

#[test]
fn subgraph_nesting_and_node_count_limits() {
    let d = kiln::LoadLimits::default();
    let m = nested_ifs(4);
    Session::builder().build_from_bytes(&bytes(&m)).expect("4 levels load");
    let e = limit_err(&m, kiln::LoadLimits { max_nesting: 3, ..d });
    assert!(e.contains("max_nesting") && e.contains("nesting depth is 4"), "{e}");
    // Nodes in every branch count: 4 Ifs, 4 else-branch Identities and the innermost one.
    let e = limit_err(&m, kiln::LoadLimits { max_nodes: 8, ..d });
    assert!(e.contains("max_nodes"), "{e}");
    Session::builder()
        .load_limits(kiln::LoadLimits { max_nodes: 9, ..d })
        .build_from_bytes(&bytes(&m))
        .expect("9 nodes fit");
    // Deeper than the default is refused with the limit named, not a stack overflow.
    let e = err_of(&nested_ifs(40));
    assert!(e.contains("max_nesting") || e.contains("recursion"), "{e}");
}

/// Model-local functions where each calls the next one twice: 2^levels nodes once inlined.
#[test]
fn function_inlining_blow_up_stops_at_the_node_limit() {
    let levels = 40;
    let mut m = model(
        vec![{
            let mut n = node("F0", "call", &["x"], &["y"]);
            n.domain = Some("local".into());
            n
        }],
        vec![value("x", 1, &[4])],
        vec![value("y", 1, &[4])],
        vec![],
    );
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("local".into()),
        version: Some(1),
    });
    for i in 0..levels {
        let body = if i + 1 == levels {
            vec![node("Relu", "r", &["a"], &["b"])]
        } else {
            let mut n1 = node(&format!("F{}", i + 1), "c1", &["a"], &["t"]);
            n1.domain = Some("local".into());
            let mut n2 = node(&format!("F{}", i + 1), "c2", &["t"], &["b"]);
            n2.domain = Some("local".into());
            vec![n1, n2]
        };
        m.functions.push(proto::FunctionProto {
            name: Some(format!("F{i}")),
            domain: Some("local".into()),
            input: vec!["a".into()],
            output: vec!["b".into()],
            node: body,
            opset_import: m.opset_import.clone(),
            ..Default::default()
        });
    }
    let e = limit_err(
        &m,
        kiln::LoadLimits {
            max_nodes: 10_000,
            max_nesting: 64,
            ..kiln::LoadLimits::default()
        },
    );
    assert!(e.contains("max_nodes"), "{e}");
}

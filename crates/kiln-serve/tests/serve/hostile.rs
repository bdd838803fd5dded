//! Hostile requests never take a model down: a mobile-style CNN with dynamic H and W gets
//! degenerate images (1x1, zero-sized dims, values at f32 max, shapes that do not match their
//! data) and a model with an injected panicking op gets the value that triggers it. Every request
//! is answered (a JSON error where it fails), valid requests to the same models are served within
//! a second afterwards, and readiness tells the truth throughout.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln::internals::onnx::proto;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

fn dim(d: &str) -> proto::tensor_shape_proto::Dimension {
    let value = match d.parse::<i64>() {
        Ok(n) => proto::tensor_shape_proto::dimension::Value::DimValue(n),
        Err(_) => proto::tensor_shape_proto::dimension::Value::DimParam(d.into()),
    };
    proto::tensor_shape_proto::Dimension {
        value: Some(value),
        ..Default::default()
    }
}

fn value(name: &str, dims: &[&str]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(proto::TensorShapeProto {
                    dim: dims.iter().map(|d| dim(d)).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<proto::AttributeProto>) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{output}_node")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// Deterministic weights with a spread (so outputs differ per input).
fn weights(name: &str, dims: &[i64], seed: usize) -> proto::TensorProto {
    let n: i64 = dims.iter().product();
    proto::TensorProto {
        name: Some(name.into()),
        data_type: Some(1),
        dims: dims.to_vec(),
        float_data: (0..n as usize)
            .map(|i| (((i * 7919 + seed * 104_729) % 211) as f32 - 105.0) / 150.0)
            .collect(),
        ..Default::default()
    }
}

fn write_model(repo: &Path, name: &str, m: proto::ModelProto, config: &str) {
    let dir = repo.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), m.encode_to_vec()).unwrap();
    std::fs::write(repo.join(name).join("config.toml"), config).unwrap();
}

fn model(
    nodes: Vec<proto::NodeProto>,
    inputs: Vec<proto::ValueInfoProto>,
    outputs: Vec<proto::ValueInfoProto>,
    inits: Vec<proto::TensorProto>,
    extra_domain: Option<&str>,
) -> proto::ModelProto {
    let mut opsets = vec![proto::OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(17),
    }];
    if let Some(d) = extra_domain {
        opsets.push(proto::OperatorSetIdProto {
            domain: Some(d.into()),
            version: Some(1),
        });
    }
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: opsets,
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Stem conv (stride 2) + HardSwish, depthwise 5x5 conv (pad 2) + Relu, pointwise conv, global
/// average pool, classifier, softmax: the mobile CNN shape, over any H and W.
fn mobile_cnn() -> proto::ModelProto {
    let conv = |inputs: &[&str], out: &str, k: i64, group: i64, stride: i64| {
        let p = k / 2;
        node(
            "Conv",
            inputs,
            out,
            vec![
                ints("kernel_shape", &[k, k]),
                ints("pads", &[p, p, p, p]),
                ints("strides", &[stride, stride]),
                int("group", group),
            ],
        )
    };
    model(
        vec![
            conv(&["image", "w0", "b0"], "c0", 3, 1, 2),
            node("HardSwish", &["c0"], "a0", vec![]),
            conv(&["a0", "w1", "b1"], "c1", 5, 8, 1),
            node("Relu", &["c1"], "a1", vec![]),
            conv(&["a1", "w2", "b2"], "c2", 1, 1, 1),
            node("GlobalAveragePool", &["c2"], "gap", vec![]),
            node("Flatten", &["gap"], "flat", vec![int("axis", 1)]),
            node("Gemm", &["flat", "wf", "bf"], "logits", vec![int("transB", 1)]),
            node("Softmax", &["logits"], "probabilities", vec![int("axis", 1)]),
        ],
        vec![value("image", &["N", "3", "H", "W"])],
        vec![value("probabilities", &["N", "5"])],
        vec![
            weights("w0", &[8, 3, 3, 3], 1),
            weights("b0", &[8], 2),
            weights("w1", &[8, 1, 5, 5], 3),
            weights("b1", &[8], 4),
            weights("w2", &[16, 8, 1, 1], 5),
            weights("b2", &[16], 6),
            weights("wf", &[5, 16], 7),
            weights("bf", &[5], 8),
        ],
        None,
    )
}

/// `ai.kiln.testing::Fault` (panics inside a rayon task when its input holds 13.0) then Relu.
fn faulty() -> proto::ModelProto {
    let mut fault = node("Fault", &["x"], "f", vec![]);
    fault.domain = Some("ai.kiln.testing".into());
    model(
        vec![fault, node("Relu", &["f"], "y", vec![])],
        vec![value("x", &["N", "4"])],
        vec![value("y", &["N", "4"])],
        vec![],
        Some("ai.kiln.testing"),
    )
}

const CNN_CONFIG: &str = "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 2000\n";
/// A long queue delay so concurrent requests share a batch with the panicking one.
const FAULTY_CONFIG: &str =
    "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 50000\npreferred_batch_sizes = [4]\n";

fn infer_body(name: &str, shape: &[usize], data: Value) -> Value {
    json!({"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}]})
}

fn image(shape: &[usize], fill: impl Fn(usize) -> f32) -> Value {
    let n: usize = shape.iter().product();
    json!((0..n).map(fill).collect::<Vec<f32>>())
}

/// Posts and requires an answer within 10 s: 200, or an error status with a JSON `error`.
async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (StatusCode, Value) {
    let r = tokio::time::timeout(Duration::from_secs(10), c.post(url).json(body).send())
        .await
        .unwrap_or_else(|_| panic!("no answer within 10 s for {body}"))
        .expect("request sent");
    let status = r.status();
    let text = r.text().await.expect("body");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"));
    if status != StatusCode::OK {
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{status}: {v}");
    }
    (status, v)
}

async fn get_status(c: &reqwest::Client, url: &str) -> StatusCode {
    c.get(url).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_never_take_a_model_down() {
    kiln::internals::runtime::ops::fault::enable_fault_injection();
    let repo = temp_repo(&[]);
    write_model(&repo, "cnn", mobile_cnn(), CNN_CONFIG);
    write_model(&repo, "faulty", faulty(), FAULTY_CONFIG);
    // The same CNN under tight limits: over the node limit it does not load; under a small
    // run-time tensor limit, large images fail with an error and small ones are served.
    write_model(
        &repo,
        "too_big",
        mobile_cnn(),
        &format!("{CNN_CONFIG}[limits]\nmax_nodes = 5\n"),
    );
    write_model(
        &repo,
        "tight",
        mobile_cnn(),
        &format!("{CNN_CONFIG}[limits]\nmax_tensor_bytes = 65536\n"),
    );
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let index: Value = c
        .post(url(&server, "/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let too_big = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "too_big")
        .expect("listed");
    assert_eq!(too_big["state"], "UNAVAILABLE", "{index}");
    assert!(too_big["reason"].as_str().unwrap().contains("max_nodes"), "{index}");
    let tight = url(&server, "/v2/models/tight/infer");
    let large = infer_body("image", &[1, 3, 128, 128], image(&[1, 3, 128, 128], |i| (i % 5) as f32));
    let (status, v) = post(&c, &tight, &large).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(v["error"].as_str().unwrap().contains("65536"), "{v}");
    let small = infer_body("image", &[1, 3, 8, 8], image(&[1, 3, 8, 8], |i| (i % 5) as f32));
    assert_eq!(post(&c, &tight, &small).await.0, 200);
    let cnn = url(&server, "/v2/models/cnn/infer");
    let faulty_url = url(&server, "/v2/models/faulty/infer");
    let valid = infer_body(
        "image",
        &[1, 3, 16, 12],
        image(&[1, 3, 16, 12], |i| (i % 17) as f32 / 17.0),
    );
    let (s, reference) = post(&c, &cnn, &valid).await;
    assert_eq!(s, 200, "{reference}");

    // Degenerate images and malformed requests: each gets an answer (some are valid: a 1x1
    // image is a legal input of this model and must be served, not crash it).
    let big = f32::MAX;
    let hostile = vec![
        infer_body("image", &[1, 3, 1, 1], image(&[1, 3, 1, 1], |_| 0.5)),
        infer_body("image", &[1, 3, 1, 7], image(&[1, 3, 1, 7], |i| i as f32)),
        infer_body("image", &[2, 3, 2, 1], image(&[2, 3, 2, 1], |_| -1.0)),
        infer_body("image", &[1, 3, 0, 5], json!([])),
        infer_body("image", &[0, 3, 8, 8], json!([])),
        infer_body("image", &[1, 3, 8, 8], image(&[1, 3, 8, 8], |_| big)),
        infer_body(
            "image",
            &[1, 3, 8, 8],
            image(&[1, 3, 8, 8], |i| if i % 2 == 0 { big } else { -big }),
        ),
        infer_body("image", &[1, 3, 100_000, 100_000], image(&[1, 3, 2, 2], |_| 1.0)),
        infer_body("image", &[1, 3, 4], image(&[1, 3, 4], |_| 1.0)),
        infer_body("image", &[1, 2, 4, 4], image(&[1, 2, 4, 4], |_| 1.0)),
        infer_body("image", &[9, 3, 2, 2], image(&[9, 3, 2, 2], |_| 1.0)),
        infer_body("nope", &[1, 3, 2, 2], image(&[1, 3, 2, 2], |_| 1.0)),
        json!({"inputs": [{"name": "image", "datatype": "INT64", "shape": [1, 3, 2, 2], "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}]}),
        json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": "not a list"}]}),
        json!({"inputs": []}),
        json!({"bogus": true}),
    ];
    let mut served = 0;
    for body in &hostile {
        let (status, v) = post(&c, &cnn, body).await;
        if status == StatusCode::OK {
            served += 1;
            let p = &v["outputs"][0]["data"];
            assert!(
                p.as_array()
                    .is_some_and(|a| !a.is_empty() || body["inputs"][0]["shape"][0] == 0),
                "{v}"
            );
        } else {
            assert!(status.is_client_error() || status.is_server_error(), "{status}");
        }
    }
    assert!(
        served >= 3,
        "the 1x1, width-1 and height-2 width-1 images are valid inputs"
    );
    // JSON nested 100,000 deep (and a deep `data` list): refused by the parser's depth limit with
    // a 400, no stack overflow.
    for (body, says) in [
        (
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            "invalid type",
        ),
        (
            format!(
                "{{\"inputs\": [{{\"name\": \"image\", \"datatype\": \"FP32\", \"shape\": [1], \"data\": {}1{}}}]}}",
                "[".repeat(50_000),
                "]".repeat(50_000)
            ),
            "recursion",
        ),
    ] {
        let r = c
            .post(&cnn)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().is_some_and(|e| e.contains(says)), "{v}");
    }

    // The injected panic: the request that triggers it gets a 500 naming the node; the requests
    // batched with it are rerun on their own and served.
    let trigger = infer_body("x", &[1, 4], json!([1.0, 13.0, 2.0, 3.0]));
    let mates: Vec<Value> = (0..3)
        .map(|i| infer_body("x", &[1, 4], json!([i as f32, -1.0, 2.5, 4.0])))
        .collect();
    let spawn = |body: Value| {
        let (c, u) = (c.clone(), faulty_url.clone());
        tokio::spawn(async move { post(&c, &u, &body).await })
    };
    let bad = spawn(trigger.clone());
    let mate_tasks: Vec<_> = mates.iter().cloned().map(spawn).collect();
    let bad = bad.await.unwrap();
    let mut mate_answers = Vec::new();
    for t in mate_tasks {
        mate_answers.push(t.await.unwrap());
    }
    assert_eq!(bad.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", bad.1);
    let msg = bad.1["error"].as_str().unwrap();
    assert!(
        msg.contains("injected fault") && msg.contains("f_node") && msg.contains("Fault"),
        "{msg}"
    );
    for (i, (status, v)) in mate_answers.into_iter().enumerate() {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["outputs"][0]["data"], json!([i as f32, 0.0, 2.5, 4.0]));
    }
    for _ in 0..5 {
        let (status, _) = post(&c, &faulty_url, &trigger).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    // Afterwards: valid requests are served within a second, with the same answer as before.
    for (u, body) in [(&cnn, &valid), (&faulty_url, &mates[1])] {
        let t = Instant::now();
        let (status, v) = post(&c, u, body).await;
        assert_eq!(status, 200, "{v}");
        assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
        if u == &cnn {
            assert_eq!(v["outputs"], reference["outputs"]);
        }
    }
    // Readiness tells the truth: everything is still serving.
    assert_eq!(get_status(&c, &url(&server, "/v2/health/ready")).await, 200);
    assert_eq!(get_status(&c, &url(&server, "/v2/models/cnn/ready")).await, 200);
    assert_eq!(get_status(&c, &url(&server, "/v2/models/faulty/ready")).await, 200);
    let text = metrics_text(&server).await;
    let panics = metric(&text, "kiln_model_panics_total{model=\"faulty\",version=\"1\"}").unwrap_or(0.0);
    assert!(panics >= 6.0, "every triggered panic is counted: {panics}\n{text}");
    assert_eq!(
        metric(&text, "kiln_model_panics_total{model=\"cnn\",version=\"1\"}").unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        metric(&text, "kiln_model_version_ready{model=\"faulty\",version=\"1\"}"),
        Some(1.0)
    );
    let _ = std::fs::remove_dir_all(&repo);
}

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

fn infer_body(rows: usize, seed: usize) -> Value {
    json!({"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": mlp_input(rows, seed)}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_batching_stacks_and_splits_exactly() {
    let repo = temp_repo(&["mlp"]);
    write_config(
        &repo,
        "mlp",
        "max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 1000000\nmax_queue_size = 64\n",
    );
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    // 8 concurrent requests of 1 or 2 rows: 12 rows in all, under max_batch_size.
    let reqs: Vec<(usize, usize)> = (0..8).map(|i| (1 + i % 2, i)).collect();
    let futures = reqs.iter().map(|&(rows, seed)| {
        let c = c.clone();
        let u = url(&server, "/v2/models/mlp/infer");
        async move {
            c.post(u)
                .json(&infer_body(rows, seed))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    let answers = futures_join_all(futures).await;
    for (&(rows, seed), v) in reqs.iter().zip(&answers) {
        let want = reference(&repo, "mlp", 1, vec![mlp_tensor(rows, seed)]);
        assert_eq!(v["outputs"][0]["shape"], json!([rows, 3]));
        assert_eq!(
            f32s(&v["outputs"][0]["data"]),
            want[0].values::<f32>().unwrap(),
            "request {seed}"
        );
        assert_eq!(
            f32s(&v["outputs"][1]["data"]),
            want[1].values::<f32>().unwrap(),
            "request {seed}"
        );
    }
    let text = metrics_text(&server).await;
    let s = |name: &str| metric(&text, &format!("{name}{{model=\"mlp\",version=\"1\"}}")).unwrap();
    assert_eq!(s("nv_inference_request_success"), 8.0);
    assert_eq!(s("nv_inference_count"), 12.0);
    let execs = s("nv_inference_exec_count");
    assert!(
        execs < 8.0,
        "8 concurrent requests ran in {execs} executions: not batched"
    );
    server.shutdown().await.unwrap();
}

/// `join_all` without pulling in the futures crate: spawn each and await in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_at_once_with_flat_memory() {
    let repo = temp_repo(&["mlp"]);
    // The worker holds a 1-row request for 8 s waiting for batch mates; 4-row requests do not
    // fit beside it and stay queued, so the queue (2) fills deterministically.
    write_config(
        &repo,
        "mlp",
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 8000000\nmax_queue_size = 2\n",
    );
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let u = url(&server, "/v2/models/mlp/infer");
    let send = |rows: usize, seed: usize| {
        let c = c.clone();
        let u = u.clone();
        tokio::spawn(async move {
            let r = c.post(u).json(&infer_body(rows, seed)).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        })
    };
    // Pending counts requests not yet executing (queued or held for a batch). The 1-row request
    // goes first, so it is the one the worker holds.
    let pending = "nv_inference_pending_request_count{model=\"mlp\",version=\"1\"}";
    let pending_is = |n: f64| {
        let server = &server;
        async move { wait_until(10, || async { metric(&metrics_text(server).await, pending) == Some(n) }).await }
    };
    let held = send(1, 1);
    assert!(pending_is(1.0).await);
    let queued: Vec<_> = (0..2).map(|i| send(4, 10 + i)).collect();
    assert!(pending_is(3.0).await, "the queue never filled");
    let rss = |text: &str| metric(text, "process_resident_memory_bytes").unwrap();
    let before = rss(&metrics_text(&server).await);
    // Refused requests cost nothing that stays: 200 of them, 8 at a time.
    let mut refused = 0;
    for round in 0..25 {
        let batch: Vec<_> = (0..8).map(|i| send(4, 100 + round * 8 + i)).collect();
        for h in batch {
            let (status, body) = h.await.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(body["error"].as_str().unwrap().contains("queue is full"));
            refused += 1;
        }
    }
    assert_eq!(refused, 200);
    let after = rss(&metrics_text(&server).await);
    assert!(
        after - before < 16.0 * 1024.0 * 1024.0,
        "RSS grew by {} bytes over 200 refused requests",
        after - before
    );
    // Everything that was admitted completes correctly.
    let (status, v) = held.await.unwrap();
    assert_eq!(status, 200);
    let want = reference(&repo, "mlp", 1, vec![mlp_tensor(1, 1)]);
    assert_eq!(f32s(&v["outputs"][0]["data"]), want[0].values::<f32>().unwrap());
    for (i, h) in queued.into_iter().enumerate() {
        let (status, v) = h.await.unwrap();
        assert_eq!(status, 200);
        let want = reference(&repo, "mlp", 1, vec![mlp_tensor(4, 10 + i)]);
        assert_eq!(f32s(&v["outputs"][1]["data"]), want[1].values::<f32>().unwrap());
    }
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(
            &text,
            "nv_inference_request_failure{model=\"mlp\",reason=\"REJECTED\",version=\"1\"}"
        ),
        Some(200.0)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let repo = temp_repo(&["mlp"]);
    // A 1-row request is held for batch mates; a 4-row one waits in the queue behind it.
    write_config(
        &repo,
        "mlp",
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 1500000\n",
    );
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let u = url(&server, "/v2/models/mlp/infer");
    let send = |rows: usize| {
        let (c, u) = (c.clone(), u.clone());
        tokio::spawn(async move { c.post(u).json(&infer_body(rows, rows)).send().await.unwrap() })
    };
    let pending = "nv_inference_pending_request_count{model=\"mlp\",version=\"1\"}";
    let pending_is = |n: f64| {
        let server = &server;
        async move { wait_until(10, || async { metric(&metrics_text(server).await, pending) == Some(n) }).await }
    };
    let first = send(1);
    assert!(pending_is(1.0).await);
    let second = send(4);
    assert!(pending_is(2.0).await, "both requests in flight");
    server.shutdown().await.unwrap();
    for (h, rows) in [(first, 1), (second, 4)] {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let want = reference(&repo, "mlp", 1, vec![mlp_tensor(rows, rows)]);
        assert_eq!(f32s(&v["outputs"][0]["data"]), want[0].values::<f32>().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_timeout_get_504() {
    let repo = temp_repo(&["mlp"]);
    // The batcher would hold a lone request 5 s for batch mates; its 100 ms timeout ends the wait.
    write_config(
        &repo,
        "mlp",
        "max_batch_size = 4\nrequest_timeout_ms = 100\n[dynamic_batching]\nmax_queue_delay_us = 5000000\n",
    );
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let r = c
        .post(url(&server, "/v2/models/mlp/infer"))
        .json(&infer_body(1, 0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("timed out"), "{v}");
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(
            &text,
            "nv_inference_request_failure{model=\"mlp\",reason=\"BACKEND\",version=\"1\"}"
        ),
        Some(1.0)
    );
    server.shutdown().await.unwrap();
}

/// `y = Loop(trips) { v = Tanh(v @ v) }` on a 64x64 `v`, as `<repo>/spin/1/model.onnx`: a
/// million trips run for a minute or more, one trip for a moment.
fn write_spin_model(repo: &std::path::Path) {
    use kiln::internals::onnx::proto;
    use prost::Message;
    let tensor_type = |elem: i32, dims: &[i64]| proto::TypeProto {
        value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
            elem_type: Some(elem),
            shape: Some(proto::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| proto::tensor_shape_proto::Dimension {
                        value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(d)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    let value = |name: &str, elem: i32, dims: &[i64]| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(elem, dims)),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], outputs: &[&str]| proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{}", outputs[0])),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let body = proto::GraphProto {
        name: Some("body".into()),
        node: vec![
            node("Identity", &["cond_in"], &["cond_out"]),
            node("MatMul", &["v_in", "v_in"], &["vv"]),
            node("Tanh", &["vv"], &["v_out"]),
        ],
        input: vec![
            value("iter", 7, &[]),
            value("cond_in", 9, &[]),
            value("v_in", 1, &[64, 64]),
        ],
        output: vec![value("cond_out", 9, &[]), value("v_out", 1, &[64, 64])],
        ..Default::default()
    };
    let mut lp = node("Loop", &["trips", "", "v"], &["y"]);
    lp.attribute.push(proto::AttributeProto {
        name: Some("body".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Graph as i32),
        g: Some(body),
        ..Default::default()
    });
    let model = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            name: Some("spin".into()),
            node: vec![lp],
            input: vec![value("trips", 7, &[1]), value("v", 1, &[64, 64])],
            output: vec![value("y", 1, &[64, 64])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = repo.join("spin").join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), model.encode_to_vec()).unwrap();
    write_config(repo, "spin", "max_batch_size = 0\nrequest_timeout_ms = 300\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_stops_a_running_model() {
    let repo = temp_repo(&[]);
    write_spin_model(&repo);
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let body = |trips: i64| {
        json!({"inputs": [{"name": "trips", "shape": [1], "datatype": "INT64", "data": [trips]},
                          {"name": "v", "shape": [64, 64], "datatype": "FP32", "data": vec![0.01f32; 64 * 64]}]})
    };
    let infer = |trips: i64| c.post(url(&server, "/v2/models/spin/infer")).json(&body(trips)).send();
    let r = infer(1_000_000).await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("timed out"), "{v}");
    // The long run was stopped at its deadline, so the model's worker is free: a one-trip
    // request runs now. (Had the first run gone on, this one would wait behind it and time out.)
    let r = infer(1).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let y = f32s(&v["outputs"][0]["data"]);
    let want = (64.0f32 * 0.01 * 0.01).tanh();
    assert!(
        y.len() == 64 * 64 && y.iter().all(|&e| (e - want).abs() < 1e-6),
        "{:?}",
        &y[..4]
    );
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(
            &text,
            "nv_inference_request_failure{model=\"spin\",reason=\"BACKEND\",version=\"1\"}"
        ),
        Some(1.0)
    );
    server.shutdown().await.unwrap();
}

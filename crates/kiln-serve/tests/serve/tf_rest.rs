use kiln::TensorData;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_rest() {
    let repo = temp_repo(&["mlp", "simple"]);
    let server = start(&repo).await;
    let c = reqwest::Client::new();

    let st: Value = c
        .get(url(&server, "/v1/models/mlp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        st,
        json!({"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]})
    );
    let md: Value = c
        .get(url(&server, "/v1/models/mlp/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sig = &md["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(sig["inputs"]["input"]["dtype"], "DT_FLOAT");
    assert_eq!(sig["inputs"]["input"]["tensor_shape"]["dim"][1]["size"], "4");
    assert_eq!(md["model_spec"]["version"], "1");

    // Row format: one instance per row; several outputs -> one object per row.
    let x = mlp_input(2, 9);
    let rows: Vec<Vec<f32>> = x.chunks(4).map(|r| r.to_vec()).collect();
    let want = reference(&repo, "mlp", 1, vec![mlp_tensor(2, 9)]);
    let logits = want[0].values::<f32>().unwrap();
    let probs = want[1].values::<f32>().unwrap();
    let v: Value = c
        .post(url(&server, "/v1/models/mlp:predict"))
        .json(&json!({ "instances": rows }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    for (r, p) in preds.iter().enumerate() {
        assert_eq!(f32s(&p["logits"]), logits[r * 3..r * 3 + 3].to_vec());
        assert_eq!(f32s(&p["probabilities"]), probs[r * 3..r * 3 + 3].to_vec());
    }
    // Named instances and an explicit version.
    let named: Vec<Value> = rows.iter().map(|r| json!({ "input": r })).collect();
    let v2: Value = c
        .post(url(&server, "/v1/models/mlp/versions/1:predict"))
        .json(&json!({ "instances": named }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v2, v);

    // Columnar format with named inputs on the two-input model.
    let a: Vec<i32> = (0..16).map(|i| i * i).collect();
    let b: Vec<i32> = (0..16).map(|i| 5 - i).collect();
    let v: Value = c
        .post(url(&server, "/v1/models/simple:predict"))
        .json(&json!({ "inputs": { "INPUT0": [a.clone()], "INPUT1": [b.clone()] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want = reference(
        &repo,
        "simple",
        1,
        vec![
            TensorData::from_values("INPUT0", vec![1, 16], &a).unwrap(),
            TensorData::from_values("INPUT1", vec![1, 16], &b).unwrap(),
        ],
    );
    let col = |name: &str| -> Vec<i32> {
        v["outputs"][name][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect()
    };
    assert_eq!(col("OUTPUT0"), want[0].values::<i32>().unwrap());
    assert_eq!(col("OUTPUT1"), want[1].values::<i32>().unwrap());

    // Columnar, single unnamed input.
    let v: Value = c
        .post(url(&server, "/v1/models/mlp:predict"))
        .json(&json!({ "inputs": rows }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(f32s(&v["outputs"]["logits"][1]), logits[3..6].to_vec());

    // Errors.
    for (path, body, status) in [
        ("/v1/models/mlp:predict", json!({"instances": [[1, 2, 3]]}), 400),
        (
            "/v1/models/mlp:predict",
            json!({"instances": [[1, 2, 3, 4], [1, 2]]}),
            400,
        ),
        ("/v1/models/mlp:predict", json!({"nothing": 1}), 400),
        ("/v1/models/mlp:classify", json!({"instances": [[1, 2, 3, 4]]}), 404),
        ("/v1/models/nope:predict", json!({"instances": [[1, 2, 3, 4]]}), 404),
        ("/v1/models/simple:predict", json!({"instances": [[1]]}), 400),
    ] {
        let r = c.post(url(&server, path)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].is_string());
    }
    server.shutdown().await.unwrap();
}

/// TF-Serving REST owns `/v1/models/{name}...` only: `GET /v1/models` (no further segment) and the
/// OpenAI paths never reach it, so an OpenAI-compatible protocol can take them (the rule is on
/// `kiln_serve::protocols::http_router`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_rest_leaves_the_openai_paths_free() {
    let repo = temp_repo(&["mlp"]);
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models/"),
    ] {
        let r = match method {
            "GET" => c.get(url(&server, path)),
            _ => c.post(url(&server, path)).json(&json!({})),
        };
        let body: Value = r.send().await.unwrap().json().await.unwrap();
        // What the TF-Serving handlers would answer: a model status, or an unrecognized path.
        assert!(body.get("model_version_status").is_none(), "{method} {path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(!error.contains("unrecognized path"), "{method} {path}: {body}");
    }
    server.shutdown().await.unwrap();
}

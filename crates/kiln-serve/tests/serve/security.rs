//! Repository control (load/unload) behind a bearer token, over HTTP and gRPC; inference,
//! health and the index stay open. No CORS headers unless configured (none are).

use kiln_serve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_serve::proto::{RepositoryModelLoadRequest, RepositoryModelUnloadRequest};
use kiln_serve::{ControlToken, Server};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_control_needs_the_token() {
    let repo = temp_repo(&["mlp"]);
    let mut cfg = config(&repo);
    cfg.control_token = ControlToken::new("let-me-in");
    let server = Server::start(cfg).await.unwrap();
    let c = reqwest::Client::new();
    let unload = url(&server, "/v2/repository/models/mlp/unload");
    let load = url(&server, "/v2/repository/models/mlp/load");
    for auth in [None, Some("Bearer wrong"), Some("let-me-in"), Some("Basic let-me-in")] {
        let mut r = c.post(&unload);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    }
    // Refused control changed nothing: the model still serves, and inference needs no token.
    let infer = url(&server, "/v2/models/mlp/infer");
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]});
    let r = c.post(&infer).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(
        c.post(url(&server, "/v2/repository/index"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // gRPC: the same rule through `authorization` metadata.
    let mut g = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc_addr.unwrap()))
        .await
        .unwrap();
    let e = g
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "mlp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(RepositoryModelUnloadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer let-me-in".parse().unwrap());
    g.repository_model_unload(req).await.expect("unloaded with the token");
    assert_eq!(
        c.post(&infer).json(&body).send().await.unwrap().status(),
        503,
        "unloaded: not ready"
    );
    // HTTP load with the token brings it back.
    let r = c
        .post(&load)
        .header("authorization", "Bearer let-me-in")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.post(&infer).json(&body).send().await.unwrap().status(), 200);
    let mut req = tonic::Request::new(RepositoryModelLoadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        g.repository_model_load(req).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&repo);
}

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

fn tls_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls")
}

/// `--tls-cert/--tls-key`: HTTPS and gRPC over TLS with a certificate from a test CA; plain
/// HTTP to the TLS port gets no answer; a bad key file fails the start with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_http_and_grpc() {
    let repo = temp_repo(&["mlp"]);
    let mut cfg = config(&repo);
    cfg.tls = Some(kiln_serve::TlsConfig {
        cert: tls_dir().join("cert.pem"),
        key: tls_dir().join("key.pem"),
    });
    let server = Server::start(cfg.clone()).await.unwrap();
    let ca = std::fs::read(tls_dir().join("ca.pem")).unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let port = server.http_addr.port();
    let https = |path: &str| format!("https://localhost:{port}{path}");
    assert_eq!(c.get(https("/v2/health/ready")).send().await.unwrap().status(), 200);
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]});
    let v: serde_json::Value = c
        .post(https("/v2/models/mlp/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model_name"], "mlp", "{v}");
    // Plain HTTP to the TLS port: no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v2/health/ready"))
        .timeout(std::time::Duration::from_secs(15))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that does not trust the test CA is refused.
    assert!(reqwest::Client::new()
        .get(https("/v2/health/live"))
        .send()
        .await
        .is_err());
    // gRPC over TLS.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name("localhost");
    let channel =
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", server.grpc_addr.unwrap().port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut g = GrpcInferenceServiceClient::new(channel);
    let ready = g
        .server_ready(kiln_serve::proto::ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    server.shutdown().await.unwrap();
    // Swapped files: a clear configuration error naming the file, before any port is bound.
    cfg.tls = Some(kiln_serve::TlsConfig {
        cert: tls_dir().join("cert.pem"),
        key: tls_dir().join("cert.pem"),
    });
    let e = Server::start(cfg).await.err().expect("bad key").to_string();
    assert!(e.contains("cert.pem") && e.contains("private key"), "{e}");
    let _ = std::fs::remove_dir_all(&repo);
}

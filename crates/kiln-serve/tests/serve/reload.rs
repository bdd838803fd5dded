use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// Creates `<model>/<version>/model.onnx` atomically: written under a non-numeric folder name,
/// then renamed, so the poller never sees a half-written file.
fn add_version(repo: &Path, model: &str, version: u64, bytes: &[u8]) {
    let tmp = repo.join(model).join(format!(".tmp-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.onnx"), bytes).unwrap();
    std::fs::rename(&tmp, repo.join(model).join(version.to_string())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_loses_nothing() {
    let repo = temp_repo(&["mlp"]);
    let mut cfg = config(&repo);
    cfg.poll_interval = Some(Duration::from_millis(100));
    let server = kiln_serve::Server::start(cfg).await.unwrap();
    let model_bytes = std::fs::read(repo.join("mlp/1/model.onnx")).unwrap();
    let want = reference(&repo, "mlp", 1, vec![mlp_tensor(2, 3)]);
    let want_logits = want[0].values::<f32>().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let seen_v2 = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, seen_v2) = (stop.clone(), ok.clone(), failed.clone(), seen_v2.clone());
        let u = url(&server, "/v2/models/mlp/infer");
        let want_logits = want_logits.clone();
        clients.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let body = json!({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                          "data": mlp_input(2, 3)}]});
            while !stop.load(Ordering::SeqCst) {
                let r = c.post(&u).json(&body).send().await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap();
                        if f32s(&v["outputs"][0]["data"]) != want_logits {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        if v["model_version"] == "2" {
                            seen_v2.store(true, Ordering::SeqCst);
                        }
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    assert!(wait_until(30, || async { ok.load(Ordering::SeqCst) > 20 }).await);

    // A new version loads in the background and takes over.
    add_version(&repo, "mlp", 2, &model_bytes);
    assert!(
        wait_until(60, || async { seen_v2.load(Ordering::SeqCst) }).await,
        "version 2 never served"
    );
    let c = reqwest::Client::new();
    let m: Value = c
        .get(url(&server, "/v2/models/mlp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["versions"], json!(["2"]));

    // A broken version 3: the server keeps serving 2 and reports the failure.
    add_version(&repo, "mlp", 3, b"definitely not an ONNX model");
    let index = || async {
        c.post(url(&server, "/v2/repository/index"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert!(
        wait_until(60, || async {
            index()
                .await
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["version"] == "3" && e["state"] == "UNAVAILABLE")
        })
        .await,
        "the broken version never showed up in the index"
    );
    let before = ok.load(Ordering::SeqCst);
    assert!(wait_until(30, || async { ok.load(Ordering::SeqCst) > before + 20 }).await);
    stop.store(true, Ordering::SeqCst);
    for h in clients {
        h.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during the reloads");

    let idx = index().await;
    let v2 = idx.as_array().unwrap().iter().find(|e| e["version"] == "2").unwrap();
    assert_eq!(v2["state"], "READY");
    let v3 = idx.as_array().unwrap().iter().find(|e| e["version"] == "3").unwrap();
    assert!(
        v3["reason"].as_str().unwrap().contains("loading model 'mlp' version 3"),
        "{v3}"
    );
    let m: Value = c
        .get(url(&server, "/v2/models/mlp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["versions"], json!(["2"]));
    assert!(m["status"].as_array().unwrap().iter().any(|e| e["version"] == "3"));
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(&text, "kiln_model_load_failures_total{model=\"mlp\",version=\"3\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "kiln_model_version_ready{model=\"mlp\",version=\"1\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "kiln_model_version_ready{model=\"mlp\",version=\"2\"}"),
        Some(1.0)
    );
    // Version 1 is gone.
    let r = c
        .post(url(&server, "/v2/models/mlp/versions/1/infer"))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Fixing version 3 in place loads it.
    std::fs::write(repo.join("mlp/3/model.onnx"), &model_bytes).unwrap();
    assert!(
        wait_until(60, || async {
            let m: Value = c
                .get(url(&server, "/v2/models/mlp"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            m["versions"] == json!(["3"])
        })
        .await
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_policy_all_serves_every_version() {
    let repo = temp_repo(&["mlp"]);
    let bytes = std::fs::read(repo.join("mlp/1/model.onnx")).unwrap();
    add_version(&repo, "mlp", 4, &bytes);
    write_config(&repo, "mlp", "max_batch_size = 4\n[version_policy]\nall = true\n");
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let m: Value = c
        .get(url(&server, "/v2/models/mlp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["versions"], json!(["1", "4"]));
    let body = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    for (path, version) in [("/v2/models/mlp/infer", "4"), ("/v2/models/mlp/versions/1/infer", "1")] {
        let v: Value = c
            .post(url(&server, path))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["model_version"], version);
    }
    server.shutdown().await.unwrap();
}

/// The serving version's file is corrupted in place, then deleted: the loaded copy keeps
/// serving, the failed reload is reported (index reason, load-failure metric), and a good file
/// put back loads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_version_survives_its_file_corrupted_or_deleted() {
    let repo = temp_repo(&["mlp"]);
    let mut cfg = config(&repo);
    cfg.poll_interval = Some(Duration::from_millis(50));
    let server = kiln_serve::Server::start(cfg).await.unwrap();
    let c = reqwest::Client::new();
    let file = repo.join("mlp/1/model.onnx");
    let good = std::fs::read(&file).unwrap();
    let want = reference(&repo, "mlp", 1, vec![mlp_tensor(1, 5)])[0]
        .values::<f32>()
        .unwrap();
    let body = json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": mlp_input(1, 5)}]});
    let infer = || async {
        let r = c
            .post(url(&server, "/v2/models/mlp/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(f32s(&v["outputs"][0]["data"]), want);
    };
    let index_row = || async {
        let idx: Value = c
            .post(url(&server, "/v2/repository/index"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        idx.as_array()
            .unwrap()
            .iter()
            .find(|e| e["version"] == "1")
            .cloned()
            .unwrap()
    };
    infer().await;
    // Corrupted in place (same size, garbage bytes), then truncated.
    std::fs::write(&file, vec![0xffu8; good.len()]).unwrap();
    assert!(
        wait_until(30, || async {
            index_row().await["reason"]
                .as_str()
                .is_some_and(|r| r.contains("reload failed"))
        })
        .await,
        "the failed reload was never reported: {}",
        index_row().await
    );
    let row = index_row().await;
    assert_eq!(row["state"], "READY", "{row}");
    infer().await;
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    infer().await;
    // Deleted: the version folder has no model file any more.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    infer().await;
    assert_eq!(
        c.get(url(&server, "/v2/health/ready")).send().await.unwrap().status(),
        200
    );
    let text = metrics_text(&server).await;
    assert!(
        metric(&text, "kiln_model_load_failures_total{model=\"mlp\",version=\"1\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    // Put back: loads again and the failure note goes away.
    std::fs::write(&file, &good).unwrap();
    assert!(
        wait_until(30, || async { index_row().await["reason"] == "" }).await,
        "{}",
        index_row().await
    );
    infer().await;
    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&repo);
}

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln::{Session, TensorData};
use kiln_serve::{Server, ServerConfig};

/// The repository shipped in `models/repository`.
pub fn shipped_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/repository")
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh repository under the temp dir holding copies of the named shipped models.
pub fn temp_repo(models: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kiln-serve-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for m in models {
        copy_dir(&shipped_repo().join(m), &dir.join(m));
    }
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

pub fn config(repo: &Path) -> ServerConfig {
    let local = "127.0.0.1:0".parse().unwrap();
    ServerConfig {
        model_repository: repo.to_path_buf(),
        http_addr: local,
        grpc_addr: Some(local),
        metrics_addr: Some(local),
        max_body_bytes: 1 << 20,
        poll_interval: None,
        control_token: None,
        tls: None,
    }
}

pub async fn start(repo: &Path) -> Server {
    Server::start(config(repo)).await.unwrap()
}

pub fn url(server: &Server, path: &str) -> String {
    format!("http://{}{}", server.http_addr, path)
}

/// Outputs of a direct `Session::run` on `<repo>/<model>/<version>/model.onnx`.
pub fn reference(repo: &Path, model: &str, version: u64, inputs: Vec<TensorData>) -> Vec<TensorData> {
    let path = repo.join(model).join(version.to_string()).join("model.onnx");
    let session = Session::builder().build_from_file(path).unwrap();
    session
        .run(inputs.into_iter().map(|t| (t.name.clone(), t)).collect())
        .unwrap()
}

/// `n` rows of 4 features, distinct per `seed`.
pub fn mlp_input(n: usize, seed: usize) -> Vec<f32> {
    (0..n * 4).map(|i| ((i + seed * 7) % 23) as f32 / 7.0 - 1.5).collect()
}

pub fn mlp_tensor(n: usize, seed: usize) -> TensorData {
    TensorData::from_values("input", vec![n, 4], &mlp_input(n, seed)).unwrap()
}

/// A metric value from Prometheus text (`name{labels}` exactly as rendered).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

pub async fn metrics_text(server: &Server) -> String {
    reqwest::get(url(server, "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `check` every 20 ms until it holds, for at most `secs` seconds.
pub async fn wait_until<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn write_config(repo: &Path, model: &str, text: &str) {
    std::fs::write(repo.join(model).join("config.toml"), text).unwrap();
}

/// A temporary repository with copies of the named shipped models plus model `smollm2`, an `[llm]`
/// model configured by `config` whose version 1 links to the files of the built model in `src`.
pub fn llm_repo(shipped: &[&str], src: &Path, config: &str) -> PathBuf {
    let repo = temp_repo(shipped);
    let v1 = repo.join("smollm2/1");
    std::fs::create_dir_all(&v1).unwrap();
    for f in [
        "model.onnx",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(src.join(f), v1.join(f)).unwrap();
    }
    std::fs::write(repo.join("smollm2/config.toml"), config).unwrap();
    repo
}

/// GET a JSON body.
pub async fn get_json(client: &reqwest::Client, u: &str) -> serde_json::Value {
    client.get(u).send().await.unwrap().json().await.unwrap()
}

/// POST a JSON body; the status and the body as JSON (or as a JSON string when it is not JSON).
pub async fn post_json(client: &reqwest::Client, u: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = client.post(u).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

//! Bounded load test: the shipped `mlp` model served twice in this process, once with dynamic
//! batching (max_batch_size 16, 2 ms delay) and once with max_batch_size = 1, each hit with the
//! same fixed number of 1-row KServe v2 HTTP JSON requests from N concurrent clients. Prints
//! throughput, p50/p99 latency and the throughput ratio, then exits.
//!
//!     cargo run --release -p kiln-serve --example load -- [REQUESTS] [CONCURRENCY]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_serve::{Server, ServerConfig};
use serde_json::{json, Value};

fn repo_with(config: &str, tag: &str) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/repository/mlp/1/model.onnx");
    let dir = std::env::temp_dir().join(format!("kiln-load-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("mlp/1"))?;
    std::fs::copy(src, dir.join("mlp/1/model.onnx"))?;
    std::fs::write(dir.join("mlp/config.toml"), config)?;
    Ok(dir)
}

struct Outcome {
    throughput: f64,
    p50: Duration,
    p99: Duration,
    execs: f64,
}

async fn run(config: &str, tag: &str, requests: usize, concurrency: usize) -> anyhow::Result<Outcome> {
    let repo = repo_with(config, tag)?;
    let local = "127.0.0.1:0".parse()?;
    let server = Server::start(ServerConfig {
        model_repository: repo.clone(),
        http_addr: local,
        grpc_addr: None,
        metrics_addr: None,
        max_body_bytes: 1 << 20,
        poll_interval: None,
        control_token: None,
        tls: None,
    })
    .await?;
    let url = Arc::new(format!("http://{}/v2/models/mlp/infer", server.http_addr));
    let client = reqwest::Client::new();
    let body = |i: usize| {
        let x: Vec<f32> = (0..4).map(|k| ((i * 4 + k) % 17) as f32 / 8.0 - 1.0).collect();
        json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x}]})
    };
    // Warm-up.
    for i in 0..50 {
        client
            .post(url.as_str())
            .json(&body(i))
            .send()
            .await?
            .error_for_status()?;
    }
    let per_client = requests / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                let r = client.post(url.as_str()).json(&body(c * per_client + i)).send().await?;
                let v: Value = r.error_for_status()?.json().await?;
                anyhow::ensure!(v["outputs"].as_array().is_some_and(|o| o.len() == 2), "bad answer {v}");
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(requests);
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let text = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await?
        .text()
        .await?;
    let execs = text
        .lines()
        .find_map(|l| l.strip_prefix("nv_inference_exec_count{model=\"mlp\",version=\"1\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&repo);
    Ok(Outcome {
        throughput: lat.len() as f64 / wall.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        execs: execs - 50.0,
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4000);
    let concurrency: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let batched = run(
            "max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 2000\nmax_queue_size = 1024\n",
            "batched",
            requests,
            concurrency,
        )
        .await?;
        let single = run(
            "max_batch_size = 1\nmax_queue_size = 1024\n",
            "single",
            requests,
            concurrency,
        )
        .await?;
        let n = (requests / concurrency) * concurrency;
        println!("{n} requests (1 row each, HTTP JSON), {concurrency} concurrent clients");
        for (name, o) in [
            ("dynamic batching (max 16, 2 ms)", &batched),
            ("max_batch_size = 1", &single),
        ] {
            println!(
                "{name:34} {:8.0} req/s   p50 {:6.2} ms   p99 {:6.2} ms   executions {:.0}",
                o.throughput,
                o.p50.as_secs_f64() * 1e3,
                o.p99.as_secs_f64() * 1e3,
                o.execs
            );
        }
        println!(
            "throughput ratio (dynamic / max_batch_size=1): {:.2}",
            batched.throughput / single.throughput
        );
        anyhow::Ok(())
    })
}

//! The OpenAI-compatible API on an `[llm]` model (the 4-layer SmolLM2 that `models/fetch.sh --llm`
//! builds under `$KILN_MODELS/llm/`; SKIP without `KILN_MODELS`, failure with
//! `KILN_MODELS_REQUIRED=1`): completions and chat, streamed and not, `n > 1`, bad requests
//! (4xx JSON errors in OpenAI's shape), a flood past the queue (503 at once, the rest served), a
//! client that disconnects mid-stream (its KV blocks come back), and the server staying ready.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::common::{get_json, llm_repo, metric, metrics_text, post_json as post, start, url, wait_until};

fn llm_dir() -> Option<PathBuf> {
    kiln_llm::testing::model_dir(kiln_llm::testing::SMALL_MODEL)
}

const CONFIG: &str = r#"
[llm]
block_size = 16
kv_cache_bytes = 8388608          # 8 MiB: 85 blocks of 16 tokens for this model
max_num_seqs = 8
max_num_batched_tokens = 128
max_model_len = 512
max_pending_requests = 6
default_max_tokens = 16
"#;

/// `data:` payloads of a server-sent-event body, `[DONE]` included.
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_api_on_an_llm_model() {
    let Some(src) = llm_dir() else { return };
    let repo = llm_repo(&[], &src, CONFIG);
    let server = start(&repo).await;
    let c = reqwest::Client::new();

    // The model list names the LLM.
    let models: Value = c
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");

    // Completions, greedy: the streamed text equals the whole answer.
    let body = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8,
                      "temperature": 0, "ignore_eos": true});
    let (s, whole) = post(&c, &url(&server, "/v1/completions"), body.clone()).await;
    assert_eq!(s, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() >= 5);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = c
        .post(url(&server, "/v1/completions"))
        .json(&sbody)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_payloads(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);

    // Chat, streamed and not: same text; the first delta carries the role.
    let chat = json!({"model": "smollm2", "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is the capital of France?"}],
                      "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (s, whole) = post(&c, &url(&server, "/v1/chat/completions"), chat.clone()).await;
    assert_eq!(s, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let lps = whole["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len() as u64, whole["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let events = sse_payloads(
        &c.post(url(&server, "/v1/chat/completions"))
            .json(&schat)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // n = 2 with a seed: two answers, reproducible.
    let nreq = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5, "n": 2,
                      "temperature": 0.9, "seed": 7, "ignore_eos": true});
    let (s, a) = post(&c, &url(&server, "/v1/completions"), nreq.clone()).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    let (_, b) = post(&c, &url(&server, "/v1/completions"), nreq).await;
    assert_eq!(a["choices"], b["choices"]);

    // Bad requests: OpenAI-shaped 4xx errors.
    let long: Vec<u32> = (0..600).map(|i| 100 + i).collect();
    for (body, want) in [
        (json!({"model": "smollm2", "prompt": long}), 400),
        (json!({"model": "smollm2", "prompt": "hi", "max_tokens": 0}), 400),
        (json!({"model": "smollm2", "prompt": "hi", "max_tokens": -5}), 400),
        (json!({"model": "smollm2", "prompt": "hi", "temperature": -1}), 400),
        (json!({"model": "smollm2", "prompt": [4000000000u64]}), 400),
        (json!({"model": "nope", "prompt": "hi"}), 404),
        (json!({"model": "smollm2"}), 400),
        (json!({"model": "smollm2", "messages": []}), 400),
    ] {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (s, e) = post(&c, &url(&server, path), body.clone()).await;
        assert_eq!(s, want, "{body} -> {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    let r = c
        .post(url(&server, "/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c
        .post(url(&server, "/v2/models/smollm2/infer"))
        .json(&json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A client that goes away mid-stream: its blocks come back.
    let long_req = json!({"model": "smollm2", "prompt": "Count:", "max_tokens": 400, "ignore_eos": true,
                          "temperature": 0, "stream": true});
    let mut r = c
        .post(url(&server, "/v1/completions"))
        .json(&long_req)
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let used = |t: &str| {
        metric(
            t,
            r#"kiln_llm:engine{model="smollm2",stat="kv_blocks_used",version="1"}"#,
        )
    };
    let holds = wait_until(10, || async { used(&metrics_text(&server).await).unwrap_or(0.0) > 0.0 }).await;
    assert!(holds, "the running request holds blocks");
    drop(r);
    let back = wait_until(20, || async { used(&metrics_text(&server).await) == Some(0.0) }).await;
    assert!(back, "blocks not returned after the client left");
    let aborted = metric(
        &metrics_text(&server).await,
        r#"kiln_llm:engine{model="smollm2",stat="aborted_requests_total",version="1"}"#,
    );
    assert!(aborted.unwrap() >= 1.0);

    // A flood past max_pending_requests (6): the excess gets 503 at once, the rest are served.
    let flood: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            let u = url(&server, "/v1/completions");
            tokio::spawn(async move {
                let body =
                    json!({"model": "smollm2", "prompt": format!("Item {i}:"), "max_tokens": 24, "ignore_eos": true});
                post(&c, &u, body).await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for f in flood {
        let (s, v) = f.await.unwrap();
        if s == 200 {
            assert_eq!(v["usage"]["completion_tokens"], 24);
        } else {
            assert_eq!(s, 503, "{v}");
        }
        codes.push(s);
    }
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");

    // Still serving and ready; TTFT and per-token histograms were recorded.
    let (s, _) = post(&c, &url(&server, "/v1/completions"), body).await;
    assert_eq!(s, 200);
    let r = c.get(url(&server, "/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = metrics_text(&server).await;
    let count = |name: &str| {
        metric(
            &text,
            &format!(r#"kiln_llm:{name}_count{{model="smollm2",version="1"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert!(count("time_to_first_token_seconds") >= 5.0, "{text}");
    assert!(count("time_per_output_token_seconds") > 10.0);
    let _ = Duration::from_secs(0);
    let _ = std::fs::remove_dir_all(&repo);
}

/// Hot reload of an `[llm]` model: a new version loads in the background and takes over while
/// clients keep streaming; the streams running on the old version finish (drain), no request fails,
/// and the old version's engine goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llm_hot_reload_drains_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let Some(src) = llm_dir() else { return };
    let repo = llm_repo(&[], &src, CONFIG);
    let mut cfg = super::common::config(&repo);
    cfg.poll_interval = Some(Duration::from_millis(100));
    let server = kiln_serve::Server::start(cfg).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let u = url(&server, "/v1/completions");
        clients.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let stream = i % 2 == 0;
                let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12,
                                  "temperature": 0, "ignore_eos": true, "stream": stream});
                let r = c.post(&u).json(&body).send().await;
                let good = match r {
                    Ok(r) if r.status() == 200 => {
                        let text = r.text().await.unwrap_or_default();
                        if stream {
                            let events = sse_payloads(&text);
                            events.last().map(String::as_str) == Some("[DONE]") && events.len() >= 13
                        } else {
                            serde_json::from_str::<Value>(&text).is_ok_and(|v| v["usage"]["completion_tokens"] == 12)
                        }
                    }
                    _ => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    assert!(wait_until(60, || async { ok.load(Ordering::SeqCst) >= 6 }).await);

    // Version 2 (the same files) appears: it loads beside version 1, then takes over.
    let v2 = repo.join("smollm2/2");
    std::fs::create_dir_all(&v2).unwrap();
    for e in std::fs::read_dir(repo.join("smollm2/1")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), v2.join(e.file_name())).unwrap();
    }
    let c = reqwest::Client::new();
    let versions = || async { get_json(&c, &url(&server, "/v2/models/smollm2")).await["versions"].clone() };
    assert!(
        wait_until(120, || async { versions().await == json!(["2"]) }).await,
        "version 2 never took over: {}",
        versions().await
    );
    let before = ok.load(Ordering::SeqCst);
    assert!(wait_until(60, || async { ok.load(Ordering::SeqCst) >= before + 6 }).await);
    stop.store(true, Ordering::SeqCst);
    for h in clients {
        h.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed across the reload");
    // Only version 2's engine is left, with nothing running.
    let text = metrics_text(&server).await;
    let running: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("kiln_llm:engine{") && l.contains(r#"stat="num_requests_running""#))
        .collect();
    assert!(
        running.len() == 1 && running[0].contains(r#"version="2""#) && running[0].ends_with(" 0"),
        "{running:?}"
    );
    server.shutdown().await.unwrap();
}

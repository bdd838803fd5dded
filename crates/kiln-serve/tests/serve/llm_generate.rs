//! Triton's KServe v2 generate extension on an `[llm]` model (the 4-layer SmolLM2 that
//! `models/fetch.sh --llm` builds under `$KILN_MODELS/llm/`; SKIP without `KILN_MODELS`, failure
//! with `KILN_MODELS_REQUIRED=1`), beside the shipped tensor model `mlp`: `generate` with the
//! requested token count, `generate_stream` deltas adding up to the same text, versioned paths,
//! and the 4xx errors in KServe's `{"error": ...}` shape.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::common::{llm_repo, post_json as post, start, url};

fn llm_dir() -> Option<PathBuf> {
    kiln_llm::testing::model_dir(kiln_llm::testing::SMALL_MODEL)
}

const CONFIG: &str = r#"
[llm]
block_size = 16
kv_cache_bytes = 8388608
max_num_seqs = 8
max_num_batched_tokens = 128
max_model_len = 512
default_max_tokens = 4
"#;

/// The JSON payloads of a server-sent-event body.
fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

async fn stream(client: &reqwest::Client, u: &str, body: Value) -> Vec<Value> {
    let r = client.post(u).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    sse_events(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kserve_generate_on_an_llm_model() {
    let Some(src) = llm_dir() else { return };
    let repo = llm_repo(&["mlp"], &src, CONFIG);
    let server = start(&repo).await;
    let c = reqwest::Client::new();
    let generate = url(&server, "/v2/models/smollm2/generate");
    let generate_stream = url(&server, "/v2/models/smollm2/generate_stream");

    // Greedy, past the end-of-sequence token: exactly max_tokens tokens.
    let body = json!({"text_input": "The capital of France is",
                      "parameters": {"max_tokens": 8, "temperature": 0, "ignore_eos": true}});
    let (s, whole) = post(&c, &generate, body.clone()).await;
    assert_eq!(s, 200, "{whole}");
    assert_eq!(whole["model_name"], "smollm2");
    assert_eq!(whole["model_version"], "1");
    assert_eq!(whole["finish_reason"], "length");
    let text = whole["text_output"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    // Exactly 8 tokens: the OpenAI route's answer to the same request is the same text, and it
    // counts them.
    let (s, oa) = post(
        &c,
        &url(&server, "/v1/completions"),
        json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8,
               "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, 200, "{oa}");
    assert_eq!(oa["usage"]["completion_tokens"], 8);
    assert_eq!(oa["choices"][0]["text"], whole["text_output"]);

    // Triton's top-level form gives the same answer, and so does the versioned path.
    let flat = json!({"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true, "stream": false, "bad_words": "", "stop_words": ""});
    let (s, again) = post(&c, &generate, flat).await;
    assert_eq!((s, &again["text_output"]), (200, &whole["text_output"]), "{again}");
    let (s, v1) = post(
        &c,
        &url(&server, "/v2/models/smollm2/versions/1/generate"),
        body.clone(),
    )
    .await;
    assert_eq!((s, &v1["text_output"]), (200, &whole["text_output"]), "{v1}");

    // The streamed deltas add up to the same text; the last event carries the finish reason.
    let events = stream(&c, &generate_stream, body.clone()).await;
    assert!(events.len() >= 2, "{events:?}");
    let (last, deltas) = events.split_last().unwrap();
    assert_eq!(last["finish_reason"], "length", "{last}");
    assert_eq!(last["text_output"], "");
    for e in deltas {
        assert_eq!(e["model_name"], "smollm2");
        assert_eq!(e["model_version"], "1");
        assert!(e.get("finish_reason").is_none(), "{e}");
    }
    let streamed: String = events.iter().map(|e| e["text_output"].as_str().unwrap()).collect();
    assert_eq!(streamed, text);
    let events = stream(
        &c,
        &url(&server, "/v2/models/smollm2/versions/1/generate_stream"),
        body.clone(),
    )
    .await;
    let streamed: String = events.iter().map(|e| e["text_output"].as_str().unwrap()).collect();
    assert_eq!(streamed, text);

    // exclude_input_in_output: false repeats the prompt, as Triton's LLM backends do by default.
    let mut with_input = body.clone();
    with_input["parameters"]["exclude_input_in_output"] = json!(false);
    let (s, r) = post(&c, &generate, with_input.clone()).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["text_output"], format!("The capital of France is{text}"));
    let events = stream(&c, &generate_stream, with_input).await;
    let streamed: String = events.iter().map(|e| e["text_output"].as_str().unwrap()).collect();
    assert_eq!(streamed, format!("The capital of France is{text}"));

    // A stop string ends the answer before its first occurrence (the stop string itself is not
    // returned): the last character of the text is a stop string that occurs in it.
    let last = text.trim_end().chars().last().unwrap().to_string();
    let mut stopped = body.clone();
    stopped["parameters"]["stop"] = json!([last]);
    let (s, r) = post(&c, &generate, stopped).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["finish_reason"], "stop", "{r}");
    assert_eq!(
        r["text_output"],
        text[..text.find(&last).unwrap()],
        "{text:?} stop {last:?}"
    );

    // Without max_tokens the model's default_max_tokens (4) applies.
    let (s, r) = post(&c, &generate, json!({"text_input": "Hello", "ignore_eos": true})).await;
    assert_eq!((s, &r["finish_reason"]), (200, &json!("length")), "{r}");

    // Errors: KServe's {"error": ...} with the status of the fault.
    let error = |r: &Value| {
        r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {r}"))
            .to_string()
    };
    let (s, r) = post(&c, &url(&server, "/v2/models/nope/generate"), body.clone()).await;
    assert_eq!(s, 404, "{r}");
    assert!(error(&r).contains("nope"));
    let (s, r) = post(&c, &url(&server, "/v2/models/nope/generate_stream"), body.clone()).await;
    assert_eq!(s, 404, "{r}");
    let (s, r) = post(
        &c,
        &url(&server, "/v2/models/smollm2/versions/7/generate"),
        body.clone(),
    )
    .await;
    assert_eq!(s, 404, "{r}");
    let (s, r) = post(
        &c,
        &url(&server, "/v2/models/smollm2/versions/x/generate"),
        body.clone(),
    )
    .await;
    assert_eq!(s, 400, "{r}");
    let (s, r) = post(&c, &url(&server, "/v2/models/mlp/generate"), body.clone()).await;
    assert_eq!(s, 400, "{r}");
    assert!(error(&r).contains("not an LLM"), "{r}");
    let (s, r) = post(
        &c,
        &url(&server, "/v2/models/mlp/versions/1/generate_stream"),
        body.clone(),
    )
    .await;
    assert_eq!(s, 400, "{r}");
    for bad in [
        json!({"text_input": "a", "parameters": {"max_tokens": 0}}),
        json!({"text_input": "a", "parameters": {"temperature": -1}}),
        json!({"text_input": "a", "parameters": {"top_p": 1.5}}),
        json!({"text_input": "a", "top_k": -3}),
        json!({"text_input": "a", "max_tokens": "many"}),
        json!({"text_input": "a", "parameters": {"max_tokns": 3}}),
        json!({"text_input": "a", "stream": true}),
        json!({"text_input": 3}),
        json!({"parameters": {"max_tokens": 3}}),
    ] {
        let (s, r) = post(&c, &generate, bad.clone()).await;
        assert_eq!(s, 400, "{bad} -> {r}");
        assert!(!error(&r).is_empty());
    }
    let r = c
        .post(&generate)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // The KServe routes beside these still answer.
    let r = c.get(url(&server, "/v2/models/smollm2/ready")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = c.get(url(&server, "/v2/models/mlp/versions/1")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    server.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&repo);
}

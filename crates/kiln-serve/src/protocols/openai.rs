//! OpenAI-compatible API for `[llm]` models: `POST /v1/completions`, `POST /v1/chat/completions`
//! (both with `stream: true` as server-sent events ending in `data: [DONE]`, and `usage`), and
//! `GET /v1/models`. Sampling fields follow OpenAI (`temperature`, `top_p`, `n`, `max_tokens` /
//! `max_completion_tokens`, `stop`, `seed`, `presence_penalty`, `frequency_penalty`, `logprobs`,
//! `top_logprobs`, `stream_options.include_usage`) plus vLLM's extras (`top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`). Errors use
//! OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! A client that disconnects mid-stream drops the response body; that drops the generation,
//! which cancels the request and frees its KV blocks before the engine's next step.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_llm::text::{self, Prompt, TextEvent, TextRequest, TextStream};
use kiln_llm::{ChatMessage, FinishReason, SamplingParams, SubmitError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::HttpState;
use crate::error::ServeError;
use crate::llm::{RequestTiming, ServedLlm};

pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
}

/// An error in OpenAI's shape.
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }
    fn param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        ApiError {
            status: super::http::status_of(e.kind()),
            message: e.to_string(),
            param: None,
        }
    }
}

impl From<text::TextError> for ApiError {
    fn from(e: text::TextError) -> Self {
        let status = match &e {
            text::TextError::Submit(SubmitError::Overloaded(_) | SubmitError::Stopped) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            message: e.to_string(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn list_models(State(st): State<HttpState>) -> Json<Value> {
    let data: Vec<Value> = st
        .manager
        .llms()
        .into_iter()
        .map(|(name, version, llm)| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": "kiln",
                   "version": version, "max_model_len": llm.service.max_model_len()})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    n: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<Stop>,
    stop_token_ids: Option<Vec<u32>>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    skip_special_tokens: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: Value,
    /// Legacy completions: how many top log-probabilities per token.
    logprobs: Option<i64>,
    #[serde(default)]
    echo: bool,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessageBody>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ChatMessageBody {
    role: String,
    content: Option<Value>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed request body: {e}")))
}

fn to_request(c: &Common, prompt: Prompt, logprobs: Option<usize>, default_max: usize) -> ApiResult<TextRequest> {
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => default_max,
        Some(m) if m >= 1 => m as usize,
        Some(m) => {
            return Err(ApiError::param(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}"),
            ))
        }
    };
    let n = match c.n {
        None => 1,
        Some(n) if (1..=64).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::param("n", format!("n must be in 1..=64, got {n}"))),
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        seed: c.seed,
        logprobs,
    };
    params.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    let stop = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 16 => v.clone(),
        Some(Stop::Many(_)) => return Err(ApiError::param("stop", "at most 16 stop strings")),
    };
    Ok(TextRequest {
        prompt,
        params,
        max_tokens,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: c.ignore_eos,
        n,
        skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
        deadline: None,
    })
}

fn served(st: &HttpState, model: &str) -> ApiResult<(u64, Arc<ServedLlm>)> {
    Ok(st.manager.llm(model)?)
}

async fn completions(State(st): State<HttpState>, body: Bytes) -> ApiResult<Response> {
    let arrived = Instant::now();
    let b: CompletionBody = parse_json(&body)?;
    if b.echo {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    let prompt = match &b.prompt {
        Value::String(s) => Prompt::Text(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
            Prompt::Tokens(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect())
        }
        _ => {
            return Err(ApiError::param(
                "prompt",
                "prompt must be a string, a one-string array or an array of token ids",
            ))
        }
    };
    let logprobs = match b.logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "logprobs",
                format!("logprobs must be in 0..=20, got {k}"),
            ))
        }
    };
    let (version, llm) = served(&st, &b.common.model)?;
    let mut req = to_request(&b.common, prompt, logprobs, llm.default_max_tokens)?;
    req.deadline = llm.deadline(arrived);
    let stream = text::start(&llm.service, &llm.tokenizer, req)?;
    let ctx = Ctx {
        id: format!("cmpl-{}", uuid_like()),
        model: b.common.model.clone(),
        version,
        arrived,
        llm,
        chat: false,
        logprobs: logprobs.is_some(),
    };
    respond(ctx, stream, &b.common).await
}

async fn chat_completions(State(st): State<HttpState>, body: Bytes) -> ApiResult<Response> {
    let arrived = Instant::now();
    let b: ChatBody = parse_json(&body)?;
    if b.messages.is_empty() {
        return Err(ApiError::param("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(b.messages.len());
    for m in &b.messages {
        let content = match &m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(ApiError::param("messages", "only text content parts are supported")),
                    }
                }
                text
            }
            Some(_) => {
                return Err(ApiError::param(
                    "messages",
                    "content must be a string or an array of text parts",
                ))
            }
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
        });
    }
    let logprobs = match (b.logprobs, b.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => return Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
        (true, None) => Some(0),
        (true, Some(k)) if (0..=20).contains(&k) => Some(k as usize),
        (true, Some(k)) => {
            return Err(ApiError::param(
                "top_logprobs",
                format!("top_logprobs must be in 0..=20, got {k}"),
            ))
        }
    };
    let (version, llm) = served(&st, &b.common.model)?;
    let mut req = to_request(&b.common, Prompt::Chat(messages), logprobs, llm.default_max_tokens)?;
    req.deadline = llm.deadline(arrived);
    let stream = text::start(&llm.service, &llm.tokenizer, req)?;
    let ctx = Ctx {
        id: format!("chatcmpl-{}", uuid_like()),
        model: b.common.model.clone(),
        version,
        arrived,
        llm,
        chat: true,
        logprobs: logprobs.is_some(),
    };
    respond(ctx, stream, &b.common).await
}

/// The answer: server-sent events with `stream: true`, else the whole response at the end.
async fn respond(ctx: Ctx, stream: TextStream, common: &Common) -> ApiResult<Response> {
    if common.stream {
        Ok(sse(
            ctx,
            stream,
            common.stream_options.as_ref().is_some_and(|o| o.include_usage),
        ))
    } else {
        Ok(Json(collect(ctx, stream).await?).into_response())
    }
}

/// A request id: time and a process counter (unique per server run).
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:06x}", nanos, N.fetch_add(1, Ordering::Relaxed) & 0xff_ffff)
}

struct Ctx {
    id: String,
    model: String,
    version: u64,
    arrived: Instant,
    llm: Arc<ServedLlm>,
    chat: bool,
    logprobs: bool,
}

fn logprob_entry(ctx: &Ctx, s: &kiln_llm::Sampled) -> Value {
    let tok = |id: u32| ctx.llm.tokenizer.id_to_token(id).unwrap_or_default();
    let top: Vec<Value> = s
        .top_logprobs
        .iter()
        .map(|(t, lp)| json!({"token": tok(*t), "logprob": lp}))
        .collect();
    json!({"token": tok(s.token), "logprob": s.logprob, "top_logprobs": top})
}

fn usage(stream: &TextStream) -> Value {
    let (p, c) = (stream.prompt_tokens(), stream.completion_tokens());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// Run to the end and build the whole response.
async fn collect(ctx: Ctx, mut stream: TextStream) -> ApiResult<Value> {
    let n = stream.num_answers();
    let mut texts = vec![String::new(); n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let mut lps: Vec<Vec<Value>> = vec![Vec::new(); n];
    let mut timing = RequestTiming::new();
    while let Some(e) = stream.next().await {
        match e {
            TextEvent::Delta { index, text, sampled } => {
                if index == 0 {
                    timing.token(ctx.arrived);
                }
                texts[index].push_str(&text);
                if ctx.logprobs {
                    lps[index].push(logprob_entry(&ctx, &sampled));
                }
            }
            TextEvent::Finished { index, reason } => finish[index] = Some(reason),
            TextEvent::Failed(m) => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: m,
                    param: None,
                })
            }
        }
    }
    timing.record(&ctx.model, ctx.version, ctx.arrived);
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let reason = finish[i].map(FinishReason::as_str);
            let logprobs = if ctx.logprobs { json!({"content": lps[i]}) } else { Value::Null };
            if ctx.chat {
                json!({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": logprobs, "finish_reason": reason})
            } else {
                json!({"index": i, "text": texts[i], "logprobs": logprobs, "finish_reason": reason})
            }
        })
        .collect();
    Ok(json!({
        "id": ctx.id,
        "object": if ctx.chat { "chat.completion" } else { "text_completion" },
        "created": now_secs(),
        "model": ctx.model,
        "choices": choices,
        "usage": usage(&stream),
    }))
}

struct SseState {
    ctx: Ctx,
    stream: TextStream,
    include_usage: bool,
    started: Vec<bool>,
    timing: RequestTiming,
    done: bool,
    created: u64,
}

fn sse_line(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn chunk(s: &SseState, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let mut v = json!({
        "id": s.ctx.id,
        "object": if s.ctx.chat { "chat.completion.chunk" } else { "text_completion" },
        "created": s.created,
        "model": s.ctx.model,
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

/// Server-sent events: one chunk per token (and per finish), then `[DONE]`.
fn sse(ctx: Ctx, stream: TextStream, include_usage: bool) -> Response {
    let n = stream.num_answers();
    let state = SseState {
        ctx,
        stream,
        include_usage,
        started: vec![false; n],
        timing: RequestTiming::new(),
        done: false,
        created: now_secs(),
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out: Vec<u8> = Vec::new();
        match s.stream.next().await {
            Some(TextEvent::Delta { index, text, sampled }) => {
                if index == 0 {
                    s.timing.token(s.ctx.arrived);
                }
                let lp = if s.ctx.logprobs {
                    json!({"content": [logprob_entry(&s.ctx, &sampled)]})
                } else {
                    Value::Null
                };
                let choice = if s.ctx.chat {
                    let mut delta = json!({"content": text});
                    if !s.started[index] {
                        delta["role"] = json!("assistant");
                    }
                    json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": null})
                } else {
                    json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                };
                s.started[index] = true;
                out.extend_from_slice(&sse_line(&chunk(&s, vec![choice], None)));
            }
            Some(TextEvent::Finished { index, reason }) => {
                let choice = if s.ctx.chat {
                    json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()})
                } else {
                    json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()})
                };
                out.extend_from_slice(&sse_line(&chunk(&s, vec![choice], None)));
            }
            Some(TextEvent::Failed(m)) => {
                let err = json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}});
                out.extend_from_slice(&sse_line(&err));
                out.extend_from_slice(b"data: [DONE]\n\n");
                s.done = true;
            }
            None => {
                s.timing.record(&s.ctx.model, s.ctx.version, s.ctx.arrived);
                if s.include_usage {
                    let u = usage(&s.stream);
                    out.extend_from_slice(&sse_line(&chunk(&s, vec![], Some(u))));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                s.done = true;
            }
        }
        Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(out)), s))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

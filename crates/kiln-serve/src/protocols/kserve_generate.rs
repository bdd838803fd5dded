//! Triton's KServe v2 generate extension for `[llm]` models, the endpoints its TensorRT-LLM and
//! vLLM backends serve:
//!
//! - `POST /v2/models/{model}[/versions/{version}]/generate` answers
//!   `{"model_name", "model_version", "text_output", "finish_reason"}`;
//! - `POST .../generate_stream` answers server-sent events, one
//!   `data: {"model_name", "model_version", "text_output": <delta>}` per piece of text and a last
//!   one with `"text_output": ""` and `"finish_reason"`.
//!
//! The body is `{"text_input": "...", "parameters": {...}}`; the sampling fields (`max_tokens`,
//! `temperature`, `top_p`, `top_k`, `min_p`, `seed` / `random_seed`, `stop` / `stop_words`,
//! `stop_token_ids`, `ignore_eos`, the penalties, `skip_special_tokens`, `stream`,
//! `exclude_input_in_output`) may also sit at the top level, as Triton's LLM backends take them.
//! Unknown fields are refused (a typo would otherwise be silently ignored). Unlike those backends
//! the prompt is not repeated in `text_output` unless `exclude_input_in_output` is `false`.
//! Errors are KServe's `{"error": "..."}` with 400, 404 or 503.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kiln_llm::text::{self, Prompt, TextEvent, TextRequest, TextStream};
use kiln_llm::{FinishReason, SamplingParams, SubmitError};
use serde_json::{json, Map, Value};

use super::http::{HttpError, HttpResult, HttpState};
use super::parse_version;
use crate::error::ServeError;
use crate::llm::{RequestTiming, ServedLlm};

/// The generate routes. They sit beside the KServe v2 routes under `/v2/models/{model}`, with the
/// same parameter names (`generate` and `generate_stream` are static segments like `infer`).
pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v2/models/{model}/generate", post(generate))
        .route("/v2/models/{model}/generate_stream", post(generate_stream))
        .route("/v2/models/{model}/versions/{version}/generate", post(generate_v))
        .route(
            "/v2/models/{model}/versions/{version}/generate_stream",
            post(generate_stream_v),
        )
}

async fn generate(
    State(st): State<HttpState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(handle(st, model, None, body, false).await)
}

async fn generate_stream(
    State(st): State<HttpState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(handle(st, model, None, body, true).await)
}

async fn generate_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_version(&version) {
        Ok(v) => respond(handle(st, model, Some(v), body, false).await),
        Err(e) => HttpError::from(e).into_response(),
    }
}

async fn generate_stream_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_version(&version) {
        Ok(v) => respond(handle(st, model, Some(v), body, true).await),
        Err(e) => HttpError::from(e).into_response(),
    }
}

fn respond(r: HttpResult<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

fn bad(message: impl Into<String>) -> HttpError {
    HttpError(StatusCode::BAD_REQUEST, message.into())
}

/// The LLM serving `version` of `model` (`None`: the highest).
fn served_llm(st: &HttpState, model: &str, version: Option<u64>) -> HttpResult<(u64, Arc<ServedLlm>)> {
    match version {
        None => Ok(st.manager.llm(model)?),
        Some(v) => {
            let sv = st.manager.served(model, Some(v))?;
            match &sv.llm {
                Some(l) => Ok((sv.version, l.clone())),
                None => Err(ServeError::invalid(format!(
                    "model '{model}' is not an LLM (no [llm] section in its config.toml); use /v2/models/{model}/versions/{v}/infer"
                ))
                .into()),
            }
        }
    }
}

fn text_error(e: text::TextError) -> HttpError {
    let status = match &e {
        text::TextError::Submit(SubmitError::Overloaded(_) | SubmitError::Stopped) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    HttpError(status, e.to_string())
}

/// A parsed generate request.
#[derive(Debug)]
struct GenerateBody {
    text_input: String,
    id: Option<String>,
    /// `None`: the model's `default_max_tokens`.
    max_tokens: Option<usize>,
    params: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    skip_special_tokens: bool,
    stream: Option<bool>,
    exclude_input: bool,
}

/// Fields the body may carry beside `text_input`, `id` and `parameters`.
const FIELDS: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "random_seed",
    "stop",
    "stop_words",
    "bad_words",
    "stop_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "skip_special_tokens",
    "stream",
    "exclude_input_in_output",
];

fn parse_body(body: &[u8]) -> HttpResult<GenerateBody> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("malformed request JSON: {e}")))?;
    let Value::Object(top) = v else {
        return Err(bad("the request body must be a JSON object"));
    };
    // Top-level fields and `parameters` together; one given twice must agree.
    let mut fields: Map<String, Value> = Map::new();
    let mut text_input = None;
    let mut id = None;
    let mut params_obj = None;
    for (k, v) in top {
        match k.as_str() {
            "text_input" => text_input = Some(v),
            "id" => id = Some(v),
            "parameters" => params_obj = Some(v),
            _ => {
                fields.insert(k, v);
            }
        }
    }
    match params_obj {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, v) in p {
                match fields.get(&k) {
                    Some(old) if *old != v => {
                        return Err(bad(format!(
                            "'{k}' is given both at the top level ({old}) and in parameters ({v})"
                        )))
                    }
                    _ => {
                        fields.insert(k, v);
                    }
                }
            }
        }
        Some(other) => return Err(bad(format!("'parameters' must be an object, got {other}"))),
    }
    if let Some(k) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field '{k}'; a generate request takes text_input, id, parameters and {}",
            FIELDS.join(", ")
        )));
    }
    let text_input = match text_input {
        Some(Value::String(s)) => s,
        // Triton's tensor-shaped form: a one-element batch.
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(other) => return Err(bad(format!("'text_input' must be a string, got {other}"))),
        None => return Err(bad("'text_input' is missing")),
    };
    if text_input.is_empty() {
        return Err(bad("'text_input' is empty"));
    }
    let id = match id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => return Err(bad(format!("'id' must be a string, got {other}"))),
    };

    let f = |k: &str| fields.get(k).filter(|v| !v.is_null());
    let float = |k: &'static str| -> HttpResult<Option<f32>> {
        f(k).map(|v| {
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| bad(format!("'{k}' must be a number, got {v}")))
        })
        .transpose()
    };
    let int = |k: &'static str| -> HttpResult<Option<i64>> {
        f(k).map(|v| {
            v.as_i64()
                .ok_or_else(|| bad(format!("'{k}' must be an integer, got {v}")))
        })
        .transpose()
    };
    let boolean = |k: &'static str| -> HttpResult<Option<bool>> {
        f(k).map(|v| {
            v.as_bool()
                .ok_or_else(|| bad(format!("'{k}' must be true or false, got {v}")))
        })
        .transpose()
    };
    let strings = |k: &'static str| -> HttpResult<Vec<String>> {
        match f(k) {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("'{k}' must be a string or an array of strings, got {x}")))
                })
                .collect(),
            Some(other) => Err(bad(format!(
                "'{k}' must be a string or an array of strings, got {other}"
            ))),
        }
    };

    let max_tokens = match int("max_tokens")? {
        None => None,
        Some(m) if m >= 1 => Some(m as usize),
        Some(m) => return Err(bad(format!("'max_tokens' must be at least 1, got {m}"))),
    };
    let top_k = match int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(bad(format!("'top_k' must be -1, 0 or positive, got {k}"))),
    };
    let seed = match (int("seed")?, int("random_seed")?) {
        (Some(a), Some(b)) if a != b => return Err(bad("'seed' and 'random_seed' disagree")),
        (Some(s), _) | (None, Some(s)) if s < 0 => return Err(bad(format!("'seed' must be >= 0, got {s}"))),
        (Some(s), _) | (None, Some(s)) => Some(s as u64),
        (None, None) => None,
    };
    let params = SamplingParams {
        temperature: float("temperature")?.unwrap_or(1.0),
        top_k,
        top_p: float("top_p")?.unwrap_or(1.0),
        min_p: float("min_p")?.unwrap_or(0.0),
        repetition_penalty: float("repetition_penalty")?.unwrap_or(1.0),
        frequency_penalty: float("frequency_penalty")?.unwrap_or(0.0),
        presence_penalty: float("presence_penalty")?.unwrap_or(0.0),
        seed,
        logprobs: None,
    };
    params.validate().map_err(|e| bad(e.to_string()))?;
    let mut stop = strings("stop")?;
    stop.extend(strings("stop_words")?);
    stop.retain(|s| !s.is_empty());
    if stop.len() > 16 {
        return Err(bad(format!("at most 16 stop strings, got {}", stop.len())));
    }
    // TensorRT-LLM clients send `"bad_words": ""`; accept that, refuse real ones.
    if strings("bad_words")?.iter().any(|s| !s.is_empty()) {
        return Err(bad("'bad_words' is not supported"));
    }
    let stop_token_ids = match f("stop_token_ids") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| bad(format!("'stop_token_ids' must hold token ids, got {x}")))
            })
            .collect::<HttpResult<_>>()?,
        Some(other) => {
            return Err(bad(format!(
                "'stop_token_ids' must be an array of token ids, got {other}"
            )))
        }
    };
    Ok(GenerateBody {
        text_input,
        id,
        max_tokens,
        params,
        stop,
        stop_token_ids,
        ignore_eos: boolean("ignore_eos")?.unwrap_or(false),
        skip_special_tokens: boolean("skip_special_tokens")?.unwrap_or(true),
        stream: boolean("stream")?,
        exclude_input: boolean("exclude_input_in_output")?.unwrap_or(true),
    })
}

async fn handle(
    st: HttpState,
    model: String,
    version: Option<u64>,
    body: Result<Bytes, BytesRejection>,
    streaming: bool,
) -> HttpResult<Response> {
    let arrived = Instant::now();
    let body = body?;
    let b = parse_body(&body)?;
    if !streaming && b.stream == Some(true) {
        return Err(bad(format!(
            "'stream': true needs /v2/models/{model}/generate_stream; /generate answers once"
        )));
    }
    let (version, llm) = served_llm(&st, &model, version)?;
    let req = TextRequest {
        prompt: Prompt::Text(b.text_input.clone()),
        params: b.params,
        max_tokens: b.max_tokens.unwrap_or(llm.default_max_tokens),
        stop: b.stop,
        stop_token_ids: b.stop_token_ids,
        ignore_eos: b.ignore_eos,
        n: 1,
        skip_special_tokens: b.skip_special_tokens,
        deadline: llm.deadline(arrived),
    };
    let stream = text::start(&llm.service, &llm.tokenizer, req).map_err(text_error)?;
    let ctx = Ctx {
        model,
        version,
        id: b.id,
        arrived,
        prefix: if b.exclude_input { String::new() } else { b.text_input },
    };
    if streaming && b.stream != Some(false) {
        Ok(sse(ctx, stream))
    } else if streaming {
        // `"stream": false` on generate_stream: the whole answer as one event.
        let doc = collect(&ctx, stream).await?;
        Ok(event_stream(Body::from(sse_event(&doc))))
    } else {
        Ok(Json(collect(&ctx, stream).await?).into_response())
    }
}

struct Ctx {
    model: String,
    version: u64,
    id: Option<String>,
    arrived: Instant,
    /// The prompt, when `exclude_input_in_output` is false.
    prefix: String,
}

impl Ctx {
    fn doc(&self, text: &str, finish: Option<FinishReason>) -> Value {
        let mut v = json!({
            "model_name": self.model,
            "model_version": self.version.to_string(),
            "text_output": text,
        });
        if let Some(id) = &self.id {
            v["id"] = json!(id);
        }
        if let Some(r) = finish {
            v["finish_reason"] = json!(r.as_str());
        }
        v
    }
}

/// Run to the end: the whole text and why it ended.
async fn collect(ctx: &Ctx, mut stream: TextStream) -> HttpResult<Value> {
    let mut text = ctx.prefix.clone();
    let mut finish = None;
    let mut timing = RequestTiming::new();
    while let Some(e) = stream.next().await {
        match e {
            TextEvent::Delta { text: t, .. } => {
                timing.token(ctx.arrived);
                text.push_str(&t);
            }
            TextEvent::Finished { reason, .. } => finish = Some(reason),
            TextEvent::Failed(m) => return Err(HttpError(StatusCode::INTERNAL_SERVER_ERROR, m)),
        }
    }
    timing.record(&ctx.model, ctx.version, ctx.arrived);
    Ok(ctx.doc(&text, finish))
}

fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn event_stream(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

struct SseState {
    ctx: Ctx,
    stream: TextStream,
    timing: RequestTiming,
    done: bool,
}

/// One event per non-empty text delta, then one with `finish_reason`; a failure mid-stream is a
/// last `{"error": ...}` event, as Triton sends it. Dropping the body (a client gone) drops the
/// stream, which cancels the request and frees its KV blocks.
fn sse(ctx: Ctx, stream: TextStream) -> Response {
    let first = (!ctx.prefix.is_empty()).then(|| sse_event(&ctx.doc(&ctx.prefix, None)));
    let state = SseState {
        ctx,
        stream,
        timing: RequestTiming::new(),
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let out = match s.stream.next().await {
                Some(TextEvent::Delta { text, .. }) => {
                    s.timing.token(s.ctx.arrived);
                    if text.is_empty() {
                        continue;
                    }
                    sse_event(&s.ctx.doc(&text, None))
                }
                Some(TextEvent::Finished { reason, .. }) => sse_event(&s.ctx.doc("", Some(reason))),
                Some(TextEvent::Failed(m)) => {
                    s.done = true;
                    sse_event(&json!({ "error": m }))
                }
                None => {
                    s.timing.record(&s.ctx.model, s.ctx.version, s.ctx.arrived);
                    return None;
                }
            };
            return Some((Ok::<Bytes, std::convert::Infallible>(out), s));
        }
    });
    let head = futures_util::stream::iter(first.map(Ok::<Bytes, std::convert::Infallible>));
    event_stream(Body::from_stream(futures_util::StreamExt::chain(head, events)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<GenerateBody, String> {
        parse_body(v.to_string().as_bytes()).map_err(|e| e.1)
    }

    #[test]
    fn fields_at_the_top_level_or_in_parameters() {
        let b = parse(
            json!({"text_input": "hi", "max_tokens": 7, "parameters": {"temperature": 0, "stop": "x",
                             "top_k": -1, "random_seed": 3}}),
        )
        .unwrap();
        assert_eq!(b.text_input, "hi");
        assert_eq!(b.max_tokens, Some(7));
        assert_eq!(b.params.temperature, 0.0);
        assert_eq!(b.params.top_k, 0);
        assert_eq!(b.params.seed, Some(3));
        assert_eq!(b.stop, vec!["x".to_string()]);
        assert!(b.exclude_input);
        // TensorRT-LLM's example request.
        let b =
            parse(json!({"text_input": "What is ML?", "max_tokens": 20, "bad_words": "", "stop_words": ""})).unwrap();
        assert!(b.stop.is_empty());
        let b = parse(json!({"text_input": ["one"], "parameters": {"stream": true, "ignore_eos": true}})).unwrap();
        assert_eq!(
            (b.text_input.as_str(), b.stream, b.ignore_eos),
            ("one", Some(true), true)
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |v: Value| parse(v).unwrap_err();
        assert!(err(json!({"max_tokens": 3})).contains("'text_input' is missing"));
        assert!(err(json!({"text_input": 5})).contains("must be a string"));
        assert!(err(json!({"text_input": "a", "max_tokens": 0})).contains("at least 1"));
        assert!(err(json!({"text_input": "a", "max_tokens": "5"})).contains("integer"));
        assert!(err(json!({"text_input": "a", "temperature": -1})).contains("temperature"));
        assert!(err(json!({"text_input": "a", "parameters": {"top_p": 0}})).contains("top_p"));
        assert!(err(json!({"text_input": "a", "top_k": -2})).contains("top_k"));
        assert!(err(json!({"text_input": "a", "max_tokns": 3})).contains("unknown field 'max_tokns'"));
        assert!(err(json!({"text_input": "a", "max_tokens": 3, "parameters": {"max_tokens": 4}})).contains("both"));
        assert!(err(json!({"text_input": "a", "parameters": [1]})).contains("must be an object"));
        assert!(err(json!({"text_input": "a", "bad_words": ["x"]})).contains("not supported"));
        assert!(err(json!({"text_input": "a", "stop_token_ids": [-1]})).contains("token ids"));
        assert!(parse_body(b"{").is_err());
        assert!(parse_body(b"[]").is_err());
    }
}

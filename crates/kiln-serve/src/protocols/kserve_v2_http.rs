//! KServe v2 (Open Inference Protocol) over HTTP/REST, with Triton's binary tensor data and
//! model repository extensions.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{HttpError, HttpResult, HttpState};
use super::{
    datatype_name, dims_from_wire, metadata_shape, parse_datatype, parse_version, tensor_from_json, tensor_from_raw,
    tensor_to_json, tensor_to_raw, wire_name,
};
use crate::error::{ErrorKind, ServeError};
use crate::infer::InferRequest;
use crate::manager::{IndexEntry, ModelManager, ServedVersion};

/// Header naming the length of the JSON part of a body that carries binary tensors.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// 401 unless the request may use the repository control endpoints.
fn authorize(st: &HttpState, headers: &HeaderMap) -> HttpResult<()> {
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if crate::auth::allowed(st.control_token.as_ref(), presented) {
        Ok(())
    } else {
        Err(HttpError(
            StatusCode::UNAUTHORIZED,
            "repository control needs 'Authorization: Bearer <token>' (the server's --control-token)".into(),
        ))
    }
}

/// The KServe v2 routes (everything under `/v2`), over the shared [`HttpState`].
pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config_v))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route("/v2/repository/models/{model}/unload", post(repository_unload))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(st): State<HttpState>) -> StatusCode {
    if st.manager.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Extensions Kiln implements, as Triton names them.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository", "generate"];

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

fn index_json(e: &IndexEntry) -> Value {
    json!({
        "name": e.name,
        "version": e.version.map(|v| v.to_string()).unwrap_or_default(),
        "state": e.state.as_str(),
        "reason": e.reason,
    })
}

fn metadata_json(manager: &ModelManager, sv: &ServedVersion) -> Value {
    let tensors = |ios: &[kiln::IoInfo]| -> Vec<Value> {
        ios.iter()
            .map(|io| {
                json!({
                    "name": io.name,
                    "datatype": io.dtype.map(wire_name).unwrap_or("FP32"),
                    "shape": metadata_shape(io, sv.max_batch_size()),
                })
            })
            .collect()
    };
    let versions: Vec<String> = manager
        .versions(&sv.model)
        .unwrap_or_default()
        .iter()
        .map(u64::to_string)
        .collect();
    let status: Vec<Value> = manager
        .model_status(&sv.model)
        .unwrap_or_default()
        .iter()
        .map(index_json)
        .collect();
    json!({
        "name": sv.model,
        "versions": versions,
        "platform": "onnx",
        "inputs": tensors(&sv.inputs),
        "outputs": tensors(&sv.outputs),
        "status": status,
    })
}

fn metadata_for(st: &HttpState, model: &str, version: Option<u64>) -> HttpResult<Json<Value>> {
    match st.manager.served(model, version) {
        Ok(sv) => Ok(Json(metadata_json(&st.manager, &sv))),
        Err(e @ ServeError::NotReady { .. }) => {
            // Known model with nothing serving: show why instead of a bare error.
            let status: Vec<Value> = st
                .manager
                .model_status(model)
                .unwrap_or_default()
                .iter()
                .map(index_json)
                .collect();
            Err(HttpError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; status: {}", Value::Array(status)),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

async fn model_metadata(State(st): State<HttpState>, Path(model): Path<String>) -> HttpResult<Json<Value>> {
    metadata_for(&st, &model, None)
}

async fn model_metadata_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<Json<Value>> {
    metadata_for(&st, &model, Some(parse_version(&version)?))
}

fn ready_for(st: &HttpState, model: &str, version: Option<u64>) -> HttpResult<StatusCode> {
    match st.manager.served(model, version) {
        Ok(sv) if sv.is_ready() => Ok(StatusCode::OK),
        Ok(_) => Ok(StatusCode::SERVICE_UNAVAILABLE),
        Err(ServeError::NotReady { .. }) | Err(ServeError::VersionNotFound { .. }) if st.manager.is_ready() => {
            Ok(StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(e) => Err(e.into()),
    }
}

async fn model_ready(State(st): State<HttpState>, Path(model): Path<String>) -> HttpResult<StatusCode> {
    ready_for(&st, &model, None)
}

async fn model_ready_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    ready_for(&st, &model, Some(parse_version(&version)?))
}

/// The model's configuration in Triton's JSON shape (dims without the batch dim when
/// `max_batch_size > 0`), plus Kiln's own fields.
pub(crate) fn config_json(sv: &ServedVersion) -> Value {
    let mb = sv.max_batch_size();
    let tensors = |ios: &[kiln::IoInfo]| -> Vec<Value> {
        ios.iter()
            .map(|io| {
                let mut dims = metadata_shape(io, mb);
                if mb > 0 && !dims.is_empty() {
                    dims.remove(0);
                }
                json!({
                    "name": io.name,
                    "data_type": format!("TYPE_{}", io.dtype.and_then(datatype_name).unwrap_or("FP32")
                        .replace("BYTES", "STRING")),
                    "dims": dims,
                })
            })
            .collect()
    };
    let raw = &sv.config.raw;
    let mut v = json!({
        "name": sv.model,
        "platform": "onnx",
        "backend": "kiln",
        "max_batch_size": mb,
        "input": tensors(&sv.inputs),
        "output": tensors(&sv.outputs),
        "instance_group": [{
            "count": sv.config.instance_count,
            "kind": if raw.instance_group.device == "cpu" { "KIND_CPU" } else { "KIND_GPU" },
            "device": raw.instance_group.device,
        }],
        "optimization": { "level": raw.optimization.level, "precision": raw.optimization.precision },
        "response_cache": { "enable": raw.response_cache.enable },
        "version_policy": format!("{:?}", sv.config.policy),
    });
    if let (Some(db), Some(obj)) = (&raw.dynamic_batching, v.as_object_mut()) {
        obj.insert(
            "dynamic_batching".into(),
            json!({
                "max_queue_delay_microseconds": db.max_queue_delay_us,
                "preferred_batch_size": db.preferred_batch_sizes,
                "max_queue_size": db.max_queue_size,
            }),
        );
    }
    v
}

async fn model_config(State(st): State<HttpState>, Path(model): Path<String>) -> HttpResult<Json<Value>> {
    let sv = st.manager.served(&model, None)?;
    Ok(Json(config_json(&sv)))
}

async fn model_config_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<Json<Value>> {
    let sv = st.manager.served(&model, Some(parse_version(&version)?))?;
    Ok(Json(config_json(&sv)))
}

#[derive(Deserialize)]
struct InferRequestJson {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

fn param_bool(p: &Map<String, Value>, key: &str) -> bool {
    p.get(key).and_then(Value::as_bool).unwrap_or(false)
}

async fn infer(
    State(st): State<HttpState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer_common(st, model, None, headers, body).await
}

async fn infer_v(
    State(st): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match parse_version(&version) {
        Ok(v) => infer_common(st, model, Some(v), headers, body).await,
        Err(e) => HttpError::from(e).into_response(),
    }
}

async fn infer_common(
    st: HttpState,
    model: String,
    version: Option<u64>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match infer_inner(st, model, version, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn infer_inner(
    st: HttpState,
    model: String,
    version: Option<u64>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResult<Response> {
    let body = body?;
    let (req, binary_out) = parse_infer_body(&model, version, &headers, &body)?;
    let resp = st.manager.infer(req).await?;
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for t in &resp.outputs {
        let mut o = json!({
            "name": t.name,
            "datatype": wire_name(t.dtype),
            "shape": t.dims,
        });
        let binary = binary_out.all || binary_out.names.iter().any(|n| n == &t.name);
        if let Some(obj) = o.as_object_mut() {
            if binary {
                let raw = tensor_to_raw(t);
                obj.insert("parameters".into(), json!({ "binary_data_size": raw.len() }));
                blobs.push(raw);
            } else {
                obj.insert("data".into(), Value::Array(tensor_to_json(t)?));
            }
        }
        outputs.push(o);
    }
    let mut doc = json!({
        "model_name": resp.model,
        "model_version": resp.version.to_string(),
        "outputs": outputs,
    });
    if let (Some(id), Some(obj)) = (&resp.id, doc.as_object_mut()) {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    let json_bytes =
        serde_json::to_vec(&doc).map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if blobs.is_empty() {
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            json_bytes,
        )
            .into_response());
    }
    let header_len = json_bytes.len();
    let mut body = json_bytes;
    for b in blobs {
        body.extend_from_slice(&b);
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_CONTENT_LENGTH),
                HeaderValue::from(header_len),
            ),
        ],
        body,
    )
        .into_response())
}

/// Decodes an infer request body (JSON, or JSON then binary tensors when the
/// `Inference-Header-Content-Length` header is present) the way `POST .../infer` does.
/// Public for the decoder fuzz tests.
#[doc(hidden)]
pub fn decode_infer_request(
    model: &str,
    version: Option<u64>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<InferRequest, ServeError> {
    parse_infer_body(model, version, headers, body).map(|(req, _)| req)
}

/// Which outputs go back as binary.
struct BinaryOutputs {
    all: bool,
    names: Vec<String>,
}

fn parse_infer_body(
    model: &str,
    version: Option<u64>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(InferRequest, BinaryOutputs), ServeError> {
    let header_len = match headers.get(HEADER_CONTENT_LENGTH) {
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ServeError::invalid("Inference-Header-Content-Length is not a number"))?;
            if n > body.len() {
                return Err(ServeError::invalid(format!(
                    "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            n
        }
        None => body.len(),
    };
    let (json_part, mut binary) = body.split_at(header_len);
    let parsed: InferRequestJson =
        serde_json::from_slice(json_part).map_err(|e| ServeError::invalid(format!("malformed request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in &parsed.inputs {
        let dtype =
            parse_datatype(&input.datatype).map_err(|e| ServeError::invalid(format!("input '{}': {e}", input.name)))?;
        let dims = dims_from_wire(&input.name, &input.shape)?;
        let tensor = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size.as_u64().and_then(|s| usize::try_from(s).ok()).ok_or_else(|| {
                    ServeError::invalid(format!("input '{}': binary_data_size is not a size", input.name))
                })?;
                if input.data.is_some() {
                    return Err(ServeError::invalid(format!(
                        "input '{}': both data and binary_data_size given",
                        input.name
                    )));
                }
                if size > binary.len() {
                    return Err(ServeError::invalid(format!(
                        "input '{}': binary_data_size {size} is more than the {} binary bytes left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                tensor_from_raw(&input.name, dtype, dims, raw)?
            }
            None => {
                let data = input
                    .data
                    .as_ref()
                    .ok_or_else(|| ServeError::invalid(format!("input '{}' has no data", input.name)))?;
                tensor_from_json(&input.name, dtype, dims, data)?
            }
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(ServeError::invalid(format!(
            "{} bytes of binary data follow the JSON but no input claims them",
            binary.len()
        )));
    }
    let binary_out = BinaryOutputs {
        all: param_bool(&parsed.parameters, "binary_data_output"),
        names: parsed
            .outputs
            .iter()
            .filter(|o| param_bool(&o.parameters, "binary_data"))
            .map(|o| o.name.clone())
            .collect(),
    };
    Ok((
        InferRequest {
            model: model.to_string(),
            version,
            id: parsed.id,
            inputs,
            outputs: parsed.outputs.into_iter().map(|o| o.name).collect(),
        },
        binary_out,
    ))
}

#[derive(Deserialize, Default)]
struct IndexRequestJson {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(State(st): State<HttpState>, body: Result<Bytes, BytesRejection>) -> HttpResult<Json<Value>> {
    let body = body?;
    let req: IndexRequestJson = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequestJson::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ServeError::invalid(format!("malformed request JSON: {e}")))?
    };
    let rows: Vec<Value> = st
        .manager
        .index()
        .iter()
        .filter(|e| !req.ready || e.state == crate::manager::VersionState::Ready)
        .map(index_json)
        .collect();
    Ok(Json(Value::Array(rows)))
}

async fn repository_load(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> HttpResult<Json<Value>> {
    authorize(&st, &headers)?;
    let manager = st.manager.clone();
    tokio::task::spawn_blocking(move || manager.load_model(&model))
        .await
        .map_err(|e| HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("load task failed: {e}")))?
        .map_err(|e| match e.kind() {
            // A model that exists but fails to load is the request's problem to fix.
            ErrorKind::Internal => HttpError(StatusCode::BAD_REQUEST, e.to_string()),
            _ => e.into(),
        })?;
    Ok(Json(json!({})))
}

async fn repository_unload(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> HttpResult<Json<Value>> {
    authorize(&st, &headers)?;
    st.manager.unload_model(&model)?;
    Ok(Json(json!({})))
}

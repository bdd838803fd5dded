//! TensorFlow Serving's REST API: model status, metadata and `:predict` in the row
//! (`instances`) and columnar (`inputs`) formats.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use kiln::{DType, IoInfo, TensorData};
use serde_json::{json, Map, Value};

use super::http::{HttpError, HttpState};
use super::{json_shape, metadata_shape, nest, parse_version, tensor_from_json, tensor_to_json};
use crate::error::ServeError;
use crate::infer::InferRequest;
use crate::manager::VersionState;

/// The TF-Serving REST routes: one catch-all under `/v1/models/` (a model name always follows),
/// parsed by [`parse_target`]. `/v1/models` itself is not matched.
pub(crate) fn routes() -> Router<HttpState> {
    Router::new().route("/v1/models/{*rest}", get(get_model).post(post_model))
}

/// What a `/v1/models/...` path names.
#[derive(Debug, PartialEq)]
struct Target {
    model: String,
    version: Option<u64>,
    /// `metadata` for GET, `predict` for POST, empty for status.
    verb: String,
}

fn parse_target(rest: &str) -> Result<Target, ServeError> {
    let (path, verb) = match rest.rsplit_once(':') {
        Some((p, v)) => (p, v.to_string()),
        None => (rest, String::new()),
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let bad = || ServeError::invalid(format!("unrecognized path '/v1/models/{rest}'"));
    let (model, version, tail) = match parts.as_slice() {
        [m] => (*m, None, None),
        [m, "metadata"] => (*m, None, Some("metadata")),
        [m, "versions", v] => (*m, Some(parse_version(v)?), None),
        [m, "versions", v, "metadata"] => (*m, Some(parse_version(v)?), Some("metadata")),
        _ => return Err(bad()),
    };
    let verb = match (tail, verb.as_str()) {
        (Some(t), "") => t.to_string(),
        (None, v) => v.to_string(),
        _ => return Err(bad()),
    };
    Ok(Target {
        model: model.to_string(),
        version,
        verb,
    })
}

fn tf_dtype(d: Option<DType>) -> &'static str {
    super::tf_grpc::data_type(d).as_str_name()
}

async fn get_model(State(st): State<HttpState>, Path(rest): Path<String>) -> Result<Json<Value>, HttpError> {
    let t = parse_target(&rest)?;
    match t.verb.as_str() {
        "" => status(&st, &t),
        "metadata" => metadata(&st, &t),
        _ => Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no GET endpoint '{}'", t.verb),
        )),
    }
}

fn status(st: &HttpState, t: &Target) -> Result<Json<Value>, HttpError> {
    let rows = st.manager.model_status(&t.model)?;
    let list: Vec<Value> = rows
        .iter()
        .filter(|r| t.version.is_none() || r.version == t.version)
        .map(|r| {
            let ok = r.state == VersionState::Ready;
            json!({
                "version": r.version.map(|v| v.to_string()).unwrap_or_default(),
                "state": if ok { "AVAILABLE" } else { "END" },
                "status": {
                    "error_code": if ok { "OK" } else { "UNKNOWN" },
                    "error_message": r.reason,
                },
            })
        })
        .collect();
    if list.is_empty() {
        if let Some(v) = t.version {
            return Err(ServeError::VersionNotFound {
                model: t.model.clone(),
                version: v,
            }
            .into());
        }
    }
    Ok(Json(json!({ "model_version_status": list })))
}

fn metadata(st: &HttpState, t: &Target) -> Result<Json<Value>, HttpError> {
    let sv = st.manager.served(&t.model, t.version)?;
    let sig = |ios: &[IoInfo]| -> Map<String, Value> {
        ios.iter()
            .map(|io| {
                let dims: Vec<Value> = metadata_shape(io, sv.max_batch_size())
                    .iter()
                    .map(|d| json!({ "size": d.to_string(), "name": "" }))
                    .collect();
                (
                    io.name.clone(),
                    json!({
                        "dtype": tf_dtype(io.dtype),
                        "tensor_shape": { "dim": dims, "unknown_rank": io.shape.is_none() },
                        "name": io.name,
                    }),
                )
            })
            .collect()
    };
    Ok(Json(json!({
        "model_spec": { "name": sv.model, "signature_name": "", "version": sv.version.to_string() },
        "metadata": { "signature_def": { "signature_def": { "serving_default": {
            "inputs": sig(&sv.inputs),
            "outputs": sig(&sv.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}},
    })))
}

async fn post_model(
    State(st): State<HttpState>,
    Path(rest): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, HttpError> {
    let body = body?;
    let t = parse_target(&rest)?;
    if t.verb != "predict" {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no POST endpoint ':{}' (only :predict)", t.verb),
        ));
    }
    let doc: Value =
        serde_json::from_slice(&body).map_err(|e| ServeError::invalid(format!("malformed request JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| ServeError::invalid("the request body must be a JSON object"))?;
    let sv = st.manager.served(&t.model, t.version)?;
    let (inputs, row_format) = predict_inputs(obj, &sv.inputs)?;
    let resp = st
        .manager
        .infer(InferRequest {
            model: t.model.clone(),
            version: t.version,
            id: None,
            inputs,
            outputs: Vec::new(),
        })
        .await?;
    let nested = |o: &TensorData| -> Result<Value, ServeError> { Ok(nest(&tensor_to_json(o)?, &o.dims)) };
    if row_format {
        let rows = resp.outputs.first().and_then(|o| o.dims.first().copied()).unwrap_or(0);
        let per_output: Vec<(String, Vec<Value>)> = resp
            .outputs
            .iter()
            .map(|o| {
                let v = nested(o)?;
                let list = match v {
                    Value::Array(items) => items,
                    other => vec![other],
                };
                Ok((o.name.clone(), list))
            })
            .collect::<Result<_, ServeError>>()?;
        let predictions: Vec<Value> = if let [(_, only)] = per_output.as_slice() {
            only.clone()
        } else {
            (0..rows)
                .map(|r| {
                    Value::Object(
                        per_output
                            .iter()
                            .map(|(n, l)| (n.clone(), l.get(r).cloned().unwrap_or(Value::Null)))
                            .collect(),
                    )
                })
                .collect()
        };
        Ok(Json(json!({ "predictions": predictions })))
    } else {
        let outputs = if let [only] = resp.outputs.as_slice() {
            nested(only)?
        } else {
            Value::Object(
                resp.outputs
                    .iter()
                    .map(|o| Ok((o.name.clone(), nested(o)?)))
                    .collect::<Result<_, ServeError>>()?,
            )
        };
        Ok(Json(json!({ "outputs": outputs })))
    }
}

/// Decodes a `:predict` body against the model's inputs: the tensors, and whether the request
/// used the row format. Public for the decoder fuzz tests.
#[doc(hidden)]
pub fn decode_predict(body: &[u8], inputs_info: &[IoInfo]) -> Result<(Vec<TensorData>, bool), ServeError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| ServeError::invalid(format!("malformed request JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| ServeError::invalid("the request body must be a JSON object"))?;
    predict_inputs(obj, inputs_info)
}

/// The input tensors of a `:predict` request object (row or columnar format) and whether it
/// used the row format.
fn predict_inputs(obj: &Map<String, Value>, inputs_info: &[IoInfo]) -> Result<(Vec<TensorData>, bool), ServeError> {
    let dtype_of = |name: &str| -> DType {
        inputs_info
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| i.dtype)
            .unwrap_or(DType::F32)
    };
    let single_input = match inputs_info {
        [only] => Some(only.name.clone()),
        _ => None,
    };
    let (columns, row_format): (Vec<(String, Value)>, bool) = match (obj.get("instances"), obj.get("inputs")) {
        (Some(_), Some(_)) => return Err(ServeError::invalid("give either 'instances' or 'inputs', not both")),
        (Some(Value::Array(rows)), None) => (rows_to_columns(rows, single_input.as_deref())?, true),
        (Some(_), None) => return Err(ServeError::invalid("'instances' must be a list")),
        (None, Some(Value::Object(named)))
            if single_input.is_none() || !named.is_empty() && is_named(named, inputs_info) =>
        {
            (named.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), false)
        }
        (None, Some(v)) => {
            let name = single_input
                .ok_or_else(|| ServeError::invalid("the model has several inputs: 'inputs' must name them"))?;
            (vec![(name, v.clone())], false)
        }
        (None, None) => return Err(ServeError::invalid("the request needs 'instances' or 'inputs'")),
    };
    let mut inputs = Vec::with_capacity(columns.len());
    for (name, value) in &columns {
        let dims = json_shape(name, value)?;
        inputs.push(tensor_from_json(name, dtype_of(name), dims, value)?);
    }
    Ok((inputs, row_format))
}

fn is_named(obj: &Map<String, Value>, inputs: &[IoInfo]) -> bool {
    obj.keys().all(|k| inputs.iter().any(|i| &i.name == k))
}

/// Row format: each instance is one row of every input; stacks them into columns.
fn rows_to_columns(rows: &[Value], single_input: Option<&str>) -> Result<Vec<(String, Value)>, ServeError> {
    if rows.is_empty() {
        return Err(ServeError::invalid("'instances' is empty"));
    }
    let mut names: Vec<String> = Vec::new();
    let mut columns: Vec<Vec<Value>> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match (row, single_input) {
            (Value::Object(named), _) => {
                if i == 0 {
                    names = named.keys().cloned().collect();
                    columns = vec![Vec::with_capacity(rows.len()); names.len()];
                }
                if named.len() != names.len() {
                    return Err(ServeError::invalid(format!(
                        "instance {i} names different inputs than instance 0"
                    )));
                }
                for (name, col) in names.iter().zip(columns.iter_mut()) {
                    let v = named
                        .get(name)
                        .ok_or_else(|| ServeError::invalid(format!("instance {i} lacks input '{name}'")))?;
                    col.push(v.clone());
                }
            }
            (other, Some(name)) => {
                if i == 0 {
                    names = vec![name.to_string()];
                    columns = vec![Vec::with_capacity(rows.len())];
                }
                match columns.first_mut() {
                    Some(col) if names.len() == 1 => col.push(other.clone()),
                    _ => return Err(ServeError::invalid("instances mix named and unnamed rows")),
                }
            }
            (_, None) => {
                return Err(ServeError::invalid(
                    "the model has several inputs: each instance must be an object naming them",
                ))
            }
        }
    }
    Ok(names
        .into_iter()
        .zip(columns)
        .map(|(n, c)| (n, Value::Array(c)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = parse_target("mlp:predict").unwrap();
        assert_eq!((t.model.as_str(), t.version, t.verb.as_str()), ("mlp", None, "predict"));
        let t = parse_target("mlp/versions/3:predict").unwrap();
        assert_eq!(
            (t.model.as_str(), t.version, t.verb.as_str()),
            ("mlp", Some(3), "predict")
        );
        let t = parse_target("mlp/versions/2/metadata").unwrap();
        assert_eq!((t.version, t.verb.as_str()), (Some(2), "metadata"));
        assert_eq!(parse_target("mlp").unwrap().verb, "");
        assert!(parse_target("mlp/versions/x").is_err());
        assert!(parse_target("mlp/a/b/c/d").is_err());
        assert!(parse_target("mlp/metadata:predict").is_err());
    }

    #[test]
    fn rows_become_columns() {
        let rows = vec![json!({"a": [1, 2], "b": 3}), json!({"a": [4, 5], "b": 6})];
        let cols = rows_to_columns(&rows, None).unwrap();
        assert_eq!(cols[0], ("a".to_string(), json!([[1, 2], [4, 5]])));
        assert_eq!(cols[1], ("b".to_string(), json!([3, 6])));
        let cols = rows_to_columns(&[json!([1, 2]), json!([3, 4])], Some("x")).unwrap();
        assert_eq!(cols, vec![("x".to_string(), json!([[1, 2], [3, 4]]))]);
        assert!(rows_to_columns(&[json!([1])], None).is_err());
        assert!(rows_to_columns(&[], Some("x")).is_err());
    }
}

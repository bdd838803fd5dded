//! Wire formats. Each protocol converts its requests to [`crate::InferRequest`] and
//! [`crate::InferResponse`] back; the tensor conversions they share live here, and so does the
//! HTTP router ([`http_router`]) to which each HTTP protocol contributes its `routes()`.

pub mod http;
pub mod kserve_generate;
pub mod kserve_v2_grpc;
pub mod kserve_v2_http;
pub mod openai;
pub mod tf_grpc;
pub mod tf_rest;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use half::{bf16, f16};
use kiln::{DType, IoInfo, TensorData};
use serde_json::Value;

use self::http::HttpState;
use crate::error::{Result, ServeError};

/// The HTTP port's router: each HTTP protocol adds its routes over the shared [`HttpState`] with
/// one `merge` line, `/metrics` is served too, any other path gets a JSON 404, and request bodies
/// are limited to `max_body_bytes`.
///
/// The protocols split the paths between them; axum panics when two claim the same route, so a
/// new protocol must stay in its own part:
/// - KServe v2 ([`kserve_v2_http`]): everything under `/v2`, except
///   `/v2/models/{model}[/versions/{v}]/generate[_stream]`, the generate extension for `[llm]`
///   models ([`kserve_generate`]).
/// - TF-Serving REST ([`tf_rest`]): `/v1/models/{name}[/versions/{v}][:predict|:classify|:regress|/metadata]`,
///   that is every path that has at least one segment after `/v1/models/` (one catch-all route;
///   `:classify` and `:regress` are not implemented and answer 404).
/// - OpenAI-compatible ([`openai`], `[llm]` models only): `POST /v1/completions`, `POST /v1/chat/completions` and
///   `GET /v1/models` with no further segment, which the TF-Serving catch-all does not match.
///   OpenAI's `GET /v1/models/{model}` is TF-Serving's model status here and stays so.
/// - `/metrics`.
pub fn http_router(state: HttpState, max_body_bytes: usize) -> Router {
    Router::new()
        .merge(kserve_v2_http::routes())
        .merge(kserve_generate::routes())
        .merge(tf_rest::routes())
        .merge(openai::routes())
        .merge(http::metrics_routes())
        .fallback(http::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A router serving only `/metrics` (the separate metrics port).
pub fn metrics_router(state: HttpState) -> Router {
    http::metrics_routes().fallback(http::not_found).with_state(state)
}

/// A model version from a path or request field: a positive integer.
pub(crate) fn parse_version(v: &str) -> Result<u64> {
    v.parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ServeError::invalid(format!("model version '{v}' is not a positive integer")))
}

/// KServe v2 / Triton datatype name of a dtype (`None` for types the protocol lacks).
pub fn datatype_name(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::Bool => "BOOL",
        DType::U8 => "UINT8",
        DType::U16 => "UINT16",
        DType::U32 => "UINT32",
        DType::U64 => "UINT64",
        DType::I8 => "INT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::String => "BYTES",
        _ => return None,
    })
}

/// The dtype of a KServe v2 datatype name.
pub fn parse_datatype(name: &str) -> Result<DType> {
    Ok(match name {
        "BOOL" => DType::Bool,
        "UINT8" => DType::U8,
        "UINT16" => DType::U16,
        "UINT32" => DType::U32,
        "UINT64" => DType::U64,
        "INT8" => DType::I8,
        "INT16" => DType::I16,
        "INT32" => DType::I32,
        "INT64" => DType::I64,
        "FP16" => DType::F16,
        "BF16" => DType::BF16,
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "BYTES" => DType::String,
        other => return Err(ServeError::invalid(format!("unsupported datatype '{other}'"))),
    })
}

/// Wire datatype name, falling back to the ONNX name for types KServe lacks.
pub fn wire_name(d: DType) -> &'static str {
    datatype_name(d).unwrap_or(d.name())
}

/// Tensor shape from the wire (`int64`s): negative dims are refused.
pub fn dims_from_wire(name: &str, shape: &[i64]) -> Result<Vec<usize>> {
    shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| ServeError::invalid(format!("input '{name}': negative dim {d} in shape")))
        })
        .collect()
}

/// Shape for metadata: unknown or symbolic dims (and the batch dim) are -1.
pub fn metadata_shape(info: &IoInfo, max_batch_size: usize) -> Vec<i64> {
    match &info.shape {
        Some(s) => {
            s.0.iter()
                .enumerate()
                .map(|(i, d)| match d.known() {
                    Some(n) if !(i == 0 && max_batch_size > 0) => n as i64,
                    _ => -1,
                })
                .collect()
        }
        None => vec![-1],
    }
}

fn element_count(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ServeError::invalid(format!("input '{name}': shape {dims:?} overflows")))
}

/// Limit on elements built from JSON, so a tiny body cannot claim a huge shape.
fn check_count(name: &str, dims: &[usize], got: usize) -> Result<()> {
    let want = element_count(name, dims)?;
    if want != got {
        return Err(ServeError::invalid(format!(
            "input '{name}': shape {dims:?} needs {want} elements, the data has {got}"
        )));
    }
    Ok(())
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

fn bad_element(name: &str, dtype: DType, v: &Value) -> ServeError {
    let shown: String = v.to_string().chars().take(40).collect();
    ServeError::invalid(format!(
        "input '{name}': {shown} is not a valid {} value",
        wire_name(dtype)
    ))
}

/// Builds a tensor from JSON data (flat or nested, row-major) with the given shape.
pub fn tensor_from_json(name: &str, dtype: DType, dims: Vec<usize>, data: &Value) -> Result<TensorData> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    check_count(name, &dims, flat.len())?;
    let bad = |v: &Value| bad_element(name, dtype, v);
    let tensor = if dtype == DType::String {
        let strings = flat
            .iter()
            .map(|v| v.as_str().map(|s| s.as_bytes().to_vec()).ok_or_else(|| bad(v)))
            .collect::<Result<Vec<_>>>()?;
        TensorData::strings(name, dims, strings)
    } else {
        let mut bytes = Vec::with_capacity(flat.len() * dtype.size_in_bytes());
        for v in &flat {
            encode_json_element(dtype, v, &mut bytes).ok_or_else(|| bad(v))?;
        }
        TensorData::new(name, dtype, dims, bytes)
    };
    tensor.map_err(|e| ServeError::invalid(e.to_string()))
}

fn int_in<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
    if let Some(i) = v.as_i64() {
        return T::try_from(i).ok();
    }
    v.as_u64().and_then(|u| T::try_from(u).ok())
}

fn encode_json_element(dtype: DType, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    match dtype {
        DType::Bool => out.push(match v {
            Value::Bool(b) => u8::from(*b),
            Value::Number(n) if n.as_u64() == Some(0) => 0,
            Value::Number(n) if n.as_u64() == Some(1) => 1,
            _ => return None,
        }),
        DType::U8 => out.extend(int_in::<u8>(v)?.to_le_bytes()),
        DType::U16 => out.extend(int_in::<u16>(v)?.to_le_bytes()),
        DType::U32 => out.extend(int_in::<u32>(v)?.to_le_bytes()),
        DType::U64 => out.extend(int_in::<u64>(v)?.to_le_bytes()),
        DType::I8 => out.extend(int_in::<i8>(v)?.to_le_bytes()),
        DType::I16 => out.extend(int_in::<i16>(v)?.to_le_bytes()),
        DType::I32 => out.extend(int_in::<i32>(v)?.to_le_bytes()),
        DType::I64 => out.extend(int_in::<i64>(v)?.to_le_bytes()),
        DType::F32 => out.extend((v.as_f64()? as f32).to_le_bytes()),
        DType::F64 => out.extend(v.as_f64()?.to_le_bytes()),
        DType::F16 => out.extend(f16::from_f64(v.as_f64()?).to_le_bytes()),
        DType::BF16 => out.extend(bf16::from_f64(v.as_f64()?).to_le_bytes()),
        _ => return None,
    }
    Some(())
}

/// A tensor's elements as a flat JSON array (FP16/BF16 widened to numbers, BYTES as strings).
pub fn tensor_to_json(t: &TensorData) -> Result<Vec<Value>> {
    if let Some(strings) = t.string_data() {
        return Ok(strings
            .iter()
            .map(|s| Value::String(String::from_utf8_lossy(s).into_owned()))
            .collect());
    }
    let b = t.bytes();
    let chunks = |n: usize| b.chunks_exact(n);
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match t.dtype {
        DType::Bool => b.iter().map(|&x| Value::Bool(x != 0)).collect(),
        DType::U8 => b.iter().map(|&x| Value::from(x)).collect(),
        DType::I8 => b.iter().map(|&x| Value::from(x as i8)).collect(),
        DType::U16 => chunks(2)
            .map(|c| Value::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::I16 => chunks(2)
            .map(|c| Value::from(i16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::U32 => chunks(4).map(|c| Value::from(u32::from_le_bytes(arr4(c)))).collect(),
        DType::I32 => chunks(4).map(|c| Value::from(i32::from_le_bytes(arr4(c)))).collect(),
        DType::U64 => chunks(8).map(|c| Value::from(u64::from_le_bytes(arr8(c)))).collect(),
        DType::I64 => chunks(8).map(|c| Value::from(i64::from_le_bytes(arr8(c)))).collect(),
        DType::F32 => chunks(4).map(|c| num(f32::from_le_bytes(arr4(c)) as f64)).collect(),
        DType::F64 => chunks(8).map(|c| num(f64::from_le_bytes(arr8(c)))).collect(),
        DType::F16 => chunks(2)
            .map(|c| num(f16::from_le_bytes([c[0], c[1]]).to_f64()))
            .collect(),
        DType::BF16 => chunks(2)
            .map(|c| num(bf16::from_le_bytes([c[0], c[1]]).to_f64()))
            .collect(),
        other => {
            return Err(ServeError::Server(format!(
                "output '{}' has dtype {other}, which JSON cannot carry; ask for binary output",
                t.name
            )))
        }
    })
}

fn arr4(c: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(c);
    a
}

fn arr8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

/// Builds a tensor from raw little-endian bytes (binary extension, gRPC raw contents).
/// BYTES elements are each a 4-byte little-endian length followed by the bytes.
pub fn tensor_from_raw(name: &str, dtype: DType, dims: Vec<usize>, raw: &[u8]) -> Result<TensorData> {
    let count = element_count(name, &dims)?;
    if dtype == DType::String {
        let mut strings = Vec::with_capacity(count.min(raw.len() / 4 + 1));
        let mut rest = raw;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| ServeError::invalid(format!("input '{name}': truncated BYTES element length")))?;
            let len = u32::from_le_bytes(*len) as usize;
            let s = tail
                .get(..len)
                .ok_or_else(|| ServeError::invalid(format!("input '{name}': BYTES element longer than the data")))?;
            strings.push(s.to_vec());
            rest = &tail[len..];
        }
        check_count(name, &dims, strings.len())?;
        return TensorData::strings(name, dims, strings).map_err(|e| ServeError::invalid(e.to_string()));
    }
    let want = dtype
        .packed_size(count)
        .ok_or_else(|| ServeError::invalid(format!("input '{name}': shape {dims:?} overflows")))?;
    if want != raw.len() {
        return Err(ServeError::invalid(format!(
            "input '{name}': shape {dims:?} of {} needs {want} bytes, got {}",
            wire_name(dtype),
            raw.len()
        )));
    }
    TensorData::new(name, dtype, dims, raw.to_vec()).map_err(|e| ServeError::invalid(e.to_string()))
}

/// A tensor's raw bytes in the wire layout (see [`tensor_from_raw`]).
pub fn tensor_to_raw(t: &TensorData) -> Vec<u8> {
    match t.string_data() {
        Some(strings) => {
            let mut out = Vec::with_capacity(strings.iter().map(|s| s.len() + 4).sum());
            for s in strings {
                out.extend((s.len() as u32).to_le_bytes());
                out.extend_from_slice(s);
            }
            out
        }
        None => t.bytes().to_vec(),
    }
}

/// The shape of nested JSON arrays (rectangular only); a scalar has shape [].
pub fn json_shape(name: &str, v: &Value) -> Result<Vec<usize>> {
    let mut dims = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        dims.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    check_rect(name, v, &dims)?;
    Ok(dims)
}

fn check_rect(name: &str, v: &Value, dims: &[usize]) -> Result<()> {
    match (v, dims.split_first()) {
        (Value::Array(items), Some((&n, rest))) => {
            if items.len() != n {
                return Err(ServeError::invalid(format!("input '{name}': ragged nested arrays")));
            }
            items.iter().try_for_each(|x| check_rect(name, x, rest))
        }
        (Value::Array(_), None) => Err(ServeError::invalid(format!("input '{name}': ragged nested arrays"))),
        (_, Some(_)) => Err(ServeError::invalid(format!("input '{name}': ragged nested arrays"))),
        (_, None) => Ok(()),
    }
}

/// Nests a flat array into `dims` (row-major).
pub fn nest(flat: &[Value], dims: &[usize]) -> Value {
    match dims.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((_, rest)) => {
            let inner: usize = rest.iter().product();
            if inner == 0 {
                return Value::Array(vec![Value::Array(vec![]); dims[0]]);
            }
            Value::Array(flat.chunks(inner).map(|c| nest(c, rest)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let t = tensor_from_json("x", DType::F32, vec![2, 2], &json!([[1.5, -2], [0.1, 3]])).unwrap();
        assert_eq!(t.values::<f32>().unwrap(), vec![1.5, -2.0, 0.1, 3.0]);
        let back = tensor_to_json(&t).unwrap();
        let parsed: Vec<f32> = back.iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(parsed, vec![1.5, -2.0, 0.1, 3.0]);
        let i = tensor_from_json("i", DType::I32, vec![3], &json!([1, -2, 2147483647])).unwrap();
        assert_eq!(i.values::<i32>().unwrap(), vec![1, -2, i32::MAX]);
        let b = tensor_from_json("b", DType::Bool, vec![2], &json!([true, false])).unwrap();
        assert_eq!(tensor_to_json(&b).unwrap(), vec![json!(true), json!(false)]);
    }

    #[test]
    fn json_errors() {
        assert!(tensor_from_json("x", DType::F32, vec![3], &json!([1, 2])).is_err());
        assert!(tensor_from_json("x", DType::I32, vec![1], &json!([1.5])).is_err());
        assert!(tensor_from_json("x", DType::I8, vec![1], &json!([300])).is_err());
        assert!(tensor_from_json("x", DType::F32, vec![1], &json!(["a"])).is_err());
        assert!(tensor_from_json("x", DType::U8, vec![1], &json!([-1])).is_err());
    }

    #[test]
    fn raw_round_trip_and_errors() {
        let t = tensor_from_raw(
            "x",
            DType::I64,
            vec![2],
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        )
        .unwrap();
        assert_eq!(t.values::<i64>().unwrap(), vec![1, 2]);
        assert!(tensor_from_raw("x", DType::I64, vec![2], &[0; 15]).is_err());
        let s = TensorData::strings("s", vec![2], vec![b"ab".to_vec(), b"".to_vec()]).unwrap();
        let raw = tensor_to_raw(&s);
        assert_eq!(raw, vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        let back = tensor_from_raw("s", DType::String, vec![2], &raw).unwrap();
        assert_eq!(back.string_data().unwrap(), s.string_data().unwrap());
        assert!(tensor_from_raw("s", DType::String, vec![2], &raw[..7]).is_err());
        assert!(tensor_from_raw("s", DType::String, vec![3], &raw).is_err());
    }

    #[test]
    fn shapes_and_nesting() {
        assert_eq!(json_shape("x", &json!([[1, 2, 3], [4, 5, 6]])).unwrap(), vec![2, 3]);
        assert_eq!(json_shape("x", &json!(5)).unwrap(), Vec::<usize>::new());
        assert!(json_shape("x", &json!([[1, 2], [3]])).is_err());
        assert!(json_shape("x", &json!([[1, 2], 3])).is_err());
        let flat: Vec<Value> = (0..6).map(Value::from).collect();
        assert_eq!(nest(&flat, &[2, 3]), json!([[0, 1, 2], [3, 4, 5]]));
        assert!(dims_from_wire("x", &[2, -1]).is_err());
        assert_eq!(dims_from_wire("x", &[2, 0]).unwrap(), vec![2, 0]);
    }
}

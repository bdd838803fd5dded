//! Fuzzing every request decoder of `kiln serve`: KServe v2 JSON infer bodies with the binary
//! tensor extension (`Inference-Header-Content-Length`), TF-Serving REST `:predict` bodies (row
//! and columnar formats), and the gRPC `ModelInferRequest` conversion (typed contents and
//! `raw_input_contents`, decoded from mutated protobuf bytes). Inputs come from structured
//! generation (`arbitrary`) and byte-level mutation of valid requests for the shipped `mlp` and
//! `simple` models; the decoders are called directly. `fuzz_live_server` sends a smaller number
//! of mutants of each kind through a running server: every request must get an answer, none may
//! report a caught panic, and the server must still be ready afterwards.
//!
//! A panic is a crash (see `kiln-fuzz`: inputs saved under the target tmp dir). Budget:
//! `KILN_FUZZ_ITERS` (`N` or `10x`). Crashes found are kept below as named regression tests.

#[allow(dead_code)]
#[path = "serve/common.rs"]
mod common;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use kiln::{DType, IoInfo, Session};
use kiln_fuzz::arbitrary::{Arbitrary, Result as AResult, Unstructured};
use kiln_fuzz::{iterations, mutate, Fuzzer, Rng};
use kiln_serve::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln_serve::proto::{InferParameter, InferTensorContents, ModelInferRequest};
use kiln_serve::protocols::kserve_v2_grpc::to_infer_request;
use kiln_serve::protocols::kserve_v2_http::{decode_infer_request, HEADER_CONTENT_LENGTH};
use kiln_serve::protocols::tf_rest::decode_predict;
use prost::Message;
use serde_json::{json, Map, Value};

/// Decoder executions per protocol in a default run (2-4 s per harness in a debug build on 2 cores).
const DEFAULT_ITERS: usize = 50_000;
/// Requests per protocol through the live server in a default run.
const DEFAULT_LIVE: usize = 400;
/// Largest mutant (bytes).
const MAX_LEN: usize = 4096;

const DATATYPES: &[&str] = &[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64",
    "BYTES", "FP8", "", "fp32", "STRING",
];
const NAMES: &[&str] = &[
    "input",
    "INPUT0",
    "INPUT1",
    "x",
    "logits",
    "probabilities",
    "OUTPUT0",
    "",
];
const DIMS: &[i64] = &[
    0,
    1,
    2,
    3,
    4,
    16,
    -1,
    -4,
    1 << 31,
    1 << 32,
    i64::MAX,
    i64::MIN,
    (1 << 62) + 1,
];

fn mlp_request(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows * 4).map(|i| i as f32 / 4.0 - 1.0).collect();
    json!({"id": "r1", "inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data}]})
}

fn simple_request() -> Value {
    let a: Vec<i32> = (0..16).collect();
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [a.clone()]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": a},
    ], "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT1", "parameters": {"binary_data": true}}]})
}

/// A KServe body and its `Inference-Header-Content-Length` (`None`: no header), serialized for
/// the fuzzer as `#<header>\n<body>` or just `<body>`.
#[derive(Debug, Clone, PartialEq)]
struct KServeCase {
    header: Option<String>,
    body: Vec<u8>,
}

impl KServeCase {
    fn to_bytes(&self) -> Vec<u8> {
        match &self.header {
            Some(h) => {
                let mut out = format!("#{h}\n").into_bytes();
                out.extend_from_slice(&self.body);
                out
            }
            None => self.body.clone(),
        }
    }

    fn from_bytes(b: &[u8]) -> Self {
        if let Some(rest) = b.strip_prefix(b"#") {
            let nl = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            return KServeCase {
                header: Some(String::from_utf8_lossy(&rest[..nl]).into_owned()),
                body: rest.get(nl + 1..).unwrap_or_default().to_vec(),
            };
        }
        KServeCase {
            header: None,
            body: b.to_vec(),
        }
    }

    /// JSON then binary tensors, with the header naming the JSON length.
    fn binary(doc: &Value, tail: &[u8]) -> Self {
        let mut body = serde_json::to_vec(doc).unwrap();
        let header = Some(body.len().to_string());
        body.extend_from_slice(tail);
        KServeCase { header, body }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = &self.header {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                h.insert(HEADER_CONTENT_LENGTH, v);
            }
        }
        h
    }
}

fn kserve_seeds() -> Vec<Vec<u8>> {
    let raw: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let ints: Vec<u8> = (0..16).flat_map(|i: i32| i.to_le_bytes()).collect();
    let strings: Vec<u8> = [&b"ab"[..], b"", b"xyz"]
        .iter()
        .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.iter().copied()))
        .collect();
    let plain = |v: Value| KServeCase {
        header: None,
        body: serde_json::to_vec(&v).unwrap(),
    };
    [
        plain(mlp_request(1)),
        plain(mlp_request(3)),
        plain(simple_request()),
        plain(json!({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP16", "data": [[1, 2], [3, 65504]]},
                                {"name": "b", "shape": [3], "datatype": "BOOL", "data": [true, false, 1]},
                                {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                                {"name": "u", "shape": [2], "datatype": "UINT64", "data": [0, 18446744073709551615u64]}],
                     "parameters": {"binary_data_output": true}})),
        KServeCase::binary(
            &json!({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                "parameters": {"binary_data_size": 32}}],
                    "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}),
            &raw,
        ),
        KServeCase::binary(
            &json!({"inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}]}),
            &[ints.clone(), ints].concat(),
        ),
        KServeCase::binary(
            &json!({"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES",
                                "parameters": {"binary_data_size": strings.len()}}]}),
            &strings,
        ),
    ]
    .iter()
    .map(KServeCase::to_bytes)
    .collect()
}

fn tf_seeds() -> Vec<Vec<u8>> {
    let a: Vec<i32> = (0..16).collect();
    [
        json!({"instances": [[1.0, 2.0, 3.0, 4.0], [0.5, -1, 0, 2]]}),
        json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}),
        json!({"inputs": {"input": [[1.0, 2.0, 3.0, 4.0]]}}),
        json!({"instances": [{"INPUT0": a.clone(), "INPUT1": a.clone()}]}),
        json!({"inputs": {"INPUT0": [a.clone()], "INPUT1": [a]}}),
        json!({"signature_name": "serving_default", "instances": [{"b": true, "i": 3, "s": "x", "h": [1.5, 2]}]}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect()
}

fn grpc_seeds() -> Vec<Vec<u8>> {
    let input = |name: &str, dt: &str, shape: &[i64], contents: Option<InferTensorContents>| InferInputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape: shape.to_vec(),
        contents,
        ..Default::default()
    };
    let f32s: Vec<f32> = (0..8).map(|i| i as f32 / 3.0).collect();
    let raw_f32: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ints: Vec<u8> = (0..16).flat_map(|i: i32| i.to_le_bytes()).collect();
    let out = |n: &str| InferRequestedOutputTensor {
        name: n.into(),
        ..Default::default()
    };
    let reqs = [
        ModelInferRequest {
            model_name: "mlp".into(),
            model_version: "1".into(),
            id: "g1".into(),
            inputs: vec![input("input", "FP32", &[2, 4], None)],
            outputs: vec![out("logits")],
            raw_input_contents: vec![raw_f32],
            ..Default::default()
        },
        ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![
                input("INPUT0", "INT32", &[1, 16], None),
                input("INPUT1", "INT32", &[1, 16], None),
            ],
            raw_input_contents: vec![ints.clone(), ints],
            ..Default::default()
        },
        ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![input(
                "input",
                "FP32",
                &[2, 4],
                Some(InferTensorContents {
                    fp32_contents: f32s,
                    ..Default::default()
                }),
            )],
            ..Default::default()
        },
        ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![
                input(
                    "INPUT0",
                    "INT32",
                    &[1, 16],
                    Some(InferTensorContents {
                        int_contents: (0..16).collect(),
                        ..Default::default()
                    }),
                ),
                input(
                    "s",
                    "BYTES",
                    &[2],
                    Some(InferTensorContents {
                        bytes_contents: vec![b"a".to_vec(), vec![]],
                        ..Default::default()
                    }),
                ),
                input(
                    "u8",
                    "UINT8",
                    &[3],
                    Some(InferTensorContents {
                        uint_contents: vec![0, 255, 7],
                        ..Default::default()
                    }),
                ),
            ],
            parameters: [(
                "priority".to_string(),
                InferParameter {
                    parameter_choice: Some(kiln_serve::proto::infer_parameter::ParameterChoice::Int64Param(1)),
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        },
    ];
    reqs.iter().map(Message::encode_to_vec).collect()
}

/// Input lists the TF-Serving decoder resolves names and dtypes against: the shipped models and
/// one with every JSON-carried dtype.
fn tf_input_sets() -> Vec<Vec<IoInfo>> {
    let repo = common::shipped_repo();
    let mut sets: Vec<Vec<IoInfo>> = ["mlp", "simple"]
        .iter()
        .map(|m| {
            Session::builder()
                .build_from_file(repo.join(m).join("1/model.onnx"))
                .unwrap()
                .inputs()
                .to_vec()
        })
        .collect();
    let info = |name: &str, d: DType| IoInfo {
        name: name.into(),
        dtype: Some(d),
        shape: None,
    };
    sets.push(vec![
        info("b", DType::Bool),
        info("i", DType::I8),
        info("s", DType::String),
        info("h", DType::F16),
        info("u", DType::U64),
        info("bf", DType::BF16),
    ]);
    sets
}

/// A JSON leaf: numbers at the edges of every width, strings, bools, null, or a small container.
fn json_leaf(u: &mut Unstructured, depth: u32) -> AResult<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0 => json!(*u.choose(&[
            0i64,
            -1,
            1,
            127,
            128,
            255,
            256,
            -129,
            65535,
            65536,
            i32::MAX as i64,
            i64::MIN
        ])?),
        1 => json!(*u.choose(&[u64::MAX, 1 << 32, i64::MAX as u64 + 1])?),
        2 => json!(*u.choose(&[
            0.5f64,
            -0.0,
            1e300,
            -1e300,
            3.5e38,
            65520.0,
            1e-320,
            f64::from(f32::MAX)
        ])?),
        3 => json!(bool::arbitrary(u)?),
        4 => Value::Null,
        5 => json!(u.choose(&["", "a", "1", "\u{0}", "\u{1F525}"])?),
        6 if depth < 4 => json_array(u, depth + 1)?,
        7 if depth < 4 => {
            let mut m = Map::new();
            for _ in 0..u.int_in_range(0..=2)? {
                m.insert(u.choose(NAMES)?.to_string(), json_leaf(u, depth + 1)?);
            }
            Value::Object(m)
        }
        _ => json!(u.int_in_range(-3..=3)?),
    })
}

fn json_array(u: &mut Unstructured, depth: u32) -> AResult<Value> {
    let n = u.int_in_range(0..=4)?;
    Ok(Value::Array(
        (0..n).map(|_| json_leaf(u, depth)).collect::<AResult<_>>()?,
    ))
}

/// A valid-looking element for a datatype (sometimes out of range).
fn element(u: &mut Unstructured, dt: &str) -> AResult<Value> {
    if u.ratio(1, 8)? {
        return json_leaf(u, 3);
    }
    Ok(match dt {
        "BOOL" => json!(bool::arbitrary(u)?),
        "BYTES" => json!(u.choose(&["", "a", "bc", "\u{7f}"])?),
        "FP16" | "BF16" | "FP32" | "FP64" => json!(f64::from(i16::arbitrary(u)?) / 8.0),
        "UINT64" => json!(u64::arbitrary(u)?),
        "INT64" => json!(i64::arbitrary(u)?),
        _ => json!(i32::from(i8::arbitrary(u)?)),
    })
}

/// Bytes per element of a KServe datatype (4 for unknown names).
fn width_of(dt: &str) -> usize {
    match dt {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => 4,
    }
}

/// Nests `flat` into `dims` (row-major); a `[]` shape gives the scalar.
fn nested(flat: &[Value], dims: &[usize]) -> Value {
    match dims.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((&n, rest)) => {
            let inner: usize = rest.iter().product::<usize>().max(1);
            Value::Array(
                (0..n)
                    .map(|i| nested(flat.get(i * inner..).unwrap_or(&[]), rest))
                    .collect(),
            )
        }
    }
}

/// Inputs the shipped models take: `mlp` (FP32 [batch, 4], max batch 16) and `simple` (INT32
/// [1, 16] twice), with batch sizes around the limit and dims one off.
const SPECS: &[(&str, &str, &[usize])] = &[
    ("input", "FP32", &[1, 4]),
    ("input", "FP32", &[2, 4]),
    ("input", "FP32", &[16, 4]),
    ("input", "FP32", &[17, 4]),
    ("input", "FP32", &[0, 4]),
    ("input", "FP32", &[2, 3]),
    ("input", "FP32", &[4]),
    ("input", "FP16", &[1, 4]),
    ("INPUT0", "INT32", &[1, 16]),
    ("INPUT1", "INT32", &[1, 16]),
    ("INPUT0", "INT32", &[2, 16]),
    ("INPUT1", "INT32", &[1, 0]),
    ("INPUT0", "INT64", &[1, 16]),
];

/// Name, datatype, element dims and wire shape of one input: half the time one of [`SPECS`],
/// else any name and datatype with small dims, plus dims from the edge values now and then.
fn input_spec(u: &mut Unstructured) -> AResult<(String, &'static str, Vec<usize>, Vec<i64>)> {
    let (name, dt, dims) = if u.ratio(1, 2)? {
        let (n, d, dims) = *u.choose(SPECS)?;
        (n.to_string(), d, dims.to_vec())
    } else {
        let dims = (0..u.int_in_range(0..=3)?)
            .map(|_| u.int_in_range(0..=4))
            .collect::<AResult<_>>()?;
        (u.choose(NAMES)?.to_string(), *u.choose(DATATYPES)?, dims)
    };
    let mut shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    if u.ratio(1, 3)? {
        for _ in 0..u.int_in_range(1..=3)? {
            let i = u.choose_index(shape.len() + 1)?;
            shape.insert(i, *u.choose(DIMS)?);
        }
    }
    Ok((name, dt, dims, shape))
}

/// A structured KServe request: a few inputs whose shape, datatype, data and binary parts mostly
/// agree, with one field at a time pushed off.
fn gen_kserve(u: &mut Unstructured) -> AResult<KServeCase> {
    let mut inputs = Vec::new();
    let mut tail = Vec::new();
    let mut binary_any = false;
    for _ in 0..u.int_in_range(0..=3)? {
        let (name, dt, dims, shape) = input_spec(u)?;
        let count: usize = dims.iter().product();
        let mut obj = Map::new();
        obj.insert("name".into(), json!(name));
        obj.insert("shape".into(), json!(shape));
        obj.insert("datatype".into(), json!(dt));
        if u.ratio(1, 3)? {
            // binary: raw little-endian elements or length-prefixed BYTES
            let width = width_of(dt);
            let mut raw = if dt == "BYTES" {
                let mut r = Vec::new();
                for _ in 0..count {
                    let len = u.int_in_range(0..=3)?;
                    let s = u.bytes(len)?;
                    r.extend((s.len() as u32).to_le_bytes());
                    r.extend_from_slice(s);
                }
                r
            } else {
                u.bytes(count * width)?.to_vec()
            };
            if u.ratio(1, 5)? {
                raw.truncate(u.choose_index(raw.len() + 1)?);
            }
            let size = if u.ratio(1, 6)? {
                json!(*u.choose(&[-1i64, i64::MAX, 1 << 40])?)
            } else if u.ratio(1, 10)? {
                json!("8")
            } else {
                json!(raw.len())
            };
            obj.insert("parameters".into(), json!({ "binary_data_size": size }));
            if u.ratio(1, 10)? {
                obj.insert("data".into(), json!([1]));
            }
            tail.extend_from_slice(&raw);
            binary_any = true;
        } else {
            let flat: Vec<Value> = (0..count + usize::from(u.ratio(1, 8)?))
                .map(|_| element(u, dt))
                .collect::<AResult<_>>()?;
            let data = if u.ratio(1, 2)? {
                nested(&flat, &dims)
            } else {
                Value::Array(flat)
            };
            if !u.ratio(1, 20)? {
                obj.insert("data".into(), data);
            }
        }
        inputs.push(Value::Object(obj));
    }
    let mut doc = Map::new();
    if u.ratio(1, 3)? {
        doc.insert("id".into(), if u.ratio(1, 4)? { json!(7) } else { json!("id") });
    }
    if !u.ratio(1, 20)? {
        doc.insert("inputs".into(), Value::Array(inputs));
    }
    if u.ratio(1, 3)? {
        let outs: Vec<Value> = (0..u.int_in_range(0..=2)?)
            .map(|_| -> AResult<Value> {
                Ok(json!({"name": u.choose(NAMES)?, "parameters": {"binary_data": json_leaf(u, 3)?}}))
            })
            .collect::<AResult<_>>()?;
        doc.insert("outputs".into(), json!(outs));
    }
    if u.ratio(1, 4)? {
        doc.insert("parameters".into(), json!({"binary_data_output": json_leaf(u, 3)?}));
    }
    let mut body = serde_json::to_vec(&Value::Object(doc)).unwrap();
    let json_len = body.len();
    body.extend_from_slice(&tail);
    let header = if binary_any || u.ratio(1, 6)? {
        Some(match u.int_in_range(0..=7)? {
            0 => (json_len + 1).to_string(),
            1 => json_len.saturating_sub(1).to_string(),
            2 => body.len().to_string(),
            3 => u
                .choose(&["", "-1", "abc", " 12 ", "18446744073709551616", "0"])?
                .to_string(),
            _ => json_len.to_string(),
        })
    } else {
        None
    };
    Ok(KServeCase { header, body })
}

/// A structured TF-Serving body: row or columnar, named or not, values of mixed kinds.
fn gen_tf(u: &mut Unstructured) -> AResult<Vec<u8>> {
    let rows = u.int_in_range(0..=3)?;
    let width = if u.ratio(1, 3)? { 16 } else { u.int_in_range(0..=4)? };
    let row = |u: &mut Unstructured| -> AResult<Value> {
        if u.ratio(1, 6)? {
            return json_leaf(u, 2);
        }
        let vals: Vec<Value> = (0..width)
            .map(|_| {
                if u.ratio(5, 6)? {
                    Ok(json!(i8::arbitrary(u)?))
                } else {
                    json_leaf(u, 3)
                }
            })
            .collect::<AResult<_>>()?;
        Ok(Value::Array(vals))
    };
    let mut doc = Map::new();
    let named = u.ratio(1, 2)?;
    let names: Vec<&str> = (0..u.int_in_range(1..=3)?)
        .map(|_| {
            u.choose(&["input", "INPUT0", "INPUT1", "b", "i", "s", "h", "u", "bf", "zz"])
                .copied()
        })
        .collect::<AResult<_>>()?;
    let value = if u.ratio(1, 2)? {
        let list: Vec<Value> = (0..rows)
            .map(|_| {
                if named {
                    let mut m = Map::new();
                    for n in &names {
                        m.insert(n.to_string(), row(u)?);
                    }
                    Ok(Value::Object(m))
                } else {
                    row(u)
                }
            })
            .collect::<AResult<_>>()?;
        ("instances", Value::Array(list))
    } else if named {
        let mut m = Map::new();
        for n in &names {
            let list: Vec<Value> = (0..rows).map(|_| row(u)).collect::<AResult<_>>()?;
            m.insert(n.to_string(), Value::Array(list));
        }
        ("inputs", Value::Object(m))
    } else {
        ("inputs", json_array(u, 0)?)
    };
    doc.insert(value.0.into(), value.1);
    if u.ratio(1, 10)? {
        doc.insert(
            if value.0 == "inputs" { "instances" } else { "inputs" }.into(),
            json!([]),
        );
    }
    Ok(serde_json::to_vec(&Value::Object(doc)).unwrap())
}

/// A structured gRPC request: inputs with typed contents of any field (right or wrong for the
/// datatype), raw contents of about the right size, shapes from the edge values.
fn gen_grpc(u: &mut Unstructured) -> AResult<ModelInferRequest> {
    let n = u.int_in_range(0..=3)?;
    let raw = u.ratio(1, 2)?;
    let mut req = ModelInferRequest {
        model_name: u.choose(&["mlp", "simple", ""])?.to_string(),
        model_version: u
            .choose(&["", "1", "0", "-1", "x", "99999999999999999999"])?
            .to_string(),
        id: u.choose(&["", "g1", "\u{0}"])?.to_string(),
        ..Default::default()
    };
    for _ in 0..n {
        let (name, dt, _, shape) = input_spec(u)?;
        let count = shape
            .iter()
            .map(|&d| d.clamp(0, 64) as usize)
            .product::<usize>()
            .min(256);
        let k = count + usize::from(u.ratio(1, 8)?);
        let contents = if raw && !u.ratio(1, 10)? {
            let width = if u.ratio(4, 5)? {
                width_of(dt)
            } else {
                *u.choose(&[1usize, 2, 4, 8])?
            };
            let len = (k * width).min(u.len());
            req.raw_input_contents.push(u.bytes(len)?.to_vec());
            None
        } else {
            let mut c = InferTensorContents::default();
            // the field the datatype reads, or any other
            let field = match (u.ratio(3, 4)?, dt) {
                (true, "BOOL") => 0,
                (true, "INT8" | "INT16" | "INT32") => 1,
                (true, "INT64") => 2,
                (true, "UINT8" | "UINT16" | "UINT32") => 3,
                (true, "UINT64") => 4,
                (true, "FP32") => 5,
                (true, "FP64") => 6,
                (true, "BYTES") => 7,
                _ => u.int_in_range(0..=7)?,
            };
            match field {
                0 => c.bool_contents = (0..k).map(|_| bool::arbitrary(u)).collect::<AResult<_>>()?,
                1 => c.int_contents = (0..k).map(|_| i32::arbitrary(u)).collect::<AResult<_>>()?,
                2 => c.int64_contents = (0..k).map(|_| i64::arbitrary(u)).collect::<AResult<_>>()?,
                3 => c.uint_contents = (0..k).map(|_| u32::arbitrary(u)).collect::<AResult<_>>()?,
                4 => c.uint64_contents = (0..k).map(|_| u64::arbitrary(u)).collect::<AResult<_>>()?,
                5 => c.fp32_contents = (0..k).map(|_| f32::arbitrary(u)).collect::<AResult<_>>()?,
                6 => c.fp64_contents = (0..k).map(|_| f64::arbitrary(u)).collect::<AResult<_>>()?,
                _ => {
                    c.bytes_contents = (0..k)
                        .map(|_| {
                            let len = u.int_in_range(0..=3)?;
                            u.bytes(len).map(<[u8]>::to_vec)
                        })
                        .collect::<AResult<_>>()?
                }
            }
            Some(c)
        };
        req.inputs.push(InferInputTensor {
            name,
            datatype: dt.into(),
            shape,
            contents,
            ..Default::default()
        });
    }
    if u.ratio(1, 8)? {
        req.raw_input_contents.push(vec![0; 4]);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        req.outputs.push(InferRequestedOutputTensor {
            name: u.choose(NAMES)?.to_string(),
            ..Default::default()
        });
    }
    Ok(req)
}

fn check_kserve(input: &[u8]) -> Result<(), String> {
    let case = KServeCase::from_bytes(input);
    let _ = decode_infer_request("mlp", None, &case.headers(), &case.body);
    Ok(())
}

fn check_tf(input: &[u8], sets: &[Vec<IoInfo>]) -> Result<(), String> {
    for s in sets {
        let _ = decode_predict(input, s);
    }
    Ok(())
}

fn check_grpc(input: &[u8]) -> Result<(), String> {
    if let Ok(req) = ModelInferRequest::decode(input) {
        let _ = to_infer_request(req);
    }
    Ok(())
}

/// Mutants of the seeds, half structured (fresh from `generate`), half byte-level havoc.
fn next_input(
    rng: &mut Rng,
    corpus: &[Vec<u8>],
    text: bool,
    generate: &dyn Fn(&mut Unstructured) -> AResult<Vec<u8>>,
) -> Vec<u8> {
    if rng.chance(1, 2) {
        let len = rng.range(16, 1024);
        let entropy = rng.bytes(len);
        let mut u = Unstructured::new(&entropy);
        if let Ok(b) = generate(&mut u) {
            if rng.chance(1, 4) {
                let mut b = b;
                mutate(rng, &mut b, corpus, MAX_LEN, text);
                return b;
            }
            return b;
        }
    }
    let mut b = rng.pick(corpus).clone();
    mutate(rng, &mut b, corpus, MAX_LEN, text);
    b
}

/// One input from a model-targeted generator (empty if the entropy ran out).
fn live_input(rng: &mut Rng, generate: &dyn Fn(&mut Unstructured) -> AResult<Vec<u8>>) -> Vec<u8> {
    let entropy = rng.bytes(2048);
    generate(&mut Unstructured::new(&entropy)).unwrap_or_default()
}

fn run_harness(
    name: &str,
    seeds: Vec<Vec<u8>>,
    text: bool,
    generate: &dyn Fn(&mut Unstructured) -> AResult<Vec<u8>>,
    check: &dyn Fn(&[u8]) -> Result<(), String>,
) {
    let mut fz = Fuzzer::new(name, env!("CARGO_TARGET_TMPDIR"));
    for s in &seeds {
        fz.exec(s, || check(s));
    }
    for _ in 0..iterations(DEFAULT_ITERS) {
        let input = next_input(fz.rng(), &seeds, text, generate);
        fz.exec(&input, || check(&input));
    }
    fz.finish();
}

#[test]
fn seeds_decode() {
    for s in kserve_seeds() {
        let case = KServeCase::from_bytes(&s);
        assert_eq!(KServeCase::from_bytes(&case.to_bytes()), case);
        decode_infer_request("m", None, &case.headers(), &case.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&s)));
    }
    let sets = tf_input_sets();
    for s in tf_seeds() {
        assert!(
            sets.iter().any(|set| decode_predict(&s, set).is_ok()),
            "{}",
            String::from_utf8_lossy(&s)
        );
    }
    for s in grpc_seeds() {
        to_infer_request(ModelInferRequest::decode(&s[..]).unwrap()).unwrap();
    }
}

#[test]
fn fuzz_kserve_v2_http_decoder() {
    run_harness(
        "kserve-http",
        kserve_seeds(),
        true,
        &|u| gen_kserve(u).map(|c| c.to_bytes()),
        &check_kserve,
    );
}

#[test]
fn fuzz_tf_rest_decoder() {
    let sets = tf_input_sets();
    run_harness("tf-rest", tf_seeds(), true, &gen_tf, &|b| check_tf(b, &sets));
}

#[test]
fn fuzz_grpc_infer_request_conversion() {
    run_harness(
        "grpc-infer",
        grpc_seeds(),
        false,
        &|u| gen_grpc(u).map(|r| r.encode_to_vec()),
        &check_grpc,
    );
}

/// One input of a request aimed at a shipped model: raw little-endian bytes (any bit pattern:
/// NaN, infinities, subnormals) in the KServe datatype.
struct Target {
    name: String,
    dt: &'static str,
    dims: Vec<usize>,
    raw: Vec<u8>,
}

/// Inputs for `model` that mostly pass validation (batch sizes 0..=17 for `mlp`, whose
/// `max_batch_size` is 16), one thing off now and then (datatype, a dim, a name, a missing or
/// repeated input), so requests reach the batcher and the model.
fn gen_targets(u: &mut Unstructured, model: &str) -> AResult<Vec<Target>> {
    let mut specs: Vec<(String, &'static str, Vec<usize>)> = if model == "mlp" {
        let rows = *u.choose(&[0usize, 1, 1, 2, 3, 8, 16, 17])?;
        vec![("input".into(), "FP32", vec![rows, 4])]
    } else {
        vec![
            ("INPUT0".into(), "INT32", vec![1, 16]),
            ("INPUT1".into(), "INT32", vec![1, 16]),
        ]
    };
    if u.ratio(1, 4)? {
        let i = u.choose_index(specs.len())?;
        match u.int_in_range(0..=4)? {
            0 => specs[i].1 = *u.choose(DATATYPES)?,
            1 => {
                let j = u.choose_index(specs[i].2.len())?;
                specs[i].2[j] = u.int_in_range(0..=17)?;
            }
            2 => specs[i].0 = u.choose(NAMES)?.to_string(),
            3 => {
                specs.remove(i);
            }
            _ => specs.push(specs[i].clone()),
        }
    }
    specs
        .into_iter()
        .map(|(name, dt, dims)| {
            let n = dims.iter().product::<usize>() * width_of(dt);
            let raw = if u.ratio(1, 2)? {
                u.bytes(n.min(u.len()))?.to_vec()
            } else {
                // small values, so results are finite
                (0..n)
                    .map(|i| if i % width_of(dt) == 0 { (i % 7) as u8 } else { 0 })
                    .collect()
            };
            Ok(Target { name, dt, dims, raw })
        })
        .collect()
}

fn outputs_for(u: &mut Unstructured, model: &str) -> AResult<Vec<&'static str>> {
    let known: &[&'static str] = if model == "mlp" {
        &["logits", "probabilities", "nope"]
    } else {
        &["OUTPUT0", "OUTPUT1", "nope"]
    };
    (0..u.int_in_range(0..=2)?).map(|_| u.choose(known).copied()).collect()
}

/// A KServe request for `model`: each input as binary data or as JSON numbers read back from
/// the raw bytes (non-finite ones become null).
fn gen_live_kserve(u: &mut Unstructured, model: &str) -> AResult<KServeCase> {
    let targets = gen_targets(u, model)?;
    let mut tail = Vec::new();
    let mut inputs = Vec::new();
    for t in &targets {
        let mut obj = json!({"name": t.name, "shape": t.dims, "datatype": t.dt});
        if u.ratio(1, 2)? {
            obj["parameters"] = json!({"binary_data_size": t.raw.len()});
            tail.extend_from_slice(&t.raw);
        } else {
            let w = width_of(t.dt);
            let data: Vec<Value> = t
                .raw
                .chunks(w)
                .map(|c| match (t.dt, c.len()) {
                    ("FP32", 4) => json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    (_, 4) => json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    ("BOOL", _) => json!(c[0] & 1 == 1),
                    _ => json!(c[0]),
                })
                .collect();
            obj["data"] = Value::Array(data);
        }
        inputs.push(obj);
    }
    let outputs: Vec<Value> = outputs_for(u, model)?
        .into_iter()
        .map(|o| -> AResult<Value> { Ok(json!({"name": o, "parameters": {"binary_data": bool::arbitrary(u)?}})) })
        .collect::<AResult<_>>()?;
    let doc = json!({"id": "live", "inputs": inputs, "outputs": outputs,
                     "parameters": {"binary_data_output": u.ratio(1, 4)?}});
    Ok(if tail.is_empty() {
        KServeCase {
            header: None,
            body: serde_json::to_vec(&doc).unwrap(),
        }
    } else {
        KServeCase::binary(&doc, &tail)
    })
}

/// A gRPC request for `model` with raw contents.
fn gen_live_grpc(u: &mut Unstructured, model: &str) -> AResult<ModelInferRequest> {
    let targets = gen_targets(u, model)?;
    Ok(ModelInferRequest {
        model_name: model.into(),
        inputs: targets
            .iter()
            .map(|t| InferInputTensor {
                name: t.name.clone(),
                datatype: t.dt.into(),
                shape: t.dims.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: targets.into_iter().map(|t| t.raw).collect(),
        outputs: outputs_for(u, model)?
            .into_iter()
            .map(|o| InferRequestedOutputTensor {
                name: o.into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// A TF-Serving `:predict` body for `model`: rows of small numbers, row or columnar format.
fn gen_live_tf(u: &mut Unstructured, model: &str) -> AResult<Vec<u8>> {
    let rows = u.int_in_range(1..=17)?;
    let row = |u: &mut Unstructured, w: usize| -> AResult<Value> {
        Ok(Value::Array(
            (0..w).map(|_| Ok(json!(i8::arbitrary(u)?))).collect::<AResult<_>>()?,
        ))
    };
    let doc = if model == "mlp" {
        let list: Vec<Value> = (0..rows).map(|_| row(u, 4)).collect::<AResult<_>>()?;
        if u.ratio(1, 2)? {
            json!({ "instances": list })
        } else {
            json!({ "inputs": list })
        }
    } else if u.ratio(1, 2)? {
        json!({"instances": [{"INPUT0": row(u, 16)?, "INPUT1": row(u, 16)?}]})
    } else {
        json!({"inputs": {"INPUT0": [row(u, 16)?], "INPUT1": [row(u, 16)?]}})
    };
    Ok(serde_json::to_vec(&doc).unwrap())
}

/// Whether an answer says a panic was caught on the way (batcher or model).
fn reports_panic(text: &str) -> bool {
    text.contains("panicked") || text.contains("internal error")
}

#[test]
fn fuzz_live_server() {
    use kiln_serve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let repo = common::temp_repo(&["mlp", "simple"]);
    let server = rt.block_on(common::start(&repo));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let grpc_addr = format!("http://{}", server.grpc_addr.unwrap());
    let mut grpc = rt.block_on(async {
        GrpcInferenceServiceClient::connect(grpc_addr)
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    });
    let n = iterations(DEFAULT_LIVE);
    let mut fz = Fuzzer::new("live-server", env!("CARGO_TARGET_TMPDIR"));
    // Answers by HTTP status or gRPC code, printed with the tally.
    let answers = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let count = |k: String| *answers.borrow_mut().entry(k).or_default() += 1;
    let post = |path: String, headers: HeaderMap, body: Vec<u8>| {
        let req = http.post(common::url(&server, &path)).body(body);
        let req = headers.iter().fold(req, |r, (k, v)| r.header(k.as_str(), v.as_bytes()));
        rt.block_on(async move {
            let resp = req.send().await.map_err(|e| format!("no answer: {e}"))?;
            let status = resp.status();
            count(format!("http {}", status.as_u16()));
            let text = resp.text().await.map_err(|e| format!("answer cut short: {e}"))?;
            if std::env::var("KILN_FUZZ_DEBUG").is_ok() {
                eprintln!("DBG {status} {}", text.chars().take(100).collect::<String>());
            }
            if reports_panic(&text) {
                return Err(format!("{status}: {}", text.chars().take(300).collect::<String>()));
            }
            Ok(())
        })
    };
    // KServe v2 HTTP, to both models
    let kseeds = kserve_seeds();
    for i in 0..n {
        let model = if i % 2 == 0 { "mlp" } else { "simple" };
        let input = if i % 4 < 2 {
            live_input(fz.rng(), &|u| gen_live_kserve(u, model).map(|c| c.to_bytes()))
        } else {
            next_input(fz.rng(), &kseeds, true, &|u| gen_kserve(u).map(|c| c.to_bytes()))
        };
        let case = KServeCase::from_bytes(&input);
        fz.exec(&input, || {
            post(format!("/v2/models/{model}/infer"), case.headers(), case.body.clone())
        });
    }
    // TF-Serving REST
    let tseeds = tf_seeds();
    for i in 0..n {
        let model = if i % 2 == 0 { "mlp" } else { "simple" };
        let input = if i % 4 < 2 {
            live_input(fz.rng(), &|u| gen_live_tf(u, model))
        } else {
            next_input(fz.rng(), &tseeds, true, &gen_tf)
        };
        fz.exec(&input, || {
            post(format!("/v1/models/{model}:predict"), HeaderMap::new(), input.clone())
        });
    }
    // gRPC: the mutant bytes go out as the message itself, so the server's protobuf decoding is
    // fuzzed too; a status is an answer, a broken channel is not.
    let gseeds = grpc_seeds();
    for i in 0..n {
        let model = if i % 2 == 0 { "mlp" } else { "simple" };
        let input = if i % 4 < 2 {
            live_input(fz.rng(), &|u| gen_live_grpc(u, model).map(|r| r.encode_to_vec()))
        } else {
            next_input(fz.rng(), &gseeds, false, &|u| gen_grpc(u).map(|r| r.encode_to_vec()))
        };
        let Ok(req) = ModelInferRequest::decode(&input[..]) else {
            continue;
        };
        fz.exec(&input, || {
            rt.block_on(async {
                match grpc.model_infer(req).await {
                    Ok(_) => {
                        count("grpc Ok".into());
                        Ok(())
                    }
                    Err(s) if reports_panic(s.message()) => Err(format!("{:?}: {}", s.code(), s.message())),
                    Err(s) if s.code() == tonic::Code::Unknown || s.code() == tonic::Code::Unavailable => {
                        Err(format!("transport: {s}"))
                    }
                    Err(s) => {
                        count(format!("grpc {:?}", s.code()));
                        Ok(())
                    }
                }
            })
        });
    }
    let ready = rt.block_on(async {
        http.get(common::url(&server, "/v2/health/ready"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(ready.ok(), Some(200), "the server must still be ready");
    let ok = post(
        "/v2/models/mlp/infer".into(),
        HeaderMap::new(),
        serde_json::to_vec(&mlp_request(2)).unwrap(),
    );
    assert_eq!(ok, Ok(()));
    println!("live: {n} requests per protocol; answers: {:?}", answers.borrow());
    fz.finish();
    rt.block_on(server.shutdown()).unwrap();
    let _ = std::fs::remove_dir_all(&repo);
}

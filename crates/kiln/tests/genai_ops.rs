//! ONNX Runtime GenAI's LLM export form: the contrib ops it uses (SimplifiedLayerNormalization,
//! SkipSimplifiedLayerNormalization, GroupQueryAttention, MatMulNBits, GatherBlockQuantized).
//!
//! Whole models: the committed tiny decoders (models/llm/make_genai_tiny.py: genai-tiny in fp32,
//! genai-tiny-int4 with MatMulNBits and GatherBlockQuantized) replay onnxruntime's greedy decode
//! (`reference.json`: prefill of 7 tokens, then 5 single-token steps with dense past fed back) and
//! match its logits at every step within 1e-4 (absolute; logits reach ~30). The int4 reference is
//! onnxruntime at accuracy_level 0 (f32 products on the dequantized weights, what Kiln computes), so
//! the same bound holds. The same replay with one preallocated past/present buffer (GenAI's
//! past_present_share_buffer) gives the same logits.
//!
//! Single ops: `tests/data/genai_ops/` holds one-node models and onnxruntime 1.32's outputs for
//! them (`make_refs.py` writes both: first prompt and decode, packed and separate QKV, rotary halves
//! and interleaved, partial rotary, local window, softcap, custom scale, padded batches, continued
//! prompt, position_ids, attention_bias, head_sink, smooth_softmax, f16; the norms with their extra
//! outputs; MatMulNBits at 2/4/8 bits with default, packed and float zero points, K not a multiple
//! of the block, bias, constant and run-time weights; GatherBlockQuantized on uint8/int4/uint4 data
//! with out-of-range and negative indices; the quantizer's MatMulIntegerToFloat and
//! DynamicQuantizeMatMul with u8/s8 weights, per-tensor and per-column scales and zero points;
//! DynamicQuantizeLSTM forward and bidirectional, per-direction and per-column scales, zero points,
//! bias, sequence lengths, initial states, peepholes and run-time weights: onnxruntime quantizes X
//! and each step's h to uint8 where Kiln multiplies the dequantized weights in f32, so those cases
//! allow 2e-2 * (1 + |ref|)).
//! Malformed inputs and attributes give errors naming the
//! problem, never panics (also with every case's inputs perturbed one dim at a time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln::{Level, Session, TensorData};
use serde_json::Value as Json;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn read_json(path: &Path) -> Json {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn usizes(v: &Json) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("uint") as usize)
        .collect()
}

fn f32s(v: &Json) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Runs a session and returns its outputs by name.
fn run(s: &Session, feeds: Vec<(String, TensorData)>) -> HashMap<String, TensorData> {
    let out = s.run(feeds).expect("runs");
    s.outputs().iter().map(|o| o.name.clone()).zip(out).collect()
}

/// Replays `reference.json` of a tiny GenAI model: each step's logits within `tol`. With
/// `shared_len`, past and present are one buffer of that many rows (GenAI's
/// past_present_share_buffer): present keeps the buffer's length and is fed back as is.
/// Returns the largest difference seen.
fn replay(dir: &str, level: Level, shared_len: Option<usize>, tol: f32) -> f32 {
    let dir = repo_path(dir);
    let cfg = read_json(&dir.join("config.json"));
    let reference = read_json(&dir.join("reference.json"));
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    let kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let hd = cfg["head_dim"].as_u64().unwrap() as usize;
    let s = Session::builder()
        .optimization(level)
        .build_from_file(dir.join("model.onnx"))
        .expect("model loads");
    let rows = shared_len.unwrap_or(0);
    let mut past: HashMap<String, TensorData> = HashMap::new();
    for i in 0..layers {
        for kind in ["key", "value"] {
            let zeros = vec![0f32; kv * rows * hd];
            let t = TensorData::from_values(format!("past_key_values.{i}.{kind}"), vec![1, kv, rows, hd], &zeros);
            past.insert(format!("past_key_values.{i}.{kind}"), t.unwrap());
        }
    }
    let steps = reference["steps"].as_array().expect("steps");
    assert!(steps.len() >= 6, "the reference has a prefill and 5 decode steps");
    let (mut total, mut worst) = (0usize, 0f32);
    for (n, step) in steps.iter().enumerate() {
        let ids: Vec<i64> = step["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(step["past_length"].as_u64().unwrap() as usize, total, "step {n}");
        total += ids.len();
        let mut feeds = vec![
            (
                "input_ids".to_string(),
                TensorData::from_values("input_ids", vec![1, ids.len()], &ids).unwrap(),
            ),
            (
                "attention_mask".to_string(),
                TensorData::from_values("attention_mask", vec![1, total], &vec![1i64; total]).unwrap(),
            ),
        ];
        feeds.extend(past.drain());
        let out = run(&s, feeds);
        let logits = &out["logits"];
        assert_eq!(logits.dims, usizes(&step["logits_shape"]), "{} step {n}", dir.display());
        let got = logits.values::<f32>().unwrap();
        let want = f32s(&step["logits"]);
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= tol,
            "{} step {n}: logits differ by {diff} (> {tol})",
            dir.display()
        );
        worst = worst.max(diff);
        // The greedy choice is the next step's input.
        if let Some(next) = steps.get(n + 1) {
            let v = logits.dims[2];
            let last = &got[got.len() - v..];
            let argmax = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as i64;
            assert_eq!(
                Some(argmax),
                next["input_ids"][0].as_i64(),
                "{} step {n}: greedy token",
                dir.display()
            );
        }
        for i in 0..layers {
            for kind in ["key", "value"] {
                let mut p = out[&format!("present.{i}.{kind}")].clone();
                let want_rows = shared_len.unwrap_or(total);
                assert_eq!(p.dims, vec![1, kv, want_rows, hd], "present.{i}.{kind} at step {n}");
                p.name = format!("past_key_values.{i}.{kind}");
                past.insert(p.name.clone(), p);
            }
        }
    }
    worst
}

#[test]
fn genai_tiny_fp32_matches_onnxruntime_decode() {
    for level in [Level::Disabled, Level::Basic, Level::All] {
        let worst = replay("models/llm/genai-tiny", level, None, 1e-4);
        eprintln!("genai-tiny at {level:?}: max |logit diff| {worst:.2e}");
    }
}

#[test]
fn genai_tiny_int4_matches_onnxruntime_decode() {
    for level in [Level::Disabled, Level::Basic, Level::All] {
        let worst = replay("models/llm/genai-tiny-int4", level, None, 1e-4);
        eprintln!("genai-tiny-int4 at {level:?}: max |logit diff| {worst:.2e}");
    }
}

#[test]
fn genai_tiny_shared_buffer_gives_the_same_logits() {
    for dir in ["models/llm/genai-tiny", "models/llm/genai-tiny-int4"] {
        let worst = replay(dir, Level::Basic, Some(16), 1e-4);
        eprintln!("{dir} with a shared 16-row buffer: max |logit diff| {worst:.2e}");
    }
}

#[test]
fn genai_tiny_models_are_small_and_use_the_genai_ops() {
    for (dir, ops) in [
        (
            "models/llm/genai-tiny",
            &[
                "SimplifiedLayerNormalization",
                "SkipSimplifiedLayerNormalization",
                "GroupQueryAttention",
            ][..],
        ),
        (
            "models/llm/genai-tiny-int4",
            &["GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"][..],
        ),
    ] {
        let path = repo_path(dir).join("model.onnx");
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < 1 << 20, "{}: {len} bytes", path.display());
        let model = kiln::internals::onnx::load_model(&path).expect("loads");
        for op in ops {
            assert!(
                model.graph.nodes.iter().any(|n| n.op_type == *op),
                "{dir} has no {op} node"
            );
        }
    }
}

// ---------------------------------------------------------------- single ops vs onnxruntime

fn ops_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/genai_ops")
}

fn tensor_from_json(v: &Json) -> TensorData {
    let name = v["name"].as_str().unwrap().to_string();
    let dims = usizes(&v["dims"]);
    let vals = v["values"].as_array().unwrap();
    let ints = || vals.iter().map(|x| x.as_i64().unwrap());
    let floats = || vals.iter().map(|x| x.as_f64().unwrap());
    match v["dtype"].as_str().unwrap() {
        "float32" => TensorData::from_values(name, dims, &floats().map(|x| x as f32).collect::<Vec<_>>()),
        "float16" => TensorData::from_values(name, dims, &floats().map(half::f16::from_f64).collect::<Vec<_>>()),
        "int32" => TensorData::from_values(name, dims, &ints().map(|x| x as i32).collect::<Vec<_>>()),
        "int64" => TensorData::from_values(name, dims, &ints().collect::<Vec<_>>()),
        "uint8" => TensorData::from_values(name, dims, &ints().map(|x| x as u8).collect::<Vec<_>>()),
        "int8" => TensorData::from_values(name, dims, &ints().map(|x| x as i8).collect::<Vec<_>>()),
        other => panic!("dtype {other}"),
    }
    .unwrap()
}

/// Output values as f32 (f16 outputs widened).
fn out_f32(t: &TensorData) -> Vec<f32> {
    match t.dtype {
        kiln::DType::F32 => t.values::<f32>().unwrap(),
        kiln::DType::F16 => t.values::<half::f16>().unwrap().iter().map(|x| x.to_f32()).collect(),
        d => panic!("{}: output dtype {d}", t.name),
    }
}

/// Runs one case of refs.json on `s`; returns the largest difference relative to the case's
/// tolerance (<= 1 passes) or a message.
fn check_case(s: &Session, case: &Json) -> Result<f32, String> {
    let feeds = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), tensor_from_json(i)))
        .collect();
    let out = s.run(feeds).map_err(|e| e.to_string())?;
    let out: HashMap<String, TensorData> = s.outputs().iter().map(|o| o.name.clone()).zip(out).collect();
    let tol = case["tol"].as_f64().unwrap() as f32;
    let mut worst = 0f32;
    for o in case["outputs"].as_array().unwrap() {
        let name = o["name"].as_str().unwrap();
        let got = &out[name];
        let dims = usizes(&o["dims"]);
        if got.dims != dims {
            return Err(format!("output {name}: shape {:?}, expected {dims:?}", got.dims));
        }
        let (g, w) = (out_f32(got), f32s(&o["values"]));
        // GroupQueryAttention presents [B, Hk, rows, D]: with `valid_rows`, only each entry's rows.
        let keep = |i: usize| -> bool {
            match o.get("valid_rows") {
                None => true,
                Some(v) => {
                    let rows = usizes(v);
                    let (hk, r, d) = (dims[1], dims[2], dims[3]);
                    (i / d) % r < rows[i / (hk * r * d)]
                }
            }
        };
        for (i, (a, b)) in g.iter().zip(&w).enumerate().filter(|(i, _)| keep(*i)) {
            let err = (a - b).abs() / (tol * (1.0 + b.abs()));
            if err.is_nan() || err > 1.0 {
                return Err(format!(
                    "output {name}[{i}]: {a} vs onnxruntime {b} (tol {tol} * (1 + |ref|))"
                ));
            }
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

#[test]
fn genai_ops_match_onnxruntime() {
    let refs = read_json(&ops_dir().join("refs.json"));
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "refs.json has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        for level in [Level::Disabled, Level::Basic] {
            let s = Session::builder()
                .optimization(level)
                .build_from_file(ops_dir().join(case["model"].as_str().unwrap()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            match check_case(&s, case) {
                Ok(w) if level == Level::Basic => eprintln!("{name}: max error {w:.3} of the tolerance"),
                Ok(_) => {}
                Err(e) => failures.push(format!("{name} at {level:?}: {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Kiln registers SimplifiedLayerNormalization in com.microsoft too (onnxruntime only in the default domain).
#[test]
fn simplified_layer_norm_in_the_microsoft_domain() {
    let refs = read_json(&ops_dir().join("refs.json"));
    let case = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sln_last_axis")
        .unwrap();
    let mut model = kiln::internals::onnx::load_model(ops_dir().join(case["model"].as_str().unwrap())).unwrap();
    model.graph.nodes[0].domain = "com.microsoft".into();
    model.opsets.insert("com.microsoft".into(), 1);
    let s = Session::builder().build_from_model(model).expect("builds");
    check_case(&s, case).expect("matches the default-domain reference");
}

// ---------------------------------------------------------------- malformed inputs and attributes

/// A case's model with its graph inputs' declared shapes dropped (so the session passes any shape
/// on to the kernel), and the case.
fn loose_model(name: &str) -> (kiln::internals::graph::Model, Json) {
    let refs = read_json(&ops_dir().join("refs.json"));
    let case = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone();
    let mut model = kiln::internals::onnx::load_model(ops_dir().join(case["model"].as_str().unwrap())).unwrap();
    for id in model.graph.inputs.clone() {
        model.graph.values[id.index()].shape = None;
    }
    (model, case)
}

/// The case's inputs with some replaced or added.
fn feeds_with(case: &Json, replace: Vec<TensorData>) -> Vec<(String, TensorData)> {
    let mut feeds: Vec<(String, TensorData)> = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), tensor_from_json(i)))
        .filter(|(n, _)| !replace.iter().any(|r| &r.name == n))
        .collect();
    feeds.extend(replace.into_iter().map(|t| (t.name.clone(), t)));
    feeds
}

fn f32_zeros(name: &str, dims: &[usize]) -> TensorData {
    TensorData::from_values(name, dims.to_vec(), &vec![0f32; dims.iter().product()]).unwrap()
}

fn i32s(name: &str, dims: &[usize], v: &[i32]) -> TensorData {
    TensorData::from_values(name, dims.to_vec(), v).unwrap()
}

/// Running `case` with `replace` fails with an error containing `needle` (not a caught panic).
fn expect_run_error(case_name: &str, replace: Vec<TensorData>, needle: &str) {
    let (model, case) = loose_model(case_name);
    let s = Session::builder().build_from_model(model).expect("builds");
    let err = match s.run(feeds_with(&case, replace)) {
        Ok(_) => panic!("{case_name}: ran, expected an error containing '{needle}'"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains("internal error"), "{case_name}: a panic: {err}");
    assert!(err.contains(needle), "{case_name}: '{err}' does not mention '{needle}'");
}

/// Building `case` after `edit` fails with an error containing `needle`.
fn expect_build_error(case_name: &str, edit: impl FnOnce(&mut kiln::internals::graph::Model), needle: &str) {
    let (mut model, _) = loose_model(case_name);
    edit(&mut model);
    let err = match Session::builder().build_from_model(model) {
        Ok(_) => panic!("{case_name}: built, expected an error containing '{needle}'"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains("internal error"), "{case_name}: a panic: {err}");
    assert!(err.contains(needle), "{case_name}: '{err}' does not mention '{needle}'");
}

fn set_attr(m: &mut kiln::internals::graph::Model, name: &str, a: kiln::internals::graph::Attribute) {
    m.graph.nodes[0].attributes.insert(name.into(), a);
}

/// An extra graph input wired to the node's input position `pos`.
fn wire_input(m: &mut kiln::internals::graph::Model, pos: usize, name: &str) {
    use kiln::internals::graph::{ValueInfo, ValueKind};
    let id = m.graph.add_value(ValueInfo {
        name: name.into(),
        kind: ValueKind::Tensor,
        dtype: Some(kiln::DType::F32),
        shape: None,
    });
    m.graph.inputs.push(id);
    let node = &mut m.graph.nodes[0];
    if node.inputs.len() <= pos {
        node.inputs.resize(pos + 1, None);
    }
    node.inputs[pos] = Some(id);
}

#[test]
fn gqa_rejects_malformed_inputs() {
    let dec = "gqa_decode_packed"; // B 1, S 1, past 5, H 4, Hk 2, D 16, packed
    expect_run_error(dec, vec![f32_zeros("query", &[1, 128])], "query must be 3-D");
    expect_run_error(dec, vec![f32_zeros("query", &[1, 1, 130])], "not a positive multiple");
    expect_run_error(dec, vec![i32s("seqlens_k", &[1], &[100])], "seqlens_k[0] = 100");
    expect_run_error(dec, vec![i32s("seqlens_k", &[1], &[-7])], "seqlens_k[0] = -7");
    expect_run_error(dec, vec![i32s("seqlens_k", &[2], &[5, 5])], "seqlens_k has shape");
    expect_run_error(dec, vec![f32_zeros("past_key", &[1, 3, 5, 16])], "past_key has shape");
    expect_run_error(dec, vec![f32_zeros("past_value", &[1, 2, 4, 16])], "differ in shape");
    expect_run_error(
        dec,
        vec![i32s("total_sequence_length", &[2], &[6, 6])],
        "total_sequence_length must hold one value",
    );
    // A decode step whose past is shorter than seqlens_k says.
    expect_run_error(
        dec,
        vec![
            i32s("seqlens_k", &[1], &[4]),
            f32_zeros("past_key", &[1, 2, 2, 16]),
            f32_zeros("past_value", &[1, 2, 2, 16]),
        ],
        "past holds 2",
    );
    let pos = "gqa_decode_position_ids";
    expect_run_error(
        pos,
        vec![TensorData::from_values("position_ids", vec![1, 1], &[1000i64]).unwrap()],
        "rotary position 1000",
    );
    expect_run_error(
        pos,
        vec![TensorData::from_values("position_ids", vec![2, 1], &[1i64, 2]).unwrap()],
        "position_ids has shape",
    );
    expect_run_error(
        "gqa_decode_attention_bias",
        vec![f32_zeros("attention_bias", &[1, 4, 2, 6])],
        "attention_bias has shape",
    );
    expect_run_error(
        "gqa_decode_head_sink",
        vec![f32_zeros("head_sink", &[3])],
        "head_sink has shape",
    );
    // A continued prompt (S > 1, S != total) needs batch 1.
    expect_run_error(
        "gqa_continued_prompt",
        vec![
            f32_zeros("query", &[2, 3, 128]),
            f32_zeros("past_key", &[2, 2, 4, 16]),
            f32_zeros("past_value", &[2, 2, 4, 16]),
            i32s("seqlens_k", &[2], &[6, 6]),
        ],
        "batch size must be 1",
    );
    let sep = "gqa_decode_separate_interleaved";
    expect_run_error(sep, vec![f32_zeros("key", &[1, 2, 32])], "key has shape");
}

#[test]
fn gqa_rejects_unsupported_attributes_and_inputs() {
    use kiln::internals::graph::Attribute;
    let c = "gqa_decode_packed";
    expect_build_error(
        c,
        |m| set_attr(m, "local_window_size", Attribute::Int(0)),
        "local_window_size 0",
    );
    expect_build_error(c, |m| set_attr(m, "kv_num_heads", Attribute::Int(3)), "not a multiple");
    expect_build_error(c, |m| set_attr(m, "num_heads", Attribute::Int(0)), "must be positive");
    expect_build_error(c, |m| set_attr(m, "softcap", Attribute::Float(-1.0)), "softcap");
    expect_build_error(c, |m| set_attr(m, "do_rotary", Attribute::Int(2)), "do_rotary");
    expect_build_error(c, |m| set_attr(m, "qk_output", Attribute::Int(1)), "output_qk");
    expect_build_error(c, |m| set_attr(m, "causal", Attribute::Int(0)), "causal");
    expect_build_error(
        c,
        |m| set_attr(m, "sliding_window_cache", Attribute::Int(1)),
        "sliding_window_cache",
    );
    expect_build_error(
        c,
        |m| set_attr(m, "k_quant_type", Attribute::String(b"PER_TENSOR".to_vec())),
        "quantized KV",
    );
    expect_build_error(c, |m| wire_input(m, 12, "k_scale"), "k_scale");
    expect_build_error(c, |m| wire_input(m, 16, "query_seqlens"), "query_seqlens");
    // do_rotary without caches is a run-time error.
    let (mut model, case) = loose_model("gqa_decode_packed");
    model.graph.nodes[0].inputs[7] = None;
    model.graph.nodes[0].inputs[8] = None;
    let s = Session::builder()
        .optimization(Level::Disabled)
        .build_from_model(model)
        .unwrap();
    let err = s.run(feeds_with(&case, vec![])).unwrap_err().to_string();
    assert!(err.contains("needs cos_cache and sin_cache"), "{err}");
}

#[test]
fn norms_reject_malformed_inputs() {
    expect_run_error("skip_sln", vec![f32_zeros("skip", &[2, 3, 16])], "skip has shape");
    expect_run_error(
        "skip_sln",
        vec![f32_zeros("input", &[2, 3, 32]), f32_zeros("skip", &[2, 3, 32])],
        "gamma has shape",
    );
    expect_run_error("skip_sln_bias", vec![f32_zeros("bias", &[31])], "bias has shape");
    expect_run_error("skip_sln", vec![f32_zeros("input", &[])], "rank >= 1");
    expect_run_error("sln_axis1", vec![f32_zeros("X", &[2, 3])], "broadcast");
    expect_build_error(
        "skip_sln",
        |m| {
            let id = m.graph.nodes[0].outputs[3].unwrap();
            m.graph.nodes[0].outputs[1] = Some(id);
            m.graph.nodes[0].outputs[3] = None;
        },
        "output 1 (mean)",
    );
    use kiln::internals::graph::Attribute;
    let (mut model, case) = loose_model("sln_last_axis");
    model.graph.nodes[0].attributes.insert("axis".into(), Attribute::Int(5));
    let s = Session::builder()
        .optimization(Level::Disabled)
        .build_from_model(model)
        .unwrap();
    let err = s.run(feeds_with(&case, vec![])).unwrap_err().to_string();
    assert!(err.contains("axis 5 is out of range"), "{err}");
}

#[test]
fn block_quantized_ops_reject_malformed_inputs() {
    use kiln::internals::graph::Attribute;
    expect_run_error(
        "nbits4_bias_rank2",
        vec![f32_zeros("A", &[5, 63])],
        "last dim must be K = 64",
    );
    expect_run_error("nbits4_bias_rank2", vec![f32_zeros("bias", &[15])], "bias has shape");
    let rt = "nbits4_runtime_weight"; // K 64, N 16, block 32, runtime B/scales/zero_points
    expect_run_error(
        rt,
        vec![TensorData::from_values("B", vec![16, 2, 8], &[0u8; 256]).unwrap()],
        "B has shape",
    );
    expect_run_error(rt, vec![f32_zeros("scales", &[16, 3])], "scales has 48 values");
    expect_run_error(
        rt,
        vec![TensorData::from_values("zero_points", vec![16, 2], &[0u8; 32]).unwrap()],
        "zero_points has 32 bytes",
    );
    let c = "nbits4_default_zp";
    expect_build_error(c, |m| set_attr(m, "bits", Attribute::Int(3)), "bits 3");
    expect_build_error(c, |m| set_attr(m, "block_size", Attribute::Int(24)), "block_size 24");
    expect_build_error(c, |m| set_attr(m, "N", Attribute::Int(25)), "B has shape");
    expect_build_error(
        c,
        |m| {
            m.graph.nodes[0].attributes.remove("K");
        },
        "'K' is required",
    );
    expect_build_error(c, |m| wire_input(m, 4, "g_idx"), "g_idx");

    let g = "gbq_u8_bits4_zp"; // data [10, 32] uint8 (64 codes a row), block 16, scales [10, 4]
    expect_run_error(g, vec![f32_zeros("scales", &[10, 3])], "scales has shape");
    expect_run_error(
        g,
        vec![TensorData::from_values("zero_points", vec![10, 4], &[0u8; 40]).unwrap()],
        "zero_points has shape",
    );
    expect_build_error(g, |m| set_attr(m, "block_size", Attribute::Int(8)), "block_size 8");
    let (mut model, case) = loose_model(g);
    set_attr(&mut model, "gather_axis", Attribute::Int(1));
    let s = Session::builder()
        .optimization(Level::Disabled)
        .build_from_model(model)
        .unwrap();
    let err = s.run(feeds_with(&case, vec![])).unwrap_err().to_string();
    assert!(err.contains("uint8 data needs gather_axis 0"), "{err}");
}

/// Every case with one input's shape perturbed (a dim +1 or -1 or 0, a dim dropped or added;
/// zeros, or for integer inputs their reference values cycled) runs or fails with an error, never a
/// caught panic.
#[test]
fn genai_ops_never_panic_on_perturbed_shapes() {
    let refs = read_json(&ops_dir().join("refs.json"));
    let mut runs = 0;
    for case in refs["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (model, _) = loose_model(name);
        let s = Session::builder()
            .optimization(Level::Disabled)
            .build_from_model(model)
            .unwrap();
        for (k, input) in case["inputs"].as_array().unwrap().iter().enumerate() {
            let dims = usizes(&input["dims"]);
            let mut variants: Vec<Vec<usize>> = Vec::new();
            for i in 0..dims.len() {
                for d in [dims[i] + 1, dims[i].saturating_sub(1), 0] {
                    let mut v = dims.clone();
                    v[i] = d;
                    variants.push(v);
                }
                let mut v = dims.clone();
                v.remove(i);
                variants.push(v);
            }
            variants.push([dims.clone(), vec![2]].concat());
            for v in variants {
                let n: usize = v.iter().product();
                let vals = input["values"].as_array().unwrap();
                let t = match input["dtype"].as_str().unwrap() {
                    "float32" => TensorData::from_values("x", v, &vec![0.5f32; n]),
                    "float16" => TensorData::from_values("x", v, &vec![half::f16::from_f32(0.5); n]),
                    "int32" => {
                        let c: Vec<i32> = (0..n)
                            .map(|i| vals[i % vals.len().max(1)].as_i64().unwrap_or(0) as i32)
                            .collect();
                        TensorData::from_values("x", v, &c)
                    }
                    "int64" => {
                        let c: Vec<i64> = (0..n)
                            .map(|i| vals[i % vals.len().max(1)].as_i64().unwrap_or(0))
                            .collect();
                        TensorData::from_values("x", v, &c)
                    }
                    "uint8" => TensorData::from_values("x", v, &vec![0x5Au8; n]),
                    "int8" => TensorData::from_values("x", v, &vec![-0x2Ai8; n]),
                    other => panic!("{other}"),
                };
                let mut t = t.unwrap();
                t.name = input["name"].as_str().unwrap().to_string();
                let feeds = feeds_with(case, vec![t]);
                if let Err(e) = s.run(feeds) {
                    let e = e.to_string();
                    assert!(!e.contains("internal error"), "{name}, input {k} perturbed: {e}");
                }
                runs += 1;
            }
        }
    }
    assert!(runs > 1000, "{runs} runs");
}

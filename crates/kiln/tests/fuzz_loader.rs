//! Fuzzing the ONNX loader, importer, optimizer and planner, then one run of what builds: mutated
//! model bytes (byte-level havoc and structured edits of the decoded `ModelProto` driven by
//! `arbitrary`) go through `Session::builder().build_from_bytes`; a session that builds runs once
//! on small synthesized inputs under a deadline and a small `max_tensor_bytes`. A panic, or an
//! error made from a caught panic, is a crash (see `kiln-fuzz`).
//!
//! Seeds: small models built here, the shipped `models/repository/*/1/model.onnx`, with
//! `KILN_MODELS` the real models under 3 MiB (Silero VAD), and with `KILN_NODE_TESTS` every 40th
//! node-test model. Budget: `KILN_FUZZ_ITERS` (`N` or `10x`);
//! `KILN_FUZZ_REPLAY=<file>` runs one saved input through the same check.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::*;
use kiln::internals::onnx::proto;
use kiln::internals::runtime::{RunOptions, RuntimeError};
use kiln::{DType, Dim, Level, Session, TensorData};
use kiln_fuzz::arbitrary::{Arbitrary, Result as AResult, Unstructured};
use kiln_fuzz::{iterations, mutate, Fuzzer, Rng};
use prost::Message;

/// Mutants executed in a default run (about 8 s in a debug build on 2 cores).
const DEFAULT_ITERS: usize = 15_000;

fn attr_int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_graph(name: &str, g: proto::GraphProto) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

fn with_attrs(mut n: proto::NodeProto, attrs: Vec<proto::AttributeProto>) -> proto::NodeProto {
    n.attribute = attrs;
    n
}

/// Shape arithmetic feeding Reshape, ConstantOfShape, Slice, Transpose, Concat, reductions.
fn shape_model() -> proto::ModelProto {
    model(
        vec![
            node("Shape", "shape", &["x"], &["s"]),
            with_attrs(
                node("ConstantOfShape", "cos", &["s"], &["ones"]),
                vec![proto::AttributeProto {
                    name: Some("value".into()),
                    r#type: Some(proto::attribute_proto::AttributeType::Tensor as i32),
                    t: Some(f32_tensor("v", &[1], &[1.0])),
                    ..Default::default()
                }],
            ),
            node("Add", "add", &["x", "ones"], &["a"]),
            node("Slice", "slice", &["a", "starts", "ends", "axes"], &["sl"]),
            with_attrs(
                node("Transpose", "tr", &["sl"], &["t"]),
                vec![attr_ints("perm", &[1, 0])],
            ),
            node("Reshape", "reshape", &["t", "flat"], &["r"]),
            with_attrs(node("Concat", "cat", &["r", "r"], &["c"]), vec![attr_int("axis", 0)]),
            with_attrs(
                node("ReduceSum", "rsum", &["c", "rax"], &["y"]),
                vec![attr_int("keepdims", 1)],
            ),
            with_attrs(node("Softmax", "sm", &["a"], &["z"]), vec![attr_int("axis", -1)]),
        ],
        vec![value("x", 1, &[-1, 4])],
        vec![value("y", 1, &[1]), value("z", 1, &[-1, 4])],
        vec![
            i64_tensor("starts", &[1], &[1]),
            i64_tensor("ends", &[1], &[3]),
            i64_tensor("axes", &[1], &[1]),
            i64_tensor("flat", &[1], &[-1]),
            i64_tensor("rax", &[1], &[0]),
        ],
    )
}

/// MatMul, Gemm with attributes, a 2-D Conv and MaxPool.
fn dense_model() -> proto::ModelProto {
    let w: Vec<f32> = (0..12).map(|i| i as f32 / 6.0 - 1.0).collect();
    let k: Vec<f32> = (0..18).map(|i| (i % 5) as f32 / 4.0 - 0.5).collect();
    model(
        vec![
            node("MatMul", "mm", &["x", "w"], &["m"]),
            with_attrs(
                node("Gemm", "gemm", &["m", "w2", "b"], &["g"]),
                vec![
                    attr_int("transB", 1),
                    proto::AttributeProto {
                        name: Some("alpha".into()),
                        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
                        f: Some(0.5),
                        ..Default::default()
                    },
                ],
            ),
            with_attrs(
                node("Conv", "conv", &["img", "k"], &["cv"]),
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[1, 1]),
                ],
            ),
            with_attrs(
                node("MaxPool", "pool", &["cv"], &["p"]),
                vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])],
            ),
        ],
        vec![value("x", 1, &[-1, 4]), value("img", 1, &[1, 2, 4, 4])],
        vec![value("g", 1, &[-1, 3]), value("p", 1, &[1, 1, 2, 2])],
        vec![
            f32_tensor("w", &[4, 3], &w),
            f32_tensor("w2", &[3, 3], &w[..9]),
            f32_tensor("b", &[3], &[0.1, 0.2, 0.3]),
            f32_tensor("k", &[1, 2, 3, 3], &k),
        ],
    )
}

/// An If with two branches and a Loop carrying a value over three iterations.
fn control_flow_model() -> proto::ModelProto {
    let branch = |name: &str, nodes: Vec<proto::NodeProto>, out: &str| proto::GraphProto {
        name: Some(name.into()),
        node: nodes,
        output: vec![value(out, 1, &[-1, 4])],
        ..Default::default()
    };
    let then_g = branch("then", vec![node("Relu", "then_relu", &["x"], &["ty"])], "ty");
    let else_g = branch("else", vec![node("Neg", "else_neg", &["x"], &["ey"])], "ey");
    let body = proto::GraphProto {
        name: Some("body".into()),
        node: vec![
            node("Identity", "cond_out", &["cond_in"], &["cond_out"]),
            node("Add", "acc", &["v_in", "v_in"], &["v_out"]),
        ],
        input: vec![value("i", 7, &[]), value("cond_in", 9, &[]), value("v_in", 1, &[-1, 4])],
        output: vec![value("cond_out", 9, &[]), value("v_out", 1, &[-1, 4])],
        ..Default::default()
    };
    let mut trip = i64_tensor("trip", &[], &[3]);
    trip.dims.clear();
    model(
        vec![
            with_attrs(
                node("If", "if", &["c"], &["iy"]),
                vec![attr_graph("then_branch", then_g), attr_graph("else_branch", else_g)],
            ),
            with_attrs(
                node("Loop", "loop", &["trip", "c", "iy"], &["ly"]),
                vec![attr_graph("body", body)],
            ),
        ],
        vec![value("c", 9, &[]), value("x", 1, &[-1, 4])],
        vec![value("ly", 1, &[-1, 4])],
        vec![trip],
    )
}

/// Integer paths: Gather, Cast, Equal, Where, a model-local function.
fn int_function_model() -> proto::ModelProto {
    let mut call = node("Twice", "call", &["f"], &["g2"]);
    call.domain = Some("local".into());
    let mut m = model(
        vec![
            with_attrs(
                node("Gather", "gather", &["x", "idx"], &["g"]),
                vec![attr_int("axis", 1)],
            ),
            with_attrs(node("Cast", "cast", &["g"], &["gi"]), vec![attr_int("to", 7)]),
            node("Equal", "eq", &["gi", "zero"], &["e"]),
            node("Where", "where", &["e", "g", "g"], &["f"]),
            call,
        ],
        vec![value("x", 1, &[-1, 4])],
        vec![value("g2", 1, &[-1, 2])],
        vec![i64_tensor("idx", &[2], &[0, 3]), i64_tensor("zero", &[], &[0])],
    );
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("local".into()),
        version: Some(1),
    });
    m.functions.push(proto::FunctionProto {
        name: Some("Twice".into()),
        domain: Some("local".into()),
        input: vec!["a".into()],
        output: vec!["b".into()],
        node: vec![node("Add", "twice", &["a", "a"], &["b"])],
        opset_import: m.opset_import.clone(),
        ..Default::default()
    });
    m
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("small".to_string(), bytes(&small_model())),
        ("shape".to_string(), bytes(&shape_model())),
        ("dense".to_string(), bytes(&dense_model())),
        ("control_flow".to_string(), bytes(&control_flow_model())),
        ("int_function".to_string(), bytes(&int_function_model())),
    ];
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/repository");
    let mut shipped: Vec<_> = std::fs::read_dir(&repo)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("1/model.onnx"))
                .collect()
        })
        .unwrap_or_default();
    shipped.sort();
    for p in shipped {
        if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
    // Real models (models/fetch.sh): the small ones (Silero VAD's three exports: If, Loop-free and
    // LSTM graphs, opsets 15-18), so mutants keep real-world structure.
    if let Ok(dir) = std::env::var("KILN_MODELS") {
        let mut real: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
                    .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() < 3 << 20))
                    .collect()
            })
            .unwrap_or_default();
        real.sort();
        for p in real {
            if let Ok(b) = std::fs::read(&p) {
                out.push((p.display().to_string(), b));
            }
        }
    }
    if let Ok(dir) = std::env::var("KILN_NODE_TESTS") {
        let mut cases: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().join("model.onnx"))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        cases.sort();
        for p in cases.iter().step_by(40) {
            if let Ok(b) = std::fs::read(p) {
                out.push((p.display().to_string(), b));
            }
        }
    }
    out
}

/// FNV-1a: the optimization level and the input values follow from the model bytes, so a saved
/// input replays exactly.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn is_internal(e: &kiln::Error) -> bool {
    matches!(
        e,
        kiln::Error::Internal { .. } | kiln::Error::Runtime(RuntimeError::Internal { .. })
    ) || e.to_string().contains("panicked")
}

/// A small input for `info`: symbolic dims 1 or 2; `None` when its declared size is large.
fn synth_input(info: &kiln::IoInfo, rng: &mut Rng) -> Option<TensorData> {
    let dims: Vec<usize> = match &info.shape {
        Some(s) => {
            s.0.iter()
                .map(|d| match d {
                    Dim::Known(n) => *n,
                    _ => rng.range(1, 2),
                })
                .collect()
        }
        None => vec![rng.range(1, 2)],
    };
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if count > 1 << 16 {
        return None;
    }
    let dtype = info.dtype.unwrap_or(DType::F32);
    let t = match dtype {
        DType::String => TensorData::strings(
            &info.name,
            dims,
            (0..count).map(|i| vec![b'a' + (i % 3) as u8]).collect(),
        ),
        DType::F32 => {
            let v: Vec<f32> = (0..count).map(|_| rng.range(0, 8) as f32 / 2.0 - 2.0).collect();
            TensorData::from_values(&info.name, dims, &v)
        }
        DType::F64 => {
            let v: Vec<f64> = (0..count).map(|_| rng.range(0, 8) as f64 / 2.0 - 2.0).collect();
            TensorData::from_values(&info.name, dims, &v)
        }
        DType::Bool => {
            let v: Vec<bool> = (0..count).map(|_| rng.chance(1, 2)).collect();
            TensorData::from_values(&info.name, dims, &v)
        }
        DType::I64 => {
            let v: Vec<i64> = (0..count).map(|_| rng.range(0, 2) as i64).collect();
            TensorData::from_values(&info.name, dims, &v)
        }
        DType::I32 => {
            let v: Vec<i32> = (0..count).map(|_| rng.range(0, 2) as i32).collect();
            TensorData::from_values(&info.name, dims, &v)
        }
        other => {
            // Small integers in the first byte of each element, zero elsewhere (or packed types).
            let n = other.packed_size(count)?;
            let size = other.size_in_bytes().max(1);
            let bytes = (0..n)
                .map(|i| if i % size == 0 { rng.range(0, 2) as u8 } else { 0 })
                .collect();
            TensorData::new(&info.name, other, dims, bytes)
        }
    };
    t.ok()
}

/// Mutants that built, and that ran to outputs (printed with the tally).
static BUILT: AtomicUsize = AtomicUsize::new(0);
static RAN: AtomicUsize = AtomicUsize::new(0);

/// Builds the model and, if it builds, runs it once. `Err` for a caught panic.
fn check(model_bytes: &[u8]) -> Result<(), String> {
    let h = hash(model_bytes);
    let level = [Level::Basic, Level::Disabled, Level::Extended, Level::All][(h % 4) as usize];
    let session = Session::builder()
        .optimization(level)
        .load_limits(kiln::LoadLimits {
            max_file_bytes: 64 << 20,
            max_nodes: 4096,
            max_nesting: 8,
            max_tensor_bytes: 16 << 20,
        })
        .build_from_bytes(model_bytes);
    let session = match session {
        Ok(s) => s,
        Err(e) if is_internal(&e) => return Err(format!("build at {level:?}: {e}")),
        Err(_) => return Ok(()),
    };
    BUILT.fetch_add(1, Relaxed);
    let mut rng = Rng::new(h);
    let mut feeds = Vec::new();
    for info in session.inputs() {
        match synth_input(info, &mut rng) {
            Some(t) => feeds.push((info.name.clone(), t)),
            None => return Ok(()),
        }
    }
    let options = RunOptions {
        max_tensor_bytes: 16 << 20,
        max_loop_iterations: 1000,
        deadline: Some(Instant::now() + Duration::from_secs(2)),
        ..RunOptions::default()
    };
    match session.run_with_options(feeds, &options) {
        Err(e) if is_internal(&e) => Err(format!("run at {level:?}: {e}")),
        Err(_) => Ok(()),
        Ok(_) => {
            RAN.fetch_add(1, Relaxed);
            Ok(())
        }
    }
}

const OPS: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Sigmoid",
    "Tanh",
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Reshape",
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "GatherND",
    "ScatterND",
    "ScatterElements",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Expand",
    "Tile",
    "Pad",
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceProd",
    "Softmax",
    "LogSoftmax",
    "Cast",
    "Shape",
    "Size",
    "ConstantOfShape",
    "Range",
    "Where",
    "Equal",
    "Less",
    "Not",
    "Clip",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "TopK",
    "ArgMax",
    "CumSum",
    "OneHot",
    "Resize",
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "Einsum",
    "NonZero",
    "DepthToSpace",
    "SpaceToDepth",
    "Trilu",
    "If",
    "Loop",
    "Scan",
    "Identity",
    "Dropout",
    "Erf",
    "LRN",
    "LSTM",
    "GRU",
    "RNN",
    "Attention",
    "Constant",
    "Mod",
    "BitShift",
    "QuantizeLinear",
    "DequantizeLinear",
    "CenterCropPad",
    "Col2Im",
    "GridSample",
    "RoiAlign",
    "Unique",
    "ReverseSequence",
    "SequenceConstruct",
    "SplitToSequence",
    "ConcatFromSequence",
    "Optional",
    "STFT",
    "DFT",
    "MatMulInteger",
];
const ATTR_NAMES: &[&str] = &[
    "axis",
    "axes",
    "perm",
    "kernel_shape",
    "pads",
    "strides",
    "dilations",
    "group",
    "keepdims",
    "to",
    "transA",
    "transB",
    "alpha",
    "beta",
    "value",
    "k",
    "largest",
    "sorted",
    "mode",
    "blocksize",
    "output_shape",
    "output_padding",
    "auto_pad",
    "epsilon",
    "split",
    "num_outputs",
    "exclusive",
    "reverse",
    "upper",
    "direction",
    "hidden_size",
    "body",
    "then_branch",
    "else_branch",
    "equation",
    "start",
    "end",
    "batch_dims",
    "noop_with_empty_axes",
];
const INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    -2,
    7,
    64,
    i32::MAX as i64,
    i32::MIN as i64,
    i64::MAX,
    i64::MIN,
    1 << 32,
    -(1 << 40),
];

fn pick_int(u: &mut Unstructured) -> AResult<i64> {
    if u.ratio(3, 4)? {
        Ok(*u.choose(INTS)?)
    } else {
        i64::arbitrary(u)
    }
}

fn pick_ints(u: &mut Unstructured) -> AResult<Vec<i64>> {
    let n = u.int_in_range(0..=6)?;
    (0..n).map(|_| pick_int(u)).collect()
}

fn graph_names(g: &proto::GraphProto) -> Vec<String> {
    let mut names: Vec<String> = g.input.iter().filter_map(|v| v.name.clone()).collect();
    names.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
    names.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    names.push(String::new());
    names
}

/// One structured edit of a graph (the main graph or a subgraph).
fn edit_graph(g: &mut proto::GraphProto, u: &mut Unstructured) -> AResult<()> {
    let names = graph_names(g);
    match u.int_in_range(0..=13)? {
        // a dim of an input, output or value_info
        0 => {
            let vi = match u.int_in_range(0..=2)? {
                0 => &mut g.input,
                1 => &mut g.output,
                _ => &mut g.value_info,
            };
            if vi.is_empty() {
                return Ok(());
            }
            let i = u.choose_index(vi.len())?;
            if let Some(proto::type_proto::Value::TensorType(t)) = vi[i].r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                if u.ratio(1, 4)? {
                    t.elem_type = Some(u.int_in_range(0..=26)?);
                } else if let Some(s) = t.shape.as_mut() {
                    use proto::tensor_shape_proto::dimension::Value as D;
                    let dim = proto::tensor_shape_proto::Dimension {
                        value: Some(if u.ratio(1, 3)? {
                            D::DimParam(u.choose(&["N", "M", ""])?.to_string())
                        } else {
                            D::DimValue(pick_int(u)?)
                        }),
                        ..Default::default()
                    };
                    match u.int_in_range(0..=2)? {
                        0 => s.dim.push(dim),
                        1 if !s.dim.is_empty() => {
                            let j = u.choose_index(s.dim.len())?;
                            s.dim.remove(j);
                        }
                        _ if !s.dim.is_empty() => {
                            let j = u.choose_index(s.dim.len())?;
                            s.dim[j] = dim;
                        }
                        _ => s.dim.push(dim),
                    }
                } else {
                    t.shape = Some(proto::TensorShapeProto::default());
                }
            }
        }
        // op type
        1 if !g.node.is_empty() => {
            let i = u.choose_index(g.node.len())?;
            g.node[i].op_type = Some(u.choose(OPS)?.to_string());
        }
        // an input of a node
        2 if !g.node.is_empty() => {
            let i = u.choose_index(g.node.len())?;
            let name = u.choose(&names)?.clone();
            let n = &mut g.node[i];
            match u.int_in_range(0..=2)? {
                0 => n.input.push(name),
                1 if !n.input.is_empty() => {
                    let j = u.choose_index(n.input.len())?;
                    n.input.remove(j);
                }
                _ if !n.input.is_empty() => {
                    let j = u.choose_index(n.input.len())?;
                    n.input[j] = name;
                }
                _ => n.input.push(name),
            }
        }
        // an attribute: add or replace, any type
        3 | 4 if !g.node.is_empty() => {
            let i = u.choose_index(g.node.len())?;
            let name = u.choose(ATTR_NAMES)?.to_string();
            use proto::attribute_proto::AttributeType as T;
            let mut a = proto::AttributeProto {
                name: Some(name.clone()),
                ..Default::default()
            };
            match u.int_in_range(0..=5)? {
                0 => {
                    a.r#type = Some(T::Int as i32);
                    a.i = Some(pick_int(u)?);
                }
                1 => {
                    a.r#type = Some(T::Ints as i32);
                    a.ints = pick_ints(u)?;
                }
                2 => {
                    a.r#type = Some(T::Float as i32);
                    a.f = Some(*u.choose(&[0.0, -1.0, 1e30, f32::NAN, f32::INFINITY, 1e-9])?);
                }
                3 => {
                    a.r#type = Some(T::String as i32);
                    a.s = Some(
                        u.choose(&[&b"NOTSET"[..], b"SAME_UPPER", b"VALID", b"linear", b"ij,jk->ik", b""])?
                            .to_vec(),
                    );
                }
                4 => {
                    a.r#type = Some(T::Tensor as i32);
                    let dims = pick_ints(u)?.into_iter().map(|d| d.rem_euclid(4)).collect::<Vec<_>>();
                    let n: i64 = dims.iter().product();
                    a.t = Some(i64_tensor("t", &dims, &vec![1; n.max(0) as usize]));
                }
                _ => {
                    a.r#type = Some(u.int_in_range(0..=14)?);
                }
            }
            let n = &mut g.node[i];
            match n.attribute.iter_mut().find(|x| x.name.as_deref() == Some(&name)) {
                Some(slot) if u.ratio(1, 3)? => *slot = a,
                _ => n.attribute.push(a),
            }
        }
        // an existing int/ints attribute changed
        5 => {
            let attrs: Vec<(usize, usize)> = g
                .node
                .iter()
                .enumerate()
                .flat_map(|(i, n)| (0..n.attribute.len()).map(move |j| (i, j)))
                .collect();
            if attrs.is_empty() {
                return Ok(());
            }
            let (i, j) = *u.choose(&attrs)?;
            let a = &mut g.node[i].attribute[j];
            if let Some(sub) = a.g.as_mut() {
                return edit_graph(sub, u);
            }
            if a.i.is_some() || u.ratio(1, 2)? {
                a.i = Some(pick_int(u)?);
            }
            if !a.ints.is_empty() {
                let k = u.choose_index(a.ints.len())?;
                a.ints[k] = pick_int(u)?;
            }
        }
        // an initializer: dims, type, data
        6 | 7 if !g.initializer.is_empty() => {
            let i = u.choose_index(g.initializer.len())?;
            let t = &mut g.initializer[i];
            match u.int_in_range(0..=5)? {
                0 => t.dims = pick_ints(u)?,
                1 => t.data_type = Some(u.int_in_range(0..=26)?),
                2 => {
                    t.float_data.truncate(u.choose_index(t.float_data.len() + 1)?);
                    t.int64_data.truncate(u.choose_index(t.int64_data.len() + 1)?);
                }
                3 => {
                    let n = u.int_in_range(0..=40)?;
                    t.raw_data = Some(u.bytes(n)?.to_vec().into());
                }
                4 => {
                    if let Some(v) = t.int64_data.first_mut() {
                        *v = pick_int(u)?;
                    }
                }
                _ => {
                    t.data_location = Some(1);
                    t.external_data = vec![proto::StringStringEntryProto {
                        key: Some("location".into()),
                        value: Some(u.choose(&["../x", "/etc/passwd", "w.bin", ""])?.to_string()),
                    }];
                }
            }
        }
        // node order swap, node removal, node duplication
        8 if g.node.len() >= 2 => {
            let a = u.choose_index(g.node.len())?;
            let b = u.choose_index(g.node.len())?;
            g.node.swap(a, b);
        }
        9 if !g.node.is_empty() => {
            let i = u.choose_index(g.node.len())?;
            if u.ratio(1, 2)? {
                g.node.remove(i);
            } else {
                let n = g.node[i].clone();
                g.node.push(n);
            }
        }
        // a new node reading existing values
        10 => {
            let k = u.int_in_range(0..=3)?;
            let inputs: Vec<String> = (0..k).map(|_| u.choose(&names).cloned()).collect::<AResult<_>>()?;
            let out = format!("fz{}", g.node.len());
            let mut n = proto::NodeProto {
                op_type: Some(u.choose(OPS)?.to_string()),
                name: Some(out.clone()),
                input: inputs,
                output: vec![out.clone()],
                ..Default::default()
            };
            if u.ratio(1, 2)? {
                n.attribute.push(attr_int(u.choose(ATTR_NAMES)?, pick_int(u)?));
            }
            g.node.push(n);
            if u.ratio(1, 2)? {
                g.output.push(proto::ValueInfoProto {
                    name: Some(out),
                    ..Default::default()
                });
            }
        }
        // a graph output pointed elsewhere
        11 if !g.output.is_empty() => {
            let i = u.choose_index(g.output.len())?;
            g.output[i].name = Some(u.choose(&names)?.clone());
        }
        // an initializer that shadows an input, or a duplicate name
        12 if !g.initializer.is_empty() => {
            let i = u.choose_index(g.initializer.len())?;
            g.initializer[i].name = Some(u.choose(&names)?.clone());
        }
        // node outputs renamed to collide or vanish
        _ if !g.node.is_empty() => {
            let i = u.choose_index(g.node.len())?;
            let name = u.choose(&names)?.clone();
            let n = &mut g.node[i];
            if n.output.is_empty() || u.ratio(1, 4)? {
                n.output.push(name);
            } else {
                let j = u.choose_index(n.output.len())?;
                n.output[j] = name;
            }
        }
        _ => {}
    }
    Ok(())
}

fn edit_model(m: &mut proto::ModelProto, u: &mut Unstructured) -> AResult<()> {
    match u.int_in_range(0..=9)? {
        0 => {
            let v = *u.choose(&[1i64, 6, 7, 9, 11, 13, 17, 18, 21, 23, 25, 0, -1, i64::MAX])?;
            match m.opset_import.first_mut() {
                Some(o) => o.version = Some(v),
                None => m.opset_import.push(proto::OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(v),
                }),
            }
        }
        1 => m.ir_version = Some(*u.choose(&[0i64, 3, 4, 7, 10, 11, -1])?),
        2 if !m.functions.is_empty() => {
            let i = u.choose_index(m.functions.len())?;
            let f = &mut m.functions[i];
            if u.ratio(1, 2)? {
                f.input.push("extra".into());
            } else if let Some(n) = f.node.first_mut() {
                n.op_type = Some(u.choose(OPS)?.to_string());
            }
        }
        _ => {
            if let Some(g) = m.graph.as_mut() {
                edit_graph(g, u)?;
            }
        }
    }
    Ok(())
}

/// A mutant of `base`: structured edits of the decoded model, or byte-level havoc.
fn mutant(rng: &mut Rng, base: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(3, 5) {
        if let Ok(mut m) = proto::ModelProto::decode(base) {
            let entropy = rng.bytes(512);
            let mut u = Unstructured::new(&entropy);
            let edits = 1 + rng.below(3);
            for _ in 0..edits {
                let _ = edit_model(&mut m, &mut u);
            }
            let mut out = m.encode_to_vec();
            if rng.chance(1, 5) {
                mutate(rng, &mut out, corpus, base.len() * 2 + 64, false);
            }
            return out;
        }
    }
    let mut out = base.to_vec();
    mutate(rng, &mut out, corpus, base.len() * 2 + 64, false);
    out
}

#[test]
fn fuzz_onnx_loader_and_planner() {
    let seeds = seeds();
    let corpus: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    // Every seed builds and runs cleanly as it is.
    for (name, b) in &seeds {
        assert_eq!(check(b), Ok(()), "seed {name}");
    }
    for name in ["small", "shape", "dense", "control_flow", "int_function"] {
        let b = &seeds.iter().find(|(n, _)| n == name).unwrap().1;
        Session::builder()
            .build_from_bytes(b)
            .unwrap_or_else(|e| panic!("seed {name} must build: {e}"));
    }
    let mut fz = Fuzzer::new("onnx-loader", env!("CARGO_TARGET_TMPDIR"));
    let iters = iterations(DEFAULT_ITERS);
    for _ in 0..iters {
        // Real models take long to decode and build in a debug build: a pick that lands on one
        // is kept one time in eight, so they get a share of the budget without taking it over.
        let mut base = fz.rng().pick(&corpus);
        while base.len() > 256 << 10 && !fz.rng().chance(1, 8) {
            base = fz.rng().pick(&corpus);
        }
        let base = base.clone();
        let input = mutant(fz.rng(), &base, &corpus);
        fz.exec(&input, || check(&input));
    }
    println!(
        "{} seeds; of {} mutants {} built and {} ran",
        corpus.len(),
        iters,
        BUILT.load(Relaxed) - seeds.len(),
        RAN.load(Relaxed) - seeds.len()
    );
    fz.finish();
}

#[test]
fn replay_saved_input() {
    if let Ok(path) = std::env::var("KILN_FUZZ_REPLAY") {
        let b = std::fs::read(&path).unwrap();
        assert_eq!(check(&b), Ok(()), "{path}");
    }
}

/// The check reports a kernel panic (caught by the executor and returned as an internal error)
/// as a crash: `ai.kiln.testing::Fault` panics when its input holds the trigger value, and 64
/// synthesized values drawn from eight include it.
#[test]
fn check_flags_a_caught_kernel_panic() {
    kiln::internals::runtime::ops::fault::enable_fault_injection();
    let mut fault = node("Fault", "fault", &["x"], &["y"]);
    fault.domain = Some("ai.kiln.testing".into());
    fault.attribute.push(proto::AttributeProto {
        name: Some("trigger".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(0.0),
        ..Default::default()
    });
    let mut m = model(
        vec![fault],
        vec![value("x", 1, &[64])],
        vec![value("y", 1, &[64])],
        vec![],
    );
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("ai.kiln.testing".into()),
        version: Some(1),
    });
    let e = check(&bytes(&m)).expect_err("the injected panic is a crash");
    assert!(e.contains("injected fault"), "{e}");
}

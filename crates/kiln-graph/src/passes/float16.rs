//! fp16 conversion: rewrites a float32 graph to compute in float16 (mixed precision), in the spirit
//! of onnxconverter-common's `convert_float_to_float16(keep_io_types=True)` and ONNX Runtime's
//! mixed-precision tooling. Not one of the optimization levels: [`convert_to_float16`] runs after
//! them (`Session` with `Precision::F16`, `kiln optimize --precision fp16`).
//!
//! What it does:
//! - every node is either *converted* (its float32 tensor inputs and outputs become float16) or
//!   *kept in fp32* (it reads and writes exactly the dtypes of the original model);
//! - where a value crosses between the two, one shared `Cast` per (value, dtype) is inserted;
//! - float32 initializers read by converted nodes get a float16 copy made once here (values
//!   clamped to the finite f16 range, so `-3.4e38` masks become `-65504`, not `-inf`); the fp32
//!   original is dropped when nothing else reads it;
//! - graph inputs and outputs keep their float32 dtype (Casts at the boundary), and so do values a
//!   subgraph reads by name (the producer writes an f16 value, a Cast writes the named f32 one);
//! - Cast pairs that cancel (f16 -> f32 -> f16, or our own f32 -> f16 -> f32) and Casts to the
//!   dtype they already have are removed; value dtypes are updated so inference stays right.
//!
//! Nodes kept in fp32, and why:
//! - [`KEEP_FP32`]: ops whose *result* does not survive f16 storage (sums and products that
//!   overflow 65504, `Exp`/`Pow`/`Softplus` overflow, running sums), index and coordinate math
//!   (`Range`, `Resize`, `RoiAlign`, `NonMaxSuppression`, `TopK` whose order changes under
//!   rounding), recurrences (`RNN`/`LSTM`/`GRU`), signal processing, random ops, quantization ops
//!   whose scale dtype is tied to float32, and `BatchNormalization` (its statistics may have a
//!   dtype of their own);
//! - ops outside the default domain other than the `com.microsoft` kernels Kiln fuses to and Kiln's
//!   own fused `ai.kiln` ops (`MatMulBias`, `FusedConvChain`, `ElementwiseChain`);
//! - nodes with subgraphs (If/Loop/Scan) and sequence/optional ops. The bodies themselves are
//!   converted, each like a graph of its own: their inputs, outputs and captured outer values stay
//!   f32 with Casts inside the body, so the owning node reads and writes f32 as before;
//! - nodes where a tensor dtype is unknown (converting could mix dtypes);
//! - *index math*: a float computation on values made from integers (a Cast from an integer type,
//!   a Constant/ConstantOfShape/EyeLike) and constants only, e.g. `Shape -> Cast -> Mul -> Floor ->
//!   Cast` for a Resize size. f16 holds integers exactly only up to 2048.
//!
//! Converted on purpose, because Kiln's kernels widen f16 to f32 inside and accumulate in f32:
//! `LayerNormalization` (stash_type 1), `RMSNormalization`, `GroupNormalization`,
//! `InstanceNormalization`, `Softmax`/`LogSoftmax`, the opset-23 `Attention`, `ReduceMean`,
//! `ReduceL2`, `ReduceLogSumExp`, `MatMul`/`Gemm`/`Conv` (the gemm crate packs f16 into f32
//! panels). Their inputs and outputs are f16 storage; the arithmetic that loses precision is f32.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{Attribute, DType, Graph, GraphError, Node, Result, Shape, TensorData, ValueId, ValueInfo, ValueKind};

use super::dce::{drop_unused_initializers, eliminate_dead_nodes};

mod widen;
pub use widen::{has_float16, widen_to_float32, WidenReport};

/// Default-domain ops kept in fp32 (see the module doc for the reasons).
pub const KEEP_FP32: &[&str] = &[
    // results that overflow f16 or accumulate in the output dtype
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceProd",
    "ReduceL1",
    "ReduceLogSum",
    "CumSum",
    "CumProd",
    "Exp",
    "Pow",
    "Softplus",
    "Mish",
    "BatchNormalization",
    // bit reinterpretation of the f32 data
    "BitCast",
    // index and coordinate math, ordering
    "Range",
    "Resize",
    "Upsample",
    "RoiAlign",
    "NonMaxSuppression",
    "TopK",
    "GridSample",
    "AffineGrid",
    "Col2Im",
    // recurrences and signal processing
    "RNN",
    "LSTM",
    "GRU",
    "DFT",
    "STFT",
    "MelWeightMatrix",
    "HannWindow",
    "HammingWindow",
    "BlackmanWindow",
    // random
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
    // quantization: scales are float32-typed together with the float side
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
    // sequences, optionals
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceInsert",
    "SequenceErase",
    "SequenceAt",
    "SequenceLength",
    "SplitToSequence",
    "ConcatFromSequence",
    "SequenceMap",
    "Optional",
    "OptionalGetElement",
    "OptionalHasElement",
];

/// `com.microsoft` ops converted like their default-domain counterparts (Kiln's fused kernels).
const MS_CONVERTIBLE: &[&str] = &["FusedConv", "Gelu", "FastGelu", "BiasGelu"];

/// Kiln's own fused ops (`ai.kiln`, made by the optimization levels) converted like the nodes they
/// replace: `MatMulBias` is MatMul + Add + an activation, `FusedConvChain` a Conv and an element-wise
/// chain, `ElementwiseChain` affine/clip/Sigmoid/HardSwish steps (none of them overflow-prone the
/// way `Exp` or a sum is). Kept in fp32 these would run every product of a fused model in f32.
const KILN_CONVERTIBLE: &[&str] = &["MatMulBias", "FusedConvChain", "ElementwiseChain"];

/// Whether a node outside the default domain is one of the fused ops converted to f16.
fn fused_convertible(node: &Node) -> bool {
    let op = node.op_type.as_str();
    match node.domain.as_str() {
        "com.microsoft" => MS_CONVERTIBLE.contains(&op),
        "ai.kiln" => KILN_CONVERTIBLE.contains(&op),
        _ => false,
    }
}

/// Options for [`convert_to_float16`].
#[derive(Debug, Clone, Default)]
pub struct Float16Options {
    /// Initializers that are also graph inputs may be fed by the caller (IR >= 4): they are then
    /// treated as fp32 graph inputs, not constants.
    pub overridable_initializers: bool,
    /// Extra op types (default domain) to keep in fp32, on top of [`KEEP_FP32`].
    pub keep_fp32: Vec<String>,
}

impl Float16Options {
    /// Options for a model (its IR version decides whether initializers are overridable).
    pub fn for_model(model: &crate::Model) -> Self {
        Float16Options {
            overridable_initializers: model.ir_version >= 4,
            keep_fp32: Vec::new(),
        }
    }
}

/// What [`convert_to_float16`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Float16Report {
    /// Nodes now computing in f16.
    pub converted_nodes: usize,
    /// Nodes kept in fp32, by reason.
    pub kept_fp32: BTreeMap<&'static str, usize>,
    /// f32 initializers given an f16 copy (the f32 original is dropped when unread).
    pub converted_initializers: usize,
    /// Casts in the final graph that the conversion added.
    pub casts_inserted: usize,
    /// Casts removed because they cancelled or were no-ops.
    pub casts_removed: usize,
}

impl std::fmt::Display for Float16Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fp16: {} nodes converted, {} initializers, {} casts inserted, {} removed",
            self.converted_nodes, self.converted_initializers, self.casts_inserted, self.casts_removed
        )?;
        for (k, v) in &self.kept_fp32 {
            write!(f, "; kept fp32 ({k}): {v}")?;
        }
        Ok(())
    }
}

/// The element dtype of every value of `g` (by index): declared, from initializers, or inferred
/// from the op; `None` where it cannot be told.
pub fn infer_dtypes(g: &Graph, order: &[usize]) -> Vec<Option<DType>> {
    let mut dt: Vec<Option<DType>> = g.values.iter().map(|v| v.dtype).collect();
    for (id, t) in &g.initializers {
        if let Some(d) = dt.get_mut(id.index()) {
            *d = Some(t.dtype);
        }
    }
    for &i in order {
        let Some(node) = g.nodes.get(i) else { continue };
        let ins: Vec<Option<DType>> = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| dt.get(v.index()).copied().flatten()))
            .collect();
        for (k, out) in node.outputs.iter().enumerate() {
            let Some(out) = out else { continue };
            if dt.get(out.index()).copied().flatten().is_some() {
                continue;
            }
            let d = output_dtype(node, k, &ins);
            if let Some(slot) = dt.get_mut(out.index()) {
                *slot = d;
            }
        }
    }
    dt
}

fn attr_dtype(node: &Node, name: &str) -> Option<Option<DType>> {
    match node.attr(name) {
        Some(Attribute::Int(code)) => Some(DType::from_onnx(*code as i32)),
        _ => None,
    }
}

fn subgraph_output(node: &Node, attr: &str, k: usize) -> Option<DType> {
    match node.attr(attr) {
        Some(Attribute::Graph(b)) => b
            .outputs
            .get(k)
            .and_then(|v| b.values.get(v.index()))
            .and_then(|v| v.dtype),
        _ => None,
    }
}

/// Dtype of output `k` of `node` given its input dtypes (the ONNX type constraints).
fn output_dtype(node: &Node, k: usize, ins: &[Option<DType>]) -> Option<DType> {
    let in_ = |i: usize| ins.get(i).copied().flatten();
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return fused_convertible(node).then(|| in_(0)).flatten();
    }
    match node.op_type.as_str() {
        "Cast" => attr_dtype(node, "to").flatten(),
        "CastLike" => in_(1),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => Some(DType::I64),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Not" | "IsNaN"
        | "IsInf" => Some(DType::Bool),
        "Constant" => match (node.attr("value"), node.attr("value_float"), node.attr("value_floats")) {
            (Some(Attribute::Tensor(t)), _, _) => Some(t.dtype),
            (_, Some(_), _) | (_, _, Some(_)) => Some(DType::F32),
            _ if node.attr("value_int").is_some() || node.attr("value_ints").is_some() => Some(DType::I64),
            _ => None,
        },
        "ConstantOfShape" => match node.attr("value") {
            Some(Attribute::Tensor(t)) => Some(t.dtype),
            None => Some(DType::F32),
            _ => None,
        },
        "EyeLike" | "RandomNormalLike" | "RandomUniformLike" | "Bernoulli" => {
            attr_dtype(node, "dtype").unwrap_or(in_(0))
        }
        "RandomNormal" | "RandomUniform" => attr_dtype(node, "dtype").unwrap_or(Some(DType::F32)),
        "Multinomial" => attr_dtype(node, "dtype").unwrap_or(Some(DType::I32)),
        "MelWeightMatrix" | "HannWindow" | "HammingWindow" | "BlackmanWindow" => {
            attr_dtype(node, "output_datatype").unwrap_or(Some(DType::F32))
        }
        "TopK" | "MaxPool" | "Unique" if k > 0 => Some(DType::I64),
        "LayerNormalization" if k > 0 => match node.attr("stash_type") {
            None | Some(Attribute::Int(1)) => Some(DType::F32),
            _ => in_(0),
        },
        "Where" => in_(1),
        "OneHot" => in_(2),
        "QuantizeLinear" => in_(2)
            .or(attr_dtype(node, "output_dtype").flatten())
            .or(Some(DType::U8)),
        "DequantizeLinear" => in_(1),
        "DynamicQuantizeLinear" => Some(if k == 1 { DType::F32 } else { DType::U8 }),
        "QLinearMatMul" | "QLinearConv" => in_(7),
        "MatMulInteger" | "ConvInteger" => Some(DType::I32),
        "If" => subgraph_output(node, "then_branch", k),
        "Loop" => subgraph_output(node, "body", k + 1),
        "Scan" => subgraph_output(node, "body", k),
        "SequenceLength" => Some(DType::I64),
        "OptionalHasElement" => Some(DType::Bool),
        // Sequences and optionals (and elements taken out of them): not told here.
        "SequenceConstruct" | "SequenceEmpty" | "SequenceInsert" | "SequenceErase" | "SequenceAt"
        | "SplitToSequence" | "ConcatFromSequence" | "SequenceMap" | "Optional" | "OptionalGetElement" => None,
        _ => in_(0),
    }
}

/// Why a node stays in fp32, `None` when it is converted.
fn keep_reason(
    g: &Graph,
    node: &Node,
    dt: &[Option<DType>],
    tainted: &HashSet<ValueId>,
    is_const: &dyn Fn(ValueId) -> bool,
    options: &Float16Options,
) -> Option<&'static str> {
    let op = node.op_type.as_str();
    let default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
    if !(default_domain || fused_convertible(node)) {
        return Some("other domain");
    }
    if default_domain && (KEEP_FP32.contains(&op) || options.keep_fp32.iter().any(|k| k == op)) {
        return Some("block list");
    }
    if super::edit::has_subgraph(node) || !node.implicit_inputs.is_empty() {
        return Some("subgraph");
    }
    let dtype_of = |v: ValueId| dt.get(v.index()).copied().flatten();
    let tensorish = |v: ValueId| matches!(g.value(v).kind, ValueKind::Tensor | ValueKind::Unknown);
    let values: Vec<ValueId> = node.inputs.iter().chain(&node.outputs).flatten().copied().collect();
    if values.iter().any(|&v| !tensorish(v)) {
        return Some("sequence or optional");
    }
    if values.iter().any(|&v| dtype_of(v).is_none()) {
        return Some("unknown dtype");
    }
    // Index math: float values made from integers or constants only (and what reads them).
    let f32_inputs: Vec<ValueId> = node
        .inputs
        .iter()
        .flatten()
        .copied()
        .filter(|&v| dtype_of(v) == Some(DType::F32))
        .collect();
    let derived = f32_inputs.iter().any(|v| tainted.contains(v))
        && f32_inputs.iter().all(|&v| tainted.contains(&v) || is_const(v));
    if derived {
        return Some("index math");
    }
    let produces_f32 = node.outputs.iter().flatten().any(|&v| dtype_of(v) == Some(DType::F32));
    if !produces_f32 {
        return None;
    }
    let source = match op {
        "Cast" => node
            .inputs
            .first()
            .copied()
            .flatten()
            .and_then(dtype_of)
            .is_some_and(|d| !d.is_float()),
        "Constant" | "ConstantOfShape" | "EyeLike" => true,
        _ => false,
    };
    if source {
        return Some("index math");
    }
    // An op turning non-f32 inputs into f32 by a rule this pass does not rewrite stays as written.
    if f32_inputs.is_empty() && op != "Cast" {
        return Some("f32 from other dtypes");
    }
    None
}

/// Converts an f32 tensor to f16, clamping to the finite f16 range.
pub fn tensor_to_f16(t: &TensorData) -> Result<TensorData> {
    let vals = t.values::<f32>().ok_or_else(|| GraphError::BadTensor {
        name: t.name.clone(),
        reason: "expected float32 data".into(),
    })?;
    let max = half::f16::MAX.to_f32();
    let h: Vec<half::f16> = vals
        .iter()
        .map(|&v| {
            if v.is_nan() {
                half::f16::NAN
            } else {
                half::f16::from_f32(v.clamp(-max, max))
            }
        })
        .collect();
    TensorData::from_values(t.name.clone(), t.dims.clone(), &h)
}

/// The attributes of an f32 Constant/ConstantOfShape with the value in f16; `None` when the
/// value is not a plain f32 one.
fn constant_attrs_to_f16(node: &Node) -> Result<Option<BTreeMap<String, Attribute>>> {
    let mut attrs = node.attributes.clone();
    let value = match (
        node.op_type.as_str(),
        node.attr("value"),
        node.attr("value_float"),
        node.attr("value_floats"),
    ) {
        (_, Some(Attribute::Tensor(t)), None, None) if t.dtype == DType::F32 => tensor_to_f16(t)?,
        ("Constant", None, Some(Attribute::Float(f)), None) => {
            tensor_to_f16(&TensorData::from_values(node.name.clone(), vec![], &[*f])?)?
        }
        ("Constant", None, None, Some(Attribute::Floats(f))) => {
            tensor_to_f16(&TensorData::from_values(node.name.clone(), vec![f.len()], f)?)?
        }
        ("ConstantOfShape", None, None, None) => {
            tensor_to_f16(&TensorData::from_values(node.name.clone(), vec![1], &[0f32])?)?
        }
        _ => return Ok(None),
    };
    attrs.remove("value_float");
    attrs.remove("value_floats");
    attrs.insert("value".into(), Attribute::Tensor(value));
    Ok(Some(attrs))
}

struct Rewriter<'a> {
    names: HashSet<String>,
    /// f16 / f32 stand-ins of each original f32 value.
    f16_of: HashMap<ValueId, ValueId>,
    f32_of: HashMap<ValueId, ValueId>,
    new_nodes: Vec<Node>,
    /// Names of the Cast nodes this pass made or retargeted (only these may be removed as pairs).
    our_casts: HashSet<String>,
    report: &'a mut Float16Report,
}

impl Rewriter<'_> {
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 0;
        while self.names.contains(&name) {
            k += 1;
            name = format!("{base}_{k}");
        }
        self.names.insert(name.clone());
        name
    }

    fn new_value(&mut self, g: &mut Graph, base: &str, dtype: DType, shape: Option<Shape>) -> ValueId {
        let name = self.fresh(base);
        g.add_value(ValueInfo {
            name,
            kind: ValueKind::Tensor,
            dtype: Some(dtype),
            shape,
        })
    }

    fn cast_node(&mut self, g: &mut Graph, from: ValueId, to: ValueId, dtype: DType) {
        let name = self.fresh(&format!("{}_cast_{}", g.value_name(from), dtype_suffix(dtype)));
        let mut attributes = BTreeMap::new();
        attributes.insert("to".to_string(), Attribute::Int(i64::from(dtype.to_onnx())));
        self.our_casts.insert(name.clone());
        self.new_nodes.push(super::edit::make_node(
            name,
            "",
            "Cast",
            vec![Some(from)],
            vec![Some(to)],
            attributes,
        ));
    }

    /// The value standing for original f32 value `v` in `want` (F16 or F32), made on first use.
    fn get(&mut self, g: &mut Graph, v: ValueId, want: DType, constant: bool) -> Result<ValueId> {
        let map = if want == DType::F16 { &self.f16_of } else { &self.f32_of };
        if let Some(&x) = map.get(&v) {
            return Ok(x);
        }
        let base = format!("{}_{}", g.value_name(v), dtype_suffix(want));
        let shape = g.value(v).shape.clone();
        let x = if want == DType::F16 && constant {
            let src = g.initializers.get(&v).ok_or_else(|| GraphError::Pass {
                pass: "float16".into(),
                reason: format!("constant '{}' has no initializer", g.value_name(v)),
            })?;
            let mut t = tensor_to_f16(src)?;
            let id = self.new_value(g, &base, DType::F16, shape);
            t.name = g.value_name(id).to_string();
            g.initializers.insert(id, t);
            self.report.converted_initializers += 1;
            id
        } else {
            // The other representation exists already (the producer's output); cast from it.
            let from = if want == DType::F16 {
                self.f32_of.get(&v)
            } else {
                self.f16_of.get(&v)
            };
            let from = *from.ok_or_else(|| GraphError::Pass {
                pass: "float16".into(),
                reason: format!("value '{}' has no source", g.value_name(v)),
            })?;
            let id = self.new_value(g, &base, want, shape);
            self.cast_node(g, from, id, want);
            id
        };
        if want == DType::F16 {
            self.f16_of.insert(v, x);
        } else {
            self.f32_of.insert(v, x);
        }
        Ok(x)
    }
}

fn dtype_suffix(d: DType) -> &'static str {
    if d == DType::F16 {
        "fp16"
    } else {
        "fp32"
    }
}

/// Rewrites `graph` to compute in float16. See the module doc. Returns what was converted and kept
/// (subgraph bodies included).
pub fn convert_to_float16(graph: &mut Graph, options: &Float16Options) -> Result<Float16Report> {
    // Value names must be unique across the model, bodies included (ONNX's SSA rule).
    let mut names = HashSet::new();
    graph.for_each_graph(&mut |g| names.extend(g.values.iter().map(|v| v.name.clone())));
    convert_graph(graph, options, &HashMap::new(), &mut names)
}

impl Float16Report {
    fn merge(&mut self, other: Float16Report) {
        self.converted_nodes += other.converted_nodes;
        self.converted_initializers += other.converted_initializers;
        self.casts_inserted += other.casts_inserted;
        self.casts_removed += other.casts_removed;
        for (k, v) in other.kept_fp32 {
            *self.kept_fp32.entry(k).or_insert(0) += v;
        }
    }
}

/// [`convert_to_float16`] on one graph; `outer` holds the dtypes of the enclosing scopes' values
/// by name (what a body's captures are).
fn convert_graph(
    graph: &mut Graph,
    options: &Float16Options,
    outer: &HashMap<String, DType>,
    names: &mut HashSet<String>,
) -> Result<Float16Report> {
    let mut report = Float16Report::default();
    for c in graph.captures.clone() {
        if let Some(info) = graph.values.get_mut(c.index()) {
            if info.dtype.is_none() {
                info.dtype = outer.get(&info.name).copied();
            }
        }
    }
    let order = graph.topological_order()?;
    let dt = infer_dtypes(graph, &order);
    // What a body nested here sees by name: this scope's original dtypes over the outer ones.
    let mut scope = outer.clone();
    for (v, d) in graph.values.iter().zip(&dt) {
        if let Some(d) = d {
            scope.insert(v.name.clone(), *d);
        }
    }
    let dtype_of = |v: ValueId| dt.get(v.index()).copied().flatten();
    let is_f32 = |v: ValueId| dtype_of(v) == Some(DType::F32);
    let overridable = |g: &Graph, v: ValueId| options.overridable_initializers && g.inputs.contains(&v);
    let constant_set: HashSet<ValueId> = graph
        .initializers
        .keys()
        .copied()
        .filter(|v| !overridable(graph, *v))
        .collect();
    let is_const = |v: ValueId| constant_set.contains(&v);

    // 1. Decide, in topological order, which nodes convert.
    let mut convert = vec![false; graph.nodes.len()];
    let mut tainted: HashSet<ValueId> = HashSet::new();
    for &i in &order {
        let node = &graph.nodes[i];
        match keep_reason(graph, node, &dt, &tainted, &is_const, options) {
            None => {
                convert[i] = true;
                report.converted_nodes += 1;
            }
            Some(reason) => {
                *report.kept_fp32.entry(reason).or_insert(0) += 1;
                if reason == "index math" {
                    tainted.extend(node.outputs.iter().flatten().copied().filter(|&v| is_f32(v)));
                }
            }
        }
    }

    let mut pinned: HashSet<ValueId> = graph.outputs.iter().copied().collect();
    pinned.extend(graph.captures.iter().copied());
    for n in &graph.nodes {
        pinned.extend(n.implicit_inputs.iter().copied());
    }

    // A Constant/ConstantOfShape read only by converted nodes (a weight made at run time) converts
    // too, by rewriting its value attribute: no Cast at every run.
    let mut readers: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten() {
            readers.entry(*v).or_default().push(i);
        }
    }
    for i in 0..convert.len() {
        let node = &graph.nodes[i];
        let is_source = matches!(node.op_type.as_str(), "Constant" | "ConstantOfShape") && node.domain.is_empty();
        let Some(Some(out)) = node.outputs.first().copied() else {
            continue;
        };
        let feeds_f16 = readers
            .get(&out)
            .is_some_and(|r| r.iter().all(|&c| convert.get(c).copied().unwrap_or(false)));
        if convert[i] || !is_source || !is_f32(out) || pinned.contains(&out) || !feeds_f16 {
            continue;
        }
        if let Some(attrs) = constant_attrs_to_f16(node)? {
            graph.nodes[i].attributes = attrs;
            convert[i] = true;
            report.converted_nodes += 1;
            if let Some(n) = report.kept_fp32.get_mut("index math") {
                *n = n.saturating_sub(1);
            }
        }
    }
    report.kept_fp32.retain(|_, n| *n > 0);

    // 2. Representations of every f32 value at its source.
    let mut rw = Rewriter {
        names: std::mem::take(names),
        f16_of: HashMap::new(),
        f32_of: HashMap::new(),
        new_nodes: Vec::new(),
        our_casts: HashSet::new(),
        report: &mut report,
    };
    for v in graph
        .inputs
        .iter()
        .chain(graph.initializers.keys())
        .chain(&graph.captures)
    {
        if is_f32(*v) {
            rw.f32_of.insert(*v, *v);
        }
    }
    for (i, &conv) in convert.iter().enumerate() {
        let outs: Vec<(usize, ValueId)> = graph.nodes[i]
            .outputs
            .iter()
            .enumerate()
            .filter_map(|(k, o)| o.map(|o| (k, o)))
            .collect();
        for (k, o) in outs {
            if !is_f32(o) {
                continue;
            }
            // LayerNormalization's Mean/InvStdDev are float32 whatever X is (stash_type 1).
            let n = &graph.nodes[i];
            let fixed_f32 = n.op_type == "LayerNormalization"
                && k > 0
                && matches!(n.attr("stash_type"), None | Some(Attribute::Int(1)));
            if !conv || fixed_f32 {
                rw.f32_of.insert(o, o);
            } else if pinned.contains(&o) {
                // Keep the original (named) value f32 for its by-name readers; compute into a new one.
                let shape = graph.value(o).shape.clone();
                let base = format!("{}_fp16", graph.value_name(o));
                let o16 = rw.new_value(graph, &base, DType::F16, shape);
                graph.nodes[i].outputs[k] = Some(o16);
                graph.values[o.index()].dtype = Some(DType::F32);
                rw.cast_node(graph, o16, o, DType::F32);
                rw.f16_of.insert(o, o16);
                rw.f32_of.insert(o, o);
            } else {
                graph.values[o.index()].dtype = Some(DType::F16);
                rw.f16_of.insert(o, o);
            }
        }
    }

    // 3. Point every explicit f32 input at the representation its node computes in.
    for (i, &conv) in convert.iter().enumerate() {
        let want = if conv { DType::F16 } else { DType::F32 };
        for k in 0..graph.nodes[i].inputs.len() {
            let Some(v) = graph.nodes[i].inputs[k] else { continue };
            if !is_f32(v) {
                continue;
            }
            let x = rw.get(graph, v, want, is_const(v))?;
            graph.nodes[i].inputs[k] = Some(x);
        }
        // Dtype-typed attributes of converted nodes.
        if conv {
            let node = &mut graph.nodes[i];
            if node.op_type == "Cast" && matches!(node.attr("to"), Some(Attribute::Int(1))) {
                node.attributes
                    .insert("to".into(), Attribute::Int(i64::from(DType::F16.to_onnx())));
                rw.our_casts.insert(node.name.clone());
            }
        }
    }
    let new_nodes = std::mem::take(&mut rw.new_nodes);
    let our_casts = std::mem::take(&mut rw.our_casts);
    *names = std::mem::take(&mut rw.names);
    graph.nodes.extend(new_nodes);

    // 4. Remove Casts that cancel or do nothing, then what became dead; restore topological order.
    report.casts_removed = remove_redundant_casts(graph, &our_casts);
    eliminate_dead_nodes(graph);
    drop_unused_initializers(graph);
    report.casts_inserted = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast" && our_casts.contains(&n.name))
        .count();
    let order = graph.topological_order()?;
    let mut slots: Vec<Option<Node>> = std::mem::take(&mut graph.nodes).into_iter().map(Some).collect();
    graph.nodes = order
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .collect();

    // 5. Bodies (If/Loop/Scan): each converts on its own with an f32 interface (its inputs, outputs
    // and captures stay f32, Casts inside), so the owning node keeps its f32 contract.
    let body_options = Float16Options {
        overridable_initializers: false,
        keep_fp32: options.keep_fp32.clone(),
    };
    for node in &mut graph.nodes {
        for attr in node.attributes.values_mut() {
            match attr {
                Attribute::Graph(body) => {
                    let mut b = (**body).clone();
                    report.merge(convert_graph(&mut b, &body_options, &scope, names)?);
                    *body = std::sync::Arc::new(b);
                }
                Attribute::Graphs(bodies) => {
                    for body in bodies.iter_mut() {
                        let mut b = (**body).clone();
                        report.merge(convert_graph(&mut b, &body_options, &scope, names)?);
                        *body = std::sync::Arc::new(b);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(report)
}

fn cast_to(n: &Node) -> Option<DType> {
    match n.attr("to") {
        Some(Attribute::Int(c)) if n.op_type == "Cast" && n.domain.is_empty() => DType::from_onnx(*c as i32),
        _ => None,
    }
}

/// Removes Casts to the dtype their input already has, and `a -(A)-> b -(B)-> c` chains where
/// `c` has `a`'s dtype and both Casts are float16/float32 ones this pass made (f16 -> f32 -> f16
/// is exact; f32 -> f16 -> f32 only loses precision the original did not have). Returns the count.
fn remove_redundant_casts(g: &mut Graph, ours: &HashSet<String>) -> usize {
    let mut removed = 0;
    loop {
        let mut pinned: HashSet<ValueId> = g.outputs.iter().copied().collect();
        pinned.extend(g.inputs.iter().copied());
        pinned.extend(g.captures.iter().copied());
        for n in &g.nodes {
            pinned.extend(n.implicit_inputs.iter().copied());
        }
        let producers = g.producers();
        let dt = match g.topological_order() {
            Ok(order) => infer_dtypes(g, &order),
            Err(_) => break,
        };
        let dtype = |v: ValueId| dt.get(v.index()).copied().flatten();
        let mut hit = None;
        for (i, n) in g.nodes.iter().enumerate() {
            let (Some(to), Some(Some(x)), Some(Some(y))) = (cast_to(n), n.inputs.first(), n.outputs.first()) else {
                continue;
            };
            if pinned.contains(y) {
                continue;
            }
            if dtype(*x) == Some(to) {
                hit = Some((i, *x, *y));
                break;
            }
            let Some(&p) = producers.get(x) else { continue };
            let first = &g.nodes[p];
            let (Some(mid), Some(Some(a))) = (cast_to(first), first.inputs.first()) else {
                continue;
            };
            let floats = [DType::F16, DType::F32];
            if ours.contains(&n.name)
                && ours.contains(&first.name)
                && floats.contains(&mid)
                && floats.contains(&to)
                && dtype(*a) == Some(to)
            {
                hit = Some((i, *a, *y));
                break;
            }
        }
        let Some((i, src, out)) = hit else { break };
        super::edit::replace_uses(g, out, src);
        g.nodes.remove(i);
        removed += 1;
    }
    removed
}

#[cfg(test)]
mod tests;

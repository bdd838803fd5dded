//! Channels-last regions: the 2-D convolutions of a CPU f32 session, and the ops between them,
//! compute on `[N, H, W, C]` tensors, with one `Transpose` where a value enters or leaves the region.
//!
//! In NCHW a depthwise conv on a 7x7 or 14x14 map vectorizes along a short row and a pointwise conv
//! reads its im2col operand scattered over planes; channels-last, every tap of every conv reads
//! `C` contiguous floats, the dense convs are GEMMs with the filter packed once as the right-hand
//! operand (`[pixels, KH*KW*C] x [KH*KW*C, M]`) and the depthwise ones vectorize across channels.
//! ONNX Runtime's CPU provider does the same with its NCHWc layout.
//!
//! Which nodes join (forward, in topological order):
//! - 2-D `Conv`, `com.microsoft::FusedConv` and `ai.kiln::FusedConvChain` with a constant f32 4-D
//!   filter, group 1 or depthwise (one input channel per group, channel multiplier 1), become
//!   `ai.kiln::ConvNhwc` (the conv's attributes, and the fused activation or chain). A conv may start
//!   a region from an NCHW input (one `Transpose` in). With [`super::Options::nhwc_qconvs`], 2-D
//!   `QLinearConv` with a constant 8-bit filter (group 1 or depthwise) and per-tensor input and
//!   output parameters becomes `ai.kiln::QLinearConvNhwc`, and per-tensor `QuantizeLinear`,
//!   `DequantizeLinear` and `ai.kiln::QuantizeDequantize` join as element-wise ops (a static QDQ
//!   CNN then runs channels-last from its first conv to its pooling head), as do ONNX Runtime's
//!   QOperator `com.microsoft` `QLinearAdd`, `QLinearMul`, `QLinearSigmoid`, `QLinearLeakyRelu`
//!   and `QLinearGlobalAveragePool` (with its `channels_last` attribute set).
//! - with at least one input from the region: element-wise unary ops, `ai.kiln::ElementwiseChain`,
//!   two-input element-wise binary ops whose other input is from the region, a constant (its data
//!   permuted once, here), a value broadcast-neutral in every layout (rank <= 1 or all dims 1), or a
//!   rank-4 value of known shape (transposed in); `Concat` and `Split` (axis remapped);
//!   2-D `MaxPool` (one output) and `AveragePool`, `GlobalAveragePool` (as `ai.kiln` NHWC kernels);
//!   nearest `Resize` with constant per-axis scales or sizes (reordered).
//!
//! A region value read outside the region (or a graph output, or read by a subgraph) is transposed
//! back under its original name, so nothing outside changes. Each region (joining nodes connected
//! through the values they pass each other) is decided on its own: it stays NCHW when it has fewer
//! than two convs, or fewer than four per transpose its boundaries need (the transposes would cost
//! more than they save).
//!
//! Runs once after the optimizer's fixed point, only when [`super::Options::nhwc_convs`] is set
//! (CPU f32 sessions at Level All where the runtime's direct channels-last conv kernel runs, AVX-512F,
//! unless `KILN_NHWC=0`; elsewhere with `KILN_NHWC=1`; docs/benchmarks.md) or
//! [`super::Options::nhwc_qconvs`] (CPU f32-precision sessions on every CPU unless `KILN_NHWC=0`:
//! the channels-last integer conv does less work than the NCHW one, which transposes its input and
//! output around the same GEMM; docs/compression.md), and the runtime has the kernels.

use std::collections::{BTreeMap, HashMap};

use crate::{Attribute, DType, Dim, Graph, Node, Result, Shape, TensorData, ValueId};

use super::conv_activation::MS;
use super::conv_chain::CONV_CHAIN;
use super::edit::{constant, make_node, Index};
use super::elementwise_chain::{KILN, OP as CHAIN};
use super::PassCx;

/// Rule name in the optimizer's report.
pub const RULE: &str = "nhwc_layout";
/// `ai.kiln` 2-D convolution over `[N, H, W, C]`: inputs `X, W, B?, Z?` (filter as in ONNX Conv,
/// `Z` an NHWC residual added before the activation), Conv's attributes plus FusedConv's
/// `activation`/`activation_params` or FusedConvChain's `program`.
pub const CONV_NHWC: &str = "ConvNhwc";
/// `ai.kiln` QLinearConv over `[N, H, W, C]` u8/i8 tensors: QLinearConv's inputs and attributes.
pub const QLINEAR_CONV_NHWC: &str = "QLinearConvNhwc";
/// `ai.kiln` MaxPool over `[N, H, W, C]` (MaxPool's attributes, one output).
pub const MAX_POOL_NHWC: &str = "MaxPoolNhwc";
/// `ai.kiln` AveragePool over `[N, H, W, C]` (AveragePool's attributes).
pub const AVERAGE_POOL_NHWC: &str = "AveragePoolNhwc";
/// `ai.kiln` GlobalAveragePool over `[N, H, W, C]`, giving `[N, 1, 1, C]`.
pub const GLOBAL_AVERAGE_POOL_NHWC: &str = "GlobalAveragePoolNhwc";

/// A region needs at least this many convs per boundary transpose.
const MAX_TRANSPOSES_PER_CONV: usize = 4;

/// NCHW -> NHWC and back.
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];
const TO_NCHW: [i64; 4] = [0, 3, 1, 2];

/// Element-wise ops of one data input (further inputs, if any, are scalars: Clip's bounds).
const UNARY: &[&str] = &[
    "Relu",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "Selu",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Softplus",
    "Softsign",
    "Mish",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Erf",
    "Identity",
    "Floor",
    "Ceil",
    "Round",
    "Reciprocal",
];
const BINARY: &[&str] = &["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow", "PRelu"];

/// How one input of a joining node is rewired.
#[derive(Debug, Clone, Copy, PartialEq)]
enum In {
    /// An activation: the region's NHWC value, or a `Transpose` of an outside rank-4 value.
    Layout,
    /// Read as is (filters, biases, scalars, split sizes).
    Keep,
    /// A constant whose data is permuted to NHWC (broadcast operand of rank <= 4).
    Permute,
    /// A constant 1-D vector of one value per axis (Resize's scales or sizes), reordered to NHWC.
    PerAxis,
}

/// Which convs may join a region.
#[derive(Debug, Clone, Copy)]
struct Allow {
    /// f32 `Conv`/`FusedConv`/`FusedConvChain` (as `ConvNhwc`).
    float: bool,
    /// `QLinearConv` (as `QLinearConvNhwc`).
    quantized: bool,
}

/// What a joining node becomes.
#[derive(Debug, Clone)]
enum Kind {
    Conv,
    QConv,
    Same,
    /// Concat or Split on this NCHW axis (normalized), remapped to NHWC.
    Axis(i64),
    Pool(&'static str),
    /// `com.microsoft::QLinearGlobalAveragePool`, told its input is channels-last.
    ChannelsLastAttr,
}

struct Join {
    node: usize,
    inputs: Vec<In>,
    kind: Kind,
}

/// NCHW axis -> NHWC axis.
fn nhwc_axis(a: i64) -> i64 {
    match a {
        0 => 0,
        1 => 3,
        2 => 1,
        _ => 2,
    }
}

fn permute_shape(s: &Shape) -> Option<Shape> {
    (s.rank() == 4).then(|| Shape(TO_NHWC.iter().map(|&p| s.0[p as usize].clone()).collect()))
}

fn known_rank4(g: &Graph, v: ValueId) -> bool {
    g.value(v).shape.as_ref().is_some_and(|s| s.rank() == 4)
}

/// A value that broadcasts the same way in every layout: rank <= 1 of one element, or all dims 1.
fn layout_neutral(g: &Graph, cx: &PassCx, v: ValueId) -> bool {
    if let Some(t) = constant(g, cx.options, v) {
        return t.dims.iter().all(|&d| d == 1);
    }
    g.value(v)
        .shape
        .as_ref()
        .is_some_and(|s| s.0.iter().all(|d| matches!(d, Dim::Known(1))))
}

fn int_attr(n: &Node, name: &str, default: i64) -> Option<i64> {
    match n.attr(name) {
        None => Some(default),
        Some(Attribute::Int(v)) => Some(*v),
        Some(_) => None,
    }
}

/// A 2-D conv (by its `kernel_shape`, when given) of group 1 or depthwise (one input channel per
/// group, channel multiplier 1) with the 4-D filter dims `wd`.
fn dense_or_depthwise_2d(n: &Node, wd: &[usize]) -> bool {
    let Some(group) = int_attr(n, "group", 1) else {
        return false;
    };
    let depthwise = group > 1 && wd[1] == 1 && wd[0] == group as usize;
    let two_d = match n.attr("kernel_shape") {
        Some(Attribute::Ints(k)) => k.len() == 2,
        _ => true,
    };
    (group == 1 || depthwise) && two_d
}

/// The conv's filter when the node can run as `ConvNhwc`.
fn conv_joins(g: &Graph, cx: &PassCx, n: &Node, region: &[bool]) -> Option<Vec<In>> {
    let is_conv = (n.domain.is_empty() && n.op_type == "Conv")
        || (n.domain == MS && n.op_type == "FusedConv")
        || (n.domain == KILN && n.op_type == CONV_CHAIN);
    if !is_conv || n.inputs.len() > 4 || n.inputs.len() < 2 {
        return None;
    }
    let x = n.inputs[0]?;
    let w = constant(g, cx.options, n.inputs[1]?)?;
    if w.dtype != DType::F32 || w.dims.len() != 4 || w.dims.contains(&0) {
        return None;
    }
    if !region[x.index()] && g.value(x).dtype != Some(DType::F32) {
        return None;
    }
    if !dense_or_depthwise_2d(n, &w.dims) {
        return None;
    }
    let mut ins = vec![In::Layout, In::Keep];
    if let Some(b) = n.inputs.get(2) {
        if b.is_some_and(|b| g.value(b).dtype.is_some_and(|d| d != DType::F32)) {
            return None;
        }
        ins.push(In::Keep);
    }
    if let Some(z) = n.inputs.get(3) {
        // FusedConv's residual: the region's value, or an outside one known to be rank 4.
        if let Some(z) = *z {
            if !region[z.index()] && !known_rank4(g, z) {
                return None;
            }
        }
        ins.push(In::Layout);
    }
    Some(ins)
}

/// A 2-D `QLinearConv` that can run as `QLinearConvNhwc`: a constant 8-bit 4-D filter, group 1 or
/// depthwise, per-tensor input and output parameters (the per-channel filter scale, zero point and
/// the bias are per output channel in either layout).
fn qconv_joins(g: &Graph, cx: &PassCx, n: &Node, region: &[bool]) -> Option<Vec<In>> {
    if !(n.domain.is_empty() && n.op_type == "QLinearConv" && (8..=9).contains(&n.inputs.len())) {
        return None;
    }
    let x = n.inputs[0]?;
    let w = constant(g, cx.options, n.inputs[3]?)?;
    if !matches!(w.dtype, DType::U8 | DType::I8) || w.dims.len() != 4 || w.dims.contains(&0) {
        return None;
    }
    if !region[x.index()] && !matches!(g.value(x).dtype, Some(DType::U8 | DType::I8)) {
        return None;
    }
    if !dense_or_depthwise_2d(n, &w.dims) {
        return None;
    }
    // x_scale, x_zero_point, y_scale, y_zero_point.
    for k in [1, 2, 6, 7] {
        if let Some(v) = n.inputs.get(k).copied().flatten() {
            if !layout_neutral(g, cx, v) {
                return None;
            }
        }
    }
    let mut ins = vec![In::Layout];
    ins.extend(std::iter::repeat_n(In::Keep, n.inputs.len() - 1));
    Some(ins)
}

/// A per-tensor QuantizeLinear, DequantizeLinear or `ai.kiln::QuantizeDequantize`: element-wise
/// when its scale and zero point are single values.
fn per_tensor_quantizer(g: &Graph, cx: &PassCx, n: &Node) -> bool {
    let op = n.op_type.as_str();
    let known = (n.domain.is_empty() && matches!(op, "QuantizeLinear" | "DequantizeLinear"))
        || (n.domain == KILN && op == super::qdq_pair::OP);
    let plain_attr = |name: &str| matches!(n.attr(name), None | Some(Attribute::Int(0)));
    known
        && (2..=3).contains(&n.inputs.len())
        && n.outputs.len() == 1
        && plain_attr("block_size")
        && plain_attr("output_dtype")
        && n.inputs[1..].iter().all(|v| v.is_none_or(|v| layout_neutral(g, cx, v)))
}

/// ONNX Runtime's QOperator element-wise ops and pooling (`com.microsoft`) with per-tensor
/// parameters: `QLinearAdd`/`QLinearMul` (inputs 0 and 3 are the operands), `QLinearSigmoid`/
/// `QLinearLeakyRelu`, and `QLinearGlobalAveragePool` (its `channels_last` attribute set).
fn qlinear_joins(g: &Graph, cx: &PassCx, n: &Node, region: &[bool], i: usize) -> Option<Join> {
    if n.domain != MS || n.outputs.len() != 1 {
        return None;
    }
    let in_region = |v: Option<ValueId>| v.is_some_and(|v| region[v.index()]);
    let neutral = |ks: &[usize]| {
        ks.iter().all(|&k| {
            n.inputs
                .get(k)
                .copied()
                .flatten()
                .is_none_or(|v| layout_neutral(g, cx, v))
        })
    };
    let unary = |kind: Kind| {
        (in_region(n.inputs.first().copied().flatten()) && (4..=5).contains(&n.inputs.len()) && neutral(&[1, 2, 3, 4]))
            .then(|| Join {
                node: i,
                inputs: (0..n.inputs.len())
                    .map(|k| if k == 0 { In::Layout } else { In::Keep })
                    .collect(),
                kind,
            })
    };
    match n.op_type.as_str() {
        "QLinearAdd" | "QLinearMul" => {
            if n.inputs.len() != 8 || !neutral(&[1, 2, 4, 5, 6, 7]) {
                return None;
            }
            let (a, b) = (n.inputs[0]?, n.inputs[3]?);
            if !(region[a.index()] || region[b.index()]) {
                return None;
            }
            let how = |v: ValueId| {
                if region[v.index()] || known_rank4(g, v) {
                    Some(In::Layout)
                } else if layout_neutral(g, cx, v) {
                    Some(In::Keep)
                } else {
                    None
                }
            };
            let mut ins = vec![In::Keep; 8];
            ins[0] = how(a)?;
            ins[3] = how(b)?;
            Some(Join {
                node: i,
                inputs: ins,
                kind: Kind::Same,
            })
        }
        "QLinearSigmoid" | "QLinearLeakyRelu" => unary(Kind::Same),
        "QLinearGlobalAveragePool" if matches!(n.attr("channels_last"), None | Some(Attribute::Int(0))) => {
            unary(Kind::ChannelsLastAttr)
        }
        _ => None,
    }
}

fn plan(g: &Graph, cx: &PassCx, allow: Allow, i: usize, region: &[bool]) -> Option<Join> {
    let n = &g.nodes[i];
    let from_region = |k: usize| n.inputs.get(k).copied().flatten().is_some_and(|v| region[v.index()]);
    let join = |inputs: Vec<In>, kind: Kind| Some(Join { node: i, inputs, kind });
    if !n.implicit_inputs.is_empty() || n.outputs.is_empty() {
        return None;
    }
    if allow.float {
        if let Some(ins) = conv_joins(g, cx, n, region) {
            return join(ins, Kind::Conv);
        }
    }
    if allow.quantized {
        if let Some(ins) = qconv_joins(g, cx, n, region) {
            return join(ins, Kind::QConv);
        }
        if let Some(j) = qlinear_joins(g, cx, n, region, i) {
            return Some(j);
        }
        if per_tensor_quantizer(g, cx, n) {
            return from_region(0).then(|| Join {
                node: i,
                inputs: (0..n.inputs.len())
                    .map(|k| if k == 0 { In::Layout } else { In::Keep })
                    .collect(),
                kind: Kind::Same,
            });
        }
    }
    if n.domain == KILN && n.op_type == CHAIN {
        let narrow = matches!(n.attr("min_rank"), None | Some(Attribute::Int(0..=4)));
        return (narrow && n.inputs.len() == 1 && from_region(0)).then(|| Join {
            node: i,
            inputs: vec![In::Layout],
            kind: Kind::Same,
        });
    }
    if !n.domain.is_empty() {
        return None;
    }
    let op = n.op_type.as_str();
    if UNARY.contains(&op) {
        if !from_region(0) || n.outputs.len() != 1 {
            return None;
        }
        // Clip's bounds: scalars.
        let mut ins = vec![In::Layout];
        for v in n.inputs.iter().skip(1) {
            if let Some(v) = v {
                if !layout_neutral(g, cx, *v) {
                    return None;
                }
            }
            ins.push(In::Keep);
        }
        return join(ins, Kind::Same);
    }
    if BINARY.contains(&op) {
        if n.inputs.len() != 2 || n.outputs.len() != 1 || !(from_region(0) || from_region(1)) {
            return None;
        }
        // PRelu's slope broadcasts to X: X must be the region's.
        if op == "PRelu" && !from_region(0) {
            return None;
        }
        let mut ins = Vec::with_capacity(2);
        for v in &n.inputs {
            let v = (*v)?;
            ins.push(if region[v.index()] {
                In::Layout
            } else if layout_neutral(g, cx, v) {
                In::Keep
            } else if let Some(t) = constant(g, cx.options, v) {
                if t.dims.len() > 4 || !fixed_size(t) {
                    return None;
                }
                In::Permute
            } else if known_rank4(g, v) {
                In::Layout
            } else {
                return None;
            });
        }
        return join(ins, Kind::Same);
    }
    match op {
        "Concat" => {
            let axis = int_attr(n, "axis", i64::MIN)?;
            let axis = if axis < 0 { axis + 4 } else { axis };
            if !(0..4).contains(&axis)
                || n.outputs.len() != 1
                || !n.inputs.iter().any(|v| v.is_some_and(|v| region[v.index()]))
            {
                return None;
            }
            for v in &n.inputs {
                let v = (*v)?;
                if !region[v.index()] && !known_rank4(g, v) {
                    return None;
                }
            }
            join(vec![In::Layout; n.inputs.len()], Kind::Axis(axis))
        }
        "Split" => {
            let axis = int_attr(n, "axis", 0)?;
            let axis = if axis < 0 { axis + 4 } else { axis };
            if !(0..4).contains(&axis) || !from_region(0) {
                return None;
            }
            let mut ins = vec![In::Layout];
            ins.extend(std::iter::repeat_n(In::Keep, n.inputs.len().saturating_sub(1)));
            join(ins, Kind::Axis(axis))
        }
        "MaxPool" | "AveragePool" => {
            let two_d = matches!(n.attr("kernel_shape"), Some(Attribute::Ints(k)) if k.len() == 2);
            // MaxPool's optional Indices output (NCHW positions) has no NHWC form.
            let one_output = n.outputs.iter().skip(1).all(|o| o.is_none());
            if !two_d || !one_output || !from_region(0) || n.inputs.len() != 1 {
                return None;
            }
            let target = if op == "MaxPool" {
                MAX_POOL_NHWC
            } else {
                AVERAGE_POOL_NHWC
            };
            join(vec![In::Layout], Kind::Pool(target))
        }
        "Resize" if cx.options.opset() >= 11 => {
            let attr = |name: &str, default: &str| match n.attr(name) {
                None => Some(default.to_string()),
                Some(Attribute::String(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            // Nearest (a gather, exact in any layout) over all axes, one scale or size per axis.
            let nearest = attr("mode", "nearest")? == "nearest"
                && attr("coordinate_transformation_mode", "half_pixel")? != "tf_crop_and_resize"
                && attr("keep_aspect_ratio_policy", "stretch")? == "stretch"
                && n.attr("axes").is_none();
            if !nearest || !from_region(0) || n.outputs.len() != 1 || n.inputs.len() > 4 {
                return None;
            }
            let mut ins = vec![In::Layout];
            for (k, v) in n.inputs.iter().enumerate().skip(1) {
                ins.push(match v {
                    None => In::Keep,
                    Some(v) => {
                        let t = constant(g, cx.options, *v)?;
                        if t.is_empty() || k == 1 {
                            // An empty placeholder, or the roi (read only by tf_crop_and_resize).
                            In::Keep
                        } else if t.dims == [4] && fixed_size(t) {
                            In::PerAxis
                        } else {
                            return None;
                        }
                    }
                });
            }
            join(ins, Kind::Same)
        }
        "GlobalAveragePool" => (from_region(0) && n.inputs.len() == 1 && n.outputs.len() == 1).then(|| Join {
            node: i,
            inputs: vec![In::Layout],
            kind: Kind::Pool(GLOBAL_AVERAGE_POOL_NHWC),
        }),
        _ => None,
    }
}

/// A tensor of whole fixed-size elements (not strings, not sub-byte packed): its bytes can be moved
/// element by element.
fn fixed_size(t: &TensorData) -> bool {
    let es = t.dtype.size_in_bytes();
    !t.dtype.is_packed() && t.dtype != DType::String && es > 0 && t.bytes().len() == t.len() * es
}

/// `t` (rank <= 4, [`fixed_size`]) with leading 1s up to rank 4, permuted to NHWC.
fn permute_constant(t: &TensorData, name: String) -> Option<TensorData> {
    let mut dims = t.dims.clone();
    while dims.len() < 4 {
        dims.insert(0, 1);
    }
    let es = t.dtype.size_in_bytes();
    let (d0, d1, d2, d3) = (dims[0], dims[1], dims[2], dims[3]);
    let src = t.bytes();
    let mut out = Vec::with_capacity(src.len());
    for a in 0..d0 {
        for c in 0..d2 {
            for d in 0..d3 {
                for b in 0..d1 {
                    let at = (((a * d1 + b) * d2 + c) * d3 + d) * es;
                    out.extend_from_slice(&src[at..at + es]);
                }
            }
        }
    }
    TensorData::new(name, t.dtype, vec![d0, d2, d3, d1], out).ok()
}

/// A 4-value per-axis vector `[n, c, h, w]` as `[n, h, w, c]`.
fn reorder_per_axis(t: &TensorData, name: String) -> Option<TensorData> {
    let es = t.dtype.size_in_bytes();
    let src = t.bytes();
    if t.dims != [4] || !fixed_size(t) {
        return None;
    }
    let mut out = Vec::with_capacity(src.len());
    for &a in &TO_NHWC {
        let a = a as usize;
        out.extend_from_slice(&src[a * es..(a + 1) * es]);
    }
    TensorData::new(name, t.dtype, vec![4], out).ok()
}

/// Whether region value `v` is read outside the region (or pinned: a graph output, read by a subgraph).
fn leaves(idx: &Index, member: &[bool], v: ValueId) -> bool {
    idx.pinned.contains(&v) || idx.readers(v).iter().any(|&r| !member[r])
}

/// A new value for the NHWC form of `v` (its dtype, its shape permuted when known).
fn nhwc_value(idx: &mut Index, g: &mut Graph, v: ValueId) -> ValueId {
    let info = g.value(v).clone();
    let shape = info.shape.as_ref().and_then(permute_shape);
    idx.new_value(g, &format!("{}__nhwc", info.name), info.dtype, shape)
}

fn perm_attr(p: [i64; 4]) -> BTreeMap<String, Attribute> {
    BTreeMap::from([("perm".to_string(), Attribute::Ints(p.to_vec()))])
}

/// Rewrites the channels-last regions of `g`; returns how many nodes now compute channels-last.
pub fn run(g: &mut Graph, cx: &PassCx) -> Result<usize> {
    let allow = Allow {
        float: cx.options.nhwc_convs && cx.can_emit(KILN, CONV_NHWC, 1),
        quantized: cx.options.nhwc_qconvs && cx.can_emit(KILN, QLINEAR_CONV_NHWC, 1),
    };
    if !(allow.float || allow.quantized) || cx.options.strict_opsets {
        return Ok(0);
    }
    for op in [MAX_POOL_NHWC, AVERAGE_POOL_NHWC, GLOBAL_AVERAGE_POOL_NHWC] {
        if !cx.can_emit(KILN, op, 1) {
            return Ok(0);
        }
    }
    let Ok(order) = g.topological_order() else {
        return Ok(0);
    };
    let mut region = vec![false; g.values.len()];
    let mut joins = Vec::new();
    let mut member = vec![false; g.nodes.len()];
    for i in order {
        if let Some(j) = plan(g, cx, allow, i, &region) {
            for o in g.nodes[i].outputs.iter().flatten() {
                region[o.index()] = true;
            }
            member[i] = true;
            joins.push(j);
        }
    }
    let idx = Index::new(g);
    // Regions are the groups of joining nodes connected through the values they pass each other;
    // each is kept or left NCHW on its own. A boundary costs a transpose of a whole activation: a
    // region cut up by ops it cannot take (ShuffleNet's channel shuffle is a Reshape/Transpose/Reshape
    // in every block) stays NCHW, while a backbone stays channels-last when the head after it cannot.
    let mut producer: HashMap<ValueId, usize> = HashMap::new();
    for (ji, j) in joins.iter().enumerate() {
        for &o in g.nodes[j.node].outputs.iter().flatten() {
            producer.insert(o, ji);
        }
    }
    let mut parent: Vec<usize> = (0..joins.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for (ji, j) in joins.iter().enumerate() {
        for v in g.nodes[j.node].inputs.iter().flatten() {
            if let Some(&pj) = producer.get(v) {
                let (a, b) = (root(&mut parent, ji), root(&mut parent, pj));
                parent[a] = b;
            }
        }
    }
    let mut convs: HashMap<usize, usize> = HashMap::new();
    let mut crossing: HashMap<usize, Vec<ValueId>> = HashMap::new();
    for (ji, j) in joins.iter().enumerate() {
        let r = root(&mut parent, ji);
        let n = &g.nodes[j.node];
        if matches!(j.kind, Kind::Conv | Kind::QConv) {
            *convs.entry(r).or_default() += 1;
        }
        let cross = crossing.entry(r).or_default();
        for (k, how) in j.inputs.iter().enumerate() {
            if let (In::Layout, Some(v)) = (how, n.inputs.get(k).copied().flatten()) {
                if !region[v.index()] {
                    cross.push(v);
                }
            }
        }
        for &o in n.outputs.iter().flatten() {
            if leaves(&idx, &member, o) {
                cross.push(o);
            }
        }
    }
    let mut kept = HashMap::new();
    for (r, cross) in &mut crossing {
        cross.sort_unstable();
        cross.dedup();
        let c = convs.get(r).copied().unwrap_or(0);
        kept.insert(*r, c >= 2 && cross.len() * MAX_TRANSPOSES_PER_CONV <= c);
    }
    let roots: Vec<usize> = (0..joins.len()).map(|ji| root(&mut parent, ji)).collect();
    let joins: Vec<Join> = joins
        .into_iter()
        .zip(roots)
        .filter(|(_, r)| kept[r])
        .map(|(j, _)| j)
        .collect();
    if joins.is_empty() {
        return Ok(0);
    }
    let mut member = vec![false; g.nodes.len()];
    for j in &joins {
        member[j.node] = true;
    }
    let mut idx = idx;
    // The NHWC twin of every region value.
    let mut twin: HashMap<ValueId, ValueId> = HashMap::new();
    let mut order_of_twins = Vec::new();
    for j in &joins {
        for o in g.nodes[j.node].outputs.clone().into_iter().flatten() {
            let t = nhwc_value(&mut idx, g, o);
            twin.insert(o, t);
            order_of_twins.push((o, t));
        }
    }
    let mut entries: HashMap<ValueId, ValueId> = HashMap::new();
    let mut new_nodes = Vec::new();
    for j in &joins {
        let node = g.nodes[j.node].clone();
        let mut inputs = node.inputs.clone();
        for (k, how) in j.inputs.iter().enumerate() {
            let Some(v) = inputs.get(k).copied().flatten() else {
                continue;
            };
            inputs[k] = Some(match how {
                In::Keep => v,
                In::Layout => match twin.get(&v) {
                    Some(&t) => t,
                    None => match entries.get(&v) {
                        Some(&t) => t,
                        None => {
                            let t = nhwc_value(&mut idx, g, v);
                            let name = format!("{}__to_nhwc", g.value_name(v));
                            new_nodes.push(make_node(
                                name,
                                "",
                                "Transpose",
                                vec![Some(v)],
                                vec![Some(t)],
                                perm_attr(TO_NHWC),
                            ));
                            entries.insert(v, t);
                            t
                        }
                    },
                },
                In::PerAxis | In::Permute => {
                    let name = idx.fresh_name(g, &format!("{}__nhwc", g.value_name(v)));
                    let reorder = if *how == In::PerAxis {
                        reorder_per_axis
                    } else {
                        permute_constant
                    };
                    // `plan` checked the constant is there and movable element by element.
                    let data = constant(g, cx.options, v)
                        .and_then(|c| reorder(c, name.clone()))
                        .ok_or_else(|| crate::GraphError::Pass {
                            pass: RULE.into(),
                            reason: format!("constant '{}' cannot be laid out channels-last", g.value_name(v)),
                        })?;
                    idx.new_initializer(g, &name, data)
                }
            });
        }
        let outputs: Vec<Option<ValueId>> = match j.kind {
            // MaxPool's absent Indices output stays absent.
            Kind::Pool(_) => vec![node.outputs.first().copied().flatten().map(|o| twin[&o])],
            _ => node.outputs.iter().map(|o| o.map(|o| twin[&o])).collect(),
        };
        let mut attributes = node.attributes.clone();
        let (domain, op) = match &j.kind {
            Kind::Conv => (KILN.to_string(), CONV_NHWC.to_string()),
            Kind::QConv => (KILN.to_string(), QLINEAR_CONV_NHWC.to_string()),
            Kind::Same => (node.domain.clone(), node.op_type.clone()),
            Kind::Axis(a) => {
                attributes.insert("axis".into(), Attribute::Int(nhwc_axis(*a)));
                (String::new(), node.op_type.clone())
            }
            Kind::Pool(target) => (KILN.to_string(), target.to_string()),
            Kind::ChannelsLastAttr => {
                attributes.insert("channels_last".into(), Attribute::Int(1));
                (node.domain.clone(), node.op_type.clone())
            }
        };
        g.nodes[j.node] = Node {
            domain,
            op_type: op,
            inputs,
            outputs,
            attributes,
            ..node
        };
    }
    // Region values read outside it come back to NCHW under their own names.
    for (v, t) in order_of_twins {
        if leaves(&idx, &member, v) {
            let name = format!("{}__to_nchw", g.value_name(v));
            new_nodes.push(make_node(
                name,
                "",
                "Transpose",
                vec![Some(t)],
                vec![Some(v)],
                perm_attr(TO_NCHW),
            ));
        }
    }
    for n in new_nodes {
        idx.push_node(g, n);
    }
    idx.finish(g);
    Ok(joins.len())
}

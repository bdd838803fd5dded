//! Weight-only int8 quantization of MatMul/Gemm weights (not part of the optimization levels;
//! `kiln quantize` and `Precision::Int8WeightOnly` call [`quantize_weights_int8`]).
//!
//! A constant f32 2-D weight `B` of `MatMul(A, B)` (`[K, N]`) or `Gemm(A, B, C)` (`[K, N]`, or
//! `[N, K]` with `transB`) becomes `DequantizeLinear(B_q, scale, axis)` with `B_q` int8 and one
//! symmetric scale per output channel `n`: `scale[n] = max_k |B[k, n]| / 127`, zero point 0 (the
//! input is omitted), `B_q = clamp(round(B / scale), -127, 127)`. The rewritten graph is standard
//! ONNX (per-axis DequantizeLinear needs opset 13).
//!
//! A weight is left alone when it is not a constant (a graph input or an overridable
//! initializer), a graph output, smaller than [`QuantizeOptions::min_elements`], not finite, or
//! read by anything other than quantizable MatMul/Gemm weight positions with one common axis. An
//! initializer shared by several nodes is quantized once and every reader reads the one
//! DequantizeLinear.

use std::collections::BTreeMap;

use crate::{Attribute, DType, Graph, Result, Shape, TensorData, ValueId};

use super::edit::{attr_i, constant, input, make_node, out0, Index};
use super::Options;

/// Per-axis DequantizeLinear appeared in opset 13.
pub const PER_AXIS_DQ_OPSET: i64 = 13;

/// What [`quantize_weights_int8`] may do.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// Weights with fewer elements stay f32 (their memory is negligible, their error is not).
    pub min_elements: usize,
    /// Opsets, overridable initializers (`Options::for_model` fills both) and `strict_opsets`: when
    /// set (an exported model), nothing is quantized below opset 13.
    pub options: Options,
}

impl QuantizeOptions {
    pub fn for_model(model: &crate::Model) -> Self {
        QuantizeOptions {
            min_elements: DEFAULT_MIN_ELEMENTS,
            options: Options::for_model(model, super::OptLevel::Disabled),
        }
    }
}

/// Default [`QuantizeOptions::min_elements`]: 4096 (a 64x64 matrix).
pub const DEFAULT_MIN_ELEMENTS: usize = 4096;

/// One quantized weight.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub name: String,
    pub dims: Vec<usize>,
    /// Axis of the per-channel scales in `dims` (the output channel axis).
    pub axis: usize,
    /// Nodes reading it.
    pub readers: usize,
}

/// What [`quantize_weights_int8`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizeReport {
    pub weights: Vec<QuantizedWeight>,
    /// f32 bytes of the quantized weights before.
    pub bytes_before: usize,
    /// Their int8 bytes plus the f32 scales after.
    pub bytes_after: usize,
    /// Constant f32 2-D MatMul/Gemm weights left in f32, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// A candidate: weight value -> (reader node, channel axis) for every quantizable read.
type Reads = BTreeMap<ValueId, Vec<(usize, usize)>>;

/// The weight input and its output-channel axis when `node` reads a quantizable weight.
fn weight_read(g: &Graph, options: &Options, node: &crate::Node) -> Option<(ValueId, usize)> {
    if !node.domain.is_empty() {
        return None;
    }
    let b = input(node, 1)?;
    let t = constant(g, options, b)?;
    if t.dtype != DType::F32 || t.dims.len() != 2 {
        return None;
    }
    match node.op_type.as_str() {
        "MatMul" => Some((b, 1)),
        "Gemm" => {
            let trans_b = attr_i(node, "transB", 0)?;
            Some((b, if trans_b != 0 { 0 } else { 1 }))
        }
        _ => None,
    }
}

/// Symmetric per-channel int8 quantization of a 2-D f32 tensor along `axis` (0 or 1).
/// Returns the int8 codes (same layout) and one scale per channel; `None` on non-finite data.
pub fn quantize_per_channel(t: &TensorData, axis: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    if t.dims.len() != 2 || axis > 1 {
        return None;
    }
    quantize_along(t, axis)
}

/// Symmetric int8 per channel along `axis` of an f32 tensor of any rank: the codes (same layout)
/// and one scale per channel (`max |w| / 127`; 1 for an all-zero channel). `None` when not finite.
pub fn quantize_along(t: &TensorData, axis: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    let w = t.values::<f32>()?;
    let channels = *t.dims.get(axis)?;
    let inner: usize = t.dims[axis + 1..].iter().product();
    if w.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let ch = |i: usize| (i / inner.max(1)) % channels;
    let mut max = vec![0f32; channels];
    for (i, x) in w.iter().enumerate() {
        max[ch(i)] = max[ch(i)].max(x.abs());
    }
    let scale: Vec<f32> = max.iter().map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 }).collect();
    let codes = w
        .iter()
        .enumerate()
        .map(|(i, x)| (x / scale[ch(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    Some((codes, scale))
}

/// Quantizes the initializer `b` (named `name`) per channel along `axis` into `<name>_int8` and
/// `<name>_scale` initializers and counts the bytes in `report`; `None`, with the reason recorded as
/// a skip, when it has fewer than `min_elements` elements or a non-finite value.
fn add_int8_initializers(
    g: &mut Graph,
    idx: &mut Index,
    b: ValueId,
    name: &str,
    axis: usize,
    min_elements: usize,
    report: &mut QuantizeReport,
) -> Result<Option<(ValueId, ValueId, Vec<usize>)>> {
    let Some(t) = g.initializers.get(&b) else {
        return Ok(None);
    };
    if t.len() < min_elements {
        let why = format!("{} elements < {min_elements}", t.len());
        report.skipped.push((name.to_string(), why));
        return Ok(None);
    }
    let Some((codes, scale)) = quantize_per_channel(t, axis) else {
        report.skipped.push((name.to_string(), "not finite".to_string()));
        return Ok(None);
    };
    let dims = t.dims.clone();
    let before = t.bytes().len();
    let qt = TensorData::from_values(format!("{name}_int8"), dims.clone(), &codes)?;
    let st = TensorData::from_values(format!("{name}_scale"), vec![scale.len()], &scale)?;
    report.bytes_before += before;
    report.bytes_after += qt.bytes().len() + st.bytes().len();
    let qv = idx.new_initializer(g, &format!("{name}_int8"), qt);
    let sv = idx.new_initializer(g, &format!("{name}_scale"), st);
    Ok(Some((qv, sv, dims)))
}

/// Rewrites every quantizable MatMul/Gemm weight to `DequantizeLinear(int8, scale, axis)`.
pub fn quantize_weights_int8(g: &mut Graph, q: &QuantizeOptions) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    if q.options.strict_opsets && q.options.opset() < PER_AXIS_DQ_OPSET {
        report.skipped.push((
            "*".into(),
            format!(
                "per-channel DequantizeLinear needs opset {PER_AXIS_DQ_OPSET}, the model declares {}",
                q.options.opset()
            ),
        ));
        return Ok(report);
    }
    let idx = Index::new(g);
    let mut reads: Reads = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if let Some((b, axis)) = weight_read(g, &q.options, n) {
            reads.entry(b).or_default().push((i, axis));
        }
    }
    let mut new_nodes = Vec::new();
    let mut idx = idx;
    for (b, readers) in reads {
        let name = g.value_name(b).to_string();
        let skip = |report: &mut QuantizeReport, why: &str| report.skipped.push((name.clone(), why.to_string()));
        if !g.initializers.contains_key(&b) {
            continue;
        }
        let axis = readers[0].1;
        if idx.pinned.contains(&b) {
            skip(&mut report, "a graph input or output");
            continue;
        }
        if idx.readers(b).len() != readers.len() || readers.iter().any(|r| r.1 != axis) {
            skip(
                &mut report,
                "also read as something other than a weight with the same channel axis",
            );
            continue;
        }
        let Some((qv, sv, dims)) = add_int8_initializers(g, &mut idx, b, &name, axis, q.min_elements, &mut report)?
        else {
            continue;
        };
        let out = idx.new_value(
            g,
            &format!("{name}_dequantized"),
            Some(DType::F32),
            Some(Shape::from_known(&dims)),
        );
        let dq_name = idx.fresh_name(g, &format!("{name}_DequantizeLinear"));
        new_nodes.push(make_node(
            dq_name,
            "",
            "DequantizeLinear",
            vec![Some(qv), Some(sv)],
            vec![Some(out)],
            BTreeMap::from([("axis".to_string(), Attribute::Int(axis as i64))]),
        ));
        for &(ni, _) in &readers {
            if let Some(slot) = g.nodes.get_mut(ni).and_then(|n| n.inputs.get_mut(1)) {
                *slot = Some(out);
            }
        }
        g.initializers.remove(&b);
        report.weights.push(QuantizedWeight {
            name,
            dims,
            axis,
            readers: readers.len(),
        });
    }
    // DequantizeLinear nodes read only initializers: first in the node list keeps it sorted.
    g.nodes.splice(0..0, new_nodes);
    Ok(report)
}

/// DynamicQuantizeLinear and MatMulInteger appeared in opset 10/11.
pub const DYNAMIC_INT8_OPSET: i64 = 11;

/// Dynamic int8: every MatMul with a constant f32 `[K, N]` weight becomes, in standard ONNX (the
/// form onnxruntime's `quantize_dynamic` writes, so ONNX Runtime runs the file too),
///
/// ```text
/// (A_q, a_scale, a_zp) = DynamicQuantizeLinear(A)            once per activation
/// Y = Mul(Cast(MatMulInteger(A_q, W_q, a_zp), FLOAT), Mul(a_scale, w_scale))
/// ```
///
/// with `W_q` int8 and symmetric per-column scales `w_scale[n] = max_k |W[k, n]| / 127` (zero
/// point 0, so MatMulInteger's `b_zero_point` is omitted). Activations are quantized at run time,
/// per tensor, asymmetric u8. Kiln's optimizer turns each tail into `MatMulIntegerToFloat`. The same
/// skips as [`quantize_weights_int8`]; Gemm (and a weight also read by one) stays f32.
pub fn quantize_dynamic_int8(g: &mut Graph, q: &QuantizeOptions) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    if q.options.opset() < DYNAMIC_INT8_OPSET {
        report.skipped.push((
            "*".into(),
            format!(
                "DynamicQuantizeLinear needs opset {DYNAMIC_INT8_OPSET}, the model declares {}",
                q.options.opset()
            ),
        ));
        return Ok(report);
    }
    let mut idx = Index::new(g);
    let mut reads: BTreeMap<ValueId, Vec<usize>> = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if let Some((b, _)) = weight_read(g, &q.options, n) {
            reads.entry(b).or_default().push(i);
        }
    }
    // weight -> (int8 codes, scales)
    let mut quantized: BTreeMap<ValueId, (ValueId, ValueId)> = BTreeMap::new();
    for (b, readers) in reads {
        let name = g.value_name(b).to_string();
        let skip = |report: &mut QuantizeReport, why: &str| report.skipped.push((name.clone(), why.to_string()));
        if !g.initializers.contains_key(&b) {
            continue;
        }
        if idx.pinned.contains(&b) {
            skip(&mut report, "a graph input or output");
            continue;
        }
        let all_matmul = readers.iter().all(|&r| g.nodes[r].op_type == "MatMul");
        if idx.readers(b).len() != readers.len() || !all_matmul {
            skip(
                &mut report,
                "also read by a Gemm or as something other than a MatMul weight",
            );
            continue;
        }
        let Some((qv, sv, dims)) = add_int8_initializers(g, &mut idx, b, &name, 1, q.min_elements, &mut report)? else {
            continue;
        };
        quantized.insert(b, (qv, sv));
        g.initializers.remove(&b);
        report.weights.push(QuantizedWeight {
            name,
            dims,
            axis: 1,
            readers: readers.len(),
        });
    }
    if quantized.is_empty() {
        return Ok(report);
    }
    // Rebuild the node list in order: each activation's DynamicQuantizeLinear right before its
    // first quantized reader (after its producer), each MatMul replaced in place by its tail.
    let mut dq_of: BTreeMap<ValueId, (ValueId, ValueId, ValueId)> = BTreeMap::new();
    let old = std::mem::take(&mut g.nodes);
    let mut nodes = Vec::with_capacity(old.len());
    let scalar = || Some(Shape::from_known(&[]));
    for node in old {
        let target = (node.domain.is_empty() && node.op_type == "MatMul")
            .then(|| Some((input(&node, 0)?, quantized.get(&input(&node, 1)?)?, out0(&node)?)))
            .flatten();
        let Some((a, &(qv, sv), out)) = target else {
            nodes.push(node);
            continue;
        };
        let base = node.name.clone();
        let (aq, a_scale, a_zp) = match dq_of.get(&a) {
            Some(&v) => v,
            None => {
                let an = g.value_name(a).to_string();
                let aq = idx.new_value(g, &format!("{an}_quantized"), Some(DType::U8), None);
                let sc = idx.new_value(g, &format!("{an}_scale"), Some(DType::F32), scalar());
                let zp = idx.new_value(g, &format!("{an}_zero_point"), Some(DType::U8), scalar());
                let dq_name = idx.fresh_name(g, &format!("{an}_DynamicQuantizeLinear"));
                nodes.push(make_node(
                    dq_name,
                    "",
                    "DynamicQuantizeLinear",
                    vec![Some(a)],
                    vec![Some(aq), Some(sc), Some(zp)],
                    BTreeMap::new(),
                ));
                dq_of.insert(a, (aq, sc, zp));
                (aq, sc, zp)
            }
        };
        let y = idx.new_value(g, &format!("{base}_int32"), Some(DType::I32), None);
        let c = idx.new_value(g, &format!("{base}_float"), Some(DType::F32), None);
        let s = idx.new_value(g, &format!("{base}_scale"), Some(DType::F32), None);
        let names = ["MatMulInteger", "Cast", "ScaleMul"].map(|op| idx.fresh_name(g, &format!("{base}_{op}")));
        let [mm_name, cast_name, scale_name] = names;
        nodes.push(make_node(
            mm_name,
            "",
            "MatMulInteger",
            vec![Some(aq), Some(qv), Some(a_zp)],
            vec![Some(y)],
            BTreeMap::new(),
        ));
        nodes.push(make_node(
            cast_name,
            "",
            "Cast",
            vec![Some(y)],
            vec![Some(c)],
            BTreeMap::from([("to".to_string(), Attribute::Int(1))]),
        ));
        nodes.push(make_node(
            scale_name,
            "",
            "Mul",
            vec![Some(a_scale), Some(sv)],
            vec![Some(s)],
            BTreeMap::new(),
        ));
        nodes.push(make_node(
            base,
            "",
            "Mul",
            vec![Some(c), Some(s)],
            vec![Some(out)],
            BTreeMap::new(),
        ));
    }
    g.nodes = nodes;
    Ok(report)
}

/// `true` for a DequantizeLinear of a constant int8/uint8 weight read only as the weight (input 1)
/// of MatMul/Gemm nodes: constant folding keeps it, so the weight stays 1 byte per element and the
/// runtime's int8 MatMul fusion can take it.
pub fn is_quantized_weight(g: &Graph, idx: &Index, node: &crate::Node) -> bool {
    if node.op_type != "DequantizeLinear" || !node.domain.is_empty() {
        return false;
    }
    let int8 = input(node, 0)
        .and_then(|v| g.initializers.get(&v))
        .is_some_and(|t| matches!(t.dtype, DType::I8 | DType::U8));
    let Some(out) = out0(node) else { return false };
    let readers = idx.readers(out);
    int8 && !readers.is_empty()
        && readers.iter().all(|&r| {
            g.nodes.get(r).is_some_and(|n| {
                n.domain.is_empty()
                    && matches!(n.op_type.as_str(), "MatMul" | "Gemm")
                    && input(n, 1) == Some(out)
                    && input(n, 0) != Some(out)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Node, ValueInfo, ValueKind};

    fn value(g: &mut Graph, name: &str, dims: Option<&[usize]>) -> ValueId {
        g.add_value(ValueInfo {
            name: name.into(),
            kind: ValueKind::Tensor,
            dtype: Some(DType::F32),
            shape: dims.map(Shape::from_known),
        })
    }

    fn weight(g: &mut Graph, name: &str, dims: &[usize]) -> ValueId {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 100.0).collect();
        let v = value(g, name, Some(dims));
        g.initializers
            .insert(v, TensorData::from_values(name, dims.to_vec(), &vals).unwrap());
        v
    }

    fn node(g: &mut Graph, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attribute)>) -> ValueId {
        let out = value(g, &format!("{op}_{}_out", g.nodes.len()), None);
        g.nodes.push(Node {
            name: format!("{op}_{}", g.nodes.len()),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|v| Some(*v)).collect(),
            outputs: vec![Some(out)],
            attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            implicit_inputs: Vec::new(),
        });
        out
    }

    fn opts(min: usize) -> QuantizeOptions {
        QuantizeOptions {
            min_elements: min,
            options: Options {
                opsets: BTreeMap::from([(String::new(), 17)]),
                ..Default::default()
            },
        }
    }

    fn dq_nodes(g: &Graph) -> Vec<&Node> {
        g.nodes.iter().filter(|n| n.op_type == "DequantizeLinear").collect()
    }

    /// The int8 codes and scales behind the DequantizeLinear feeding input 1 of `node`.
    fn dq_of(g: &Graph, node: &Node) -> (TensorData, Vec<f32>, i64) {
        let src = input(node, 1).unwrap();
        let dq = g.nodes.iter().find(|n| out0(n) == Some(src)).unwrap();
        assert_eq!(dq.op_type, "DequantizeLinear");
        let q = g.initializers[&input(dq, 0).unwrap()].clone();
        let s = g.initializers[&input(dq, 1).unwrap()].values::<f32>().unwrap();
        let Some(Attribute::Int(axis)) = dq.attr("axis") else {
            panic!("no axis")
        };
        (q, s, *axis)
    }

    fn check_codes(w: &TensorData, q: &TensorData, s: &[f32], axis: usize) {
        let wv = w.values::<f32>().unwrap();
        let qv = q.values::<i8>().unwrap();
        let cols = w.dims[1];
        assert_eq!(q.dims, w.dims);
        assert_eq!(s.len(), w.dims[axis]);
        for (c, &sc) in s.iter().enumerate() {
            let max = (0..wv.len())
                .filter(|i| if axis == 1 { i % cols == c } else { i / cols == c })
                .map(|i| wv[i].abs())
                .fold(0f32, f32::max);
            assert_eq!(sc, max / 127.0, "channel {c}");
        }
        for i in 0..wv.len() {
            let c = if axis == 1 { i % cols } else { i / cols };
            // Round to nearest: the dequantized value is within half a step of the weight.
            assert!((qv[i] as f32 * s[c] - wv[i]).abs() <= s[c] * 0.5 + 1e-7, "element {i}");
        }
    }

    #[test]
    fn matmul_weight_is_quantized_per_column() {
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[2, 3, 8]));
        g.inputs.push(a);
        let w = weight(&mut g, "w", &[8, 16]);
        let orig = g.initializers[&w].clone();
        let y = node(&mut g, "MatMul", &[a, w], vec![]);
        g.outputs.push(y);
        let r = quantize_weights_int8(&mut g, &opts(16)).unwrap();
        assert_eq!(r.weights.len(), 1);
        assert_eq!((r.bytes_before, r.bytes_after), (8 * 16 * 4, 8 * 16 + 16 * 4));
        assert!(!g.initializers.contains_key(&w));
        let mm = g.nodes.iter().find(|n| n.op_type == "MatMul").unwrap();
        assert_eq!(input(mm, 0), Some(a));
        let (q, s, axis) = dq_of(&g, mm);
        assert_eq!(axis, 1);
        check_codes(&orig, &q, &s, 1);
        g.topological_order().unwrap();
    }

    #[test]
    fn dynamic_int8_quantizes_each_activation_once_and_keeps_node_order() {
        // y1 = a @ w (w also read by a second MatMul on b), y2 = b @ w, y3 = a @ w2,
        // y4 = Gemm(a, w3): the Gemm's weight stays f32.
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[2, 8]));
        let b = value(&mut g, "b", Some(&[3, 8]));
        g.inputs.extend([a, b]);
        let w = weight(&mut g, "w", &[8, 16]);
        let w2 = weight(&mut g, "w2", &[8, 4]);
        let w3 = weight(&mut g, "w3", &[8, 4]);
        let orig = g.initializers[&w].clone();
        let y1 = node(&mut g, "MatMul", &[a, w], vec![]);
        let y2 = node(&mut g, "MatMul", &[b, w], vec![]);
        let y3 = node(&mut g, "MatMul", &[a, w2], vec![]);
        let y4 = node(&mut g, "Gemm", &[a, w3], vec![]);
        g.outputs.extend([y1, y2, y3, y4]);
        let r = quantize_dynamic_int8(&mut g, &opts(16)).unwrap();
        assert_eq!(
            r.weights.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["w", "w2"]
        );
        assert_eq!(r.weights[0].readers, 2);
        assert!(g.initializers.contains_key(&w3) && !g.initializers.contains_key(&w));
        let count = |op: &str| g.nodes.iter().filter(|n| n.op_type == op).count();
        assert_eq!(
            [
                "DynamicQuantizeLinear",
                "MatMulInteger",
                "Cast",
                "Mul",
                "MatMul",
                "Gemm"
            ]
            .map(count),
            [2, 3, 3, 6, 0, 1]
        );
        // The graph outputs are produced by the final Muls; the integer weight has the codes.
        for y in [y1, y2, y3] {
            let p = g.nodes.iter().find(|n| out0(n) == Some(y)).unwrap();
            assert_eq!(p.op_type, "Mul");
        }
        let mm = g.nodes.iter().find(|n| n.op_type == "MatMulInteger").unwrap();
        let q = g.initializers[&input(mm, 1).unwrap()].clone();
        let scale_mul = g.nodes.iter().find(|n| n.op_type == "Mul").unwrap();
        let sc = g.initializers[&input(scale_mul, 1).unwrap()].values::<f32>().unwrap();
        check_codes(&orig, &q, &sc, 1);
        assert_eq!(mm.inputs.len(), 3, "symmetric weights: no b_zero_point");
        g.topological_order().unwrap();
        // Below opset 11 nothing happens.
        let mut old = opts(16);
        old.options.opsets.insert(String::new(), 10);
        let mut g2 = Graph::default();
        let a = value(&mut g2, "a", Some(&[2, 8]));
        g2.inputs.push(a);
        let w = weight(&mut g2, "w", &[8, 16]);
        let y = node(&mut g2, "MatMul", &[a, w], vec![]);
        g2.outputs.push(y);
        let r = quantize_dynamic_int8(&mut g2, &old).unwrap();
        assert!(r.weights.is_empty() && r.skipped.len() == 1);
    }

    #[test]
    fn gemm_trans_b_uses_axis_0() {
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[4, 8]));
        g.inputs.push(a);
        let w = weight(&mut g, "w", &[16, 8]);
        let orig = g.initializers[&w].clone();
        let bias = weight(&mut g, "bias", &[16]);
        let y = node(&mut g, "Gemm", &[a, w, bias], vec![("transB", Attribute::Int(1))]);
        g.outputs.push(y);
        let r = quantize_weights_int8(&mut g, &opts(16)).unwrap();
        assert_eq!(r.weights.len(), 1);
        let gemm = g.nodes.iter().find(|n| n.op_type == "Gemm").unwrap();
        assert_eq!(input(gemm, 2), Some(bias), "the bias stays f32");
        let (q, s, axis) = dq_of(&g, gemm);
        assert_eq!(axis, 0);
        check_codes(&orig, &q, &s, 0);
    }

    #[test]
    fn shared_weight_is_quantized_once() {
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[4, 8]));
        g.inputs.push(a);
        let w = weight(&mut g, "w", &[8, 16]);
        let y1 = node(&mut g, "MatMul", &[a, w], vec![]);
        let y2 = node(&mut g, "Gemm", &[a, w], vec![]);
        g.outputs.extend([y1, y2]);
        let r = quantize_weights_int8(&mut g, &opts(16)).unwrap();
        assert_eq!(r.weights.len(), 1);
        assert_eq!(r.weights[0].readers, 2);
        assert_eq!(dq_nodes(&g).len(), 1);
        let dq_out = out0(dq_nodes(&g)[0]);
        assert!(g
            .nodes
            .iter()
            .filter(|n| n.op_type != "DequantizeLinear")
            .all(|n| input(n, 1) == dq_out));
        // Two readers with different channel axes: left alone.
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[8, 8]));
        g.inputs.push(a);
        let w = weight(&mut g, "w", &[8, 8]);
        let y1 = node(&mut g, "MatMul", &[a, w], vec![]);
        let y2 = node(&mut g, "Gemm", &[a, w], vec![("transB", Attribute::Int(1))]);
        g.outputs.extend([y1, y2]);
        let r = quantize_weights_int8(&mut g, &opts(16)).unwrap();
        assert!(r.weights.is_empty());
        assert_eq!(r.skipped.len(), 1);
        assert!(g.initializers.contains_key(&w));
    }

    #[test]
    fn non_constant_small_and_other_readers_are_untouched() {
        let mut g = Graph::default();
        let a = value(&mut g, "a", Some(&[4, 8]));
        let b_in = value(&mut g, "b_in", Some(&[8, 16]));
        g.inputs.extend([a, b_in]);
        // Non-constant B.
        let y1 = node(&mut g, "MatMul", &[a, b_in], vec![]);
        // Small weight.
        let small = weight(&mut g, "small", &[8, 2]);
        let y2 = node(&mut g, "MatMul", &[a, small], vec![]);
        // Weight also read by an Add.
        let w = weight(&mut g, "w", &[8, 16]);
        let y3 = node(&mut g, "MatMul", &[a, w], vec![]);
        let y4 = node(&mut g, "Add", &[w, w], vec![]);
        // An overridable initializer (also a graph input).
        let ov = weight(&mut g, "ov", &[8, 16]);
        g.inputs.push(ov);
        let y5 = node(&mut g, "MatMul", &[a, ov], vec![]);
        g.outputs.extend([y1, y2, y3, y4, y5]);
        let before = g.clone();
        let r = quantize_weights_int8(&mut g, &opts(64)).unwrap();
        assert!(r.weights.is_empty());
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
        assert_eq!(g, before);
    }
}

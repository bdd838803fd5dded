//! Static int8 in QDQ form, the form ONNX Runtime's `quantize_static` writes by default (not part
//! of the optimization levels; `kiln quantize --mode static-int8` calls it after calibration).
//!
//! Every `Conv`, `MatMul` and `Gemm` with a constant f32 weight (and not excluded by op type or node
//! name) gets
//!
//! ```text
//! x' = DequantizeLinear(QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)    the activation input
//! w' = DequantizeLinear(W_q, w_scale, axis)                                 int8, symmetric, per
//!                                                                            output channel
//! b' = DequantizeLinear(B_q, x_scale * w_scale, axis 0)                     Conv bias, int32
//! y' = DequantizeLinear(QuantizeLinear(y, y_scale, y_zp), y_scale, y_zp)    the output
//! ```
//!
//! Activations are u8, asymmetric, one scale and zero point per tensor from the calibrated range
//! `[lo, hi]` (widened to include 0): `scale = (hi - lo) / 255`, `zp = round(-lo / scale)`. Below
//! opset 13 (no per-axis DequantizeLinear) each weight gets one scale instead of one per channel. A tensor
//! is quantized once and every reader reads its DequantizeLinear. Graph outputs stay f32. Kiln's
//! optimizer turns `DQ -> Conv(DQ W, DQ B) -> Q` into `QLinearConv`; ONNX Runtime runs the file as
//! written (opset 10 and up).

use std::collections::{BTreeMap, HashMap};

use crate::{Attribute, DType, Graph, Result, Shape, TensorData, ValueId};

use super::edit::{attr_i, constant, input, make_node, out0, Index};
use super::quantize::{quantize_along, QuantizeOptions, QuantizeReport, QuantizedWeight, PER_AXIS_DQ_OPSET};

/// QuantizeLinear and DequantizeLinear appeared in opset 10.
pub const QDQ_OPSET: i64 = 10;

/// What [`quantize_static_int8`] may do.
#[derive(Debug, Clone)]
pub struct StaticQuantizeOptions {
    pub base: QuantizeOptions,
    /// Op types or node names left in f32.
    pub exclude: Vec<String>,
}

impl StaticQuantizeOptions {
    pub fn for_model(model: &crate::Model) -> Self {
        let mut base = QuantizeOptions::for_model(model);
        // Conv filters are small (a 3x3 depthwise filter of 32 channels has 288 values) and the
        // point of static int8 is the integer kernel: every constant filter qualifies.
        base.min_elements = 1;
        StaticQuantizeOptions {
            base,
            exclude: Vec::new(),
        }
    }
}

/// A node to quantize: its index, activation input, weight, output-channel axis of the weight,
/// optional Conv bias, and output.
struct Target {
    node: usize,
    x: ValueId,
    w: ValueId,
    axis: usize,
    bias: Option<ValueId>,
    y: ValueId,
    /// A Relu, or a Clip with lower bound 0, that alone reads the node's output: the quantized
    /// output takes its place (u8 saturation at 0 and at the calibrated top is the clip) and it is
    /// dropped; `y` is then its output.
    act: Option<usize>,
}

/// The Relu or `Clip(min = 0)` node that is the sole reader of `y` (and does not write a graph
/// output), with its output.
fn fusable_activation(g: &Graph, options: &super::Options, idx: &Index, y: ValueId) -> Option<(usize, ValueId)> {
    let ai = idx.sole_reader(y)?;
    let a = &g.nodes[ai];
    let z = out0(a)?;
    if !a.domain.is_empty() || input(a, 0)? != y || idx.pinned.contains(&z) || a.outputs.len() != 1 {
        return None;
    }
    let lower_is_zero = match a.op_type.as_str() {
        "Relu" => true,
        "Clip" => match input(a, 1) {
            Some(lo) => constant(g, options, lo).and_then(super::edit::scalar_f64) == Some(0.0),
            None => matches!(a.attr("min"), Some(Attribute::Float(v)) if *v == 0.0),
        },
        _ => false,
    };
    lower_is_zero.then_some((ai, z))
}

fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.value(v).dtype == Some(DType::F32)
}

/// The nodes [`quantize_static_int8`] would quantize, before looking at calibrated ranges.
fn targets(g: &Graph, q: &StaticQuantizeOptions, idx: &Index) -> Vec<Target> {
    let options = &q.base.options;
    let mut found = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !n.domain.is_empty() || q.exclude.iter().any(|e| *e == n.op_type || *e == n.name) {
            continue;
        }
        let t = (|| {
            let (x, w, y) = (input(n, 0)?, input(n, 1)?, out0(n)?);
            let wt = constant(g, options, w)?;
            if wt.dtype != DType::F32 || !is_f32(g, x) || constant(g, options, x).is_some() {
                return None;
            }
            let (axis, bias) = match (n.op_type.as_str(), wt.dims.len()) {
                ("Conv", 3..) => {
                    let bias = input(n, 2);
                    if bias.is_some_and(|b| constant(g, options, b).is_none_or(|t| t.dtype != DType::F32)) {
                        return None;
                    }
                    (0, bias)
                }
                ("MatMul", 2) => (1, None),
                ("Gemm", 2) if attr_i(n, "transA", 0)? == 0 => (if attr_i(n, "transB", 0)? != 0 { 0 } else { 1 }, None),
                _ => return None,
            };
            // Only plain readers: the weight is replaced by its DequantizeLinear for all of them.
            if idx.pinned.contains(&w) || idx.pinned.contains(&y) && !g.outputs.contains(&y) {
                return None;
            }
            let act = fusable_activation(g, options, idx, y);
            Some(Target {
                node: i,
                x,
                w,
                axis,
                bias,
                y: act.map_or(y, |(_, z)| z),
                act: act.map(|(ai, _)| ai),
            })
        })();
        found.extend(t);
    }
    found
}

/// The activation tensors whose ranges calibration must measure (inputs and outputs of the nodes
/// [`quantize_static_int8`] quantizes), by name.
pub fn calibration_tensors(g: &Graph, q: &StaticQuantizeOptions) -> Vec<String> {
    let idx = Index::new(g);
    let mut names: Vec<String> = Vec::new();
    for t in targets(g, q, &idx) {
        for v in [t.x, t.y] {
            let name = g.value_name(v).to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// u8 asymmetric quantization parameters for the range `[lo, hi]` (widened to include 0).
pub fn u8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / 255.0;
    if !(scale.is_finite() && scale > 0.0) {
        return (1.0, 0);
    }
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Rewrites the graph to static int8 QDQ with the calibrated `ranges` (tensor name -> `(lo, hi)`).
/// A node whose input or output has no range (or a non-finite one) stays f32 and is reported.
pub fn quantize_static_int8(
    g: &mut Graph,
    q: &StaticQuantizeOptions,
    ranges: &HashMap<String, (f32, f32)>,
) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    if q.base.options.opset() < QDQ_OPSET {
        report.skipped.push((
            "*".into(),
            format!(
                "QuantizeLinear needs opset {QDQ_OPSET}, the model declares {}",
                q.base.options.opset()
            ),
        ));
        return Ok(report);
    }
    // Below opset 13 DequantizeLinear has no axis: one scale per weight instead of per channel.
    let per_channel = q.base.options.opset() >= PER_AXIS_DQ_OPSET;
    // The shape of a scale or zero point: one value per channel, or a scalar.
    let param_dims = |n: usize| if per_channel { vec![n] } else { vec![] };
    let axis_attr = |axis: usize| {
        if per_channel {
            BTreeMap::from([("axis".to_string(), Attribute::Int(axis as i64))])
        } else {
            BTreeMap::new()
        }
    };
    let mut idx = Index::new(g);
    let range_of = |g: &Graph, v: ValueId| {
        ranges
            .get(g.value_name(v))
            .copied()
            .filter(|(lo, hi)| lo.is_finite() && hi.is_finite() && lo <= hi)
    };
    // A weight read by several targets keeps one axis; read by anything else, it stays f32.
    let all = targets(g, q, &idx);
    let mut weight_readers: BTreeMap<ValueId, Vec<usize>> = BTreeMap::new();
    for (i, t) in all.iter().enumerate() {
        weight_readers.entry(t.w).or_default().push(i);
    }
    let mut chosen: Vec<Target> = Vec::new();
    for t in all {
        let name = g.nodes[t.node].name.clone();
        let readers = &weight_readers[&t.w];
        if idx.readers(t.w).len() != readers.len() {
            report
                .skipped
                .push((name, "its weight is also read by another op".into()));
            continue;
        }
        if range_of(g, t.x).is_none() {
            report
                .skipped
                .push((name, format!("no calibrated range for '{}'", g.value_name(t.x))));
            continue;
        }
        chosen.push(t);
    }
    // A fused Relu/Clip: the node writes the activation's output directly; the activation goes.
    let mut dropped = vec![false; g.nodes.len()];
    for t in chosen.iter_mut() {
        if let Some(ai) = t.act {
            if range_of(g, t.y).is_some() {
                g.nodes[t.node].outputs[0] = Some(t.y);
                dropped[ai] = true;
            } else {
                t.act = None;
                t.y = out0(&g.nodes[t.node]).unwrap_or(t.y);
            }
        }
    }
    // Activations: every chosen input, and every chosen output that is not a graph output.
    let mut activations: Vec<ValueId> = Vec::new();
    for t in &chosen {
        for v in [t.x, t.y] {
            let out_ok = v != t.y || (!g.outputs.contains(&v) && range_of(g, v).is_some());
            if out_ok && !activations.contains(&v) {
                activations.push(v);
            }
        }
    }
    // Weights (and Conv biases, whose scale needs the input's scale).
    let mut dq_nodes = Vec::new();
    let mut weight_dq: BTreeMap<ValueId, (ValueId, Vec<f32>)> = BTreeMap::new();
    for t in &chosen {
        if weight_dq.contains_key(&t.w) {
            continue;
        }
        let wname = g.value_name(t.w).to_string();
        let wt = &g.initializers[&t.w];
        let mut whole = wt.clone();
        let axis = if per_channel {
            t.axis
        } else {
            // One channel holding every value.
            whole.dims = vec![1, wt.len()];
            0
        };
        let source = &whole;
        let Some((codes, scale)) = quantize_along(source, axis) else {
            report.skipped.push((wname, "not finite".into()));
            continue;
        };
        let dims = wt.dims.clone();
        report.bytes_before += wt.bytes().len();
        let qt = TensorData::from_values(format!("{wname}_quantized"), dims.clone(), &codes)?;
        let st = TensorData::from_values(format!("{wname}_scale"), param_dims(scale.len()), &scale)?;
        report.bytes_after += qt.bytes().len() + st.bytes().len();
        let zt = TensorData::from_values("", param_dims(scale.len()), &vec![0i8; scale.len()])?;
        let qv = idx.new_initializer(g, &format!("{wname}_quantized"), qt);
        let sv = idx.new_initializer(g, &format!("{wname}_scale"), st);
        let zv = idx.new_initializer(g, &format!("{wname}_zero_point"), zt);
        let out = idx.new_value(
            g,
            &format!("{wname}_DequantizeLinear_Output"),
            Some(DType::F32),
            Some(Shape::from_known(&dims)),
        );
        let node_name = idx.fresh_name(g, &format!("{wname}_DequantizeLinear"));
        dq_nodes.push(make_node(
            node_name,
            "",
            "DequantizeLinear",
            vec![Some(qv), Some(sv), Some(zv)],
            vec![Some(out)],
            axis_attr(t.axis),
        ));
        report.weights.push(QuantizedWeight {
            name: wname,
            dims,
            axis: t.axis,
            readers: weight_readers[&t.w].len(),
        });
        weight_dq.insert(t.w, (out, scale));
    }
    // Activation quantization parameters.
    let mut act: BTreeMap<ValueId, (ValueId, ValueId, f32)> = BTreeMap::new();
    for &v in &activations {
        let (lo, hi) = range_of(g, v).unwrap_or((0.0, 0.0));
        let (scale, zp) = u8_params(lo, hi);
        let name = g.value_name(v).to_string();
        let s = idx.new_initializer(
            g,
            &format!("{name}_scale"),
            TensorData::from_values("", vec![], &[scale])?,
        );
        let z = idx.new_initializer(
            g,
            &format!("{name}_zero_point"),
            TensorData::from_values("", vec![], &[zp])?,
        );
        act.insert(v, (s, z, scale));
    }
    // Rewire the chosen nodes' weights and biases.
    for t in &chosen {
        let Some((wdq, wscale)) = weight_dq.get(&t.w) else {
            continue;
        };
        let wdq = *wdq;
        g.nodes[t.node].inputs[1] = Some(wdq);
        let (Some(b), Some(&(_, _, x_scale))) = (t.bias, act.get(&t.x)) else {
            continue;
        };
        let bt = &g.initializers[&b];
        let (Some(bv), true) = (bt.values::<f32>(), bt.len() == wscale.len() || !per_channel) else {
            continue;
        };
        let bscale: Vec<f32> = wscale.iter().map(|s| x_scale * s).collect();
        let codes: Vec<i32> = bv
            .iter()
            .zip(bscale.iter().cycle())
            .map(|(b, s)| {
                (f64::from(*b) / f64::from(*s))
                    .round()
                    .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
            })
            .collect();
        let bname = g.value_name(b).to_string();
        let n = codes.len();
        let qb = idx.new_initializer(
            g,
            &format!("{bname}_quantized"),
            TensorData::from_values("", vec![n], &codes)?,
        );
        let sb = idx.new_initializer(
            g,
            &format!("{bname}_quantized_scale"),
            TensorData::from_values("", param_dims(bscale.len()), &bscale)?,
        );
        let out = idx.new_value(
            g,
            &format!("{bname}_DequantizeLinear_Output"),
            Some(DType::F32),
            Some(Shape::from_known(&[n])),
        );
        let node_name = idx.fresh_name(g, &format!("{bname}_DequantizeLinear"));
        dq_nodes.push(make_node(
            node_name,
            "",
            "DequantizeLinear",
            vec![Some(qb), Some(sb), None],
            vec![Some(out)],
            axis_attr(0),
        ));
        g.nodes[t.node].inputs[2] = Some(out);
    }
    // Every reader of a quantized activation reads its DequantizeLinear; the QuantizeLinear and
    // DequantizeLinear go right after the producer (or first, for a graph input).
    let mut dq_of: HashMap<ValueId, ValueId> = HashMap::new();
    let mut qdq_after: HashMap<Option<ValueId>, Vec<crate::Node>> = HashMap::new();
    let producers = g.producers();
    for &v in &activations {
        let (s, z, _) = act[&v];
        let name = g.value_name(v).to_string();
        let shape = g.value(v).shape.clone();
        let qv = idx.new_value(
            g,
            &format!("{name}_QuantizeLinear_Output"),
            Some(DType::U8),
            shape.clone(),
        );
        let dv = idx.new_value(g, &format!("{name}_DequantizeLinear_Output"), Some(DType::F32), shape);
        let qn = idx.fresh_name(g, &format!("{name}_QuantizeLinear"));
        let dn = idx.fresh_name(g, &format!("{name}_DequantizeLinear"));
        let nodes = vec![
            make_node(
                qn,
                "",
                "QuantizeLinear",
                vec![Some(v), Some(s), Some(z)],
                vec![Some(qv)],
                BTreeMap::new(),
            ),
            make_node(
                dn,
                "",
                "DequantizeLinear",
                vec![Some(qv), Some(s), Some(z)],
                vec![Some(dv)],
                BTreeMap::new(),
            ),
        ];
        let at = producers.get(&v).map(|_| v);
        qdq_after.entry(at).or_default().extend(nodes);
        dq_of.insert(v, dv);
    }
    for n in g.nodes.iter_mut() {
        for slot in n.inputs.iter_mut().flatten() {
            if let Some(&dv) = dq_of.get(slot) {
                *slot = dv;
            }
        }
    }
    let old = std::mem::take(&mut g.nodes);
    let mut nodes = dq_nodes;
    nodes.extend(qdq_after.remove(&None).unwrap_or_default());
    for (i, n) in old.into_iter().enumerate() {
        if dropped.get(i).copied().unwrap_or(false) {
            continue;
        }
        let outs: Vec<ValueId> = n.outputs.iter().flatten().copied().collect();
        nodes.push(n);
        for o in outs {
            nodes.extend(qdq_after.remove(&Some(o)).unwrap_or_default());
        }
    }
    g.nodes = nodes;
    // The f32 weights and biases no node reads any more.
    let read: std::collections::HashSet<ValueId> = g.nodes.iter().flat_map(|n| n.all_inputs()).collect();
    let unread: Vec<ValueId> = chosen
        .iter()
        .flat_map(|t| [Some(t.w), t.bias])
        .flatten()
        .filter(|v| !read.contains(v) && !g.outputs.contains(v) && !g.inputs.contains(v))
        .collect();
    for v in unread {
        g.initializers.remove(&v);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_params_cover_the_range_and_zero() {
        let (s, z) = u8_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 64);
        // A non-negative range starts at 0; an empty one gets scale 1.
        assert_eq!(u8_params(0.5, 2.55), (0.01, 0));
        assert_eq!(u8_params(0.0, 0.0), (1.0, 0));
        let (s, z) = u8_params(-2.0, -1.0);
        assert!((s - 2.0 / 255.0).abs() < 1e-7);
        assert_eq!(z, 255);
    }

    #[test]
    fn per_channel_codes_along_any_axis() {
        let w: Vec<f32> = (0..24).map(|i| i as f32 - 10.0).collect();
        let t = TensorData::from_values("w", vec![2, 3, 4], &w).unwrap();
        let (codes, scale) = quantize_along(&t, 0).unwrap();
        assert_eq!(scale.len(), 2);
        assert!((scale[0] - 10.0 / 127.0).abs() < 1e-6 && (scale[1] - 13.0 / 127.0).abs() < 1e-6);
        assert_eq!(codes[0], -127);
        assert_eq!(codes[23], 127);
        let (_, scale) = quantize_along(&t, 2).unwrap();
        assert_eq!(scale.len(), 4);
        for (i, (c, x)) in codes.iter().zip(&w).enumerate() {
            let back = f32::from(*c) * [10.0f32, 13.0][i / 12] / 127.0;
            assert!((back - x).abs() <= 13.0 / 127.0 / 2.0 + 1e-6);
        }
    }
}

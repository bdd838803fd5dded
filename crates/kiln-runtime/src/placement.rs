//! Host placement of shape arithmetic in device plans.
//!
//! A model exported with a dynamic batch computes its Reshape targets at run time:
//! `Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape`, four times per BERT layer. On a GPU
//! each of those values would live in device memory, and every kernel that reads one as a list of
//! integers (Reshape's shape, Unsqueeze's axes, Gather's indices...) copies it back to the host, a
//! copy that waits for all queued GPU work: a BERT-base-shaped encoder exported by PyTorch
//! (`scripts/cuda/gpu-evidence.py`) reads such a value 168 times per run at level all (96
//! Unsqueeze axes, 48 Reshape shapes, 24 Gather indices), constants included.
//!
//! As ONNX Runtime does, a device plan keeps that arithmetic on the CPU instead:
//! - `Shape` and `Size` run on the host (they read only the input's dims, never its data);
//! - a node of the shape-arithmetic set whose every input is a host value or a small constant
//!   runs on the host, and its outputs are host values (they stay tiny: every host value comes
//!   from a shape or a constant of at most [`SMALL_CONSTANT`] elements);
//! - a small constant gets a host copy beside its device copy, read by host nodes and by the
//!   inputs kernels read as integers ([`host_read_inputs`]);
//! - a host value that a device kernel reads as data is copied to the device for that call.
//!
//! CPU plans skip all this (everything is already on the host). `KILN_HOST_SHAPES=off` turns it
//! off for device plans (an A/B switch); `force` applies it to CPU plans too, which is how the
//! rewiring is tested without a GPU (the node suite runs with it in `scripts/test.sh`).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use kiln_graph::{Graph, ValueId};

use crate::plan::PlanOptions;

/// Constants with at most this many elements get a host copy on device plans.
pub const SMALL_CONSTANT: usize = 64;

/// Inputs an operator's kernel reads as host integers or scalars (shapes, axes, pads, sizes,
/// counts): on a device plan they are handed over wherever they live, never copied to the device.
/// A position missing here only costs copies, never correctness.
pub fn host_read_inputs(domain: &str, op: &str) -> &'static [usize] {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return &[];
    }
    match op {
        "Reshape" | "Expand" | "Tile" | "Squeeze" | "Unsqueeze" | "Split" | "TopK" | "CumSum" | "Trilu"
        | "Upsample" | "CenterCropPad" | "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd"
        | "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => &[1],
        // Indices are read on the host (bounds checks, negative indices) by these kernels.
        "Gather" | "GatherElements" | "GatherND" | "ScatterElements" | "ScatterND" | "ReverseSequence" => &[1],
        "Slice" => &[1, 2, 3, 4],
        "ConstantOfShape" => &[0],
        "Range" => &[0, 1, 2],
        "Pad" => &[1, 2, 3],
        "Resize" => &[1, 2, 3],
        "OneHot" => &[1],
        "Dropout" => &[1, 2],
        "NonMaxSuppression" => &[2, 3, 4],
        "MaxUnpool" => &[2],
        // The condition and trip count decide control flow on the host.
        "If" => &[0],
        "Loop" => &[0, 1],
        _ => &[],
    }
}

/// Operators that run on the host in a device plan when all their inputs are host values or
/// small constants (what shape computations are made of).
fn shape_arithmetic(op: &str) -> bool {
    matches!(
        op,
        "Gather"
            | "Unsqueeze"
            | "Squeeze"
            | "Concat"
            | "Slice"
            | "Cast"
            | "Add"
            | "Sub"
            | "Mul"
            | "Div"
            | "Mod"
            | "Neg"
            | "Abs"
            | "Equal"
            | "Less"
            | "LessOrEqual"
            | "Greater"
            | "GreaterOrEqual"
            | "Not"
            | "And"
            | "Or"
            | "Where"
            | "Reshape"
            | "Identity"
            | "Flatten"
            | "Max"
            | "Min"
            | "Floor"
            | "Ceil"
            | "Sqrt"
            | "ReduceProd"
            | "ReduceSum"
            | "ReduceMax"
            | "ReduceMin"
    )
}

fn env_mode() -> Option<bool> {
    static MODE: OnceLock<Option<bool>> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("KILN_HOST_SHAPES").as_deref() {
        Ok("off") | Ok("0") => Some(false),
        Ok("force") => Some(true),
        _ => None,
    })
}

/// Whether a plan for these options places shape arithmetic on the host.
pub fn enabled(options: &PlanOptions) -> bool {
    options
        .host_shapes
        .or_else(env_mode)
        .unwrap_or(!options.device.is_cpu())
}

/// Counts for reports (`kiln inspect --device`), see [`crate::ExecutionPlan::placement_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementCounts {
    pub host_steps: usize,
    pub host_constants: usize,
    pub device_reads: usize,
}

/// Where each node of one graph runs and which values need a host copy.
#[derive(Debug, Default)]
pub struct HostPlacement {
    /// Node indices (into `graph.nodes`) that run on the host.
    pub host_nodes: HashSet<usize>,
    /// Values that live on the host (outputs of host nodes).
    pub host_values: HashSet<ValueId>,
    /// Small constants that need a host copy (read by a host node or at a host-read input).
    pub host_constants: Vec<ValueId>,
}

/// A small initializer that cannot be overridden by a feed.
fn small_constant(graph: &Graph, v: ValueId) -> bool {
    !graph.inputs.contains(&v)
        && graph
            .initializers
            .get(&v)
            .is_some_and(|d| d.dims.iter().product::<usize>() <= SMALL_CONSTANT)
}

/// Decides host placement for `graph`, whose nodes run in `order`.
pub fn analyze(graph: &Graph, order: &[usize]) -> HostPlacement {
    let mut p = HostPlacement::default();
    for &ni in order {
        let node = &graph.nodes[ni];
        let onnx = node.domain.is_empty() || node.domain == "ai.onnx";
        let on_host = onnx
            && node.implicit_inputs.is_empty()
            && match node.op_type.as_str() {
                "Shape" | "Size" => true,
                op if shape_arithmetic(op) => {
                    node.inputs.iter().flatten().count() > 0
                        && node
                            .inputs
                            .iter()
                            .flatten()
                            .all(|&v| p.host_values.contains(&v) || small_constant(graph, v))
                }
                _ => false,
            };
        if on_host {
            p.host_nodes.insert(ni);
            p.host_values.extend(node.outputs.iter().flatten().copied());
        }
    }
    let mut wanted: Vec<ValueId> = Vec::new();
    for (ni, node) in graph.nodes.iter().enumerate() {
        let host_reads = host_read_inputs(&node.domain, &node.op_type);
        let on_host = p.host_nodes.contains(&ni);
        for (pos, v) in node.inputs.iter().enumerate() {
            let Some(v) = *v else { continue };
            if (on_host || host_reads.contains(&pos)) && small_constant(graph, v) {
                wanted.push(v);
            }
        }
    }
    wanted.sort();
    wanted.dedup();
    p.host_constants = wanted;
    p
}

/// Slots of the host copies of constants: `value -> slot`, numbered from `first_slot`.
pub fn twin_slots(placement: &HostPlacement, first_slot: usize) -> HashMap<ValueId, usize> {
    placement
        .host_constants
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, first_slot + i))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use kiln_graph::{DType, Graph, TensorData, ValueInfo};

    use crate::plan::tests::node;
    use crate::plan::{ExecutionPlan, PlanOptions};
    use crate::{RunOptions, Tensor, Value};

    fn value(g: &mut Graph, name: &str, dtype: DType) -> kiln_graph::ValueId {
        g.add_value(ValueInfo {
            name: name.into(),
            dtype: Some(dtype),
            ..Default::default()
        })
    }

    /// `y = Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0), [0]), [-1])) * Cast(Gather(Shape(x), 0)) + w`:
    /// the exporter's dynamic-batch pattern, one shape value used as data, and a small constant read
    /// only as data by a device kernel.
    fn graph() -> Graph {
        let mut g = Graph::default();
        let x = value(&mut g, "x", DType::F32);
        let w = value(&mut g, "w", DType::F32);
        let zero = value(&mut g, "zero", DType::I64);
        let axes = value(&mut g, "axes", DType::I64);
        let minus1 = value(&mut g, "minus1", DType::I64);
        let [shape, batch, batch1, target, flat, batch_f, scaled, y] =
            ["shape", "batch", "batch1", "target", "flat", "batch_f", "scaled", "y"]
                .map(|n| value(&mut g, n, DType::F32));
        g.inputs = vec![x];
        g.outputs = vec![y, target];
        g.initializers
            .insert(w, TensorData::from_values("w", vec![12], &[0.5f32; 12]).unwrap());
        g.initializers
            .insert(zero, TensorData::from_values("zero", vec![], &[0i64]).unwrap());
        g.initializers
            .insert(axes, TensorData::from_values("axes", vec![1], &[0i64]).unwrap());
        g.initializers
            .insert(minus1, TensorData::from_values("minus1", vec![1], &[-1i64]).unwrap());
        let mut cast = node("cast", "Cast", &[batch], &[batch_f]);
        cast.attributes.insert("to".into(), kiln_graph::Attribute::Int(1));
        let mut concat = node("concat", "Concat", &[batch1, minus1], &[target]);
        concat.attributes.insert("axis".into(), kiln_graph::Attribute::Int(0));
        g.nodes = vec![
            node("shape", "Shape", &[x], &[shape]),
            node("gather", "Gather", &[shape, zero], &[batch]),
            node("unsqueeze", "Unsqueeze", &[batch, axes], &[batch1]),
            concat,
            node("reshape", "Reshape", &[x, target], &[flat]),
            cast,
            node("mul", "Mul", &[flat, batch_f], &[scaled]),
            node("add", "Add", &[scaled, w], &[y]),
        ];
        g
    }

    fn compile(host_shapes: bool) -> ExecutionPlan {
        let options = PlanOptions {
            device: candle_core::Device::Cpu,
            opsets: HashMap::from([(String::new(), 17)]),
            host_shapes: Some(host_shapes),
        };
        ExecutionPlan::compile_graph(&graph(), &options).unwrap()
    }

    #[test]
    fn shape_arithmetic_goes_to_the_host_and_data_stays() {
        let g = graph();
        let order = g.topological_order().unwrap();
        let p = super::analyze(&g, &order);
        let host: Vec<&str> = order
            .iter()
            .filter(|ni| p.host_nodes.contains(ni))
            .map(|&ni| g.nodes[ni].name.as_str())
            .collect();
        assert_eq!(host, vec!["shape", "gather", "unsqueeze", "concat", "cast"]);
        // The constants read by host nodes get host copies; w, read only by the device Add, does not.
        let names: Vec<&str> = p.host_constants.iter().map(|&v| g.value_name(v)).collect();
        assert_eq!(names, vec!["zero", "axes", "minus1"]);

        let plan = compile(true);
        let by_name = |n: &str| plan.steps.iter().find(|s| s.node == n).unwrap();
        assert!(by_name("concat").on_host && !by_name("reshape").on_host && !by_name("mul").on_host);
        // Reshape reads its shape on the host: nothing to copy; Mul reads the cast batch as data.
        assert!(by_name("reshape").to_device.is_empty());
        assert_eq!(by_name("mul").to_device, vec![1]);
        assert_eq!(plan.num_slots, g.values.len() + 3);
        // Reshape's shape and Unsqueeze's axes, Gather's indices: all read on the host now.
        let counts = plan.placement_counts().unwrap();
        assert_eq!(
            (counts.host_steps, counts.host_constants, counts.device_reads),
            (5, 3, 0)
        );
        // Off: no host steps, no extra slots.
        let off = compile(false);
        assert!(off.steps.iter().all(|s| !s.on_host && s.to_device.is_empty()));
        assert_eq!(off.num_slots, g.values.len());
        assert!(off.placement_counts().is_none());
    }

    #[test]
    fn host_placement_gives_the_same_outputs() {
        let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
        let feed = || {
            let t = candle_core::Tensor::from_vec(x.clone(), (2, 3, 4), &candle_core::Device::Cpu).unwrap();
            vec![Some(Value::Tensor(Tensor::from_candle(t).unwrap()))]
        };
        let run = |plan: &ExecutionPlan| {
            let (outs, _) = plan.run(feed(), &HashMap::new(), &RunOptions::default()).unwrap();
            let y = outs[0].as_tensor().unwrap().to_f64_vec().unwrap();
            let target = outs[1].as_tensor().unwrap().to_i64_vec().unwrap();
            (y, target)
        };
        let (y_on, target_on) = run(&compile(true));
        let (y_off, target_off) = run(&compile(false));
        assert_eq!(target_on, vec![2, -1]);
        assert_eq!(target_on, target_off);
        assert_eq!(y_on, y_off);
        // y = x * batch + 0.5, flattened to [2, 12].
        assert_eq!(y_on.len(), 24);
        assert_eq!(y_on[1], (0.25 - 3.0) * 2.0 + 0.5);
    }
}

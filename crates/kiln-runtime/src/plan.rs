use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_graph::{Graph, Model, ValueInfo};

use crate::ops::{NodeCtx, OpKernel, Registry};
use crate::{Result, RuntimeError, Tensor, Value};

/// Options fixed when a plan is compiled.
#[derive(Clone)]
pub struct PlanOptions {
    pub device: candle_core::Device,
    /// Opset versions by domain (`""` = ai.onnx).
    pub opsets: HashMap<String, i64>,
    /// Keep shape arithmetic on the host (see [`crate::placement`]): `None` = on for device plans
    /// unless `KILN_HOST_SHAPES=off`, off for CPU plans unless `KILN_HOST_SHAPES=force`.
    pub host_shapes: Option<bool>,
}

impl PlanOptions {
    pub fn for_model(model: &Model, device: candle_core::Device) -> Self {
        PlanOptions {
            device,
            opsets: model.opsets.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            host_shapes: None,
        }
    }
}

pub(crate) struct Step {
    pub kernel: Box<dyn OpKernel>,
    pub node: String,
    pub op: String,
    /// Slots of explicit then implicit inputs.
    pub inputs: Vec<Option<usize>>,
    pub outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step: released right after it runs.
    pub release: Vec<usize>,
    /// Set once the device lacked a kernel for this node: later runs go straight to the CPU.
    pub host_fallback: std::sync::atomic::AtomicBool,
    /// Plans of the node's subgraphs (If/Loop/Scan/SequenceMap bodies), for reports.
    pub subplans: Vec<std::sync::Arc<ExecutionPlan>>,
    /// Runs on the host although the plan targets a device (shape arithmetic, see
    /// [`crate::placement`]); its inputs are host values.
    pub on_host: bool,
    /// Input positions holding host values that this device kernel reads as data: copied to the
    /// device before each call.
    pub to_device: Vec<usize>,
}

/// A node that ran on the CPU although its plan targets a device (see [`ExecutionPlan::host_fallbacks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFallback {
    pub node: String,
    pub op: String,
    /// 0 for the main graph's nodes, 1 inside a subgraph, and so on.
    pub depth: u32,
}

/// A graph compiled for one device: ordered kernels over integer value slots.
///
/// Slots are freed at their last use, so activation memory follows tensor lifetimes rather than
/// the sum of all intermediates. Compiled once, run many times, from many threads at once.
pub struct ExecutionPlan {
    pub(crate) steps: Vec<Step>,
    pub(crate) num_slots: usize,
    pub(crate) constants: Vec<(usize, Value)>,
    /// Every graph input (slot, info); those with an initializer have a default.
    pub(crate) inputs: Vec<(usize, ValueInfo, bool)>,
    pub(crate) outputs: Vec<(usize, String)>,
    pub(crate) captures: Vec<(usize, String)>,
    pub(crate) device: candle_core::Device,
    pub(crate) peak_activation: AtomicU64,
    /// What host placement did to this graph (None when it was off).
    pub(crate) placement_counts: Option<crate::placement::PlacementCounts>,
}

impl ExecutionPlan {
    /// Compiles the main graph of a model.
    pub fn compile(model: &Model, device: candle_core::Device) -> Result<Self> {
        let options = PlanOptions::for_model(model, device);
        let mut missing = Vec::new();
        collect_unsupported(&model.graph, &options, &mut missing);
        if !missing.is_empty() {
            return Err(RuntimeError::Unsupported {
                list: group_missing(missing),
            });
        }
        Self::compile_graph(&model.graph, &options)
    }

    /// Compiles one graph (also used for subgraph bodies).
    pub fn compile_graph(graph: &Graph, options: &PlanOptions) -> Result<Self> {
        let order = graph.topological_order()?;
        let registry = Registry::global();
        let n = graph.values.len();
        let mut last_use: Vec<Option<usize>> = vec![None; n];
        for (pos, &ni) in order.iter().enumerate() {
            for v in graph.nodes[ni].all_inputs() {
                last_use[v.index()] = Some(pos);
            }
        }
        let mut keep = vec![false; n];
        for o in &graph.outputs {
            keep[o.index()] = true;
        }
        for v in graph.initializers.keys() {
            keep[v.index()] = true;
        }
        let placement_on = crate::placement::enabled(options);
        let mut device_reads = 0usize;
        let placement = if placement_on {
            crate::placement::analyze(graph, &order)
        } else {
            crate::placement::HostPlacement::default()
        };
        let twins = crate::placement::twin_slots(&placement, n);
        let mut steps = Vec::with_capacity(order.len());
        for (pos, &ni) in order.iter().enumerate() {
            let node = &graph.nodes[ni];
            let factory = registry
                .get(&node.domain, &node.op_type)
                .ok_or_else(|| RuntimeError::Unsupported {
                    list: vec![describe(&node.domain, &node.op_type, &node.name)],
                })?;
            let opset = options.opsets.get(node.domain.as_str()).copied().unwrap_or(1);
            let cx = NodeCtx {
                node,
                graph,
                opset,
                options,
                subplans: Default::default(),
            };
            let kernel = factory(&cx).map_err(|e| e.at_node(&node.name, &node.op_type))?;
            let subplans = cx.subplans.into_inner();
            let mut release: Vec<usize> = node
                .all_inputs()
                .map(|v| v.index())
                .filter(|&s| last_use[s] == Some(pos) && !keep[s])
                .collect();
            release.sort_unstable();
            release.dedup();
            // Outputs nobody reads are released at once.
            for o in node.outputs.iter().flatten() {
                if last_use[o.index()].is_none() && !keep[o.index()] {
                    release.push(o.index());
                }
            }
            let on_host = placement.host_nodes.contains(&ni);
            let host_reads = crate::placement::host_read_inputs(&node.domain, &node.op_type);
            if placement_on && !on_host {
                // Integer inputs this device kernel will read back from device memory.
                device_reads += host_reads
                    .iter()
                    .filter_map(|&i| node.inputs.get(i).copied().flatten())
                    .filter(|v| !twins.contains_key(v) && !placement.host_values.contains(v))
                    .count();
            }
            let mut to_device = Vec::new();
            let inputs = node
                .inputs
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.map(|v| {
                        let host_side = on_host || host_reads.contains(&i);
                        match twins.get(&v) {
                            Some(&twin) if host_side => twin,
                            _ => {
                                if !host_side && placement.host_values.contains(&v) {
                                    to_device.push(i);
                                }
                                v.index()
                            }
                        }
                    })
                })
                .chain(node.implicit_inputs.iter().map(|v| Some(v.index())))
                .collect();
            steps.push(Step {
                kernel,
                node: node.name.clone(),
                op: node.op_type.clone(),
                inputs,
                outputs: node.outputs.iter().map(|v| v.map(|v| v.index())).collect(),
                release,
                host_fallback: std::sync::atomic::AtomicBool::new(false),
                subplans,
                on_host,
                to_device,
            });
        }
        let mut constants = Vec::new();
        for (id, data) in &graph.initializers {
            let t = Tensor::from_data(data, &options.device)?;
            constants.push((id.index(), Value::Tensor(t)));
        }
        for &v in &placement.host_constants {
            if let (Some(data), Some(&slot)) = (graph.initializers.get(&v), twins.get(&v)) {
                let t = Tensor::from_data(data, &candle_core::Device::Cpu)?;
                constants.push((slot, Value::Tensor(t)));
            }
        }
        Ok(ExecutionPlan {
            steps,
            num_slots: n + twins.len(),
            placement_counts: placement_on.then_some(crate::placement::PlacementCounts {
                host_steps: placement.host_nodes.len(),
                host_constants: placement.host_constants.len(),
                device_reads,
            }),
            constants,
            inputs: graph
                .inputs
                .iter()
                .map(|v| (v.index(), graph.value(*v).clone(), graph.initializers.contains_key(v)))
                .collect(),
            outputs: graph
                .outputs
                .iter()
                .map(|v| (v.index(), graph.value_name(*v).to_string()))
                .collect(),
            captures: graph
                .captures
                .iter()
                .map(|v| (v.index(), graph.value_name(*v).to_string()))
                .collect(),
            device: options.device.clone(),
            peak_activation: AtomicU64::new(0),
        })
    }

    /// Inputs the caller must (or may) feed: `(info, has_default)`.
    pub fn input_infos(&self) -> impl Iterator<Item = (&ValueInfo, bool)> {
        self.inputs.iter().map(|(_, i, d)| (i, *d))
    }

    /// Output names in order.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.iter().map(|(_, n)| n.as_str())
    }

    /// Number of kernels.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Largest activation footprint (bytes of live intermediate tensors) seen by any run so far.
    pub fn peak_activation_bytes(&self) -> u64 {
        self.peak_activation.load(Ordering::Relaxed)
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Nodes that have run on the CPU because the device backend lacked a kernel for them (an op
    /// or dtype), in plan order, subgraph nodes after the node that owns them. A node is listed
    /// once one of its runs fell back; empty for a CPU plan and before the first run.
    pub fn host_fallbacks(&self) -> Vec<HostFallback> {
        let mut out = Vec::new();
        self.collect_host_fallbacks(0, &mut out);
        out
    }

    fn collect_host_fallbacks(&self, depth: u32, out: &mut Vec<HostFallback>) {
        for step in &self.steps {
            if step.host_fallback.load(Ordering::Relaxed) {
                out.push(HostFallback {
                    node: step.node.clone(),
                    op: step.op.clone(),
                    depth,
                });
            }
            for sub in &step.subplans {
                sub.collect_host_fallbacks(depth + 1, out);
            }
        }
    }

    /// What [`crate::placement`] did to the main graph: nodes run on the host, constants given a
    /// host copy, and the integer inputs device kernels still read from device memory (each such
    /// read waits for the GPU). `None` when host placement is off (CPU plans).
    pub fn placement_counts(&self) -> Option<crate::placement::PlacementCounts> {
        self.placement_counts
    }

    pub(crate) fn note_peak(&self, bytes: u64) {
        self.peak_activation.fetch_max(bytes, Ordering::Relaxed);
    }
}

fn describe(domain: &str, op: &str, node: &str) -> String {
    let d = if domain.is_empty() { "ai.onnx" } else { domain };
    format!("{d}::{op} (node '{node}')")
}

/// Groups `domain::Op (node 'x')` entries by operator: `domain::Op (3 nodes, first 'x')`.
fn group_missing(entries: Vec<String>) -> Vec<String> {
    let mut by_op: Vec<(String, usize, String)> = Vec::new();
    for e in entries {
        let (op, node) = e.split_once(" (node ").unwrap_or((e.as_str(), ""));
        match by_op.iter_mut().find(|(o, _, _)| o == op) {
            Some(entry) => entry.1 += 1,
            None => by_op.push((op.to_string(), 1, node.trim_end_matches(')').to_string())),
        }
    }
    by_op
        .into_iter()
        .map(|(op, n, first)| {
            if n == 1 {
                format!("{op} (node {first})")
            } else {
                format!("{op} ({n} nodes, first {first})")
            }
        })
        .collect()
}

/// Lists every node (in all nested graphs) without a kernel.
pub fn collect_unsupported(graph: &Graph, options: &PlanOptions, out: &mut Vec<String>) {
    let reg = Registry::global();
    let _ = options;
    graph.for_each_graph(&mut |g| {
        for n in &g.nodes {
            if !reg.contains(&n.domain, &n.op_type) {
                out.push(describe(&n.domain, &n.op_type, &n.name));
            }
        }
    });
}

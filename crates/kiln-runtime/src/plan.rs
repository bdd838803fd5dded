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
    /// Bytes of weights the kernel holds in a form of its own (packed at plan time).
    pub held_bytes: u64,
}

/// What a compiled plan holds for its weights (subgraph plans included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanMemory {
    /// Constant tensors the kernels read at run time (initializers not folded into a kernel), on
    /// the plan's device.
    pub constant_bytes: u64,
    /// Weights held by kernels in the form they read (packed GEMM panels, 4-bit codes), in host
    /// memory: each such weight's original is not kept.
    pub kernel_bytes: u64,
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
        Self::compile_owned(model.clone(), device)
    }

    /// [`ExecutionPlan::compile`] taking the model: each initializer is dropped as soon as the last
    /// kernel that reads it is built (after packing it, or after the plan made its constant), so
    /// compiling holds the weights about once rather than in every form at the same time.
    pub fn compile_owned(mut model: Model, device: candle_core::Device) -> Result<Self> {
        let options = PlanOptions::for_model(&model, device);
        let mut missing = Vec::new();
        collect_unsupported(&model.graph, &options, &mut missing);
        if !missing.is_empty() {
            return Err(RuntimeError::Unsupported {
                list: group_missing(missing),
            });
        }
        Self::compile_graph_owned(&mut model.graph, &options)
    }

    /// Compiles one graph (also used for subgraph bodies).
    pub fn compile_graph(graph: &Graph, options: &PlanOptions) -> Result<Self> {
        Self::compile_graph_owned(&mut graph.clone(), options)
    }

    /// [`ExecutionPlan::compile_graph`], removing the initializers from `graph` as they are used up.
    fn compile_graph_owned(graph: &mut Graph, options: &PlanOptions) -> Result<Self> {
        let order = graph.topological_order()?;
        let registry = Registry::global();
        let n = graph.values.len();
        let mut last_use: Vec<Option<usize>> = vec![None; n];
        // Initializers: kernels still to be built that read each one.
        let mut pending_readers: Vec<u32> = vec![0; n];
        for (pos, &ni) in order.iter().enumerate() {
            for v in graph.nodes[ni].all_inputs() {
                last_use[v.index()] = Some(pos);
            }
            let mut seen: Vec<usize> = graph.nodes[ni].all_inputs().map(|v| v.index()).collect();
            seen.sort_unstable();
            seen.dedup();
            for s in seen {
                pending_readers[s] += 1;
            }
        }
        let mut keep = vec![false; n];
        for o in &graph.outputs {
            keep[o.index()] = true;
        }
        for v in graph.initializers.keys() {
            keep[v.index()] = true;
        }
        // Initializers the plan keeps as constants whatever the kernels do: graph outputs, and
        // graph inputs (a caller may feed them, the initializer is the default).
        let has_default: Vec<bool> = graph
            .inputs
            .iter()
            .map(|v| graph.initializers.contains_key(v))
            .collect();
        let mut const_needed = vec![false; n];
        for v in graph.outputs.iter().chain(&graph.inputs) {
            const_needed[v.index()] = true;
        }
        let placement_on = crate::placement::enabled(options);
        let mut device_reads = 0usize;
        let placement = if placement_on {
            crate::placement::analyze(graph, &order)
        } else {
            crate::placement::HostPlacement::default()
        };
        let twins = crate::placement::twin_slots(&placement, n);
        let mut constants = Vec::new();
        let mut steps = Vec::with_capacity(order.len());
        let packs = crate::ops::SharedPacks::default();
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
                consumed: Default::default(),
                held: Default::default(),
                packs: packs.clone(),
            };
            let kernel = factory(&cx).map_err(|e| e.at_node(&node.name, &node.op_type))?;
            let subplans = cx.subplans.into_inner();
            let consumed = cx.consumed.into_inner();
            let held_bytes = cx.held.get();
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
            let inputs: Vec<Option<usize>> = node
                .inputs
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if consumed.contains(&i) {
                        return None;
                    }
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
            // Which of the node's values the kernel still reads at run time.
            let mut read_now: Vec<usize> = node
                .inputs
                .iter()
                .enumerate()
                .filter(|(i, _)| !consumed.contains(i))
                .filter_map(|(_, v)| v.map(|v| v.index()))
                .chain(node.implicit_inputs.iter().map(|v| v.index()))
                .collect();
            let mut all_read: Vec<usize> = node.all_inputs().map(|v| v.index()).collect();
            read_now.sort_unstable();
            read_now.dedup();
            all_read.sort_unstable();
            all_read.dedup();
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
                held_bytes,
            });
            for &s in &read_now {
                const_needed[s] = true;
            }
            // Initializers whose last reader was just built: made a constant of the plan if some
            // kernel reads them at run time, then dropped from the graph either way.
            for s in all_read {
                pending_readers[s] -= 1;
                if pending_readers[s] == 0 {
                    let id = kiln_graph::ValueId(s as u32);
                    Self::take_initializer(graph, id, const_needed[s], &placement, &twins, options, &mut constants)?;
                }
            }
        }
        // Initializers no kernel reads (graph outputs and inputs, or unused).
        let left: Vec<kiln_graph::ValueId> = graph.initializers.keys().copied().collect();
        for id in left {
            let needed = const_needed[id.index()];
            Self::take_initializer(graph, id, needed, &placement, &twins, options, &mut constants)?;
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
                .zip(has_default)
                .map(|(v, d)| (v.index(), graph.value(*v).clone(), d))
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

    /// Removes initializer `id` (if it is one) from `graph`, first making it a constant of the plan
    /// (and its host copy, for host placement) when `needed`.
    fn take_initializer(
        graph: &mut Graph,
        id: kiln_graph::ValueId,
        needed: bool,
        placement: &crate::placement::HostPlacement,
        twins: &HashMap<kiln_graph::ValueId, usize>,
        options: &PlanOptions,
        constants: &mut Vec<(usize, Value)>,
    ) -> Result<()> {
        let Some(data) = graph.initializers.remove(&id) else {
            return Ok(());
        };
        if !needed {
            return Ok(());
        }
        constants.push((id.index(), Value::Tensor(Tensor::from_data(&data, &options.device)?)));
        if placement.host_constants.contains(&id) {
            if let Some(&slot) = twins.get(&id) {
                let t = Tensor::from_data(&data, &candle_core::Device::Cpu)?;
                constants.push((slot, Value::Tensor(t)));
            }
        }
        Ok(())
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

    /// Bytes held for weights: constants and kernels' own forms (see [`PlanMemory`]).
    pub fn memory(&self) -> PlanMemory {
        let mut m = PlanMemory {
            constant_bytes: self
                .constants
                .iter()
                .map(|(_, v)| match v {
                    Value::Tensor(t) => (t.candle().elem_count() * t.candle().dtype().size_in_bytes()) as u64,
                    _ => 0,
                })
                .sum(),
            kernel_bytes: 0,
        };
        for step in &self.steps {
            m.kernel_bytes += step.held_bytes;
            for sub in &step.subplans {
                let s = sub.memory();
                m.constant_bytes += s.constant_bytes;
                m.kernel_bytes += s.kernel_bytes;
            }
        }
        m
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashMap};

    use kiln_graph::{Attribute, DType, Graph, Node, TensorData, ValueId, ValueInfo};

    use super::{ExecutionPlan, PlanOptions};
    use crate::{RunOptions, Tensor, Value};

    fn value(g: &mut Graph, name: &str) -> ValueId {
        g.add_value(ValueInfo {
            name: name.into(),
            dtype: Some(DType::F32),
            ..Default::default()
        })
    }

    /// A default-domain node reading and writing the given values (also for other modules' tests).
    pub(crate) fn node(name: &str, op: &str, inputs: &[ValueId], outputs: &[ValueId]) -> Node {
        Node {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|&v| Some(v)).collect(),
            outputs: outputs.iter().map(|&v| Some(v)).collect(),
            attributes: BTreeMap::new(),
            implicit_inputs: vec![],
        }
    }

    /// Compiles `g` for the CPU; also the names of the constants the plan kept.
    fn compile_cpu(g: &Graph) -> (ExecutionPlan, Vec<String>) {
        let options = PlanOptions {
            device: candle_core::Device::Cpu,
            opsets: HashMap::from([(String::new(), 17)]),
            host_shapes: None,
        };
        let plan = ExecutionPlan::compile_graph(g, &options).unwrap();
        let kept = plan.constants.iter().map(|(s, _)| g.values[*s].name.clone()).collect();
        (plan, kept)
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.37 + seed).sin() * 2.0).round() / 4.0)
            .collect()
    }

    /// `a @ b` for row-major `[m, k] x [k, n]`.
    fn product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// Weights packed at plan time are held once: the plan keeps no constant for a weight only
    /// packing kernels read (MatMul, Gemm with transB), keeps one that another kernel also reads,
    /// and a call the packed kernel does not take (MatMul with a 1-D A) gets the weight rebuilt
    /// from the packed copy with the same result.
    #[test]
    fn packed_weights_are_held_once() {
        let (m, k, n) = (5, 7, 19);
        let mut g = Graph::default();
        let [a, v, w, wt, wv, ws, y1, y2, y3, y4, y5] =
            ["a", "v", "w", "wt", "wv", "ws", "y1", "y2", "y3", "y4", "y5"].map(|s| value(&mut g, s));
        let (wd, wtd, wvd, wsd) = (
            values(k * n, 1.0),
            values(n * k, 2.0),
            values(k * n, 3.0),
            values(k * n, 4.0),
        );
        for (id, name, dims, data) in [
            (w, "w", vec![k, n], &wd),
            (wt, "wt", vec![n, k], &wtd),
            (wv, "wv", vec![k, n], &wvd),
            (ws, "ws", vec![k, n], &wsd),
        ] {
            g.initializers
                .insert(id, TensorData::from_values(name, dims, data.as_slice()).unwrap());
        }
        let mut gemm = node("gemm", "Gemm", &[a, wt], &[y2]);
        gemm.attributes.insert("transB".into(), Attribute::Int(1));
        g.nodes = vec![
            node("mm", "MatMul", &[a, w], &[y1]),
            gemm,
            node("mm_vec", "MatMul", &[v, wv], &[y3]),
            node("mm_shared", "MatMul", &[a, ws], &[y4]),
            node("id_shared", "Identity", &[ws], &[y5]),
        ];
        g.inputs = vec![a, v];
        g.outputs = vec![y1, y2, y3, y4, y5];
        let (plan, kept) = compile_cpu(&g);
        if crate::sgemm::available() {
            assert_eq!(kept, vec!["ws"], "only the weight Identity also reads stays a constant");
        } else {
            assert_eq!(kept, vec!["w", "wt", "wv", "ws"]);
        }

        let ad = values(m * k, 5.0);
        let vd = values(k, 6.0);
        let t = |d: &[f32], dims: &[usize]| {
            let c = candle_core::Tensor::from_vec(d.to_vec(), dims, &candle_core::Device::Cpu).unwrap();
            Some(Value::Tensor(Tensor::from_candle(c).unwrap()))
        };
        for _ in 0..2 {
            let (outs, _) = plan
                .run(
                    vec![t(&ad, &[m, k]), t(&vd, &[k])],
                    &HashMap::new(),
                    &RunOptions::default(),
                )
                .unwrap();
            let got = |i: usize| outs[i].as_tensor().unwrap().to_f64_vec().unwrap();
            let close = |got: Vec<f64>, want: Vec<f32>| {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - *w as f64).abs() < 1e-4, "{g} vs {w}");
                }
            };
            close(got(0), product(&ad, &wd, m, k, n));
            let wt_kn: Vec<f32> = (0..k * n).map(|i| wtd[(i % n) * k + i / n]).collect();
            close(got(1), product(&ad, &wt_kn, m, k, n));
            close(got(2), product(&vd, &wvd, 1, k, n));
            close(got(3), product(&ad, &wsd, m, k, n));
            close(got(4), wsd.clone());
        }
    }

    /// A table read by a Gather and, transposed, by a tied output projection (`MatMulBias` with
    /// `trans_b`) is held once: one packed copy shared by both kernels, no constant; rows and
    /// products as from the table itself; an index out of range is an error, not a panic.
    #[test]
    fn tied_table_is_packed_once_for_gather_and_projection() {
        let (v, h, t) = (37usize, 6usize, 4usize);
        let mut g = Graph::default();
        let [e, ids, x, rows, logits] = ["e", "ids", "x", "rows", "logits"].map(|s| value(&mut g, s));
        g.values[ids.index()].dtype = Some(DType::I64);
        let ed = values(v * h, 10.0);
        g.initializers
            .insert(e, TensorData::from_values("e", vec![v, h], ed.as_slice()).unwrap());
        let mut head = node("lm_head", "MatMulBias", &[x, e], &[logits]);
        head.domain = "ai.kiln".into();
        head.attributes.insert("trans_b".into(), Attribute::Int(1));
        g.nodes = vec![node("embed", "Gather", &[e, ids], &[rows]), head];
        g.inputs = vec![ids, x];
        g.outputs = vec![rows, logits];
        let (plan, _) = compile_cpu(&g);
        if crate::sgemm::available() {
            assert!(plan.constants.is_empty(), "the table is not a constant");
            let packed = (h * v.div_ceil(16) * 16 * 4) as u64;
            assert_eq!(plan.memory().kernel_bytes, packed, "one packed copy, counted once");
        }
        let dev = candle_core::Device::Cpu;
        let xd = values(2 * t * h, 11.0);
        let feed = |index: i64| {
            let idx = candle_core::Tensor::new(&[[3i64, index], [0, 36]], &dev).unwrap();
            let xt = candle_core::Tensor::from_vec(xd.clone(), (2, t, h), &dev).unwrap();
            vec![
                Some(Value::Tensor(Tensor::from_candle(idx).unwrap())),
                Some(Value::Tensor(Tensor::from_candle(xt).unwrap())),
            ]
        };
        let (outs, _) = plan.run(feed(-1), &HashMap::new(), &RunOptions::default()).unwrap();
        let got_rows = outs[0].as_tensor().unwrap().to_f64_vec().unwrap();
        assert_eq!(outs[0].as_tensor().unwrap().dims(), &[2, 2, h]);
        for (k, &r) in [3usize, 36, 0, 36].iter().enumerate() {
            for j in 0..h {
                assert_eq!(got_rows[k * h + j], ed[r * h + j] as f64);
            }
        }
        let et: Vec<f32> = (0..h * v).map(|i| ed[(i % v) * h + i / v]).collect();
        let want = product(&xd, &et, 2 * t, h, v);
        let got = outs[1].as_tensor().unwrap().to_f64_vec().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - *w as f64).abs() < 1e-4, "{g} vs {w}");
        }
        let err = plan.run(feed(37), &HashMap::new(), &RunOptions::default()).unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
    }

    /// A Conv whose filter is packed at plan time holds it once too, and computes what candle's
    /// conv2d does with the original filter.
    #[test]
    fn packed_conv_filters_are_held_once() {
        let (c, m, hw) = (3usize, 8usize, 9usize);
        let mut g = Graph::default();
        let [x, w, b, y] = ["x", "w", "b", "y"].map(|s| value(&mut g, s));
        let (wd, bd) = (values(m * c * 9, 7.0), values(m, 8.0));
        g.initializers.insert(
            w,
            TensorData::from_values("w", vec![m, c, 3, 3], wd.as_slice()).unwrap(),
        );
        g.initializers
            .insert(b, TensorData::from_values("b", vec![m], bd.as_slice()).unwrap());
        let mut conv = node("conv", "Conv", &[x, w, b], &[y]);
        conv.attributes.insert("pads".into(), Attribute::Ints(vec![1, 1, 1, 1]));
        conv.attributes.insert("strides".into(), Attribute::Ints(vec![2, 1]));
        g.nodes = vec![conv];
        g.inputs = vec![x];
        g.outputs = vec![y];
        let (plan, kept) = compile_cpu(&g);
        if crate::sgemm::rows_available() {
            assert_eq!(kept, vec!["b"], "the filter lives only in its packed form");
            assert!(plan.memory().kernel_bytes >= (m * c * 9 * 4) as u64);
        }
        let dev = candle_core::Device::Cpu;
        let xd = values(2 * c * hw * hw, 9.0);
        let xt = candle_core::Tensor::from_vec(xd, (2, c, hw, hw), &dev).unwrap();
        let wt = candle_core::Tensor::from_vec(wd, (m, c, 3, 3), &dev).unwrap();
        let bt = candle_core::Tensor::from_vec(bd, (1, m, 1, 1), &dev).unwrap();
        // candle's conv2d takes one stride: stride (2, 1) as stride 1, then every other row.
        let full = xt.conv2d(&wt, 1, 1, 1, 1).unwrap().broadcast_add(&bt).unwrap();
        let rows: Vec<u32> = (0..hw as u32).step_by(2).collect();
        let idx = candle_core::Tensor::new(rows.as_slice(), &dev).unwrap();
        let want: Vec<f32> = full
            .index_select(&idx, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (outs, _) = plan
            .run(
                vec![Some(Value::Tensor(Tensor::from_candle(xt).unwrap()))],
                &HashMap::new(),
                &RunOptions::default(),
            )
            .unwrap();
        let got = outs[0].as_tensor().unwrap().to_f64_vec().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - *w as f64).abs() < 1e-4, "{g} vs {w}");
        }
    }
}

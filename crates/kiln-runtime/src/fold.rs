//! Constant evaluation for the optimizer: runs one node's real kernel on the CPU over constant
//! inputs ([`kiln_graph::passes::ConstEval`]), so folding computes exactly what the node would.

use std::collections::HashMap;

use kiln_graph::passes::ConstEval;
use kiln_graph::{Graph, Node, Shape, TensorData, ValueInfo, ValueKind};

use crate::{ExecutionPlan, PlanOptions, Registry, RunOptions, Value};

/// Evaluates nodes with the CPU kernels of [`Registry::global`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuConstEval;

impl ConstEval for CpuConstEval {
    fn eval(
        &self,
        graph: &Graph,
        node: &Node,
        opset: i64,
        inputs: &[Option<TensorData>],
        max_output_bytes: usize,
    ) -> Result<Option<Vec<TensorData>>, String> {
        if !node.implicit_inputs.is_empty() {
            return Ok(None);
        }
        // A one-node graph: the inputs become its initializers, the node's outputs its outputs.
        let mut g = Graph {
            name: format!("fold_{}", node.name),
            ..Default::default()
        };
        let mut fnode = node.clone();
        fnode.inputs.clear();
        for data in inputs {
            match data {
                None => fnode.inputs.push(None),
                Some(t) => {
                    let id = g.add_value(ValueInfo {
                        name: t.name.clone(),
                        kind: ValueKind::Tensor,
                        dtype: Some(t.dtype),
                        shape: Some(Shape::from_known(&t.dims)),
                    });
                    g.initializers.insert(id, t.clone());
                    fnode.inputs.push(Some(id));
                }
            }
        }
        fnode.outputs.clear();
        for o in &node.outputs {
            match o {
                None => fnode.outputs.push(None),
                Some(o) => {
                    let mut info = graph.value(*o).clone();
                    info.name = format!("{}__out{}", info.name, fnode.outputs.len());
                    let id = g.add_value(info);
                    fnode.outputs.push(Some(id));
                    g.outputs.push(id);
                }
            }
        }
        g.nodes.push(fnode);
        let options = PlanOptions {
            device: candle_core::Device::Cpu,
            opsets: HashMap::from([(node.domain.clone(), opset)]),
            // Folding runs on the CPU; keep it independent of KILN_HOST_SHAPES.
            host_shapes: Some(false),
        };
        let plan = ExecutionPlan::compile_graph(&g, &options).map_err(|e| e.to_string())?;
        let run = RunOptions {
            max_tensor_bytes: max_output_bytes as u64,
            // one small node per fold: handing each to a pool worker would cost more than it runs
            on_thread_pool: false,
            ..Default::default()
        };
        let (values, _) = plan.run(Vec::new(), &HashMap::new(), &run).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(values.len());
        for (v, id) in values.into_iter().zip(&g.outputs) {
            match v {
                Value::Tensor(t) => out.push(t.to_data(g.value_name(*id)).map_err(|e| e.to_string())?),
                _ => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn has_kernel(&self, domain: &str, op: &str) -> bool {
        Registry::global().contains(domain, op)
    }
}

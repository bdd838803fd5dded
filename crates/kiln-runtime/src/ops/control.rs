//! Control flow: If, Loop, Scan. Bodies are compiled once into their own plans; values read from
//! the enclosing scope arrive as the node's implicit inputs and are bound by name.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor as CT;
use kiln_graph::DType;

use super::common::{norm_axis, tin, tin_opt};
use super::{kernel, NodeCtx, OpKernel, Registry};
use crate::{bail, ExecutionPlan, Result, RuntimeError, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("If", if_op);
    r.add("Loop", loop_op);
    r.add("Scan", scan_op);
}

fn body(n: &NodeCtx, name: &str) -> Result<Arc<ExecutionPlan>> {
    let g = n
        .attr_graph(name)?
        .ok_or_else(|| n.err(format!("missing attribute '{name}'")))?;
    n.compile_subgraph(g)
}

/// Maps the implicit inputs (after `explicit` positions) to their outer-scope names.
fn bind<'a>(names: &'a [String], ins: &[Option<&'a Value>], explicit: usize) -> HashMap<&'a str, &'a Value> {
    names
        .iter()
        .zip(ins.iter().skip(explicit))
        .filter_map(|(n, v)| v.map(|v| (n.as_str(), v)))
        .collect()
}

fn if_op(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let then_b = body(n, "then_branch")?;
    let else_b = body(n, "else_branch")?;
    let names = n.implicit_input_names();
    let explicit = n.num_inputs();
    Ok(kernel(move |cx, ins| {
        let c = tin(ins, 0)?.to_i64_vec()?;
        let branch = if c.first().copied().unwrap_or(0) != 0 {
            &then_b
        } else {
            &else_b
        };
        let caps = bind(&names, ins, explicit);
        let (outs, _) = branch.run(vec![], &caps, cx.options)?;
        Ok(outs)
    }))
}

fn loop_op(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let b = body(n, "body")?;
    let names = n.implicit_input_names();
    let explicit = n.num_inputs();
    let n_outputs = n.num_outputs();
    Ok(kernel(move |cx, ins| {
        let max_trip = tin_opt(ins, 0)?
            .map(|t| t.to_i64_vec())
            .transpose()?
            .and_then(|v| v.first().copied());
        let mut cond = match tin_opt(ins, 1)? {
            Some(t) => t.to_i64_vec()?.first().copied().unwrap_or(0) != 0,
            None => true,
        };
        let mut carried: Vec<Value> = Vec::new();
        for i in 2..explicit {
            carried.push(
                ins.get(i)
                    .copied()
                    .flatten()
                    .cloned()
                    .ok_or_else(|| RuntimeError::msg(format!("loop-carried input {i} is missing")))?,
            );
        }
        let n_carried = carried.len();
        let n_scan = n_outputs.saturating_sub(n_carried);
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
        let caps = bind(&names, ins, explicit);
        let limit = cx.options.max_loop_iterations as i64;
        let mut i: i64 = 0;
        while cond && max_trip.is_none_or(|m| i < m) {
            if i >= limit {
                bail!("loop exceeded {limit} iterations");
            }
            let iter = Tensor::from_i64s(vec![i], &[], cx.device)?;
            let c = Tensor::new(CT::from_vec(vec![cond as u8], (), cx.device)?, DType::Bool)?;
            let mut feeds = vec![Some(Value::Tensor(iter)), Some(Value::Tensor(c))];
            feeds.extend(carried.drain(..).map(Some));
            let (outs, _) = b.run(feeds, &caps, cx.options)?;
            if outs.len() != 1 + n_carried + n_scan {
                bail!(
                    "loop body returned {} outputs, expected {}",
                    outs.len(),
                    1 + n_carried + n_scan
                );
            }
            let mut it = outs.into_iter();
            let c_out = it.next().ok_or_else(|| RuntimeError::msg("loop body has no outputs"))?;
            cond = c_out.as_tensor()?.to_i64_vec()?.first().copied().unwrap_or(0) != 0;
            carried.extend(it.by_ref().take(n_carried));
            for (k, v) in it.enumerate() {
                scans[k].push(v.into_tensor()?);
            }
            i += 1;
        }
        let mut out = carried;
        for s in scans {
            if s.is_empty() {
                // Zero iterations: an empty tensor of unknown trailing shape.
                out.push(Value::Tensor(Tensor::new(
                    CT::zeros(0, candle_core::DType::F32, cx.device)?,
                    DType::F32,
                )?));
                continue;
            }
            let dt = s[0].dtype();
            let parts: Vec<CT> = s
                .iter()
                .map(|t| t.candle().unsqueeze(0))
                .collect::<candle_core::Result<_>>()?;
            out.push(Value::Tensor(Tensor::new(CT::cat(&parts, 0)?, dt)?));
        }
        Ok(out)
    }))
}

fn scan_op(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    if n.opset < 9 {
        return Err(n.err("Scan before opset 9 (with sequence_lens) is not supported"));
    }
    let b = body(n, "body")?;
    let names = n.implicit_input_names();
    let explicit = n.num_inputs();
    let n_scan_in = n.attr_i("num_scan_inputs", 0)? as usize;
    let in_dirs = n.attr_ints("scan_input_directions")?.unwrap_or_default();
    let out_dirs = n.attr_ints("scan_output_directions")?.unwrap_or_default();
    let in_axes = n.attr_ints("scan_input_axes")?.unwrap_or_default();
    let out_axes = n.attr_ints("scan_output_axes")?.unwrap_or_default();
    let n_outputs = n.num_outputs();
    if n_scan_in > explicit {
        return Err(n.err("num_scan_inputs exceeds the input count"));
    }
    Ok(kernel(move |cx, ins| {
        let n_state = explicit - n_scan_in;
        let mut state: Vec<Value> = (0..n_state)
            .map(|i| {
                ins.get(i)
                    .copied()
                    .flatten()
                    .cloned()
                    .ok_or_else(|| RuntimeError::msg("missing state"))
            })
            .collect::<Result<_>>()?;
        let scan_ins: Vec<(&Tensor, usize, bool)> = (0..n_scan_in)
            .map(|k| {
                let t = tin(ins, n_state + k)?;
                let ax = norm_axis(in_axes.get(k).copied().unwrap_or(0), t.rank())?;
                Ok((t, ax, in_dirs.get(k).copied().unwrap_or(0) != 0))
            })
            .collect::<Result<_>>()?;
        let len = scan_ins.first().map(|(t, a, _)| t.dims()[*a]).unwrap_or(0);
        if scan_ins.iter().any(|(t, a, _)| t.dims()[*a] != len) {
            bail!("scan inputs have different lengths");
        }
        let n_scan_out = n_outputs.saturating_sub(n_state);
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan_out];
        let caps = bind(&names, ins, explicit);
        for i in 0..len {
            let mut feeds: Vec<Option<Value>> = state.drain(..).map(Some).collect();
            for (t, a, rev) in &scan_ins {
                let j = if *rev { len - 1 - i } else { i };
                feeds.push(Some(Value::Tensor(t.map(|c| c.narrow(*a, j, 1)?.squeeze(*a))?)));
            }
            let (outs, _) = b.run(feeds, &caps, cx.options)?;
            let mut it = outs.into_iter();
            state.extend(it.by_ref().take(n_state));
            for (k, v) in it.enumerate() {
                if k < n_scan_out {
                    scans[k].push(v.into_tensor()?);
                }
            }
        }
        let mut out = state;
        for (k, mut s) in scans.into_iter().enumerate() {
            if out_dirs.get(k).copied().unwrap_or(0) != 0 {
                s.reverse();
            }
            if s.is_empty() {
                bail!("Scan over an empty sequence");
            }
            let dt = s[0].dtype();
            let rank = s[0].rank() + 1;
            let ax = norm_axis(out_axes.get(k).copied().unwrap_or(0), rank)?;
            let parts: Vec<CT> = s
                .iter()
                .map(|t| t.candle().unsqueeze(ax))
                .collect::<candle_core::Result<_>>()?;
            out.push(Value::Tensor(Tensor::new(CT::cat(&parts, ax)?, dt)?));
        }
        Ok(out)
    }))
}

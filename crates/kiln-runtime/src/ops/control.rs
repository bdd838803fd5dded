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
        let (outs, _) = branch.run_on(vec![], &caps, cx.options, cx.device)?;
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
            let (outs, _) = b.run_on(feeds, &caps, cx.options, cx.device)?;
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
    let b = body(n, "body")?;
    let names = n.implicit_input_names();
    let explicit = n.num_inputs();
    let n_scan_in = n.attr_i("num_scan_inputs", 0)?;
    if n_scan_in < 0 {
        return Err(n.err("num_scan_inputs must be >= 0"));
    }
    let n_scan_in = n_scan_in as usize;
    let v8 = n.opset < 9;
    let in_dirs = if v8 {
        n.attr_ints("directions")?.unwrap_or_default()
    } else {
        n.attr_ints("scan_input_directions")?.unwrap_or_default()
    };
    let out_dirs = n.attr_ints("scan_output_directions")?.unwrap_or_default();
    let in_axes = n.attr_ints("scan_input_axes")?.unwrap_or_default();
    let out_axes = n.attr_ints("scan_output_axes")?.unwrap_or_default();
    let n_outputs = n.num_outputs();
    // Opset 8 has `sequence_lens` as its first input.
    let first = usize::from(v8);
    if n_scan_in + first > explicit {
        return Err(n.err("num_scan_inputs exceeds the input count"));
    }
    let n_state = explicit - first - n_scan_in;
    let n_scan_out = n_outputs.saturating_sub(n_state);
    Ok(kernel(move |cx, ins| {
        let caps = bind(&names, ins, explicit);
        let value = |i: usize| {
            ins.get(i)
                .copied()
                .flatten()
                .cloned()
                .ok_or_else(|| RuntimeError::msg(format!("Scan input {i} is missing")))
        };
        if !v8 {
            let state: Vec<Value> = (0..n_state).map(value).collect::<Result<_>>()?;
            let scan_ins: Vec<(Tensor, usize, bool)> = (0..n_scan_in)
                .map(|k| {
                    let t = tin(ins, n_state + k)?;
                    if t.rank() == 0 {
                        bail!("scan input {k} is a scalar");
                    }
                    let ax = norm_axis(in_axes.get(k).copied().unwrap_or(0), t.rank())?;
                    Ok((t.clone(), ax, in_dirs.get(k).copied().unwrap_or(0) != 0))
                })
                .collect::<Result<_>>()?;
            let len = scan_ins.first().map(|(t, a, _)| t.dims()[*a]).unwrap_or(0);
            if scan_ins.iter().any(|(t, a, _)| t.dims()[*a] != len) {
                bail!("scan inputs have different lengths");
            }
            let (mut out, scans) = scan_loop(cx, &b, &caps, state, &scan_ins, len, n_state, n_scan_out)?;
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
            return Ok(out);
        }
        // Opset 8: a leading batch axis on every state and scan tensor; the scan axis is 1.
        let states: Vec<Tensor> = (0..n_state)
            .map(|i| tin(ins, first + i).cloned())
            .collect::<Result<_>>()?;
        let scans_in: Vec<Tensor> = (0..n_scan_in)
            .map(|k| tin(ins, first + n_state + k).cloned())
            .collect::<Result<_>>()?;
        let batch = match states.first().or(scans_in.first()) {
            Some(t) if t.rank() > 0 => t.dims()[0],
            _ => bail!("Scan-8 needs batched state or scan inputs"),
        };
        let mut max_len = 0usize;
        for t in &scans_in {
            if t.rank() < 2 || t.dims()[0] != batch {
                bail!(
                    "scan input of shape {:?} does not have batch {batch} and a sequence axis",
                    t.dims()
                );
            }
            if max_len != 0 && t.dims()[1] != max_len {
                bail!("scan inputs have different lengths");
            }
            max_len = t.dims()[1];
        }
        if states.iter().any(|t| t.rank() == 0 || t.dims()[0] != batch) {
            bail!("state inputs must all have batch {batch}");
        }
        let lens: Vec<usize> = match tin_opt(ins, 0)? {
            Some(t) if t.elem_count() > 0 => {
                let v = t.to_i64_vec()?;
                if v.len() != batch {
                    bail!("sequence_lens has {} values for batch {batch}", v.len());
                }
                v.into_iter()
                    .map(|l| {
                        if l < 0 || l as usize > max_len {
                            bail!("sequence length {l} is out of range 0..={max_len}");
                        }
                        Ok(l as usize)
                    })
                    .collect::<Result<_>>()?
            }
            _ => vec![max_len; batch],
        };
        let mut state_parts: Vec<Vec<CT>> = vec![Vec::new(); n_state];
        let mut state_dt: Vec<DType> = vec![DType::F32; n_state];
        // Per output, per batch entry: the [max_len, ...] stack, `None` for a zero-length entry.
        let mut scan_parts: Vec<Vec<Option<CT>>> = vec![Vec::new(); n_scan_out];
        let mut scan_dt: Vec<DType> = vec![DType::F32; n_scan_out];
        for (bi, &len) in lens.iter().enumerate() {
            let state: Vec<Value> = states
                .iter()
                .map(|t| Ok(Value::Tensor(t.map(|c| c.narrow(0, bi, 1)?.squeeze(0))?)))
                .collect::<Result<_>>()?;
            let scan_ins: Vec<(Tensor, usize, bool)> = scans_in
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let s = t.map(|c| c.narrow(0, bi, 1)?.squeeze(0)?.narrow(0, 0, len))?;
                    Ok((s, 0, in_dirs.get(k).copied().unwrap_or(0) != 0))
                })
                .collect::<Result<_>>()?;
            let (out, scans) = scan_loop(cx, &b, &caps, state, &scan_ins, len, n_state, n_scan_out)?;
            for (k, v) in out.into_iter().enumerate() {
                let t = v.into_tensor()?;
                state_dt[k] = t.dtype();
                state_parts[k].push(t.candle().unsqueeze(0)?);
            }
            for (k, s) in scans.into_iter().enumerate() {
                let Some(first) = s.first() else {
                    scan_parts[k].push(None);
                    continue;
                };
                scan_dt[k] = first.dtype();
                let parts: Vec<CT> = s
                    .iter()
                    .map(|t| t.candle().unsqueeze(0))
                    .collect::<candle_core::Result<_>>()?;
                let mut st = CT::cat(&parts, 0)?;
                if len < max_len {
                    let mut pad_dims = st.dims().to_vec();
                    pad_dims[0] = max_len - len;
                    let pad = CT::zeros(pad_dims.as_slice(), st.dtype(), cx.device)?;
                    st = CT::cat(&[st, pad], 0)?;
                }
                scan_parts[k].push(Some(st.unsqueeze(0)?));
            }
        }
        let mut out = Vec::with_capacity(n_outputs);
        for (p, dt) in state_parts.iter().zip(state_dt) {
            out.push(Value::Tensor(Tensor::new(CT::cat(p, 0)?, dt)?));
        }
        for (p, dt) in scan_parts.into_iter().zip(scan_dt) {
            // Zero-length batch entries become zeros shaped like the others.
            let Some(like) = p.iter().flatten().next().cloned() else {
                bail!("Scan over an empty sequence");
            };
            let p: Vec<CT> = p
                .into_iter()
                .map(|t| t.map_or_else(|| like.zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            out.push(Value::Tensor(Tensor::new(CT::cat(&p, 0)?, dt)?));
        }
        Ok(out)
    }))
}

/// Runs the body `len` times; returns the final state and the per-iteration scan outputs.
#[allow(clippy::too_many_arguments)]
fn scan_loop(
    cx: &super::RunCx,
    b: &ExecutionPlan,
    caps: &HashMap<&str, &Value>,
    mut state: Vec<Value>,
    scan_ins: &[(Tensor, usize, bool)],
    len: usize,
    n_state: usize,
    n_scan_out: usize,
) -> Result<(Vec<Value>, Vec<Vec<Tensor>>)> {
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan_out];
    for i in 0..len {
        let mut feeds: Vec<Option<Value>> = state.drain(..).map(Some).collect();
        for (t, a, rev) in scan_ins {
            let j = if *rev { len - 1 - i } else { i };
            feeds.push(Some(Value::Tensor(t.map(|c| c.narrow(*a, j, 1)?.squeeze(*a))?)));
        }
        let (outs, _) = b.run_on(feeds, caps, cx.options, cx.device)?;
        if outs.len() < n_state + n_scan_out {
            bail!(
                "Scan body returned {} outputs, expected {}",
                outs.len(),
                n_state + n_scan_out
            );
        }
        let mut it = outs.into_iter();
        state.extend(it.by_ref().take(n_state));
        for (k, v) in it.enumerate() {
            if k < n_scan_out {
                scans[k].push(v.into_tensor()?);
            }
        }
    }
    Ok((state, scans))
}

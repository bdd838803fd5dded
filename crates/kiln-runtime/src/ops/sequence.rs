//! Sequence and optional operators: SequenceConstruct, SequenceEmpty, SequenceAt, SequenceInsert,
//! SequenceErase, SequenceLength, SplitToSequence, ConcatFromSequence, SequenceMap, Optional,
//! OptionalHasElement, OptionalGetElement.

use std::collections::HashMap;

use candle_core::Tensor as CT;
use kiln_graph::{Attribute, DType};

use super::common::{ints_input, norm_axis, tin, vin};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, RuntimeError, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("SequenceConstruct", |_| {
        Ok(kernel(|_, ins| {
            let ts: Vec<Tensor> = ins
                .iter()
                .flatten()
                .map(|v| v.as_tensor().cloned())
                .collect::<Result<_>>()?;
            let dt = ts.first().map(Tensor::dtype);
            if ts.iter().any(|t| Some(t.dtype()) != dt) {
                bail!("SequenceConstruct: inputs have different dtypes");
            }
            Ok(vec![Value::Sequence(ts, dt)])
        }))
    });
    r.add("SequenceEmpty", |n| {
        let code = n.attr_i("dtype", 1)?;
        let dt = DType::from_onnx(code as i32).ok_or_else(|| n.err(format!("unsupported dtype code {code}")))?;
        Ok(kernel(move |_, _| Ok(vec![Value::Sequence(Vec::new(), Some(dt))])))
    });
    r.add("SequenceAt", |_| {
        Ok(kernel(|_, ins| {
            let (ts, _) = seq_in(ins, 0)?;
            let p = position(ins, 1)?.ok_or_else(|| RuntimeError::msg("SequenceAt: position is required"))?;
            let i = seq_index(p, ts.len(), false)?;
            out1(ts[i].clone())
        }))
    });
    r.add("SequenceInsert", |_| {
        Ok(kernel(|_, ins| {
            let (ts, dt) = seq_in(ins, 0)?;
            let t = tin(ins, 1)?;
            if dt.is_some_and(|d| d != t.dtype()) && !ts.is_empty() {
                bail!("SequenceInsert: tensor dtype {} differs from the sequence's", t.dtype());
            }
            let i = match position(ins, 2)? {
                Some(p) => seq_index(p, ts.len(), true)?,
                None => ts.len(),
            };
            let mut out = ts.to_vec();
            out.insert(i, t.clone());
            Ok(vec![Value::Sequence(out, Some(t.dtype()))])
        }))
    });
    r.add("SequenceErase", |_| {
        Ok(kernel(|_, ins| {
            let (ts, dt) = seq_in(ins, 0)?;
            if ts.is_empty() {
                bail!("SequenceErase: the sequence is empty");
            }
            let i = match position(ins, 1)? {
                Some(p) => seq_index(p, ts.len(), false)?,
                None => ts.len() - 1,
            };
            let mut out = ts.to_vec();
            out.remove(i);
            Ok(vec![Value::Sequence(out, dt)])
        }))
    });
    r.add("SequenceLength", |_| {
        Ok(kernel(|cx, ins| {
            let (ts, _) = seq_in(ins, 0)?;
            out1(Tensor::from_i64s(vec![ts.len() as i64], &[], cx.device)?)
        }))
    });
    r.add("SplitToSequence", |n| {
        let axis = n.attr_i("axis", 0)?;
        let keepdims = n.attr_i("keepdims", 1)? != 0;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let a = norm_axis(axis, x.rank())?;
            let len = x.dims()[a];
            let split = super::common::tin_opt(ins, 1)?;
            let sizes: Vec<usize> = match split {
                None => vec![1; len],
                Some(s) => {
                    let v = s.to_i64_vec()?;
                    if v.iter().any(|&k| k < 0) {
                        bail!("SplitToSequence: negative split size");
                    }
                    if s.rank() == 0 {
                        let k = v.first().copied().unwrap_or(0) as usize;
                        if k == 0 {
                            bail!("SplitToSequence: split size 0");
                        }
                        let mut out = vec![k; len / k];
                        if len % k != 0 {
                            out.push(len % k);
                        }
                        out
                    } else {
                        if v.iter().sum::<i64>() != len as i64 {
                            bail!("SplitToSequence: split sizes {v:?} do not sum to {len}");
                        }
                        v.into_iter().map(|k| k as usize).collect()
                    }
                }
            };
            let squeeze = split.is_none() && !keepdims;
            let mut out = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for k in sizes {
                let part = x.map(|t| {
                    let p = t.narrow(a, start, k)?;
                    if squeeze {
                        p.squeeze(a)
                    } else {
                        p.contiguous()
                    }
                })?;
                out.push(part);
                start += k;
            }
            Ok(vec![Value::Sequence(out, Some(x.dtype()))])
        }))
    });
    r.add("ConcatFromSequence", |n| {
        let axis = n.attr_i("axis", 0)?;
        let new_axis = n.attr_i("new_axis", 0)? != 0;
        Ok(kernel(move |_, ins| {
            let (ts, _) = seq_in(ins, 0)?;
            let first = ts
                .first()
                .ok_or_else(|| RuntimeError::msg("ConcatFromSequence: empty sequence"))?;
            if new_axis {
                let a = norm_axis(axis, first.rank() + 1)?;
                if ts
                    .iter()
                    .any(|t| t.dtype() != first.dtype() || t.dims() != first.dims())
                {
                    bail!("ConcatFromSequence: tensors differ in dtype or shape");
                }
                let parts: Vec<CT> = ts
                    .iter()
                    .map(|t| t.candle().unsqueeze(a))
                    .collect::<candle_core::Result<_>>()?;
                out1(Tensor::new(CT::cat(&parts, a)?, first.dtype())?)
            } else {
                let refs: Vec<&Tensor> = ts.iter().collect();
                out1(super::shape::concat(&refs, axis)?)
            }
        }))
    });
    r.add("SequenceMap", sequence_map);
    r.add("Optional", |n| {
        let dt = match n.attr("type") {
            Some(Attribute::Type(_, d)) => *d,
            _ => None,
        };
        Ok(kernel(move |_, ins| {
            Ok(vec![match ins.first().copied().flatten() {
                Some(v) => {
                    let d = match v {
                        Value::Tensor(t) => Some(t.dtype()),
                        Value::Sequence(_, d) => *d,
                        Value::Optional(_, d) => *d,
                    };
                    Value::Optional(Some(Box::new(v.clone())), d.or(dt))
                }
                None => Value::Optional(None, dt),
            }])
        }))
    });
    r.add("OptionalHasElement", |_| {
        Ok(kernel(|cx, ins| {
            let has = match ins.first().copied().flatten() {
                None | Some(Value::Optional(None, _)) => false,
                Some(_) => true,
            };
            let t = CT::from_vec(vec![has as u8], (), cx.device)?;
            out1(Tensor::new(t, DType::Bool)?)
        }))
    });
    r.add("OptionalGetElement", |_| {
        Ok(kernel(|_, ins| match vin(ins, 0)? {
            Value::Optional(Some(v), _) => Ok(vec![(**v).clone()]),
            Value::Optional(None, _) => bail!("OptionalGetElement: the optional is empty"),
            v => Ok(vec![v.clone()]),
        }))
    });
}

/// Sequence input `i`: its tensors and element dtype.
fn seq_in<'a>(ins: &[Option<&'a Value>], i: usize) -> Result<(&'a [Tensor], Option<DType>)> {
    match vin(ins, i)? {
        Value::Sequence(ts, dt) => Ok((ts.as_slice(), *dt)),
        Value::Optional(Some(v), _) => match v.as_ref() {
            Value::Sequence(ts, dt) => Ok((ts.as_slice(), *dt)),
            _ => bail!("input {i}: expected a sequence"),
        },
        _ => bail!("input {i}: expected a sequence"),
    }
}

/// Optional scalar position input.
fn position(ins: &[Option<&Value>], i: usize) -> Result<Option<i64>> {
    match ints_input(ins, i)? {
        None => Ok(None),
        Some(v) if v.len() == 1 => Ok(Some(v[0])),
        Some(_) => bail!("position must be a scalar"),
    }
}

/// Normalizes a sequence position; `insert` allows `len` itself.
fn seq_index(p: i64, len: usize, insert: bool) -> Result<usize> {
    let n = len as i64;
    let i = if p < 0 { p + n } else { p };
    let hi = if insert { n } else { n - 1 };
    if i < 0 || i > hi {
        bail!("position {p} is out of range for a sequence of length {len}");
    }
    Ok(i as usize)
}

fn sequence_map(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let g = n.attr_graph("body")?.ok_or_else(|| n.err("missing attribute 'body'"))?;
    let out_dtypes: Vec<Option<DType>> = g.outputs.iter().map(|o| g.value(*o).dtype).collect();
    let plan = n.compile_subgraph(g)?;
    let names = n.implicit_input_names();
    let explicit = n.num_inputs();
    let n_out = n.num_outputs();
    Ok(kernel(move |cx, ins| {
        let caps: HashMap<&str, &Value> = names
            .iter()
            .zip(ins.iter().skip(explicit))
            .filter_map(|(n, v)| v.map(|v| (n.as_str(), v)))
            .collect();
        let mut len: Option<usize> = None;
        for i in 0..explicit {
            if let Some(Value::Sequence(ts, _)) = ins.get(i).copied().flatten() {
                if len.is_some_and(|l| l != ts.len()) {
                    bail!("SequenceMap: input sequences have different lengths");
                }
                len = Some(ts.len());
            }
        }
        let len = len.ok_or_else(|| RuntimeError::msg("SequenceMap: no sequence input"))?;
        let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); n_out];
        for k in 0..len {
            let feeds: Vec<Option<Value>> = (0..explicit)
                .map(|i| {
                    ins.get(i).copied().flatten().map(|v| match v {
                        Value::Sequence(ts, _) => Value::Tensor(ts[k].clone()),
                        other => other.clone(),
                    })
                })
                .collect();
            let (res, _) = plan.run_on(feeds, &caps, cx.options, cx.device)?;
            if res.len() < n_out {
                bail!("SequenceMap: body returned {} outputs, expected {n_out}", res.len());
            }
            for (o, v) in outs.iter_mut().zip(res) {
                o.push(v.into_tensor()?);
            }
        }
        Ok(outs
            .into_iter()
            .enumerate()
            .map(|(i, ts)| {
                let dt = ts.first().map(Tensor::dtype).or(out_dtypes.get(i).copied().flatten());
                Value::Sequence(ts, dt)
            })
            .collect())
    }))
}

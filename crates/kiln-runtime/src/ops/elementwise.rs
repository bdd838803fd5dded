//! Element-wise operators: arithmetic with broadcasting, comparisons, logic, math and
//! activation functions, Where, Cast, Clip.

use candle_core::Tensor as CT;
use kiln_graph::DType;

use super::binary_cpu::{binary_f32, BinOp};
use super::common::{broadcast2, host_binary, host_binary_i64, host_unary, same_dtype, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::fastmath::{self, Func};
use crate::{bail, Result, Tensor, Value};

pub fn register(r: &mut Registry) {
    r.add("Add", |_| Ok(arith(Arith::Add)));
    r.add("Sub", |_| Ok(arith(Arith::Sub)));
    r.add("Mul", |_| Ok(arith(Arith::Mul)));
    r.add("Div", |_| Ok(arith(Arith::Div)));
    r.add("Pow", |_| {
        Ok(kernel(|_, ins| {
            let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
            if let Some(r) = pow_small_exponent(a, b)? {
                return out1(r);
            }
            if a.dtype().is_float() && b.dtype() == a.dtype() {
                let (x, y) = broadcast2(a, b)?;
                // x^y = exp(y * ln x) is wrong for negative x; use the host path then.
                if a.to_f64_vec()?.iter().all(|v| *v > 0.0) {
                    return out1(Tensor::new(x.log()?.mul(&y)?.exp()?, a.dtype())?);
                }
            }
            out1(host_binary(a, b, a.dtype(), f64::powf)?)
        }))
    });
    r.add("Mod", |n| {
        let fmod = n.attr_i("fmod", 0)? != 0;
        Ok(kernel(move |_, ins| {
            let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
            let dt = same_dtype(a, b)?;
            if dt.is_float() {
                // fmod=1: C fmod (sign of the dividend); fmod=0: numpy mod (sign of the divisor).
                return out1(host_binary(a, b, dt, |x, y| {
                    let r = x % y;
                    if fmod || r == 0.0 || (r < 0.0) == (y < 0.0) {
                        r
                    } else {
                        r + y
                    }
                })?);
            }
            out1(host_binary_i64(a, b, dt, |x, y| {
                if y == 0 {
                    bail!("integer modulo by zero");
                }
                let r = x.wrapping_rem(y);
                Ok(if fmod || r == 0 || (r < 0) == (y < 0) { r } else { r + y })
            })?)
        }))
    });
    r.add("Max", |_| Ok(variadic(|a, b| a.maximum(b))));
    r.add("Min", |_| Ok(variadic(|a, b| a.minimum(b))));
    r.add("Sum", |_| Ok(variadic(|a, b| a.add(b))));
    r.add("Mean", |_| {
        Ok(kernel(|cx, ins| {
            let n = ins.iter().flatten().count();
            let s = variadic(|a, b| a.add(b)).run(cx, ins)?;
            let t = s[0].as_tensor()?;
            out1(t.map(|x| x.affine(1.0 / n as f64, 0.0))?)
        }))
    });
    for (op, cmp) in [
        ("Equal", Cmp::Eq),
        ("Less", Cmp::Lt),
        ("Greater", Cmp::Gt),
        ("LessOrEqual", Cmp::Le),
        ("GreaterOrEqual", Cmp::Ge),
    ] {
        let f: super::Factory = match cmp {
            Cmp::Eq => |_| Ok(compare(Cmp::Eq)),
            Cmp::Lt => |_| Ok(compare(Cmp::Lt)),
            Cmp::Gt => |_| Ok(compare(Cmp::Gt)),
            Cmp::Le => |_| Ok(compare(Cmp::Le)),
            Cmp::Ge => |_| Ok(compare(Cmp::Ge)),
        };
        r.add(op, f);
    }
    r.add("And", |_| Ok(logic(|a, b| a & b)));
    r.add("Or", |_| Ok(logic(|a, b| a | b)));
    r.add("Xor", |_| Ok(logic(|a, b| a ^ b)));
    r.add("Not", |_| {
        Ok(kernel(|_, ins| {
            let a = tin(ins, 0)?;
            let z = a.candle().zeros_like()?;
            out1(Tensor::new(a.candle().eq(&z)?, DType::Bool)?)
        }))
    });
    r.add("BitwiseAnd", |_| Ok(bitwise(|a, b| a & b)));
    r.add("BitwiseOr", |_| Ok(bitwise(|a, b| a | b)));
    r.add("BitwiseXor", |_| Ok(bitwise(|a, b| a ^ b)));
    r.add("BitwiseNot", |_| {
        Ok(kernel(|_, ins| {
            let a = tin(ins, 0)?;
            let v: Vec<i64> = a.to_i64_vec()?.into_iter().map(|x| !x).collect();
            out1(Tensor::from_i64s(v, a.dims(), a.device())?.cast(a.dtype())?)
        }))
    });
    r.add("BitShift", |n| {
        let left = n.attr_s("direction", "")? == "LEFT";
        Ok(kernel(move |_, ins| {
            let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
            let dt = same_dtype(a, b)?;
            let bits = dt.size_in_bytes() as i64 * 8;
            let signed = dt.is_signed();
            out1(host_binary_i64(a, b, dt, |x, s| {
                // Shifts outside [0, width) give 0 (or -1 for a negative signed value shifted right).
                if s < 0 || s >= bits {
                    return Ok(if !left && signed && x < 0 { -1 } else { 0 });
                }
                Ok(if left {
                    ((x as u64) << s) as i64
                } else if signed {
                    x >> s
                } else {
                    ((x as u64) >> s) as i64
                })
            })?)
        }))
    });
    r.add("Where", |_| {
        Ok(kernel(|_, ins| {
            let (c, a, b) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
            let dt = same_dtype(a, b)?;
            let dims = super::common::broadcast_all(&[c.dims(), a.dims(), b.dims()])?;
            let d = dims.as_slice();
            let r = c
                .candle()
                .broadcast_as(d)?
                .where_cond(&a.candle().broadcast_as(d)?, &b.candle().broadcast_as(d)?)?;
            out1(Tensor::new(r, dt)?)
        }))
    });
    r.add("Cast", |n| {
        let code = n.attr_i("to", 0)?;
        let to = DType::from_onnx(code as i32).ok_or_else(|| n.err(format!("unsupported target type {code}")))?;
        let (saturate, round_mode) = cast_options(n)?;
        Ok(kernel(move |_, ins| {
            out1(tin(ins, 0)?.cast_with(to, saturate, &round_mode)?)
        }))
    });
    r.add("CastLike", |n| {
        let (saturate, round_mode) = cast_options(n)?;
        Ok(kernel(move |_, ins| {
            out1(tin(ins, 0)?.cast_with(tin(ins, 1)?.dtype(), saturate, &round_mode)?)
        }))
    });
    r.add("Identity", |_| {
        Ok(kernel(|_, ins| Ok(vec![super::common::vin(ins, 0)?.clone()])))
    });
    r.add("Dropout", |n| {
        let want_mask = n.num_outputs() > 1;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            // Inference mode (training_mode absent or false) is the identity whatever the ratio;
            // training mode is deterministic only for ratio 0.
            if let Some(t) = tin_opt(ins, 2)? {
                if t.to_i64_vec()?.first().copied().unwrap_or(0) != 0 {
                    let ratio = match tin_opt(ins, 1)? {
                        Some(r) => r.to_f64_vec()?.first().copied().unwrap_or(0.5),
                        None => 0.5,
                    };
                    if ratio != 0.0 {
                        bail!("Dropout in training mode with ratio {ratio} is random and not supported");
                    }
                }
            }
            let mut out = vec![Value::Tensor(x.clone())];
            if want_mask {
                let ones = CT::ones(x.dims(), candle_core::DType::U8, x.device())?;
                out.push(Value::Tensor(Tensor::new(ones, DType::Bool)?));
            }
            Ok(out)
        }))
    });
    r.add("Clip", clip);
    register_unary(r);
}

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

/// Cast/CastLike `saturate` (default 1; float8 targets) and `round_mode` (default "up";
/// float8e8m0 targets).
fn cast_options(n: &NodeCtx) -> Result<(bool, String)> {
    let saturate = n.attr_i("saturate", 1)? != 0;
    let round_mode = n.attr_s("round_mode", "up")?;
    if !DType::is_round_mode(&round_mode) {
        return Err(n.err(format!("unsupported round_mode '{round_mode}'")));
    }
    Ok((saturate, round_mode))
}

fn arith(op: Arith) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
        let dt = same_dtype(a, b)?;
        if matches!(op, Arith::Div) && !dt.is_float() {
            return out1(host_binary_i64(a, b, dt, |x, y| {
                if y == 0 {
                    bail!("integer division by zero");
                }
                Ok(x.wrapping_div(y))
            })?);
        }
        if !dt.is_float() {
            // Integer tensors are small shape/index math in real models: compute on the host with
            // wrap-around (candle's integer kernels panic on overflow in debug builds).
            return out1(host_binary_i64(a, b, dt, |x, y| {
                Ok(match op {
                    Arith::Add => x.wrapping_add(y),
                    Arith::Sub => x.wrapping_sub(y),
                    _ => x.wrapping_mul(y),
                })
            })?);
        }
        if dt == DType::F32 {
            let bop = match op {
                Arith::Add => BinOp::Add,
                Arith::Sub => BinOp::Sub,
                Arith::Mul => BinOp::Mul,
                Arith::Div => BinOp::Div,
            };
            if let Some(r) = binary_f32(bop, a.candle(), b.candle()) {
                return out1(Tensor::new(r?, dt)?);
            }
        }
        let r = match op {
            Arith::Add => a.candle().broadcast_add(b.candle())?,
            Arith::Sub => a.candle().broadcast_sub(b.candle())?,
            Arith::Mul => a.candle().broadcast_mul(b.candle())?,
            Arith::Div => a.candle().broadcast_div(b.candle())?,
        };
        out1(Tensor::new(r, dt)?)
    })
}

fn variadic(f: fn(&CT, &CT) -> candle_core::Result<CT>) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let ts: Vec<&Tensor> = ins.iter().flatten().map(|v| v.as_tensor()).collect::<Result<_>>()?;
        let Some(first) = ts.first() else {
            bail!("needs at least one input")
        };
        let mut acc: Tensor = (*first).clone();
        for t in &ts[1..] {
            let dt = same_dtype(&acc, t)?;
            let (x, y) = broadcast2(&acc, t)?;
            acc = Tensor::new(f(&x, &y)?, dt)?;
        }
        out1(acc)
    })
}

#[derive(Clone, Copy)]
enum Cmp {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

fn compare(c: Cmp) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
        same_dtype(a, b)?;
        if a.needs_host_kernels() {
            let cpu = candle_core::Device::Cpu;
            let r = compare_tensors(&a.to_device(&cpu)?, &b.to_device(&cpu)?, c)?;
            return out1(r.to_device(a.device())?);
        }
        out1(compare_tensors(a, b, c)?)
    })
}

fn compare_tensors(a: &Tensor, b: &Tensor, c: Cmp) -> Result<Tensor> {
    let (x, y) = broadcast2(a, b)?;
    let r = match c {
        Cmp::Eq => x.eq(&y)?,
        Cmp::Lt => x.lt(&y)?,
        Cmp::Gt => x.gt(&y)?,
        Cmp::Le => x.le(&y)?,
        Cmp::Ge => x.ge(&y)?,
    };
    Tensor::new(r, DType::Bool)
}

fn logic(f: fn(u8, u8) -> u8) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
        let (x, y) = broadcast2(a, b)?;
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<u8>()?;
        let yv = y.contiguous()?.flatten_all()?.to_vec1::<u8>()?;
        let v: Vec<u8> = xv
            .iter()
            .zip(&yv)
            .map(|(&p, &q)| f((p != 0) as u8, (q != 0) as u8))
            .collect();
        out1(Tensor::new(CT::from_vec(v, x.dims(), a.device())?, DType::Bool)?)
    })
}

fn bitwise(f: fn(i64, i64) -> i64) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 1)?);
        let dt = same_dtype(a, b)?;
        out1(host_binary_i64(a, b, dt, |x, y| Ok(f(x, y)))?)
    })
}

fn clip(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    // Opset < 11 carries the bounds as attributes.
    let amin = n.attr_f_opt("min")?;
    let amax = n.attr_f_opt("max")?;
    Ok(kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        let lo = match tin_opt(ins, 1)? {
            Some(t) => t.to_f64_vec()?.first().copied(),
            None => amin.map(f64::from),
        };
        let hi = match tin_opt(ins, 2)? {
            Some(t) => t.to_f64_vec()?.first().copied(),
            None => amax.map(f64::from),
        };
        if x.dtype().is_float() {
            let mut t = x.candle().clone();
            if let Some(l) = lo {
                t = t.maximum(l)?;
            }
            if let Some(h) = hi {
                t = t.minimum(h)?;
            }
            return out1(Tensor::new(t, x.dtype())?);
        }
        let v: Vec<i64> = x
            .to_i64_vec()?
            .into_iter()
            .map(|v| {
                let v = lo.map_or(v, |l| v.max(l as i64));
                hi.map_or(v, |h| v.min(h as i64))
            })
            .collect();
        out1(Tensor::from_i64s(v, x.dims(), x.device())?.cast(x.dtype())?)
    }))
}

/// A float unary op: a candle expression for the fast path.
type CandleUnary = fn(&CT) -> candle_core::Result<CT>;

fn unary_candle(f: CandleUnary, host: fn(f64) -> f64) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        if matches!(x.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            return out1(x.map(f)?);
        }
        out1(host_unary(x, x.dtype(), host)?)
    })
}

/// `x ^ e` for a float `x` and a one-element exponent in {1, 2, 3, 0.5, -1} (LayerNorm's variance,
/// RMSNorm, ...) with products, sqrt or a reciprocal instead of `powf`; `None` otherwise.
fn pow_small_exponent(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !a.dtype().is_float() || !b.dtype().is_float() || b.elem_count() != 1 || b.rank() > a.rank() {
        return Ok(None);
    }
    let e = match b.to_f64_vec()?.first() {
        Some(&e) => e,
        None => return Ok(None),
    };
    let x = a.candle();
    let square = |x: &CT| -> Result<CT> {
        if x.dtype() == candle_core::DType::F32 {
            if let Some(r) = binary_f32(BinOp::Mul, x, x) {
                return r;
            }
        }
        Ok(x.sqr()?)
    };
    let r = if e == 1.0 {
        x.clone()
    } else if e == 2.0 {
        square(x)?
    } else if e == 3.0 {
        (square(x)? * x)?
    } else if e == 0.5 {
        x.sqrt()?
    } else if e == -1.0 {
        x.recip()?
    } else {
        return Ok(None);
    };
    Ok(Some(Tensor::new(r, a.dtype())?))
}

/// An f32 CPU tensor goes through the vectorized `fastmath` kernel; anything else through `other`.
fn fast(f: Func, other: Box<dyn OpKernel>) -> Box<dyn OpKernel> {
    kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        if x.dtype() == DType::F32 {
            if let Some(r) = fastmath::map_tensor(f, x.candle()) {
                return out1(Tensor::new(r?, DType::F32)?);
            }
        }
        other.run(cx, ins)
    })
}

fn unary_host(host: fn(f64) -> f64) -> Box<dyn OpKernel> {
    kernel(move |_, ins| {
        let x = tin(ins, 0)?;
        out1(host_unary(x, x.dtype(), host)?)
    })
}

fn sigmoid(x: &CT) -> candle_core::Result<CT> {
    // exp(-x) overflows f16 below x = -11, flushing every result under 1.5e-5 to 0: widen halves.
    let dt = x.dtype();
    if matches!(dt, candle_core::DType::F16 | candle_core::DType::BF16) {
        return sigmoid(&x.to_dtype(candle_core::DType::F32)?)?.to_dtype(dt);
    }
    (x.neg()?.exp()? + 1.0)?.recip()
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

fn register_unary(r: &mut Registry) {
    r.add("Abs", |_| {
        Ok(kernel(|_, ins| {
            let x = tin(ins, 0)?;
            if x.dtype().is_float() {
                return out1(x.map(|t| t.abs())?);
            }
            let v: Vec<i64> = x.to_i64_vec()?.into_iter().map(i64::wrapping_abs).collect();
            out1(Tensor::from_i64s(v, x.dims(), x.device())?.cast(x.dtype())?)
        }))
    });
    r.add("Neg", |_| {
        Ok(kernel(|_, ins| {
            let x = tin(ins, 0)?;
            if x.dtype().is_float() {
                return out1(x.map(|t| t.neg())?);
            }
            let v: Vec<i64> = x.to_i64_vec()?.into_iter().map(i64::wrapping_neg).collect();
            out1(Tensor::from_i64s(v, x.dims(), x.device())?.cast(x.dtype())?)
        }))
    });
    r.add("Sign", |_| {
        Ok(unary_host(|v| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        }))
    });
    r.add("Exp", |_| Ok(fast(Func::Exp, unary_candle(|t| t.exp(), f64::exp))));
    r.add("Log", |_| Ok(unary_candle(|t| t.log(), f64::ln)));
    r.add("Sqrt", |_| Ok(unary_candle(|t| t.sqrt(), f64::sqrt)));
    r.add("Reciprocal", |_| Ok(unary_candle(|t| t.recip(), f64::recip)));
    r.add("Sin", |_| Ok(unary_candle(|t| t.sin(), f64::sin)));
    r.add("Cos", |_| Ok(unary_candle(|t| t.cos(), f64::cos)));
    r.add("Tan", |_| Ok(unary_host(f64::tan)));
    r.add("Asin", |_| Ok(unary_host(f64::asin)));
    r.add("Acos", |_| Ok(unary_host(f64::acos)));
    r.add("Atan", |_| Ok(unary_host(f64::atan)));
    r.add("Sinh", |_| Ok(unary_host(f64::sinh)));
    r.add("Cosh", |_| Ok(unary_host(f64::cosh)));
    r.add("Asinh", |_| Ok(unary_host(f64::asinh)));
    r.add("Acosh", |_| Ok(unary_host(f64::acosh)));
    r.add("Atanh", |_| Ok(unary_host(f64::atanh)));
    r.add("Tanh", |_| Ok(fast(Func::Tanh, unary_candle(|t| t.tanh(), f64::tanh))));
    r.add("Sigmoid", |_| {
        Ok(fast(Func::Sigmoid, unary_candle(sigmoid, |v| 1.0 / (1.0 + (-v).exp()))))
    });
    r.add("Erf", |_| Ok(fast(Func::Erf, unary_host(libm::erf))));
    r.add("Floor", |_| Ok(unary_candle(|t| t.floor(), f64::floor)));
    r.add("Ceil", |_| Ok(unary_candle(|t| t.ceil(), f64::ceil)));
    r.add("Round", |_| Ok(unary_host(round_half_even)));
    r.add("Relu", |_| Ok(unary_candle(|t| t.relu(), |v| v.max(0.0))));
    r.add("Softsign", |_| Ok(unary_host(|v| v / (1.0 + v.abs()))));
    r.add("Softplus", |_| {
        Ok(unary_host(|v| if v > 30.0 { v } else { v.exp().ln_1p() }))
    });
    r.add("Mish", |_| {
        Ok(unary_host(|v| v * (if v > 30.0 { v } else { v.exp().ln_1p() }).tanh()))
    });
    r.add("HardSwish", |_| {
        Ok(kernel(|cx, ins| {
            let x = tin(ins, 0)?;
            // f32: the f32 formula the fused element-wise chain uses (bit-identical when fused).
            if x.dtype() == DType::F32 {
                if let Some(v) = crate::fastmath::with_f32(x.candle(), |s| {
                    s.iter()
                        .map(|&v| kiln_graph::passes::elementwise_chain::hard_swish(v))
                        .collect::<Vec<f32>>()
                }) {
                    return out1(Tensor::new(
                        CT::from_vec(v, x.dims(), x.candle().device())?,
                        DType::F32,
                    )?);
                }
            }
            let _ = cx;
            out1(host_unary(x, x.dtype(), |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0))?)
        }))
    });
    r.add("IsNaN", |_| {
        Ok(kernel(|_, ins| {
            let x = tin(ins, 0)?;
            let v: Vec<u8> = x.to_f64_vec()?.into_iter().map(|v| v.is_nan() as u8).collect();
            out1(Tensor::new(CT::from_vec(v, x.dims(), x.device())?, DType::Bool)?)
        }))
    });
    r.add("IsInf", |n| {
        let pos = n.attr_i("detect_positive", 1)? != 0;
        let neg = n.attr_i("detect_negative", 1)? != 0;
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            let v: Vec<u8> = x
                .to_f64_vec()?
                .into_iter()
                .map(|v| (v.is_infinite() && ((v > 0.0 && pos) || (v < 0.0 && neg))) as u8)
                .collect();
            out1(Tensor::new(CT::from_vec(v, x.dims(), x.device())?, DType::Bool)?)
        }))
    });
    r.add("LeakyRelu", |n| {
        let a = n.attr_f("alpha", 0.01)? as f64;
        Ok(param_unary(move |v| if v < 0.0 { a * v } else { v }))
    });
    r.add("Elu", |n| {
        let a = n.attr_f("alpha", 1.0)? as f64;
        Ok(param_unary(move |v| if v < 0.0 { a * (v.exp() - 1.0) } else { v }))
    });
    r.add("Celu", |n| {
        let a = n.attr_f("alpha", 1.0)? as f64;
        Ok(param_unary(move |v| v.max(0.0) + (a * ((v / a).exp() - 1.0)).min(0.0)))
    });
    r.add("Selu", |n| {
        let a = n.attr_f("alpha", 1.673_263_2)? as f64;
        let g = n.attr_f("gamma", 1.050_701)? as f64;
        Ok(param_unary(
            move |v| if v <= 0.0 { g * (a * v.exp() - a) } else { g * v },
        ))
    });
    r.add("ThresholdedRelu", |n| {
        let a = n.attr_f("alpha", 1.0)? as f64;
        Ok(param_unary(move |v| if v > a { v } else { 0.0 }))
    });
    r.add("HardSigmoid", |n| {
        let a = n.attr_f("alpha", 0.2)? as f64;
        let b = n.attr_f("beta", 0.5)? as f64;
        Ok(param_unary(move |v| (a * v + b).clamp(0.0, 1.0)))
    });
    r.add("Shrink", |n| {
        let l = n.attr_f("lambd", 0.5)? as f64;
        let b = n.attr_f("bias", 0.0)? as f64;
        Ok(param_unary(move |v| {
            if v < -l {
                v + b
            } else if v > l {
                v - b
            } else {
                0.0
            }
        }))
    });
    r.add("Gelu", |n| {
        let tanh = n.attr_s("approximate", "none")? == "tanh";
        Ok(kernel(move |_, ins| {
            let x = tin(ins, 0)?;
            if x.dtype() == DType::F32 {
                let f = if tanh { Func::GeluTanh } else { Func::GeluErf };
                if let Some(r) = fastmath::map_tensor(f, x.candle()) {
                    return out1(Tensor::new(r?, DType::F32)?);
                }
            }
            if x.dtype().is_float() {
                return out1(x.map(|t| if tanh { t.gelu() } else { t.gelu_erf() })?);
            }
            bail!("Gelu needs a float input")
        }))
    });
    r.add("PRelu", |_| {
        Ok(kernel(|_, ins| {
            let (x, s) = (tin(ins, 0)?, tin(ins, 1)?);
            out1(host_binary(x, s, x.dtype(), |v, a| if v < 0.0 { a * v } else { v })?)
        }))
    });
}

fn param_unary(f: impl Fn(f64) -> f64 + Send + Sync + 'static) -> Box<dyn OpKernel> {
    kernel(move |_cx: &RunCx, ins| {
        let x = tin(ins, 0)?;
        out1(host_unary(x, x.dtype(), &f)?)
    })
}

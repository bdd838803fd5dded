//! Operator family `qlinear`: the 8-bit operators ONNX Runtime's quantizer writes in its QOperator
//! format besides QLinearConv and QLinearMatMul (`com.microsoft` `QLinearAdd`, `QLinearMul`,
//! `QLinearSigmoid`, `QLinearSoftmax`, `QLinearLeakyRelu`, `QLinearGlobalAveragePool`, `QLinearAveragePool`,
//! `QLinearConcat`, and `QGemm`, below).
//!
//! Each one dequantizes its u8/i8 inputs with their per-tensor scale and zero point
//! (`(q - zero_point) * scale`), runs Kiln's float kernel of the same op on them (built from the same
//! node, so the attributes are read as that op reads them: `alpha`, `axis`, `kernel_shape`, `pads`,
//! `strides`, `ceil_mode`, `count_include_pad`, `auto_pad`), and quantizes the result with the
//! output's scale and zero point (`saturate(round_half_even(y / scale) + zero_point)`). That is the
//! formula of the operators' definitions and of ONNX Runtime's scalar paths; its vectorized
//! fixed-point paths may round an element one step differently.

use candle_core::DType as CDType;
use kiln_graph::DType;

use super::common::{tin, tin_opt};
use super::quant::{dequantize_8bit_f32, quantized_tensor};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor, Value};

const MS: &str = "com.microsoft";

pub fn register(r: &mut Registry) {
    // [A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point]
    r.add_domain(MS, "QLinearAdd", |n| {
        wrap(n, "Add", Layout::Fixed(&[(0, 1, 2), (3, 4, 5)], (6, 7)))
    });
    r.add_domain(MS, "QLinearMul", |n| {
        wrap(n, "Mul", Layout::Fixed(&[(0, 1, 2), (3, 4, 5)], (6, 7)))
    });
    // [X, X_scale, X_zero_point, Y_scale, Y_zero_point]
    r.add_domain(MS, "QLinearSigmoid", |n| {
        wrap(n, "Sigmoid", Layout::Fixed(&[(0, 1, 2)], (3, 4)))
    });
    // [X, X_scale, X_zero_point, Y_scale, Y_zero_point]; attributes `axis` and `opset` (the opset
    // of the Softmax it replaced: before 13 the axes from `axis` on are flattened into one).
    r.add_domain(MS, "QLinearSoftmax", |n| {
        wrap(n, "Softmax", Layout::Fixed(&[(0, 1, 2)], (3, 4)))
    });
    r.add_domain(MS, "QLinearLeakyRelu", |n| {
        wrap(n, "LeakyRelu", Layout::Fixed(&[(0, 1, 2)], (3, 4)))
    });
    r.add_domain(MS, "QLinearGlobalAveragePool", |n| {
        wrap(n, "GlobalAveragePool", Layout::Fixed(&[(0, 1, 2)], (3, 4)))
    });
    r.add_domain(MS, "QLinearAveragePool", |n| {
        wrap(n, "AveragePool", Layout::Fixed(&[(0, 1, 2)], (3, 4)))
    });
    // [Y_scale, Y_zero_point, (X, X_scale, X_zero_point)...]
    r.add_domain(MS, "QLinearConcat", |n| wrap(n, "Concat", Layout::Concat));
    r.add_domain(MS, "QGemm", qgemm);
}

/// `com.microsoft::QGemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C?, y_scale?,
/// y_zero_point?)`, attributes `alpha`, `transA`, `transB`: `Y = alpha * (A' B' + C')` (as onnxruntime
/// computes it; its schema text reads `alpha * A' B' + C'`) with `A'`, `B'`
/// the dequantized operands (`b_scale`/`b_zero_point` per tensor or one per output column), `C'` the
/// int32 bias times `a_scale * b_scale`; quantized with `y_scale`/`y_zero_point` when given, f32
/// otherwise. The product runs in f32 on the dequantized values (exact integers times the scales).
fn qgemm(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let alpha = n.attr_f("alpha", 1.0)?;
    let (ta, tb) = (n.attr_i("transA", 0)? != 0, n.attr_i("transB", 0)? != 0);
    let given = |i: usize| n.node.inputs.get(i).copied().flatten().is_some();
    let cacheable =
        n.const_input(3).is_some() && n.const_input(4).is_some() && (!given(5) || n.const_input(5).is_some());
    let cached: std::sync::OnceLock<(Vec<f32>, candle_core::Tensor)> = std::sync::OnceLock::new();
    Ok(kernel(move |_, ins| {
        let (a, b) = (tin(ins, 0)?, tin(ins, 3)?);
        for (i, t) in [(0, a), (3, b)] {
            if !matches!(t.dtype(), DType::U8 | DType::I8) || t.rank() != 2 {
                bail!(
                    "QGemm input {i} must be a 2-D uint8 or int8 matrix, got {} {:?}",
                    t.dtype(),
                    t.dims()
                );
            }
        }
        let (sa, za) = params(ins, 1, 2, a.dtype())?;
        let af = dequantize(ins, (0, 1, 2), sa, za)?;
        let af = if ta { af.t()? } else { af };
        // B's scale and zero point: one value, or one per output column (B's axis 1, or 0 when transposed).
        // A constant B (with constant scale and zero point) is dequantized on the first call only.
        let (sb, bf) = match cached.get() {
            Some(v) => v.clone(),
            None => {
                let v = dequantize_b(ins, b, tb)?;
                if cacheable {
                    let _ = cached.set(v.clone());
                }
                v
            }
        };
        let (n_cols, dev) = (sb.len(), b.candle().device().clone());
        if af.dims()[1] != bf.dims()[0] {
            bail!("QGemm shapes {:?} and {:?} do not multiply", af.dims(), bf.dims());
        }
        let mut y = af.contiguous()?.matmul(&bf)?;
        if let Some(c) = tin_opt(ins, 6)? {
            if c.dtype() != DType::I32 {
                bail!("QGemm bias C must be int32, got {}", c.dtype());
            }
            let scale: Vec<f32> = sb.iter().map(|s| sa * s).collect();
            let cf = c.candle().to_dtype(CDType::F32)?;
            let cf = cf.broadcast_mul(&candle_core::Tensor::from_vec(scale, n_cols, &dev)?)?;
            y = y.broadcast_add(&cf)?;
        }
        // alpha scales the bias too (onnxruntime's QGemm: `alpha * (A' B' + C')`).
        if alpha != 1.0 {
            y = y.affine(alpha as f64, 0.0)?;
        }
        match tin_opt(ins, 7)? {
            None => out1(Tensor::new(y, DType::F32)?),
            Some(_) => {
                let qdt = match tin_opt(ins, 8)? {
                    Some(z) => z.dtype(),
                    None => DType::U8,
                };
                let (sy, zy) = params(ins, 7, 8, qdt)?;
                out1(quantize(&y, sy, zy, qdt)?)
            }
        }
    }))
}

/// QGemm's B as f32 `[K, N]` (transposed when `transB`), `(B - b_zero_point) * b_scale` per column,
/// with the per-column scales.
fn dequantize_b(ins: &[Option<&Value>], b: &Tensor, tb: bool) -> Result<(Vec<f32>, candle_core::Tensor)> {
    let n_cols = if tb { b.dims()[0] } else { b.dims()[1] };
    let sb = tin(ins, 4)?.to_f64_vec()?;
    let zb = match tin_opt(ins, 5)? {
        Some(z) if z.dtype() != b.dtype() => bail!("b_zero_point is {}, B is {}", z.dtype(), b.dtype()),
        Some(z) => z.to_f64_vec()?,
        None => vec![0.0],
    };
    let per_col = |v: &[f64], what: &str| -> Result<Vec<f32>> {
        match v.len() {
            1 => Ok(vec![v[0] as f32; n_cols]),
            l if l == n_cols => Ok(v.iter().map(|&x| x as f32).collect()),
            l => bail!("{what} has {l} values for {n_cols} output columns"),
        }
    };
    let (sb, zb) = (per_col(&sb, "b_scale")?, per_col(&zb, "b_zero_point")?);
    if sb.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        bail!("b_scale must be positive and finite");
    }
    let dev = b.candle().device().clone();
    let bq = b.candle().to_dtype(CDType::F32)?;
    let bq = if tb { bq.t()?.contiguous()? } else { bq };
    let zbv = candle_core::Tensor::from_vec(zb, (1, n_cols), &dev)?;
    let sbv = candle_core::Tensor::from_vec(sb.clone(), (1, n_cols), &dev)?;
    Ok((sb, bq.broadcast_sub(&zbv)?.broadcast_mul(&sbv)?))
}

/// `(q - zp) * scale` as f32 for the operand at input `d` with its scale and zero point at `s`
/// and `z` (already checked by [`params`], which gave `scale` and `zp`): DequantizeLinear's one-pass
/// kernel on the CPU, the same arithmetic through candle elsewhere.
fn dequantize(
    ins: &[Option<&Value>],
    (d, s, z): (usize, usize, usize),
    scale: f32,
    zp: i32,
) -> Result<candle_core::Tensor> {
    let x = tin(ins, d)?;
    if let Some(t) = dequantize_8bit_f32(x, tin(ins, s)?, tin_opt(ins, z)?, 1)? {
        return Ok(t.candle().clone());
    }
    let mut f = x.candle().to_dtype(CDType::F32)?;
    if zp != 0 {
        f = f.affine(1.0, -(zp as f64))?;
    }
    Ok(f.affine(scale as f64, 0.0)?)
}

/// Where a node's quantized inputs and output parameters are.
#[derive(Clone, Copy)]
enum Layout {
    /// `(data, scale, zero point)` input positions of each quantized operand, then the output's
    /// `(scale, zero point)` positions.
    Fixed(&'static [(usize, usize, usize)], (usize, usize)),
    /// `Y_scale, Y_zero_point`, then one `(X, X_scale, X_zero_point)` triple per input.
    Concat,
}

impl Layout {
    fn operands(self, num_inputs: usize) -> Vec<(usize, usize, usize)> {
        match self {
            Layout::Fixed(ops, _) => ops.to_vec(),
            Layout::Concat => (2..num_inputs).step_by(3).map(|i| (i, i + 1, i + 2)).collect(),
        }
    }
    fn output(self) -> (usize, usize) {
        match self {
            Layout::Fixed(_, out) => out,
            Layout::Concat => (0, 1),
        }
    }
}

fn wrap(n: &NodeCtx, float_op: &'static str, layout: Layout) -> Result<Box<dyn OpKernel>> {
    let factory = super::Registry::global()
        .get("", float_op)
        .ok_or_else(|| n.err(format!("no {float_op} kernel")))?;
    let inner = if float_op == "Softmax" {
        // The float Softmax of the opset the quantized node records.
        let opset = n.attr_i("opset", 13)?;
        factory(&NodeCtx {
            node: n.node,
            graph: n.graph,
            opset,
            options: n.options,
            subplans: Default::default(),
            consumed: Default::default(),
            held: Default::default(),
            packs: n.packs.clone(),
        })?
    } else {
        factory(n)?
    };
    // The pools of ONNX Runtime's NHWC transformer: the channel axis last.
    let channels_last = n.attr_i("channels_last", 0)? != 0;
    if channels_last && !float_op.ends_with("Pool") {
        return Err(n.err("channels_last applies to the pools only"));
    }
    let num_inputs = n.num_inputs();
    if let Layout::Concat = layout {
        if num_inputs < 5 || !(num_inputs - 2).is_multiple_of(3) {
            return Err(n.err(format!(
                "QLinearConcat takes Y_scale, Y_zero_point and (X, X_scale, X_zero_point) triples, got {num_inputs} inputs"
            )));
        }
    }
    let operands = layout.operands(num_inputs);
    let (ys, yz) = layout.output();
    // Element-wise unary ops map each of the 256 input codes to one output code: a table, computed
    // by the general path below on the 256 codes, for the scales and zero points of the call.
    let lut = matches!(float_op, "Sigmoid" | "LeakyRelu");
    let pair = match operands.as_slice() {
        [a, b] => Some((*a, *b)),
        _ => None,
    };
    let table: std::sync::Mutex<Option<(LutKey, Vec<i32>)>> = std::sync::Mutex::new(None);
    let general = move |cx: &super::RunCx, ins: &[Option<&Value>]| -> Result<Tensor> {
        let mut qdt = None;
        let mut deq = Vec::with_capacity(operands.len());
        for &(d, s, z) in &operands {
            let x = tin(ins, d)?;
            if !matches!(x.dtype(), DType::U8 | DType::I8) {
                bail!("input {d} is {}; the QLinear operators take uint8 or int8", x.dtype());
            }
            if qdt.is_some_and(|t| t != x.dtype()) {
                bail!(
                    "input {d} is {}, input {} is {}",
                    x.dtype(),
                    operands[0].0,
                    qdt.unwrap_or(x.dtype())
                );
            }
            qdt = Some(x.dtype());
            let (scale, zp) = params(ins, s, z, x.dtype())?;
            let mut f = dequantize(ins, (d, s, z), scale, zp)?;
            if channels_last && f.rank() >= 3 {
                f = to_channels_first(&f)?;
            }
            deq.push(Value::Tensor(Tensor::new(f, DType::F32)?));
        }
        let qdt = qdt.unwrap_or(DType::U8);
        let refs: Vec<Option<&Value>> = deq.iter().map(Some).collect();
        let out = inner.run(cx, &refs)?;
        let y = match out.into_iter().next() {
            Some(Value::Tensor(t)) => t,
            _ => bail!("the {float_op} kernel gave no tensor"),
        };
        let (scale, zp) = params(ins, ys, yz, qdt)?;
        let mut y = y.candle().to_dtype(CDType::F32)?;
        if channels_last && y.rank() >= 3 {
            y = to_channels_last(&y)?;
        }
        quantize(&y, scale, zp, qdt)
    };
    Ok(kernel(move |cx, ins| {
        if lut {
            let x = tin(ins, 0)?;
            if matches!(x.dtype(), DType::U8 | DType::I8) && x.device().is_cpu() {
                let (xs, xz) = params(ins, 1, 2, x.dtype())?;
                let (ys_, yz_) = params(ins, ys, yz, x.dtype())?;
                let key = (x.dtype() == DType::U8, xs.to_bits(), xz, ys_.to_bits(), yz_);
                let mut guard = table.lock().unwrap_or_else(|e| e.into_inner());
                if guard.as_ref().is_none_or(|(k, _)| *k != key) {
                    let codes = code_tensor(x.dtype(), x.device())?;
                    let code_value = Value::Tensor(codes);
                    let mut code_ins = ins.to_vec();
                    code_ins[0] = Some(&code_value);
                    let t = general(cx, &code_ins)?
                        .to_i64_vec()?
                        .into_iter()
                        .map(|v| v as i32)
                        .collect();
                    *guard = Some((key, t));
                }
                let t = &guard.as_ref().expect("table built above").1;
                return out1(lookup(x, t)?);
            }
        }
        if let Some((a, b)) = pair {
            if let Some(y) = binary(float_op, ins, a, b, (ys, yz))? {
                return out1(y);
            }
        }
        if float_op == "GlobalAveragePool" {
            if let Some(y) = global_average_codes(ins, channels_last)? {
                return out1(y);
            }
        }
        out1(general(cx, ins)?)
    }))
}

/// What a unary table depends on: signedness, the input's and output's scale bits and zero points.
type LutKey = (bool, u32, i32, u32, i32);

/// The 256 codes of an 8-bit type in storage order (u8 0..=255; i8 -128..=127, index `code + 128`).
fn code_tensor(dt: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let t = match dt {
        DType::U8 => candle_core::Tensor::from_vec((0..=255u8).collect::<Vec<_>>(), 256, dev)?,
        _ => candle_core::Tensor::from_vec((-128..=127i16).collect::<Vec<_>>(), 256, dev)?,
    };
    Tensor::new(t.to_dtype(crate::tensor::storage_dtype(dt)?)?, dt)
}

/// `table[code]` for every element of `x` (the table indexed as [`code_tensor`] orders the codes).
fn lookup(x: &Tensor, table: &[i32]) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let t = match x.dtype() {
        DType::U8 => {
            // The table's codes are in u8's range (they are QuantizeLinear outputs).
            let bytes: [u8; 256] = std::array::from_fn(|i| table.get(i).copied().unwrap_or(0) as u8);
            let map = |src: &[u8]| src.iter().map(|&c| bytes[c as usize]).collect::<Vec<u8>>();
            let v = match crate::fastmath::with_u8(x.candle(), map) {
                Some(v) => v,
                None => map(&x.candle().flatten_all()?.to_vec1::<u8>()?),
            };
            candle_core::Tensor::from_vec(v, dims, x.device())?
        }
        _ => {
            let codes: [i16; 256] = std::array::from_fn(|i| table.get(i).copied().unwrap_or(0) as i16);
            let map = |src: &[i16]| {
                src.iter()
                    .map(|&c| codes[(c as i32 + 128).clamp(0, 255) as usize])
                    .collect::<Vec<i16>>()
            };
            let v = match crate::fastmath::with_i16(x.candle(), map) {
                Some(v) => v,
                None => map(&x.candle().flatten_all()?.to_vec1::<i16>()?),
            };
            candle_core::Tensor::from_vec(v, dims, x.device())?
        }
    };
    Tensor::new(t.to_dtype(crate::tensor::storage_dtype(x.dtype())?)?, x.dtype())
}

/// QLinearAdd / QLinearMul in one pass on the CPU when both operands have one type and the smaller
/// one's shape is the larger one's leading dims followed by ones (equal shapes, a scalar, a
/// `[N, C, 1, 1]` scale over `[N, C, H, W]`); `None` for anything else. Mul: the general path's
/// arithmetic per element (`(q - zp) * scale` in f32, the f32 op, the output quantized); Add: ONNX
/// Runtime's (scale ratios and fused multiply-adds, see `BinaryRows::body`).
fn binary(
    op: &str,
    ins: &[Option<&Value>],
    (da, sa, za): (usize, usize, usize),
    (db, sb, zb): (usize, usize, usize),
    (ys, yz): (usize, usize),
) -> Result<Option<Tensor>> {
    let mul = match op {
        "Mul" => true,
        "Add" => false,
        _ => return Ok(None),
    };
    let (a, b) = (tin(ins, da)?, tin(ins, db)?);
    let qdt = a.dtype();
    if !matches!(qdt, DType::U8 | DType::I8) || b.dtype() != qdt || !a.device().is_cpu() || !b.device().is_cpu() {
        return Ok(None);
    }
    // The larger operand, and how many of its elements (a span) each value of the smaller one,
    // broadcast over the larger one's leading dims, covers.
    // onnxruntime swaps a scalar first input to the second place (Add and Mul commute).
    let big_first = a.elem_count() >= b.elem_count() && !(a.elem_count() == 1 && b.elem_count() == 1);
    let (big, small, big_ops, small_ops) = if big_first {
        (a, b, (sa, za), (sb, zb))
    } else {
        (b, a, (sb, zb), (sa, za))
    };
    let bd = big.dims();
    if small.rank() > bd.len() {
        return Ok(None);
    }
    // The smaller shape left-padded with ones to the larger one's rank.
    let sd: Vec<usize> = std::iter::repeat_n(1, bd.len() - small.rank())
        .chain(small.dims().iter().copied())
        .collect();
    let p = sd.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    if sd[..p].iter().zip(&bd[..p]).any(|(&s, &b)| s != b && s != 1) {
        return Ok(None);
    }
    let inner: usize = bd[p..].iter().product();
    if inner == 0 {
        return Ok(None);
    }
    let ((s1, z1), (s2, z2)) = (
        params(ins, big_ops.0, big_ops.1, qdt)?,
        params(ins, small_ops.0, small_ops.1, qdt)?,
    );
    let (sy, zy) = params(ins, ys, yz, qdt)?;
    let k = BinaryRows {
        mul,
        big_first,
        scalar_small: small.elem_count() == 1,
        inner,
        big: (s1, z1 as f32),
        small: (s2, z2 as f32),
        out: (sy, zy as f32),
        range: if qdt == DType::U8 {
            (0.0, 255.0)
        } else {
            (-128.0, 127.0)
        },
    };
    let dims = bd.to_vec();
    // The codes as f32 (converted in one pass each: faster here than converting in the loop).
    let codes = |t: &Tensor| -> Result<Vec<f32>> {
        let flat = t.candle().flatten_all()?;
        Ok(match qdt {
            DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(f32::from).collect(),
            // i8 is stored widened to i16.
            _ => flat.to_vec1::<i16>()?.into_iter().map(f32::from).collect(),
        })
    };
    // One value of the smaller operand per span (repeated where it broadcasts over leading dims).
    // `[N, 1, .., 1, C]` over `[N, .., C]` (a channels-last squeeze-excite scale): its rows of C
    // repeated for every pixel.
    let r = bd.len();
    let trailing = r >= 3 && p == r && sd[1..r - 1].iter().all(|&d| d == 1) && (sd[0] == bd[0] || sd[0] == 1);
    let w = if sd[..p] == bd[..p] {
        codes(small)?
    } else if trailing {
        let (c, rows) = (bd[r - 1], bd[1..r - 1].iter().product::<usize>());
        let rows_of_c = codes(small)?;
        let mut w = Vec::with_capacity(big.elem_count());
        for n in 0..bd[0] {
            let row = &rows_of_c[(n % sd[0]) * c..][..c];
            for _ in 0..rows {
                w.extend_from_slice(row);
            }
        }
        w
    } else {
        let t = small.candle().reshape(&sd[..p])?.broadcast_as(&bd[..p])?.contiguous()?;
        codes(&Tensor::new(t, qdt)?)?
    };
    let x = codes(big)?;
    let t = match qdt {
        DType::U8 => candle_core::Tensor::from_vec(k.run::<u8>(&x, &w), dims, big.device())?,
        _ => candle_core::Tensor::from_vec(k.run::<i16>(&x, &w), dims, big.device())?,
    };
    Ok(Some(Tensor::new(t.to_dtype(crate::tensor::storage_dtype(qdt)?)?, qdt)?))
}

/// QLinearGlobalAveragePool of 8-bit codes on the CPU, `[N, C, ...]` or (`channels_last`)
/// `[N, ..., C]`, as ONNX Runtime computes it (MLAS): each channel's codes summed exactly in
/// integers, less the input zero point times the pixel count, times `x_scale / y_scale / pixels` in
/// f32, rounded half to even, plus the output zero point, saturated. `None` for other inputs.
fn global_average_codes(ins: &[Option<&Value>], channels_last: bool) -> Result<Option<Tensor>> {
    let x = tin(ins, 0)?;
    let (qdt, d) = (x.dtype(), x.dims().to_vec());
    if !matches!(qdt, DType::U8 | DType::I8) || !x.device().is_cpu() || d.len() < 3 {
        return Ok(None);
    }
    let (nb, c) = (d[0], if channels_last { d[d.len() - 1] } else { d[1] });
    let hw: usize = if channels_last {
        d[1..d.len() - 1].iter().product()
    } else {
        d[2..].iter().product()
    };
    if nb * c * hw == 0 {
        return Ok(None);
    }
    let ((xs, xz), (ys, yz)) = (params(ins, 1, 2, qdt)?, params(ins, 3, 4, qdt)?);
    let codes: Vec<i32> = {
        let flat = x.candle().flatten_all()?;
        match qdt {
            DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(i32::from).collect(),
            // i8 is stored widened to i16.
            _ => flat.to_vec1::<i16>()?.into_iter().map(i32::from).collect(),
        }
    };
    let mut sums = vec![0i64; nb * c];
    for (n, img) in codes.chunks_exact(c * hw).enumerate() {
        let out = &mut sums[n * c..(n + 1) * c];
        if channels_last {
            for px in img.chunks_exact(c) {
                out.iter_mut().zip(px).for_each(|(s, &v)| *s += v as i64);
            }
        } else {
            for (s, plane) in out.iter_mut().zip(img.chunks_exact(hw)) {
                *s = plane.iter().map(|&v| v as i64).sum();
            }
        }
    }
    let scale = xs / ys / hw as f32;
    let (lo, hi) = if qdt == DType::U8 {
        (0.0, 255.0)
    } else {
        (-128.0, 127.0)
    };
    #[allow(clippy::manual_clamp)]
    let q: Vec<f64> = sums
        .iter()
        .map(|&s| {
            (((s - xz as i64 * hw as i64) as f32 * scale).round_ties_even() + yz as f32)
                .max(lo)
                .min(hi) as f64
        })
        .collect();
    let mut dims = vec![1usize; d.len()];
    dims[0] = nb;
    if channels_last {
        dims[d.len() - 1] = c;
    } else {
        dims[1] = c;
    }
    Ok(Some(quantized_tensor(&q, dims, qdt, x.device())?))
}

/// A per-tensor scale (one positive finite value) and zero point (one value of `qdt`, default 0).
fn params(ins: &[Option<&Value>], s: usize, z: usize, qdt: DType) -> Result<(f32, i32)> {
    let sv = tin(ins, s)?.to_f64_vec()?;
    let [scale] = sv.as_slice() else {
        bail!("scale (input {s}) must be one value, got {}", sv.len());
    };
    let scale = *scale as f32;
    if !(scale.is_finite() && scale > 0.0) {
        bail!("scale (input {s}) must be positive and finite, got {scale}");
    }
    let zp = match tin_opt(ins, z)? {
        None => 0,
        Some(t) => {
            if t.dtype() != qdt {
                bail!("zero point (input {z}) is {}, the data {qdt}", t.dtype());
            }
            let zv = t.to_f64_vec()?;
            let [zp] = zv.as_slice() else {
                bail!("zero point (input {z}) must be one value, got {}", zv.len());
            };
            *zp as i32
        }
    };
    Ok((scale, zp))
}

/// `saturate(round_half_even(y / scale) + zp)` as `qdt`, QuantizeLinear's formula (a NaN gives the
/// range's low end, as ONNX Runtime's max-then-min clamp does): uint8 through QuantizeLinear's kernel.
fn quantize(y: &candle_core::Tensor, scale: f32, zp: i32, qdt: DType) -> Result<Tensor> {
    let v = y.flatten_all()?.to_vec1::<f32>()?;
    let dims = y.dims().to_vec();
    if qdt == DType::U8 {
        let mut q = vec![0u8; v.len()];
        crate::fastmath::quantize_u8(&v, scale, zp as f32, &mut q);
        return Tensor::new(candle_core::Tensor::from_vec(q, dims, y.device())?, DType::U8);
    }
    // `max` then `min` (not `clamp`): a NaN becomes -128.
    #[allow(clippy::manual_clamp)]
    let q: Vec<f64> = v
        .iter()
        .map(|&x| ((x / scale).round_ties_even() + zp as f32).max(-128.0).min(127.0) as f64)
        .collect();
    quantized_tensor(&q, dims, qdt, y.device())
}

/// `[N, ..., C]` to `[N, C, ...]`.
fn to_channels_first(t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let r = t.rank();
    let mut perm: Vec<usize> = vec![0, r - 1];
    perm.extend(1..r - 1);
    Ok(t.permute(perm)?.contiguous()?)
}

/// `[N, C, ...]` to `[N, ..., C]`.
fn to_channels_last(t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let r = t.rank();
    let mut perm: Vec<usize> = vec![0];
    perm.extend(2..r);
    perm.push(1);
    Ok(t.permute(perm)?.contiguous()?)
}

/// One pass of [`binary`]: each element of the smaller operand `w` covers `inner` consecutive
/// elements of the larger `x` (both as f32 codes).
struct BinaryRows {
    mul: bool,
    /// Whether the larger operand is the node's first input (ONNX Runtime's operand order).
    big_first: bool,
    /// Whether the smaller operand is one value (onnxruntime's scalar kernel) rather than broadcast.
    scalar_small: bool,
    inner: usize,
    /// Scale and zero point of the larger operand, the smaller one and the output.
    big: (f32, f32),
    small: (f32, f32),
    out: (f32, f32),
    /// The output type's range.
    range: (f32, f32),
}

/// An 8-bit output code in Kiln's storage type (u8, or i8 widened to i16).
trait Code: Copy + Default {
    /// `v` is a whole number in the type's range (callers clamp it with `max`/`min`, which also
    /// turn a NaN into the range's low end).
    fn from_f32(v: f32) -> Self;
}
impl Code for u8 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        debug_assert!((0.0..=255.0).contains(&v));
        // SAFETY: `v` is finite and in 0..=255 (the trait's contract), so it fits i32; the
        // unchecked conversion vectorizes where `as` (saturating, NaN to 0) does not.
        unsafe { v.to_int_unchecked::<i32>() as u8 }
    }
}
impl Code for i16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        debug_assert!((-128.0..=127.0).contains(&v));
        // SAFETY: as above, `v` is finite and in -128..=127.
        unsafe { v.to_int_unchecked::<i32>() as i16 }
    }
}

impl BinaryRows {
    fn run<T: Code>(&self, x: &[f32], w: &[f32]) -> Vec<T> {
        let mut y = vec![T::default(); x.len()];
        #[cfg(target_arch = "x86_64")]
        if crate::fastmath::has_avx2_fma() {
            // SAFETY: the CPU has the features each build is compiled for (checked here).
            unsafe {
                if crate::sgemm::use_avx512() {
                    self.run_avx512(x, w, &mut y)
                } else {
                    self.run_avx2(x, w, &mut y)
                }
            };
            return y;
        }
        self.body(x, w, &mut y);
        y
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn run_avx512<T: Code>(&self, x: &[f32], w: &[f32], y: &mut [T]) {
        self.body(x, w, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2<T: Code>(&self, x: &[f32], w: &[f32], y: &mut [T]) {
        self.body(x, w, y)
    }

    #[inline(always)]
    fn body<T: Code>(&self, x: &[f32], w: &[f32], y: &mut [T]) {
        let ((s1, z1), (s2, z2), (sy, zy), (lo, hi)) = (self.big, self.small, self.out, self.range);
        if !self.mul {
            // ONNX Runtime's QLinearAdd arithmetic (MLAS `qladd`), so the codes agree where the sum
            // falls on a rounding tie (a constant operand often puts it exactly on one):
            // `y = a * (sa / sy) + (b * (sb / sy) + (zy - (sa / sy * za + sb / sy * zb)))` with fused
            // multiply-adds (the first input's term added last), rounded half to even and
            // saturated. A scalar operand is folded into the constant first (a multiply and an
            // add), as MLAS's scalar kernel does; a broadcast one goes through the two-vector form.
            let (ra, rb) = (s1 / sy, s2 / sy);
            let fixed = zy - (ra * z1 + rb * z2);
            #[allow(clippy::manual_clamp)]
            let code = |v: f32| T::from_f32(v.round_ties_even().max(lo).min(hi));
            let both = |v: f32, wv: f32| {
                code(if self.big_first {
                    v.mul_add(ra, wv.mul_add(rb, fixed))
                } else {
                    wv.mul_add(rb, v.mul_add(ra, fixed))
                })
            };
            if self.scalar_small {
                let f = fixed + w[0] * rb;
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = code(v.mul_add(ra, f));
                }
            } else if self.inner == 1 {
                for (o, (&v, &wv)) in y.iter_mut().zip(x.iter().zip(w)) {
                    *o = both(v, wv);
                }
            } else {
                for (ys, (xs, &wv)) in y.chunks_mut(self.inner).zip(x.chunks(self.inner).zip(w)) {
                    for (o, &v) in ys.iter_mut().zip(xs) {
                        *o = both(v, wv);
                    }
                }
            }
            return;
        }
        let mul = self.mul;
        let one = |v: f32, wv: f32| -> T {
            let (d, s) = ((v - z1) * s1, (wv - z2) * s2);
            let r = if mul { d * s } else { d + s };
            // `max` then `min`: a NaN becomes the range's low end, as `quantize` gives.
            #[allow(clippy::manual_clamp)]
            let q = ((r / sy).round_ties_even() + zy).max(lo).min(hi);
            T::from_f32(q)
        };
        if self.inner == 1 {
            // Equal shapes: element by element (a loop the compiler vectorizes).
            for (o, (&v, &wv)) in y.iter_mut().zip(x.iter().zip(w)) {
                *o = one(v, wv);
            }
            return;
        }
        for (ys, (xs, &wv)) in y.chunks_mut(self.inner).zip(x.chunks(self.inner).zip(w)) {
            for (o, &v) in ys.iter_mut().zip(xs) {
                *o = one(v, wv);
            }
        }
    }
}

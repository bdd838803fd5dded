//! Operator family `block_quant`: ONNX Runtime's block-quantized weight ops, as its LLM exports
//! (onnxruntime-genai int4) use them: `com.microsoft::MatMulNBits` (a MatMul whose constant right
//! operand is stored as 2/4/8-bit codes with one scale, and optionally one zero point, per block of
//! `block_size` values along K) and `com.microsoft::GatherBlockQuantized` (a Gather from such a table:
//! the int4 embedding).
//!
//! MatMulNBits with a constant 4-bit weight on the CPU keeps the codes ([`super::q4`]: half a byte
//! per value plus a scale and offset per block): products of up to [`Q4_MAX_ROWS`] rows (decode
//! steps) read the codes directly; larger ones expand the weight to f32 per call and run the packed
//! GEMM. Other bit widths (and other devices) are dequantized once, when the plan is built, into
//! the f32 panels of Kiln's packed GEMM (or a dense `[K, N]` tensor). A weight fed at run time is
//! dequantized per call. `accuracy_level` is
//! read and ignored: A is never quantized (ONNX Runtime's level 4 quantizes A to int8 per block,
//! which is why its results differ from an f32 product by ~1e-3 relative).

use candle_core::{CpuStorage, DType as CDType, Storage, Tensor as CT};
use kiln_graph::{DType, TensorData};
use rayon::prelude::*;

use std::sync::Arc;

use super::common::{elems, tin, tin_opt};
use super::matmul::{matmul, packed_matmul};
use super::q4::{Q4Weight, Q4_MAX_ROWS};
use super::{kernel, out1, NodeCtx, OpKernel, Registry, RunCx};
use crate::{bail, sgemm, Result, Tensor};

const MS: &str = "com.microsoft";

pub fn register(r: &mut Registry) {
    r.add_domain(MS, "MatMulNBits", matmul_nbits);
    r.add_domain(MS, "GatherBlockQuantized", gather_block_quantized);
}

/// Runs `f` on the bytes of a u8 tensor: borrowed from a contiguous CPU tensor, copied otherwise.
fn with_u8<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    if t.dtype() != DType::U8 {
        bail!("expected a uint8 tensor, found {}", t.dtype());
    }
    let c = t.candle();
    if c.device().is_cpu() {
        let (storage, layout) = c.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::U8(data)), Some((s, e))) = (&*storage, layout.contiguous_offsets()) {
            if let Some(bytes) = data.get(s..e) {
                return Ok(f(bytes));
            }
        }
    }
    let v = c.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1::<u8>()?;
    Ok(f(&v))
}

/// Float contents as f32 (f16/bf16/f64 converted; int4/uint4 tensors hold their values as f32).
fn to_f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.candle()
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(CDType::F32)?
        .to_vec1::<f32>()?)
}

/// Code `i` of a bit-packed stream (`bits` of 2, 4 or 8; low bits of each byte first).
#[inline]
fn code(bytes: &[u8], i: usize, bits: usize) -> i32 {
    let bit = i * bits;
    ((bytes[bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8) as i32
}

/// Zero points of MatMulNBits: the default `2^(bits-1)`, bit-packed uint8 codes (one row of
/// `ceil(k_blocks * bits / 8)` bytes per output column), or floats (`[N, k_blocks]`, A's dtype).
enum ZeroPoints<'a> {
    Default,
    Packed(&'a [u8]),
    Float(&'a [f32]),
}

/// MatMulNBits' attributes.
#[derive(Clone, Copy)]
struct NBits {
    k: usize,
    n: usize,
    bits: usize,
    block: usize,
    k_blocks: usize,
}

impl NBits {
    /// Bytes of one block of codes.
    fn blob(&self) -> usize {
        self.block * self.bits / 8
    }

    /// Bytes of one column's packed zero points.
    fn zp_row(&self) -> usize {
        (self.k_blocks * self.bits).div_ceil(8)
    }

    /// Checks B's and the scales' shapes: `Ok(false)` for an omitted projection (a packed B with a
    /// zero dimension, whose product is zero).
    fn check(&self, b_dims: &[usize], scales: usize) -> Result<bool> {
        let want = [self.n, self.k_blocks, self.blob()];
        if b_dims.len() == 3 && b_dims.contains(&0) {
            let kept = b_dims.iter().zip(&want).all(|(&d, &w)| d == 0 || d == w);
            if !kept {
                bail!("B has shape {b_dims:?}: an omitted projection keeps the other dims of {want:?}");
            }
            return Ok(false);
        }
        if b_dims != want {
            bail!(
                "B has shape {b_dims:?}, expected {want:?} (N, ceil(K / block_size), block_size * bits / 8) \
                 for K {}, N {}, bits {}, block_size {}",
                self.k,
                self.n,
                self.bits,
                self.block
            );
        }
        if scales != self.n * self.k_blocks {
            bail!(
                "scales has {scales} values, expected N * ceil(K / block_size) = {}",
                self.n * self.k_blocks
            );
        }
        Ok(true)
    }

    /// Checks the zero points' length against the weight's blocks.
    fn check_zero_points(&self, zp: &ZeroPoints) -> Result<()> {
        match zp {
            ZeroPoints::Packed(z) if z.len() != self.n * self.zp_row() => bail!(
                "uint8 zero_points has {} bytes, expected N * ceil(k_blocks * bits / 8) = {}",
                z.len(),
                self.n * self.zp_row()
            ),
            ZeroPoints::Float(z) if z.len() != self.n * self.k_blocks => bail!(
                "float zero_points has {} values, expected N * ceil(K / block_size) = {}",
                z.len(),
                self.n * self.k_blocks
            ),
            _ => Ok(()),
        }
    }

    /// The dequantized weight as `[N, K]` row-major: `w[n, k] = (code - zero_point) * scale`.
    fn dequantize(&self, b: &[u8], scales: &[f32], zp: ZeroPoints) -> Result<Vec<f32>> {
        let (k, kb, blob) = (self.k, self.k_blocks, self.blob());
        self.check_zero_points(&zp)?;
        let default_zp = (1i32 << (self.bits - 1)) as f32;
        let mut w = vec![0f32; self.n * k];
        w.par_chunks_mut(k.max(1)).enumerate().for_each(|(col, row)| {
            for blk in 0..kb {
                let scale = scales[col * kb + blk];
                let zero = match &zp {
                    ZeroPoints::Default => default_zp,
                    ZeroPoints::Packed(z) => code(&z[col * self.zp_row()..], blk, self.bits) as f32,
                    ZeroPoints::Float(z) => z[col * kb + blk],
                };
                let codes = &b[(col * kb + blk) * blob..(col * kb + blk + 1) * blob];
                let start = blk * self.block;
                let end = (start + self.block).min(k);
                for (i, out) in row[start..end].iter_mut().enumerate() {
                    *out = (code(codes, i, self.bits) as f32 - zero) * scale;
                }
            }
        });
        Ok(w)
    }
}

/// The weight of a MatMulNBits node in the form its product runs on.
enum Weight {
    /// 4-bit codes, read directly by few-row products (CPU).
    Q4(Arc<Q4Weight>),
    /// Packed panels for the CPU f32 GEMM.
    Packed(Arc<sgemm::PackedB>),
    /// Dense `[K, N]` f32 on the plan's device.
    Dense(CT),
    /// An omitted projection: the product is zero.
    Zero,
}

impl Weight {
    /// Bytes this form of the weight holds.
    fn held_bytes(&self) -> usize {
        match self {
            Weight::Q4(q) => q.bytes(),
            Weight::Packed(p) => p.bytes(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Zero => 0,
        }
    }
}

/// Dequantizes B (with the node's scales and zero points) from tensors: `None` for a zero weight.
fn weight_from(cfg: &NBits, b: &Tensor, scales: &Tensor, zp: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    if !scales.dtype().is_float() {
        bail!("scales must be a float tensor, found {}", scales.dtype());
    }
    if !cfg.check(b.dims(), scales.elem_count())? {
        return Ok(None);
    }
    let sv = to_f32s(scales)?;
    let w = with_u8(b, |bytes| match zp {
        None => cfg.dequantize(bytes, &sv, ZeroPoints::Default),
        Some(z) if z.dtype() == DType::U8 => with_u8(z, |zb| cfg.dequantize(bytes, &sv, ZeroPoints::Packed(zb)))?,
        Some(z) if z.dtype().is_float() => cfg.dequantize(bytes, &sv, ZeroPoints::Float(&to_f32s(z)?)),
        Some(z) => bail!("zero_points must be uint8 or float, found {}", z.dtype()),
    })??;
    Ok(Some(w))
}

/// A constant 4-bit weight kept as codes (`None` for an omitted projection).
fn q4_from(cfg: &NBits, b: &Tensor, scales: &Tensor, zp: Option<&Tensor>) -> Result<Option<Q4Weight>> {
    if !scales.dtype().is_float() {
        bail!("scales must be a float tensor, found {}", scales.dtype());
    }
    if !cfg.check(b.dims(), scales.elem_count())? {
        return Ok(None);
    }
    let sv = to_f32s(scales)?;
    let kb = cfg.k_blocks;
    let build = |codes: &[u8], zero: &dyn Fn(usize, usize) -> f32| {
        Q4Weight::new(cfg.k, cfg.n, cfg.block, codes, &sv, zero)
            .ok_or_else(|| crate::RuntimeError::msg("internal: 4-bit weight layout"))
    };
    let w = with_u8(b, |bytes| match zp {
        None => build(bytes, &|_, _| 8.0),
        Some(z) if z.dtype() == DType::U8 => with_u8(z, |zb| {
            cfg.check_zero_points(&ZeroPoints::Packed(zb))?;
            build(bytes, &|col, blk| code(&zb[col * cfg.zp_row()..], blk, 4) as f32)
        })?,
        Some(z) if z.dtype().is_float() => {
            let zv = to_f32s(z)?;
            cfg.check_zero_points(&ZeroPoints::Float(&zv))?;
            build(bytes, &|col, blk| zv[col * kb + blk])
        }
        Some(z) => bail!("zero_points must be uint8 or float, found {}", z.dtype()),
    })??;
    Ok(Some(w))
}

/// The `[N, K]` weight in the form the kernel multiplies by, for the plan's device.
fn prepare(n: &NodeCtx, cfg: &NBits, w: Option<Vec<f32>>) -> Result<Weight> {
    let Some(w) = w else { return Ok(Weight::Zero) };
    if n.options.device.is_cpu() && sgemm::available() {
        // [N, K] storage read as the [K, N] operand: element (p, j) at j * K + p.
        let view = sgemm::MatRef {
            data: &w,
            rows: cfg.k,
            cols: cfg.n,
            rs: 1,
            cs: cfg.k,
        };
        let packed = sgemm::PackedB::pack(view).map_err(|e| n.err(e.to_string()))?;
        return Ok(Weight::Packed(Arc::new(packed)));
    }
    Ok(Weight::Dense(
        CT::from_vec(w, (cfg.n, cfg.k), &n.options.device)?.t()?.contiguous()?,
    ))
}

/// A constant input as a runtime tensor on the host, for the plan-time dequantization.
fn host_const(n: &NodeCtx, i: usize) -> Option<Result<Tensor>> {
    n.const_input(i)
        .map(|d: &TensorData| Tensor::from_data(d, &candle_core::Device::Cpu))
}

fn matmul_nbits(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let need = |name: &str| -> Result<i64> {
        n.attr_i_opt(name)?
            .ok_or_else(|| n.err(format!("attribute '{name}' is required")))
    };
    let (k, nn, bits, block) = (need("K")?, need("N")?, n.attr_i("bits", 4)?, need("block_size")?);
    if k <= 0 || nn <= 0 {
        return Err(n.err(format!("K ({k}) and N ({nn}) must be positive")));
    }
    if ![2, 4, 8].contains(&bits) {
        return Err(n.err(format!("bits {bits} is not supported (2, 4 or 8)")));
    }
    if block < 16 || block & (block - 1) != 0 {
        return Err(n.err(format!("block_size {block} must be a power of two >= 16")));
    }
    if n.attr_i("weight_prepacked", 0)? != 0 {
        return Err(n.err("weight_prepacked (a CUDA-specific layout) is not supported"));
    }
    if n.has_input(4) {
        return Err(n.err("input 4 (g_idx, deprecated) is not supported"));
    }
    let (k, nn, block) = (k as usize, nn as usize, block as usize);
    let cfg = NBits {
        k,
        n: nn,
        bits: bits as usize,
        block,
        k_blocks: k.div_ceil(block),
    };
    // Dequantize once when B, the scales and the zero points are all constants.
    let zp_const = if n.has_input(3) { host_const(n, 3) } else { None };
    let constant = match (host_const(n, 1), host_const(n, 2)) {
        (Some(b), Some(s)) if zp_const.is_some() || !n.has_input(3) => {
            let zp = zp_const.transpose().map_err(|e| n.err(e.to_string()))?;
            let (b, s) = (
                b.map_err(|e| n.err(e.to_string()))?,
                s.map_err(|e| n.err(e.to_string()))?,
            );
            if cfg.bits == 4 && n.options.device.is_cpu() && sgemm::available() {
                let q = q4_from(&cfg, &b, &s, zp.as_ref()).map_err(|e| n.err(e.to_string()))?;
                Some(q.map_or(Weight::Zero, |q| Weight::Q4(Arc::new(q))))
            } else {
                let w = weight_from(&cfg, &b, &s, zp.as_ref()).map_err(|e| n.err(e.to_string()))?;
                Some(prepare(n, &cfg, w)?)
            }
        }
        _ => None,
    };
    if let Some(w) = &constant {
        // The kernel holds B, the scales and the zero points in its own form from here on.
        for i in 1..4 {
            n.consume_input(i);
        }
        n.note_held_bytes(w.held_bytes());
    }
    Ok(kernel(move |cx, ins| {
        let a = tin(ins, 0)?;
        let bias = tin_opt(ins, 5)?;
        let per_call;
        let weight = match &constant {
            Some(w) => w,
            None => {
                let (b, s, zp) = (tin(ins, 1)?, tin(ins, 2)?, tin_opt(ins, 3)?);
                per_call = match weight_from(&cfg, b, s, zp)? {
                    None => Weight::Zero,
                    Some(w) => Weight::Dense(CT::from_vec(w, (cfg.n, cfg.k), a.device())?.t()?.contiguous()?),
                };
                &per_call
            }
        };
        out1(run_nbits(cx, &cfg, a, weight, bias)?)
    }))
}

/// `A @ W (+ bias)` for MatMulNBits, in A's dtype (half precision computed in f32).
fn run_nbits(cx: &RunCx, cfg: &NBits, a: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let dt = a.dtype();
    if !dt.is_float() {
        bail!("A must be a float tensor, found {dt}");
    }
    let Some((&ka, batch)) = a.dims().split_last() else {
        bail!("A must have rank >= 1, got a scalar");
    };
    if ka != cfg.k {
        bail!("A has shape {:?}: its last dim must be K = {}", a.dims(), cfg.k);
    }
    if let Some(b) = bias {
        if b.dims() != [cfg.n] {
            bail!("bias has shape {:?}, expected [{}] (N)", b.dims(), cfg.n);
        }
        if !b.dtype().is_float() {
            bail!("bias must be a float tensor, found {}", b.dtype());
        }
    }
    let mut out_dims = batch.to_vec();
    out_dims.push(cfg.n);
    cx.check_alloc(elems(&out_dims), dt)?;
    let m = elems(batch) as usize;
    let bias_f32 = bias.map(to_f32s).transpose()?;
    // Products run on [M, K] f32 rows.
    let a2 = Tensor::new(a.candle().to_dtype(CDType::F32)?.reshape((m, cfg.k))?, DType::F32)?;
    let expanded;
    let w = match w {
        // Many rows: the packed f32 GEMM on the weight expanded for this call.
        Weight::Q4(q) if m > Q4_MAX_ROWS => {
            let nk = q.to_f32_nk();
            let view = sgemm::MatRef {
                data: &nk,
                rows: cfg.k,
                cols: cfg.n,
                rs: 1,
                cs: cfg.k,
            };
            expanded = Weight::Packed(Arc::new(
                sgemm::PackedB::pack(view).map_err(|e| crate::RuntimeError::msg(e.to_string()))?,
            ));
            &expanded
        }
        w => w,
    };
    let (y, biased) = match w {
        Weight::Zero => (CT::zeros((m, cfg.n), CDType::F32, a.device())?, false),
        Weight::Q4(q) => {
            let av = a2.candle().flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * cfg.n];
            q.matmul_rows(&av, m, bias_f32.as_deref(), &mut out);
            (CT::from_vec(out, (m, cfg.n), a.device())?, true)
        }
        Weight::Packed(p) => match packed_matmul(cx, &a2, p, bias_f32.as_deref(), sgemm::Activation::None)? {
            Some(y) => (y.into_candle(), true),
            None => bail!(
                "internal: the packed MatMulNBits weight does not take A of shape {:?}",
                a.dims()
            ),
        },
        Weight::Dense(wd) => {
            let wt = Tensor::new(wd.to_device(a.device())?, DType::F32)?;
            (matmul(cx, &a2, &wt)?.into_candle(), false)
        }
    };
    let y = match bias_f32 {
        Some(bv) if !biased => y.broadcast_add(&CT::from_vec(bv, cfg.n, y.device())?)?,
        _ => y,
    };
    let y = y.reshape(out_dims.as_slice())?;
    Tensor::new(y.to_dtype(crate::tensor::storage_dtype(dt)?)?, dt)
}

/// `com.microsoft::GatherBlockQuantized(data, indices, scales, zero_points?)`: Gather along
/// `gather_axis`, then dequantize the gathered values with the scale (and zero point) of their
/// block of `block_size` along `quantize_axis`: `(code - zero_point) * scale`, in the scales' dtype.
///
/// `data` is uint8 holding 2/4/8-bit codes packed along the last dim (then `gather_axis` is 0,
/// `quantize_axis` the last dim, the output's last dim `8 / bits` times data's, zero points packed
/// the same way, default `2^(bits-1)`), or int4/uint4 (any axes, default zero point 0). Indices out
/// of `[-s, s)` give zeros (ONNX Runtime's rule, unlike Gather). The FP8/FP4 forms are not supported.
fn gather_block_quantized(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let gather_axis = n.attr_i("gather_axis", 0)?;
    let quantize_axis = n.attr_i("quantize_axis", 1)?;
    let block = n.attr_i("block_size", 128)?;
    let bits = n.attr_i("bits", 4)?;
    if block < 16 || block & (block - 1) != 0 {
        return Err(n.err(format!("block_size {block} must be a power of two >= 16")));
    }
    if ![2, 4, 8].contains(&bits) {
        return Err(n.err(format!("bits {bits} is not supported (2, 4 or 8)")));
    }
    let cfg = GatherCfg {
        gather_axis,
        quantize_axis,
        block: block as usize,
        bits: bits as usize,
    };
    Ok(kernel(move |cx, ins| {
        let (data, indices, scales) = (tin(ins, 0)?, tin(ins, 1)?, tin(ins, 2)?);
        let zp = tin_opt(ins, 3)?;
        out1(cfg.run(cx, data, indices, scales, zp)?)
    }))
}

#[derive(Clone, Copy)]
struct GatherCfg {
    gather_axis: i64,
    quantize_axis: i64,
    block: usize,
    bits: usize,
}

/// The codes of GatherBlockQuantized's data (or zero points), by logical element index.
enum Codes<'a> {
    /// uint8 bytes holding `8 / bits` codes each.
    Packed(&'a [u8], usize),
    /// int4/uint4 values (Kiln holds them unpacked).
    Values(&'a [f32]),
}

impl Codes<'_> {
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Codes::Packed(b, bits) => code(b, i, *bits) as f32,
            Codes::Values(v) => v[i],
        }
    }
}

impl GatherCfg {
    fn run(&self, cx: &RunCx, data: &Tensor, indices: &Tensor, scales: &Tensor, zp: Option<&Tensor>) -> Result<Tensor> {
        let rank = data.rank();
        let axis = |a: i64, what: &str| -> Result<usize> {
            super::common::norm_axis(a, rank)
                .map_err(|_| crate::RuntimeError::msg(format!("{what} {a} is out of range for data of rank {rank}")))
        };
        let (ga, qa) = (
            axis(self.gather_axis, "gather_axis")?,
            axis(self.quantize_axis, "quantize_axis")?,
        );
        let packed = match data.dtype() {
            DType::U8 => {
                if ga != 0 || qa != rank - 1 {
                    bail!(
                        "uint8 data needs gather_axis 0 and quantize_axis the last dim ({}), got {ga} and {qa}",
                        rank - 1
                    );
                }
                if rank < 2 {
                    bail!("uint8 data must have rank >= 2 (gather and quantize axes differ), got {rank}");
                }
                true
            }
            DType::I4 | DType::U4 => {
                if self.bits != 4 {
                    bail!("int4/uint4 data needs bits 4, got {}", self.bits);
                }
                false
            }
            d => bail!("data must be uint8, int4 or uint4, found {d} (FP8/FP4 data is not supported)"),
        };
        if !matches!(indices.dtype(), DType::I32 | DType::I64) {
            bail!("indices must be int32 or int64, found {}", indices.dtype());
        }
        let sdt = scales.dtype();
        if !matches!(sdt, DType::F32 | DType::F16 | DType::BF16) {
            bail!("scales must be float, float16 or bfloat16, found {sdt}");
        }
        // Logical dims of data (the uint8 last dim holds 8 / bits codes per byte).
        let comps = if packed { 8 / self.bits } else { 1 };
        let mut ldims = data.dims().to_vec();
        ldims[rank - 1] *= comps;
        let nblocks = ldims[qa].div_ceil(self.block);
        if scales.rank() != rank {
            bail!("scales has rank {}, data {rank}", scales.rank());
        }
        for (i, (&s, &d)) in scales.dims().iter().zip(&ldims).enumerate() {
            let want = if i == qa { nblocks } else { d };
            if s != want {
                bail!(
                    "scales has shape {:?}, expected {want} along axis {i} (data's logical shape {ldims:?}, block_size {})",
                    scales.dims(),
                    self.block
                );
            }
        }
        if let Some(z) = zp {
            if z.dtype() != data.dtype() {
                bail!("zero_points has dtype {}, data {}", z.dtype(), data.dtype());
            }
            let ok = z.rank() == rank
                && z.dims()
                    .iter()
                    .zip(scales.dims())
                    .enumerate()
                    .all(|(i, (&zd, &sd))| match packed && i == qa {
                        true => zd == sd.div_ceil(comps),
                        false => zd == sd,
                    });
            if !ok {
                bail!(
                    "zero_points has shape {:?}, which does not match scales {:?}",
                    z.dims(),
                    scales.dims()
                );
            }
        }
        let idx = indices.to_i64_vec()?;
        let mut out_dims = ldims[..ga].to_vec();
        out_dims.extend_from_slice(indices.dims());
        out_dims.extend_from_slice(&ldims[ga + 1..]);
        cx.check_alloc(elems(&out_dims), sdt)?;

        let gather_block: usize = ldims[ga + 1..].iter().product();
        let gather_dim = ldims[ga];
        let gather_m: usize = ldims[..ga].iter().product();
        let quant_dim = ldims[qa];
        let quant_n: usize = ldims[qa + 1..].iter().product();
        let scale_full = nblocks * quant_n;
        let sv = to_f32s(scales)?;
        let default_zp = if packed { (1i32 << (self.bits - 1)) as f32 } else { 0.0 };
        let mut out = vec![0f32; gather_m * idx.len() * gather_block];
        let mut fill = |d: &Codes, z: Option<&Codes>| {
            out.par_chunks_mut(gather_block.max(1))
                .enumerate()
                .for_each(|(row, o)| {
                    let (m, j) = (row / idx.len().max(1), row % idx.len().max(1));
                    let g = idx[j];
                    if g < -(gather_dim as i64) || g >= gather_dim as i64 {
                        return; // zeros
                    }
                    let g = if g < 0 { g + gather_dim as i64 } else { g } as usize;
                    let base = (m * gather_dim + g) * gather_block;
                    for (i, v) in o.iter_mut().enumerate() {
                        let di = base + i;
                        let (x, y, zz) = (
                            di / (quant_dim * quant_n),
                            di % (quant_dim * quant_n) / quant_n,
                            di % quant_n,
                        );
                        let si = x * scale_full + y / self.block * quant_n + zz;
                        let zero = match z {
                            None => default_zp,
                            // Packed zero points: one row of ceil(blocks / comps) bytes per scale row.
                            Some(Codes::Packed(zb, bits)) => {
                                let (srow, q) = (si / nblocks, si % nblocks);
                                code(&zb[srow * nblocks.div_ceil(comps)..], q, *bits) as f32
                            }
                            Some(c) => c.get(si),
                        };
                        *v = (d.get(di) - zero) * sv[si];
                    }
                });
        };
        if packed {
            with_u8(data, |db| -> Result<()> {
                match zp {
                    None => fill(&Codes::Packed(db, self.bits), None),
                    Some(z) => with_u8(z, |zb| {
                        fill(&Codes::Packed(db, self.bits), Some(&Codes::Packed(zb, self.bits)))
                    })?,
                }
                Ok(())
            })??;
        } else {
            let dv = to_f32s(data)?;
            let zv = zp.map(to_f32s).transpose()?;
            fill(&Codes::Values(&dv), zv.as_deref().map(Codes::Values).as_ref());
        }
        let t = CT::from_vec(out, out_dims.as_slice(), data.device())?;
        Tensor::new(t.to_dtype(crate::tensor::storage_dtype(sdt)?)?, sdt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_unpack_low_bits_first() {
        let b = [0x21u8, 0xE4];
        assert_eq!((0..4).map(|i| code(&b, i, 4)).collect::<Vec<_>>(), [1, 2, 4, 14]);
        assert_eq!(
            (0..8).map(|i| code(&b, i, 2)).collect::<Vec<_>>(),
            [1, 0, 2, 0, 0, 1, 2, 3]
        );
        assert_eq!((0..2).map(|i| code(&b, i, 8)).collect::<Vec<_>>(), [0x21, 0xE4]);
    }

    #[test]
    fn dequantize_by_hand() {
        // K 20 in blocks of 16 (the second block half used), N 2, 4 bits.
        let cfg = NBits {
            k: 20,
            n: 2,
            bits: 4,
            block: 16,
            k_blocks: 2,
        };
        let mut b = vec![0u8; 2 * 2 * 8];
        b[0] = 0x9F; // column 0, block 0: codes 15, 9
        b[8] = 0x03; // column 0, block 1: code 3
        b[16] = 0x80; // column 1, block 0: codes 0, 8
        let scales = [0.5, 2.0, 1.0, 0.25];
        let w = cfg.dequantize(&b, &scales, ZeroPoints::Default).unwrap();
        assert_eq!(w.len(), 40);
        assert_eq!(&w[..2], &[3.5, 0.5]);
        assert_eq!(w[2], -4.0); // code 0, zero point 8, scale 0.5
        assert_eq!(w[16], -10.0); // (3 - 8) * 2
        assert_eq!(&w[20..22], &[-8.0, 0.0]);
        // Packed zero points: column 0 blocks (1, 2), column 1 blocks (0, 15).
        let zp = [0x21u8, 0xF0];
        let w = cfg.dequantize(&b, &scales, ZeroPoints::Packed(&zp)).unwrap();
        assert_eq!(&w[..2], &[7.0, 4.0]);
        assert_eq!(w[16], 2.0);
        assert_eq!(w[36], -3.75); // column 1, block 1: (0 - 15) * 0.25
        assert!(cfg.dequantize(&b, &scales, ZeroPoints::Packed(&zp[..1])).is_err());
    }
}

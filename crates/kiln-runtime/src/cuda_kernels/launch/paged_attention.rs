//! Launcher for `kernels/paged_attention.cu`: paged attention over one layer's K/V cache and the
//! write of a step's new K/V into their slots (vLLM's `paged_attention_v1` / `reshape_and_cache`).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::Tensor as CT;
use half::f16;

use super::{alloc, cuda_dev, i32_of, input, ptx, wrap, Kd, MAX_GRID_X};
use crate::cuda_kernels::{count_launch, PagedLayerKv, PagedMeta};
use crate::Result;

/// The parameters of `kiln_paged_attention_*` in `kernels/paged_attention.cu`, in order.
pub(crate) const PARAMS: &[&str] = &[
    "q",
    "k_cache",
    "v_cache",
    "out",
    "block_tables",
    "table_start",
    "context_lens",
    "H",
    "KV",
    "log2_bs",
    "scale",
];
/// The parameters of `kiln_reshape_and_cache_*` in `kernels/paged_attention.cu`, in order.
pub(crate) const CACHE_PARAMS: &[&str] = &["k", "v", "k_cache", "v_cache", "slot_mapping", "KV", "D", "log2_bs"];

/// Head dims with a paged attention kernel.
const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// `[num_blocks, kv_heads, block_size, head_dim]` of the caches when both are `like`'s dtype on its
/// device, contiguous, 16-byte aligned, and hold every block `meta` names with its block size.
fn cache_dims(kv: &PagedLayerKv, like: &CT, meta: &PagedMeta) -> Option<(usize, usize, usize, usize)> {
    let (kc, vc) = (kv.k_cache, kv.v_cache);
    for c in [kc, vc] {
        let misaligned = !(c.layout().start_offset() * c.dtype().size_in_bytes()).is_multiple_of(16);
        if c.dtype() != like.dtype() || !c.device().same_device(like.device()) || !c.is_contiguous() || misaligned {
            return None;
        }
    }
    if vc.dims() != kc.dims() {
        return None;
    }
    let (nb, kvh, bs, d) = kc.dims4().ok()?;
    (bs == meta.block_size && nb >= meta.num_blocks && kvh > 0 && d > 0).then_some((nb, kvh, bs, d))
}

/// The step's metadata lives on `x`'s device.
fn meta_on(meta: &PagedMeta, x: &CT) -> bool {
    [
        &meta.block_tables,
        &meta.table_start,
        &meta.context_lens,
        &meta.slot_mapping,
    ]
    .iter()
    .all(|t| t.device().same_device(x.device()))
}

/// Paged attention of the step's queries `q` `[T, H, D]` over the cache `kv` (after
/// [`reshape_and_cache`] wrote this step's keys): `[T, H, D]`, each token attending to its
/// sequence's positions `0..=position`. `None` when the case is not the kernel's (not CUDA, dtype,
/// head dim other than 32/64/96/128, H not a multiple of the K/V heads, layouts that disagree).
#[allow(dead_code)] // no caller until PagedAttention runs on CUDA
pub(crate) fn paged_attention(q: &CT, kv: &PagedLayerKv, meta: &PagedMeta, scale: f32) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(q), Kd::of(q)) else {
        return Ok(None);
    };
    if q.rank() != 3 || !meta_on(meta, q) {
        return Ok(None);
    }
    let Some((_, kvh, bs, d)) = cache_dims(kv, q, meta) else {
        return Ok(None);
    };
    let (t, h, dq) = q.dims3()?;
    if t != meta.num_tokens || dq != d || !HEAD_DIMS.contains(&d) || h == 0 || !h.is_multiple_of(kvh) {
        return Ok(None);
    }
    let Some(blocks) = t.checked_mul(h).filter(|&n| n <= MAX_GRID_X) else {
        return Ok(None);
    };
    let qc = q.contiguous()?;
    if !(qc.layout().start_offset() * qc.dtype().size_in_bytes()).is_multiple_of(16) {
        return Ok(None);
    }
    let name = format!("kiln_paged_attention_{}_d{d}", kd.suffix());
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let dims = Dims {
        heads: i32_of(h, "heads")?,
        kv_heads: i32_of(kvh, "kv heads")?,
        log2_bs: bs.trailing_zeros() as i32,
    };
    let y = match kd {
        Kd::F32 => attention_launch::<f32>(dev, &name, &qc, kv, meta, dims, scale, cfg)?,
        Kd::F16 => attention_launch::<f16>(dev, &name, &qc, kv, meta, dims, scale, cfg)?,
    };
    Ok(Some(y))
}

/// Writes the step's new keys and values `k`, `v` `[T, KV, D]` into their slots of the cache `kv`
/// (token `i` to `slot_mapping[i]` of `meta`), in place. `Some(())` when the kernel ran, `None`
/// when the case is not the kernel's (the cache is then untouched).
#[allow(dead_code)] // no caller until PagedAttention runs on CUDA
pub(crate) fn reshape_and_cache(k: &CT, v: &CT, kv: &PagedLayerKv, meta: &PagedMeta) -> Result<Option<()>> {
    let (Some(dev), Some(kd)) = (cuda_dev(k), Kd::of(k)) else {
        return Ok(None);
    };
    if v.dtype() != k.dtype() || !v.device().same_device(k.device()) || k.rank() != 3 || v.dims() != k.dims() {
        return Ok(None);
    }
    if !meta_on(meta, k) {
        return Ok(None);
    }
    let Some((_, kvh, bs, d)) = cache_dims(kv, k, meta) else {
        return Ok(None);
    };
    let (t, kh, dk) = k.dims3()?;
    if t != meta.num_tokens || kh != kvh || dk != d || t > MAX_GRID_X {
        return Ok(None);
    }
    let (kc, vc) = (k.contiguous()?, v.contiguous()?);
    let name = format!("kiln_reshape_and_cache_{}", kd.suffix());
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (kv_heads, head_dim) = (i32_of(kvh, "kv heads")?, i32_of(d, "head size")?);
    i32_of(kvh * d, "kv heads x head size")?;
    let log2_bs = bs.trailing_zeros() as i32;
    match kd {
        Kd::F32 => cache_launch::<f32>(dev, &name, &kc, &vc, kv, meta, (kv_heads, head_dim, log2_bs), cfg)?,
        Kd::F16 => cache_launch::<f16>(dev, &name, &kc, &vc, kv, meta, (kv_heads, head_dim, log2_bs), cfg)?,
    }
    Ok(Some(()))
}

#[derive(Clone, Copy)]
struct Dims {
    heads: i32,
    kv_heads: i32,
    log2_bs: i32,
}

#[allow(clippy::too_many_arguments)]
fn attention_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    q: &CT,
    kv: &PagedLayerKv,
    meta: &PagedMeta,
    dims: Dims,
    scale: f32,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_paged_attention", ptx::PAGED_ATTENTION)?;
    let (qi, ki, vi) = (input(q)?, input(kv.k_cache)?, input(kv.v_cache)?);
    let (ti, si, ci) = (
        input(&meta.block_tables)?,
        input(&meta.table_start)?,
        input(&meta.context_lens)?,
    );
    let (qv, kcv, vcv) = (qi.view::<T>()?, ki.view::<T>()?, vi.view::<T>()?);
    let (tv, sv, cv) = (ti.view::<i32>()?, si.view::<i32>()?, ci.view::<i32>()?);
    let Dims {
        heads,
        kv_heads,
        log2_bs,
    } = dims;
    let mut out = alloc::<T>(dev, qi.len)?;
    {
        let mut l = f.builder();
        kernel_args!(l, PARAMS;
            q = &qv,
            k_cache = &kcv,
            v_cache = &vcv,
            out = &mut out,
            block_tables = &tv,
            table_start = &sv,
            context_lens = &cv,
            H = &heads,
            KV = &kv_heads,
            log2_bs = &log2_bs,
            scale = &scale,
        );
        // SAFETY: matches KILN_PAGED_ATTENTION(q, k_cache, v_cache, out, block_tables, table_start,
        // context_lens, H, KV, log2_bs, scale) in kernels/paged_attention.cu. q/out hold T*H*D
        // elements (16-byte aligned, checked), the caches [num_blocks, KV, 2^log2_bs, D] with
        // num_blocks at least PagedMeta's (checked); PagedMeta::new checked that every table entry
        // the kernel reads (the blocks covering each token's context) is below that count and that
        // table_start/context_lens hold T values.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, q.dims()))
}

#[allow(clippy::too_many_arguments)]
fn cache_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    k: &CT,
    v: &CT,
    kv: &PagedLayerKv,
    meta: &PagedMeta,
    (kv_heads, head_dim, log2_bs): (i32, i32, i32),
    cfg: LaunchConfig,
) -> Result<()> {
    let f = dev.get_or_load_custom_func(name, "kiln_paged_attention", ptx::PAGED_ATTENTION)?;
    let (ki, vi, kci, vci, si) = (
        input(k)?,
        input(v)?,
        input(kv.k_cache)?,
        input(kv.v_cache)?,
        input(&meta.slot_mapping)?,
    );
    let (kv_, vv) = (ki.view::<T>()?, vi.view::<T>()?);
    let (kcv, vcv) = (kci.view::<T>()?, vci.view::<T>()?);
    let sv = si.view::<i32>()?;
    {
        let mut l = f.builder();
        kernel_args!(l, CACHE_PARAMS;
            k = &kv_,
            v = &vv,
            k_cache = &kcv,
            v_cache = &vcv,
            slot_mapping = &sv,
            KV = &kv_heads,
            D = &head_dim,
            log2_bs = &log2_bs,
        );
        // SAFETY: matches KILN_RESHAPE_AND_CACHE(k, v, k_cache, v_cache, slot_mapping, KV, D,
        // log2_bs) in kernels/paged_attention.cu. k/v hold T*KV*D elements, slot_mapping T values,
        // each negative or (PagedMeta::new checked) below num_blocks * block_size of a cache that
        // has at least that many blocks (checked), so every write stays inside the cache views.
        // The kernel writes the caches through these views, which come from read guards: the cache
        // tensors are the caller's mutable state and the write is ordered on candle's stream with
        // every kernel that reads them, like any other launch.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(())
}

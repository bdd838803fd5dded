//! Launcher for `kernels/permute.cu` (a permuted or strided tensor copied into a contiguous one).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{DType as CDType, Tensor as CT};
use half::{bf16, f16};

use super::{alloc, cuda_dev, ptx, strided, wrap};
use crate::cuda_kernels::count_launch;
use crate::cuda_kernels::permute_plan::{plan_permute, MAX_RANK};
use crate::Result;

/// The parameters of `kiln_permute_*` in `kernels/permute.cu`, in order.
pub(crate) const PARAMS: &[&str] = &["x", "y", "total", "rank", "p"];

/// `KilnPermuteParams` in `kernels/permute.cu`: output dims and input strides in units.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Params {
    dims: [u32; MAX_RANK],
    strides: [u32; MAX_RANK],
}

// SAFETY: plain `#[repr(C)]` data matching the kernel's by-value struct parameter.
unsafe impl DeviceRepr for Params {}

/// `x.permute(perm)` made contiguous (`perm` empty: `x` as laid out) through the kernel, for 2- and
/// 4-byte element types; `None` for other dtypes, CPU tensors, more than six axes after collapsing,
/// or 2^31 units and more (the caller then takes candle's copy).
pub(crate) fn permute(x: &CT, perm: &[usize]) -> Result<Option<CT>> {
    let Some(dev) = cuda_dev(x) else {
        return Ok(None);
    };
    let view = if perm.is_empty() { x.clone() } else { x.permute(perm)? };
    let total = view.elem_count();
    if total == 0 || view.is_contiguous() {
        return Ok(Some(view.contiguous()?));
    }
    let (src, _) = strided(&view)?;
    let Some(plan) = plan_permute(
        view.dims(),
        view.stride(),
        view.dtype().size_in_bytes(),
        src.start,
        src.len,
    ) else {
        return Ok(None);
    };
    let p = Params {
        dims: plan.dims,
        strides: plan.strides,
    };
    let (unit, units, units32) = (plan.unit_bytes, plan.units as usize, plan.units);
    let rank = plan.rank as i32;
    let name = match unit {
        16 => "kiln_permute_b16",
        4 => "kiln_permute_b4",
        _ => "kiln_permute_b2",
    };
    let cfg = LaunchConfig {
        grid_dim: (units.div_ceil(256).clamp(1, 32_768) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let dims = view.dims().to_vec();
    let y = match view.dtype() {
        CDType::F32 => launch::<f32>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        CDType::U32 => launch::<u32>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        CDType::I32 => launch::<i32>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        CDType::F16 => launch::<f16>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        CDType::BF16 => launch::<bf16>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        CDType::I16 => launch::<i16>(dev, name, &src, total, units32, rank, p, cfg, &dims)?,
        _ => return Ok(None),
    };
    Ok(Some(y))
}

#[allow(clippy::too_many_arguments)]
fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    src: &super::In<'_>,
    total: usize,
    units: u32,
    rank: i32,
    p: Params,
    cfg: LaunchConfig,
    dims: &[usize],
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_permute", ptx::PERMUTE)?;
    let xv = src.view::<T>()?;
    let mut out = alloc::<T>(dev, total)?;
    {
        let mut l = f.builder();
        kernel_args!(l, PARAMS; x = &xv, y = &mut out, total = &units, rank = &rank, p = &p);
        // SAFETY: matches kiln_permute_b{2,4,16}(x, y, unsigned total, int rank, KilnPermuteParams p)
        // in kernels/permute.cu: the unit is the element (2 or 4 bytes, as T) or 16 bytes, which the
        // caller chose only when every offset is a multiple of it; y holds `total` elements, and
        // every offset the params reach lies inside the input view.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, dims))
}

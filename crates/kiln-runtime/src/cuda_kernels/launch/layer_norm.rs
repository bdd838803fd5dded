//! Launcher for `kernels/layer_norm.cu` (LayerNorm and RMSNorm).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::Tensor as CT;
use half::f16;

use super::{alloc, column_param, cuda_dev, i32_of, input, ptx, wrap, Kd, MAX_GRID_X};
use crate::cuda_kernels::count_launch;
use crate::Result;

/// The parameters of `kiln_{layer,rms}_norm_*` in `kernels/layer_norm.cu`, in order.
pub(crate) const PARAMS: &[&str] = &["x", "gamma", "beta", "y", "cols", "eps"];

/// LayerNorm (or RMSNorm with `rms`) of `x` over its axes `axis..`, with optional `gamma` and
/// `beta` of those axes' shape (RMSNorm: no beta).
pub(crate) fn layer_norm(
    x: &CT,
    gamma: Option<&CT>,
    beta: Option<&CT>,
    axis: usize,
    eps: f32,
    rms: bool,
) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(x), Kd::of(x)) else {
        return Ok(None);
    };
    let Some(trailing) = x.dims().get(axis..) else {
        return Ok(None);
    };
    let cols: usize = trailing.iter().product();
    let n = x.elem_count();
    if cols == 0 || n == 0 || !n.is_multiple_of(cols) || n / cols > MAX_GRID_X || (rms && beta.is_some()) {
        return Ok(None);
    }
    let (Ok(g), Ok(b)) = (column_param(gamma, x, trailing)?, column_param(beta, x, trailing)?) else {
        return Ok(None);
    };
    let rows = n / cols;
    let xc = x.contiguous()?;
    let name = format!("kiln_{}_{}", if rms { "rms_norm" } else { "layer_norm" }, kd.suffix());
    let threads = (cols / 8).div_ceil(32).clamp(1, 16) as u32 * 32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let cols32 = i32_of(cols, "row length")?;
    let y = match kd {
        Kd::F32 => ln_launch::<f32>(dev, &name, &xc, g.as_ref(), b.as_ref(), cols32, eps, cfg)?,
        Kd::F16 => ln_launch::<f16>(dev, &name, &xc, g.as_ref(), b.as_ref(), cols32, eps, cfg)?,
    };
    Ok(Some(y))
}

#[allow(clippy::too_many_arguments)]
fn ln_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    x: &CT,
    g: Option<&CT>,
    b: Option<&CT>,
    cols: i32,
    eps: f32,
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_layer_norm", ptx::LAYER_NORM)?;
    let (xi, gi, bi) = (input(x)?, g.map(input).transpose()?, b.map(input).transpose()?);
    let (xv, gv, bv) = (
        xi.view::<T>()?,
        gi.as_ref().map(|i| i.view::<f32>()).transpose()?,
        bi.as_ref().map(|i| i.view::<f32>()).transpose()?,
    );
    let mut out = alloc::<T>(dev, xi.len)?;
    {
        let mut l = f.builder();
        kernel_args!(l, PARAMS; x = &xv, gamma ?= &gv, beta ?= &bv, y = &mut out, cols = &cols, eps = &eps);
        // SAFETY: the argument list matches kiln_{layer,rms}_norm_*(x, gamma, beta, y, cols, eps)
        // in kernels/layer_norm.cu; every pointer covers rows * cols (x, y) or cols (gamma, beta)
        // elements of the kernel's element type.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, x.dims()))
}

//! Launcher for `kernels/int8_gemm.cu` (int8-weight GEMM).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::Tensor as CT;
use half::f16;

use super::{alloc, cuda_dev, i32_of, input, ptx, wrap, Kd, MAX_GRID_YZ};
use crate::cuda_kernels::{count_launch, WeightArgs};
use crate::Result;

/// The parameters of `kiln_int8_gemm_*` in `kernels/int8_gemm.cu`, in order.
pub(crate) const PARAMS: &[&str] = &["a", "w", "scale", "out", "M", "N", "K"];

/// `a [.., K] @ dequant(W)` -> `[.., N]`, with W's int8 codes and per-channel scales uploaded
/// once (`w.cache`).
pub(crate) fn int8_gemm(a: &CT, w: &WeightArgs) -> Result<Option<CT>> {
    let (Some(dev), Some(kd)) = (cuda_dev(a), Kd::of(a)) else {
        return Ok(None);
    };
    let (k, n) = (w.k, w.n);
    let Some((&ka, batch)) = a.dims().split_last() else {
        return Ok(None);
    };
    let m: usize = batch.iter().product();
    if ka != k || m == 0 || n == 0 || k == 0 || w.codes.len() != k * n || w.scale.len() != n {
        return Ok(None);
    }
    if m.div_ceil(64) > MAX_GRID_YZ {
        return Ok(None);
    }
    let (codes, scale) = w.cache.get(a.device(), w.codes, w.scale)?;
    let ac = a.contiguous()?;
    let name = format!("kiln_int8_gemm_{}_{}", kd.suffix(), if w.trans_b { "nt" } else { "nn" });
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mnk = [i32_of(m, "M")?, i32_of(n, "N")?, i32_of(k, "K")?];
    let y = match kd {
        Kd::F32 => int8_launch::<f32>(dev, &name, &ac, &codes, &scale, mnk, cfg)?,
        Kd::F16 => int8_launch::<f16>(dev, &name, &ac, &codes, &scale, mnk, cfg)?,
    };
    let mut dims = batch.to_vec();
    dims.push(n);
    Ok(Some(y.reshape(dims)?))
}

fn int8_launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    a: &CT,
    codes: &CT,
    scale: &CT,
    [m, n, k]: [i32; 3],
    cfg: LaunchConfig,
) -> Result<CT> {
    let f = dev.get_or_load_custom_func(name, "kiln_int8_gemm", ptx::INT8_GEMM)?;
    let (ai, ci, si) = (input(a)?, input(codes)?, input(scale)?);
    let (av, cv, sv) = (ai.view::<T>()?, ci.view::<u8>()?, si.view::<f32>()?);
    let mut out = alloc::<T>(dev, m as usize * n as usize)?;
    {
        let mut l = f.builder();
        kernel_args!(l, PARAMS; a = &av, w = &cv, scale = &sv, out = &mut out, M = &m, N = &n, K = &k);
        // SAFETY: matches kiln_int8_gemm_*(a, w, scale, out, M, N, K) in kernels/int8_gemm.cu; a
        // holds M*K elements, w K*N bytes (read as signed char), scale N f32, out M*N elements.
        unsafe { l.launch(cfg) }.w()?;
    }
    count_launch();
    Ok(wrap(out, dev, &[m as usize, n as usize]))
}

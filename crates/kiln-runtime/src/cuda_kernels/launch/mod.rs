//! The launchers (feature `cuda`): load the PTX that build.rs embedded through candle's CUDA
//! device (one module per `.cu` file, loaded once per device and cached by candle), read the
//! inputs' candle `CudaStorage` in place, allocate the output on candle's stream and launch there
//! with cudarc's launch builder, so the kernels are ordered with candle's own work and need no
//! synchronization. Launch configurations are described in each `.cu` file.
//!
//! One file per `.cu` source; this file holds what they share: the embedded PTX, the element
//! types, and reading/allocating/wrapping candle's CUDA storage.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType as CDType, Device as CDevice, Storage, StorageRef, Tensor as CT};

use crate::{Result, RuntimeError};

/// Pushes a kernel's arguments onto a cudarc launch builder `$l` in order, each named after the
/// kernel parameter it fills: `name = value`, or `name ?= option` for an optional pointer (null when
/// `None`). The names must equal `$params`, the launcher's parameter list, at compile time, so a
/// push out of order does not build; `cuda_kernels::tests::ptx_entry_points_match_the_launchers`
/// checks each list against the parameter names of the `.cu` signature and the PTX parameter widths
/// against its C types.
macro_rules! kernel_args {
    (@names [$($n:expr),*]) => { [$($n),*] };
    (@names [$($n:expr),*] $name:ident ?= $val:expr $(, $($rest:tt)*)?) => {
        kernel_args!(@names [$($n,)* stringify!($name)] $($($rest)*)?)
    };
    (@names [$($n:expr),*] $name:ident = $val:expr $(, $($rest:tt)*)?) => {
        kernel_args!(@names [$($n,)* stringify!($name)] $($($rest)*)?)
    };
    (@push $l:ident;) => {};
    (@push $l:ident; $name:ident ?= $val:expr $(, $($rest:tt)*)?) => {
        match $val {
            Some(v) => {
                $l.arg(v);
            }
            None => {
                $l.arg(&$crate::cuda_kernels::launch::NULL);
            }
        }
        kernel_args!(@push $l; $($($rest)*)?);
    };
    (@push $l:ident; $name:ident = $val:expr $(, $($rest:tt)*)?) => {
        $l.arg($val);
        kernel_args!(@push $l; $($($rest)*)?);
    };
    ($l:ident, $params:expr; $($body:tt)*) => {{
        const _: () = assert!(
            $crate::cuda_kernels::launch::same_names($params, &kernel_args!(@names [] $($body)*)),
            "kernel arguments do not follow the launcher's parameter list"
        );
        kernel_args!(@push $l; $($body)*);
    }};
}

/// Whether two name lists are equal (usable in constants).
pub(super) const fn same_names(a: &[&str], b: &[&str]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        let (x, y) = (a[i].as_bytes(), b[i].as_bytes());
        if x.len() != y.len() {
            return false;
        }
        let mut j = 0;
        while j < x.len() {
            if x[j] != y[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

pub(super) mod attention;
pub(super) mod bias_act;
pub(super) mod im2col;
pub(super) mod int8_gemm;
pub(super) mod layer_norm;
pub(super) mod paged_attention;
pub(super) mod permute;
pub(super) mod softmax;

pub(super) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kiln_kernels.rs"));
}

/// Every entry point's C signature, from the preprocessed `.cu` sources (build.rs).
#[cfg(test)]
pub(super) mod signatures {
    include!(concat!(env!("OUT_DIR"), "/kiln_kernel_signatures.rs"));
}

/// A null device pointer argument (the kernels take `const float* = nullptr` for absent inputs).
const NULL: u64 = 0;
/// Largest grid.y / grid.z.
const MAX_GRID_YZ: usize = 65_535;
/// Largest grid.x.
const MAX_GRID_X: usize = i32::MAX as usize;

/// The element types the kernels take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kd {
    F32,
    F16,
}

impl Kd {
    fn of(t: &CT) -> Option<Kd> {
        match t.dtype() {
            CDType::F32 => Some(Kd::F32),
            CDType::F16 => Some(Kd::F16),
            _ => None,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Kd::F32 => "f32",
            Kd::F16 => "f16",
        }
    }

    /// Elements per 16-byte vector.
    fn vec_width(self) -> usize {
        match self {
            Kd::F32 => 4,
            Kd::F16 => 8,
        }
    }
}

fn cuda_dev(t: &CT) -> Option<&CudaDevice> {
    match t.device() {
        CDevice::Cuda(d) => Some(d),
        _ => None,
    }
}

fn internal(what: &str) -> RuntimeError {
    RuntimeError::Device(format!("fused CUDA kernel: {what}"))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| internal(&format!("{what} {v} exceeds the kernel's 32-bit index")))
}

/// A tensor's storage, read-locked for the launch, and the element range the kernel reads.
struct In<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl In<'_> {
    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        let Storage::Cuda(cs) = &*self.guard else {
            return Err(internal("input is not in CUDA memory"));
        };
        cs.as_cuda_slice::<T>()?
            .try_slice(self.start..self.start + self.len)
            .ok_or_else(|| internal("input layout reaches past its storage"))
    }
}

/// A contiguous tensor's data.
fn input(t: &CT) -> Result<In<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("input is not contiguous"))?;
    Ok(In {
        guard,
        start,
        len: end - start,
    })
}

/// A strided (possibly broadcast, zero-stride) tensor's data and its element strides.
fn strided(t: &CT) -> Result<(In<'_>, Vec<i64>)> {
    let (guard, layout) = t.storage_and_layout();
    let mut reach = 1usize;
    for (&d, &s) in layout.dims().iter().zip(layout.stride()) {
        reach += d.saturating_sub(1) * s;
    }
    let strides = layout.stride().iter().map(|&s| s as i64).collect();
    Ok((
        In {
            guard,
            start: layout.start_offset(),
            len: reach,
        },
        strides,
    ))
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every kernel writes each of its n output elements before anything reads them.
    Ok(unsafe { dev.alloc::<T>(n) }?)
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, dims: &[usize]) -> CT {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    CT::from_storage(storage, dims, BackpropOp::none(), false)
}

/// An optional per-column f32 parameter on `x`'s device, flattened to `cols` values: one value
/// (broadcast), or exactly the trailing dims `trailing` of `x` (leading 1s aside), as the CPU
/// kernels accept them. `Err(())` when it does not fit (the caller then declines).
fn column_param(p: Option<&CT>, x: &CT, trailing: &[usize]) -> Result<std::result::Result<Option<CT>, ()>> {
    let Some(p) = p else { return Ok(Ok(None)) };
    if !p.device().same_device(x.device()) || !p.dtype().is_float() {
        return Ok(Err(()));
    }
    let strip = |d: &[usize]| -> Vec<usize> { d.iter().copied().skip_while(|&v| v == 1).collect() };
    let cols: usize = trailing.iter().product();
    let flat = p.to_dtype(CDType::F32)?.flatten_all()?;
    let flat = if p.elem_count() == 1 {
        flat.broadcast_as(cols)?
    } else if strip(p.dims()) == strip(trailing) {
        flat
    } else {
        return Ok(Err(()));
    };
    Ok(Ok(Some(flat.contiguous()?)))
}

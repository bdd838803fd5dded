use candle_core::{DType as CDType, Device as CDevice};
use half::{bf16, f16};
use kiln_graph::{DType, TensorData};

use crate::{Result, RuntimeError};

/// A tensor at run time: a candle tensor plus its ONNX element type.
///
/// candle has no i8/u16/u64/bool storage, so those live in a wider candle dtype
/// ([`storage_dtype`]) and are converted back at the edges ([`Tensor::to_data`]).
/// The float8, float4, int4 and int2 types are stored as f32 holding representable values.
#[derive(Debug, Clone)]
pub struct Tensor {
    t: candle_core::Tensor,
    dtype: DType,
}

/// The candle dtype that stores values of an ONNX dtype.
pub fn storage_dtype(d: DType) -> Result<CDType> {
    Ok(match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        DType::F64 => CDType::F64,
        DType::U8 | DType::Bool => CDType::U8,
        DType::I8 | DType::I16 => CDType::I16,
        DType::U16 | DType::I32 => CDType::I32,
        DType::U32 => CDType::U32,
        DType::I64 | DType::U64 => CDType::I64,
        // float8/float4/int4/int2 families: every value is exact in f32.
        DType::F8E4M3FN
        | DType::F8E4M3FNUZ
        | DType::F8E5M2
        | DType::F8E5M2FNUZ
        | DType::U4
        | DType::I4
        | DType::F4E2M1
        | DType::F8E8M0
        | DType::U2
        | DType::I2 => CDType::F32,
        DType::String => return Err(RuntimeError::msg("string tensors are not supported")),
    })
}

fn logical_of(c: CDType) -> Result<DType> {
    Ok(match c {
        CDType::F32 => DType::F32,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        CDType::F64 => DType::F64,
        CDType::U8 => DType::U8,
        CDType::I16 => DType::I16,
        CDType::I32 => DType::I32,
        CDType::U32 => DType::U32,
        CDType::I64 => DType::I64,
        other => return Err(RuntimeError::msg(format!("unsupported candle dtype {other:?}"))),
    })
}

macro_rules! decode_le {
    ($bytes:expr, $t:ty) => {
        if cfg!(target_endian = "little") {
            // One copy into an aligned vector (the bytes may sit at any alignment).
            bytemuck::pod_collect_to_vec::<u8, $t>($bytes)
        } else {
            $bytes
                .chunks_exact(std::mem::size_of::<$t>())
                .map(|c| {
                    let mut a = [0u8; std::mem::size_of::<$t>()];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                })
                .collect::<Vec<$t>>()
        }
    };
}

/// `values` as little-endian bytes: one copy on little-endian targets.
fn le_bytes<T: bytemuck::Pod, const N: usize>(values: &[T], to_le: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        return bytemuck::cast_slice::<T, u8>(values).to_vec();
    }
    let mut out = Vec::with_capacity(std::mem::size_of_val(values));
    values.iter().for_each(|v| out.extend_from_slice(&to_le(v)));
    out
}

/// `t` (flat, storage dtype `T`) as host data of `dtype`: one copy from a contiguous CPU tensor's
/// storage into the data's buffer; a device tensor is downloaded first.
fn pod_data<T: candle_core::WithDType + bytemuck::Pod>(
    t: &candle_core::Tensor,
    name: &str,
    dtype: DType,
    dims: Vec<usize>,
) -> Result<TensorData> {
    if t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            if let Some(v) = cpu.as_slice::<T>().ok().and_then(|v| v.get(start..end)) {
                return Ok(TensorData::from_le_slice(name, dtype, dims, bytemuck::cast_slice(v))?);
            }
        }
    }
    let v = t.to_vec1::<T>()?;
    Ok(TensorData::from_le_slice(name, dtype, dims, bytemuck::cast_slice(&v))?)
}

impl Tensor {
    /// Wraps a candle tensor whose storage dtype is `storage_dtype(dtype)`.
    pub fn new(t: candle_core::Tensor, dtype: DType) -> Result<Self> {
        let want = storage_dtype(dtype)?;
        if t.dtype() != want {
            return Err(RuntimeError::msg(format!(
                "internal: {dtype} tensor stored as {:?}, expected {want:?}",
                t.dtype()
            )));
        }
        Ok(Tensor { t, dtype })
    }

    /// Wraps a candle tensor, taking the natural ONNX dtype of its storage.
    pub fn from_candle(t: candle_core::Tensor) -> Result<Self> {
        let dtype = logical_of(t.dtype())?;
        Ok(Tensor { t, dtype })
    }

    /// Same storage, another logical dtype of the same storage (e.g. U8 <-> Bool).
    pub fn with_dtype(self, dtype: DType) -> Result<Self> {
        Tensor::new(self.t, dtype)
    }

    pub fn candle(&self) -> &candle_core::Tensor {
        &self.t
    }

    pub fn into_candle(self) -> candle_core::Tensor {
        self.t
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[usize] {
        self.t.dims()
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    pub fn elem_count(&self) -> usize {
        self.t.elem_count()
    }

    pub fn device(&self) -> &CDevice {
        self.t.device()
    }

    /// Bytes this tensor occupies in its logical dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }

    /// Uploads host data to `device`.
    pub fn from_data(d: &TensorData, device: &CDevice) -> Result<Self> {
        let b = d.bytes();
        let dims = d.dims.as_slice();
        // A device upload reads aligned little-endian f32 bytes in place (one copy, straight to the
        // device) instead of collecting them into a host vector first.
        if d.dtype == DType::F32 && cfg!(target_endian = "little") && !device.is_cpu() {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(b) {
                return Tensor::new(candle_core::Tensor::from_slice(v, dims, device)?, d.dtype);
            }
        }
        let t = match d.dtype {
            DType::F32 => candle_core::Tensor::from_vec(decode_le!(b, f32), dims, device)?,
            DType::F64 => candle_core::Tensor::from_vec(decode_le!(b, f64), dims, device)?,
            DType::F16 => candle_core::Tensor::from_vec(
                decode_le!(b, u16).into_iter().map(f16::from_bits).collect::<Vec<_>>(),
                dims,
                device,
            )?,
            DType::BF16 => candle_core::Tensor::from_vec(
                decode_le!(b, u16).into_iter().map(bf16::from_bits).collect::<Vec<_>>(),
                dims,
                device,
            )?,
            DType::U8 => candle_core::Tensor::from_vec(b.to_vec(), dims, device)?,
            DType::Bool => {
                candle_core::Tensor::from_vec(b.iter().map(|&v| (v != 0) as u8).collect::<Vec<_>>(), dims, device)?
            }
            DType::I8 => {
                candle_core::Tensor::from_vec(b.iter().map(|&v| v as i8 as i16).collect::<Vec<_>>(), dims, device)?
            }
            DType::I16 => candle_core::Tensor::from_vec(decode_le!(b, i16), dims, device)?,
            DType::U16 => candle_core::Tensor::from_vec(
                decode_le!(b, u16).into_iter().map(i32::from).collect::<Vec<_>>(),
                dims,
                device,
            )?,
            DType::I32 => candle_core::Tensor::from_vec(decode_le!(b, i32), dims, device)?,
            DType::U32 => candle_core::Tensor::from_vec(decode_le!(b, u32), dims, device)?,
            DType::I64 => candle_core::Tensor::from_vec(decode_le!(b, i64), dims, device)?,
            DType::U64 => candle_core::Tensor::from_vec(
                decode_le!(b, u64).into_iter().map(|v| v as i64).collect::<Vec<_>>(),
                dims,
                device,
            )?,
            dt if dt.is_exotic() => {
                let v = d
                    .exotic_to_f32()
                    .ok_or_else(|| RuntimeError::msg(format!("tensor '{}': cannot decode {dt}", d.name)))?;
                candle_core::Tensor::from_vec(v, dims, device)?
            }
            _ => {
                return Err(RuntimeError::msg(format!(
                    "tensor '{}': string tensors are not supported",
                    d.name
                )))
            }
        };
        Tensor::new(t, d.dtype)
    }

    /// Downloads to host data in the logical dtype.
    pub fn to_data(&self, name: &str) -> Result<TensorData> {
        let t = self.t.flatten_all()?;
        if self.dtype.is_exotic() {
            // Values are representable already (see `cast`); saturate=false keeps NaN/inf.
            let v = t.to_dtype(CDType::F32)?.to_vec1::<f32>()?;
            return Ok(TensorData::exotic_from_f32(
                name,
                self.dtype,
                self.dims().to_vec(),
                &v,
                false,
            )?);
        }
        // Plain little-endian dtypes: one copy into the result's buffer, read in place from a CPU
        // tensor's storage (else downloaded first).
        if cfg!(target_endian = "little") {
            let dims = self.dims().to_vec();
            let direct = match self.dtype {
                DType::F32 => Some(pod_data::<f32>(&t, name, self.dtype, dims)?),
                DType::F64 => Some(pod_data::<f64>(&t, name, self.dtype, dims)?),
                DType::I64 => Some(pod_data::<i64>(&t, name, self.dtype, dims)?),
                DType::I32 => Some(pod_data::<i32>(&t, name, self.dtype, dims)?),
                DType::U32 => Some(pod_data::<u32>(&t, name, self.dtype, dims)?),
                DType::I16 => Some(pod_data::<i16>(&t, name, self.dtype, dims)?),
                _ => None,
            };
            if let Some(d) = direct {
                return Ok(d);
            }
        }
        let out: Vec<u8> = match self.dtype {
            DType::F32 => le_bytes(&t.to_vec1::<f32>()?, |v| v.to_le_bytes()),
            DType::F64 => le_bytes(&t.to_vec1::<f64>()?, |v| v.to_le_bytes()),
            DType::F16 => le_bytes(
                &t.to_vec1::<f16>()?.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                |v| v.to_le_bytes(),
            ),
            DType::BF16 => le_bytes(
                &t.to_vec1::<bf16>()?.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                |v| v.to_le_bytes(),
            ),
            DType::U8 => t.to_vec1::<u8>()?,
            DType::Bool => t.to_vec1::<u8>()?.into_iter().map(|v| (v != 0) as u8).collect(),
            DType::I8 => t.to_vec1::<i16>()?.into_iter().map(|v| v as i8 as u8).collect(),
            DType::I16 => le_bytes(&t.to_vec1::<i16>()?, |v| v.to_le_bytes()),
            DType::U16 => le_bytes(
                &t.to_vec1::<i32>()?.iter().map(|&v| v as u16).collect::<Vec<_>>(),
                |v| v.to_le_bytes(),
            ),
            DType::I32 => le_bytes(&t.to_vec1::<i32>()?, |v| v.to_le_bytes()),
            DType::U32 => le_bytes(&t.to_vec1::<u32>()?, |v| v.to_le_bytes()),
            DType::I64 => le_bytes(&t.to_vec1::<i64>()?, |v| v.to_le_bytes()),
            DType::U64 => le_bytes(
                &t.to_vec1::<i64>()?.iter().map(|&v| v as u64).collect::<Vec<_>>(),
                |v| v.to_le_bytes(),
            ),
            _ => return Err(RuntimeError::msg(format!("{} tensors are not supported", self.dtype))),
        };
        Ok(TensorData::new(name, self.dtype, self.dims().to_vec(), out)?)
    }

    /// Integer contents (shape/axes/indices inputs); floats are truncated.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        // Convert on the host: candle's CUDA backend has no casts for every dtype pair.
        let t = self.t.flatten_all()?.to_device(&CDevice::Cpu)?;
        Ok(match t.dtype() {
            CDType::I64 => t.to_vec1::<i64>()?,
            CDType::F32 | CDType::F16 | CDType::BF16 | CDType::F64 => t
                .to_dtype(CDType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(|v| v as i64)
                .collect(),
            _ => t.to_dtype(CDType::I64)?.to_vec1::<i64>()?,
        })
    }

    /// Contents as f64 (any numeric dtype).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let t = self.t.flatten_all()?.to_device(&CDevice::Cpu)?;
        Ok(match t.dtype() {
            CDType::I64 => t.to_vec1::<i64>()?.into_iter().map(|v| v as f64).collect(),
            _ => t.to_dtype(CDType::F64)?.to_vec1::<f64>()?,
        })
    }

    /// Builds an i64 tensor.
    pub fn from_i64s(values: Vec<i64>, dims: &[usize], device: &CDevice) -> Result<Self> {
        Tensor::new(candle_core::Tensor::from_vec(values, dims, device)?, DType::I64)
    }

    /// Builds an f64 tensor then casts to `dtype` (for small host-computed results).
    pub fn from_f64s(values: Vec<f64>, dims: &[usize], dtype: DType, device: &CDevice) -> Result<Self> {
        let t = Tensor::new(candle_core::Tensor::from_vec(values, dims, &CDevice::Cpu)?, DType::F64)?;
        t.cast(dtype)?.to_device(device)
    }

    /// Copies to `device` (no copy when already there).
    pub fn to_device(&self, device: &CDevice) -> Result<Tensor> {
        if self.device().same_device(device) {
            return Ok(self.clone());
        }
        Tensor::new(self.t.to_device(device)?, self.dtype)
    }

    /// `true` when candle's CUDA kernels do not cover this tensor's storage dtype (i16/i32 are
    /// missing from several CUDA binary, compare and cast kernels): such ops run on the host.
    pub fn needs_host_kernels(&self) -> bool {
        !self.device().is_cpu() && matches!(self.t.dtype(), CDType::I16 | CDType::I32)
    }

    /// Casts with ONNX `Cast` semantics: to bool is `!= 0`; narrow integers wrap; float8
    /// targets saturate (see [`Tensor::cast_with`]).
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        self.cast_with(to, true, "up")
    }

    /// `Cast` with its `saturate` (float8 targets: clamp out-of-range values to +-max instead
    /// of producing inf/NaN) and `round_mode` (float8e8m0 targets: "up", "down", "nearest").
    pub fn cast_with(&self, to: DType, saturate: bool, round_mode: &str) -> Result<Tensor> {
        if to == self.dtype {
            return Ok(self.clone());
        }
        let narrow_target = matches!(storage_dtype(to)?, CDType::I16 | CDType::I32);
        if !self.device().is_cpu() && (self.needs_host_kernels() || narrow_target) {
            let dev = self.device().clone();
            return self
                .to_device(&CDevice::Cpu)?
                .cast_with(to, saturate, round_mode)?
                .to_device(&dev);
        }
        if to.is_exotic() {
            // Round the values to the target's representable set (encode, then decode).
            let v = self.to_f64_vec()?;
            let mut out = Vec::with_capacity(v.len());
            for x in v {
                let code = to
                    .encode_with(x, saturate, round_mode)
                    .ok_or_else(|| RuntimeError::msg(format!("cannot cast to {to} (round_mode '{round_mode}')")))?;
                out.push(to.decode(code).unwrap_or(f32::NAN));
            }
            let t = candle_core::Tensor::from_vec(out, self.dims(), self.device())?;
            return Tensor::new(t, to);
        }
        let target = storage_dtype(to)?;
        let t = match to {
            DType::Bool => {
                let zeros = self.t.zeros_like()?;
                self.t.ne(&zeros)?
            }
            DType::I8 | DType::U16 | DType::U8 | DType::U64 | DType::U32 if !self.dtype.is_float() => {
                // Integer narrowing wraps like a C cast; go through i64 on the host side.
                let v = self.to_i64_vec()?;
                let dims = self.dims().to_vec();
                let dev = self.device().clone();
                let t = match to {
                    DType::I8 => candle_core::Tensor::from_vec(
                        v.into_iter().map(|x| x as i8 as i16).collect::<Vec<_>>(),
                        dims,
                        &dev,
                    )?,
                    DType::U16 => candle_core::Tensor::from_vec(
                        v.into_iter().map(|x| x as u16 as i32).collect::<Vec<_>>(),
                        dims,
                        &dev,
                    )?,
                    DType::U8 => {
                        candle_core::Tensor::from_vec(v.into_iter().map(|x| x as u8).collect::<Vec<_>>(), dims, &dev)?
                    }
                    DType::U32 => {
                        candle_core::Tensor::from_vec(v.into_iter().map(|x| x as u32).collect::<Vec<_>>(), dims, &dev)?
                    }
                    _ => candle_core::Tensor::from_vec(v, dims, &dev)?,
                };
                return Tensor::new(t, to);
            }
            DType::I8 | DType::U16 => {
                // From float: convert through i64 then wrap.
                let as_i64 = Tensor::new(self.t.to_dtype(CDType::I64)?, DType::I64)?;
                return as_i64.cast(to);
            }
            _ => self.t.to_dtype(target)?,
        };
        Tensor::new(t, to)
    }

    /// Runs a candle operation that keeps the dtype.
    pub fn map(
        &self,
        f: impl FnOnce(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
    ) -> Result<Tensor> {
        Tensor::new(f(&self.t)?, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trip_all_dtypes() {
        let dev = CDevice::Cpu;
        let cases: Vec<TensorData> = vec![
            TensorData::from_values("a", vec![2], &[1.5f32, -2.0]).unwrap(),
            TensorData::from_values("b", vec![2], &[-128i8, 127]).unwrap(),
            TensorData::from_values("c", vec![2], &[65535u16, 1]).unwrap(),
            TensorData::from_values("d", vec![2], &[u64::MAX, 3]).unwrap(),
            TensorData::from_values("e", vec![2], &[true, false]).unwrap(),
            TensorData::from_values("f", vec![1], &[f16::from_f32(0.5)]).unwrap(),
            TensorData::new("g", DType::I4, vec![3], vec![0xF1, 0x08]).unwrap(),
            TensorData::new("h", DType::U2, vec![5], vec![0b1110_0100, 0b10]).unwrap(),
            TensorData::new("i", DType::F8E4M3FN, vec![3], vec![0x38, 0x7F, 0x80]).unwrap(),
            TensorData::new("j", DType::F8E5M2, vec![2], vec![0x7C, 0x01]).unwrap(),
            TensorData::new("k", DType::F4E2M1, vec![2], vec![0xF1]).unwrap(),
            TensorData::new("l", DType::F8E8M0, vec![2], vec![0x00, 0xFE]).unwrap(),
        ];
        for d in cases {
            let t = Tensor::from_data(&d, &dev).unwrap();
            assert_eq!(t.to_data(&d.name).unwrap(), d);
        }
    }

    #[test]
    fn cast_rules() {
        let dev = CDevice::Cpu;
        let d = TensorData::from_values("x", vec![3], &[300i64, -1, 0]).unwrap();
        let t = Tensor::from_data(&d, &dev).unwrap();
        let u8s = t.cast(DType::U8).unwrap().to_data("y").unwrap();
        assert_eq!(u8s.values::<u8>().unwrap(), vec![44, 255, 0]);
        let b = t.cast(DType::Bool).unwrap().to_data("z").unwrap();
        assert_eq!(b.values::<bool>().unwrap(), vec![true, true, false]);
    }

    #[test]
    fn cast_to_exotic_types() {
        let dev = CDevice::Cpu;
        let d = TensorData::from_values("x", vec![4], &[1.0f32, 500.0, -0.3, f32::INFINITY]).unwrap();
        let t = Tensor::from_data(&d, &dev).unwrap();
        let sat = t.cast(DType::F8E4M3FN).unwrap();
        assert_eq!(sat.to_data("y").unwrap().bytes(), &[0x38, 0x7E, 0xAA, 0x7E]);
        let raw = t.cast_with(DType::F8E4M3FN, false, "up").unwrap();
        assert_eq!(raw.to_data("y").unwrap().bytes(), &[0x38, 0x7F, 0xAA, 0x7F]);
        let i4 = t.cast(DType::I4).unwrap();
        assert_eq!(i4.to_data("y").unwrap().bytes(), &[0x41, 0x00]);
        let back = sat.cast(DType::F32).unwrap().to_f64_vec().unwrap();
        assert_eq!(back, vec![1.0, 448.0, -0.3125, 448.0]);
    }
}

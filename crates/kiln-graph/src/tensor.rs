use std::sync::Arc;

use crate::{DType, GraphError, Result};

/// A constant tensor held on the host: initializers, `Constant` values, attribute tensors.
///
/// Numeric data is stored as little-endian bytes of `dtype`; strings as byte strings.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    bytes: Arc<[u8]>,
    strings: Option<Arc<[Vec<u8>]>>,
}

impl TensorData {
    /// Builds a numeric tensor, checking that the byte length matches dims and dtype.
    ///
    /// 4-bit and 2-bit types use the packed ONNX layout ([`DType::pack`]).
    pub fn new(name: impl Into<String>, dtype: DType, dims: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_le_slice(name, dtype, dims, &bytes)
    }

    /// [`TensorData::new`] from borrowed little-endian bytes: one copy, straight into the tensor's
    /// shared buffer (a caller holding a slice needs no `Vec` of its own first).
    pub fn from_le_slice(name: impl Into<String>, dtype: DType, dims: Vec<usize>, bytes: &[u8]) -> Result<Self> {
        let name = name.into();
        Self::check_bytes(&name, dtype, &dims, bytes.len())?;
        Ok(TensorData {
            name,
            dtype,
            dims,
            bytes: Arc::from(bytes),
            strings: None,
        })
    }

    /// The values of an f32 tensor borrowed in place (little-endian hosts; `None` for another
    /// dtype or a misaligned buffer: then [`TensorData::values`] copies them).
    pub fn f32_slice(&self) -> Option<&[f32]> {
        if self.dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(&self.bytes).ok()
    }

    /// Whether `len` bytes hold a numeric tensor of `dtype` and `dims`.
    fn check_bytes(name: &str, dtype: DType, dims: &[usize], len: usize) -> Result<()> {
        let name = name.to_string();
        if dtype == DType::String {
            return Err(GraphError::BadTensor {
                name,
                reason: "string tensors must be built with TensorData::strings".into(),
            });
        }
        let count = element_count(&name, dims)?;
        let want = dtype.packed_size(count).ok_or_else(|| GraphError::BadTensor {
            name: name.clone(),
            reason: format!("dims {dims:?} overflow"),
        })?;
        if want != len {
            return Err(GraphError::BadTensor {
                name,
                reason: format!("dims {dims:?} of {dtype} need {want} bytes, the data has {len}"),
            });
        }
        Ok(())
    }

    /// Builds a string tensor.
    pub fn strings(name: impl Into<String>, dims: Vec<usize>, data: Vec<Vec<u8>>) -> Result<Self> {
        let name = name.into();
        let count = element_count(&name, &dims)?;
        if count != data.len() {
            return Err(GraphError::BadTensor {
                name,
                reason: format!("dims {dims:?} need {count} strings, the data has {}", data.len()),
            });
        }
        Ok(TensorData {
            name,
            dtype: DType::String,
            dims,
            bytes: Arc::from(Vec::new()),
            strings: Some(data.into()),
        })
    }

    /// Builds a numeric tensor from typed values.
    pub fn from_values<T: Element>(name: impl Into<String>, dims: Vec<usize>, values: &[T]) -> Result<Self> {
        let mut bytes = Vec::with_capacity(values.len() * T::DTYPE.size_in_bytes());
        for v in values {
            v.write_le(&mut bytes);
        }
        Self::new(name, T::DTYPE, dims, bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn string_data(&self) -> Option<&[Vec<u8>]> {
        self.strings.as_deref()
    }

    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the values as `T` when the dtype matches.
    pub fn values<T: Element>(&self) -> Option<Vec<T>> {
        if self.dtype != T::DTYPE {
            return None;
        }
        let n = T::DTYPE.size_in_bytes();
        Some(self.bytes.chunks_exact(n).map(T::read_le).collect())
    }

    /// Integer values of an integer tensor (any int width), for shape-like inputs.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let b = &self.bytes;
        Some(match self.dtype {
            DType::I64 => b.chunks_exact(8).map(i64::read_le).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::read_le(c) as i64).collect(),
            DType::I16 => b.chunks_exact(2).map(|c| i16::read_le(c) as i64).collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            DType::U8 | DType::Bool => b.iter().map(|&v| v as i64).collect(),
            DType::U16 => b.chunks_exact(2).map(|c| u16::read_le(c) as i64).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| u32::read_le(c) as i64).collect(),
            DType::U64 => b.chunks_exact(8).map(|c| u64::read_le(c) as i64).collect(),
            DType::I4 | DType::U4 | DType::I2 | DType::U2 => self
                .dtype
                .unpack(b, self.len())
                .into_iter()
                .map(|c| self.dtype.decode(c).unwrap_or(0.0) as i64)
                .collect(),
            _ => return None,
        })
    }

    /// Values of a tensor of an exotic type (float8, float4, int4, int2 families: see
    /// [`DType::is_exotic`]) decoded to f32, which holds all of them exactly.
    pub fn exotic_to_f32(&self) -> Option<Vec<f32>> {
        if !self.dtype.is_exotic() {
            return None;
        }
        let d = self.dtype;
        Some(
            d.unpack(&self.bytes, self.len())
                .into_iter()
                .map(|c| d.decode(c).unwrap_or(f32::NAN))
                .collect(),
        )
    }

    /// Encodes f32 values as an exotic type (see [`DType::encode`]; `saturate` for float8).
    pub fn exotic_from_f32(
        name: impl Into<String>,
        dtype: DType,
        dims: Vec<usize>,
        values: &[f32],
        saturate: bool,
    ) -> Result<Self> {
        let name = name.into();
        let codes = values
            .iter()
            .map(|&v| dtype.encode(v as f64, saturate))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| GraphError::BadTensor {
                name: name.clone(),
                reason: format!("{dtype} is not a float8/4-bit/2-bit type"),
            })?;
        Self::new(name, dtype, dims, dtype.pack(&codes))
    }
}

fn element_count(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| GraphError::BadTensor {
            name: name.to_string(),
            reason: format!("dims {dims:?} overflow"),
        })
}

/// A Rust element type that maps to one Kiln dtype.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn write_le(&self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn write_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&bytes[..std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(i8, DType::I8);
element!(u8, DType::U8);
element!(i16, DType::I16);
element!(u16, DType::U16);
element!(i32, DType::I32);
element!(i64, DType::I64);
element!(u32, DType::U32);
element!(u64, DType::U64);
element!(half::f16, DType::F16);
element!(half::bf16, DType::BF16);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn write_le(&self, out: &mut Vec<u8>) {
        out.push(*self as u8);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_bytes_build_the_same_tensor_and_read_back_in_place() {
        let v = [1.5f32, -2.0, 3.25];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = TensorData::from_le_slice("a", DType::F32, vec![3], &bytes).unwrap();
        let b = TensorData::new("a", DType::F32, vec![3], bytes.clone()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.f32_slice(), Some(&v[..]));
        assert!(TensorData::from_le_slice("a", DType::F32, vec![2], &bytes).is_err());
        let i = TensorData::from_values("i", vec![1], &[7i64]).unwrap();
        assert_eq!(i.f32_slice(), None, "not f32");
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let e = TensorData::new("w", DType::F32, vec![2, 3], vec![0; 20]).unwrap_err();
        assert!(e.to_string().contains("need 24 bytes"), "{e}");
    }

    #[test]
    fn overflowing_dims_are_an_error() {
        let e = TensorData::new("w", DType::F32, vec![usize::MAX, 4], vec![]).unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
    }

    #[test]
    fn packed_types() {
        let t = TensorData::new("p", DType::I4, vec![3], vec![0xF1, 0x07]).unwrap();
        assert_eq!(t.to_i64_vec().unwrap(), vec![1, -1, 7]);
        assert_eq!(t.exotic_to_f32().unwrap(), vec![1.0, -1.0, 7.0]);
        let e = TensorData::new("p", DType::U2, vec![5], vec![0]).unwrap_err();
        assert!(e.to_string().contains("need 2 bytes"), "{e}");
        let f = TensorData::exotic_from_f32("f", DType::F8E4M3FN, vec![2], &[1.0, 500.0], true).unwrap();
        assert_eq!(f.bytes(), &[0x38, 0x7E]);
        let u = TensorData::exotic_from_f32("u", DType::U4, vec![3], &[1.0, 2.0, 15.0], true).unwrap();
        assert_eq!(u.bytes(), &[0x21, 0x0F]);
    }

    #[test]
    fn round_trip_values() {
        let t = TensorData::from_values("x", vec![3], &[1.5f32, -2.0, 3.25]).unwrap();
        assert_eq!(t.values::<f32>().unwrap(), vec![1.5, -2.0, 3.25]);
        assert!(t.values::<f64>().is_none());
    }
}

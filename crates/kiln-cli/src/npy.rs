//! `.npy` files <-> Kiln host tensors, through `npyz`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln::{DType, TensorData};
use npyz::WriterBuilder;

/// Reads a `.npy` file (C order) as a tensor named `name`.
pub fn read(path: &Path, name: &str) -> Result<TensorData> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{} is not a .npy file", path.display()))?;
    if npy.order() != npyz::Order::C {
        bail!("{}: Fortran-order arrays are not supported", path.display());
    }
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => bail!("{}: unsupported dtype {other:?}", path.display()),
    };
    macro_rules! load {
        ($t:ty) => {
            TensorData::from_values(name, dims, &npy.into_vec::<$t>()?)?
        };
    }
    Ok(match descr.trim_start_matches(['<', '|', '=']) {
        "f4" => load!(f32),
        "f8" => load!(f64),
        "f2" => load!(half::f16),
        "i1" => load!(i8),
        "u1" => load!(u8),
        "i2" => load!(i16),
        "u2" => load!(u16),
        "i4" => load!(i32),
        "u4" => load!(u32),
        "i8" => load!(i64),
        "u8" => load!(u64),
        "b1" => load!(bool),
        other => bail!("{}: unsupported dtype '{other}'", path.display()),
    })
}

/// Writes a tensor as `.npy`.
pub fn write(path: &Path, t: &TensorData) -> Result<()> {
    let mut buf = Vec::new();
    write_to(&mut buf, t)?;
    crate::output::write(path, &buf)
}

fn write_to(file: &mut Vec<u8>, t: &TensorData) -> Result<()> {
    let shape: Vec<u64> = t.dims.iter().map(|&d| d as u64).collect();
    macro_rules! save {
        ($t:ty) => {{
            let values = t.values::<$t>().context("dtype mismatch")?;
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut *file)
                .begin_nd()?;
            w.extend(values)?;
            w.finish()?;
        }};
    }
    match t.dtype {
        DType::F32 => save!(f32),
        DType::F64 => save!(f64),
        DType::F16 => save!(half::f16),
        DType::I8 => save!(i8),
        DType::U8 => save!(u8),
        DType::I16 => save!(i16),
        DType::U16 => save!(u16),
        DType::I32 => save!(i32),
        DType::U32 => save!(u32),
        DType::I64 => save!(i64),
        DType::U64 => save!(u64),
        DType::Bool => save!(bool),
        DType::BF16 => {
            // numpy has no bfloat16: write float32 values.
            let v: Vec<f32> = t
                .values::<half::bf16>()
                .context("dtype mismatch")?
                .into_iter()
                .map(f32::from)
                .collect();
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut *file)
                .begin_nd()?;
            w.extend(v)?;
            w.finish()?;
        }
        DType::I4 | DType::I2 => {
            // numpy has no int4/int2: write int8 values.
            let v: Vec<i8> = t
                .to_i64_vec()
                .context("dtype mismatch")?
                .into_iter()
                .map(|x| x as i8)
                .collect();
            write_values(file, &shape, v)?;
        }
        DType::U4 | DType::U2 => {
            // numpy has no uint4/uint2: write uint8 values.
            let v: Vec<u8> = t
                .to_i64_vec()
                .context("dtype mismatch")?
                .into_iter()
                .map(|x| x as u8)
                .collect();
            write_values(file, &shape, v)?;
        }
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 | DType::F8E8M0 => {
            // numpy has no float8/float4: write float32 values (exact).
            let v = t.exotic_to_f32().context("dtype mismatch")?;
            write_values(file, &shape, v)?;
        }
        DType::String => bail!("string outputs cannot be written as .npy"),
    }
    Ok(())
}

fn write_values<T: npyz::AutoSerialize>(file: &mut Vec<u8>, shape: &[u64], values: Vec<T>) -> Result<()> {
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut *file)
        .begin_nd()?;
    w.extend(values)?;
    w.finish()?;
    Ok(())
}

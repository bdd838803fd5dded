use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use kiln_graph::{DType, TensorData};

use crate::{proto, ModelSource, OnnxError, Result};

/// Converts a `TensorProto` (inline typed fields, `raw_data`, or external data) into host data.
pub fn tensor_from_proto(t: &proto::TensorProto, source: &ModelSource) -> Result<TensorData> {
    let name = t.name.clone().unwrap_or_default();
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code).ok_or_else(|| OnnxError::Tensor {
        name: name.clone(),
        reason: format!("unsupported data type code {code}"),
    })?;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        dims.push(usize::try_from(d).map_err(|_| OnnxError::Tensor {
            name: name.clone(),
            reason: format!("negative dim {d}"),
        })?);
    }
    if t.segment.is_some() {
        return Err(OnnxError::Unsupported(format!("tensor '{name}' is segmented")));
    }
    // Its declared size, before anything is read or allocated for it.
    let elems = dims
        .iter()
        .try_fold(1u128, |a, &d| a.checked_mul(d as u128))
        .unwrap_or(u128::MAX);
    let declared = elems.saturating_mul(dtype.size_in_bytes().max(1) as u128);
    crate::LoadLimits::check(
        format!("tensor '{name}' (dims {dims:?}, {dtype}) in bytes"),
        declared,
        source.limits.max_tensor_bytes,
        "max_tensor_bytes",
    )?;
    if dtype == DType::String {
        return Ok(TensorData::strings(name, dims, t.string_data.clone())?);
    }
    let external = t.data_location == Some(proto::tensor_proto::DataLocation::External as i32);
    if external {
        let bytes = read_external(t, &name, &dims, dtype, source)?;
        return Ok(TensorData::new(name, dtype, dims, bytes)?);
    }
    if let Some(raw) = &t.raw_data {
        // One copy, from the model's buffer into the tensor's own.
        let data = TensorData::from_le_slice(name, dtype, dims, raw)?;
        source.copied(raw);
        return Ok(data);
    }
    Ok(TensorData::new(name, dtype, dims, typed_fields_to_bytes(t, dtype))?)
}

fn typed_fields_to_bytes(t: &proto::TensorProto, dtype: DType) -> Vec<u8> {
    let mut out = Vec::new();
    match dtype {
        DType::F32 => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::U64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::U32 => t
            .uint64_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u32).to_le_bytes())),
        DType::I32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I16 => t
            .int32_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as i16).to_le_bytes())),
        // float16/bfloat16 store their bit patterns in int32_data.
        DType::U16 | DType::F16 | DType::BF16 => t
            .int32_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        DType::I8 | DType::U8 | DType::Bool => t.int32_data.iter().for_each(|&v| out.push(v as u8)),
        // float8 types: one bit pattern per entry; 4-bit and 2-bit types: one packed byte per
        // entry (the same layout as raw_data).
        DType::F8E4M3FN
        | DType::F8E4M3FNUZ
        | DType::F8E5M2
        | DType::F8E5M2FNUZ
        | DType::F8E8M0
        | DType::U4
        | DType::I4
        | DType::F4E2M1
        | DType::U2
        | DType::I2 => t.int32_data.iter().for_each(|&v| out.push(v as u8)),
        DType::String => {}
    }
    out
}

fn read_external(
    t: &proto::TensorProto,
    name: &str,
    dims: &[usize],
    dtype: DType,
    source: &ModelSource,
) -> Result<Vec<u8>> {
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(k))
            .and_then(|e| e.value.clone())
    };
    let location = get("location").ok_or_else(|| OnnxError::Tensor {
        name: name.into(),
        reason: "external data without a location".into(),
    })?;
    let err = |reason: String| OnnxError::ExternalData {
        name: name.into(),
        location: location.clone(),
        reason,
    };
    let base = source
        .base_dir
        .as_ref()
        .ok_or_else(|| err("cannot be resolved: the model was not loaded from a file".into()))?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(err("escapes the model directory".into()));
    }
    let path = base.join(rel);
    let canon_base = base.canonicalize().map_err(|e| err(format!("base directory: {e}")))?;
    let canon = path.canonicalize().map_err(|e| err(format!("cannot be opened: {e}")))?;
    if !canon.starts_with(&canon_base) {
        return Err(err("escapes the model directory (through a link)".into()));
    }
    let parse = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| v.parse::<u64>().map_err(|_| err(format!("has a bad {k} '{v}'"))))
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let want = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| dtype.packed_size(n))
        .map(|n| n as u64)
        .ok_or_else(|| err("declares dims that overflow".into()))?;
    let length = parse("length")?.unwrap_or(want);
    if length != want {
        return Err(err(format!(
            "has length {length} but dims {dims:?} of {dtype} need {want} bytes"
        )));
    }
    let mut f = std::fs::File::open(&canon).map_err(|e| err(format!("cannot be opened: {e}")))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(err(format!(
            "range {offset}+{length} is past the end of the file ({size} bytes)"
        )));
    }
    f.seek(SeekFrom::Start(offset)).map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; length as usize];
    f.read_exact(&mut buf).map_err(|e| err(e.to_string()))?;
    Ok(buf)
}

/// Converts host data to a `TensorProto` with `raw_data` (strings use `string_data`).
pub fn tensor_to_proto(t: &TensorData) -> proto::TensorProto {
    let mut p = proto::TensorProto {
        name: Some(t.name.clone()),
        data_type: Some(t.dtype.to_onnx()),
        dims: t.dims.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    match t.string_data() {
        Some(s) => p.string_data = s.to_vec(),
        None => p.raw_data = Some(bytes::Bytes::copy_from_slice(t.bytes())),
    }
    p
}

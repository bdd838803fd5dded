//! THE RULE (same as ort_rates.py): output counts equal; shapes exactly equal; dtypes equal;
//! floats: |a - e| <= atol + rtol * |e| computed in f64 with rtol = max(1e-3, test rtol),
//! atol = max(1e-5, test atol); NaN equals NaN; infinities must match exactly; integers and
//! bools exact; sequences element-wise with equal lengths; optionals both empty or compared.

use kiln::internals::onnx::DataValue;
use kiln::{DType, TensorData};

pub struct Tol {
    pub rtol: f64,
    pub atol: f64,
}

pub fn compare(actual: &DataValue, expected: &DataValue, tol: &Tol) -> Result<(), String> {
    match (actual, expected) {
        (DataValue::Tensor(a), DataValue::Tensor(e)) => compare_tensor(a, e, tol),
        (DataValue::Sequence(a), DataValue::Sequence(e)) => {
            if a.len() != e.len() {
                return Err(format!("sequence length {} != {}", a.len(), e.len()));
            }
            for (i, (x, y)) in a.iter().zip(e).enumerate() {
                compare(x, y, tol).map_err(|m| format!("sequence[{i}]: {m}"))?;
            }
            Ok(())
        }
        (DataValue::Optional(a), DataValue::Optional(e)) => match (a, e) {
            (None, None) => Ok(()),
            (Some(x), Some(y)) => compare(x, y, tol),
            _ => Err("optional presence differs".into()),
        },
        // A present optional compared to a bare value (and vice versa) is a mismatch of kind.
        _ => Err("value kinds differ".into()),
    }
}

pub fn compare_tensor(a: &TensorData, e: &TensorData, tol: &Tol) -> Result<(), String> {
    if a.dims != e.dims {
        return Err(format!("shape {:?} != expected {:?}", a.dims, e.dims));
    }
    if a.dtype != e.dtype {
        return Err(format!("dtype {} != expected {}", a.dtype, e.dtype));
    }
    if e.dtype == DType::String {
        return if a.string_data() == e.string_data() {
            Ok(())
        } else {
            Err("strings differ".into())
        };
    }
    if e.dtype.is_float() {
        let (av, ev) = (floats(a), floats(e));
        if av.len() != ev.len() || ev.len() != e.len() {
            return Err(format!("{} values could not be decoded", e.dtype));
        }
        for (i, (&x, &y)) in av.iter().zip(&ev).enumerate() {
            let ok = if y.is_nan() {
                x.is_nan()
            } else if y.is_infinite() {
                x == y
            } else {
                (x - y).abs() <= tol.atol + tol.rtol * y.abs()
            };
            if !ok {
                return Err(format!("element {i}: {x} != expected {y}"));
            }
        }
        return Ok(());
    }
    if a.bytes() != e.bytes() {
        let (av, ev) = (a.to_i64_vec().unwrap_or_default(), e.to_i64_vec().unwrap_or_default());
        let i = av.iter().zip(&ev).position(|(x, y)| x != y).unwrap_or(0);
        return Err(format!("element {i}: {:?} != expected {:?}", av.get(i), ev.get(i)));
    }
    Ok(())
}

fn floats(t: &TensorData) -> Vec<f64> {
    match t.dtype {
        DType::F32 => t
            .values::<f32>()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::F64 => t.values::<f64>().unwrap_or_default(),
        DType::F16 => t
            .values::<half::f16>()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::BF16 => t
            .values::<half::bf16>()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect(),
        // float8 / float4 / e8m0: decoded (exactly) to f32.
        d if d.is_exotic() => t
            .exotic_to_f32()
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect(),
        _ => Vec::new(),
    }
}

//! Block-wise 4-bit weight quantization (`kiln quantize --mode int4-weight`): every MatMul with a
//! constant f32 `[K, N]` weight becomes ONNX Runtime's `com.microsoft::MatMulNBits` (the form its
//! `MatMul4BitsQuantizer` and onnxruntime-genai's int4 builds write, so ONNX Runtime runs the file):
//!
//! ```text
//! Y = MatMulNBits(A, B_q, scales, zero_points)   K, N, bits = 4, block_size
//! ```
//!
//! Each column `n` of the weight is cut along K into blocks of `block_size` values (the last one
//! padded with zeros). Per block, asymmetric uint4: the range `[min(lo, 0), max(hi, 0)]` maps onto
//! 0..15, `scale = (max - min) / 15`, `zero_point = clamp(round(-min / scale), 0, 15)`, codes
//! `clamp(round(v / scale) + zero_point, 0, 15)`, so zero is exact and every value is within
//! `scale / 2` of its dequantized `(code - zero_point) * scale`. Layouts (MatMulNBits'): `B_q`
//! `[N, n_blocks, block_size / 2]` uint8, two codes per byte, the lower K index in the low nibble;
//! `scales` `[N * n_blocks]` f32; `zero_points` `[N * ceil(n_blocks / 2)]` uint8, packed the same way.
//!
//! The same skips as the int8 modes ([`super::quantize`]): weights that are graph inputs or
//! outputs, smaller than `min_elements`, not finite, or also read by anything other than a MatMul
//! weight input stay f32. Gemm stays f32 (as in ONNX Runtime's quantizer).

use std::collections::BTreeMap;

use crate::{Attribute, DType, Graph, Result, TensorData, ValueId};

use super::edit::{input, make_node, out0, Index};
use super::quantize::{QuantizeOptions, QuantizeReport, QuantizedWeight};

/// The domain of MatMulNBits.
pub const MS_DOMAIN: &str = "com.microsoft";

/// MatMulNBits' block sizes: a power of two, at least 16 (ONNX Runtime's rule).
pub fn valid_block_size(b: usize) -> bool {
    b >= 16 && b.is_power_of_two()
}

/// A weight quantized to 4 bits in MatMulNBits' layouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Weight {
    pub k: usize,
    pub n: usize,
    pub block_size: usize,
    /// `[N, n_blocks, block_size / 2]`
    pub codes: Vec<u8>,
    /// `[N * n_blocks]`
    pub scales: Vec<f32>,
    /// `[N * ceil(n_blocks / 2)]`
    pub zero_points: Vec<u8>,
}

impl Int4Weight {
    pub fn n_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }

    /// The dequantized `[K, N]` weight (row-major), for checks.
    pub fn dequantize(&self) -> Vec<f32> {
        let (nb, blob) = (self.n_blocks(), self.block_size / 2);
        let zp_row = nb.div_ceil(2);
        let mut w = vec![0f32; self.k * self.n];
        for col in 0..self.n {
            for b in 0..nb {
                let scale = self.scales[col * nb + b];
                let zp = nibble(&self.zero_points[col * zp_row..], b) as f32;
                let codes = &self.codes[(col * nb + b) * blob..][..blob];
                for i in 0..self.block_size {
                    let k = b * self.block_size + i;
                    if k < self.k {
                        w[k * self.n + col] = (nibble(codes, i) as f32 - zp) * scale;
                    }
                }
            }
        }
        w
    }
}

#[inline]
fn nibble(bytes: &[u8], i: usize) -> u8 {
    (bytes[i / 2] >> (4 * (i % 2))) & 0xF
}

#[inline]
fn set_nibble(bytes: &mut [u8], i: usize, v: u8) {
    bytes[i / 2] |= (v & 0xF) << (4 * (i % 2));
}

/// Quantizes a row-major f32 `[K, N]` weight block-wise to 4 bits; `None` when a value is not
/// finite, the shape is not 2-D or the block size is not valid.
pub fn quantize_blockwise_int4(t: &TensorData, block_size: usize) -> Option<Int4Weight> {
    let w = t.values::<f32>()?;
    let (k, n) = match t.dims.as_slice() {
        [k, n] => (*k, *n),
        _ => return None,
    };
    if !valid_block_size(block_size) || w.len() != k * n || w.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let nb = k.div_ceil(block_size);
    let blob = block_size / 2;
    let zp_row = nb.div_ceil(2);
    let mut codes = vec![0u8; n * nb * blob];
    let mut scales = vec![0f32; n * nb];
    let mut zero_points = vec![0u8; n * zp_row];
    let mut block = Vec::with_capacity(block_size);
    for col in 0..n {
        for b in 0..nb {
            block.clear();
            block.extend((b * block_size..((b + 1) * block_size).min(k)).map(|kk| w[kk * n + col]));
            let lo = block.iter().fold(0f32, |m, &v| m.min(v));
            let hi = block.iter().fold(0f32, |m, &v| m.max(v));
            let (scale, zp) = if hi > lo {
                let scale = (hi - lo) / 15.0;
                (scale, (-lo / scale).round().clamp(0.0, 15.0))
            } else {
                // An all-zero block: any scale represents it exactly.
                (1.0, 0.0)
            };
            scales[col * nb + b] = scale;
            set_nibble(&mut zero_points[col * zp_row..], b, zp as u8);
            let out = &mut codes[(col * nb + b) * blob..][..blob];
            // Padding past K stays code 0 in bytes the reader never multiplies by a real A value.
            for (i, &v) in block.iter().enumerate() {
                let q = ((v / scale).round() + zp).clamp(0.0, 15.0) as u8;
                set_nibble(out, i, q);
            }
        }
    }
    Some(Int4Weight {
        k,
        n,
        block_size,
        codes,
        scales,
        zero_points,
    })
}

/// Rewrites every quantizable MatMul to MatMulNBits (4 bits, `block_size`). The caller declares the
/// `com.microsoft` opset on the model when any weight was quantized.
pub fn quantize_weights_int4(g: &mut Graph, q: &QuantizeOptions, block_size: usize) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    if !valid_block_size(block_size) {
        return Err(crate::GraphError::Pass {
            pass: "int4-weight".into(),
            reason: format!("block size {block_size}: MatMulNBits needs a power of two >= 16"),
        });
    }
    let mut idx = Index::new(g);
    let mut reads: BTreeMap<ValueId, Vec<usize>> = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !n.domain.is_empty() || n.op_type != "MatMul" {
            continue;
        }
        let Some(b) = input(n, 1) else { continue };
        let is_weight =
            super::edit::constant(g, &q.options, b).is_some_and(|t| t.dtype == DType::F32 && t.dims.len() == 2);
        if is_weight {
            reads.entry(b).or_default().push(i);
        }
    }
    // weight -> (codes, scales, zero points, K, N)
    let mut quantized: BTreeMap<ValueId, (ValueId, ValueId, ValueId, usize, usize)> = BTreeMap::new();
    for (b, readers) in reads {
        let name = g.value_name(b).to_string();
        let skip = |report: &mut QuantizeReport, why: String| report.skipped.push((name.clone(), why));
        let Some(t) = g.initializers.get(&b) else { continue };
        if idx.pinned.contains(&b) {
            skip(&mut report, "a graph input or output".into());
            continue;
        }
        if idx.readers(b).len() != readers.len() || readers.iter().any(|&r| input(&g.nodes[r], 0) == Some(b)) {
            skip(&mut report, "also read as something other than a MatMul weight".into());
            continue;
        }
        if t.len() < q.min_elements {
            skip(&mut report, format!("{} elements < {}", t.len(), q.min_elements));
            continue;
        }
        let Some(qw) = quantize_blockwise_int4(t, block_size) else {
            skip(&mut report, "not finite".into());
            continue;
        };
        let before = t.bytes().len();
        let dims = t.dims.clone();
        let (k, n, nb) = (qw.k, qw.n, qw.n_blocks());
        let ct = TensorData::new(format!("{name}_Q4"), DType::U8, vec![n, nb, block_size / 2], qw.codes)?;
        let st = TensorData::from_values(format!("{name}_scales"), vec![n * nb], &qw.scales)?;
        let zt = TensorData::new(
            format!("{name}_zp"),
            DType::U8,
            vec![qw.zero_points.len()],
            qw.zero_points,
        )?;
        report.bytes_before += before;
        report.bytes_after += ct.bytes().len() + st.bytes().len() + zt.bytes().len();
        let cv = idx.new_initializer(g, &format!("{name}_Q4"), ct);
        let sv = idx.new_initializer(g, &format!("{name}_scales"), st);
        let zv = idx.new_initializer(g, &format!("{name}_zp"), zt);
        quantized.insert(b, (cv, sv, zv, k, n));
        g.initializers.remove(&b);
        report.weights.push(QuantizedWeight {
            name,
            dims,
            axis: 1,
            readers: readers.len(),
        });
    }
    for node in g.nodes.iter_mut() {
        if !node.domain.is_empty() || node.op_type != "MatMul" {
            continue;
        }
        let (Some(a), Some(b), Some(out)) = (input(node, 0), input(node, 1), out0(node)) else {
            continue;
        };
        let Some(&(cv, sv, zv, k, n)) = quantized.get(&b) else {
            continue;
        };
        let attrs = BTreeMap::from([
            ("K".to_string(), Attribute::Int(k as i64)),
            ("N".to_string(), Attribute::Int(n as i64)),
            ("bits".to_string(), Attribute::Int(4)),
            ("block_size".to_string(), Attribute::Int(block_size as i64)),
        ]);
        *node = make_node(
            node.name.clone(),
            MS_DOMAIN,
            "MatMulNBits",
            vec![Some(a), Some(cv), Some(sv), Some(zv)],
            vec![Some(out)],
            attrs,
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(k: usize, n: usize, seed: u32) -> TensorData {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let v: Vec<f32> = (0..k * n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // Mixed signs and magnitudes, an all-positive column and an all-zero one.
                let x = (s % 2001) as f32 / 1000.0 - 1.0;
                match i % n {
                    0 => x.abs() + 0.5,
                    1 => 0.0,
                    c => x * (1.0 + c as f32),
                }
            })
            .collect();
        TensorData::from_values("w", vec![k, n], &v).unwrap()
    }

    #[test]
    fn every_value_within_half_a_step_and_zero_exact() {
        for (k, n, block) in [(64, 5, 16), (70, 3, 32), (33, 4, 16), (8, 3, 32)] {
            let t = weight(k, n, (k * n) as u32);
            let q = quantize_blockwise_int4(&t, block).unwrap();
            assert_eq!(q.n_blocks(), k.div_ceil(block));
            assert_eq!(q.codes.len(), n * q.n_blocks() * block / 2);
            assert_eq!(q.zero_points.len(), n * q.n_blocks().div_ceil(2));
            let w = t.values::<f32>().unwrap();
            let back = q.dequantize();
            for kk in 0..k {
                for c in 0..n {
                    let scale = q.scales[c * q.n_blocks() + kk / block];
                    let (x, y) = (w[kk * n + c], back[kk * n + c]);
                    assert!(
                        (x - y).abs() <= scale / 2.0 + 1e-6,
                        "k {kk} n {c}: {x} vs {y} (scale {scale})"
                    );
                    if x == 0.0 {
                        assert_eq!(y, 0.0);
                    }
                }
            }
        }
        assert!(quantize_blockwise_int4(&weight(16, 2, 1), 24).is_none());
        let nan = TensorData::from_values("w", vec![2, 1], &[1.0f32, f32::NAN]).unwrap();
        assert!(quantize_blockwise_int4(&nan, 16).is_none());
    }

    #[test]
    fn packing_is_low_nibble_first() {
        // One column, one block of 16: values 0..15 with min 0 and max 15 map to codes 0..15.
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let t = TensorData::from_values("w", vec![16, 1], &v).unwrap();
        let q = quantize_blockwise_int4(&t, 16).unwrap();
        assert_eq!(q.scales, vec![1.0]);
        assert_eq!(q.zero_points, vec![0]);
        assert_eq!(q.codes, vec![0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]);
    }
}

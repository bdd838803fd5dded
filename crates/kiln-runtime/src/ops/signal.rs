//! Operator family `signal`: DFT, STFT, Hann/Hamming/Blackman windows, MelWeightMatrix.
//!
//! DFTs are computed as matmuls against cos/sin matrices in f64 (exact enough for any length,
//! whole-tensor work), then cast to the input dtype.

use std::f64::consts::PI;

use candle_core::{DType as CDType, Device as CDevice, Tensor as CT};
use kiln_graph::DType;

use super::common::{norm_axis, tin, tin_opt};
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add("DFT", dft);
    r.add("STFT", stft);
    r.add("HannWindow", |n| window(n, Win::Hann));
    r.add("HammingWindow", |n| window(n, Win::Hamming));
    r.add("BlackmanWindow", |n| window(n, Win::Blackman));
    r.add("MelWeightMatrix", mel);
}

/// Limit on DFT lengths (the cos/sin matrices are n*m f64 values).
const MAX_DFT: usize = 1 << 16;

fn scalar_i64(t: &Tensor, what: &str) -> Result<i64> {
    let v = t.to_i64_vec()?;
    if v.len() != 1 {
        bail!("{what} must be a scalar, got shape {:?}", t.dims());
    }
    Ok(v[0])
}

fn scalar_f64(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_f64_vec()?;
    if v.len() != 1 {
        bail!("{what} must be a scalar, got shape {:?}", t.dims());
    }
    Ok(v[0])
}

/// (cos, sin) matrices of shape (n, m) with angle 2*pi*(j*k mod len)/len.
fn trig(n: usize, m: usize, len: usize, dev: &CDevice) -> Result<(CT, CT)> {
    let mut c = Vec::with_capacity(n * m);
    let mut s = Vec::with_capacity(n * m);
    for j in 0..n {
        for k in 0..m {
            let a = 2.0 * PI * (((j as u128 * k as u128) % len as u128) as f64) / len as f64;
            c.push(a.cos());
            s.push(a.sin());
        }
    }
    Ok((CT::from_vec(c, (n, m), dev)?, CT::from_vec(s, (n, m), dev)?))
}

/// DFT of `x` (f64, shape [..., c] with c in {1, 2}) along `axis` (an axis other than the last).
/// Returns an f64 tensor of shape [..., 2] (or [..., 1] for the inverse one-sided transform).
fn dft_core(x: &CT, axis: usize, len: usize, inverse: bool, onesided: bool) -> Result<CT> {
    let rank = x.rank();
    let comp = x.dim(rank - 1)?;
    if comp != 1 && comp != 2 {
        bail!("DFT input's last dimension must be 1 or 2, got {comp}");
    }
    if axis + 1 >= rank {
        bail!("DFT axis {axis} must not be the last (complex) axis of a rank-{rank} input");
    }
    if len == 0 || len > MAX_DFT {
        bail!("dft_length {len} is out of range");
    }
    let dev = x.device();
    // Move the transformed axis to the end: [rest..., n].
    let (xr, xi) = if comp == 2 {
        (
            x.narrow(rank - 1, 0, 1)?.squeeze(rank - 1)?,
            Some(x.narrow(rank - 1, 1, 1)?.squeeze(rank - 1)?),
        )
    } else {
        (x.squeeze(rank - 1)?, None)
    };
    let last = rank - 2;
    let mv = |t: CT| -> Result<CT> { Ok(t.transpose(axis, last)?.contiguous()?) };
    let xr = mv(xr)?;
    let xi = xi.map(mv).transpose()?;
    let moved_dims = xr.dims().to_vec();
    let n_in = moved_dims[last];
    let rows: usize = moved_dims[..last].iter().product();
    let flat = |t: CT| -> Result<CT> { Ok(t.reshape((rows, n_in))?) };
    let xr = flat(xr)?;
    let xi = xi.map(flat).transpose()?;
    // Number of input samples used (numpy pads/truncates the input to the transform length).
    let (out_len, used, real_out) = if inverse && onesided {
        (len, n_in.min(len / 2 + 1), true)
    } else if onesided {
        (len / 2 + 1, n_in.min(len), false)
    } else {
        (len, n_in.min(len), false)
    };
    if rows == 0 || used == 0 {
        let mut od = moved_dims.clone();
        od[last] = out_len;
        od.push(if real_out { 1 } else { 2 });
        let z = CT::zeros(od.as_slice(), CDType::F64, dev)?;
        return Ok(z.transpose(axis, last)?.contiguous()?);
    }
    let xr = xr.narrow(1, 0, used)?;
    let xi = xi.map(|t| t.narrow(1, 0, used)).transpose()?;
    let (re, im) = if inverse && onesided {
        // irfft: x_n = 1/N sum_k w_k (Re X_k cos - Im X_k sin), w_k = 1 for DC/Nyquist else 2.
        let weights: Vec<f64> = (0..used)
            .map(|k| {
                if k == 0 || (len.is_multiple_of(2) && k == len / 2) {
                    1.0
                } else {
                    2.0
                }
            })
            .collect();
        // Matrices indexed (k, n) so that X (rows, k) @ M (k, n).
        let (c, s) = trig(used, out_len, len, dev)?;
        let w = CT::from_vec(weights, (used, 1), dev)?;
        let (c, s) = (c.broadcast_mul(&w)?, s.broadcast_mul(&w)?);
        let mut re = xr.matmul(&c)?;
        if let Some(xi) = &xi {
            re = re.sub(&xi.matmul(&s)?)?;
        }
        (re.affine(1.0 / len as f64, 0.0)?, None)
    } else {
        let (c, s) = trig(used, out_len, len, dev)?;
        // forward: Re = xr C + xi S, Im = xi C - xr S ; inverse: Re = xr C - xi S, Im = xr S + xi C
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut re = xr.matmul(&c)?;
        let mut im = xr.matmul(&s)?.affine(-sign, 0.0)?;
        if let Some(xi) = &xi {
            re = re.add(&xi.matmul(&s)?.affine(sign, 0.0)?)?;
            im = im.add(&xi.matmul(&c)?)?;
        }
        if inverse {
            let f = 1.0 / len as f64;
            (re.affine(f, 0.0)?, Some(im.affine(f, 0.0)?))
        } else {
            (re, Some(im))
        }
    };
    let mut od = moved_dims.clone();
    od[last] = out_len;
    let back = |t: CT| -> Result<CT> { Ok(t.reshape(od.as_slice())?.transpose(axis, last)?.unsqueeze(rank - 1)?) };
    let out = match (real_out, im) {
        (false, Some(im)) => CT::cat(&[&back(re)?, &back(im)?], rank - 1)?,
        _ => back(re)?,
    };
    Ok(out.contiguous()?)
}

fn to_f64(t: &Tensor) -> Result<CT> {
    if !t.dtype().is_float() {
        bail!("expected a float tensor, found {}", t.dtype());
    }
    Ok(t.candle().to_dtype(CDType::F64)?)
}

fn from_f64(c: CT, dt: DType) -> Result<Tensor> {
    Tensor::new(c.to_dtype(crate::tensor::storage_dtype(dt)?)?, dt)
}

fn dft(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let opset = n.opset;
    let attr_axis = n.attr_i("axis", 1)?;
    let inverse = n.attr_i("inverse", 0)? != 0;
    let onesided = n.attr_i("onesided", 0)? != 0;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        let rank = x.rank();
        if rank < 2 {
            bail!("DFT input must have rank >= 2");
        }
        let axis = if opset >= 20 {
            match tin_opt(ins, 2)? {
                Some(a) => scalar_i64(a, "axis")?,
                None => -2,
            }
        } else {
            attr_axis
        };
        let axis = norm_axis(axis, rank)?;
        if axis == rank - 1 {
            bail!("DFT axis must not be the last (complex) axis");
        }
        let n_in = x.dims()[axis];
        let len = match tin_opt(ins, 1)? {
            Some(l) => {
                let l = scalar_i64(l, "dft_length")?;
                if l <= 0 {
                    bail!("dft_length must be positive, got {l}");
                }
                l as usize
            }
            None if inverse && onesided => 2 * n_in.saturating_sub(1),
            None => n_in,
        };
        cx.check_alloc(n_in.min(len) as u128 * len as u128 * 2, DType::F64)?;
        let y = dft_core(&to_f64(x)?, axis, len, inverse, onesided)?;
        out1(from_f64(y, x.dtype())?)
    }))
}

fn stft(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let onesided = n.attr_i("onesided", 1)? != 0;
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        if x.rank() != 3 {
            bail!("STFT signal must be [batch, length, 1 or 2]");
        }
        let step = scalar_i64(tin(ins, 1)?, "frame_step")?;
        if step <= 0 {
            bail!("frame_step must be positive");
        }
        let window = tin_opt(ins, 2)?;
        let flen = match tin_opt(ins, 3)? {
            Some(f) => scalar_i64(f, "frame_length")?,
            None => match window {
                Some(w) => w.dims().first().copied().unwrap_or(0) as i64,
                None => x.dims()[1] as i64,
            },
        };
        let sig_len = x.dims()[1] as i64;
        if flen <= 0 || flen > sig_len {
            bail!("frame_length {flen} is out of range for a signal of length {sig_len}");
        }
        let flen = flen as usize;
        let step = step as usize;
        let frames = 1 + (sig_len as usize - flen) / step;
        let batch = x.dims()[0];
        let comp = x.dims()[2];
        cx.check_alloc(super::common::elems(&[batch, frames, flen, comp.max(2)]), DType::F64)?;
        cx.check_alloc(flen as u128 * flen as u128 * 2, DType::F64)?;
        let xc = to_f64(x)?;
        let mut fr = Vec::with_capacity(frames);
        for f in 0..frames {
            fr.push(xc.narrow(1, f * step, flen)?);
        }
        let mut framed = CT::stack(&fr, 1)?; // (batch, frames, flen, comp)
        if let Some(w) = window {
            if w.rank() != 1 || w.dims()[0] != flen {
                bail!("window shape {:?} does not match frame_length {flen}", w.dims());
            }
            let wc = to_f64(w)?.reshape((1, 1, flen, 1))?;
            framed = framed.broadcast_mul(&wc)?;
        }
        let y = dft_core(&framed, 2, flen, false, onesided)?;
        out1(from_f64(y, x.dtype())?)
    }))
}

#[derive(Clone, Copy)]
enum Win {
    Hann,
    Hamming,
    Blackman,
}

fn out_dtype(n: &NodeCtx) -> Result<DType> {
    let code = n.attr_i("output_datatype", 1)?;
    DType::from_onnx(code as i32).ok_or_else(|| n.err(format!("unsupported output_datatype {code}")))
}

fn window(n: &NodeCtx, kind: Win) -> Result<Box<dyn OpKernel>> {
    let periodic = n.attr_i("periodic", 1)? != 0;
    let dt = out_dtype(n)?;
    Ok(kernel(move |cx, ins| {
        let size = scalar_i64(tin(ins, 0)?, "size")?;
        if size < 0 {
            bail!("window size must be nonnegative, got {size}");
        }
        cx.check_alloc(size as u128, dt)?;
        let size = size as usize;
        let n1 = if periodic { size as f64 } else { size as f64 - 1.0 };
        let v: Vec<f64> = (0..size)
            .map(|i| {
                let x = i as f64;
                match kind {
                    Win::Hann => (x * PI / n1).sin().powi(2),
                    Win::Hamming => {
                        let a = 25.0 / 46.0;
                        a - (x * PI * 2.0 / n1).cos() * (1.0 - a)
                    }
                    Win::Blackman => 0.42 - 0.5 * (x * PI * 2.0 / n1).cos() + 0.08 * (x * PI * 4.0 / n1).cos(),
                }
            })
            .collect();
        out1(Tensor::from_f64s(v, &[size], dt, cx.device)?)
    }))
}

fn mel(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let dt = out_dtype(n)?;
    Ok(kernel(move |cx, ins| {
        let bins = scalar_i64(tin(ins, 0)?, "num_mel_bins")?;
        let dft_len = scalar_i64(tin(ins, 1)?, "dft_length")?;
        let rate = scalar_i64(tin(ins, 2)?, "sample_rate")?;
        let lo = scalar_f64(tin(ins, 3)?, "lower_edge_hertz")?;
        let hi = scalar_f64(tin(ins, 4)?, "upper_edge_hertz")?;
        if bins <= 0 || dft_len <= 0 || rate <= 0 {
            bail!("num_mel_bins, dft_length and sample_rate must be positive");
        }
        let spec_bins = (dft_len / 2 + 1) as usize;
        let bins = bins as usize;
        cx.check_alloc(super::common::elems(&[spec_bins, bins]), dt)?;
        let to_mel = |h: f64| 2595.0 * (h / 700.0).ln_1p() / 10f64.ln();
        let (lm, hm) = (to_mel(lo), to_mel(hi));
        let step = (hm - lm) / (bins + 2) as f64;
        let fb: Vec<i64> = (0..bins + 2)
            .map(|i| {
                let m = i as f64 * step + lm;
                let hz = 700.0 * (m / 2595.0 * 10f64.ln()).exp_m1();
                (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
            })
            .collect();
        let mut out = vec![0f64; spec_bins * bins];
        let mut set = |j: i64, i: usize, v: f64| -> Result<()> {
            if j < 0 || j as usize >= spec_bins {
                bail!("mel filter index {j} is out of range for {spec_bins} spectrogram bins");
            }
            out[j as usize * bins + i] = v;
            Ok(())
        };
        for i in 0..bins {
            let (l, c, h) = (fb[i], fb[i + 1], fb[i + 2]);
            let lc = c - l;
            if lc == 0 {
                set(c, i, 1.0)?;
            } else {
                for j in l..=c {
                    set(j, i, (j - l) as f64 / lc as f64)?;
                }
            }
            let ch = h - c;
            if ch > 0 {
                for j in c..h {
                    set(j, i, (h - j) as f64 / ch as f64)?;
                }
            }
        }
        out1(Tensor::from_f64s(out, &[spec_bins, bins], dt, cx.device)?)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dft_round_trip() {
        let dev = CDevice::Cpu;
        let v: Vec<f64> = (0..2 * 7 * 2).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let x = CT::from_vec(v.clone(), (2, 7, 2), &dev).unwrap();
        let f = dft_core(&x, 1, 7, false, false).unwrap();
        assert_eq!(f.dims(), &[2, 7, 2]);
        let b = dft_core(&f, 1, 7, true, false).unwrap();
        let back: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (a, e) in back.iter().zip(&v) {
            assert!((a - e).abs() < 1e-9, "{a} vs {e}");
        }
    }

    #[test]
    fn rfft_irfft_round_trip() {
        let dev = CDevice::Cpu;
        let v: Vec<f64> = (0..8).map(|i| (i as f64 * 0.7).sin()).collect();
        let x = CT::from_vec(v.clone(), (1, 8, 1), &dev).unwrap();
        let f = dft_core(&x, 1, 8, false, true).unwrap();
        assert_eq!(f.dims(), &[1, 5, 2]);
        let b = dft_core(&f, 1, 8, true, true).unwrap();
        assert_eq!(b.dims(), &[1, 8, 1]);
        let back: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (a, e) in back.iter().zip(&v) {
            assert!((a - e).abs() < 1e-9, "{a} vs {e}");
        }
    }
}

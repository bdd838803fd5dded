//! Vectorizable f32 transcendental functions for CPU kernels (exp, erf, tanh, sigmoid, GELU).
//!
//! libm's scalar `erf`/`exp` cost 10-30 ns per element and block auto-vectorization; these are
//! branch-free polynomial / rational approximations (Cephes `expf`, Eigen's `erf` and `tanh`
//! rational forms) that LLVM turns into AVX2+FMA code. Accuracy, checked against libm in the
//! tests below over dense grids: exp and sigmoid within relative 1e-6, erf within 5e-7 absolute
//! (f32 evaluation of Eigen's form), tanh within 3e-7 absolute, GELU within 1.5e-6 absolute.
//! NaN in gives NaN out; +-inf behave as the limits.
//!
//! Dispatch: the kernels are compiled twice, once with `avx2,fma` enabled (picked at run time when
//! the CPU has both) and once for the baseline target.

use candle_core::{CpuStorage, Storage, Tensor as CT};
use rayon::prelude::*;

/// An element-wise f32 kernel over a slice (`src` and `dst` have equal length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Func {
    Exp,
    Erf,
    Tanh,
    Sigmoid,
    /// x * 0.5 * (1 + erf(x / sqrt 2))
    GeluErf,
    /// x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    GeluTanh,
}

#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn exp1<const FMA: bool>(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -87.336_54;
    let xc = x.clamp(LO, HI);
    let fx = madd::<FMA>(xc, std::f32::consts::LOG2_E, 0.5).floor();
    let r = madd::<FMA>(fx, -0.693_359_4, xc);
    let r = madd::<FMA>(fx, 2.121_944_4e-4, r);
    let mut y = 1.987_569_1e-4f32;
    y = madd::<FMA>(y, r, 1.398_199_9e-3);
    y = madd::<FMA>(y, r, 8.333_452e-3);
    y = madd::<FMA>(y, r, 4.166_579_6e-2);
    y = madd::<FMA>(y, r, 1.666_666_5e-1);
    y = madd::<FMA>(y, r, 0.5);
    y = madd::<FMA>(y, r * r, r + 1.0);
    // 2^fx through the exponent bits, in two halves so fx = 128 (x near HI) stays in range.
    // A saturating `as i32` does not vectorize (LLVM emits it lane by lane); fx is finite and within
    // [-126, 128] here (xc is clamped), except for a NaN input, whose result is replaced below.
    let fx_finite = if fx.is_nan() { 0.0 } else { fx };
    // SAFETY: fx_finite is a finite whole number in [-126, 128], which an i32 holds.
    let n = unsafe { fx_finite.to_int_unchecked::<i32>() }.clamp(-126, 128);
    let n1 = n >> 1;
    let scaled = y * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n - n1 + 127) as u32) << 23);
    // Above HI the clamp would give a finite value; below LO the true result underflows.
    let v = if x > HI { f32::INFINITY } else { scaled };
    let v = if x < LO { 0.0 } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

#[inline(always)]
fn erf1<const FMA: bool>(x: f32) -> f32 {
    let c = x.clamp(-4.0, 4.0);
    let x2 = c * c;
    let mut p = -2.726_142_3e-10f32;
    p = madd::<FMA>(x2, p, 2.770_681_4e-8);
    p = madd::<FMA>(x2, p, -2.101_024e-6);
    p = madd::<FMA>(x2, p, -5.692_506_4e-5);
    p = madd::<FMA>(x2, p, -7.349_906_3e-4);
    p = madd::<FMA>(x2, p, -2.954_6e-3);
    p = madd::<FMA>(x2, p, -1.609_603_3e-2);
    p *= c;
    let mut q = -1.456_607_2e-5f32;
    q = madd::<FMA>(x2, q, -2.133_740_5e-4);
    q = madd::<FMA>(x2, q, -1.682_827e-3);
    q = madd::<FMA>(x2, q, -7.373_329e-3);
    q = madd::<FMA>(x2, q, -1.426_474e-2);
    // Past 3.85, erf rounds to +-1 in f32; saturate exactly (the rational form is 3e-7 short).
    let v = if c.abs() > 3.85 { c.signum() } else { p / q };
    if x.is_nan() {
        x
    } else {
        v
    }
}

#[inline(always)]
fn tanh1<const FMA: bool>(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let c = x.clamp(-CLAMP, CLAMP);
    let x2 = c * c;
    let mut p = -2.760_768_5e-16f32;
    p = madd::<FMA>(x2, p, 2.000_188e-13);
    p = madd::<FMA>(x2, p, -8.604_672e-11);
    p = madd::<FMA>(x2, p, 5.122_297e-8);
    p = madd::<FMA>(x2, p, 1.485_722_4e-5);
    p = madd::<FMA>(x2, p, 6.372_619_3e-4);
    p = madd::<FMA>(x2, p, 4.893_524_6e-3);
    p *= c;
    let mut q = 1.198_258_4e-6f32;
    q = madd::<FMA>(x2, q, 1.185_347_1e-4);
    q = madd::<FMA>(x2, q, 2.268_434_6e-3);
    q = madd::<FMA>(x2, q, 4.893_525e-3);
    // At the clamp point tanh is within 3e-7 of +-1; saturate exactly beyond it.
    let v = if x.abs() >= CLAMP { c.signum() } else { p / q };
    // Tiny inputs: tanh(x) = x to f32 precision (also keeps -0.0).
    let v = if x.abs() < 4e-4 { x } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

/// The scalar form of `f` (inlined into the vector loops below).
#[inline(always)]
fn eval<const FMA: bool>(f: Func, x: f32) -> f32 {
    match f {
        Func::Exp => exp1::<FMA>(x),
        Func::Erf => erf1::<FMA>(x),
        Func::Tanh => tanh1::<FMA>(x),
        Func::Sigmoid => 1.0 / (1.0 + exp1::<FMA>(-x)),
        Func::GeluErf => 0.5 * x * (1.0 + erf1::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2)),
        Func::GeluTanh => {
            let inner = 0.797_884_6 * madd::<FMA>(0.044_715 * x * x, x, x);
            0.5 * x * (1.0 + tanh1::<FMA>(inner))
        }
    }
}

// One loop per function (the match hoisted out of the loop) so each one vectorizes.
macro_rules! per_func {
    ($f:expr, $fma:ident, $body:ident) => {
        match $f {
            Func::Exp => $body!(Func::Exp, $fma),
            Func::Erf => $body!(Func::Erf, $fma),
            Func::Tanh => $body!(Func::Tanh, $fma),
            Func::Sigmoid => $body!(Func::Sigmoid, $fma),
            Func::GeluErf => $body!(Func::GeluErf, $fma),
            Func::GeluTanh => $body!(Func::GeluTanh, $fma),
        }
    };
}

#[inline(always)]
fn apply<const FMA: bool>(f: Func, src: &[f32], dst: &mut [f32]) {
    macro_rules! body {
        ($k:expr, $fm:ident) => {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, &x)| *d = eval::<$fm>($k, x))
        };
    }
    per_func!(f, FMA, body)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn apply_avx2(f: Func, src: &[f32], dst: &mut [f32]) {
    apply::<true>(f, src, dst)
}

/// Whether the CPU runs the `avx2,fma` builds of the kernels (cached by std after the first call).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// A zeroed f32 buffer from `malloc` and a `memset`, not `calloc`: for large sizes the allocator's
/// calloc hands out fresh zero pages from the OS, which fault on first write every run (the kernel
/// zeroing them again), where a plain allocation reuses the pages the previous run freed.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0);
    v
}

/// [`apply_avx2`]'s loop on 16-lane vectors: the same per-lane operations (identical results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn apply_avx512(f: Func, src: &[f32], dst: &mut [f32]) {
    apply::<true>(f, src, dst)
}

/// Applies `f` to `src` into `dst` (single thread; equal lengths).
pub(crate) fn map_slice(f: Func, src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && crate::sgemm::use_avx512() {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked above).
        unsafe { apply_avx512(f, src, dst) };
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `apply_avx2` is compiled for (checked above).
        unsafe { apply_avx2(f, src, dst) };
        return;
    }
    apply::<false>(f, src, dst)
}

/// `x = exp(x)` in place with the vectorized kernel Kiln's Exp op uses (a few ulp; 0 below -87.3,
/// infinity above 88.7, NaN stays NaN).
pub fn exp_in_place(x: &mut [f32]) {
    let mut tmp = [0f32; 256];
    for chunk in x.chunks_mut(256) {
        let t = &mut tmp[..chunk.len()];
        t.copy_from_slice(chunk);
        map_slice(Func::Exp, t, chunk);
    }
}

#[inline(always)]
fn quantize_u8_impl(src: &[f32], scale: f32, zp: f32, dst: &mut [u8]) {
    dst.iter_mut()
        .zip(src)
        // max/min (not clamp) turn a NaN into 0; through i32 the conversion vectorizes.
        .for_each(|(q, &x)| {
            #[allow(clippy::manual_clamp)]
            let v = ((x / scale).round_ties_even() + zp).max(0.0).min(255.0);
            *q = v as i32 as u8
        });
}

/// 32 values per iteration: divide, round half to even, add the zero point, clamp (a NaN becomes
/// 0: `max_ps` returns its second operand when the first is NaN), convert and pack to bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_u8_avx2(src: &[f32], scale: f32, zp: f32, dst: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 32 * 32;
    let (sv, zv) = (_mm256_set1_ps(scale), _mm256_set1_ps(zp));
    let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let q = |p: *const f32| -> __m256i {
        // SAFETY: callers pass pointers to 8 readable f32 inside `src`.
        let x = unsafe { _mm256_loadu_ps(p) };
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_div_ps(x, sv));
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zv), lo), hi))
    };
    for i in (0..whole).step_by(32) {
        let p = src[i..i + 32].as_ptr();
        // SAFETY: `p` points at 32 f32 of `src` (the slice above).
        let (a, b, c, d) = (
            q(p),
            q(unsafe { p.add(8) }),
            q(unsafe { p.add(16) }),
            q(unsafe { p.add(24) }),
        );
        let bytes = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        // SAFETY: `dst[i..i + 32]` is in bounds (i + 32 <= whole <= dst.len()).
        unsafe { _mm256_storeu_si256(dst[i..i + 32].as_mut_ptr() as *mut __m256i, bytes) };
    }
    quantize_u8_impl(&src[whole..n], scale, zp, &mut dst[whole..n]);
}

/// `dst = saturate_u8(round_half_even(src / scale) + zp)` (ONNX QuantizeLinear to u8; a NaN gives 0).
pub(crate) fn quantize_u8(src: &[f32], scale: f32, zp: f32, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `quantize_u8_avx2` is compiled for (checked above).
        unsafe { quantize_u8_avx2(src, scale, zp, dst) };
        return;
    }
    quantize_u8_impl(src, scale, zp, dst)
}

#[inline(always)]
fn quantize_dequantize_impl(src: &[f32], scale: f32, zp: f32, lo: f32, hi: f32, dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(y, &x)| {
        // max/min (not clamp): a NaN becomes `lo`, as QuantizeLinear's code does.
        #[allow(clippy::manual_clamp)]
        let q = ((x / scale).round_ties_even() + zp).max(lo).min(hi);
        *y = (q - zp) * scale
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn quantize_dequantize_avx512(src: &[f32], scale: f32, zp: f32, lo: f32, hi: f32, dst: &mut [f32]) {
    quantize_dequantize_impl(src, scale, zp, lo, hi, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_dequantize_avx2(src: &[f32], scale: f32, zp: f32, lo: f32, hi: f32, dst: &mut [f32]) {
    quantize_dequantize_impl(src, scale, zp, lo, hi, dst)
}

/// A QuantizeLinear to the integer range `[lo, hi]` read back by its DequantizeLinear:
/// `y = (clamp(round_half_even(x / scale) + zp, lo, hi) - zp) * scale` (a NaN gives the code `lo`).
/// The same per-element operations on every build (no FMA contraction), so every build gives the
/// same bits.
pub(crate) fn quantize_dequantize(src: &[f32], scale: f32, zp: f32, lo: f32, hi: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        if crate::sgemm::use_avx512() {
            // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked above).
            unsafe { quantize_dequantize_avx512(src, scale, zp, lo, hi, dst) };
        } else {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { quantize_dequantize_avx2(src, scale, zp, lo, hi, dst) };
        }
        return;
    }
    quantize_dequantize_impl(src, scale, zp, lo, hi, dst)
}

#[inline(always)]
fn quantize_i8_impl(src: &[f32], scale: f32, zp: f32, dst: &mut [i16]) {
    dst.iter_mut().zip(src).for_each(|(q, &x)| {
        // A NaN becomes -128 (max returns its other operand), the range's low end as for u8.
        #[allow(clippy::manual_clamp)]
        let v = ((x / scale).round_ties_even() + zp).max(-128.0).min(127.0);
        // SAFETY: `v` is a whole number in [-128, 127] (max/min above never give a NaN), so it
        // fits i32; the unchecked conversion vectorizes where `as` (saturating, NaN to 0) does not.
        *q = unsafe { v.to_int_unchecked::<i32>() } as i16
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_i8_avx2(src: &[f32], scale: f32, zp: f32, dst: &mut [i16]) {
    quantize_i8_impl(src, scale, zp, dst)
}

/// QuantizeLinear to int8 (`saturate(round_half_even(x / scale) + zp)`, NaN to -128), written
/// widened to i16 as Kiln stores int8.
pub(crate) fn quantize_i8(src: &[f32], scale: f32, zp: f32, dst: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `quantize_i8_avx2` is compiled for (checked above).
        unsafe { quantize_i8_avx2(src, scale, zp, dst) };
        return;
    }
    quantize_i8_impl(src, scale, zp, dst)
}

#[inline(always)]
fn min_max_impl(v: &[f32]) -> (f32, f32) {
    // Eight lanes so the reduction vectorizes; f32::min/max skip NaNs.
    let (mut mn, mut mx) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            mn[l] = mn[l].min(c[l]);
            mx[l] = mx[l].max(c[l]);
        }
    }
    let fold = |init: f32, lanes: &[f32], f: fn(f32, f32) -> f32| {
        lanes.iter().chain(chunks.remainder()).fold(init, |a, &x| f(a, x))
    };
    (
        fold(f32::INFINITY, &mn, f32::min),
        fold(f32::NEG_INFINITY, &mx, f32::max),
    )
}

/// [`min_max_impl`] with explicit `vminps`/`vmaxps` on four accumulator pairs: `f32::min`'s NaN
/// rule kept the compiler from vectorizing the loop well (this pass took 5x the quantizing pass).
/// `vminps(x, acc)` returns `acc` when `x` is NaN, so NaNs are skipped the same way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn min_max_avx2(v: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let mut chunks = v.chunks_exact(32);
    // SAFETY: every load reads 8 floats inside a 32-float chunk of `v`.
    let (mn, mx) = unsafe {
        let mut mn = [_mm256_set1_ps(f32::INFINITY); 4];
        let mut mx = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        for c in &mut chunks {
            for l in 0..4 {
                let x = _mm256_loadu_ps(c.as_ptr().add(8 * l));
                mn[l] = _mm256_min_ps(x, mn[l]);
                mx[l] = _mm256_max_ps(x, mx[l]);
            }
        }
        let (mut a, mut b) = ([0f32; 32], [0f32; 32]);
        for l in 0..4 {
            _mm256_storeu_ps(a.as_mut_ptr().add(8 * l), mn[l]);
            _mm256_storeu_ps(b.as_mut_ptr().add(8 * l), mx[l]);
        }
        (a, b)
    };
    let (tmn, tmx) = min_max_impl(chunks.remainder());
    (
        mn.iter().fold(tmn, |a, &x| a.min(x)),
        mx.iter().fold(tmx, |a, &x| a.max(x)),
    )
}

#[cfg(target_arch = "x86")]
#[target_feature(enable = "avx2,fma")]
fn min_max_avx2(v: &[f32]) -> (f32, f32) {
    min_max_impl(v)
}

/// The smallest and largest non-NaN values (`(inf, -inf)` when there are none).
pub(crate) fn min_max(v: &[f32]) -> (f32, f32) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `min_max_avx2` is compiled for (checked above).
        return unsafe { min_max_avx2(v) };
    }
    min_max_impl(v)
}

#[inline(always)]
fn softmax_row_impl<const FMA: bool>(row: &mut [f32]) {
    // Eight independent lanes so the max and the sum vectorize.
    // (A NaN is skipped here but still poisons the sum below, so the row comes out NaN.)
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in m.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let max = m
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    row.iter_mut().for_each(|x| *x = exp1::<FMA>(*x - max));
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let sum = acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_impl::<true>(row)
}

/// [`softmax_row_avx2`] built for AVX-512: the exponentials run 16 lanes wide; the max and the
/// sum keep their eight explicit lanes, so every result is bit for bit the AVX2 build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_row_avx512(row: &mut [f32]) {
    softmax_row_impl::<true>(row)
}

/// Softmax of one row in place: max, exp(x - max), scale by 1/sum. A NaN anywhere gives NaN.
pub(crate) fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && crate::sgemm::use_avx512() {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked above).
        unsafe { softmax_row_avx512(row) };
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `softmax_row_avx2` is compiled for (checked above).
        unsafe { softmax_row_avx2(row) };
        return;
    }
    softmax_row_impl::<false>(row)
}

#[inline(always)]
fn layer_norm_row_impl<const FMA: bool>(x: &[f32], scale: &[f32], bias: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    let n = x.len().max(1) as f32;
    // Two passes (mean, then squared deviations) in eight lanes: stable and vectorizable.
    let lanes = |f: &dyn Fn(f32) -> f32| -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
    };
    let mean = lanes(&|v| v) / n;
    let var = lanes(&|v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    match bias {
        Some(b) => y
            .iter_mut()
            .zip(x.iter().zip(scale.iter().zip(b)))
            .for_each(|(o, (&v, (&s, &bb)))| *o = madd::<FMA>((v - mean) * inv, s, bb)),
        None => y
            .iter_mut()
            .zip(x.iter().zip(scale))
            .for_each(|(o, (&v, &s))| *o = (v - mean) * inv * s),
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn layer_norm_row_avx2(x: &[f32], scale: &[f32], bias: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    layer_norm_row_impl::<true>(x, scale, bias, eps, y)
}

/// LayerNormalization of one row: `(x - mean) / sqrt(var + eps) * scale + bias`, f32 throughout.
/// `scale`, `bias` and `y` have the row's length.
pub(crate) fn layer_norm_row(x: &[f32], scale: &[f32], bias: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `layer_norm_row_avx2` is compiled for (checked above).
        unsafe { layer_norm_row_avx2(x, scale, bias, eps, y) };
        return;
    }
    layer_norm_row_impl::<false>(x, scale, bias, eps, y)
}

#[inline(always)]
fn rms_norm_row_impl<const FMA: bool>(x: &[f32], scale: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let n = x.len().max(1) as f32;
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = madd::<FMA>(v, v, *a);
        }
    }
    let ss = acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| v * v).sum::<f32>();
    let inv = 1.0 / (ss / n + eps).sqrt();
    y.iter_mut()
        .zip(x.iter().zip(scale))
        .for_each(|(o, (&v, &s))| *o = v * inv * s);
    inv
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn rms_norm_row_avx2(x: &[f32], scale: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    rms_norm_row_impl::<true>(x, scale, eps, y)
}

/// RMS normalization of one row: `x / sqrt(mean(x²) + eps) * scale`, f32 throughout; returns the
/// row's `1 / sqrt(mean(x²) + eps)`. `scale` and `y` have the row's length.
pub(crate) fn rms_norm_row(x: &[f32], scale: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `rms_norm_row_avx2` is compiled for (checked above).
        return unsafe { rms_norm_row_avx2(x, scale, eps, y) };
    }
    rms_norm_row_impl::<false>(x, scale, eps, y)
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent lanes so LLVM keeps two vector accumulators without reassociating.
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn gemv_impl(a: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
    for (yj, row) in y.iter_mut().zip(a.chunks_exact(k)) {
        *yj = dot_impl(row, x);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn gemv_avx2(a: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
    gemv_impl(a, k, x, y)
}

/// `y[j] = dot(a[j*k..(j+1)*k], x)` for a row-major `a` of `y.len()` rows (single thread; for
/// the small matrix-vector products of recurrent steps, where a gemm call costs more than the
/// arithmetic). `k` must be positive and `x.len() == k`.
pub(crate) fn gemv(a: &[f32], k: usize, x: &[f32], y: &mut [f32]) {
    if k == 0 {
        y.fill(0.0);
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features `gemv_avx2` is compiled for (checked above).
        unsafe { gemv_avx2(a, k, x, y) };
        return;
    }
    gemv_impl(a, k, x, y)
}

/// Borrowed contiguous f32 data of a CPU tensor (holds the storage's read lock).
pub(crate) struct F32View<G> {
    storage: G,
    start: usize,
    end: usize,
}

impl<G: std::ops::Deref<Target = Storage>> F32View<G> {
    fn try_slice(&self) -> Option<&[f32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => data.get(self.start..self.end),
            _ => None,
        }
    }

    pub(crate) fn slice(&self) -> &[f32] {
        // `f32_view` checked that the storage is f32 and the range is inside it.
        self.try_slice().unwrap_or(&[])
    }
}

/// The data of a contiguous f32 CPU tensor, borrowed; `None` when `t` is not one.
pub(crate) fn f32_view(t: &CT) -> Option<F32View<impl std::ops::Deref<Target = Storage> + '_>> {
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let view = F32View { storage, start, end };
    view.try_slice()?;
    Some(view)
}

/// Runs `f` on the contiguous f32 data of a CPU tensor; `None` when it is not one.
pub(crate) fn with_f32<R>(t: &CT, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    f32_view(t).map(|v| f(v.slice()))
}

/// Runs `f` on the contiguous u8 data of a CPU tensor; `None` when it is not one.
pub(crate) fn with_u8<R>(t: &CT, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::U8 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::U8(v)) => v.get(start..end).map(f),
        _ => None,
    }
}

/// Runs `f` on the contiguous i16 data of a CPU tensor (Kiln's storage of int8 and int16); `None`
/// when it is not one.
pub(crate) fn with_i16<R>(t: &CT, f: impl FnOnce(&[i16]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::I16 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::I16(v)) => v.get(start..end).map(f),
        _ => None,
    }
}

/// Elements per parallel task: large enough to amortize scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

/// Applies `f` to a contiguous f32 CPU tensor, in parallel; `None` when the tensor is not one
/// (other dtype, device or layout), so the caller uses its generic path.
pub(crate) fn map_tensor(f: Func, t: &CT) -> Option<candle_core::Result<CT>> {
    let out = with_f32(t, |src| {
        let mut out = crate::fastmath::zeroed(src.len());
        if src.len() <= CHUNK {
            map_slice(f, src, &mut out);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| map_slice(f, s, d));
        }
        out
    })?;
    Some(CT::from_vec(out, t.dims(), t.device()))
}

/// `f(x + bias)` for a contiguous f32 CPU tensor `x` and a bias of its last dimension's length
/// (a bias add broadcast over the rows, then `f`), in one pass: each row's sum goes through a
/// stack buffer into `f`. The arithmetic is the Add's and then `f`'s, so the result is bit for
/// bit the two-step one. `None` when the operands are not of that form.
pub(crate) fn bias_map_tensor(f: Func, x: &CT, bias: &CT) -> Option<candle_core::Result<CT>> {
    const ROW: usize = 4096;
    let n = *x.dims().last()?;
    if n == 0 || n > ROW || bias.elem_count() != n || bias.dims().iter().filter(|&&d| d != 1).count() > 1 {
        return None;
    }
    if bias.dims().last() != Some(&n) {
        return None;
    }
    let bview = f32_view(bias)?;
    let b = bview.slice();
    let out = with_f32(x, |src| {
        let mut out = zeroed(src.len());
        let rows_per_task = (CHUNK / n).max(1);
        let run = |src: &[f32], dst: &mut [f32]| {
            let mut tmp = [0f32; ROW];
            for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                for ((t, &v), &bb) in tmp.iter_mut().zip(s).zip(b) {
                    *t = v + bb;
                }
                map_slice(f, &tmp[..n], d);
            }
        };
        if src.len() <= CHUNK {
            run(src, &mut out);
        } else {
            out.par_chunks_mut(rows_per_task * n)
                .zip(src.par_chunks(rows_per_task * n))
                .for_each(|(d, s)| run(s, d));
        }
        out
    })?;
    Some(CT::from_vec(out, x.dims(), x.device()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_u8_rounds_half_to_even_saturates_and_zeroes_nan_on_every_path() {
        // Halves (even and odd neighbours), both saturation ends, NaN, infinities; lengths that
        // leave tails after the 32-wide vector loop.
        let base = [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            127.5,
            128.5,
            300.0,
            -300.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.49,
            3.51,
        ];
        for len in [0, 1, 13, 32, 33, 64, 95] {
            let src: Vec<f32> = (0..len)
                .map(|i| base[i % base.len()] * if i % 3 == 0 { 1.0 } else { 0.7 })
                .collect();
            for (scale, zp) in [(1.0f32, 0.0f32), (0.5, 128.0), (0.37, 3.0)] {
                let want: Vec<u8> = src
                    .iter()
                    .map(|&x| {
                        let v = (x as f64 / scale as f64) as f32;
                        let r = v.round_ties_even() + zp;
                        if r.is_nan() {
                            0
                        } else {
                            r.clamp(0.0, 255.0) as u8
                        }
                    })
                    .collect();
                let mut got = vec![7u8; len];
                quantize_u8(&src, scale, zp, &mut got);
                assert_eq!(got, want, "len {len} scale {scale} zp {zp}");
                let mut portable = vec![7u8; len];
                quantize_u8_impl(&src, scale, zp, &mut portable);
                assert_eq!(portable, want, "portable, len {len} scale {scale} zp {zp}");
                // int8 (zero point shifted into its range), NaN to -128.
                let zp = zp - 128.0;
                let want: Vec<i16> = src
                    .iter()
                    .map(|&x| {
                        let r = ((x as f64 / scale as f64) as f32).round_ties_even() + zp;
                        if r.is_nan() {
                            -128
                        } else {
                            r.clamp(-128.0, 127.0) as i16
                        }
                    })
                    .collect();
                let mut got = vec![7i16; len];
                quantize_i8(&src, scale, zp, &mut got);
                assert_eq!(got, want, "i8: len {len} scale {scale} zp {zp}");
                let mut portable = vec![7i16; len];
                quantize_i8_impl(&src, scale, zp, &mut portable);
                assert_eq!(portable, want, "i8 portable: len {len} scale {scale} zp {zp}");
            }
        }
    }

    #[test]
    fn min_max_skips_nan_and_sees_the_tail() {
        let mut v: Vec<f32> = (0..37).map(|i| i as f32 - 10.0).collect();
        v[3] = f32::NAN;
        v[36] = 99.0;
        assert_eq!(min_max(&v), (-10.0, 99.0));
        assert_eq!(min_max_impl(&v), (-10.0, 99.0));
        assert_eq!(min_max(&[]), (f32::INFINITY, f32::NEG_INFINITY));
        // Every length around the 32-wide blocks, extremes and NaNs in every position.
        for len in 0..100usize {
            for pos in 0..len {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
                v[pos] = if pos % 2 == 0 { -1e30 } else { 1e30 };
                v[(pos * 7) % len] = f32::NAN;
                assert_eq!(min_max(&v), min_max_impl(&v), "len {len} pos {pos}");
            }
        }
        assert_eq!(min_max(&[f32::NAN; 40]), (f32::INFINITY, f32::NEG_INFINITY));
    }

    #[test]
    fn gemv_matches_naive_sums() {
        for (m, k) in [(1, 1), (3, 15), (5, 16), (7, 37), (512, 128)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
            let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 13) as f32 / 13.0 - 0.3).collect();
            let mut y = vec![f32::NAN; m];
            gemv(&a, k, &x, &mut y);
            for j in 0..m {
                let want: f64 = (0..k).map(|i| a[j * k + i] as f64 * x[i] as f64).sum();
                assert!(
                    (y[j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "m {m} k {k} row {j}"
                );
            }
        }
    }

    fn grid() -> Vec<f32> {
        let mut v: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        v.extend((-1000..=1000).map(|i| i as f32 * 0.1));
        v.extend([
            1e-30, -1e-30, 1e-7, -3e-5, 0.0, -0.0, 87.0, -87.0, 88.7, -87.3, 89.0, -90.0, 1e4, -1e4,
        ]);
        v
    }

    fn check(f: Func, reference: impl Fn(f64) -> f64, rel: f64, abs: f64) {
        let xs = grid();
        let mut out = vec![0f32; xs.len()];
        map_slice(f, &xs, &mut out);
        let mut scalar = vec![0f32; xs.len()];
        apply::<false>(f, &xs, &mut scalar);
        for (path, got) in [("dispatched", &out), ("baseline", &scalar)] {
            for (&x, &y) in xs.iter().zip(got) {
                // The reference rounded to f32 (so overflow to inf counts as right).
                let want = reference(x as f64) as f32 as f64;
                let err = if y as f64 == want { 0.0 } else { (y as f64 - want).abs() };
                assert!(
                    err <= abs + rel * want.abs(),
                    "{path} {f:?}({x}) = {y}, reference {want}, error {err}"
                );
            }
        }
        let mut special = [0f32; 3];
        map_slice(f, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &mut special);
        assert!(special[0].is_nan(), "{f:?}(NaN) should be NaN");
        for (x, y) in [(f32::INFINITY, special[1]), (f32::NEG_INFINITY, special[2])] {
            let want = reference(x as f64);
            let same = y as f64 == want || (y.is_nan() && want.is_nan()) || (y as f64 - want).abs() <= 1e-6;
            assert!(same, "{f:?}({x}) = {y}, want {want}");
        }
    }

    #[test]
    fn exp_matches_libm() {
        check(Func::Exp, f64::exp, 4e-7, 1e-37);
    }

    #[test]
    fn erf_matches_libm() {
        check(Func::Erf, libm::erf, 0.0, 5e-7);
    }

    #[test]
    fn tanh_matches_libm() {
        check(Func::Tanh, f64::tanh, 1e-6, 3e-7);
    }

    #[test]
    fn sigmoid_matches() {
        check(Func::Sigmoid, |x| 1.0 / (1.0 + (-x).exp()), 1e-6, 1e-37);
    }

    #[test]
    fn gelu_forms_match() {
        check(
            Func::GeluErf,
            |x| 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            1e-6,
            1.5e-6,
        );
        check(
            Func::GeluTanh,
            |x| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
            1e-6,
            1.5e-6,
        );
    }

    #[test]
    fn rms_norm_row_matches_reference() {
        for len in [1usize, 7, 8, 13, 64, 577] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
            let scale: Vec<f32> = (0..len).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / len as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            let mut y = vec![f32::NAN; len];
            let got_inv = rms_norm_row(&x, &scale, 1e-5, &mut y);
            assert!(
                (got_inv as f64 - inv).abs() <= 1e-6 * inv,
                "len {len}: inv {got_inv} vs {inv}"
            );
            for i in 0..len {
                let want = x[i] as f64 * inv * scale[i] as f64;
                assert!(
                    (y[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "len {len} [{i}]"
                );
            }
        }
    }

    #[test]
    fn softmax_row_matches_reference() {
        for len in [1usize, 7, 8, 13, 128, 1000] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let mut got = row.clone();
            softmax_row(&mut got);
            for (g, w) in got.iter().zip(&e) {
                assert!(
                    (*g as f64 - w / s).abs() <= 1e-6 * (w / s) + 1e-9,
                    "len {len}: {g} vs {}",
                    w / s
                );
            }
        }
        let mut masked = vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        softmax_row(&mut masked);
        assert_eq!(masked, vec![0.0, 0.5, 0.0, 0.5]);
        let mut nan = vec![1.0, f32::NAN, 2.0];
        softmax_row(&mut nan);
        assert!(nan.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn quantize_dequantize_is_the_quantize_then_the_dequantize_bit_for_bit() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.0173)
            .chain([
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.025,
                -0.025,
                0.075,
                1e30,
                -0.0,
            ])
            .collect();
        for (scale, zp, lo, hi) in [
            (0.05f32, 128f32, 0f32, 255f32),
            (0.013, -3.0, -128.0, 127.0),
            (0.7, 0.0, -128.0, 127.0),
        ] {
            let mut got = vec![0f32; xs.len()];
            quantize_dequantize(&xs, scale, zp, lo, hi, &mut got);
            for (i, (&x, &g)) in xs.iter().zip(&got).enumerate() {
                // QuantizeLinear's code (NaN to the low end), then DequantizeLinear's f32 arithmetic.
                let code = if x.is_nan() {
                    lo
                } else {
                    ((x / scale).round_ties_even() + zp).clamp(lo, hi)
                };
                let want = (code - zp) * scale;
                assert_eq!(g.to_bits(), want.to_bits(), "x[{i}] = {x}, scale {scale}");
            }
        }
        // Against the u8 QuantizeLinear kernel's own codes.
        let mut q = vec![0u8; xs.len()];
        quantize_u8(&xs, 0.05, 128.0, &mut q);
        let mut got = vec![0f32; xs.len()];
        quantize_dequantize(&xs, 0.05, 128.0, 0.0, 255.0, &mut got);
        for (&c, &g) in q.iter().zip(&got) {
            assert_eq!(g.to_bits(), ((c as f32 - 128.0) * 0.05).to_bits());
        }
    }

    #[test]
    fn bias_map_is_the_add_then_the_function_bit_for_bit() {
        let dev = candle_core::Device::Cpu;
        for (rows, n, bias_dims) in [
            (1usize, 1usize, vec![1usize]),
            (3, 5, vec![5]),
            (40, 1536, vec![1, 1536]),
            (7, 4096, vec![4096]),
        ] {
            let x: Vec<f32> = (0..rows * n).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.07).collect();
            let b: Vec<f32> = (0..n).map(|j| (j % 13) as f32 * 0.11 - 0.6).collect();
            let xt = CT::from_vec(x.clone(), (rows, n), &dev).unwrap();
            let bt = CT::from_vec(b.clone(), bias_dims.as_slice(), &dev).unwrap();
            for f in [Func::GeluErf, Func::GeluTanh, Func::Sigmoid] {
                let got: Vec<f32> = bias_map_tensor(f, &xt, &bt)
                    .unwrap()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let sum: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v + b[i % n]).collect();
                let mut want = vec![0f32; sum.len()];
                map_slice(f, &sum, &mut want);
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{rows}x{n} {f:?}"
                );
            }
        }
        // Not a per-column bias: left to the two-step path.
        let xt = CT::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(bias_map_tensor(
            Func::GeluErf,
            &xt,
            &CT::zeros((2, 1), candle_core::DType::F32, &dev).unwrap()
        )
        .is_none());
        assert!(bias_map_tensor(
            Func::GeluErf,
            &CT::zeros((2, 5000), candle_core::DType::F32, &dev).unwrap(),
            &CT::zeros(5000, candle_core::DType::F32, &dev).unwrap()
        )
        .is_none());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn softmax_row_is_the_same_bits_on_every_build_this_cpu_runs() {
        type Build = (&'static str, fn(&mut [f32]));
        let mut builds: Vec<Build> = vec![("portable", softmax_row_impl::<false>)];
        if has_avx2_fma() {
            // SAFETY (both): the CPU has the features (checked).
            builds.push(("avx2", |r| unsafe { softmax_row_avx2(r) }));
            if crate::sgemm::use_avx512() {
                builds.push(("avx512", |r| unsafe { softmax_row_avx512(r) }));
            }
        }
        for len in [1usize, 5, 16, 17, 64, 77, 1000] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 53 % 97) as f32 - 40.0) * 0.37).collect();
            let mut want = row.clone();
            softmax_row(&mut want);
            for (name, f) in &builds[1..] {
                let mut got = row.clone();
                f(&mut got);
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{name}, len {len}"
                );
            }
            // The portable build rounds each multiply-add twice: close, not identical.
            let mut plain = row.clone();
            (builds[0].1)(&mut plain);
            assert!(
                plain
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| (g - w).abs() <= 1e-6 * w.abs() + 1e-12),
                "len {len}"
            );
        }
    }

    #[test]
    fn tensor_path_handles_views() {
        let t = CT::arange(0f32, 40_000f32, &candle_core::Device::Cpu)
            .and_then(|t| t.affine(1e-3, -20.0))
            .and_then(|t| t.reshape((200, 200)))
            .expect("tensor");
        let r = map_tensor(Func::Erf, &t).expect("contiguous").expect("ok");
        let want: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("vec");
        let got: Vec<f32> = r.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("vec");
        for (w, g) in want.iter().zip(&got) {
            assert!((libm::erf(*w as f64) - *g as f64).abs() < 5e-7);
        }
        let tt = t.t().expect("transpose");
        assert!(
            map_tensor(Func::Erf, &tt).is_none(),
            "a transposed view is not contiguous"
        );
    }
}

//! Packed 8-bit integer GEMM for the CPU, exact in i32:
//! `C[m, n] = Σ_k (A[m, k] - a_zp[m]) · (B[k, n] - b_zp[n])` with A and B u8 or i8 (ONNX
//! `MatMulInteger`; the integer core of ONNX Runtime's dynamically quantized models).
//!
//! The kernel multiplies unsigned A by signed B: AVX-512 VNNI's `vpdpbusd` adds four u8 x s8
//! products into each i32 lane without saturating. Other signedness is shifted into that form
//! exactly: an i8 operand plus 128 is a u8 (A) and a u8 operand minus 128 is an i8 (B), with the
//! zero points shifted alike. The zero points leave the inner loop through the expansion
//! `Σ (a - za)(b - zb) = Σ a·b - za·Σ_k b - zb·Σ_k a + K·za·zb`: B's column sums are computed when
//! it is packed (once, at plan time, for a constant weight) and A's row sums when A is packed.
//! All arithmetic wraps in i32 like ONNX Runtime's (a product sum past 2^31 needs K > 65 000).
//!
//! Layout: B in panels of [`NR`] columns, each `[K/4][NR][4]` bytes (one 64-byte vector holds four
//! k of sixteen columns); A in tiles of [`MR`] rows, `[K/4][MR]` little groups of four bytes, so
//! the kernel broadcasts one group per row. K is padded to a multiple of 4 and the edges with zeros
//! (zero products; the corrections use the true K). Without VNNI the same packed operands go
//! through a portable loop (exact, slower).

use rayon::prelude::*;

/// Rows of A per micro-tile.
pub const MR: usize = 8;
/// Columns of B per packed panel (two 16-lane i32 vectors).
pub const NR: usize = 32;
/// Multiply-adds below which a product runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QGemmError {
    #[error("integer GEMM: {0}")]
    Shape(String),
}

/// An 8-bit operand's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8 {
    U8,
    I8,
}

/// A zero point: one for the whole operand or one per row (A) / column (B).
#[derive(Debug, Clone, Copy)]
pub enum ZeroPoint<'a> {
    None,
    Scalar(i32),
    PerIndex(&'a [i32]),
}

impl ZeroPoint<'_> {
    fn at(&self, i: usize) -> i32 {
        match self {
            ZeroPoint::None => 0,
            ZeroPoint::Scalar(z) => *z,
            ZeroPoint::PerIndex(z) => z[i % z.len()],
        }
    }
    fn check(&self, len: usize, what: &str) -> Result<(), QGemmError> {
        match self {
            ZeroPoint::PerIndex(z) if z.is_empty() || !len.is_multiple_of(z.len()) => {
                Err(QGemmError::Shape(format!("{} zero points for {len} {what}", z.len())))
            }
            _ => Ok(()),
        }
    }
}

/// A `K x N` 8-bit B operand packed for [`gemm`], with its column sums and shifted zero points.
#[derive(Clone)]
pub struct PackedQB {
    k: usize,
    n: usize,
    /// K rounded up to a multiple of 4.
    kq: usize,
    data: Vec<i8>,
    /// Σ_k B'[k, n] of the signed (shifted) values.
    col_sum: Vec<i32>,
    /// Zero point of B' per column.
    zp: Vec<i32>,
}

impl PackedQB {
    /// Bytes of the packed values, column sums and zero points.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.col_sum.len() + self.zp.len())
    }

    /// Packs row-major `b` (`k x n` bytes of type `ty`) with its zero point (scalar or per
    /// column).
    pub fn pack(b: &[u8], ty: Int8, k: usize, n: usize, zp: ZeroPoint) -> Result<PackedQB, QGemmError> {
        if k.checked_mul(n) != Some(b.len()) || k == 0 || n == 0 {
            return Err(QGemmError::Shape(format!("B holds {} bytes, not {k} x {n}", b.len())));
        }
        if let ZeroPoint::PerIndex(z) = zp {
            if z.len() != n && z.len() != 1 {
                return Err(QGemmError::Shape(format!("{} B zero points for {n} columns", z.len())));
            }
        }
        let shift = match ty {
            Int8::U8 => 128,
            Int8::I8 => 0,
        };
        let signed = |x: u8| -> i8 {
            match ty {
                Int8::U8 => (x as i32 - 128) as i8,
                Int8::I8 => x as i8,
            }
        };
        let kq = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * kq * NR];
        let mut col_sum = vec![0i32; n];
        for (p, panel) in data.chunks_exact_mut(kq * NR).enumerate() {
            for c in 0..NR.min(n - p * NR) {
                let col = p * NR + c;
                let mut sum = 0i32;
                for kk in 0..k {
                    let v = signed(b[kk * n + col]);
                    panel[(kk / 4) * NR * 4 + c * 4 + kk % 4] = v;
                    sum = sum.wrapping_add(v as i32);
                }
                col_sum[col] = sum;
            }
        }
        // Both padded to whole panels (zeros) so the kernel loads full vectors.
        col_sum.resize(panels * NR, 0);
        let zp = (0..panels * NR)
            .map(|j| if j < n { zp.at(j) - shift } else { 0 })
            .collect();
        Ok(PackedQB {
            k,
            n,
            kq,
            data,
            col_sum,
            zp,
        })
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    fn panel(&self, p: usize) -> &[i8] {
        &self.data[p * self.kq * NR..(p + 1) * self.kq * NR]
    }
}

/// Whether the VNNI kernel runs on this CPU.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = (A - a_zp) · (B - b_zp)` for row-major `a` (`m x k` bytes of type `ty`; zero point
/// scalar or per row, a per-row list repeating every `len` rows) into row-major `c` (`m x n`).
pub fn gemm(a: &[u8], ty: Int8, m: usize, a_zp: ZeroPoint, b: &PackedQB, c: &mut [i32]) -> Result<(), QGemmError> {
    gemm_with(a, ty, m, a_zp, b, Output::I32(c), has_vnni())
}

/// [`gemm`] with a float result: `Y = f32(C) * scale[n] (+ bias[n])`, `scale` one value or one
/// per column (ONNX Runtime's `MatMulIntegerToFloat`). Each block of C is converted while it is in
/// cache; the arithmetic is a Cast, a Mul and an Add in f32, so the result is bit for bit the
/// unfused graph's.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    a: &[u8],
    ty: Int8,
    m: usize,
    a_zp: ZeroPoint,
    b: &PackedQB,
    scale: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), QGemmError> {
    let n = b.n;
    if scale.len() != 1 && scale.len() != n {
        return Err(QGemmError::Shape(format!("{} scales for {n} columns", scale.len())));
    }
    if let Some(bias) = bias {
        if bias.len() != n {
            return Err(QGemmError::Shape(format!("{} bias values for {n} columns", bias.len())));
        }
    }
    gemm_with(a, ty, m, a_zp, b, Output::F32 { y, scale, bias }, has_vnni())
}

/// Where [`gemm_with`] writes.
enum Output<'a> {
    I32(&'a mut [i32]),
    F32 {
        y: &'a mut [f32],
        scale: &'a [f32],
        bias: Option<&'a [f32]>,
    },
}

fn gemm_with(
    a: &[u8],
    ty: Int8,
    m: usize,
    a_zp: ZeroPoint,
    b: &PackedQB,
    out: Output,
    vnni: bool,
) -> Result<(), QGemmError> {
    let (k, n) = (b.k, b.n);
    let out_len = match &out {
        Output::I32(c) => c.len(),
        Output::F32 { y, .. } => y.len(),
    };
    if m.checked_mul(k) != Some(a.len()) || m.checked_mul(n) != Some(out_len) {
        return Err(QGemmError::Shape(format!(
            "A holds {} values and C {out_len}; B is {k} x {n}, so A must be {m} x {k}",
            a.len(),
        )));
    }
    a_zp.check(m, "rows")?;
    if m == 0 {
        return Ok(());
    }
    let shift = match ty {
        Int8::U8 => 0,
        Int8::I8 => 128,
    };
    let tiles = m.div_ceil(MR);
    let panels = n.div_ceil(NR);
    // A tile's packed rows; reused from tile to tile (rows past a short last tile keep stale
    // values, whose products are never stored).
    let new_packed = || vec![0i32; b.kq / 4 * MR];
    let run_tile = |t: usize, packed: &mut [i32], c_rows: &mut [i32]| {
        let rows = MR.min(m - t * MR);
        let mut row_sum = [0i32; MR];
        pack_a(
            &a[t * MR * k..(t * MR + rows) * k],
            k,
            rows,
            shift,
            packed,
            &mut row_sum,
        );
        // C[r, j] = acc[r, j] + u[r] * zb[j] - v[r] * col_sum[j] with v = za and u = K * za - row_sum.
        let (mut u, mut v) = ([0i32; MR], [0i32; MR]);
        for r in 0..rows {
            v[r] = a_zp.at(t * MR + r) + shift;
            u[r] = (k as i32).wrapping_mul(v[r]).wrapping_sub(row_sum[r]);
        }
        let tile = Tile {
            a: packed,
            quads: b.kq / 4,
            rows,
            u,
            v,
        };
        for p in 0..panels {
            let cols = NR.min(n - p * NR);
            let edge = Edge {
                zb: &b.zp[p * NR..(p + 1) * NR],
                col_sum: &b.col_sum[p * NR..(p + 1) * NR],
                cols,
            };
            tile.run(b.panel(p), &edge, &mut c_rows[p * NR..], n, vnni);
        }
    };
    let parallel = m * k * n >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 && tiles > 1;
    match out {
        Output::I32(c) => {
            if parallel {
                c.par_chunks_mut(MR * n)
                    .enumerate()
                    .for_each_init(new_packed, |packed, (t, rows)| run_tile(t, packed, rows));
            } else {
                let mut packed = new_packed();
                c.chunks_mut(MR * n)
                    .enumerate()
                    .for_each(|(t, rows)| run_tile(t, &mut packed, rows));
            }
        }
        Output::F32 { y, scale, bias } => {
            // Each tile's i32 block goes through a scratch block (in cache) into the floats.
            let new_scratch = || (new_packed(), vec![0i32; MR * n]);
            let to_float = |(packed, c): &mut (Vec<i32>, Vec<i32>), t: usize, rows: &mut [f32]| {
                let c = &mut c[..rows.len()];
                run_tile(t, packed, c);
                for (yr, cr) in rows.chunks_mut(n).zip(c.chunks(n)) {
                    match (scale, bias) {
                        ([s], None) => yr.iter_mut().zip(cr).for_each(|(o, &v)| *o = v as f32 * s),
                        ([s], Some(b)) => yr
                            .iter_mut()
                            .zip(cr.iter().zip(b))
                            .for_each(|(o, (&v, &b))| *o = v as f32 * s + b),
                        (s, None) => yr
                            .iter_mut()
                            .zip(cr.iter().zip(s))
                            .for_each(|(o, (&v, &s))| *o = v as f32 * s),
                        (s, Some(b)) => yr
                            .iter_mut()
                            .zip(cr.iter().zip(s.iter().zip(b)))
                            .for_each(|(o, (&v, (&s, &b)))| *o = v as f32 * s + b),
                    }
                }
            };
            if parallel {
                y.par_chunks_mut(MR * n)
                    .enumerate()
                    .for_each_init(new_scratch, |s, (t, rows)| to_float(s, t, rows));
            } else {
                let mut s = new_scratch();
                y.chunks_mut(MR * n)
                    .enumerate()
                    .for_each(|(t, rows)| to_float(&mut s, t, rows));
            }
        }
    }
    Ok(())
}

/// Packs `rows` (<= MR) rows of A into `[K/4][MR]` groups of four bytes (as little-endian i32),
/// each byte shifted to u8 (`shift` 128 flips the sign bit of an i8); rows and k past the edges
/// stay zero. Also the row sums of the shifted values.
fn pack_a(a: &[u8], k: usize, rows: usize, shift: i32, out: &mut [i32], row_sum: &mut [i32; MR]) {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked here); the body is safe code.
        unsafe { pack_a_avx2(a, k, rows, shift, out, row_sum) };
        return;
    }
    pack_a_body(a, k, rows, shift, out, row_sum)
}

/// [`pack_a_body`] built for AVX2 (the row sums and flips run 32 bytes wide; the baseline build
/// is SSE2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_avx2(a: &[u8], k: usize, rows: usize, shift: i32, out: &mut [i32], row_sum: &mut [i32; MR]) {
    pack_a_body(a, k, rows, shift, out, row_sum)
}

#[inline(always)]
fn pack_a_body(a: &[u8], k: usize, rows: usize, shift: i32, out: &mut [i32], row_sum: &mut [i32; MR]) {
    let flip = if shift == 0 { 0u8 } else { 0x80 };
    let flip4 = u32::from_ne_bytes([flip; 4]);
    for r in 0..rows {
        let row = &a[r * k..(r + 1) * k];
        let mut quads = row.chunks_exact(4);
        for (q, quad) in (&mut quads).enumerate() {
            let bytes = [quad[0], quad[1], quad[2], quad[3]];
            out[q * MR + r] = (u32::from_le_bytes(bytes) ^ flip4) as i32;
        }
        let tail = quads.remainder();
        if !tail.is_empty() {
            let mut bytes = [0u8; 4];
            for (o, &x) in bytes.iter_mut().zip(tail) {
                *o = x ^ flip;
            }
            out[(k / 4) * MR + r] = i32::from_le_bytes(bytes);
        }
        row_sum[r] = row.iter().fold(0i32, |s, &x| s.wrapping_add((x ^ flip) as i32));
    }
}

/// A packed A tile and its per-row correction terms.
struct Tile<'a> {
    a: &'a [i32],
    quads: usize,
    rows: usize,
    u: [i32; MR],
    v: [i32; MR],
}

/// A B panel's correction terms (padded to NR) and how many of its columns are real.
struct Edge<'a> {
    zb: &'a [i32],
    col_sum: &'a [i32],
    cols: usize,
}

impl Tile<'_> {
    /// Writes `rows x cols` of C (row stride `ldc`, starting at `c[0]`) for one B panel.
    fn run(&self, b: &[i8], e: &Edge, c: &mut [i32], ldc: usize, vnni: bool) {
        assert!(self.a.len() >= self.quads * MR && b.len() >= self.quads * NR * 4);
        assert!(e.zb.len() == NR && e.col_sum.len() == NR && e.cols <= NR);
        assert!(self.rows > 0 && c.len() >= (self.rows - 1) * ldc + e.cols);
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: `vnni` is only true when the CPU has avx512f/bw/vnni (`has_vnni`); the
            // asserts above bound every read of the tile and panel and every write to C.
            unsafe { self.run_vnni(b, e, c, ldc) };
            return;
        }
        let _ = vnni;
        let mut acc = [[0i32; NR]; MR];
        for q in 0..self.quads {
            let bq = &b[q * NR * 4..(q + 1) * NR * 4];
            for (r, row) in acc.iter_mut().enumerate().take(self.rows) {
                let av = self.a[q * MR + r].to_le_bytes();
                for (j, o) in row.iter_mut().enumerate() {
                    let bj = &bq[j * 4..j * 4 + 4];
                    let dot: i32 = (0..4).map(|x| av[x] as i32 * bj[x] as i32).sum();
                    *o = o.wrapping_add(dot);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(self.rows) {
            for (j, o) in c[r * ldc..r * ldc + e.cols].iter_mut().enumerate() {
                *o = row[j]
                    .wrapping_add(self.u[r].wrapping_mul(e.zb[j]))
                    .wrapping_sub(self.v[r].wrapping_mul(e.col_sum[j]));
            }
        }
    }

    /// The VNNI kernel: `vpdpbusd` over the whole K, then the corrections, stored with a column
    /// mask at the right edge.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_vnni(&self, b: &[i8], e: &Edge, c: &mut [i32], ldc: usize) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        let (ap, bp) = (self.a.as_ptr(), b.as_ptr());
        for q in 0..self.quads {
            // SAFETY: q < quads and the caller checked the panel holds quads * 128 bytes.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(bp.add(q * NR * 4) as *const _),
                    _mm512_loadu_si512(bp.add(q * NR * 4 + 64) as *const _),
                )
            };
            for (r, ar) in acc.iter_mut().enumerate() {
                // SAFETY: the tile holds quads * MR groups (checked by the caller).
                let av = _mm512_set1_epi32(unsafe { *ap.add(q * MR + r) });
                ar[0] = _mm512_dpbusd_epi32(ar[0], av, b0);
                ar[1] = _mm512_dpbusd_epi32(ar[1], av, b1);
            }
        }
        // SAFETY: zb and col_sum hold NR = 32 values (checked by the caller).
        let (zb, cs) = unsafe {
            (
                [
                    _mm512_loadu_si512(e.zb.as_ptr() as *const _),
                    _mm512_loadu_si512(e.zb.as_ptr().add(16) as *const _),
                ],
                [
                    _mm512_loadu_si512(e.col_sum.as_ptr() as *const _),
                    _mm512_loadu_si512(e.col_sum.as_ptr().add(16) as *const _),
                ],
            )
        };
        let lo = e.cols.min(16);
        let masks = [((1u32 << lo) - 1) as u16, ((1u32 << (e.cols - lo)) - 1) as u16];
        for (r, ar) in acc.iter().enumerate().take(self.rows) {
            let (u, v) = (_mm512_set1_epi32(self.u[r]), _mm512_set1_epi32(self.v[r]));
            for h in 0..2 {
                let y = _mm512_sub_epi32(
                    _mm512_add_epi32(ar[h], _mm512_mullo_epi32(u, zb[h])),
                    _mm512_mullo_epi32(v, cs[h]),
                );
                // SAFETY: row r < rows and the masked lanes are < cols, inside C (checked by the caller).
                unsafe { _mm512_mask_storeu_epi32(c.as_mut_ptr().wrapping_add(r * ldc + h * 16), masks[h], y) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes (a 64-bit LCG's high bits).
    struct Bytes(u64);
    impl Bytes {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 56) as u8
        }
        fn vec(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[u8],
        ta: Int8,
        m: usize,
        za: &[i32],
        b: &[u8],
        tb: Int8,
        k: usize,
        n: usize,
        zb: &[i32],
    ) -> Vec<i32> {
        let val = |x: u8, t: Int8| -> i64 {
            match t {
                Int8::U8 => x as i64,
                Int8::I8 => x as i8 as i64,
            }
        };
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0i64;
                for p in 0..k {
                    s += (val(a[i * k + p], ta) - za[i % za.len()] as i64)
                        * (val(b[p * n + j], tb) - zb[j % zb.len()] as i64);
                }
                c[i * n + j] = s as i32;
            }
        }
        c
    }

    #[test]
    fn matches_the_exact_sum_for_every_signedness_zero_point_and_edge() {
        let mut rng = Bytes(7);
        let tys = [Int8::U8, Int8::I8];
        let mut cases = 0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 4, 32),
            (9, 13, 33),
            (17, 64, 70),
            (40, 130, 65),
        ] {
            for ta in tys {
                for tb in tys {
                    for zp_kind in 0..3 {
                        let a = rng.vec(m * k);
                        let b = rng.vec(k * n);
                        let zp = |len: usize, t: Int8, rng: &mut Bytes| -> Vec<i32> {
                            (0..len)
                                .map(|_| match t {
                                    Int8::U8 => rng.next() as i32,
                                    Int8::I8 => rng.next() as i8 as i32,
                                })
                                .collect()
                        };
                        let (za, zb) = match zp_kind {
                            0 => (vec![0], vec![0]),
                            1 => (zp(1, ta, &mut rng), zp(1, tb, &mut rng)),
                            _ => (zp(m, ta, &mut rng), zp(n, tb, &mut rng)),
                        };
                        let want = reference(&a, ta, m, &za, &b, tb, k, n, &zb);
                        let pb = PackedQB::pack(&b, tb, k, n, ZeroPoint::PerIndex(&zb)).unwrap();
                        for vnni in [false, has_vnni()] {
                            let mut c = vec![0i32; m * n];
                            gemm_with(&a, ta, m, ZeroPoint::PerIndex(&za), &pb, Output::I32(&mut c), vnni).unwrap();
                            assert_eq!(c, want, "{m}x{k}x{n} {ta:?}x{tb:?} zp kind {zp_kind} vnni {vnni}");
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 72);
    }

    #[test]
    fn float_output_is_the_cast_mul_add_of_the_integer_result() {
        let mut rng = Bytes(11);
        let (m, k, n) = (19, 37, 45);
        let (a, b) = (rng.vec(m * k), rng.vec(k * n));
        let pb = PackedQB::pack(&b, Int8::I8, k, n, ZeroPoint::Scalar(3)).unwrap();
        let mut c = vec![0i32; m * n];
        gemm(&a, Int8::U8, m, ZeroPoint::Scalar(120), &pb, &mut c).unwrap();
        let per_col: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
        for (scale, bias) in [
            (&[0.0123f32][..], None),
            (&per_col[..], Some(&bias[..])),
            (&[0.5][..], Some(&bias[..])),
        ] {
            let mut y = vec![f32::NAN; m * n];
            gemm_f32(&a, Int8::U8, m, ZeroPoint::Scalar(120), &pb, scale, bias, &mut y).unwrap();
            for (i, (&got, &acc)) in y.iter().zip(&c).enumerate() {
                let j = i % n;
                let s = scale[j % scale.len()];
                let want = acc as f32 * s + bias.map_or(0.0, |b| b[j]);
                assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
            }
        }
        let mut y = vec![0f32; m * n];
        assert!(gemm_f32(&a, Int8::U8, m, ZeroPoint::None, &pb, &[1.0, 2.0], None, &mut y).is_err());
        assert!(gemm_f32(&a, Int8::U8, m, ZeroPoint::None, &pb, &[1.0], Some(&[0.0; 3]), &mut y).is_err());
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert!(PackedQB::pack(&[0; 6], Int8::U8, 2, 4, ZeroPoint::None).is_err());
        assert!(PackedQB::pack(&[0; 8], Int8::U8, 2, 4, ZeroPoint::PerIndex(&[1, 2, 3])).is_err());
        let b = PackedQB::pack(&[1; 8], Int8::U8, 2, 4, ZeroPoint::None).unwrap();
        let mut c = vec![0; 12];
        assert!(gemm(&[0; 5], Int8::U8, 3, ZeroPoint::None, &b, &mut c).is_err());
        assert!(gemm(&[0; 6], Int8::U8, 3, ZeroPoint::PerIndex(&[1, 2]), &b, &mut c).is_err());
        assert!(gemm(&[0; 6], Int8::U8, 3, ZeroPoint::None, &b, &mut c[..11]).is_err());
        gemm(&[2; 6], Int8::U8, 3, ZeroPoint::Scalar(1), &b, &mut c).unwrap();
        assert_eq!(c, vec![2; 12]);
    }
}

//! Packed 8-bit integer GEMM for the CPU, exact in i32:
//! `C[m, n] = Σ_k (A[m, k] - a_zp[m]) · (B[k, n] - b_zp[n])` with A and B u8 or i8 (ONNX
//! `MatMulInteger`; the integer core of ONNX Runtime's dynamically quantized models).
//!
//! The kernels multiply unsigned A by signed B: AVX-512 VNNI's `vpdpbusd` adds four u8 x s8
//! products into each i32 lane without saturating, AMX's `tdpbusd` does the same for a 16 x 64 by
//! 64 x 16 tile product (`amx.rs`, where the CPU and the OS allow it: see [`Kernel`]). Other signedness is shifted into that form
//! exactly: an i8 operand plus 128 is a u8 (A) and a u8 operand minus 128 is an i8 (B), with the
//! zero points shifted alike. The zero points leave the inner loop through the expansion
//! `Σ (a - za)(b - zb) = Σ a·b - za·Σ_k b - zb·Σ_k a + K·za·zb`: B's column sums are computed when
//! it is packed (once, at plan time, for a constant weight) and A's row sums when A is packed.
//! All arithmetic wraps in i32 like ONNX Runtime's (a product sum past 2^31 needs K > 65 000).
//!
//! Layout: B in panels of [`NR`] columns, each `[K/4][NR][4]` bytes (one 64-byte vector holds four
//! k of sixteen columns); A in tiles of [`MR`] rows, `[K/4][MR]` little groups of four bytes, so
//! the kernel broadcasts one group per row (the AMX kernel copies blocks of 32 rows of A instead,
//! and reads each B panel as two 64-byte-wide tiles). K is padded to a multiple of 4 (64 where AMX
//! runs) and the edges with zeros (zero products; the corrections use the true K). Without VNNI the
//! same packed operands go through a portable loop (exact, slower).

use std::mem::MaybeUninit;

use rayon::prelude::*;

mod amx;

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
    /// K rounded up to a multiple of 4, or of 64 where the AMX kernel runs.
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
        // The AMX kernel steps through K 64 bytes at a time; the others 4.
        let step = if amx::available() { amx::K_STEP } else { 4 };
        let kq = k.div_ceil(step) * step;
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

/// The inner kernels of the integer GEMM, fastest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Plain Rust over the packed operands (any CPU).
    Portable,
    /// AVX-512 VNNI `vpdpbusd`, 8 x 32 micro-tiles.
    Vnni,
    /// AMX `tdpbusd`, 32 x 32 blocks of 16 x 16 tiles (B packed with K padded to 64).
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (`KILN_NO_AMX` set in the environment skips AMX).
    pub fn best() -> Kernel {
        if amx::available() {
            Kernel::Amx
        } else if has_vnni() {
            Kernel::Vnni
        } else {
            Kernel::Portable
        }
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        let best = Kernel::best();
        [Kernel::Portable, Kernel::Vnni, Kernel::Amx]
            .into_iter()
            .filter(|&k| k <= best)
            .collect()
    }

    /// Rows of A each call of the kernel covers.
    fn block_rows(self) -> usize {
        match self {
            Kernel::Amx => amx::MA,
            _ => MR,
        }
    }
}

/// `C = (A - a_zp) · (B - b_zp)` for row-major `a` (`m x k` bytes of type `ty`; zero point
/// scalar or per row, a per-row list repeating every `len` rows) into row-major `c` (`m x n`).
pub fn gemm(a: &[u8], ty: Int8, m: usize, a_zp: ZeroPoint, b: &PackedQB, c: &mut [i32]) -> Result<(), QGemmError> {
    gemm_with(a, ty, m, a_zp, b, Output::I32(c), Kernel::best())
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
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and the product only writes initialized f32
    // values through the slice (never uninit ones), so `y` stays initialized.
    let y = unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_f32_uninit(a, ty, m, a_zp, b, scale, bias, y)
}

/// [`gemm_f32`] into memory that need not be initialized: on success every element of `y` has
/// been written (so a `Vec`'s spare capacity can be filled and its length set).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_uninit(
    a: &[u8],
    ty: Int8,
    m: usize,
    a_zp: ZeroPoint,
    b: &PackedQB,
    scale: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
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
    gemm_with(a, ty, m, a_zp, b, Output::F32 { y, scale, bias }, Kernel::best())
}

/// Where [`gemm_with`] writes: all of C, or one block's rows of it.
enum Output<'a> {
    I32(&'a mut [i32]),
    F32 {
        y: &'a mut [MaybeUninit<f32>],
        scale: &'a [f32],
        bias: Option<&'a [f32]>,
    },
}

impl<'a> Output<'a> {
    fn len(&self) -> usize {
        match self {
            Output::I32(c) => c.len(),
            Output::F32 { y, .. } => y.len(),
        }
    }

    /// The output cut into blocks of `rows` (of `n` values each), in order.
    fn blocks(self, len: usize) -> Vec<Output<'a>> {
        match self {
            Output::I32(c) => c.chunks_mut(len).map(Output::I32).collect(),
            Output::F32 { y, scale, bias } => y.chunks_mut(len).map(|y| Output::F32 { y, scale, bias }).collect(),
        }
    }
}

fn gemm_with(
    a: &[u8],
    ty: Int8,
    m: usize,
    a_zp: ZeroPoint,
    b: &PackedQB,
    out: Output,
    kernel: Kernel,
) -> Result<(), QGemmError> {
    let (k, n) = (b.k, b.n);
    let out_len = out.len();
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
    // A B operand packed on a CPU without AMX (K padded to 4 only) runs on VNNI.
    let kernel = if kernel == Kernel::Amx && !b.kq.is_multiple_of(amx::K_STEP) {
        Kernel::Vnni
    } else {
        kernel
    };
    let shift = match ty {
        Int8::U8 => 0,
        Int8::I8 => 128,
    };
    let mb = kernel.block_rows();
    let blocks = m.div_ceil(mb);
    let block = Block {
        a,
        k,
        m,
        a_zp,
        shift,
        b,
        panels: n.div_ceil(NR),
        kernel,
    };
    let parallel = m * k * n >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 && blocks > 1;
    let outs = out.blocks(mb * n);
    if parallel {
        outs.into_par_iter()
            .enumerate()
            .for_each(|(t, rows)| SCRATCH.with_borrow_mut(|s| block.run(t, s, rows)));
    } else {
        SCRATCH.with_borrow_mut(|s| outs.into_iter().enumerate().for_each(|(t, rows)| block.run(t, s, rows)));
    }
    Ok(())
}

thread_local! {
    /// Each thread's packing buffers, kept from product to product.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// One thread's packing buffers, reused from block to block (rows past a short last block keep
/// stale values, whose products are never stored).
#[derive(Default)]
struct Scratch {
    /// A tile for the VNNI and portable kernels: `[K/4][MR]` groups of four bytes.
    groups: Vec<i32>,
    /// A block for the AMX kernel: [`amx::MA`] rows of `kq` bytes.
    rows: Vec<u8>,
    /// The AMX kernel's 32 x 32 product of one panel.
    acc: Vec<i32>,
    /// An MR-row block of C for the float output of the VNNI and portable kernels.
    c: Vec<i32>,
}

/// The operands of one product, cut into blocks of the kernel's rows.
struct Block<'a> {
    a: &'a [u8],
    k: usize,
    m: usize,
    a_zp: ZeroPoint<'a>,
    shift: i32,
    b: &'a PackedQB,
    panels: usize,
    kernel: Kernel,
}

impl Block<'_> {
    /// Writes rows `t * block_rows..` of C into `out` (those rows, row stride n).
    fn run(&self, t: usize, s: &mut Scratch, out: Output) {
        let (k, n, b) = (self.k, self.b.n, self.b);
        let mb = self.kernel.block_rows();
        let rows = mb.min(self.m - t * mb);
        let a = &self.a[t * mb * k..(t * mb + rows) * k];
        // C[r, j] = acc[r, j] + u[r] * zb[j] - v[r] * col_sum[j] with v = za and u = K * za - row_sum.
        let corrections = |row_sum: &[i32], u: &mut [i32], v: &mut [i32]| {
            for r in 0..rows {
                v[r] = self.a_zp.at(t * mb + r) + self.shift;
                u[r] = (k as i32).wrapping_mul(v[r]).wrapping_sub(row_sum[r]);
            }
        };
        let edge = |p: usize| Edge {
            zb: &b.zp[p * NR..(p + 1) * NR],
            col_sum: &b.col_sum[p * NR..(p + 1) * NR],
            cols: NR.min(n - p * NR),
        };
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Amx {
            s.rows.resize(amx::MA * b.kq, 0);
            s.acc.resize(amx::MA * NR, 0);
            let mut row_sum = [0i32; amx::MA];
            pack_a_rows(a, k, rows, self.shift, b.kq, &mut s.rows, &mut row_sum);
            let (mut u, mut v) = ([0i32; amx::MA], [0i32; amx::MA]);
            corrections(&row_sum, &mut u, &mut v);
            let acc: &mut [i32; amx::MA * NR] = (&mut s.acc[..]).try_into().expect("sized above");
            let mut out = out;
            // SAFETY: `Kernel::Amx` is only chosen when `amx::available()` (AMX-INT8 with the tile
            // state granted, and AVX-512 VNNI for the epilogue).
            let tiles = unsafe { amx::Tiles::configure() };
            for p in 0..self.panels {
                tiles.panel_product(&s.rows, b.kq, rows, b.panel(p), acc);
                let e = edge(p);
                // SAFETY: AVX-512 is present (as above); `acc` holds MA x NR values, `u`/`v`
                // MA; the output block holds `rows` rows of n (the caller cut it so), and
                // `finish_avx512` checks its bounds.
                unsafe { finish_avx512(acc, rows, &u, &v, &e, p * NR, &mut out, n) };
            }
            return;
        }
        s.groups.resize(b.kq / 4 * MR, 0);
        let mut row_sum = [0i32; MR];
        pack_a(a, k, rows, self.shift, &mut s.groups, &mut row_sum);
        let (mut u, mut v) = ([0i32; MR], [0i32; MR]);
        corrections(&row_sum, &mut u, &mut v);
        let tile = Tile {
            a: &s.groups,
            quads: b.kq / 4,
            rows,
            u,
            v,
        };
        let vnni = self.kernel != Kernel::Portable;
        match out {
            Output::I32(c) => {
                for p in 0..self.panels {
                    tile.run(b.panel(p), &edge(p), &mut c[p * NR..], n, vnni);
                }
            }
            Output::F32 { y, scale, bias } => {
                s.c.resize(rows * n, 0);
                for p in 0..self.panels {
                    tile.run(b.panel(p), &edge(p), &mut s.c[p * NR..], n, vnni);
                }
                for (yr, cr) in y.chunks_mut(n).zip(s.c.chunks(n)) {
                    to_float(cr, scale, bias, yr);
                }
            }
        }
    }
}

/// `y[j] = c[j] as f32 * scale[j] (+ bias[j])` (a scale of one value applies to all).
fn to_float(c: &[i32], scale: &[f32], bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    match (scale, bias) {
        ([s], None) => y.iter_mut().zip(c).for_each(|(o, &v)| {
            o.write(v as f32 * s);
        }),
        ([s], Some(b)) => y.iter_mut().zip(c.iter().zip(b)).for_each(|(o, (&v, &b))| {
            o.write(v as f32 * s + b);
        }),
        (s, None) => y.iter_mut().zip(c.iter().zip(s)).for_each(|(o, (&v, &s))| {
            o.write(v as f32 * s);
        }),
        (s, Some(b)) => y
            .iter_mut()
            .zip(c.iter().zip(s.iter().zip(b)))
            .for_each(|(o, (&v, (&s, &b)))| {
                o.write(v as f32 * s + b);
            }),
    }
}

/// Finishes one panel of an AMX block: `C[r, j] = acc[r, j] + u[r] * zb[j] - v[r] * col_sum[j]`
/// for `rows` rows and the panel's columns (`col0..col0 + cols` of the output's `n`), stored as
/// i32 or converted as [`to_float`] does (a Cast, a Mul and an Add in f32, bit for bit), with a
/// column mask at the right edge.
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_avx512(
    acc: &[i32; amx::MA * NR],
    rows: usize,
    u: &[i32; amx::MA],
    v: &[i32; amx::MA],
    e: &Edge,
    col0: usize,
    out: &mut Output,
    n: usize,
) {
    use std::arch::x86_64::*;
    assert!(rows > 0 && rows <= amx::MA && e.cols > 0 && e.cols <= NR && col0 + e.cols <= n);
    assert!(e.zb.len() == NR && e.col_sum.len() == NR);
    assert!(out.len() >= (rows - 1) * n + col0 + e.cols);
    if let Output::F32 { scale, bias, .. } = out {
        assert!((scale.len() == 1 || scale.len() == n) && bias.is_none_or(|b| b.len() == n));
    }
    // SAFETY: the loads of zb, col_sum and acc read 16 i32 inside the arrays asserted above; the
    // scale, bias and output accesses are masked to columns col0 + h*16 + lane < col0 + cols <= n
    // of rows < `rows`, inside the slices asserted above.
    unsafe {
        let zb = [
            _mm512_loadu_si512(e.zb.as_ptr() as *const _),
            _mm512_loadu_si512(e.zb.as_ptr().add(16) as *const _),
        ];
        let cs = [
            _mm512_loadu_si512(e.col_sum.as_ptr() as *const _),
            _mm512_loadu_si512(e.col_sum.as_ptr().add(16) as *const _),
        ];
        let lo = e.cols.min(16);
        let masks = [((1u32 << lo) - 1) as u16, ((1u32 << (e.cols - lo)) - 1) as u16];
        let halves = if e.cols > 16 { 2 } else { 1 };
        let int = |r: usize, h: usize| {
            let x = _mm512_loadu_si512(acc.as_ptr().add(r * NR + h * 16) as *const _);
            let (uu, vv) = (_mm512_set1_epi32(u[r]), _mm512_set1_epi32(v[r]));
            _mm512_sub_epi32(
                _mm512_add_epi32(x, _mm512_mullo_epi32(uu, zb[h])),
                _mm512_mullo_epi32(vv, cs[h]),
            )
        };
        match out {
            Output::I32(c) => {
                for r in 0..rows {
                    for (h, &mask) in masks.iter().enumerate().take(halves) {
                        let at = c.as_mut_ptr().add(r * n + col0 + h * 16);
                        _mm512_mask_storeu_epi32(at, mask, int(r, h));
                    }
                }
            }
            Output::F32 { y, scale, bias } => {
                let scale: &[f32] = scale;
                let sc: [__m512; 2] = std::array::from_fn(|h| match scale {
                    [s] => _mm512_set1_ps(*s),
                    s => _mm512_maskz_loadu_ps(masks[h], s.as_ptr().add(col0 + h * 16)),
                });
                let bi: Option<[__m512; 2]> = bias
                    .map(|b| std::array::from_fn(|h| _mm512_maskz_loadu_ps(masks[h], b.as_ptr().add(col0 + h * 16))));
                for r in 0..rows {
                    for (h, &mask) in masks.iter().enumerate().take(halves) {
                        let mut f = _mm512_mul_ps(_mm512_cvtepi32_ps(int(r, h)), sc[h]);
                        if let Some(bi) = &bi {
                            f = _mm512_add_ps(f, bi[h]);
                        }
                        let at = y.as_mut_ptr().add(r * n + col0 + h * 16) as *mut f32;
                        _mm512_mask_storeu_ps(at, mask, f);
                    }
                }
            }
        }
    }
}

/// Copies `rows` rows of A (`k` bytes each) into rows of `kq` bytes (zero padded), each byte
/// shifted to u8 (`shift` 128 flips the sign bit of an i8), with the row sums of the shifted
/// values.
fn pack_a_rows(a: &[u8], k: usize, rows: usize, shift: i32, kq: usize, out: &mut [u8], row_sum: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::fastmath::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked here); the body is safe code.
        unsafe { pack_a_rows_avx2(a, k, rows, shift, kq, out, row_sum) };
        return;
    }
    pack_a_rows_body(a, k, rows, shift, kq, out, row_sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_rows_avx2(
    a: &[u8],
    k: usize,
    rows: usize,
    shift: i32,
    kq: usize,
    out: &mut [u8],
    row_sum: &mut [i32],
) {
    pack_a_rows_body(a, k, rows, shift, kq, out, row_sum)
}

#[inline(always)]
fn pack_a_rows_body(a: &[u8], k: usize, rows: usize, shift: i32, kq: usize, out: &mut [u8], row_sum: &mut [i32]) {
    let flip = if shift == 0 { 0u8 } else { 0x80 };
    for ((src, dst), sum) in a
        .chunks_exact(k)
        .zip(out.chunks_exact_mut(kq))
        .zip(row_sum.iter_mut())
        .take(rows)
    {
        let mut s = 0i32;
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x ^ flip;
            s += (x ^ flip) as i32;
        }
        dst[k..].fill(0);
        *sum = s;
    }
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
            (33, 200, 97),
            (64, 384, 64),
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
                        for kernel in Kernel::available() {
                            let mut c = vec![0i32; m * n];
                            gemm_with(&a, ta, m, ZeroPoint::PerIndex(&za), &pb, Output::I32(&mut c), kernel).unwrap();
                            assert_eq!(c, want, "{m}x{k}x{n} {ta:?}x{tb:?} zp kind {zp_kind} {kernel:?}");
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 96);
        // This CPU's fastest kernel was among those checked.
        assert!(Kernel::available().contains(&Kernel::best()));
    }

    #[test]
    fn float_output_is_the_cast_mul_add_of_the_integer_result() {
        let mut rng = Bytes(11);
        let (m, k, n) = (35, 37, 45);
        let (a, b) = (rng.vec(m * k), rng.vec(k * n));
        let pb = PackedQB::pack(&b, Int8::I8, k, n, ZeroPoint::Scalar(3)).unwrap();
        let mut c = vec![0i32; m * n];
        gemm(&a, Int8::U8, m, ZeroPoint::Scalar(120), &pb, &mut c).unwrap();
        let per_col: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
        for (scale, bias) in [
            (&[0.0123f32][..], None),
            (&per_col[..], None),
            (&per_col[..], Some(&bias[..])),
            (&[0.5][..], Some(&bias[..])),
        ] {
            let want: Vec<f32> = c
                .iter()
                .enumerate()
                .map(|(i, &acc)| {
                    let j = i % n;
                    let y = acc as f32 * scale[j % scale.len()];
                    bias.map_or(y, |b| y + b[j])
                })
                .collect();
            let mut y = vec![f32::NAN; m * n];
            gemm_f32(&a, Int8::U8, m, ZeroPoint::Scalar(120), &pb, scale, bias, &mut y).unwrap();
            assert!(
                y.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                "best kernel"
            );
            for kernel in Kernel::available() {
                let mut y = vec![MaybeUninit::new(f32::NAN); m * n];
                let out = Output::F32 { y: &mut y, scale, bias };
                gemm_with(&a, Int8::U8, m, ZeroPoint::Scalar(120), &pb, out, kernel).unwrap();
                for (i, (got, w)) in y.iter().zip(&want).enumerate() {
                    // SAFETY: initialized above.
                    let got = unsafe { got.assume_init() };
                    assert_eq!(got.to_bits(), w.to_bits(), "element {i}, {kernel:?}");
                }
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

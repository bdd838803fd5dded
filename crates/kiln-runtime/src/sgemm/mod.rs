//! Packed f32 GEMM for the CPU: `C[m, n] = A[m, k] · B[k, n] (+ bias[n])`, with the constant
//! operand (a MatMul/Gemm weight, a Conv filter) packed once when the plan is built.
//!
//! candle's matmul (the `gemm` crate) packs both operands again at every call and picks its blocking
//! per call; for inference the weight never changes, so Kiln packs it once into the layout the
//! micro-kernel reads and only packs the activation per call. The structure is the classic
//! BLIS/GotoBLAS one:
//! - micro-kernel `MR x NR = 6 x 16` f32 (12 AVX2 accumulators, 2 B vectors, 1 A broadcast = 15 of
//!   the 16 ymm registers), FMA over a `kc` slice of k; on CPUs with AVX-512F two adjacent B panels
//!   make one `6 x 32` tile (12 zmm accumulators, one 16-lane vector per panel), the same instruction
//!   count for twice the multiply-adds, with the packed layout unchanged (MiniLM, BERT 1.5-1.7x, OCR
//!   models 1.2x on the dev machine, docs/benchmarks.md);
//! - B is stored as `kc x NR` column panels (contiguous, zero-padded past n), A as `kc x MR` row
//!   panels (zero-padded past m); an `MC x kc` block of A (96 x 384 f32 = 144 KiB) stays in L2 while
//!   the kernel sweeps the 16 KiB B panels through L1;
//! - the bias is the accumulators' initial value, so `MatMul + Add(bias)` costs no extra pass;
//! - threads (rayon) take disjoint `MC`-row blocks of C, split further by column panels when there
//!   are fewer row blocks than threads (one batch-1 sequence);
//! - fewer rows than the micro-tile (a decode step) take [`few_rows`]: each packed B panel streamed
//!   once for all rows, the panels split over the threads.
//!
//! The kernels need x86-64 with AVX2 and FMA ([`available`]); elsewhere callers keep candle's path.
//! Results differ from a naive triple loop only by summation order (FMA, k split in kc blocks).

use rayon::prelude::*;

mod few_rows;
mod indexed;
mod rows;
pub(crate) mod small;

pub use indexed::{gemm_indexed_a, indexed_available, IndexedA};
pub use rows::{gemm_packed_a_rows, rows_available, RowsB};

/// Rows of the micro-tile (A panel height).
pub const MR: usize = 6;
/// Columns of the micro-tile (B panel width): two 8-lane vectors.
pub const NR: usize = 16;
/// Largest depth of one packed block: a `KC_MAX x NR` B panel (24 KiB) stays in a 32 KiB L1 beside
/// the A panel it meets. k is split into equal blocks no deeper than this, so the output tile is
/// loaded and stored as few times as possible (k = 384 is one block, not 256 + 128).
const KC_MAX: usize = 384;

/// The block depth for a given k (every block but the last has exactly this depth).
fn kc_for(k: usize) -> usize {
    let blocks = k.div_ceil(KC_MAX).max(1);
    k.div_ceil(blocks).max(1)
}
/// Multiply-adds below which a product runs on one thread (about 50 us at 80 GFLOP/s).
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// Rows of A packed together (a multiple of MR).
const MC: usize = 96;

/// Whether the packed kernels run on this CPU (x86-64 with AVX2 and FMA), unless the environment
/// variable `KILN_DISABLE_PACKED_GEMM` is set (to any value) when the process first asks: then
/// MatMul, Gemm, Conv and Attention take candle's paths, for A/B measurements and as an escape hatch.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("KILN_DISABLE_PACKED_GEMM").is_none() && cpu_has_kernels())
}

/// Whether full tiles of two adjacent B panels (6 x 32) run on the AVX-512 kernel: x86-64 with
/// AVX-512F, unless `KILN_DISABLE_AVX512` is set when the process first asks (for A/B measurements).
/// On the 2-core dev machine (AMD EPYC, Zen 4) 512-bit and 256-bit FMAs reach the same peak (116-117
/// GFLOP/s on one core; a 512-bit FMA runs as two halves): the wide kernel wins by issuing half the
/// loads, broadcasts and loop instructions per multiply-add.
pub(crate) fn use_avx512() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("KILN_DISABLE_AVX512").is_none() && std::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn cpu_has_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A zeroed f32 buffer whose first element is 64-byte aligned (packed panels are read with vector
/// loads; aligned rows never split a cache line).
struct Aligned {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let buf = vec![0f32; len + 16];
        let off = (buf.as_ptr() as usize).wrapping_neg() % 64 / 4;
        Aligned { buf, off, len }
    }
    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A strided read-only matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Whether every element index is inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (self.cols - 1).checked_mul(self.cs).and_then(|c| r.checked_add(c)));
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// Errors of the packed GEMM entry points (shape mismatches; callers turn them into runtime errors).
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    #[error("packed gemm: {0}")]
    Shape(String),
    #[error("packed gemm needs x86-64 with AVX2 and FMA")]
    Unsupported,
}

/// The constant right operand `B[k, n]`, packed once: for each kc block of k, `ceil(n / NR)` panels
/// of `kc x NR` floats.
pub struct PackedB {
    k: usize,
    n: usize,
    data: Aligned,
}

impl PackedB {
    /// Packs `b` (`k x n`, any strides: a transposed weight is `rs = 1, cs = k`).
    pub fn pack(b: MatRef) -> Result<PackedB, GemmError> {
        if !b.in_bounds() {
            return Err(GemmError::Shape(format!("{}x{} view out of bounds", b.rows, b.cols)));
        }
        let (k, n) = (b.rows, b.cols);
        let npan = n.div_ceil(NR);
        let mut data = Aligned::zeroed(k * npan * NR);
        let dst = data.as_mut_slice();
        let kcb = kc_for(k);
        for pc in 0..k.div_ceil(kcb) {
            let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
            pack_b_block(b, k0, kc, 0, n, &mut dst[k0 * npan * NR..][..npan * kc * NR]);
        }
        Ok(PackedB { k, n, data })
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of the packed panels.
    pub fn bytes(&self) -> usize {
        self.data.len * 4
    }

    /// Column `j` of the packed `k x n` operand into `out` (`k` floats): a stored `[N, K]` weight's
    /// row `j` (an embedding row, when the table is also the tied output projection).
    pub fn column(&self, j: usize, out: &mut [f32]) {
        let kcb = kc_for(self.k);
        let (jp, jj) = (j / NR, j % NR);
        for (p, o) in out.iter_mut().enumerate().take(self.k) {
            *o = self.panel(p / kcb, jp)[(p % kcb) * NR + jj];
        }
    }

    /// The weight back as a row-major `k x n` matrix (for callers that dropped the original).
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut out = vec![0f32; k * n];
        let kcb = kc_for(k);
        for p in 0..k {
            let (pc, kk) = (p / kcb, p % kcb);
            for jp in 0..n.div_ceil(NR) {
                let nr = NR.min(n - jp * NR);
                let src = &self.panel(pc, jp)[kk * NR..][..nr];
                out[p * n + jp * NR..][..nr].copy_from_slice(src);
            }
        }
        out
    }

    fn panel(&self, pc: usize, jp: usize) -> &[f32] {
        let kcb = kc_for(self.k);
        let kc = kcb.min(self.k - pc * kcb);
        let npan = self.n.div_ceil(NR);
        &self.data.as_slice()[pc * kcb * npan * NR + jp * kc * NR..][..kc * NR]
    }
}

/// The constant left operand `A[m, k]` (a Conv filter `[cout, cin * kh * kw]`), packed once: for each
/// kc block, `ceil(m / MR)` panels of `kc x MR` floats.
pub struct PackedA {
    m: usize,
    k: usize,
    data: Aligned,
}

impl PackedA {
    pub fn pack(a: MatRef) -> Result<PackedA, GemmError> {
        if !a.in_bounds() {
            return Err(GemmError::Shape(format!("{}x{} view out of bounds", a.rows, a.cols)));
        }
        let (m, k) = (a.rows, a.cols);
        let mpan = m.div_ceil(MR);
        let mut data = Aligned::zeroed(k * mpan * MR);
        let dst = data.as_mut_slice();
        let kcb = kc_for(k);
        for pc in 0..k.div_ceil(kcb) {
            let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
            pack_a_block(a, 0, m, k0, kc, &mut dst[k0 * mpan * MR..][..mpan * kc * MR]);
        }
        Ok(PackedA { m, k, data })
    }

    pub fn m(&self) -> usize {
        self.m
    }

    /// Bytes of the packed panels.
    pub fn bytes(&self) -> usize {
        self.data.len * 4
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The operand back as a row-major `m x k` matrix (for callers that dropped the original).
    pub fn unpack(&self) -> Vec<f32> {
        let (m, k) = (self.m, self.k);
        let mut out = vec![0f32; m * k];
        let kcb = kc_for(k);
        for i in 0..m {
            let (ip, ii) = (i / MR, i % MR);
            for p in 0..k {
                out[i * k + p] = self.panel(p / kcb, ip)[(p % kcb) * MR + ii];
            }
        }
        out
    }

    fn panel(&self, pc: usize, ip: usize) -> &[f32] {
        let kcb = kc_for(self.k);
        let kc = kcb.min(self.k - pc * kcb);
        let mpan = self.m.div_ceil(MR);
        &self.data.as_slice()[pc * kcb * mpan * MR + ip * kc * MR..][..kc * MR]
    }
}

/// Packs rows `i0..i0 + mc` and columns `k0..k0 + kc` of `a` into MR-row panels (`kc x MR` each,
/// rows past the matrix zero).
fn pack_a_block(a: MatRef, i0: usize, mc: usize, k0: usize, kc: usize, dst: &mut [f32]) {
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut dst[ip * kc * MR..][..kc * MR];
        let r0 = i0 + ip * MR;
        let mr = MR.min(i0 + mc - r0);
        if a.cs == 1 && mr == MR {
            // A whole panel: six row slices read in step, each panel row written once.
            let rows: [&[f32]; MR] = std::array::from_fn(|i| &a.data[(r0 + i) * a.rs + k0..][..kc]);
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                for i in 0..MR {
                    out[i] = rows[i][p];
                }
            }
        } else if a.cs == 1 {
            for i in 0..MR {
                if i < mr {
                    let row = &a.data[(r0 + i) * a.rs + k0..][..kc];
                    for (p, &x) in row.iter().enumerate() {
                        panel[p * MR + i] = x;
                    }
                } else {
                    for p in 0..kc {
                        panel[p * MR + i] = 0.0;
                    }
                }
            }
        } else {
            for p in 0..kc {
                for i in 0..MR {
                    panel[p * MR + i] = if i < mr {
                        a.data[(r0 + i) * a.rs + (k0 + p) * a.cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Packs rows `k0..k0 + kc` and columns `j0..j0 + nc` of `b` into NR-column panels.
fn pack_b_block(b: MatRef, k0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
    for jp in 0..nc.div_ceil(NR) {
        let panel = &mut dst[jp * kc * NR..][..kc * NR];
        let c0 = j0 + jp * NR;
        let nr = NR.min(j0 + nc - c0);
        for p in 0..kc {
            let row = &mut panel[p * NR..][..NR];
            let base = (k0 + p) * b.rs + c0 * b.cs;
            if b.cs == 1 {
                row[..nr].copy_from_slice(&b.data[base..base + nr]);
            } else {
                for (j, d) in row[..nr].iter_mut().enumerate() {
                    *d = b.data[base + j * b.cs];
                }
            }
            row[nr..].fill(0.0);
        }
    }
}

/// A right operand packed on the fly, one NR-column panel at a time, straight from where its values
/// live (an implicit im2col: a convolution's input image, never written out as a column matrix).
pub trait PanelSource: Sync {
    /// k
    fn rows(&self) -> usize;
    /// n
    fn cols(&self) -> usize;
    /// Writes rows `k0..k0 + kc` of columns `j0..j0 + nr` (`nr <= NR`) as a `kc x NR` panel:
    /// `dst[p * NR + j]`, zero in columns `nr..NR`. `dst` holds `kc * NR` floats.
    fn pack_panel(&self, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]);
}

impl PanelSource for MatRef<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn pack_panel(&self, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        pack_b_block(*self, k0, kc, j0, nr, dst)
    }
}

/// Where a micro-tile's accumulators start.
#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// `NR` floats, the same for every row.
    Row(*const f32),
    /// `MR` floats, one per row.
    Col(*const f32),
    /// The tile's current contents (a later kc block).
    Load,
}

/// Per-output bias: one value per column of C (MatMul/Gemm) or per row (Conv channels).
#[derive(Clone, Copy)]
pub enum Bias<'a> {
    None,
    PerCol(&'a [f32]),
    PerRow(&'a [f32]),
    /// C already holds the initial values: `C += A · B`.
    Accumulate,
}

/// The mutable output, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    ldc: usize,
}
// SAFETY: tasks write disjoint tiles of one buffer that outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// An activation applied to the finished output (bias included), block by block while it is in cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// `x * 0.5 * (1 + erf(x / sqrt 2))`
    GeluErf,
    /// `x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`
    GeluTanh,
}

/// `C = A · B (+ bias)` with a packed constant `B`; `c` is row-major `[m, n]` with row stride `ldc`.
pub fn gemm_packed_b(a: MatRef, b: &PackedB, bias: Bias, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    gemm_packed_b_act(a, b, bias, Activation::None, c, ldc)
}

/// [`gemm_packed_b`] on the calling thread: products too small to be worth waking the pool for.
pub fn gemm_packed_b_seq(a: MatRef, b: &PackedB, bias: Bias, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    packed_b(
        a,
        b,
        bias,
        Opts {
            parallel: false,
            act: Activation::None,
        },
        c,
        ldc,
    )
}

/// `C = act(A · B (+ bias))` with a packed constant `B`.
pub fn gemm_packed_b_act(
    a: MatRef,
    b: &PackedB,
    bias: Bias,
    act: Activation,
    c: &mut [f32],
    ldc: usize,
) -> Result<(), GemmError> {
    packed_b(a, b, bias, Opts { parallel: true, act }, c, ldc)
}

fn packed_b(a: MatRef, b: &PackedB, bias: Bias, opts: Opts, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    let (m, n) = (a.rows, b.n);
    check(a.cols, b.k, m, n, bias, c, ldc)?;
    if !a.in_bounds() {
        return Err(GemmError::Shape("A view out of bounds".into()));
    }
    run(m, n, b.k, Left::Raw(a), Right::Packed(b), bias, c, ldc, opts)
}

/// `C = A · B (+ bias)` with a packed constant `A` (a Conv filter) and a strided `B`.
pub fn gemm_packed_a(a: &PackedA, b: MatRef, bias: Bias, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    let (m, n) = (a.m, b.cols);
    check(a.k, b.rows, m, n, bias, c, ldc)?;
    if !b.in_bounds() {
        return Err(GemmError::Shape("B view out of bounds".into()));
    }
    gemm_packed_a_source(a, &b, bias, c, ldc)
}

/// `C = A · B (+ bias)` with a packed constant `A` and a `B` packed panel by panel from `b` (a
/// convolution's implicit im2col).
pub fn gemm_packed_a_source(
    a: &PackedA,
    b: &dyn PanelSource,
    bias: Bias,
    c: &mut [f32],
    ldc: usize,
) -> Result<(), GemmError> {
    let (m, n) = (a.m, b.cols());
    check(a.k, b.rows(), m, n, bias, c, ldc)?;
    run(
        m,
        n,
        a.k,
        Left::Packed(a),
        Right::Source(b),
        bias,
        c,
        ldc,
        Opts {
            parallel: true,
            act: Activation::None,
        },
    )
}

/// `C = A · B (+ bias)` with both operands packed per call, on the calling thread: small products
/// (one attention head) inside an outer parallel loop.
pub fn gemm_seq(a: MatRef, b: MatRef, bias: Bias, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    let (m, n) = (a.rows, b.cols);
    check(a.cols, b.rows, m, n, bias, c, ldc)?;
    if !a.in_bounds() || !b.in_bounds() {
        return Err(GemmError::Shape("operand view out of bounds".into()));
    }
    run(
        m,
        n,
        a.cols,
        Left::Raw(a),
        Right::Source(&b),
        bias,
        c,
        ldc,
        Opts {
            parallel: false,
            act: Activation::None,
        },
    )
}

fn check(ka: usize, kb: usize, m: usize, n: usize, bias: Bias, c: &[f32], ldc: usize) -> Result<(), GemmError> {
    if !available() {
        return Err(GemmError::Unsupported);
    }
    if ka != kb {
        return Err(GemmError::Shape(format!("inner dimensions differ: {ka} and {kb}")));
    }
    if ldc < n || (m > 0 && c.len() < (m - 1) * ldc + n) {
        return Err(GemmError::Shape(format!(
            "output of {} floats is too small for {m}x{n}",
            c.len()
        )));
    }
    match bias {
        Bias::PerCol(b) if b.len() != n => {
            Err(GemmError::Shape(format!("bias has {} values for {n} columns", b.len())))
        }
        Bias::PerRow(b) if b.len() != m => Err(GemmError::Shape(format!("bias has {} values for {m} rows", b.len()))),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy)]
struct Opts {
    /// Split the work over rayon's threads (false inside an outer parallel loop).
    parallel: bool,
    act: Activation,
}

enum Left<'a> {
    Raw(MatRef<'a>),
    Packed(&'a PackedA),
}

enum Right<'a> {
    Packed(&'a PackedB),
    Source(&'a dyn PanelSource),
}

#[allow(clippy::too_many_arguments)]
fn run(
    m: usize,
    n: usize,
    k: usize,
    a: Left,
    b: Right,
    bias: Bias,
    c: &mut [f32],
    ldc: usize,
    opts: Opts,
) -> Result<(), GemmError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let out = OutPtr {
        ptr: c.as_mut_ptr(),
        ldc,
    };
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let v = match bias {
                    Bias::None => 0.0,
                    Bias::Accumulate => c[i * ldc + j],
                    Bias::PerCol(b) => b[j],
                    Bias::PerRow(b) => b[i],
                };
                c[i * ldc + j] = act1(opts.act, v);
            }
        }
        return Ok(());
    }
    if let (Left::Raw(am), Right::Packed(pb)) = (&a, &b) {
        if m < MR {
            few_rows::run(*am, pb, bias, opts.act, out, opts.parallel);
            return Ok(());
        }
    }
    let npan = n.div_ceil(NR);
    // Row blocks: a per-call A is packed MC rows at a time (kept in L2); a packed A is one block, so each
    // B panel, packed per call, serves every row of C while it is in L1.
    let mcb = match a {
        Left::Raw(_) => MC,
        Left::Packed(_) => m.div_ceil(MR) * MR,
    };
    let mblocks = m.div_ceil(mcb);
    // With fewer row blocks than threads, the columns are split too so every thread has work.
    // Small products stay on the calling thread: waking rayon's workers costs tens of microseconds, more
    // when other thread pools (another engine's, candle's barrier pool) spin on the same cores.
    let big = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_MACS;
    let threads = if opts.parallel && big {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let mut chunk = npan;
    if mblocks < threads * 2 && threads > 1 {
        let want = (threads * 2).div_ceil(mblocks);
        chunk = chunk.min(npan.div_ceil(want).max(1));
    }
    let nchunks = npan.div_ceil(chunk);
    if let Left::Raw(am) = a {
        if nchunks > 1 {
            // Every column chunk would pack the same rows of A again: pack them once for all.
            let pa = PackedA::pack(am)?;
            return run(m, n, k, Left::Packed(&pa), b, bias, c, ldc, opts);
        }
    }
    let tasks = mblocks * nchunks;
    let task = |t: usize| {
        let (ib, jc) = (t / nchunks, t % nchunks);
        let i0 = ib * mcb;
        let mc = mcb.min(m - i0);
        let (jp0, jp1) = (jc * chunk, ((jc + 1) * chunk).min(npan));
        let mut abuf = match a {
            Left::Raw(_) => Aligned::zeroed(mc.div_ceil(MR) * MR * kc_for(k)),
            Left::Packed(_) => Aligned::zeroed(0),
        };
        // A per-call B is packed one panel at a time, right before the micro-kernels that use it, so the
        // panel is still in L1 (packing a whole block first would send it through L2 and back).
        let mut bbuf = match b {
            Right::Source(_) => Aligned::zeroed(3 * kc_for(k) * NR),
            Right::Packed(_) => Aligned::zeroed(0),
        };
        let wide = use_avx512();
        let kcb = kc_for(k);
        for pc in 0..k.div_ceil(kcb) {
            let (k0, kc) = (pc * kcb, kcb.min(k - pc * kcb));
            if let Left::Raw(am) = a {
                pack_a_block(am, i0, mc, k0, kc, abuf.as_mut_slice());
            }
            let mut jp = jp0;
            while jp < jp1 {
                let j0 = jp * NR;
                // Three (or two) whole panels side by side make a 6 x 48 (6 x 32) tile for the AVX-512
                // kernel.
                let whole = |q: usize| jp + q <= jp1 && j0 + q * NR <= n;
                let panels = if !wide {
                    1
                } else if whole(3) {
                    3
                } else if whole(2) {
                    2
                } else {
                    1
                };
                if let Right::Source(src) = b {
                    for q in 0..panels {
                        let jq = j0 + q * NR;
                        let dst = &mut bbuf.as_mut_slice()[q * kc * NR..(q + 1) * kc * NR];
                        src.pack_panel(k0, kc, jq, NR.min(n - jq), dst);
                    }
                }
                let panel = |q: usize| match b {
                    Right::Packed(pb) => pb.panel(pc, jp + q),
                    Right::Source(_) => &bbuf.as_slice()[q * kc * NR..(q + 1) * kc * NR],
                };
                let bps: [&[f32]; 3] = std::array::from_fn(|q| if q < panels { panel(q) } else { &[] });
                let nr = NR.min(n - j0);
                jp += panels;
                for ip in 0..mc.div_ceil(MR) {
                    let ap = match a {
                        Left::Packed(pa) => pa.panel(pc, i0 / MR + ip),
                        Left::Raw(_) => &abuf.as_slice()[ip * kc * MR..][..kc * MR],
                    };
                    let r0 = i0 + ip * MR;
                    let mr = MR.min(m - r0);
                    let init = if pc > 0 {
                        Init::Load
                    } else {
                        match bias {
                            Bias::None => Init::Zero,
                            Bias::Accumulate => Init::Load,
                            Bias::PerCol(bv) => Init::Row(bv[j0..].as_ptr()),
                            Bias::PerRow(bv) => Init::Col(bv[r0..].as_ptr()),
                        }
                    };
                    // SAFETY: the tile (r0..r0+mr, j0..j0+nr, or panels*NR columns for a wide tile) is
                    // inside C (checked by `check`), no other task writes it, and the panels hold kc*MR /
                    // kc*NR floats.
                    unsafe {
                        let (a0, b0, b1) = (ap.as_ptr(), bps[0].as_ptr(), bps[1].as_ptr());
                        match panels {
                            3 => kernel_wide(kc, a0, [b0, b1, bps[2].as_ptr()], out, r0, j0, mr, init),
                            2 => kernel_wide(kc, a0, [b0, b1], out, r0, j0, mr, init),
                            _ => tile(kc, ap, bps[0], out, r0, j0, mr, nr, init),
                        }
                    }
                }
            }
        }
        if opts.act != Activation::None {
            let (j0, j1) = (jp0 * NR, (jp1 * NR).min(n));
            for r in i0..i0 + mc {
                // SAFETY: this task's rows i0..i0+mc, columns j0..j1 of C, finished above; no other task
                // touches them.
                let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * out.ldc + j0), j1 - j0) };
                activate(opts.act, row);
            }
        }
    };
    if tasks == 1 || threads == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    Ok(())
}

fn act1(act: Activation, x: f32) -> f32 {
    let mut v = [x];
    activate(act, &mut v);
    v[0]
}

/// Applies `act` in place (the vectorized `fastmath` kernels, through a small stack buffer).
fn activate(act: Activation, row: &mut [f32]) {
    use crate::fastmath::{map_slice, Func};
    let f = match act {
        Activation::None => return,
        Activation::Relu => {
            // NaN stays NaN, like the Relu kernel (max would drop it).
            row.iter_mut().for_each(|x| *x = if *x < 0.0 { 0.0 } else { *x });
            return;
        }
        Activation::GeluErf => Func::GeluErf,
        Activation::GeluTanh => Func::GeluTanh,
    };
    let mut tmp = [0f32; 256];
    for chunk in row.chunks_mut(256) {
        let t = &mut tmp[..chunk.len()];
        t.copy_from_slice(chunk);
        map_slice(f, t, chunk);
    }
}

/// One micro-tile: full tiles go straight to C, edge tiles through a 6x16 scratch tile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(kc: usize, ap: &[f32], bp: &[f32], out: OutPtr, r0: usize, j0: usize, mr: usize, nr: usize, init: Init) {
    // SAFETY (whole body): see the caller; edge tiles touch only their mr x nr part of C.
    unsafe {
        let c = out.ptr.add(r0 * out.ldc + j0);
        if mr == MR && nr == NR {
            kernel(kc, ap.as_ptr(), bp.as_ptr(), c, out.ldc, init);
            return;
        }
        let mut t = [0f32; MR * NR];
        for i in 0..mr {
            for j in 0..nr {
                t[i * NR + j] = match init {
                    Init::Zero => 0.0,
                    Init::Row(b) => *b.add(j),
                    Init::Col(b) => *b.add(i),
                    Init::Load => *c.add(i * out.ldc + j),
                };
            }
        }
        kernel(kc, ap.as_ptr(), bp.as_ptr(), t.as_mut_ptr(), NR, Init::Load);
        for i in 0..mr {
            for j in 0..nr {
                *c.add(i * out.ldc + j) = t[i * NR + j];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, init: Init) {
    // SAFETY: as for `kernel_avx2`; `check` made sure the CPU has AVX2 and FMA.
    unsafe { kernel_avx2(kc, a, b, c, ldc, init) }
}

/// A tile of `R` rows (1..=MR) and `P * NR` columns of C at `(r0, j0)` from one A panel (its first `R`
/// rows) and `P` adjacent B panels (`P` = 2 or 3), on the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel_wide<const P: usize>(
    kc: usize,
    a: *const f32,
    b: [*const f32; P],
    out: OutPtr,
    r0: usize,
    j0: usize,
    rows: usize,
    init: Init,
) {
    // SAFETY: as for `kernel_avx512`; `use_avx512` made sure the CPU has AVX-512F.
    unsafe {
        let c = out.ptr.add(r0 * out.ldc + j0);
        match rows {
            1 => kernel_avx512::<1, P>(kc, a, b, c, out.ldc, init),
            2 => kernel_avx512::<2, P>(kc, a, b, c, out.ldc, init),
            3 => kernel_avx512::<3, P>(kc, a, b, c, out.ldc, init),
            4 => kernel_avx512::<4, P>(kc, a, b, c, out.ldc, init),
            5 => kernel_avx512::<5, P>(kc, a, b, c, out.ldc, init),
            _ => kernel_avx512::<MR, P>(kc, a, b, c, out.ldc, init),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_wide<const P: usize>(
    _kc: usize,
    _a: *const f32,
    _b: [*const f32; P],
    _out: OutPtr,
    _r0: usize,
    _j0: usize,
    _rows: usize,
    _init: Init,
) {
    // `use_avx512` is false off x86-64, so this is never reached.
}

/// The AVX-512 micro-kernel: [`kernel_avx2`]'s loop over `R` rows of an A panel (R <= MR; the panel
/// is still `kc x MR`) and `P` B panels, one 16-lane vector per panel. `R x P` of the 32 zmm registers
/// accumulate: a full 6 x 48 tile (P = 3) issues 9 loads per 18 multiply-adds where 6 x 32 issues 8 per
/// 12, and a short tile at the bottom of C (m not a multiple of 6) does only its own rows' work.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const R: usize, const P: usize>(
    kc: usize,
    a: *const f32,
    b: [*const f32; P],
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees kc*MR floats at `a`, kc*NR 64-byte aligned floats at
    // each `b[q]`, and an R x P*NR tile at `c` with row stride `ldc`; `Row` points at P*NR floats, `Col`
    // at R.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        match init {
            Init::Zero => {}
            Init::Row(bias) => {
                for r in acc.iter_mut() {
                    for (q, v) in r.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(bias.add(q * NR));
                    }
                }
            }
            Init::Col(bias) => {
                for (i, r) in acc.iter_mut().enumerate() {
                    *r = [_mm512_set1_ps(*bias.add(i)); P];
                }
            }
            Init::Load => {
                for (i, r) in acc.iter_mut().enumerate() {
                    for (q, v) in r.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(c.add(i * ldc + q * NR));
                    }
                }
            }
        }
        let mut ap = a;
        let mut bp = b;
        for _ in 0..kc {
            let mut bv = [_mm512_setzero_ps(); P];
            for q in 0..P {
                bv[q] = _mm512_load_ps(bp[q]);
                bp[q] = bp[q].add(NR);
            }
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                for q in 0..P {
                    r[q] = _mm512_fmadd_ps(av, bv[q], r[q]);
                }
            }
            ap = ap.add(MR);
        }
        for (i, r) in acc.iter().enumerate() {
            for (q, v) in r.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc + q * NR), *v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_kc: usize, _a: *const f32, _b: *const f32, _c: *mut f32, _ldc: usize, _init: Init) {
    // `check` refuses to run without AVX2 + FMA, so this is never reached.
}

/// The 6x16 micro-kernel: `C[6, 16] = init + sum_p A[p, 0..6]^T B[p, 0..16]` with A and B panels
/// packed `kc x MR` and `kc x NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, init: Init) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees kc*MR floats at `a`, kc*NR 64-byte aligned floats at
    // `b`, and an MR x NR tile at `c` with row stride `ldc`; `Row`/`Col` point at NR / MR floats.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        match init {
            Init::Zero => {}
            Init::Row(bias) => {
                let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
                for r in acc.iter_mut() {
                    *r = [b0, b1];
                }
            }
            Init::Col(bias) => {
                for (i, r) in acc.iter_mut().enumerate() {
                    let v = _mm256_broadcast_ss(&*bias.add(i));
                    *r = [v, v];
                }
            }
            Init::Load => {
                for (i, r) in acc.iter_mut().enumerate() {
                    *r = [_mm256_loadu_ps(c.add(i * ldc)), _mm256_loadu_ps(c.add(i * ldc + 8))];
                }
            }
        }
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_load_ps(bp);
            let b1 = _mm256_load_ps(bp.add(8));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                r[0] = _mm256_fmadd_ps(av, b0, r[0]);
                r[1] = _mm256_fmadd_ps(av, b1, r[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        for (i, r) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(i * ldc), r[0]);
            _mm256_storeu_ps(c.add(i * ldc + 8), r[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], bias: Bias) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = match bias {
                    Bias::None | Bias::Accumulate => 0.0f64,
                    Bias::PerCol(bv) => bv[j] as f64,
                    Bias::PerRow(bv) => bv[i] as f64,
                };
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f32], k: usize) {
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn packed_a_unpacks_to_the_original() {
        for &(m, k) in &[(1, 1), (7, 3), (13, 500), (6, 1100), (0, 4), (5, 0)] {
            let a = rand(m * k, 11);
            assert_eq!(
                PackedA::pack(MatRef::row_major(&a, m, k)).unwrap().unpack(),
                a,
                "{m}x{k}"
            );
        }
    }

    #[test]
    fn packed_b_unpacks_to_the_original() {
        // Shapes across the kc blocking and partial column panels, a transposed view, and empty.
        for &(k, n) in &[(1, 1), (3, 17), (257, 33), (600, 40), (1100, 5), (0, 7), (4, 0)] {
            let b = rand(k * n, 9);
            let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
            assert_eq!(pb.unpack(), b, "{k}x{n}");
            // stored [n, k] (a Gemm with transB): the packed operand is its transpose
            let t = MatRef {
                data: &b,
                rows: n,
                cols: k,
                rs: 1,
                cs: n,
            };
            let want: Vec<f32> = (0..n)
                .flat_map(|p| (0..k).map(move |j| (p, j)))
                .map(|(p, j)| b[j * n + p])
                .collect();
            let packed_t = PackedB::pack(t).unwrap();
            assert_eq!(packed_t.unpack(), want, "{k}x{n} transposed");
            // Column j of the transposed operand is row j of the stored [n', k'] = [k, n] matrix.
            for j in 0..k {
                let mut col = vec![f32::NAN; n];
                packed_t.column(j, &mut col);
                assert_eq!(col, b[j * n..(j + 1) * n], "{k}x{n} column {j}");
            }
        }
    }

    #[test]
    fn packed_b_matches_naive_on_edge_shapes() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 17, 3),
            (6, 16, 256),
            (7, 33, 257),
            (97, 40, 600),
            (130, 70, 513),
            (64, 3, 0),
        ] {
            let a = rand(m * k, 1);
            let b = rand(k * n, 2);
            let bias = rand(n, 3);
            let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
            for with_bias in [false, true] {
                let bs = if with_bias { Bias::PerCol(&bias) } else { Bias::None };
                let mut c = vec![f32::NAN; m * n];
                gemm_packed_b(MatRef::row_major(&a, m, k), &pb, bs, &mut c, n).unwrap();
                close(&c, &naive(m, n, k, &a, &b, bs), k);
            }
        }
    }

    #[test]
    fn every_row_count_and_tile_width_matches_naive() {
        // Bottom tiles of 1..=5 rows and right edges of 1, 2 and 3 whole panels plus a ragged one, with
        // every bias kind, k split into two blocks (the second block loads C), packed B and packed A.
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        for m in 1..=13 {
            for &n in &[16, 32, 47, 48, 64, 80, 101] {
                for &k in &[3, 400] {
                    let a = rand(m * k, 21 + m as u64);
                    let b = rand(k * n, 22 + n as u64);
                    let (bias_n, bias_m, init) = (rand(n, 23), rand(m, 24), rand(m * n, 25));
                    let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
                    let pa = PackedA::pack(MatRef::row_major(&a, m, k)).unwrap();
                    for bias in [
                        Bias::None,
                        Bias::PerCol(&bias_n),
                        Bias::PerRow(&bias_m),
                        Bias::Accumulate,
                    ] {
                        let mut want = naive(m, n, k, &a, &b, bias);
                        if let Bias::Accumulate = bias {
                            want.iter_mut().zip(&init).for_each(|(w, i)| *w += i);
                        }
                        let mut c = init.clone();
                        gemm_packed_b(MatRef::row_major(&a, m, k), &pb, bias, &mut c, n).unwrap();
                        close(&c, &want, k);
                        let mut c = init.clone();
                        gemm_packed_a(&pa, MatRef::row_major(&b, k, n), bias, &mut c, n).unwrap();
                        close(&c, &want, k);
                    }
                }
            }
        }
    }

    #[test]
    fn packed_a_and_strided_views_match_naive() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        for &(m, n, k) in &[(3, 5, 7), (16, 1100, 27), (40, 300, 300), (13, 2049, 9)] {
            let a = rand(m * k, 4);
            let b = rand(k * n, 5);
            let bias = rand(m, 6);
            let pa = PackedA::pack(MatRef::row_major(&a, m, k)).unwrap();
            let mut c = vec![f32::NAN; m * n];
            gemm_packed_a(&pa, MatRef::row_major(&b, k, n), Bias::PerRow(&bias), &mut c, n).unwrap();
            close(&c, &naive(m, n, k, &a, &b, Bias::PerRow(&bias)), k);
            // B given transposed (stored n x k), A given transposed (stored k x m), C with a wider stride.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let a_view = MatRef {
                data: &at,
                rows: m,
                cols: k,
                rs: 1,
                cs: m,
            };
            let b_view = MatRef {
                data: &bt,
                rows: k,
                cols: n,
                rs: 1,
                cs: k,
            };
            let pb = PackedB::pack(b_view).unwrap();
            let ldc = n + 3;
            let mut c2 = vec![7f32; m * ldc];
            gemm_packed_b(a_view, &pb, Bias::None, &mut c2, ldc).unwrap();
            let want = naive(m, n, k, &a, &b, Bias::None);
            for i in 0..m {
                close(&c2[i * ldc..i * ldc + n], &want[i * n..(i + 1) * n], k);
                assert!(
                    c2[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 7.0),
                    "padding columns were written"
                );
            }
        }
    }

    #[test]
    fn unpacked_product_accumulates_into_c() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        for &(m, n, k) in &[(64, 64, 32), (7, 19, 5), (130, 33, 700)] {
            let a = rand(m * k, 9);
            let b = rand(k * n, 10);
            let init = rand(m * n, 11);
            let mut c = init.clone();
            gemm_seq(
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                Bias::Accumulate,
                &mut c,
                n,
            )
            .unwrap();
            let mut want = naive(m, n, k, &a, &b, Bias::None);
            want.iter_mut().zip(&init).for_each(|(w, i)| *w += i);
            close(&c, &want, k);
        }
    }

    #[test]
    fn threads_split_the_same_result() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        let (m, n, k) = (64, 3072, 768);
        let a = rand(m * k, 7);
        let b = rand(k * n, 8);
        let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
        let mut one = vec![0f32; m * n];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| gemm_packed_b(MatRef::row_major(&a, m, k), &pb, Bias::None, &mut one, n).unwrap());
        let mut four = vec![0f32; m * n];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| gemm_packed_b(MatRef::row_major(&a, m, k), &pb, Bias::None, &mut four, n).unwrap());
        assert_eq!(one, four, "the split must not change the summation order");
    }

    #[test]
    fn few_rows_match_naive_for_every_bias_stride_and_split() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        // 1 thread, 3 threads, and 4 threads over 5 panels (an empty last task).
        let pools: Vec<_> = [1, 3, 4]
            .iter()
            .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap())
            .collect();
        for m in 1..MR {
            for &(n, k) in &[
                (1, 1),
                (16, 7),
                (33, 384),
                (70, 385),
                (70, 1000),
                (600, 1000),
                (1100, 64),
            ] {
                let a = rand(m * k, 21);
                let b = rand(k * n, 22);
                let (bn, bm, init) = (rand(n, 23), rand(m, 24), rand(m * n, 25));
                let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
                let plain = naive(m, n, k, &a, &b, Bias::None);
                for bias in [Bias::None, Bias::PerCol(&bn), Bias::PerRow(&bm), Bias::Accumulate] {
                    let mut want = naive(m, n, k, &a, &b, bias);
                    if let Bias::Accumulate = bias {
                        want.iter_mut().zip(&init).for_each(|(w, i)| *w += i);
                    }
                    let mut results = Vec::new();
                    for pool in &pools {
                        let mut c = if let Bias::Accumulate = bias {
                            init.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        pool.install(|| gemm_packed_b(MatRef::row_major(&a, m, k), &pb, bias, &mut c, n).unwrap());
                        close(&c, &want, k);
                        results.push(c);
                    }
                    for r in &results[1..] {
                        assert_eq!(&results[0], r, "m={m} n={n} k={k}: the split changed the sums");
                    }
                }
                // A stored transposed (k x m), C with a wider stride, Relu applied.
                let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let view = MatRef {
                    data: &at,
                    rows: m,
                    cols: k,
                    rs: 1,
                    cs: m,
                };
                let ldc = n + 5;
                for pool in &pools {
                    let mut c = vec![7f32; m * ldc];
                    pool.install(|| gemm_packed_b_act(view, &pb, Bias::None, Activation::Relu, &mut c, ldc).unwrap());
                    for i in 0..m {
                        let relu: Vec<f32> = plain[i * n..(i + 1) * n].iter().map(|&x| x.max(0.0)).collect();
                        close(&c[i * ldc..i * ldc + n], &relu, k);
                        assert!(
                            c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 7.0),
                            "padding columns were written"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        let (n, k, big) = (70, 1000, 13);
        let a = rand(big * k, 31);
        let b = rand(k * n, 32);
        let bias = rand(n, 33);
        let pb = PackedB::pack(MatRef::row_major(&b, k, n)).unwrap();
        for act in [Activation::None, Activation::GeluErf] {
            let mut all = vec![0f32; big * n];
            gemm_packed_b_act(
                MatRef::row_major(&a, big, k),
                &pb,
                Bias::PerCol(&bias),
                act,
                &mut all,
                n,
            )
            .unwrap();
            for m in 1..MR {
                for r0 in [0, big - m] {
                    let mut few = vec![0f32; m * n];
                    let rows = MatRef::row_major(&a[r0 * k..(r0 + m) * k], m, k);
                    gemm_packed_b_act(rows, &pb, Bias::PerCol(&bias), act, &mut few, n).unwrap();
                    assert_eq!(
                        few,
                        all[r0 * n..(r0 + m) * n],
                        "rows {r0}..{} of {big}, {act:?}",
                        r0 + m
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        if !available() {
            return;
        }
        let b = vec![0f32; 12];
        let pb = PackedB::pack(MatRef::row_major(&b, 3, 4)).unwrap();
        let a = vec![0f32; 10];
        let mut c = vec![0f32; 8];
        assert!(gemm_packed_b(MatRef::row_major(&a, 2, 5), &pb, Bias::None, &mut c, 4).is_err());
        assert!(gemm_packed_b(MatRef::row_major(&a[..6], 2, 3), &pb, Bias::None, &mut c[..7], 4).is_err());
        let short = MatRef {
            data: &b,
            rows: 4,
            cols: 4,
            rs: 4,
            cs: 1,
        };
        assert!(PackedB::pack(short).is_err());
    }
}

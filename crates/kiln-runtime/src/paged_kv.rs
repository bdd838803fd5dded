//! Paged KV storage and the attention that reads through block tables (vLLM's PagedAttention).
//!
//! A [`PagedKvCache`] holds, per layer, K and V for `num_blocks` blocks of `block_size` token
//! slots: V laid out `[block][kv_head][slot][head_dim]`, K transposed within each tile,
//! `[block][kv_head][head_dim][slot]`, so one head's keys (values) in a block are one contiguous
//! tile that attention reads in place (f32) or converts once (f16), and the scores of a query row
//! over a block's keys are one vector of multiply-adds per dimension (no horizontal sums). Which blocks a sequence owns is decided outside (Kiln's LLM block manager); a model
//! step hands the executor a [`PagedStep`] (through [`RunOptions::paged_kv`](crate::RunOptions)):
//! the cache plus, for every sequence in the flat token batch, where its query tokens sit, how long
//! its context is after the step, and its block table. Each `ai.kiln::PagedAttention` node (one per
//! layer) first writes the step's new K/V into their slots, then attends causally: query token `i`
//! of a sequence at position `p` sees that sequence's positions `0..=p` and nothing else, so
//! prefill chunks and decode tokens of many sequences share one batch.

use std::sync::Mutex;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::fastmath::madd;

/// Element type of the stored K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
}

impl KvDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

/// Geometry of a paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvConfig {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDType,
}

impl PagedKvConfig {
    /// Bytes of K and V for one block over all layers.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
    /// Total bytes of the cache.
    pub fn total_bytes(&self) -> usize {
        self.bytes_per_block() * self.num_blocks
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagedKvError {
    #[error("paged KV cache: {0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> PagedKvError {
    PagedKvError::Invalid(s.into())
}

#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Store {
    fn new(dtype: KvDType, len: usize) -> Self {
        match dtype {
            KvDType::F32 => Store::F32(vec![0.0; len]),
            KvDType::F16 => Store::F16(vec![f16::ZERO; len]),
        }
    }
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Store::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            Store::F16(d) => d[at..at + src.len()].convert_from_f32_slice(src),
        }
    }
    /// `src[x]` to `at + x * stride` (a key into its column of a transposed tile).
    fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            Store::F32(d) => src.iter().enumerate().for_each(|(x, &v)| d[at + x * stride] = v),
            Store::F16(d) => src
                .iter()
                .enumerate()
                .for_each(|(x, &v)| d[at + x * stride] = f16::from_f32(v)),
        }
    }
    /// `len` values from `at` as f32: borrowed in place for f32 storage, converted into
    /// `scratch` for f16.
    fn tile<'a>(&'a self, at: usize, len: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            Store::F32(d) => &d[at..at + len],
            Store::F16(d) => {
                widen(&d[at..at + len], &mut scratch[..len]);
                &scratch[..len]
            }
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Store::F32(d) => d.copy_within(src, dst),
            Store::F16(d) => d.copy_within(src, dst),
        }
    }
}

/// f16 to f32 for a whole tile: 16 values per instruction (`vcvtph2ps`) on AVX-512F, 8 with F16C,
/// else `half`'s conversion. Exact either way (every f16 is an f32).
fn widen(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *F16C.get_or_init(|| std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx")) {
            // SAFETY: the CPU has F16C and AVX (checked above); AVX-512F only when `use_avx512` says so.
            unsafe {
                if crate::sgemm::use_avx512() {
                    widen_avx512(src, dst)
                } else {
                    widen_f16c(src, dst)
                }
            };
            return;
        }
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= whole <= both lengths; f16 is 2 bytes, read unaligned.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
    }
    src[whole..n].convert_to_f32_slice(&mut dst[whole..n]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= both lengths; f16 is 2 bytes, read unaligned.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    src[whole..n].convert_to_f32_slice(&mut dst[whole..n]);
}

#[derive(Debug)]
struct LayerKv {
    k: Store,
    v: Store,
}

/// K and V of every layer in fixed-size blocks. See the module documentation.
#[derive(Debug)]
pub struct PagedKvCache {
    cfg: PagedKvConfig,
    layers: Vec<Mutex<LayerKv>>,
}

/// One sequence's part of a step's flat token batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSeq {
    /// Index of its first query token in the batch.
    pub query_start: usize,
    /// Its query tokens in the batch (consecutive positions ending at `context_len - 1`).
    pub num_query: usize,
    /// Its tokens with KV after the step (earlier ones plus the query tokens).
    pub context_len: usize,
    /// Its blocks, in token order; must cover `context_len` slots.
    pub block_table: Vec<u32>,
}

/// What a model step's PagedAttention nodes need: the cache and the batch layout.
#[derive(Debug, Clone)]
pub struct PagedStep {
    pub cache: std::sync::Arc<PagedKvCache>,
    pub seqs: Vec<PagedSeq>,
}

impl PagedStep {
    /// Query tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_query).sum()
    }
}

impl PagedKvCache {
    pub fn new(cfg: PagedKvConfig) -> Result<Self, PagedKvError> {
        if cfg.block_size == 0 || cfg.num_kv_heads == 0 || cfg.head_dim == 0 || cfg.num_layers == 0 {
            return Err(invalid(format!("every dimension must be positive: {cfg:?}")));
        }
        let per_layer = cfg
            .num_blocks
            .checked_mul(cfg.block_size * cfg.num_kv_heads * cfg.head_dim)
            .ok_or_else(|| invalid("size overflows"))?;
        let layers = (0..cfg.num_layers)
            .map(|_| {
                Mutex::new(LayerKv {
                    k: Store::new(cfg.dtype, per_layer),
                    v: Store::new(cfg.dtype, per_layer),
                })
            })
            .collect();
        Ok(PagedKvCache { cfg, layers })
    }

    pub fn config(&self) -> &PagedKvConfig {
        &self.cfg
    }

    /// Copy the first `num_tokens` slots of block `src` into block `dst` in every layer
    /// (copy-on-write before a shared partial block is written).
    pub fn copy_block(&self, src: u32, dst: u32, num_tokens: usize) -> Result<(), PagedKvError> {
        let (src, dst) = (src as usize, dst as usize);
        if src >= self.cfg.num_blocks || dst >= self.cfg.num_blocks || num_tokens > self.cfg.block_size {
            return Err(invalid(format!(
                "block copy {src} -> {dst} of {num_tokens} slots is out of range"
            )));
        }
        let (bs, d) = (self.cfg.block_size, self.cfg.head_dim);
        let tile = bs * d;
        for layer in &self.layers {
            let mut l = layer.lock().unwrap_or_else(|e| e.into_inner());
            for h in 0..self.cfg.num_kv_heads {
                let (from, to) = (
                    (src * self.cfg.num_kv_heads + h) * tile,
                    (dst * self.cfg.num_kv_heads + h) * tile,
                );
                // K tiles are transposed: the first slots of every dimension's row.
                for x in 0..d {
                    l.k.copy_within(from + x * bs..from + x * bs + num_tokens, to + x * bs);
                }
                l.v.copy_within(from..from + num_tokens * d, to);
            }
        }
        Ok(())
    }

    /// Offsets of head `h`'s value row and key column for position `pos` of a sequence with block
    /// table `table` (the key's dimension `x` is at `key + x * block_size`).
    fn slot(&self, table: &[u32], pos: usize, h: usize) -> (usize, usize) {
        let bs = self.cfg.block_size;
        let tile = self.tile(table[pos / bs], h);
        (tile + (pos % bs) * self.cfg.head_dim, tile + pos % bs)
    }

    /// Offset of head `h`'s tile in block `b`.
    fn tile(&self, b: u32, h: usize) -> usize {
        (b as usize * self.cfg.num_kv_heads + h) * self.cfg.block_size * self.cfg.head_dim
    }

    fn check_step(&self, layer: usize, seqs: &[PagedSeq], tokens: usize) -> Result<(), PagedKvError> {
        if layer >= self.cfg.num_layers {
            return Err(invalid(format!(
                "layer {layer} of a cache with {} layers",
                self.cfg.num_layers
            )));
        }
        let mut next = 0;
        for (i, s) in seqs.iter().enumerate() {
            if s.query_start != next || s.num_query == 0 || s.num_query > s.context_len {
                return Err(invalid(format!(
                    "sequence {i}: query tokens {}..+{} with context {} do not tile the batch",
                    s.query_start, s.num_query, s.context_len
                )));
            }
            next += s.num_query;
            if s.block_table.len() * self.cfg.block_size < s.context_len {
                return Err(invalid(format!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    s.block_table.len(),
                    s.context_len
                )));
            }
            if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= self.cfg.num_blocks) {
                return Err(invalid(format!("sequence {i}: block {b} of {}", self.cfg.num_blocks)));
            }
        }
        if next != tokens {
            return Err(invalid(format!(
                "the step lays out {next} tokens, the batch has {tokens}"
            )));
        }
        Ok(())
    }

    /// Store the step's new K/V for `layer` and attend. `q` is `[num_heads, T, D]`, `k` and `v`
    /// are `[num_kv_heads, T, D]` (T = the batch's tokens, row-major, f32); returns the output as
    /// `[num_heads, T, D]`. `scale` multiplies the scores (usually `1/sqrt(D)`).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: usize,
        seqs: &[PagedSeq],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        num_heads: usize,
        scale: f32,
    ) -> Result<Vec<f32>, PagedKvError> {
        let (hkv, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let t: usize = seqs.iter().map(|s| s.num_query).sum();
        if num_heads == 0 || !num_heads.is_multiple_of(hkv) {
            return Err(invalid(format!("{num_heads} query heads over {hkv} KV heads")));
        }
        if q.len() != num_heads * t * d || k.len() != hkv * t * d || v.len() != hkv * t * d {
            return Err(invalid(format!(
                "q/k/v hold {}/{}/{} values; the step expects {num_heads}x{t}x{d} and {hkv}x{t}x{d}",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        self.check_step(layer, seqs, t)?;
        let mut guard = self.layers[layer].lock().unwrap_or_else(|e| e.into_inner());
        let kv = &mut *guard;
        // 1. Write the new keys and values into their slots.
        for s in seqs {
            let first_pos = s.context_len - s.num_query;
            for i in 0..s.num_query {
                for h in 0..hkv {
                    let (v_at, k_at) = self.slot(&s.block_table, first_pos + i, h);
                    let row = (h * t + s.query_start + i) * d;
                    kv.k.write_strided(k_at, self.cfg.block_size, &k[row..row + d]);
                    kv.v.write(v_at, &v[row..row + d]);
                }
            }
        }
        // 2. Attend, one task per (sequence, KV head): gather that head's K and V once into
        //    contiguous f32 rows, then serve every query head of the group and every query token.
        let group = num_heads / hkv;
        let kv = &*kv;
        let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..hkv).map(move |h| (s, h))).collect();
        let fast = crate::fastmath::has_avx2_fma();
        let results: Vec<(usize, usize, Vec<f32>)> = tasks
            .into_par_iter()
            .map(|(si, g)| {
                let task = Task {
                    cache: self,
                    kv,
                    seq: &seqs[si],
                    g,
                    group,
                    q,
                    t,
                    scale,
                };
                #[cfg(target_arch = "x86_64")]
                if fast && crate::sgemm::use_avx512() {
                    // SAFETY: the CPU supports the features `run_avx512` is compiled for (checked above).
                    return (si, g, unsafe { task.run_avx512() });
                }
                #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
                if fast {
                    // SAFETY: the CPU supports the features `run_avx2` is compiled for (checked above).
                    return (si, g, unsafe { task.run_avx2() });
                }
                let _ = fast;
                (si, g, task.run::<false, SIMD_NONE>())
            })
            .collect();
        let mut out = vec![0.0f32; num_heads * t * d];
        for (si, g, o) in results {
            let s = &seqs[si];
            for hg in 0..group {
                let h = g * group + hg;
                for i in 0..s.num_query {
                    let src = &o[(hg * s.num_query + i) * d..][..d];
                    out[(h * t + s.query_start + i) * d..][..d].copy_from_slice(src);
                }
            }
        }
        Ok(out)
    }
}

/// Attention of one sequence's query heads of one KV group (one parallel task of
/// [`PagedKvCache::attend`]).
struct Task<'a> {
    cache: &'a PagedKvCache,
    kv: &'a LayerKv,
    seq: &'a PagedSeq,
    /// The KV head.
    g: usize,
    /// Query heads per KV head.
    group: usize,
    /// All query rows `[num_heads, t, D]`.
    q: &'a [f32],
    t: usize,
    scale: f32,
}

impl Task<'_> {
    /// Gathers head `g`'s K and V block by block (each tile read, or converted from f16, once) and
    /// serves every query head of the group and every query token of the sequence; returns
    /// `[group, num_query, D]`. The same arithmetic whatever else is in the batch.
    #[inline(always)]
    fn run<const FMA: bool, const SIMD: u8>(&self) -> Vec<f32> {
        let (cfg, kv, s, g) = (&self.cache.cfg, self.kv, self.seq, self.g);
        let (d, group, q, t, scale) = (cfg.head_dim, self.group, self.q, self.t, self.scale);
        let (ctx, nq, bs) = (s.context_len, s.num_query, cfg.block_size);
        let first = ctx - nq;
        // Rows: (query head of the group, query token), token-minor, so a group of consecutive rows
        // is one head's consecutive positions. Row r sits at position first + r % nq.
        let rows = group * nq;
        let qrow = |r: usize| {
            let h = g * group + r / nq;
            &q[(h * t + s.query_start + r % nq) * d..][..d]
        };
        // ROWS rows at a time, block by block: their scores over the blocks they see (a small buffer
        // that stays in cache), softmax, then the values; the key and value tiles are re-read per
        // row group (from cache: one head's context is `2 x ctx x d` floats).
        let mut sc = vec![0.0f32; ROWS * ctx];
        // f16 tiles are converted once per task (every row group reads them), f32 ones read in place.
        let nblocks = ctx.div_ceil(bs);
        let convert = |store: &Store| -> Vec<f32> {
            let mut buf = Vec::new();
            if let Store::F16(_) = store {
                buf = vec![0.0f32; nblocks * bs * d];
                for (bi, dst) in buf.chunks_exact_mut(bs * d).enumerate() {
                    let at = self.cache.tile(s.block_table[bi], g);
                    store.tile(at, bs * d, dst);
                }
            }
            buf
        };
        let (kbuf, vbuf) = (convert(&kv.k), convert(&kv.v));
        fn tile_at<'a>(store: &'a Store, buf: &'a [f32], at: usize, bi: usize, len: usize) -> &'a [f32] {
            match store {
                Store::F32(data) => &data[at..at + len],
                Store::F16(_) => &buf[bi * len..(bi + 1) * len],
            }
        }
        let mut out = vec![0.0f32; rows * d];
        for r0 in (0..rows).step_by(ROWS) {
            let r1 = (r0 + ROWS).min(rows);
            let nr = r1 - r0;
            let last_pos = (r0..r1).map(|r| first + r % nq).max().unwrap_or(first);
            let blocks = last_pos / bs + 1;
            let span = ctx.min(blocks * bs);
            let qs: [&[f32]; ROWS] = std::array::from_fn(|j| qrow(r0 + j.min(nr - 1)));
            let offs: [usize; ROWS] = std::array::from_fn(|j| j.min(nr - 1) * ctx);
            for bi in 0..blocks {
                let n = bs.min(ctx - bi * bs);
                let kt = tile_at(&kv.k, &kbuf, self.cache.tile(s.block_table[bi], g), bi, bs * d);
                let offs = offs.map(|o| o + bi * bs);
                block_scores::<FMA, SIMD>(nr, &qs, kt, bs, n, scale, &mut sc, &offs);
            }
            // Softmax over the positions each row sees; the rest of its span becomes weight 0.
            for j in 0..nr {
                let seen = first + (r0 + j) % nq + 1;
                let row = &mut sc[j * ctx..j * ctx + span];
                crate::fastmath::softmax_row(&mut row[..seen]);
                row[seen..].fill(0.0);
            }
            for bi in 0..blocks {
                let n = bs.min(ctx - bi * bs);
                let vt = &tile_at(&kv.v, &vbuf, self.cache.tile(s.block_table[bi], g), bi, bs * d)[..n * d];
                block_values::<FMA, SIMD>(nr, &sc[bi * bs..], ctx, vt, n, &mut out[r0 * d..r1 * d]);
            }
        }
        out
    }

    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) -> Vec<f32> {
        self.run::<true, SIMD_AVX2>()
    }

    /// [`Task::run`] with 16-lane vectors (the same arithmetic, so the same bits as `run_avx2`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self) -> Vec<f32> {
        self.run::<true, SIMD_AVX512>()
    }
}

/// Which explicit vector kernels [`Task::run`] may use (it is compiled once per instruction set).
const SIMD_NONE: u8 = 0;
const SIMD_AVX2: u8 = 1;
const SIMD_AVX512: u8 = 2;

/// Query rows one kernel pass serves: each key column (values row) loaded once feeds this many
/// independent multiply-add chains.
const ROWS: usize = 8;
/// Keys (or value columns) per vector: one 512-bit or two 256-bit registers.
const LANES: usize = 16;

macro_rules! by_rows {
    ($nr:expr, $f:ident::<$($p:tt),*>($($arg:expr),*)) => {
        match $nr {
            1 => $f::<$($p,)* 1>($($arg),*),
            2 => $f::<$($p,)* 2>($($arg),*),
            3 => $f::<$($p,)* 3>($($arg),*),
            4 => $f::<$($p,)* 4>($($arg),*),
            5 => $f::<$($p,)* 5>($($arg),*),
            6 => $f::<$($p,)* 6>($($arg),*),
            7 => $f::<$($p,)* 7>($($arg),*),
            _ => $f::<$($p,)* ROWS>($($arg),*),
        }
    };
}

/// Scores of `nr` query rows (`qs[..nr]`, `d` floats each) over the `n` keys of one transposed key
/// tile `kt` (`d` rows of `bs` slots): `scores[out[r] + j] = scale * sum_x qs[r][x] * kt[x][j]`, each a
/// fused multiply-add chain over `x` in order, so a score has the same bits whatever rows share the
/// pass and whichever kernel computes it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_scores<const FMA: bool, const SIMD: u8>(
    nr: usize,
    qs: &[&[f32]; ROWS],
    kt: &[f32],
    bs: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &[usize; ROWS],
) {
    by_rows!(nr, scores_n::<FMA, SIMD>(qs, kt, bs, n, scale, scores, out))
}

#[inline(always)]
fn scores_n<const FMA: bool, const SIMD: u8, const R: usize>(
    qs: &[&[f32]; ROWS],
    kt: &[f32],
    bs: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &[usize; ROWS],
) {
    let d = qs[0].len();
    assert!(kt.len() >= d * bs && qs[..R].iter().all(|q| q.len() == d));
    let mut j0 = 0;
    while j0 < n {
        let m = LANES.min(n - j0);
        let mut acc = [[0.0f32; LANES]; R];
        if SIMD != SIMD_NONE && cfg!(target_arch = "x86_64") && j0 + LANES <= bs {
            let qp: [*const f32; R] = std::array::from_fn(|r| qs[r].as_ptr());
            // SAFETY: every q row holds d floats and kt holds d rows of bs >= j0 + LANES slots (asserted
            // above); the SIMD level was checked by the caller of `Task::run`.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if SIMD == SIMD_AVX512 {
                    vec::scores_avx512::<R>(qp, kt.as_ptr().add(j0), bs, d, &mut acc);
                } else {
                    vec::scores_avx2::<R>(qp, kt.as_ptr().add(j0), bs, d, &mut acc);
                }
            }
        } else {
            // Portable path (and the last slots of a block size that is not a multiple of LANES):
            // the same chains.
            for (r, a) in acc.iter_mut().enumerate() {
                for (l, al) in a.iter_mut().enumerate().take(m) {
                    for x in 0..d {
                        *al = madd::<FMA>(qs[r][x], kt[x * bs + j0 + l], *al);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for l in 0..m {
                scores[out[r] + j0 + l] = a[l] * scale;
            }
        }
        j0 += LANES;
    }
}

/// `out[r] += sum_j w[r * stride + j] * vals[j]` for `nr` rows over the `n` value rows of one tile
/// (`vals` is `n x d`, `out` is `nr x d`): per 16 columns, one fused chain per row over the keys in
/// order, the value vector loaded once for all rows. A row's result does not depend on the other rows.
#[inline(always)]
fn block_values<const FMA: bool, const SIMD: u8>(
    nr: usize,
    w: &[f32],
    stride: usize,
    vals: &[f32],
    n: usize,
    out: &mut [f32],
) {
    by_rows!(nr, values_n::<FMA, SIMD>(w, stride, vals, n, out))
}

#[inline(always)]
fn values_n<const FMA: bool, const SIMD: u8, const R: usize>(
    w: &[f32],
    stride: usize,
    vals: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let d = out.len() / R;
    assert!(vals.len() >= n * d && w.len() >= (R - 1) * stride + n);
    let mut x0 = 0;
    if SIMD != SIMD_NONE && cfg!(target_arch = "x86_64") {
        let wp: [*const f32; R] = std::array::from_fn(|r| w[r * stride..].as_ptr());
        while x0 + LANES <= d {
            let op: [*mut f32; R] = std::array::from_fn(|r| out[r * d + x0..].as_mut_ptr());
            // SAFETY: each weight row holds n floats, vals holds n rows of d >= x0 + LANES floats and
            // each out row LANES floats from x0 (asserted above); the SIMD level was checked by the
            // caller of `Task::run`.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if SIMD == SIMD_AVX512 {
                    vec::values_avx512::<R>(wp, vals.as_ptr().add(x0), d, n, op);
                } else {
                    vec::values_avx2::<R>(wp, vals.as_ptr().add(x0), d, n, op);
                }
            }
            x0 += LANES;
        }
    }
    // Portable path, and columns past the last whole vector: the same chains.
    for x in x0..d {
        for r in 0..R {
            let mut a = out[r * d + x];
            for j in 0..n {
                a = madd::<FMA>(w[r * stride + j], vals[j * d + x], a);
            }
            out[r * d + x] = a;
        }
    }
}

/// The attention kernels' inner loops on 16 lanes: one 512-bit register or two 256-bit ones.
#[cfg(target_arch = "x86_64")]
mod vec {
    use super::LANES;
    use std::arch::x86_64::*;

    /// `acc[r][l] = sum_x q[r][x] * kt[x * bs + l]` (a fused chain over x from 0).
    /// Safety: `q[r]` points at `d` floats, `kt` at `d` rows of `bs` with `LANES` readable from each.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores_avx512<const R: usize>(
        q: [*const f32; R],
        kt: *const f32,
        bs: usize,
        d: usize,
        acc: &mut [[f32; LANES]; R],
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let mut a = [_mm512_setzero_ps(); R];
            for x in 0..d {
                let k = _mm512_loadu_ps(kt.add(x * bs));
                for r in 0..R {
                    a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*q[r].add(x)), k, a[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(acc[r].as_mut_ptr(), a[r]);
            }
        }
    }

    /// [`scores_avx512`] on two 256-bit halves.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2<const R: usize>(
        q: [*const f32; R],
        kt: *const f32,
        bs: usize,
        d: usize,
        acc: &mut [[f32; LANES]; R],
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); 2]; R];
            for x in 0..d {
                let (k0, k1) = (_mm256_loadu_ps(kt.add(x * bs)), _mm256_loadu_ps(kt.add(x * bs + 8)));
                for r in 0..R {
                    let qx = _mm256_set1_ps(*q[r].add(x));
                    a[r][0] = _mm256_fmadd_ps(qx, k0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(qx, k1, a[r][1]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(acc[r].as_mut_ptr(), a[r][0]);
                _mm256_storeu_ps(acc[r].as_mut_ptr().add(8), a[r][1]);
            }
        }
    }

    /// `out[r][l] += sum_j w[r][j] * vals[j * d + l]` for `l < LANES` (a fused chain over j).
    /// Safety: `w[r]` points at `n` floats, `vals` at `n` rows of stride `d` with `LANES` readable
    /// from each, `out[r]` at `LANES` writable floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values_avx512<const R: usize>(
        w: [*const f32; R],
        vals: *const f32,
        d: usize,
        n: usize,
        out: [*mut f32; R],
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let mut a: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(out[r]));
            for j in 0..n {
                let v = _mm512_loadu_ps(vals.add(j * d));
                for r in 0..R {
                    a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*w[r].add(j)), v, a[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r], a[r]);
            }
        }
    }

    /// [`values_avx512`] on two 256-bit halves.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values_avx2<const R: usize>(
        w: [*const f32; R],
        vals: *const f32,
        d: usize,
        n: usize,
        out: [*mut f32; R],
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let mut a: [[__m256; 2]; R] =
                std::array::from_fn(|r| [_mm256_loadu_ps(out[r]), _mm256_loadu_ps(out[r].add(8))]);
            for j in 0..n {
                let (v0, v1) = (_mm256_loadu_ps(vals.add(j * d)), _mm256_loadu_ps(vals.add(j * d + 8)));
                for r in 0..R {
                    let wj = _mm256_set1_ps(*w[r].add(j));
                    a[r][0] = _mm256_fmadd_ps(wj, v0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(wj, v1, a[r][1]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r], a[r][0]);
                _mm256_storeu_ps(out[r].add(8), a[r][1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense causal attention over one whole sequence in f64: q `[H, S, D]`, k/v `[Hkv, S, D]`.
    #[allow(clippy::too_many_arguments)]
    fn dense(q: &[f32], k: &[f32], v: &[f32], h: usize, hkv: usize, s: usize, d: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0.0; h * s * d];
        for hh in 0..h {
            let g = hh / (h / hkv);
            for i in 0..s {
                let mut sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|x| (q[(hh * s + i) * d + x] * k[(g * s + j) * d + x]) as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for x in 0..d {
                    out[(hh * s + i) * d + x] =
                        (0..=i).map(|j| sc[j] / z * v[(g * s + j) * d + x] as f64).sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Slice `[H, S, D]` rows `a..b` of the sequence dim into `[H, b - a, D]`.
    fn rows(x: &[f32], h: usize, s: usize, d: usize, a: usize, b: usize) -> Vec<f32> {
        (0..h)
            .flat_map(|hh| x[(hh * s + a) * d..(hh * s + b) * d].to_vec())
            .collect()
    }

    /// Concatenate per-sequence `[H, n_i, D]` blocks into one `[H, sum n_i, D]` batch.
    fn concat(parts: &[Vec<f32>], h: usize, d: usize) -> Vec<f32> {
        let lens: Vec<usize> = parts.iter().map(|p| p.len() / (h * d)).collect();
        let mut out = Vec::new();
        for hh in 0..h {
            for (p, &n) in parts.iter().zip(&lens) {
                out.extend_from_slice(&p[hh * n * d..(hh + 1) * n * d]);
            }
        }
        out
    }

    /// Two sequences (GQA 4/2 heads, D 8, blocks of 4) fed in mixed chunks: a prefill chunk of one
    /// beside the other's decode tokens, through scattered block tables; every output row equals
    /// dense causal attention over that sequence alone, for f32 and f16 storage.
    #[test]
    fn mixed_chunks_match_dense_causal_attention() {
        // (query heads, KV heads, head size, block size, the two sequences' lengths): head sizes under,
        // at and between the kernels' 16-lane chunks, blocks with partial key quads.
        for (h, hkv, d, bs, lens) in [
            (4, 2, 8, 4, [11usize, 6]),
            (9, 3, 64, 16, [45, 23]),
            (3, 3, 40, 16, [35, 18]),
            (2, 1, 17, 5, [19, 9]),
        ] {
            mixed_chunks_case(h, hkv, d, bs, lens);
        }
    }

    fn mixed_chunks_case(h: usize, hkv: usize, d: usize, bs: usize, lens: [usize; 2]) {
        let scale = 1.0 / (d as f32).sqrt();
        for dtype in [KvDType::F32, KvDType::F16] {
            let cache = PagedKvCache::new(PagedKvConfig {
                num_layers: 2,
                num_blocks: 20,
                block_size: bs,
                num_kv_heads: hkv,
                head_dim: d,
                dtype,
            })
            .unwrap();
            let mut seed = 7;
            let full: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = lens
                .iter()
                .map(|&s| {
                    (
                        rand_vec(h * s * d, &mut seed),
                        rand_vec(hkv * s * d, &mut seed),
                        rand_vec(hkv * s * d, &mut seed),
                    )
                })
                .collect();
            // Scattered blocks: sequence 0 takes 19, 17, 15, ..., sequence 1 18, 16, ...
            let table =
                |si: usize| -> Vec<u32> { (0..lens[si].div_ceil(bs)).map(|b| (19 - si - 2 * b) as u32).collect() };
            let tables = [table(0), table(1)];
            // Steps: (seq0 prefill chunk, seq1 prefill chunk), (seq0 one token, seq1 the rest), (seq0 the rest).
            let (a0, a1) = (lens[0] * 2 / 3, lens[1] / 2);
            let steps: [&[(usize, usize, usize)]; 3] = [
                &[(0, 0, a0), (1, 0, a1)],
                &[(0, a0, a0 + 1), (1, a1, lens[1])],
                &[(0, a0 + 1, lens[0])],
            ];
            let mut got: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); h]; 2];
            for step in steps {
                let mut seqs = Vec::new();
                let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
                let mut start = 0;
                for &(si, a, b) in step {
                    let (q, k, v) = &full[si];
                    qs.push(rows(q, h, lens[si], d, a, b));
                    ks.push(rows(k, hkv, lens[si], d, a, b));
                    vs.push(rows(v, hkv, lens[si], d, a, b));
                    seqs.push(PagedSeq {
                        query_start: start,
                        num_query: b - a,
                        context_len: b,
                        block_table: tables[si].clone(),
                    });
                    start += b - a;
                }
                let out = cache
                    .attend(
                        1,
                        &seqs,
                        &concat(&qs, h, d),
                        &concat(&ks, hkv, d),
                        &concat(&vs, hkv, d),
                        h,
                        scale,
                    )
                    .unwrap();
                for (&(si, a, b), s) in step.iter().zip(&seqs) {
                    for (hh, acc) in got[si].iter_mut().enumerate() {
                        acc.extend_from_slice(
                            &out[(hh * start + s.query_start) * d..(hh * start + s.query_start + b - a) * d],
                        );
                    }
                }
            }
            let tol = if dtype == KvDType::F32 { 1e-5 } else { 5e-3 };
            for si in 0..2 {
                let (q, k, v) = &full[si];
                let want = dense(q, k, v, h, hkv, lens[si], d, scale);
                let got: Vec<f32> = got[si].concat();
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < tol, "{dtype:?} h {h} d {d} bs {bs} seq {si}: max error {err}");
            }
        }
    }

    /// A sequence's attention output has the same bits alone and beside others in the batch (one of
    /// them a long prefill chunk), for f32 and f16 storage.
    #[test]
    fn a_sequence_gives_the_same_bits_alone_or_in_a_batch() {
        let (h, hkv, d, bs) = (6, 2, 48, 16);
        for dtype in [KvDType::F32, KvDType::F16] {
            let cache = PagedKvCache::new(PagedKvConfig {
                num_layers: 2,
                num_blocks: 12,
                block_size: bs,
                num_kv_heads: hkv,
                head_dim: d,
                dtype,
            })
            .unwrap();
            let mut seed = 3;
            let (la, lb) = (21usize, 70usize);
            let (qa, ka, va) = (
                rand_vec(h * la * d, &mut seed),
                rand_vec(hkv * la * d, &mut seed),
                rand_vec(hkv * la * d, &mut seed),
            );
            let (qb, kb, vb) = (
                rand_vec(h * lb * d, &mut seed),
                rand_vec(hkv * lb * d, &mut seed),
                rand_vec(hkv * lb * d, &mut seed),
            );
            let seq_a = |start| PagedSeq {
                query_start: start,
                num_query: la,
                context_len: la,
                block_table: vec![7, 2],
            };
            let alone = cache.attend(0, &[seq_a(0)], &qa, &ka, &va, h, 0.2).unwrap();
            let seqs = [
                PagedSeq {
                    query_start: 0,
                    num_query: lb,
                    context_len: lb,
                    block_table: vec![0, 9, 4, 11, 5],
                },
                seq_a(lb),
            ];
            let both = cache
                .attend(
                    1,
                    &seqs,
                    &concat(&[qb, qa], h, d),
                    &concat(&[kb, ka], hkv, d),
                    &concat(&[vb, va], hkv, d),
                    h,
                    0.2,
                )
                .unwrap();
            for hh in 0..h {
                let a = &alone[hh * la * d..(hh + 1) * la * d];
                let b = &both[(hh * (la + lb) + lb) * d..(hh * (la + lb) + lb + la) * d];
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{dtype:?} head {hh}"
                );
            }
        }
    }

    /// The tile conversion gives `half`'s value for every f16 bit pattern (NaNs stay NaN), whole
    /// vectors and tails alike.
    #[test]
    fn widen_matches_half_for_every_f16() {
        let src: Vec<f16> = (0..=u16::MAX).chain(0..7).map(f16::from_bits).collect();
        for len in [src.len(), 23, 16, 9, 1, 0] {
            let mut dst = vec![0f32; len];
            widen(&src[..len], &mut dst);
            for (h, f) in src[..len].iter().zip(&dst) {
                let want = h.to_f32();
                assert!(
                    (want.is_nan() && f.is_nan()) || want.to_bits() == f.to_bits(),
                    "{:#06x}: {f} vs {want}",
                    h.to_bits()
                );
            }
        }
    }

    #[test]
    fn copy_block_and_bad_layouts() {
        let cache = PagedKvCache::new(PagedKvConfig {
            num_layers: 1,
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
            dtype: KvDType::F32,
        })
        .unwrap();
        let seq = |t: Vec<u32>, n, c| PagedSeq {
            query_start: 0,
            num_query: n,
            context_len: c,
            block_table: t,
        };
        // Write 2 tokens into block 3, copy its first slot to block 1, read it back through a table [1].
        cache
            .attend(
                0,
                &[seq(vec![3], 2, 2)],
                &[1.0; 4],
                &[1.0, 2.0, 3.0, 4.0],
                &[5.0, 6.0, 7.0, 8.0],
                1,
                1.0,
            )
            .unwrap();
        cache.copy_block(3, 1, 1).unwrap();
        let out = cache
            .attend(0, &[seq(vec![1], 1, 2)], &[0.0; 2], &[3.0, 4.0], &[7.0, 8.0], 1, 1.0)
            .unwrap();
        // Zero query: uniform over the copied slot (5, 6) and the new one (7, 8).
        assert_eq!(out, vec![6.0, 7.0]);
        assert!(cache
            .attend(1, &[seq(vec![1], 1, 1)], &[0.0; 2], &[0.0; 2], &[0.0; 2], 1, 1.0)
            .is_err());
        assert!(cache
            .attend(0, &[seq(vec![1], 1, 3)], &[0.0; 2], &[0.0; 2], &[0.0; 2], 1, 1.0)
            .is_err());
        assert!(cache
            .attend(0, &[seq(vec![7], 1, 1)], &[0.0; 2], &[0.0; 2], &[0.0; 2], 1, 1.0)
            .is_err());
        assert!(cache
            .attend(0, &[seq(vec![1], 1, 1)], &[0.0; 3], &[0.0; 2], &[0.0; 2], 1, 1.0)
            .is_err());
        assert!(cache.copy_block(0, 9, 1).is_err());
    }
}

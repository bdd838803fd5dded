//! Paged KV storage and the attention that reads through block tables (vLLM's PagedAttention).
//!
//! A [`PagedKvCache`] holds, per layer, K and V for `num_blocks` blocks of `block_size` token
//! slots, laid out `[block][kv_head][slot][head_dim]`, so one head's keys in a block are one
//! contiguous `block_size x head_dim` tile that attention reads in place (f32) or converts once (f16). Which blocks a sequence owns is decided outside (Kiln's LLM block manager); a model
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
    /// `len` values from `at` as f32: borrowed in place for f32 storage, converted into
    /// `scratch` for f16.
    fn tile<'a>(&'a self, at: usize, len: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            Store::F32(d) => &d[at..at + len],
            Store::F16(d) => {
                d[at..at + len].convert_to_f32_slice(&mut scratch[..len]);
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
        let tile = self.cfg.block_size * self.cfg.head_dim;
        let n = num_tokens * self.cfg.head_dim;
        for layer in &self.layers {
            let mut l = layer.lock().unwrap_or_else(|e| e.into_inner());
            for h in 0..self.cfg.num_kv_heads {
                let (from, to) = (
                    (src * self.cfg.num_kv_heads + h) * tile,
                    (dst * self.cfg.num_kv_heads + h) * tile,
                );
                l.k.copy_within(from..from + n, to);
                l.v.copy_within(from..from + n, to);
            }
        }
        Ok(())
    }

    /// Offset of head `h`'s row for position `pos` of a sequence with block table `table`.
    fn slot(&self, table: &[u32], pos: usize, h: usize) -> usize {
        let bs = self.cfg.block_size;
        let b = table[pos / bs] as usize;
        ((b * self.cfg.num_kv_heads + h) * bs + pos % bs) * self.cfg.head_dim
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
                    let at = self.slot(&s.block_table, first_pos + i, h);
                    let row = (h * t + s.query_start + i) * d;
                    kv.k.write(at, &k[row..row + d]);
                    kv.v.write(at, &v[row..row + d]);
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
                (si, g, task.run::<false>())
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
    fn run<const FMA: bool>(&self) -> Vec<f32> {
        let (cfg, kv, s, g) = (&self.cache.cfg, self.kv, self.seq, self.g);
        let (d, group, q, t, scale) = (cfg.head_dim, self.group, self.q, self.t, self.scale);
        let (ctx, nq, bs) = (s.context_len, s.num_query, cfg.block_size);
        let first = ctx - nq;
        let nblocks = ctx.div_ceil(bs);
        // Scores of every (query head of the group, query token) row over the context.
        let rows = group * nq;
        let mut scores = vec![f32::NEG_INFINITY; rows * ctx];
        let mut tile = vec![0.0f32; bs * d];
        for bi in 0..nblocks {
            let n = bs.min(ctx - bi * bs);
            let kt = kv.k.tile(self.cache.tile(s.block_table[bi], g), n * d, &mut tile);
            for hg in 0..group {
                let h = g * group + hg;
                for i in 0..nq {
                    let pos = first + i;
                    if bi * bs > pos {
                        continue;
                    }
                    let qrow = &q[(h * t + s.query_start + i) * d..][..d];
                    let srow = &mut scores[(hg * nq + i) * ctx..][..ctx];
                    let last = n.min(pos + 1 - bi * bs);
                    dots::<FMA>(qrow, &kt[..last * d], scale, &mut srow[bi * bs..bi * bs + last]);
                }
            }
        }
        // Softmax over the positions each row sees (the rest stay unread).
        for r in 0..rows {
            let seen = first + r % nq + 1;
            crate::fastmath::softmax_row(&mut scores[r * ctx..r * ctx + seen]);
        }
        let mut out = vec![0.0f32; rows * d];
        for bi in 0..nblocks {
            let n = bs.min(ctx - bi * bs);
            let vt = kv.v.tile(self.cache.tile(s.block_table[bi], g), n * d, &mut tile);
            for r in 0..rows {
                let pos = first + r % nq;
                if bi * bs > pos {
                    continue;
                }
                let last = n.min(pos + 1 - bi * bs);
                let w = &scores[r * ctx + bi * bs..][..last];
                weighted_sum::<FMA>(w, &vt[..last * d], &mut out[r * d..(r + 1) * d]);
            }
        }
        out
    }

    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) -> Vec<f32> {
        self.run::<true>()
    }

    /// [`Task::run`] with 16-lane vectors (the same arithmetic, so the same bits as `run_avx2`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self) -> Vec<f32> {
        self.run::<true>()
    }
}

/// Lanes of the partial sums in [`dot`]: one 512-bit or two 256-bit vectors.
const LANES: usize = 16;

/// `q · k` as `LANES` interleaved partial sums added in a fixed tree, then the tail: a key's score has
/// the same bits whatever else the batch, the block or the query holds.
#[inline(always)]
fn dot<const FMA: bool>(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (cq, ck) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (rq, rk) = (cq.remainder(), ck.remainder());
    for (x, y) in cq.zip(ck) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut s = reduce(acc);
    for (x, y) in rq.iter().zip(rk) {
        s = madd::<FMA>(*x, *y, s);
    }
    s
}

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut h = [0.0f32; 8];
    for l in 0..8 {
        h[l] = acc[l] + acc[l + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `out[j] = scale * (q · keys[j])` for the `out.len()` rows of `keys` (`q.len()` floats each), four
/// keys per pass so four independent sums are in flight (each computed exactly as [`dot`]).
#[inline(always)]
fn dots<const FMA: bool>(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    let d = q.len();
    let mut quads = out.chunks_exact_mut(4);
    let mut j = 0;
    for o in &mut quads {
        let k = &keys[j * d..(j + 4) * d];
        let mut acc = [[0.0f32; LANES]; 4];
        let whole = d / LANES * LANES;
        for x in (0..whole).step_by(LANES) {
            let qv = &q[x..x + LANES];
            for (kk, a) in acc.iter_mut().enumerate() {
                let kv = &k[kk * d + x..kk * d + x + LANES];
                for l in 0..LANES {
                    a[l] = madd::<FMA>(qv[l], kv[l], a[l]);
                }
            }
        }
        for (kk, a) in acc.into_iter().enumerate() {
            let mut s = reduce(a);
            for x in whole..d {
                s = madd::<FMA>(q[x], k[kk * d + x], s);
            }
            o[kk] = s * scale;
        }
        j += 4;
    }
    for o in quads.into_remainder() {
        *o = dot::<FMA>(q, &keys[j * d..(j + 1) * d]) * scale;
        j += 1;
    }
}

/// `out += sum_j w[j] * vals[j]` over the `w.len()` rows of `vals` (`out.len()` floats each): per
/// `LANES` columns, four chains over the keys (j mod 4) kept in registers and added at the end.
#[inline(always)]
fn weighted_sum<const FMA: bool>(w: &[f32], vals: &[f32], out: &mut [f32]) {
    let d = out.len();
    let n = w.len();
    let whole = d / LANES * LANES;
    for x in (0..whole).step_by(LANES) {
        let mut acc = [[0.0f32; LANES]; 4];
        let mut quads = w.chunks_exact(4);
        let mut j = 0;
        for wq in &mut quads {
            for (kk, a) in acc.iter_mut().enumerate() {
                let v = &vals[(j + kk) * d + x..][..LANES];
                for l in 0..LANES {
                    a[l] = madd::<FMA>(wq[kk], v[l], a[l]);
                }
            }
            j += 4;
        }
        for (kk, &wj) in quads.remainder().iter().enumerate() {
            let v = &vals[(j + kk) * d + x..][..LANES];
            for l in 0..LANES {
                acc[kk][l] = madd::<FMA>(wj, v[l], acc[kk][l]);
            }
        }
        let o = &mut out[x..x + LANES];
        for l in 0..LANES {
            o[l] += (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
        }
    }
    for x in whole..d {
        let mut s = 0.0f32;
        for j in 0..n {
            s = madd::<FMA>(w[j], vals[j * d + x], s);
        }
        out[x] += s;
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

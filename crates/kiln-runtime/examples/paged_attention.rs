//! Time of one PagedAttention layer on the CPU for a decode step and a prefill chunk, SmolLM2-135M's
//! geometry (9 query heads over 3 KV heads of 64, 16-token blocks), f32 and f16 KV:
//!
//! ```text
//! cargo run --release -p kiln-runtime --example paged_attention -- [THREADS]
//! ```
//!
//! Decode: 32 sequences, one query token each, 128 tokens of context (the cache spread over 30
//! layers' worth of blocks, so the reads come from memory as in a model step). Prefill: one sequence,
//! a 512-token chunk attending causally to itself. Best of 7 rounds of 30 calls (one per layer).
use kiln_runtime::{KvDType, PagedKvCache, PagedKvConfig, PagedSeq};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(1, |s| s.parse().expect("THREADS"));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let (h, hkv, d, bs, layers) = (9, 3, 64, 16, 30);
    let vals =
        |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + seed) % 23) as f32 * 0.01 - 0.11).collect() };
    for dtype in [KvDType::F32, KvDType::F16] {
        for (name, seqs_n, ctx, nq) in [
            ("decode 32 x 1 token, context 128", 32usize, 128usize, 1usize),
            ("prefill 1 x 512 tokens", 1, 512, 512),
        ] {
            let blocks_per = ctx.div_ceil(bs);
            let cache = PagedKvCache::new(PagedKvConfig {
                num_layers: layers,
                num_blocks: seqs_n * blocks_per,
                block_size: bs,
                num_kv_heads: hkv,
                head_dim: d,
                dtype,
            })
            .unwrap();
            let seqs: Vec<PagedSeq> = (0..seqs_n)
                .map(|s| PagedSeq {
                    query_start: s * nq,
                    num_query: nq,
                    context_len: ctx,
                    block_table: (0..blocks_per).map(|b| (b * seqs_n + s) as u32).collect(),
                })
                .collect();
            let t = seqs_n * nq;
            let (q, k, v) = (vals(h * t * d, 1), vals(hkv * t * d, 2), vals(hkv * t * d, 3));
            let scale = 1.0 / (d as f32).sqrt();
            let mut best = f64::INFINITY;
            for _ in 0..7 {
                let start = Instant::now();
                for layer in 0..layers {
                    std::hint::black_box(cache.attend(layer, &seqs, &q, &k, &v, h, scale).unwrap());
                }
                best = best.min(start.elapsed().as_secs_f64() / layers as f64);
            }
            println!("{dtype:?} {name}: {:.3} ms per layer ({threads} threads)", best * 1e3);
        }
    }
}

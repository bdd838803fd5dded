//! Criterion: every engine on every real model at batch 1 (and the models' other default batch sizes with
//! `KILN_BENCH_ALL_BATCHES=1`), one group per model and batch so criterion's report puts the engines side by side.
//!
//!     KILN_MODELS=$KILN_CACHE/models-v1 KILN_BENCH_THREADS=1 cargo bench -p kiln-benches --bench engines
//!
//! An engine that cannot run a model is reported on stderr and left out of its group.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kiln_benches::{default_ort_library, engines, models, prepare_checked, set_threads};

/// The allocator the `kiln` binary ships with: with glibc malloc every large intermediate is a fresh mmap
/// that page-faults on first touch, which is not what Kiln's users run (ORT uses its own arena either way;
/// tract and candle-onnx get mimalloc too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_engines(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("KILN_MODELS").map(std::path::PathBuf::from) else {
        eprintln!("SKIP: KILN_MODELS is not set (bash models/fetch.sh; python models/make_bert.py DIR)");
        return;
    };
    let threads = std::env::var("KILN_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    if let Err(e) = set_threads(threads) {
        eprintln!("SKIP: {e:#}");
        return;
    }
    let all_batches = std::env::var_os("KILN_BENCH_ALL_BATCHES").is_some();
    let engines = engines(default_ort_library());
    for spec in models() {
        let path = dir.join(spec.file);
        if !path.is_file() {
            eprintln!("skip {}: {} missing", spec.label, path.display());
            continue;
        }
        let batches: &[usize] = if all_batches { spec.batches } else { &[1] };
        for &batch in batches {
            let inputs = (spec.make_inputs)(batch);
            let mut group = c.benchmark_group(format!("{} b{batch} t{threads}", spec.label));
            group.sample_size(10).warm_up_time(Duration::from_millis(500));
            for engine in &engines {
                let mut prepared = match prepare_checked(engine.as_ref(), &path, &inputs) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{} on {}: fails: {e:#}", engine.name(), spec.label);
                        continue;
                    }
                };
                group.bench_function(BenchmarkId::from_parameter(engine.name()), |b| {
                    b.iter(|| prepared.run().map_err(|e| e.to_string()))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench_engines);
criterion_main!(benches);

//! `kiln-benches`: measures Kiln, ONNX Runtime, tract-onnx and candle-onnx on the real models in one process
//! with one thread count and prints a markdown table of medians and Kiln/engine ratios (`scripts/bench.sh` runs
//! it for 1 and 2 threads and writes docs/benchmarks.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use kiln_benches::{
    default_ort_library, engines, measure_interleaved, models, set_threads, Budget, Engine, KilnEngine, Outcome,
};

/// The allocator the `kiln` binary ships with: with glibc malloc every large intermediate is a fresh mmap
/// that page-faults on first touch, which is not what Kiln's users run (ORT uses its own arena either way;
/// tract and candle-onnx get mimalloc too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Kiln vs ONNX Runtime vs tract-onnx vs candle-onnx on the real models (markdown table)")]
struct Args {
    /// Directory with the models (models/fetch.sh + models/make_bert.py); default $KILN_MODELS.
    #[arg(long, env = "KILN_MODELS")]
    models: PathBuf,
    /// Threads for every engine.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batch sizes to measure instead of each model's defaults (comma separated).
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// Only models whose label or file contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Seconds of timed runs per cell (at least --min-runs runs).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    min_runs: usize,
    #[arg(long, default_value_t = 20)]
    max_runs: usize,
    /// Run only Kiln (for profiling: `perf record ... kiln-benches --kiln-only --only det`).
    #[arg(long)]
    kiln_only: bool,
    /// Also print Kiln's peak activation memory against the sum of all intermediates.
    #[arg(long)]
    memory: bool,
    /// libonnxruntime.so.1.32.0 (default: $ORT_DYLIB_PATH, else the venv of scripts/setup-python.sh).
    #[arg(long)]
    ort_library: Option<PathBuf>,
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn cell(o: &Outcome) -> String {
    match o {
        Outcome::Median { median, .. } => ms(*median),
        Outcome::Fails(why) => format!("fails: {}", why.replace('|', "/")),
    }
}

fn ratio(kiln: &Outcome, other: &Outcome) -> String {
    match (kiln, other) {
        (Outcome::Median { median: k, .. }, Outcome::Median { median: o, .. }) => {
            format!("{:.2}", k.as_secs_f64() / o.as_secs_f64())
        }
        _ => "-".into(),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.models.is_dir() {
        bail!("{} is not a directory (run models/fetch.sh)", args.models.display());
    }
    set_threads(args.threads)?;
    let budget = Budget {
        min_runs: args.min_runs.max(1),
        max_runs: args.max_runs.max(args.min_runs.max(1)),
        time: Duration::from_secs_f64(args.seconds.max(0.0)),
    };
    let engines = engines(args.ort_library.clone().or_else(default_ort_library));
    let names: Vec<&str> = engines.iter().map(|e| e.name()).collect();

    println!(
        "### {} thread{}\n",
        args.threads,
        if args.threads == 1 { "" } else { "s" }
    );
    println!("Median milliseconds per run; ratio = Kiln time / other engine's time (below 1: Kiln is faster).\n");
    println!(
        "| model | batch | {} | Kiln/ORT | Kiln/tract | Kiln/candle |",
        names.join(" | ")
    );
    println!("|---|---|{}---|---|---|", "---|".repeat(names.len()));
    let mut memory_rows = Vec::new();
    for spec in models() {
        if let Some(only) = &args.only {
            if !spec.label.contains(only.as_str()) && !spec.file.contains(only.as_str()) {
                continue;
            }
        }
        let path = args.models.join(spec.file);
        if !path.is_file() {
            eprintln!("skip {}: {} missing", spec.label, path.display());
            continue;
        }
        let batches = args.batches.clone().unwrap_or_else(|| spec.batches.to_vec());
        for batch in batches {
            let inputs = (spec.make_inputs)(batch);
            let slots: Vec<Option<&dyn Engine>> = engines
                .iter()
                .map(|e| (!args.kiln_only || e.name() == "Kiln").then_some(e.as_ref()))
                .collect();
            eprintln!("{} batch {batch}: {} (interleaved) ...", spec.label, names.join(", "));
            let outcomes = measure_interleaved(&slots, &path, &inputs, budget);
            eprintln!("  {}", outcomes.iter().map(cell).collect::<Vec<_>>().join(" | "));
            println!(
                "| {} ({}) | {batch} | {} | {} | {} | {} |",
                spec.label,
                spec.sample,
                outcomes.iter().map(cell).collect::<Vec<_>>().join(" | "),
                ratio(&outcomes[0], &outcomes[1]),
                ratio(&outcomes[0], &outcomes[2]),
                ratio(&outcomes[0], &outcomes[3]),
            );
            if args.memory {
                let row = match KilnEngine::memory(&path, &inputs) {
                    Ok(s) => format!(
                        "| {} ({}) | {batch} | {} | {} | {:.2} |",
                        spec.label,
                        spec.sample,
                        mib(s.peak_activation_bytes),
                        mib(s.total_intermediate_bytes),
                        s.peak_activation_bytes as f64 / s.total_intermediate_bytes.max(1) as f64
                    ),
                    Err(e) => format!("| {} | {batch} | fails: {e} | | |", spec.label),
                };
                memory_rows.push(row);
            }
        }
    }
    if args.memory {
        println!("\n### Kiln activation memory (`Session::run_with_stats`)\n");
        println!("| model | batch | peak activation MiB | sum of all intermediates MiB | peak / sum |");
        println!("|---|---|---|---|---|");
        for r in memory_rows {
            println!("{r}");
        }
    }
    println!();
    Ok(())
}

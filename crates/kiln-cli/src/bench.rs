//! `kiln bench`: latency percentiles and throughput of one model on one device.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::{DType, Device, Dim, Level, Session, TensorData};

/// Settings of one benchmark run.
pub struct BenchConfig<'a> {
    pub inputs: &'a [String],
    pub dims: &'a [String],
    pub device: Device,
    pub level: Level,
    pub precision: kiln::Precision,
    pub warmup: usize,
    pub iterations: usize,
    /// Print a per-operator time breakdown from extra profiled runs.
    pub profile: bool,
    /// How many of the slowest nodes the profile lists.
    pub top: usize,
    /// Inputs copied to the device once and outputs left there (IO binding), each run
    /// synchronized; otherwise every run takes host inputs and returns host outputs.
    pub io_device: bool,
    /// Run on a pool worker (`RunOptions::on_thread_pool`).
    pub run_on_pool: bool,
}

pub fn bench(path: &Path, cfg: &BenchConfig) -> Result<()> {
    let session = crate::open_session(path, cfg.device, cfg.level, cfg.precision)?;
    let Feeds { feeds, synthesized } = feeds(&session, cfg.inputs, cfg.dims)?;
    let bound = if cfg.io_device {
        Some(
            session
                .bind_inputs(feeds.clone())
                .map_err(|e| synthesized.explain(e.into()))?,
        )
    } else {
        None
    };
    let options = kiln::RunOptions {
        on_thread_pool: cfg.run_on_pool,
        ..session.run_options().clone()
    };
    let run_once = || -> Result<()> {
        let run = || -> Result<()> {
            match &bound {
                Some(values) => {
                    let outputs = session.run_values_with(values.clone(), &options)?;
                    session.synchronize()?;
                    drop(outputs);
                }
                None => {
                    session.run_with_options(feeds.clone(), &options)?;
                }
            }
            Ok(())
        };
        run().map_err(|e| synthesized.explain(e))
    };
    for _ in 0..cfg.warmup {
        run_once()?;
    }
    let bar = ProgressBar::new(cfg.iterations as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} runs {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut times: Vec<Duration> = Vec::with_capacity(cfg.iterations);
    let started = Instant::now();
    for _ in 0..cfg.iterations {
        let t = Instant::now();
        run_once()?;
        times.push(t.elapsed());
        bar.inc(1);
    }
    let total = started.elapsed();
    bar.finish_and_clear();
    times.sort();
    let pct = |p: f64| -> f64 {
        let i = ((times.len() as f64 - 1.0) * p).round() as usize;
        times.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len().max(1) as f64 * 1e3;
    outln!("model:      {}", path.display());
    outln!(
        "device:     {}  level: {:?}  precision: {:?}  threads: {}",
        cfg.device,
        cfg.level,
        cfg.precision,
        kiln::num_threads()
    );
    outln!(
        "runs:       {} (after {} warm-up); io: {}",
        times.len(),
        cfg.warmup,
        if cfg.io_device {
            "device (inputs bound once, outputs left on the device, each run synchronized)"
        } else {
            "host (inputs copied in and outputs copied out every run)"
        }
    );
    outln!(
        "latency ms: mean {mean:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  min {:.3}  max {:.3}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.0),
        pct(1.0)
    );
    outln!(
        "throughput: {:.2} runs/s",
        times.len() as f64 / total.as_secs_f64().max(1e-9)
    );
    outln!("{}", crate::memory_line(&session));
    let fallbacks = session.host_fallbacks();
    if !fallbacks.is_empty() {
        let mut ops: Vec<&str> = fallbacks.iter().map(|f| f.op.as_str()).collect();
        ops.sort_unstable();
        ops.dedup();
        outln!(
            "on the CPU: {} node(s) without a {} kernel ({}); `kiln inspect --device {}` lists them",
            fallbacks.len(),
            cfg.device,
            ops.join(", "),
            cfg.device
        );
    }
    if cfg.profile {
        profile(&session, &feeds, cfg.iterations.min(20), cfg.top)?;
    }
    Ok(())
}

/// Model inputs for `bench` and `inspect --device`, and how the synthesized ones were shaped.
pub struct Feeds {
    pub feeds: Vec<(String, TensorData)>,
    pub synthesized: Synthesized,
}

/// The dims of synthesized inputs that were set to 1 because nothing gave their size.
#[derive(Default)]
pub struct Synthesized {
    /// Symbolic dims no `--dim` named, each with the inputs that declare it.
    symbols: Vec<(String, Vec<String>)>,
    /// Inputs with a dim that has no name (only `--input NAME=file.npy` can size those).
    unnamed: Vec<String>,
}

impl Synthesized {
    fn note_symbol(&mut self, symbol: &str, input: &str) {
        match self.symbols.iter_mut().find(|(s, _)| s == symbol) {
            Some((_, inputs)) if inputs.iter().any(|i| i == input) => {}
            Some((_, inputs)) => inputs.push(input.to_string()),
            None => self.symbols.push((symbol.to_string(), vec![input.to_string()])),
        }
    }

    /// `e` with what was guessed and how to set it appended, when anything was guessed: a model
    /// that needs, say, a sequence length above 1 fails on the default inputs.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let mut notes = Vec::new();
        if !self.symbols.is_empty() {
            let set: Vec<String> = self
                .symbols
                .iter()
                .map(|(s, inputs)| format!("{s} (input {})", quoted(inputs)))
                .collect();
            let example: Vec<String> = self.symbols.iter().map(|(s, _)| format!("--dim {s}=VALUE")).collect();
            notes.push(format!(
                "the synthesized inputs set these symbolic dims to 1: {}; set them with --dim NAME=VALUE ({})",
                set.join(", "),
                example.join(" ")
            ));
        }
        if !self.unnamed.is_empty() {
            notes.push(format!(
                "input {} has unnamed dims, set to 1; pass it with --input NAME=path.npy",
                quoted(&self.unnamed)
            ));
        }
        if notes.is_empty() {
            e
        } else {
            anyhow::anyhow!("{e:#}. Note: {}", notes.join("; "))
        }
    }
}

fn quoted(names: &[String]) -> String {
    names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
}

/// Feeds for every model input: `NAME=path.npy` files where given, the rest synthesized from the
/// declared shapes (symbolic dims from `SYMBOL=SIZE`, else 1). Shared by `bench` and `inspect`.
pub fn feeds(session: &Session, inputs: &[String], dims: &[String]) -> Result<Feeds> {
    let mut symbols: HashMap<String, usize> = HashMap::new();
    for spec in dims {
        let (k, v) = spec
            .split_once('=')
            .with_context(|| format!("--dim '{spec}' should be NAME=SIZE"))?;
        symbols.insert(
            k.to_string(),
            v.parse().with_context(|| format!("--dim '{spec}': bad size"))?,
        );
    }
    let mut given: HashMap<String, TensorData> = HashMap::new();
    for spec in inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input '{spec}' should be NAME=path.npy"))?;
        given.insert(name.to_string(), crate::npy::read(Path::new(file), name)?);
    }
    let mut feeds = Vec::new();
    let mut synthesized = Synthesized::default();
    for info in session.inputs() {
        let shape = info.shape.as_ref().map(|s| s.0.as_slice());
        let data = match given.remove(&info.name) {
            Some(d) => d,
            None => {
                for d in shape.unwrap_or_default() {
                    match d {
                        Dim::Sym(s) if !symbols.contains_key(s) => synthesized.note_symbol(s, &info.name),
                        Dim::Unknown if !synthesized.unnamed.contains(&info.name) => {
                            synthesized.unnamed.push(info.name.clone())
                        }
                        _ => {}
                    }
                }
                synthetic(&info.name, info.dtype, shape, &symbols)?
            }
        };
        feeds.push((info.name.clone(), data));
    }
    if let Some(name) = given.keys().next() {
        bail!("the model has no input '{name}'");
    }
    Ok(Feeds { feeds, synthesized })
}

/// Runs `runs` more times with per-node timing; prints time by operator type and the slowest nodes.
fn profile(session: &Session, feeds: &[(String, TensorData)], runs: usize, top: usize) -> Result<()> {
    let options = kiln::RunOptions {
        profile: true,
        ..session.run_options().clone()
    };
    let mut by_op: HashMap<String, (Duration, usize)> = HashMap::new();
    let mut by_node: HashMap<(String, String), Duration> = HashMap::new();
    let mut total = Duration::ZERO;
    for _ in 0..runs {
        let (_, stats) = session.run_with_options(feeds.to_vec(), &options)?;
        // Subgraph nodes are counted in their own right; an If/Loop/Scan keeps only its own time.
        let own = kiln::OpTime::self_times(&stats.op_times);
        for (t, own) in stats.op_times.into_iter().zip(own) {
            let e = by_op.entry(t.op.clone()).or_default();
            e.0 += own;
            e.1 += 1;
            *by_node.entry((t.op, t.node)).or_default() += own;
            if t.depth == 0 {
                total += t.duration;
            }
        }
    }
    let runs = runs.max(1) as f64;
    let per_run = |d: Duration| d.as_secs_f64() * 1e3 / runs;
    let share = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-12);
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by_key(|o| std::cmp::Reverse(o.1 .0));
    outln!(
        "\nprofile over {runs} runs: {:.3} ms per run inside kernels",
        per_run(total)
    );
    outln!("{:<28} {:>7} {:>11} {:>7}", "operator", "nodes", "ms/run", "share");
    for (op, (d, n)) in &ops {
        outln!(
            "{op:<28} {:>7} {:>11.3} {:>6.1}%",
            (*n as f64 / runs).round(),
            per_run(*d),
            share(*d)
        );
    }
    let mut nodes: Vec<_> = by_node.into_iter().collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(n.1));
    outln!("\nslowest nodes:");
    for ((op, node), d) in nodes.iter().take(top) {
        outln!("  {:>9.3} ms {:>6.1}%  {op} {node}", per_run(*d), share(*d));
    }
    Ok(())
}

/// A deterministic input for a declared input: symbolic dims from `--dim`, else 1.
fn synthetic(
    name: &str,
    dtype: Option<DType>,
    shape: Option<&[Dim]>,
    symbols: &HashMap<String, usize>,
) -> Result<TensorData> {
    let dims: Vec<usize> = shape
        .with_context(|| format!("input '{name}' has no declared shape; pass --input {name}=file.npy"))?
        .iter()
        .map(|d| match d {
            Dim::Known(n) => *n,
            Dim::Sym(s) => symbols.get(s).copied().unwrap_or(1),
            Dim::Unknown => 1,
        })
        .collect();
    let n: usize = dims.iter().product();
    if n > 1 << 28 {
        bail!("input '{name}' would have {n} elements; pass smaller --dim values");
    }
    let ramp = |i: usize| ((i % 97) as f64) / 97.0;
    Ok(match dtype.unwrap_or(DType::F32) {
        DType::F32 => TensorData::from_values(name, dims, &(0..n).map(|i| ramp(i) as f32).collect::<Vec<_>>())?,
        DType::F64 => TensorData::from_values(name, dims, &(0..n).map(ramp).collect::<Vec<_>>())?,
        DType::F16 => TensorData::from_values(
            name,
            dims,
            &(0..n).map(|i| half::f16::from_f64(ramp(i))).collect::<Vec<_>>(),
        )?,
        DType::I64 => TensorData::from_values(name, dims, &(0..n).map(|i| (i % 7) as i64).collect::<Vec<_>>())?,
        DType::I32 => TensorData::from_values(name, dims, &(0..n).map(|i| (i % 7) as i32).collect::<Vec<_>>())?,
        DType::Bool => TensorData::from_values(name, dims, &(0..n).map(|i| i % 2 == 0).collect::<Vec<_>>())?,
        DType::U8 => TensorData::from_values(name, dims, &(0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>())?,
        other => bail!("input '{name}' of {other}: pass --input {name}=file.npy"),
    })
}

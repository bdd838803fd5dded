//! The `kiln` command line.

/// `println!` that returns an error from the enclosing function instead of panicking when stdout
/// cannot be written: a closed pipe (`kiln inspect model.onnx | head`) becomes [`StdoutClosed`],
/// which `main` turns into a quiet exit 0.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::stdout_error)?
    }};
}

mod bench;
mod generate;
mod health;
mod npy;
mod optimize;
mod output;
mod precision;
mod prune;
mod quantize;
mod serve;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln::internals::{onnx, runtime};

/// mimalloc keeps freed tensor buffers for reuse: with the system allocator every large
/// intermediate is a fresh mmap that page-faults on first touch (measured on MiniLM, batch 8:
/// 4x fewer page faults, see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use kiln::{Device, Level, Precision, Session};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a pure-Rust ONNX inference engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Keep subnormal floats (IEEE) in CPU kernels instead of reading and writing them as zero
    /// (the default; subnormals cost a microcode assist per instruction).
    #[arg(long, global = true, env = "KILN_KEEP_DENORMALS",
          value_parser = clap::builder::FalseyValueParser::new())]
    keep_denormals: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a model's opset, inputs/outputs, operators, parameters and unsupported operators;
    /// with --device, also run it once there and list the nodes that fall back to the CPU.
    Inspect {
        model: PathBuf,
        /// Build a session on this device (cpu, cuda or cuda:N), run it once on synthesized
        /// inputs (or --input files) and list the nodes that ran on the CPU instead.
        #[arg(long)]
        device: Option<String>,
        /// NAME=path.npy to use a real input for the trial run.
        #[arg(long = "input", short = 'i', value_name = "NAME=PATH")]
        inputs: Vec<String>,
        /// SYMBOL=SIZE for symbolic dims of synthesized inputs (default 1), e.g. batch=8.
        #[arg(long = "dim", value_name = "SYMBOL=SIZE")]
        dims: Vec<String>,
        /// Optimization level of the trial session (see `kiln run --help`).
        #[arg(long, default_value = "all")]
        level: Level,
        #[command(flatten)]
        precision: precision::PrecisionArg,
    },
    /// Run a model on .npy inputs and write one .npy per output.
    Run {
        model: PathBuf,
        /// NAME=path.npy, once per input.
        #[arg(long = "input", short = 'i', value_name = "NAME=PATH")]
        inputs: Vec<String>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Graph optimization level: disabled, basic, extended or all (ONNX Runtime's levels). The
        /// default, all, is the fastest; every level passes the same ONNX node tests.
        #[arg(long, default_value = "all")]
        level: Level,
        /// Directory for `<output name>.npy` files.
        #[arg(long, short = 'o', default_value = "kiln-out")]
        output_dir: PathBuf,
        #[command(flatten)]
        precision: precision::PrecisionArg,
    },
    /// Measure latency percentiles and throughput (inputs synthesized from the declared shapes).
    Bench {
        model: PathBuf,
        /// NAME=path.npy to use a real input instead of a synthetic one.
        #[arg(long = "input", short = 'i', value_name = "NAME=PATH")]
        inputs: Vec<String>,
        /// SYMBOL=SIZE for symbolic dims of synthesized inputs (default 1), e.g. batch=8.
        #[arg(long = "dim", value_name = "SYMBOL=SIZE")]
        dims: Vec<String>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Graph optimization level: disabled, basic, extended or all (see `kiln run --help`).
        #[arg(long, default_value = "all")]
        level: Level,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, short = 'n', default_value_t = 50)]
        iterations: usize,
        /// CPU threads (default: all cores).
        #[arg(long, env = "KILN_THREADS")]
        threads: Option<usize>,
        /// After timing, run again with per-node timing and print where the time goes.
        #[arg(long)]
        profile: bool,
        /// How many of the slowest nodes `--profile` lists.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// host: every run copies inputs in and outputs out; device: inputs are copied to the
        /// device once and outputs stay there (IO binding), each run synchronized.
        #[arg(long, default_value = "host", value_parser = ["host", "device"])]
        io: String,
        /// Walk the plan on the calling thread, each parallel kernel handing its work to the
        /// thread pool and waiting (what `kiln serve` does). Without it each inference runs on a
        /// worker of the pool (`RunOptions::on_thread_pool`, the library's default), so parallel
        /// kernels do not wake the pool from outside one by one.
        #[arg(long)]
        run_on_caller: bool,
        #[command(flatten)]
        precision: precision::PrecisionArg,
    },
    /// Optimize a model's graph and write it as ONNX (prints node counts by op before/after).
    Optimize {
        input: PathBuf,
        output: PathBuf,
        /// Graph optimization level: disabled, basic, extended or all. The written model must run
        /// in other runtimes, so all's extra fusions (Kiln-only kernels) are left out: all and
        /// extended write the same model.
        #[arg(long, default_value = "all")]
        level: Level,
        /// Most bytes a folded constant may add to the model.
        #[arg(long, default_value_t = 1 << 20)]
        fold_limit: usize,
        /// fp16 writes a mixed-precision model (f16 weights, f32 inputs/outputs, Casts between).
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
    /// Quantize MatMul/Gemm weights to int8 (per output channel), optionally the activations at run time, MatMul weights to 4 bits per block, or convert to fp16, and write the model as ONNX.
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// int8-weight (MatMul/Gemm weights in int8, activations and products stay float),
        /// static-int8 (Conv/MatMul/Gemm inputs and outputs u8 from calibrated ranges, weights int8
        /// per channel, QDQ: onnxruntime quantize_static's form; needs --calibration), dynamic-int8 (MatMul weights int8 per column, activations quantized to u8 at run time,
        /// integer products: onnxruntime quantize_dynamic's form) or fp16 (f16 weights and compute,
        /// graph inputs/outputs and overflow-prone ops kept f32 behind Casts) or int4-weight
        /// (MatMul weights as 4-bit codes with a scale and zero point per block along K:
        /// com.microsoft MatMulNBits, which ONNX Runtime runs).
        #[arg(long, default_value = "int8-weight")]
        mode: String,
        /// Weights with fewer elements stay f32.
        #[arg(long, default_value_t = kiln::quantize::DEFAULT_MIN_ELEMENTS)]
        min_elements: usize,
        /// int4-weight: values per block along K (a power of two >= 16).
        #[arg(long, default_value_t = 32)]
        block_size: usize,
        /// static-int8: calibration samples, a folder of NAME.npy files (one sample) or of sample
        /// folders; also the inputs of the accuracy report (else synthesized).
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// static-int8: how activation ranges are chosen: minmax, percentile (99.999),
        /// percentile=P or entropy.
        #[arg(long, default_value = "minmax")]
        calibration_method: String,
        /// static-int8: leave nodes of this op type or name in f32 (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Skip the comparison with the original (accuracy and latency).
        #[arg(long)]
        no_report: bool,
    },
    /// Magnitude-prune MatMul/Gemm/Conv weights (a fraction of each, or N of every M along the reduction axis) and write the model as ONNX.
    Prune {
        input: PathBuf,
        output: PathBuf,
        /// Zero this fraction (0 <= F < 1) of each weight's values, smallest magnitudes first.
        #[arg(long, conflicts_with = "structured")]
        amount: Option<f64>,
        /// Keep the N largest of every M consecutive values along the reduction axis (e.g. 2:4).
        #[arg(long)]
        structured: Option<String>,
        /// Leave the weights of nodes of this op type or name alone (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Serve a model repository over KServe v2 HTTP/gRPC and TF-Serving REST.
    Serve(serve::ServeArgs),
    /// Generate text with an LLM directory (model.onnx, config.json, tokenizer files), streamed
    /// to stdout; token counts and timings go to stderr.
    Generate(generate::GenerateArgs),
    /// Check that a running server is ready: GET its /v2/health/ready, exit 0 on HTTP 200 (the
    /// container image's HEALTHCHECK).
    Health(health::HealthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln::set_flush_denormals(!cli.keep_denormals);
    let r = match cli.cmd {
        Cmd::Inspect {
            model,
            device,
            inputs,
            dims,
            level,
            precision,
        } => inspect(&model).and_then(|()| match device {
            Some(d) => trial_run(&model, &d, &inputs, &dims, level, precision.precision),
            None => Ok(()),
        }),
        Cmd::Run {
            model,
            inputs,
            device,
            level,
            output_dir,
            precision,
        } => run(&model, &inputs, &device, level, precision.precision, &output_dir),
        Cmd::Bench {
            model,
            inputs,
            dims,
            device,
            level,
            warmup,
            iterations,
            threads,
            profile,
            top,
            io,
            run_on_caller,
            precision,
        } => (|| {
            if let Some(n) = threads {
                kiln::set_num_threads(n)?;
            }
            let cfg = bench::BenchConfig {
                inputs: &inputs,
                dims: &dims,
                device: device.parse()?,
                level,
                precision: precision.precision,
                warmup,
                iterations: iterations.max(1),
                profile,
                top,
                io_device: io == "device",
                run_on_pool: !run_on_caller,
            };
            bench::bench(&model, &cfg)
        })(),
        Cmd::Optimize {
            input,
            output,
            level,
            fold_limit,
            precision,
        } => optimize::optimize(
            &input,
            &output,
            &optimize::OptimizeConfig {
                level,
                fold_limit,
                precision,
            },
        ),
        Cmd::Quantize {
            input,
            output,
            mode,
            min_elements,
            block_size,
            calibration,
            calibration_method,
            exclude,
            no_report,
        } => quantize::quantize(
            &input,
            &output,
            &quantize::QuantizeConfig {
                mode,
                min_elements,
                block_size,
                calibration,
                method: calibration_method,
                exclude,
                no_report,
            },
        ),
        Cmd::Prune {
            input,
            output,
            amount,
            structured,
            exclude,
        } => prune::prune(
            &input,
            &output,
            &prune::PruneConfig {
                amount,
                structured,
                exclude,
            },
        ),
        Cmd::Serve(args) => serve::serve(args),
        Cmd::Generate(args) => generate::generate(args),
        Cmd::Health(args) => health::health(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`| head`): stop quietly, like a tool killed by SIGPIPE.
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            // stderr may be closed too; the exit status still reports the failure.
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// A write to stdout failed because its reader is gone (a closed pipe). Rust ignores SIGPIPE, so
/// such writes return `BrokenPipe`, which `println!` would turn into a panic.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// The error for a failed stdout write (see `outln!`).
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

fn inspect(path: &Path) -> Result<()> {
    let model = onnx::load_model(path).with_context(|| format!("loading {}", path.display()))?;
    let g = &model.graph;
    outln!("model:     {}", path.display());
    outln!(
        "producer:  {}",
        if model.producer.is_empty() {
            "-"
        } else {
            &model.producer
        }
    );
    outln!("ir:        {}", model.ir_version);
    let opsets: Vec<String> = model
        .opsets
        .iter()
        .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    outln!("opsets:    {}", opsets.join(", "));
    outln!("\ninputs:");
    for id in g.runtime_inputs() {
        print_io(g.value(id))?;
    }
    outln!("outputs:");
    for id in &g.outputs {
        print_io(g.value(*id))?;
    }
    let mut hist: BTreeMap<String, usize> = BTreeMap::new();
    let mut nodes = 0usize;
    g.for_each_graph(&mut |sub| {
        for n in &sub.nodes {
            nodes += 1;
            let key = if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}::{}", n.domain, n.op_type)
            };
            *hist.entry(key).or_default() += 1;
        }
    });
    let mut params = 0usize;
    g.for_each_graph(&mut |sub| params += sub.parameter_count());
    outln!("\nnodes:      {nodes} (including subgraphs)");
    outln!("parameters: {params} in {} initializers", g.initializers.len());
    outln!("\noperators:");
    let mut by_count: Vec<_> = hist.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in by_count {
        outln!("  {n:>6}  {op}");
    }
    let reg = runtime::Registry::global();
    let mut missing: Vec<String> = Vec::new();
    g.for_each_graph(&mut |sub| {
        for n in &sub.nodes {
            if !reg.contains(&n.domain, &n.op_type) {
                let d = if n.domain.is_empty() { "ai.onnx" } else { &n.domain };
                missing.push(format!("{d}::{}", n.op_type));
            }
        }
    });
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        outln!("\nunsupported: none (Kiln has a CPU kernel for every operator)");
    } else {
        outln!("\nunsupported: {}", missing.join(", "));
    }
    for level in [Level::Basic, Level::Extended] {
        let mut m = model.clone();
        if let Ok(r) = kiln::optimize_model(&mut m, level) {
            outln!("optimized ({level:?}): {r}");
        }
    }
    Ok(())
}

/// The session `run`, `bench` and `inspect --device` use; errors name the model and the device.
pub(crate) fn open_session(path: &Path, device: Device, level: Level, precision: Precision) -> Result<Session> {
    Session::builder()
        .device(device)
        .optimization(level)
        .precision(precision)
        .build_from_file(path)
        .with_context(|| format!("loading {} on {device}", path.display()))
}

/// `kiln inspect --device`: builds a session there, runs it once and reports where nodes ran.
fn trial_run(
    path: &Path,
    device: &str,
    inputs: &[String],
    dims: &[String],
    level: Level,
    precision: Precision,
) -> Result<()> {
    let device: Device = device.parse()?;
    let session = open_session(path, device, level, precision)?;
    let bench::Feeds { feeds, synthesized } = bench::feeds(&session, inputs, dims)?;
    let started = std::time::Instant::now();
    session
        .run(feeds)
        .with_context(|| format!("trial run on {device}"))
        .map_err(|e| synthesized.explain(e))?;
    outln!(
        "
trial run on {device} (level {level:?}, precision {precision:?}): {} kernels in the main graph, {:.1} ms (first run)",
        session.plan().len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    if device == Device::Cpu {
        outln!("  every node runs on the CPU");
    } else {
        print_host_fallbacks(&session, device)?;
    }
    if let Some(c) = session.plan().placement_counts() {
        outln!(
            "  shape arithmetic on the host: {} node(s), {} constant(s) with a host copy; {} integer input(s) still read from device memory per run",
            c.host_steps, c.host_constants, c.device_reads
        );
    }
    if let Some(m) = session.device_memory_stats()? {
        const MIB: f64 = (1 << 20) as f64;
        outln!(
            "  device memory: {:.1} MiB reserved, {:.1} MiB allocated (peak {:.1} MiB)",
            m.reserved_bytes as f64 / MIB,
            m.allocated_bytes as f64 / MIB,
            m.allocated_peak_bytes as f64 / MIB
        );
    }
    Ok(())
}

/// Prints the nodes of a device session that ran on the CPU, grouped by operator.
fn print_host_fallbacks(session: &Session, device: Device) -> Result<()> {
    let fallbacks = session.host_fallbacks();
    if fallbacks.is_empty() {
        outln!("  every node ran on {device}");
        return Ok(());
    }
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for f in &fallbacks {
        let name = if f.depth > 0 {
            format!("{} (subgraph depth {})", f.node, f.depth)
        } else {
            f.node.clone()
        };
        by_op.entry(f.op.as_str()).or_default().push(name);
    }
    outln!(
        "  {} node(s) ran on the CPU (no {device} kernel for their op or dtype; inputs and outputs copied):",
        fallbacks.len()
    );
    for (op, nodes) in by_op {
        let shown: Vec<&str> = nodes.iter().take(4).map(String::as_str).collect();
        let more = if nodes.len() > 4 {
            format!(", ... {} more", nodes.len() - 4)
        } else {
            String::new()
        };
        outln!("    {op:<24} {:>4}  {}{more}", nodes.len(), shown.join(", "));
    }
    Ok(())
}

fn print_io(v: &kiln::internals::graph::ValueInfo) -> Result<()> {
    let dtype = v.dtype.map(|d| d.to_string()).unwrap_or_else(|| "?".into());
    let shape = v.shape.as_ref().map(|s| s.to_string()).unwrap_or_else(|| "[?]".into());
    outln!("  {:<32} {dtype:<8} {shape}", v.name);
    Ok(())
}

/// Characters outside `[A-Za-z0-9_.-]` become `_`.
fn file_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        format!("output_{}", s.len())
    } else {
        s
    }
}

fn run(path: &Path, inputs: &[String], device: &str, level: Level, precision: Precision, out_dir: &Path) -> Result<()> {
    let device: Device = device.parse()?;
    let session = open_session(path, device, level, precision)?;
    let mut feeds = Vec::new();
    for spec in inputs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input '{spec}' should be NAME=path.npy"))?;
        feeds.push((name.to_string(), npy::read(Path::new(file), name)?));
    }
    if feeds.is_empty() && !session.inputs().is_empty() {
        let names: Vec<String> = session
            .inputs()
            .iter()
            .map(|i| {
                let shape = i.shape.as_ref().map(|s| s.to_string()).unwrap_or_else(|| "[?]".into());
                let dtype = i.dtype.map(|d| d.to_string()).unwrap_or_else(|| "?".into());
                format!("{} ({dtype} {shape})", i.name)
            })
            .collect();
        bail!(
            "no inputs given; the model needs --input NAME=path.npy for: {}",
            names.join(", ")
        );
    }
    let started = std::time::Instant::now();
    let (outputs, stats) = session.run_with_stats(feeds)?;
    let elapsed = started.elapsed();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for (t, info) in outputs.iter().zip(session.outputs()) {
        let file = out_dir.join(format!("{}.npy", file_stem(&info.name)));
        npy::write(&file, t)?;
        outln!(
            "{:<32} {:<8} {:?} -> {}",
            info.name,
            t.dtype.to_string(),
            t.dims,
            file.display()
        );
    }
    outln!(
        "ran in {:.1} ms on {device}; peak activation memory {:.2} MiB (all intermediates: {:.2} MiB)",
        elapsed.as_secs_f64() * 1e3,
        stats.peak_activation_bytes as f64 / (1 << 20) as f64,
        stats.total_intermediate_bytes as f64 / (1 << 20) as f64
    );
    outln!("{}", memory_line(&session));
    if device != Device::Cpu {
        print_host_fallbacks(&session, device)?;
    }
    Ok(())
}

/// The session's weight memory (constants on its device, kernels' packed forms) and the process's
/// resident peak so far (`VmHWM`, Linux).
pub(crate) fn memory_line(session: &Session) -> String {
    let m = session.plan().memory();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(|| "unknown".to_string(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0));
    format!(
        "memory:     weights {:.1} MiB as constants + {:.1} MiB packed in kernels; process resident peak {peak}",
        mib(m.constant_bytes),
        mib(m.kernel_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::file_stem;

    #[test]
    fn output_names_become_safe_file_names() {
        assert_eq!(file_stem("gpu_0/softmax_1"), "gpu_0_softmax_1");
        assert_eq!(file_stem("logits"), "logits");
        assert_eq!(file_stem("a b:c"), "a_b_c");
        assert_eq!(file_stem(".."), "output_2");
    }
}

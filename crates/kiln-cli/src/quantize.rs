//! `kiln quantize in.onnx out.onnx [--mode int8-weight|dynamic-int8|int4-weight|fp16] [--min-elements N]`:
//! rewrites MatMul/Gemm weights to int8 with one scale per output channel and prints what it
//! quantized with the weight bytes before and after. Every mode writes standard ONNX that
//! onnxruntime runs: `int8-weight` puts `DequantizeLinear` before the weights (activations and
//! products stay float); `dynamic-int8` quantizes MatMul activations at run time
//! (DynamicQuantizeLinear) and multiplies in integers (MatMulInteger), the form of onnxruntime's
//! `quantize_dynamic`; `int4-weight` stores MatMul weights as 4-bit codes with a scale and zero
//! point per `--block-size` values along K (`com.microsoft::MatMulNBits`, the form of onnxruntime's
//! `MatMul4BitsQuantizer` and its int4 LLM builds); `fp16` converts the graph to f16 weights and compute with the model's inputs
//! and outputs and the overflow-prone ops kept f32 behind Casts (the conversion `kiln optimize
//! --precision fp16` and fp16 sessions use, without optimizing the graph; docs/precision.md);
//! `static-int8 --calibration DIR` measures activation ranges on the samples in DIR (minmax,
//! percentile or entropy) and writes QDQ (int8 per-channel weights, u8 activations, int32 Conv
//! biases: onnxruntime `quantize_static`'s default form).
//!
//! Every mode then compares the written model with the original on the calibration samples (or on
//! synthesized inputs): per output the largest and mean absolute difference and the cosine
//! similarity, top-1 agreement for `[N, classes]` outputs, and Kiln's latency of both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln::internals::onnx;
use kiln::{Level, Session, TensorData};

/// One full set of model inputs.
type Sample = Vec<(String, TensorData)>;

/// Settings of one `kiln quantize` run.
pub struct QuantizeConfig {
    pub mode: String,
    pub min_elements: usize,
    /// `int4-weight`: values per block along K.
    pub block_size: usize,
    /// `static-int8`: the folder of calibration samples.
    pub calibration: Option<PathBuf>,
    /// `static-int8`: minmax, percentile[=P] or entropy.
    pub method: String,
    /// `static-int8`: op types or node names left in f32.
    pub exclude: Vec<String>,
    /// Skip the comparison with the original.
    pub no_report: bool,
}

pub fn quantize(input: &Path, output: &Path, cfg: &QuantizeConfig) -> Result<()> {
    let mode = cfg.mode.as_str();
    match mode {
        "int8-weight" | "int8" | "dynamic-int8" | "int4-weight" | "int4" | "static-int8" => {}
        "fp16" | "float16" => {
            to_fp16(input, output)?;
            return compare(input, output, &samples_or_none(cfg)?, cfg);
        }
        other => bail!("unknown --mode '{other}' (int8-weight, dynamic-int8, static-int8, int4-weight, fp16)"),
    }
    let samples = samples_or_none(cfg)?;
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let report = match mode {
        "dynamic-int8" => kiln::quantize::quantize_model_dynamic(&mut model, cfg.min_elements),
        "int4-weight" | "int4" => kiln::quantize::quantize_model_int4(&mut model, cfg.min_elements, cfg.block_size),
        "static-int8" => {
            let Some(samples) = &samples else {
                bail!("--mode static-int8 needs --calibration DIR (a folder of NAME.npy files, or of sample folders)");
            };
            let method: kiln::quantize::Calibration = cfg.method.parse().map_err(anyhow::Error::msg)?;
            let passes = if method == kiln::quantize::Calibration::MinMax {
                1
            } else {
                2
            };
            let bar = progress_bar((samples.len() * passes) as u64, "calibrating");
            let r = kiln::quantize::quantize_model_static(&mut model, samples, method, &cfg.exclude, &mut |n| {
                bar.set_position(n as u64)
            });
            bar.finish_and_clear();
            r
        }
        _ => kiln::quantize::quantize_model(&mut model, cfg.min_elements, true),
    }
    .context("quantizing the weights")?;
    let kind = if mode.starts_with("int4") { "int4" } else { "int8" };
    let bytes = onnx::export_model_bytes(&model).context("exporting the quantized model")?;
    crate::output::write(output, &bytes)?;

    for w in &report.weights {
        let readers = if w.readers > 1 {
            format!(", {} readers", w.readers)
        } else {
            String::new()
        };
        outln!("{kind}  {:?} axis {}  {}{readers}", w.dims, w.axis, w.name);
    }
    for (name, why) in &report.skipped {
        outln!("f32   {name}: {why}");
    }
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    outln!(
        "quantized {} weight(s): {:.2} MiB -> {:.2} MiB ({:.1}x smaller)",
        report.weights.len(),
        mib(report.bytes_before),
        mib(report.bytes_after),
        report.bytes_before as f64 / report.bytes_after.max(1) as f64
    );
    wrote(input, output, bytes.len())?;
    compare(input, output, &samples, cfg)
}

/// `--mode fp16`: the fp16 conversion alone, with its report and the file sizes.
fn to_fp16(input: &Path, output: &Path) -> Result<()> {
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let report = kiln::convert_model_to_float16(&mut model).context("converting to fp16")?;
    let bytes = onnx::export_model_bytes(&model).context("exporting the fp16 model")?;
    crate::output::write(output, &bytes)?;
    outln!("{report}");
    wrote(input, output, bytes.len())
}

/// The closing line: the written file's size beside the input's.
fn wrote(input: &Path, output: &Path, len: usize) -> Result<()> {
    let before = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    outln!("wrote {} ({len} bytes; input {before} bytes)", output.display());
    Ok(())
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} runs")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

fn samples_or_none(cfg: &QuantizeConfig) -> Result<Option<Vec<Sample>>> {
    cfg.calibration.as_deref().map(load_samples).transpose()
}

/// Calibration samples from `dir`: its `NAME.npy` files are one sample (input NAME); or each of its
/// subfolders (in name order) holds the `NAME.npy` files of one sample.
pub fn load_samples(dir: &Path) -> Result<Vec<Sample>> {
    let read_one = |d: &Path| -> Result<Sample> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("reading {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let name = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok((name.clone(), crate::npy::read(f, &name)?))
            })
            .collect()
    };
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the calibration folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    let samples: Vec<Sample> = if subdirs.is_empty() {
        vec![read_one(dir)?]
    } else {
        subdirs.iter().map(|d| read_one(d)).collect::<Result<_>>()?
    };
    if samples.iter().any(|s| s.is_empty()) {
        bail!("{}: a calibration sample without .npy files", dir.display());
    }
    Ok(samples)
}

/// Compares the written model with the original on up to 8 samples (or synthesized inputs):
/// accuracy per output and Kiln's latency of both (interleaved runs, medians). The model is
/// written by then: when the comparison cannot run (synthesized inputs a model rejects), it says
/// why on stderr and the command still succeeds.
fn compare(input: &Path, output: &Path, samples: &Option<Vec<Sample>>, cfg: &QuantizeConfig) -> Result<()> {
    if cfg.no_report {
        return Ok(());
    }
    if let Err(e) = try_compare(input, output, samples) {
        eprintln!("no comparison with the original: {e:#} (give real inputs with --calibration DIR, or --no-report)");
    }
    Ok(())
}

fn try_compare(input: &Path, output: &Path, samples: &Option<Vec<Sample>>) -> Result<()> {
    let build = |p: &Path| {
        Session::builder()
            .optimization(Level::All)
            .build_from_file(p)
            .with_context(|| format!("loading {} in Kiln", p.display()))
    };
    let (before, after) = (build(input)?, build(output)?);
    let eval: Vec<Sample> = match samples {
        Some(s) => s.iter().take(8).cloned().collect(),
        None => vec![crate::bench::feeds(&before, &[], &[])?.feeds],
    };
    let source = if samples.is_some() {
        "calibration samples"
    } else {
        "synthesized inputs"
    };
    let bar = progress_bar(eval.len() as u64, "comparing");
    let mut per_output: Vec<Agreement> = before.outputs().iter().map(|o| Agreement::new(&o.name)).collect();
    for s in &eval {
        let (a, b) = (before.run(s.clone())?, after.run(s.clone())?);
        for ((agg, x), y) in per_output.iter_mut().zip(&a).zip(&b) {
            agg.add(x, y);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    outln!("accuracy against the original ({} {source}):", eval.len());
    for a in &per_output {
        outln!("  {a}");
    }
    // Latency: alternate the two, 3 warm-up and 15 timed runs each on the first sample.
    let first = &eval[0];
    let mut times = (Vec::new(), Vec::new());
    for i in 0..18 {
        for (session, t) in [(&before, &mut times.0), (&after, &mut times.1)] {
            let start = Instant::now();
            session.run(first.clone())?;
            if i >= 3 {
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, a) = (median(&mut times.0), median(&mut times.1));
    outln!(
        "Kiln latency (level all, {} threads, median of 15): {b:.3} ms -> {a:.3} ms ({:.2}x)",
        kiln::num_threads(),
        b / a.max(1e-9)
    );
    Ok(())
}

/// How one output of the written model agrees with the original's.
struct Agreement {
    name: String,
    max_abs: f64,
    sum_abs: f64,
    count: usize,
    dot: f64,
    norm_a: f64,
    norm_b: f64,
    top1: (usize, usize),
    note: Option<String>,
}

impl Agreement {
    fn new(name: &str) -> Self {
        Agreement {
            name: name.to_string(),
            max_abs: 0.0,
            sum_abs: 0.0,
            count: 0,
            dot: 0.0,
            norm_a: 0.0,
            norm_b: 0.0,
            top1: (0, 0),
            note: None,
        }
    }

    fn add(&mut self, a: &TensorData, b: &TensorData) {
        let as_f64 = |t: &TensorData| -> Option<Vec<f64>> {
            match t.dtype {
                kiln::DType::F32 => t.values::<f32>().map(|v| v.into_iter().map(f64::from).collect()),
                kiln::DType::F16 => t.values::<half::f16>().map(|v| v.into_iter().map(f64::from).collect()),
                kiln::DType::F64 => t.values::<f64>(),
                kiln::DType::I64 => t.values::<i64>().map(|v| v.into_iter().map(|x| x as f64).collect()),
                kiln::DType::I32 => t.values::<i32>().map(|v| v.into_iter().map(f64::from).collect()),
                _ => None,
            }
        };
        let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) else {
            self.note = Some(format!("{} vs {}: not compared", a.dtype, b.dtype));
            return;
        };
        if a.dims != b.dims {
            self.note = Some(format!("shape {:?} vs {:?}", a.dims, b.dims));
            return;
        }
        for (p, q) in x.iter().zip(&y) {
            let d = (p - q).abs();
            self.max_abs = self.max_abs.max(d);
            self.sum_abs += d;
            self.dot += p * q;
            self.norm_a += p * p;
            self.norm_b += q * q;
        }
        self.count += x.len();
        // Classifier-shaped output: [N, classes].
        if let [n, c] = a.dims[..] {
            if c > 1 {
                let argmax = |v: &[f64]| (0..c).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap_or(0);
                for r in 0..n {
                    let same = argmax(&x[r * c..][..c]) == argmax(&y[r * c..][..c]);
                    self.top1 = (self.top1.0 + usize::from(same), self.top1.1 + 1);
                }
            }
        }
    }
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(note) = &self.note {
            return write!(f, "{}: {note}", self.name);
        }
        let cosine = if self.norm_a > 0.0 && self.norm_b > 0.0 {
            self.dot / (self.norm_a.sqrt() * self.norm_b.sqrt())
        } else if self.norm_a == self.norm_b {
            1.0
        } else {
            0.0
        };
        write!(
            f,
            "{}: max abs diff {:.3e}, mean abs diff {:.3e}, cosine {:.6}",
            self.name,
            self.max_abs,
            self.sum_abs / self.count.max(1) as f64,
            cosine
        )?;
        if self.top1.1 > 0 {
            write!(f, ", top-1 agreement {}/{}", self.top1.0, self.top1.1)?;
        }
        Ok(())
    }
}

//! Kiln against ONNX Runtime (the `ort` crate, loading the library from the pinned onnxruntime wheel), tract-onnx
//! and candle-onnx on the real models of `models/fetch.sh` / `models/make_bert.py` / `models/make_zoo.py`, with the
//! same inputs and the same thread count for every engine.
//!
//! Threads: [`set_threads`] must run first in the process. It sets `RAYON_NUM_THREADS` (candle's CPU matmul reads it
//! on every call, for Kiln and candle-onnx alike), builds rayon's global pool with that many threads (Kiln's own
//! kernels), gives tract a pool of that size for its matmuls, and ONNX Runtime sessions get it as intra-op threads
//! (inter-op 1, sequential execution).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Element data of one input tensor.
#[derive(Debug, Clone)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One named input tensor, row-major.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Data,
}

/// A real model and how to feed it.
pub struct ModelSpec {
    /// Short label for tables.
    pub label: &'static str,
    /// File name in the models directory.
    pub file: &'static str,
    /// Batch sizes measured by default (the model's batch dimension is dynamic in all of these).
    pub batches: &'static [usize],
    /// What one sample is (for the docs).
    pub sample: &'static str,
    /// Deterministic inputs for a batch size.
    pub make_inputs: fn(usize) -> Vec<Input>,
}

const TEXT_SEQ: usize = 64;

/// Small deterministic generator (xorshift), so inputs do not depend on a rand crate's version.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn text_inputs(batch: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0001);
    let mut ids = Vec::with_capacity(batch * TEXT_SEQ);
    for _ in 0..batch {
        ids.push(101);
        for _ in 1..TEXT_SEQ - 1 {
            ids.push(1000 + (rng.next_u64() % 29000) as i64);
        }
        ids.push(102);
    }
    vec![
        Input {
            name: "input_ids".into(),
            dims: vec![batch, TEXT_SEQ],
            data: Data::I64(ids),
        },
        Input {
            name: "attention_mask".into(),
            dims: vec![batch, TEXT_SEQ],
            data: Data::I64(vec![1; batch * TEXT_SEQ]),
        },
    ]
}

fn image_inputs(batch: usize, h: usize, w: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0002);
    let data = (0..batch * 3 * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
    vec![Input {
        name: "x".into(),
        dims: vec![batch, 3, h, w],
        data: Data::F32(data),
    }]
}

/// A grayscale text line for `zoo-crnn`: [batch, 1, 32, 320].
fn text_line_inputs(batch: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0004);
    let (h, w) = (32, 320);
    let data = (0..batch * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
    vec![Input {
        name: "x".into(),
        dims: vec![batch, 1, h, w],
        data: Data::F32(data),
    }]
}

fn vad_inputs(batch: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0003);
    let samples = 576; // 512 new samples at 16 kHz plus 64 of context
    let audio = (0..batch * samples)
        .map(|i| 0.5 * ((i % samples) as f32 * 0.07).sin() + 0.05 * (rng.unit() - 0.5))
        .collect();
    vec![
        Input {
            name: "input".into(),
            dims: vec![batch, samples],
            data: Data::F32(audio),
        },
        Input {
            name: "state".into(),
            dims: vec![2, batch, 128],
            data: Data::F32(vec![0.0; 2 * batch * 128]),
        },
        Input {
            name: "sr".into(),
            dims: vec![],
            data: Data::I64(vec![16000]),
        },
    ]
}

/// 16 kHz audio for `zoo-wav2vec2-frontend`: one second per sample, [batch, 16000].
fn speech_inputs(batch: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0005);
    let samples = 16000;
    let audio = (0..batch * samples)
        .map(|i| 0.5 * ((i % samples) as f32 * 0.05).sin() + 0.05 * (rng.unit() - 0.5))
        .collect();
    vec![Input {
        name: "x".into(),
        dims: vec![batch, samples],
        data: Data::F32(audio),
    }]
}

/// 32 source and 32 target token ids (vocabulary 1000) for `zoo-gru-seq2seq`.
fn seq2seq_inputs(batch: usize) -> Vec<Input> {
    let mut rng = Rng(0x5eed_0006);
    let len = 32;
    let mut ids = || (0..batch * len).map(|_| (rng.next_u64() % 1000) as i64).collect();
    vec![
        Input {
            name: "src".into(),
            dims: vec![batch, len],
            data: Data::I64(ids()),
        },
        Input {
            name: "tgt".into(),
            dims: vec![batch, len],
            data: Data::I64(ids()),
        },
    ]
}

/// The benchmarked models (the `zoo-*` CNNs come from `models/make_zoo.py`). BERT-base, the OCR models and the
/// CNNs stop at batch 8 by default (one batch-32 run takes seconds per engine on a 2-core machine); `--batches`
/// overrides.
pub fn models() -> Vec<ModelSpec> {
    vec![
        ModelSpec {
            label: "paraphrase-MiniLM-L3-v2",
            file: "paraphrase-MiniLM-L3-v2.onnx",
            batches: &[1, 8, 32],
            sample: "64 tokens",
            make_inputs: text_inputs,
        },
        ModelSpec {
            label: "bert-base (random weights)",
            file: "bert-base.onnx",
            batches: &[1, 8],
            sample: "64 tokens",
            make_inputs: text_inputs,
        },
        ModelSpec {
            label: "MiniLM-L3 dynamic int8 (ORT quantize_dynamic)",
            file: "paraphrase-MiniLM-L3-v2.dyn-int8.onnx",
            batches: &[1, 8, 32],
            sample: "64 tokens",
            make_inputs: text_inputs,
        },
        ModelSpec {
            label: "bert-base dynamic int8 (ORT quantize_dynamic)",
            file: "bert-base.dyn-int8.onnx",
            batches: &[1, 8],
            sample: "64 tokens",
            make_inputs: text_inputs,
        },
        ModelSpec {
            label: "PP-OCRv4 det",
            file: "ch_PP-OCRv4_det_infer.onnx",
            batches: &[1, 8],
            sample: "3x320x320 image",
            make_inputs: |b| image_inputs(b, 320, 320),
        },
        ModelSpec {
            label: "PP-OCRv4 rec",
            file: "ch_PP-OCRv4_rec_infer.onnx",
            batches: &[1, 8],
            sample: "3x48x320 image",
            make_inputs: |b| image_inputs(b, 48, 320),
        },
        ModelSpec {
            label: "Silero VAD v5",
            file: "silero_vad.onnx",
            batches: &[1, 8, 32],
            sample: "576 samples at 16 kHz + state",
            make_inputs: vad_inputs,
        },
        ModelSpec {
            label: "MobileNetV2 (zoo, random weights)",
            file: "zoo-mobilenetv2.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "MobileNetV3-Small (zoo, random weights)",
            file: "zoo-mobilenetv3-small.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "EfficientNet-B0 (zoo, random weights)",
            file: "zoo-efficientnet-b0.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "ShuffleNetV2 x1.0 (zoo, random weights)",
            file: "zoo-shufflenetv2.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "ResNet-18 (zoo, random weights)",
            file: "zoo-resnet18.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "YOLO tiny, YOLOv8n-sized (zoo, random weights)",
            file: "zoo-yolo-tiny.onnx",
            batches: &[1, 8],
            sample: "3x320x320 image",
            make_inputs: |b| image_inputs(b, 320, 320),
        },
        ModelSpec {
            label: "CRNN, BiLSTM + BiGRU (zoo, random weights)",
            file: "zoo-crnn.onnx",
            batches: &[1, 8],
            sample: "1x32x320 text line",
            make_inputs: text_line_inputs,
        },
        ModelSpec {
            label: "ResNet-50 (zoo, random weights)",
            file: "zoo-resnet50.onnx",
            batches: &[1, 8],
            sample: "3x224x224 image",
            make_inputs: |b| image_inputs(b, 224, 224),
        },
        ModelSpec {
            label: "ViT-Tiny/16 (zoo, random weights)",
            file: "zoo-vit-tiny.onnx",
            batches: &[1, 8],
            sample: "3x96x96 image",
            make_inputs: |b| image_inputs(b, 96, 96),
        },
        ModelSpec {
            label: "wav2vec 2.0 conv front end (zoo, random weights)",
            file: "zoo-wav2vec2-frontend.onnx",
            batches: &[1, 8],
            sample: "1 s of 16 kHz audio",
            make_inputs: speech_inputs,
        },
        ModelSpec {
            label: "GRU encoder-decoder (zoo, random weights)",
            file: "zoo-gru-seq2seq.onnx",
            batches: &[1, 8],
            sample: "32 source + 32 target tokens",
            make_inputs: seq2seq_inputs,
        },
    ]
}

/// Configures every engine for `n` threads; call once, before any engine runs.
pub fn set_threads(n: usize) -> Result<()> {
    let n = n.max(1);
    // Called at start-up, before any other thread exists that could read the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow!("rayon global pool: {e}"))?;
    if n > 1 {
        tract_linalg::multithread::set_default_executor(tract_linalg::multithread::Executor::multithread(n));
    }
    THREADS.set(n).map_err(|_| anyhow!("set_threads called twice"))?;
    Ok(())
}

static THREADS: OnceLock<usize> = OnceLock::new();

fn threads() -> usize {
    THREADS.get().copied().unwrap_or(1)
}

/// A model loaded by one engine with its inputs bound, ready to run repeatedly.
pub trait Prepared {
    fn run(&mut self) -> Result<()>;
}

/// One inference engine.
pub trait Engine {
    fn name(&self) -> &'static str;
    fn prepare(&self, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>>;
}

/// All engines, Kiln first.
pub fn engines(ort_library: Option<PathBuf>) -> Vec<Box<dyn Engine>> {
    vec![
        Box::new(KilnEngine),
        Box::new(OrtEngine { library: ort_library }),
        Box::new(TractEngine),
        Box::new(CandleEngine),
    ]
}

// ---- Kiln ------------------------------------------------------------------------------------

pub struct KilnEngine;

struct KilnPrepared {
    session: kiln::Session,
    feeds: Vec<(String, kiln::TensorData)>,
}

fn kiln_feeds(inputs: &[Input]) -> Result<Vec<(String, kiln::TensorData)>> {
    inputs
        .iter()
        .map(|i| {
            let t = match &i.data {
                Data::F32(v) => kiln::TensorData::from_values(&i.name, i.dims.clone(), v),
                Data::I64(v) => kiln::TensorData::from_values(&i.name, i.dims.clone(), v),
            }?;
            Ok((i.name.clone(), t))
        })
        .collect()
}

impl KilnEngine {
    /// A Kiln session at `Level::All` with the inputs bound.
    pub fn session(model: &Path) -> Result<kiln::Session> {
        Ok(kiln::Session::builder()
            .optimization(kiln::Level::All)
            .build_from_file(model)?)
    }

    /// Peak activation bytes and the sum of all intermediates for one run.
    pub fn memory(model: &Path, inputs: &[Input]) -> Result<kiln::RunStats> {
        let session = Self::session(model)?;
        Ok(session.run_with_stats(kiln_feeds(inputs)?)?.1)
    }
}

impl Engine for KilnEngine {
    fn name(&self) -> &'static str {
        "Kiln"
    }
    fn prepare(&self, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(KilnPrepared {
            session: Self::session(model)?,
            feeds: kiln_feeds(inputs)?,
        }))
    }
}

impl Prepared for KilnPrepared {
    fn run(&mut self) -> Result<()> {
        self.session.run(self.feeds.clone())?;
        Ok(())
    }
}

// ---- ONNX Runtime --------------------------------------------------------------------------

pub struct OrtEngine {
    library: Option<PathBuf>,
}

/// The onnxruntime shared library of the pinned wheel in the venv of `scripts/setup-python.sh`.
pub fn default_ort_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
    let lib = cache.join("venv-v1/lib");
    let entries = std::fs::read_dir(&lib).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0"))
        .find(|p| p.is_file())
}

static ORT_ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

fn ort_env(library: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    let env = ORT_ENV.get_or_init(|| {
        let lib = library.ok_or_else(|| "libonnxruntime.so.1.32.0 not found (set ORT_DYLIB_PATH)".to_string())?;
        let builder = ort::init_from(lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        builder.build().map_err(|e| format!("ort environment: {e}"))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

struct OrtPrepared {
    session: ort::session::Session,
    feeds: Vec<(String, ort::value::DynValue)>,
}

impl Engine for OrtEngine {
    fn name(&self) -> &'static str {
        "ORT"
    }
    fn prepare(&self, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>> {
        let env = ort_env(self.library.as_deref())?;
        let session = ort::session::Session::builder(env)
            .map_err(|e| anyhow!("{e}"))?
            .with_intra_threads(threads())
            .map_err(|e| anyhow!("{e}"))?
            .with_inter_threads(1)
            .map_err(|e| anyhow!("{e}"))?
            .commit_from_file(model)
            .map_err(|e| anyhow!("{e}"))?;
        let mut feeds = Vec::new();
        for i in inputs {
            let shape: Vec<i64> = i.dims.iter().map(|&d| d as i64).collect();
            let v = match &i.data {
                Data::F32(v) => ort::value::Tensor::from_array((shape, v.clone()))?.into_dyn(),
                Data::I64(v) => ort::value::Tensor::from_array((shape, v.clone()))?.into_dyn(),
            };
            feeds.push((i.name.clone(), v));
        }
        Ok(Box::new(OrtPrepared { session, feeds }))
    }
}

impl Prepared for OrtPrepared {
    fn run(&mut self) -> Result<()> {
        let inputs: Vec<(&str, &ort::value::DynValue)> = self.feeds.iter().map(|(n, v)| (n.as_str(), v)).collect();
        self.session.run(inputs).map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

// ---- tract -------------------------------------------------------------------------------------

pub struct TractEngine;

struct TractPrepared {
    plan: std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>,
    feeds: Vec<tract_onnx::prelude::Tensor>,
}

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        "tract"
    }
    fn prepare(&self, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>> {
        use tract_onnx::prelude::*;
        let tract_err = |e: TractError| anyhow!("{e:#}");
        let mut m = tract_onnx::onnx().model_for_path(model).map_err(tract_err)?;
        let names: Vec<String> = m
            .input_outlets()
            .map_err(tract_err)?
            .iter()
            .map(|o| m.node(o.node).name.clone())
            .collect();
        let mut feeds = Vec::new();
        for (ix, name) in names.iter().enumerate() {
            let input = inputs
                .iter()
                .find(|i| &i.name == name)
                .with_context(|| format!("no bench input for model input '{name}'"))?;
            let t = match &input.data {
                Data::F32(v) => Tensor::from_shape::<f32>(&input.dims, v),
                Data::I64(v) => Tensor::from_shape::<i64>(&input.dims, v),
            }
            .map_err(tract_err)?;
            m = m
                .with_input_fact(ix, InferenceFact::dt_shape_from_tensor(&t))
                .map_err(tract_err)?;
            feeds.push(t);
        }
        let plan = m
            .into_optimized()
            .map_err(tract_err)?
            .into_runnable()
            .map_err(tract_err)?;
        Ok(Box::new(TractPrepared { plan, feeds }))
    }
}

impl Prepared for TractPrepared {
    fn run(&mut self) -> Result<()> {
        use tract_onnx::prelude::*;
        let inputs: TVec<TValue> = self.feeds.iter().map(|t| t.clone().into()).collect();
        self.plan.run(inputs).map_err(|e| anyhow!("{e:#}"))?;
        Ok(())
    }
}

// ---- candle-onnx -------------------------------------------------------------------------------

pub struct CandleEngine;

#[cfg(feature = "candle-baseline")]
struct CandlePrepared {
    model: candle_onnx::onnx::ModelProto,
    feeds: std::collections::HashMap<String, candle_core::Tensor>,
}

impl Engine for CandleEngine {
    fn name(&self) -> &'static str {
        "candle-onnx"
    }
    #[cfg(not(feature = "candle-baseline"))]
    fn prepare(&self, _model: &Path, _inputs: &[Input]) -> Result<Box<dyn Prepared>> {
        bail!("not built (cargo --features candle-baseline; needs protoc)")
    }
    #[cfg(feature = "candle-baseline")]
    fn prepare(&self, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>> {
        let model = candle_onnx::read_file(model)?;
        let device = candle_core::Device::Cpu;
        let mut feeds = std::collections::HashMap::new();
        for i in inputs {
            let t = match &i.data {
                Data::F32(v) => candle_core::Tensor::from_slice(v, i.dims.as_slice(), &device)?,
                Data::I64(v) => candle_core::Tensor::from_slice(v, i.dims.as_slice(), &device)?,
            };
            feeds.insert(i.name.clone(), t);
        }
        Ok(Box::new(CandlePrepared { model, feeds }))
    }
}

#[cfg(feature = "candle-baseline")]
impl Prepared for CandlePrepared {
    fn run(&mut self) -> Result<()> {
        candle_onnx::simple_eval(&self.model, self.feeds.clone())?;
        Ok(())
    }
}

// ---- measuring ---------------------------------------------------------------------------------

/// How long to measure one (model, batch, engine) cell.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub min_runs: usize,
    pub max_runs: usize,
    pub time: Duration,
}

/// A cell's result: the median run time, or why the engine could not run the model.
#[derive(Debug, Clone)]
pub enum Outcome {
    Median { median: Duration, runs: usize },
    Fails(String),
}

fn first_line(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let line = s.lines().next().unwrap_or("").trim().to_string();
    if line.chars().count() > 90 {
        format!("{}...", line.chars().take(90).collect::<String>())
    } else {
        line
    }
}

fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            bail!("panicked in {what}: {msg}")
        }
    }
}

/// Prepares the model on `engine` and runs it once (warm-up); a panic inside the engine becomes an error.
pub fn prepare_checked(engine: &dyn Engine, model: &Path, inputs: &[Input]) -> Result<Box<dyn Prepared>> {
    let mut p = guarded("prepare", || engine.prepare(model, inputs))?;
    guarded("run", || p.run())?;
    Ok(p)
}

/// Prepares the model on `engine`, runs it once (warm-up), then at least `min_runs` times and until `time` has
/// passed or `max_runs` are done; returns the median.
pub fn measure(engine: &dyn Engine, model: &Path, inputs: &[Input], budget: Budget) -> Outcome {
    let r = prepare_checked(engine, model, inputs).and_then(|mut p| {
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < budget.min_runs || (start.elapsed() < budget.time && times.len() < budget.max_runs) {
            let t = Instant::now();
            guarded("run", || p.run())?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok((times[times.len() / 2], times.len()))
    });
    match r {
        Ok((median, runs)) => Outcome::Median { median, runs },
        Err(e) => Outcome::Fails(first_line(&e)),
    }
}

/// Measures several engines on one cell with their runs interleaved (per round, each engine runs
/// once untimed and once timed), so load from other processes on a shared machine falls on every engine alike and the
/// ratios stay meaningful. Every engine is prepared and warmed up first; rounds continue until each
/// working engine has `min_runs` runs and then until `time` per engine has passed or `max_runs` rounds
/// are done. `None` in `engines` skips that slot (reported as not run).
pub fn measure_interleaved(
    engines: &[Option<&dyn Engine>],
    model: &Path,
    inputs: &[Input],
    budget: Budget,
) -> Vec<Outcome> {
    let mut prepared: Vec<Result<Box<dyn Prepared>, String>> = engines
        .iter()
        .map(|e| match e {
            Some(e) => prepare_checked(*e, model, inputs).map_err(|err| first_line(&err)),
            None => Err("not run".to_string()),
        })
        .collect();
    let working = prepared.iter().filter(|p| p.is_ok()).count().max(1);
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); engines.len()];
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < budget.min_runs || (start.elapsed() < budget.time * working as u32 && rounds < budget.max_runs) {
        for (slot, p) in prepared.iter_mut().enumerate() {
            let Ok(run) = p else { continue };
            // One untimed run first: the previous engine's thread pool may still be spinning (ORT's and
            // candle's workers spin for a while after a run), which would otherwise land on this engine.
            if let Err(e) = guarded("run", || run.run()) {
                *p = Err(first_line(&e));
                continue;
            }
            let t = Instant::now();
            match guarded("run", || run.run()) {
                Ok(()) => times[slot].push(t.elapsed()),
                Err(e) => *p = Err(first_line(&e)),
            }
        }
        rounds += 1;
    }
    prepared
        .into_iter()
        .zip(times)
        .map(|(p, mut t)| match p {
            Err(e) => Outcome::Fails(e),
            Ok(_) if t.is_empty() => Outcome::Fails("no runs".into()),
            Ok(_) => {
                t.sort();
                Outcome::Median {
                    median: t[t.len() / 2],
                    runs: t.len(),
                }
            }
        })
        .collect()
}

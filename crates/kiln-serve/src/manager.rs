//! The model manager: which versions of which models are loaded, loading and swapping them,
//! and the protocol-independent inference entry point every protocol calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kiln::{IoInfo, Session, TensorData};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::batcher::{BatcherConfig, DynamicBatcher, Job};
use crate::cache::{cache_key, ResponseCache};
use crate::config::{ModelConfig, ResolvedConfig};
use crate::error::{ErrorKind, Result, ServeError};
use crate::infer::{InferRequest, InferResponse};
use crate::metrics::{FailureReason, Metrics, ModelMetrics};
use crate::repository::{self, FileSig, VersionSig};

/// State of a model version, as the repository index reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Ready,
    Unavailable,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Ready => "READY",
            VersionState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    /// `None` for a model-level problem (unreadable config) or a model without versions.
    pub version: Option<u64>,
    pub state: VersionState,
    pub reason: String,
}

/// A loaded model version: its session runs on the batcher's worker threads.
pub struct ServedVersion {
    pub model: String,
    pub version: u64,
    /// Inputs a request must feed, in model order.
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub config: Arc<ResolvedConfig>,
    /// Tensor models: the dynamic batcher over the model's workers (`None` for an LLM).
    batcher: Option<DynamicBatcher>,
    /// `[llm]` models: the generation engine.
    pub llm: Option<Arc<crate::llm::ServedLlm>>,
    cache: Option<ResponseCache>,
    metrics: ModelMetrics,
    signature: VersionSig,
}

impl Drop for ServedVersion {
    fn drop(&mut self) {
        info!(model = %self.model, version = self.version, "version unloaded (no request holds it any more)");
    }
}

impl ServedVersion {
    pub fn max_batch_size(&self) -> usize {
        self.config.raw.max_batch_size
    }

    pub fn batcher_config(&self) -> Option<&BatcherConfig> {
        self.batcher.as_ref().map(|b| b.config())
    }

    /// Whether a model worker is alive to run this version's requests.
    pub fn is_ready(&self) -> bool {
        match &self.batcher {
            Some(b) => b.is_ready(),
            None => self.llm.is_some(),
        }
    }

    /// Runs one request: checks it, answers from the cache or queues it, and waits.
    async fn infer(&self, req: InferRequest) -> Result<InferResponse> {
        let started = Instant::now();
        let result = self.infer_inner(req).await;
        let m = &self.metrics;
        let elapsed = started.elapsed();
        m.request_duration_us.inc_by(elapsed.as_micros() as u64);
        match &result {
            Ok(_) => {
                m.success.inc();
                m.latency.observe(elapsed.as_secs_f64());
            }
            Err(e) => m.failed(match e.kind() {
                ErrorKind::InvalidInput | ErrorKind::Unavailable | ErrorKind::NotFound => FailureReason::Rejected,
                ErrorKind::Timeout | ErrorKind::Internal => FailureReason::Backend,
            }),
        }
        result
    }

    async fn infer_inner(&self, req: InferRequest) -> Result<InferResponse> {
        let Some(batcher) = &self.batcher else {
            return Err(ServeError::invalid(format!(
                "model '{}' is an LLM: use POST /v1/completions or /v1/chat/completions",
                self.model
            )));
        };
        let (inputs, rows) = self.check_inputs(req.inputs)?;
        let selected = self.select_outputs(&req.outputs)?;
        let key = self
            .cache
            .as_ref()
            .map(|_| cache_key(&self.model, self.version, &inputs));
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            if let Some(hit) = cache.get(key) {
                self.metrics.cache_hits.inc();
                return Ok(self.response(req.id, &hit, &selected, true));
            }
            self.metrics.cache_misses.inc();
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let timeout = self.config.request_timeout;
        batcher.submit(Job {
            inputs,
            rows,
            enqueued: now,
            deadline: timeout.map(|t| now + t),
            reply: tx,
        })?;
        let reply = match timeout {
            // The worker drops requests still queued at the deadline; this bounds the wait
            // for one that started just before it.
            Some(t) => tokio::time::timeout(t + Duration::from_secs(30).min(t * 4), rx)
                .await
                .map_err(|_| ServeError::Timeout(t))?,
            None => rx.await,
        };
        let out = reply.map_err(|_| ServeError::Execution {
            model: self.model.clone(),
            version: self.version,
            reason: "internal error: the model worker failed while running this request (it carries on)".into(),
        })??;
        self.metrics.queue_duration_us.inc_by(out.queue.as_micros() as u64);
        let outputs = Arc::new(out.outputs);
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, outputs.clone());
        }
        Ok(self.response(req.id, &outputs, &selected, false))
    }

    fn response(&self, id: Option<String>, outputs: &[TensorData], selected: &[usize], cached: bool) -> InferResponse {
        InferResponse {
            model: self.model.clone(),
            version: self.version,
            id,
            outputs: selected.iter().filter_map(|&i| outputs.get(i).cloned()).collect(),
            cached,
        }
    }

    /// Checks names, dtypes, shapes and batch dims; returns inputs in model order and the
    /// request's batch rows (0 without a batch dim).
    fn check_inputs(&self, given: Vec<TensorData>) -> Result<(Vec<TensorData>, usize)> {
        let mut by_name: HashMap<String, TensorData> = HashMap::with_capacity(given.len());
        for t in given {
            if by_name.contains_key(&t.name) {
                return Err(ServeError::invalid(format!("input '{}' is given twice", t.name)));
            }
            by_name.insert(t.name.clone(), t);
        }
        let names = || {
            self.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let max_batch = self.max_batch_size();
        let mut rows: Option<usize> = None;
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for info in &self.inputs {
            let t = by_name.remove(&info.name).ok_or_else(|| {
                ServeError::invalid(format!(
                    "missing input '{}' (model '{}' expects: {})",
                    info.name,
                    self.model,
                    names()
                ))
            })?;
            if let Some(d) = info.dtype {
                if d != t.dtype {
                    return Err(ServeError::invalid(format!(
                        "input '{}': expected datatype {}, got {}",
                        info.name,
                        crate::protocols::datatype_name(d).unwrap_or(d.name()),
                        crate::protocols::datatype_name(t.dtype).unwrap_or(t.dtype.name()),
                    )));
                }
            }
            if let Some(s) = &info.shape {
                if !s.accepts(&t.dims) {
                    return Err(ServeError::invalid(format!(
                        "input '{}': shape {:?} does not match the model's shape {s}",
                        info.name, t.dims
                    )));
                }
            }
            if max_batch > 0 {
                let r = *t.dims.first().ok_or_else(|| {
                    ServeError::invalid(format!(
                        "input '{}' needs a batch dim (max_batch_size {max_batch})",
                        info.name
                    ))
                })?;
                if r == 0 || r > max_batch {
                    return Err(ServeError::invalid(format!(
                        "input '{}': batch size {r} is outside 1..={max_batch}",
                        info.name
                    )));
                }
                if rows.is_some_and(|x| x != r) {
                    return Err(ServeError::invalid(
                        "inputs disagree on the batch size (dim 0)".to_string(),
                    ));
                }
                rows = Some(r);
            }
            ordered.push(t);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(ServeError::invalid(format!(
                "unknown input '{extra}' (model '{}' expects: {})",
                self.model,
                names()
            )));
        }
        Ok((ordered, rows.unwrap_or(0)))
    }

    fn select_outputs(&self, wanted: &[String]) -> Result<Vec<usize>> {
        if wanted.is_empty() {
            return Ok((0..self.outputs.len()).collect());
        }
        wanted
            .iter()
            .map(|name| {
                self.outputs.iter().position(|o| &o.name == name).ok_or_else(|| {
                    let known: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
                    ServeError::invalid(format!(
                        "unknown output '{name}' (model '{}' has: {})",
                        self.model,
                        known.join(", ")
                    ))
                })
            })
            .collect()
    }
}

#[derive(Default)]
struct ModelEntry {
    serving: BTreeMap<u64, Arc<ServedVersion>>,
    /// Versions that failed to load, with what they were loaded from (retried when it changes).
    failed: BTreeMap<u64, (VersionSig, String)>,
    /// The config could not be read; the serving versions (if any) stay.
    config_error: Option<String>,
    /// Unloaded through the repository API: the poller leaves it alone until loaded again.
    explicitly_unloaded: bool,
}

/// Owns every loaded model and version.
pub struct ModelManager {
    repository: PathBuf,
    models: RwLock<BTreeMap<String, ModelEntry>>,
    metrics: Arc<Metrics>,
    sync_lock: Mutex<()>,
    ready: AtomicBool,
}

impl ModelManager {
    /// A manager over a repository folder; nothing is loaded yet (see [`ModelManager::load_all`]).
    pub fn new(repository: impl Into<PathBuf>, metrics: Arc<Metrics>) -> Result<ModelManager> {
        let repository = repository.into();
        if !repository.is_dir() {
            return Err(ServeError::Config {
                path: repository,
                reason: "the model repository is not a folder".into(),
            });
        }
        if let Some(why) = repository::looks_like_model_folder(&repository) {
            return Err(ServeError::Config {
                path: repository,
                reason: format!(
                    "this is one model's folder, not a repository ({why}): point the server at the folder \
                     that holds the model folders (<repository>/<model>/<version>/model.onnx)"
                ),
            });
        }
        Ok(ModelManager {
            repository,
            models: RwLock::new(BTreeMap::new()),
            metrics,
            sync_lock: Mutex::new(()),
            ready: AtomicBool::new(false),
        })
    }

    pub fn repository(&self) -> &Path {
        &self.repository
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads every model of the repository (blocking: call from a blocking thread) and marks
    /// the server ready. Returns the models that failed.
    pub fn load_all(&self) -> Vec<(String, ServeError)> {
        let mut failures = Vec::new();
        match repository::list_models(&self.repository) {
            Ok(names) => {
                for name in names {
                    if let Err(e) = self.sync_model(&name) {
                        failures.push((name, e));
                    }
                }
            }
            Err(e) => failures.push((String::new(), e)),
        }
        self.ready.store(true, Ordering::SeqCst);
        failures
    }

    /// One poll of the repository: loads new or changed versions, swaps them in, unloads
    /// versions the policy no longer selects and models whose folder is gone. Blocking.
    pub fn poll(&self) {
        let names = match repository::list_models(&self.repository) {
            Ok(n) => n,
            Err(e) => {
                warn!("repository poll: {e}");
                return;
            }
        };
        let known: Vec<String> = self.read_models().keys().cloned().collect();
        for gone in known.iter().filter(|k| !names.contains(k)) {
            info!(model = %gone, "model folder removed; unloading");
            self.remove_model(gone);
        }
        for name in names {
            let skip = self.read_models().get(&name).is_some_and(|e| e.explicitly_unloaded);
            if !skip {
                // Failures are logged, counted and shown in the index; the poll goes on.
                let _ = self.sync_model(&name);
            }
        }
    }

    /// Repository extension: (re)loads a model now. Blocking.
    pub fn load_model(&self, name: &str) -> Result<()> {
        if !repository::valid_model_name(name) || !repository::model_dir(&self.repository, name).is_dir() {
            return Err(ServeError::ModelNotFound(name.to_string()));
        }
        if let Some(e) = self.write_models().get_mut(name) {
            e.explicitly_unloaded = false;
        }
        self.sync_model(name)?;
        let models = self.read_models();
        let entry = models
            .get(name)
            .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))?;
        if entry.serving.is_empty() {
            let reason = entry
                .failed
                .values()
                .map(|(_, r)| r.clone())
                .next()
                .unwrap_or_else(|| "no version folder holds a model file".to_string());
            return Err(ServeError::Load {
                model: name.to_string(),
                version: 0,
                reason,
            });
        }
        Ok(())
    }

    /// Repository extension: stops serving a model; in-flight requests finish first.
    pub fn unload_model(&self, name: &str) -> Result<()> {
        let old = {
            let mut models = self.write_models();
            let entry = models
                .get_mut(name)
                .ok_or_else(|| ServeError::ModelNotFound(name.to_string()))?;
            entry.explicitly_unloaded = true;
            entry.failed.clear();
            std::mem::take(&mut entry.serving)
        };
        for v in old.keys() {
            self.metrics.set_ready(name, *v, false);
        }
        info!(model = %name, "unloaded through the repository API");
        Ok(())
    }

    fn remove_model(&self, name: &str) {
        let old = self.write_models().remove(name);
        if let Some(old) = old {
            for v in old.serving.keys() {
                self.metrics.set_ready(name, *v, false);
            }
        }
    }

    /// Brings one model in line with its folder. Holds the sync lock so the poller and the
    /// load API never load the same model twice at once; requests keep flowing meanwhile.
    fn sync_model(&self, name: &str) -> Result<()> {
        let _guard = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let dir = repository::model_dir(&self.repository, name);
        if !dir.is_dir() {
            self.remove_model(name);
            return Err(ServeError::ModelNotFound(name.to_string()));
        }
        let config_path = dir.join("config.toml");
        let config_sig = FileSig::of(&config_path);
        let config = match ModelConfig::read(&config_path).and_then(|c| c.resolve(&config_path)) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let msg = e.to_string();
                let mut models = self.write_models();
                let entry = models.entry(name.to_string()).or_default();
                if entry.config_error.as_deref() != Some(msg.as_str()) {
                    error!(model = %name, "config error (serving versions stay): {msg}");
                    self.metrics.load_failed(name, 0);
                }
                entry.config_error = Some(msg);
                return Err(e);
            }
        };
        let mut available = repository::list_versions(&dir, &config.model_filename)?;
        let (current, mut failed) = {
            let models = self.read_models();
            models
                .get(name)
                .map(|e| (e.serving.clone(), e.failed.clone()))
                .unwrap_or_default()
        };
        // A serving version whose folder is still there but whose file is gone (deleted or being
        // replaced) stays selected: its reload fails and is reported, and the loaded copy serves
        // on. Removing the version folder unloads it.
        for v in current.keys() {
            if !available.contains(v) && dir.join(v.to_string()).is_dir() {
                available.push(*v);
            }
        }
        available.sort_unstable();
        let wanted = config.policy.select(&available);
        failed.retain(|v, _| wanted.contains(v));
        let mut next: BTreeMap<u64, Arc<ServedVersion>> = BTreeMap::new();
        for &v in &wanted {
            let file = dir.join(v.to_string()).join(&config.model_filename);
            let sig = VersionSig {
                model: FileSig::of(&file),
                config: config_sig,
            };
            // Unchanged and still running: keep it. A version whose workers are all gone (and
            // could not be restarted) is loaded afresh.
            if let Some(cur) = current.get(&v).filter(|c| c.signature == sig && c.is_ready()) {
                next.insert(v, cur.clone());
                failed.remove(&v);
                continue;
            }
            if failed.get(&v).is_some_and(|(s, _)| *s == sig) {
                continue; // failed before and unchanged since
            }
            info!(model = %name, version = v, "loading");
            let t = Instant::now();
            match self.load_version(name, v, &file, config.clone(), sig) {
                Ok(sv) => {
                    info!(model = %name, version = v, ms = t.elapsed().as_millis() as u64, "loaded");
                    next.insert(v, Arc::new(sv));
                    failed.remove(&v);
                }
                Err(e) => {
                    error!(model = %name, version = v, "load failed (the serving version stays): {e}");
                    self.metrics.load_failed(name, v);
                    failed.insert(v, (sig, e.to_string()));
                }
            }
        }
        // A selected version that failed must not take the model down: keep serving what was.
        for (v, cur) in current.iter().rev() {
            if next.len() >= wanted.len() {
                break;
            }
            next.entry(*v).or_insert_with(|| cur.clone());
        }
        let old = {
            let mut models = self.write_models();
            let entry = models.entry(name.to_string()).or_default();
            entry.config_error = None;
            entry.explicitly_unloaded = false;
            entry.failed = failed;
            std::mem::replace(&mut entry.serving, next.clone())
        };
        for v in old.keys().filter(|v| !next.contains_key(v)) {
            info!(model = %name, version = *v, "no longer served; unloading once in-flight requests finish");
            self.metrics.set_ready(name, *v, false);
        }
        for v in next.keys() {
            self.metrics.set_ready(name, *v, true);
        }
        // `old` drops here: versions nobody else holds are freed once their queues drain.
        Ok(())
    }

    fn load_version(
        &self,
        name: &str,
        version: u64,
        file: &Path,
        config: Arc<ResolvedConfig>,
        signature: VersionSig,
    ) -> Result<ServedVersion> {
        let load_err = |reason: String| ServeError::Load {
            model: name.to_string(),
            version,
            reason,
        };
        if config.raw.llm.is_some() {
            let dir = file.parent().unwrap_or(file);
            let llm = crate::llm::ServedLlm::load(dir, &config).map_err(load_err)?;
            let session = llm.service.model().session();
            return Ok(ServedVersion {
                model: name.to_string(),
                version,
                inputs: session.inputs().to_vec(),
                outputs: session.outputs().to_vec(),
                config,
                batcher: None,
                llm: Some(Arc::new(llm)),
                cache: None,
                metrics: self.metrics.model(name, version),
                signature,
            });
        }
        let session = Session::builder()
            .device(config.device)
            .optimization(config.level)
            .precision(config.precision)
            .load_limits(config.load_limits)
            .run_options(config.run_options.clone())
            .build_from_file(file)
            .map_err(|e| load_err(e.to_string()))?;
        let inputs = session.inputs().to_vec();
        let outputs = session.outputs().to_vec();
        let max_batch = config.raw.max_batch_size;
        if max_batch > 0 {
            for io in inputs.iter().chain(&outputs) {
                if let Some(shape) = &io.shape {
                    match shape.0.first() {
                        None => return Err(load_err(format!("'{}' is a scalar but max_batch_size > 0", io.name))),
                        Some(kiln::Dim::Known(n)) if *n != 1 || max_batch > 1 => {
                            return Err(load_err(format!(
                                "'{}' has a fixed first dim {n}; max_batch_size > 0 needs a dynamic batch dim",
                                io.name
                            )))
                        }
                        _ => {}
                    }
                }
            }
        }
        let db = config.raw.dynamic_batching.as_ref();
        let batcher_config = BatcherConfig {
            max_batch_size: max_batch,
            max_queue_delay: db.map(|d| Duration::from_micros(d.max_queue_delay_us)),
            preferred_batch_sizes: db.map(|d| d.preferred_batch_sizes.clone()).unwrap_or_default(),
            max_queue_size: config.queue_size,
            instance_count: config.instance_count,
        };
        let metrics = self.metrics.model(name, version);
        let batcher = DynamicBatcher::start(session, batcher_config, metrics.clone(), name, version)?;
        let rc = &config.raw.response_cache;
        let cache = rc
            .enable
            .then(|| ResponseCache::new(rc.max_bytes, rc.ttl_secs.map(Duration::from_secs)));
        Ok(ServedVersion {
            model: name.to_string(),
            version,
            inputs,
            outputs,
            config,
            batcher: Some(batcher),
            llm: None,
            cache,
            metrics,
            signature,
        })
    }

    /// The newest served version of every LLM model.
    pub fn llms(&self) -> Vec<(String, u64, Arc<crate::llm::ServedLlm>)> {
        self.read_models()
            .iter()
            .filter_map(|(name, e)| {
                let (v, sv) = e.serving.iter().rev().find(|(_, sv)| sv.llm.is_some())?;
                Some((name.clone(), *v, sv.llm.clone()?))
            })
            .collect()
    }

    /// The newest served version of LLM `model`.
    pub fn llm(&self, model: &str) -> Result<(u64, Arc<crate::llm::ServedLlm>)> {
        let sv = self.served(model, None)?;
        match &sv.llm {
            Some(l) => Ok((sv.version, l.clone())),
            None => Err(ServeError::invalid(format!(
                "model '{model}' is not an LLM (no [llm] section in its config.toml); use /v2/models/{model}/infer"
            ))),
        }
    }

    /// Whether the server is ready: startup loading finished, it is not shutting down, and every
    /// served version has a live model worker (Triton's strict readiness).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self
                .read_models()
                .values()
                .all(|entry| entry.serving.values().all(|sv| sv.is_ready()))
    }

    /// Marks the server not ready (shutdown has begun).
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    /// The version serving requests for `version` (`None`: the highest served version).
    pub fn served(&self, model: &str, version: Option<u64>) -> Result<Arc<ServedVersion>> {
        let models = self.read_models();
        let entry = models
            .get(model)
            .ok_or_else(|| ServeError::ModelNotFound(model.to_string()))?;
        match version {
            Some(v) => entry
                .serving
                .get(&v)
                .cloned()
                .ok_or_else(|| ServeError::VersionNotFound {
                    model: model.to_string(),
                    version: v,
                }),
            None => entry
                .serving
                .values()
                .next_back()
                .cloned()
                .ok_or_else(|| ServeError::NotReady {
                    model: model.to_string(),
                    reason: entry_reason(entry),
                }),
        }
    }

    /// Versions being served, ascending.
    pub fn versions(&self, model: &str) -> Result<Vec<u64>> {
        let models = self.read_models();
        let entry = models
            .get(model)
            .ok_or_else(|| ServeError::ModelNotFound(model.to_string()))?;
        Ok(entry.serving.keys().copied().collect())
    }

    /// Every model and version the manager knows, with state and reason.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.read_models();
        let mut out = Vec::new();
        for (name, e) in models.iter() {
            out.extend(entry_index(name, e));
        }
        out
    }

    /// Index rows of one model (404 when unknown).
    pub fn model_status(&self, model: &str) -> Result<Vec<IndexEntry>> {
        let models = self.read_models();
        let entry = models
            .get(model)
            .ok_or_else(|| ServeError::ModelNotFound(model.to_string()))?;
        Ok(entry_index(model, entry))
    }

    /// Runs one inference request through the model's batcher.
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse> {
        let served = self.served(&req.model, req.version)?;
        served.infer(req).await
    }
}

fn entry_reason(entry: &ModelEntry) -> String {
    if entry.explicitly_unloaded {
        return "unloaded".to_string();
    }
    if let Some(e) = &entry.config_error {
        return e.clone();
    }
    entry
        .failed
        .values()
        .map(|(_, r)| r.clone())
        .next()
        .unwrap_or_else(|| "no version loaded".to_string())
}

fn entry_index(name: &str, e: &ModelEntry) -> Vec<IndexEntry> {
    let mut out: Vec<IndexEntry> = e
        .serving
        .iter()
        .map(|(v, sv)| IndexEntry {
            name: name.to_string(),
            version: Some(*v),
            state: if sv.is_ready() {
                VersionState::Ready
            } else {
                VersionState::Unavailable
            },
            reason: match e.failed.get(v) {
                _ if !sv.is_ready() => "no model worker is running".into(),
                // The file changed and did not load: the copy loaded earlier serves on.
                Some((_, why)) => format!("serving the copy loaded earlier; reload failed: {why}"),
                None => String::new(),
            },
        })
        .collect();
    for (v, (_, reason)) in &e.failed {
        if !e.serving.contains_key(v) {
            out.push(IndexEntry {
                name: name.to_string(),
                version: Some(*v),
                state: VersionState::Unavailable,
                reason: reason.clone(),
            });
        }
    }
    if let Some(err) = &e.config_error {
        out.push(IndexEntry {
            name: name.to_string(),
            version: None,
            state: VersionState::Unavailable,
            reason: err.clone(),
        });
    }
    if out.is_empty() {
        out.push(IndexEntry {
            name: name.to_string(),
            version: None,
            state: VersionState::Unavailable,
            reason: entry_reason(e),
        });
    }
    out.sort_by_key(|x| x.version);
    out
}

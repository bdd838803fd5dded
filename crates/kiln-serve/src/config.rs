//! Per-model configuration (`<repo>/<model>/config.toml`), named after Triton's model config
//! so settings carry over.

use std::path::Path;
use std::time::Duration;

use kiln::{Device, Level};
use serde::Deserialize;

use crate::error::{Result, ServeError};

/// Contents of a model's `config.toml`. Every section is optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// 0: the model takes requests as they are (no batch dim). N > 0: every input's first dim
    /// is the batch dim, requests carry 1..=N rows and may be batched together.
    #[serde(default)]
    pub max_batch_size: usize,
    #[serde(default)]
    pub version_policy: VersionPolicyConfig,
    /// Turns the dynamic batcher on (needs `max_batch_size > 0`).
    pub dynamic_batching: Option<DynamicBatchingConfig>,
    #[serde(default)]
    pub instance_group: InstanceGroupConfig,
    #[serde(default)]
    pub optimization: OptimizationConfig,
    #[serde(default)]
    pub response_cache: ResponseCacheConfig,
    /// Requests still queued after this long fail with a timeout (none by default).
    pub request_timeout_ms: Option<u64>,
    /// Largest number of queued requests when dynamic batching is off (default 1024).
    pub max_queue_size: Option<usize>,
    /// File name inside each version folder (default `model.onnx`).
    pub default_model_filename: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Serve the model as an LLM (OpenAI-compatible routes, KServe generate) with a paged KV
    /// cache and continuous batching. Each version folder then holds the decoder (`model.onnx`
    /// with `past_key_values` inputs), `config.json`, `tokenizer.json` and `tokenizer_config.json`.
    pub llm: Option<LlmConfig>,
}

/// `[llm]`: LLM serving settings, named as vLLM's engine arguments.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Tokens per KV block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Bytes for the KV cache (all layers, K and V).
    #[serde(default = "default_kv_cache_bytes")]
    pub kv_cache_bytes: usize,
    /// `f32` or `f16`.
    #[serde(default = "default_kv_dtype")]
    pub kv_cache_dtype: String,
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: usize,
    #[serde(default = "default_max_num_batched_tokens")]
    pub max_num_batched_tokens: usize,
    /// Prompt plus output tokens of one sequence (capped by the model's context length).
    #[serde(default = "default_max_model_len")]
    pub max_model_len: usize,
    #[serde(default = "yes")]
    pub enable_chunked_prefill: bool,
    #[serde(default = "yes")]
    pub enable_prefix_caching: bool,
    /// Requests in the engine (running and waiting) beyond which new ones get a 503.
    #[serde(default = "default_max_pending")]
    pub max_pending_requests: usize,
    /// Replaces the tokenizer's chat template (Jinja, as in `tokenizer_config.json`).
    pub chat_template: Option<String>,
    /// `max_tokens` when a request gives none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: usize,
}

fn default_block_size() -> usize {
    16
}
fn default_kv_cache_bytes() -> usize {
    512 << 20
}
fn default_kv_dtype() -> String {
    "f32".into()
}
fn default_max_num_seqs() -> usize {
    64
}
fn default_max_num_batched_tokens() -> usize {
    512
}
fn default_max_model_len() -> usize {
    4096
}
fn yes() -> bool {
    true
}
fn default_max_pending() -> usize {
    256
}
fn default_max_tokens() -> usize {
    256
}

impl LlmConfig {
    /// The engine settings, checked.
    pub fn engine_config(&self) -> std::result::Result<kiln_llm::EngineConfig, String> {
        let kv_dtype = match self.kv_cache_dtype.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => kiln::paged::KvDType::F32,
            "f16" | "fp16" | "float16" => kiln::paged::KvDType::F16,
            other => return Err(format!("llm.kv_cache_dtype '{other}': use f32 or f16")),
        };
        for (name, v) in [
            ("block_size", self.block_size),
            ("kv_cache_bytes", self.kv_cache_bytes),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("max_pending_requests", self.max_pending_requests),
            ("default_max_tokens", self.default_max_tokens),
        ] {
            if v == 0 {
                return Err(format!("llm.{name} must be positive"));
            }
        }
        Ok(kiln_llm::EngineConfig {
            scheduler: kiln_llm::SchedulerConfig {
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_model_len: self.max_model_len,
                chunked_prefill: self.enable_chunked_prefill,
            },
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_bytes,
            kv_dtype,
            prefix_caching: self.enable_prefix_caching,
        })
    }
}

/// Bounds on what loading and running this model may cost (unset fields keep Kiln's defaults:
/// `kiln::LoadLimits::default()`, `kiln::RunOptions::default()`). A model over a load limit
/// fails to load with an error naming the limit; a request that would make a tensor over
/// `max_tensor_bytes` fails with a 500 naming the node, and the model keeps serving.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest model file in bytes (default 2 GiB).
    pub max_model_bytes: Option<u64>,
    /// Most nodes over all graphs (default 1,000,000).
    pub max_nodes: Option<u64>,
    /// Deepest subgraph nesting (default 32).
    pub max_graph_nesting: Option<u64>,
    /// Largest initializer by its declared dims (default 16 GiB).
    pub max_initializer_bytes: Option<u64>,
    /// Largest tensor a kernel may create while running a request (default 4 GiB).
    pub max_tensor_bytes: Option<u64>,
}

/// Which versions of a model are served. At most one field may be set; none means `latest = 1`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VersionPolicyConfig {
    /// Serve the N highest versions.
    pub latest: Option<usize>,
    /// Serve every version.
    pub all: Option<bool>,
    /// Serve exactly these versions.
    pub specific: Option<Vec<u64>>,
}

/// The resolved version policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    Latest(usize),
    All,
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions to serve out of those present (any order in, ascending out).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut v: Vec<u64> = available.to_vec();
        v.sort_unstable();
        v.dedup();
        match self {
            VersionPolicy::All => v,
            VersionPolicy::Latest(n) => {
                let skip = v.len().saturating_sub(*n);
                v.split_off(skip)
            }
            VersionPolicy::Specific(want) => v.into_iter().filter(|x| want.contains(x)).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatchingConfig {
    /// How long the oldest queued request may wait for others to join its batch.
    #[serde(default = "default_queue_delay_us")]
    pub max_queue_delay_us: u64,
    /// Batch sizes that run at once without waiting for the delay.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests waiting beyond this are refused at once (503 / UNAVAILABLE).
    #[serde(default = "default_queue_size")]
    pub max_queue_size: usize,
}

fn default_queue_delay_us() -> u64 {
    1000
}

fn default_queue_size() -> usize {
    1024
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceGroupConfig {
    /// Execution threads for this model, each pulling batches from the shared queue.
    #[serde(default = "one")]
    pub count: usize,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    #[serde(default = "cpu")]
    pub device: String,
}

impl Default for InstanceGroupConfig {
    fn default() -> Self {
        InstanceGroupConfig {
            count: 1,
            device: cpu(),
        }
    }
}

fn one() -> usize {
    1
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizationConfig {
    /// Graph optimization level: disabled, basic, extended, all.
    #[serde(default = "basic")]
    pub level: String,
    /// Compute precision: `fp32` (the model's own types), `fp16` (weights converted once at
    /// load, fp32 accumulation), `int8-weight` (MatMul/Gemm weights int8 per channel). Inputs and
    /// outputs keep the model's dtypes.
    #[serde(default = "fp32")]
    pub precision: String,
}

impl Default for OptimizationConfig {
    fn default() -> Self {
        OptimizationConfig {
            level: basic(),
            precision: fp32(),
        }
    }
}

fn basic() -> String {
    "basic".into()
}

fn fp32() -> String {
    "fp32".into()
}

/// Response cache: identical requests (same model, version, input names, dtypes, shapes and
/// bytes) are answered from memory. Off unless `enable = true`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheConfig {
    #[serde(default)]
    pub enable: bool,
    /// Byte budget for cached outputs (default 64 MiB); least recently used entries go first.
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: usize,
    /// Entries older than this are not served (default: no expiry).
    pub ttl_secs: Option<u64>,
}

impl Default for ResponseCacheConfig {
    fn default() -> Self {
        ResponseCacheConfig {
            enable: false,
            max_bytes: default_cache_bytes(),
            ttl_secs: None,
        }
    }
}

fn default_cache_bytes() -> usize {
    64 << 20
}

/// A checked [`ModelConfig`] with parsed values.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub raw: ModelConfig,
    pub policy: VersionPolicy,
    pub device: Device,
    pub level: Level,
    pub precision: kiln::Precision,
    pub instance_count: usize,
    pub queue_size: usize,
    pub request_timeout: Option<Duration>,
    pub model_filename: String,
    pub load_limits: kiln::LoadLimits,
    pub run_options: kiln::RunOptions,
}

impl ModelConfig {
    /// Reads `config.toml`; a missing file gives the defaults.
    pub fn read(path: &Path) -> Result<ModelConfig> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ServeError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelConfig::default()),
            Err(source) => Err(ServeError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Checks the values and parses device, level and policy.
    pub fn resolve(self, path: &Path) -> Result<ResolvedConfig> {
        let bad = |reason: String| ServeError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let p = &self.version_policy;
        let policy = match (p.latest, p.all, &p.specific) {
            (None, None, None) => VersionPolicy::Latest(1),
            (Some(0), None, None) => return Err(bad("version_policy.latest must be at least 1".into())),
            (Some(n), None, None) => VersionPolicy::Latest(n),
            (None, Some(true), None) => VersionPolicy::All,
            (None, Some(false), None) => VersionPolicy::Latest(1),
            (None, None, Some(v)) if !v.is_empty() => VersionPolicy::Specific(v.clone()),
            (None, None, Some(_)) => return Err(bad("version_policy.specific lists no version".into())),
            _ => return Err(bad("version_policy: set only one of latest, all, specific".into())),
        };
        let device: Device = self
            .instance_group
            .device
            .parse()
            .map_err(|e| bad(format!("instance_group.device: {e}")))?;
        let level: Level = self
            .optimization
            .level
            .parse()
            .map_err(|e| bad(format!("optimization.level: {e}")))?;
        let precision: kiln::Precision = self
            .optimization
            .precision
            .parse()
            .map_err(|e| bad(format!("optimization.precision: {e}")))?;
        if self.instance_group.count == 0 || self.instance_group.count > 64 {
            return Err(bad("instance_group.count must be between 1 and 64".into()));
        }
        let queue_size = match &self.dynamic_batching {
            Some(db) => {
                if self.max_batch_size == 0 {
                    return Err(bad("dynamic_batching needs max_batch_size > 0".into()));
                }
                if let Some(&b) = db
                    .preferred_batch_sizes
                    .iter()
                    .find(|&&b| b == 0 || b > self.max_batch_size)
                {
                    return Err(bad(format!(
                        "dynamic_batching.preferred_batch_sizes: {b} is not in 1..={}",
                        self.max_batch_size
                    )));
                }
                db.max_queue_size
            }
            None => self.max_queue_size.unwrap_or_else(default_queue_size),
        };
        if queue_size == 0 {
            return Err(bad("max_queue_size must be at least 1".into()));
        }
        if self.response_cache.enable && self.response_cache.max_bytes == 0 {
            return Err(bad(
                "response_cache.max_bytes must be > 0 when the cache is enabled".into()
            ));
        }
        let model_filename = self
            .default_model_filename
            .clone()
            .unwrap_or_else(|| "model.onnx".to_string());
        if model_filename.contains('/') || model_filename.contains("..") || model_filename.is_empty() {
            return Err(bad(format!(
                "default_model_filename '{model_filename}' must be a plain file name"
            )));
        }
        if let Some(llm) = &self.llm {
            llm.engine_config().map_err(bad)?;
            if self.max_batch_size > 0 || self.dynamic_batching.is_some() {
                return Err(bad(
                    "an [llm] model batches continuously: leave max_batch_size and dynamic_batching unset".into(),
                ));
            }
        }
        let l = &self.limits;
        let d = kiln::LoadLimits::default();
        let load_limits = kiln::LoadLimits {
            max_file_bytes: l.max_model_bytes.unwrap_or(d.max_file_bytes),
            max_nodes: l.max_nodes.unwrap_or(d.max_nodes),
            max_nesting: l.max_graph_nesting.unwrap_or(d.max_nesting),
            max_tensor_bytes: l.max_initializer_bytes.unwrap_or(d.max_tensor_bytes),
        };
        // Concurrent requests: each run walks its plan on the batcher's thread and hands every
        // parallel kernel to the pool, so a pool worker never runs another request's whole plan
        // while one of its own kernels waits (`RunOptions::on_thread_pool`).
        let mut run_options = kiln::RunOptions {
            on_thread_pool: false,
            ..Default::default()
        };
        if let Some(b) = l.max_tensor_bytes {
            if b == 0 {
                return Err(bad("limits.max_tensor_bytes must be > 0".into()));
            }
            run_options.max_tensor_bytes = b;
        }
        Ok(ResolvedConfig {
            load_limits,
            run_options,
            instance_count: self.instance_group.count,
            request_timeout: self.request_timeout_ms.map(Duration::from_millis),
            policy,
            device,
            level,
            precision,
            queue_size,
            model_filename,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ResolvedConfig> {
        let c: ModelConfig = toml::from_str(text).map_err(|e| ServeError::invalid(e.to_string()))?;
        c.resolve(Path::new("config.toml"))
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.policy, VersionPolicy::Latest(1));
        assert_eq!(c.raw.max_batch_size, 0);
        assert_eq!(c.instance_count, 1);
        assert_eq!(c.queue_size, 1024);
        assert!(!c.raw.response_cache.enable);
        assert_eq!(c.device, Device::Cpu);
    }

    #[test]
    fn full_config() {
        let c = parse(
            "max_batch_size = 8\nrequest_timeout_ms = 250\n[version_policy]\nspecific = [1, 3]\n\
             [dynamic_batching]\nmax_queue_delay_us = 100\npreferred_batch_sizes = [4, 8]\nmax_queue_size = 3\n\
             [instance_group]\ncount = 2\n[optimization]\nlevel = \"extended\"\n\
             [response_cache]\nenable = true\nmax_bytes = 1000\nttl_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.policy, VersionPolicy::Specific(vec![1, 3]));
        assert_eq!(c.queue_size, 3);
        assert_eq!(c.instance_count, 2);
        assert_eq!(c.level, Level::Extended);
        assert_eq!(c.request_timeout, Some(Duration::from_millis(250)));
        assert_eq!(c.raw.response_cache.ttl_secs, Some(5));
    }

    #[test]
    fn rejects_bad_values() {
        for text in [
            "max_batch_sise = 1",
            "[dynamic_batching]\nmax_queue_delay_us = 1",
            "max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]",
            "[version_policy]\nlatest = 1\nall = true",
            "[version_policy]\nlatest = 0",
            "[instance_group]\ncount = 0",
            "[instance_group]\ndevice = \"tpu\"",
            "[optimization]\nprecision = \"int4\"",
            "max_queue_size = 0",
            "[limits]\nmax_tensor_bytes = 0",
            "[limits]\nmax_nodez = 3",
        ] {
            assert!(parse(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn limits_section() {
        let c = parse("[limits]\nmax_model_bytes = 1000\nmax_nodes = 50\nmax_graph_nesting = 2\nmax_initializer_bytes = 64\nmax_tensor_bytes = 4096").unwrap();
        assert_eq!(
            c.load_limits,
            kiln::LoadLimits {
                max_file_bytes: 1000,
                max_nodes: 50,
                max_nesting: 2,
                max_tensor_bytes: 64,
            }
        );
        assert_eq!(c.run_options.max_tensor_bytes, 4096);
        let d = parse("").unwrap();
        assert_eq!(d.load_limits, kiln::LoadLimits::default());
        assert_eq!(
            d.run_options.max_tensor_bytes,
            kiln::RunOptions::default().max_tensor_bytes
        );
    }

    #[test]
    fn version_policies() {
        let avail = [3, 1, 2, 10];
        assert_eq!(VersionPolicy::Latest(1).select(&avail), vec![10]);
        assert_eq!(VersionPolicy::Latest(2).select(&avail), vec![3, 10]);
        assert_eq!(VersionPolicy::Latest(9).select(&avail), vec![1, 2, 3, 10]);
        assert_eq!(VersionPolicy::All.select(&avail), vec![1, 2, 3, 10]);
        assert_eq!(VersionPolicy::Specific(vec![2, 7]).select(&avail), vec![2]);
    }
}

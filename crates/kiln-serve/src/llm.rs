//! LLM model versions (`[llm]` in `config.toml`): the decoder rewritten for paged attention, its
//! tokenizer and the engine thread ([`kiln_llm::LlmService`]), plus vLLM-shaped Prometheus metrics
//! (`kiln_llm:*`: time to first token, time per output token, end-to-end latency histograms;
//! running/waiting requests, preemptions, KV blocks, prefix-cache queries and hits, token counters).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_llm::{LlmModel, LlmService, LlmTokenizer};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::config::ResolvedConfig;

/// A loaded LLM version.
pub struct ServedLlm {
    pub service: LlmService,
    pub tokenizer: Arc<LlmTokenizer>,
    pub default_max_tokens: usize,
    /// `request_timeout_ms` of the model's config: requests still running then are aborted.
    pub request_timeout: Option<Duration>,
}

impl ServedLlm {
    /// When a request arriving at `arrived` must be done.
    pub fn deadline(&self, arrived: std::time::Instant) -> Option<std::time::Instant> {
        self.request_timeout.map(|t| arrived + t)
    }

    /// Load `dir` (model.onnx, config.json, tokenizer files) as configured.
    pub fn load(dir: &Path, config: &ResolvedConfig) -> Result<ServedLlm, String> {
        let llm = config.raw.llm.as_ref().ok_or("not an [llm] model")?;
        if config.device != kiln::Device::Cpu {
            return Err("LLM serving runs on the CPU for now (instance_group.device = \"cpu\")".into());
        }
        let engine_cfg = llm.engine_config()?;
        // Cheap checks first: a KV cache too small for max_model_len fails before the decoder loads.
        let geometry = kiln_llm::ModelGeometry::from_dir(dir).map_err(|e| e.to_string())?;
        engine_cfg.kv_config(&geometry).map_err(|e| format!("[llm] {e}"))?;
        let model = LlmModel::load(dir, config.level).map_err(|e| e.to_string())?;
        let mut tokenizer = LlmTokenizer::from_dir(dir).map_err(|e| e.to_string())?;
        if let Some(t) = &llm.chat_template {
            tokenizer
                .set_chat_template(t.clone())
                .map_err(|e| format!("llm.chat_template: {e}"))?;
        }
        if tokenizer.vocab_size() > model.geometry().vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, the model's vocabulary {}",
                tokenizer.vocab_size(),
                model.geometry().vocab_size
            ));
        }
        let service =
            LlmService::start(Arc::new(model), &engine_cfg, llm.max_pending_requests).map_err(|e| e.to_string())?;
        Ok(ServedLlm {
            service,
            tokenizer: Arc::new(tokenizer),
            default_max_tokens: llm.default_max_tokens,
            request_timeout: config.request_timeout,
        })
    }
}

/// When one request's tokens came, for the metrics' histograms.
pub(crate) struct RequestTiming {
    first: Option<Duration>,
    last: Option<std::time::Instant>,
    gaps: Vec<Duration>,
}

impl RequestTiming {
    pub(crate) fn new() -> Self {
        RequestTiming {
            first: None,
            last: None,
            gaps: Vec::new(),
        }
    }

    /// A token of the request that arrived at `arrived` came now.
    pub(crate) fn token(&mut self, arrived: std::time::Instant) {
        let now = std::time::Instant::now();
        match self.last {
            None => self.first = Some(now - arrived),
            Some(l) => self.gaps.push(now - l),
        }
        self.last = Some(now);
    }

    /// Record time to first token, the gaps between tokens and the whole request.
    pub(crate) fn record(&self, model: &str, version: u64, arrived: std::time::Instant) {
        LlmMetrics::global().observe(model, version, self.first, &self.gaps, arrived.elapsed());
    }
}

/// Process-wide LLM metrics (one registry beside the server's, rendered after it).
pub struct LlmMetrics {
    registry: Registry,
    pub ttft: HistogramVec,
    pub tpot: HistogramVec,
    pub e2e: HistogramVec,
    gauges: IntGaugeVec,
}

const LABELS: &[&str] = &["model", "version"];

impl LlmMetrics {
    pub fn global() -> &'static LlmMetrics {
        static M: OnceLock<LlmMetrics> = OnceLock::new();
        M.get_or_init(|| LlmMetrics::new().expect("static metric definitions are valid"))
    }

    fn new() -> prometheus::Result<LlmMetrics> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<HistogramVec> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), LABELS)?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let secs = vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0,
        ];
        let ttft = hist(
            "kiln_llm:time_to_first_token_seconds",
            "Time from request arrival to its first token",
            secs.clone(),
        )?;
        let tpot = hist(
            "kiln_llm:time_per_output_token_seconds",
            "Time between consecutive output tokens of a request",
            secs.clone(),
        )?;
        let e2e = hist(
            "kiln_llm:e2e_request_latency_seconds",
            "Time from request arrival to its last token",
            secs,
        )?;
        let gauges = IntGaugeVec::new(
            Opts::new("kiln_llm:engine", "Engine state, by `stat`: running and waiting requests, KV blocks used and total, and counters: preemptions, prompt and generation tokens, prefix-cache queried and hit tokens, steps, aborted requests"),
            &["model", "version", "stat"],
        )?;
        registry.register(Box::new(gauges.clone()))?;
        Ok(LlmMetrics {
            registry,
            ttft,
            tpot,
            e2e,
            gauges,
        })
    }

    /// Record a finished request's timings.
    pub fn observe(&self, model: &str, version: u64, ttft: Option<Duration>, gaps: &[Duration], total: Duration) {
        let v = version.to_string();
        if let Some(t) = ttft {
            self.ttft.with_label_values(&[model, &v]).observe(t.as_secs_f64());
        }
        let h = self.tpot.with_label_values(&[model, &v]);
        for g in gaps {
            h.observe(g.as_secs_f64());
        }
        self.e2e.with_label_values(&[model, &v]).observe(total.as_secs_f64());
    }

    /// Prometheus text for every served LLM version's engine state and the histograms.
    pub fn render(&self, served: &[(String, u64, Arc<ServedLlm>)]) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        self.gauges.reset();
        for (model, version, s) in served {
            let v = version.to_string();
            let st = s.service.stats();
            let stats: [(&str, u64); 11] = [
                ("num_requests_running", st.running.load(Relaxed) as u64),
                ("num_requests_waiting", st.waiting.load(Relaxed) as u64),
                ("kv_blocks_used", st.kv_blocks_used.load(Relaxed) as u64),
                ("kv_blocks_total", st.kv_blocks_total.load(Relaxed) as u64),
                ("num_preemptions_total", st.preemptions.load(Relaxed)),
                ("prompt_tokens_total", st.prompt_tokens.load(Relaxed)),
                ("generation_tokens_total", st.generation_tokens.load(Relaxed)),
                (
                    "prefix_cache_queries_total",
                    st.prefix_cache_queried_tokens.load(Relaxed),
                ),
                ("prefix_cache_hits_total", st.prefix_cache_hit_tokens.load(Relaxed)),
                ("steps_total", st.steps.load(Relaxed)),
                ("aborted_requests_total", st.aborted.load(Relaxed)),
            ];
            for (stat, value) in stats {
                self.gauges
                    .with_label_values(&[model.as_str(), &v, stat])
                    .set(value as i64);
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

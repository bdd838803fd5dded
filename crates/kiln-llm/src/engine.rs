//! The generation engine: requests in, tokens out, one model step at a time.
//!
//! [`Engine`] is synchronous and single-threaded (a server drives it from one thread): [`Engine::add_request`] queues a prompt, [`Engine::step`] schedules one
//! iteration (continuous batching: sequences join and leave at every step), runs the paged model
//! once over the flat token batch, samples every sequence that reached its last token and returns
//! what happened as [`Event`]s. [`Engine::abort`] frees a request's KV blocks at once.
//!
//! `n > 1` answers share the prompt: the prompt is prefilled once, then the sequence is forked
//! (its KV blocks shared, copy-on-write) and every answer draws from the same first logits with its
//! own random stream.

use std::collections::HashMap;
use std::sync::Arc;

use kiln::paged::{KvDType, PagedKvCache, PagedKvConfig};

use crate::block_manager::{KvBlockManager, SeqId, TokenId};
use crate::model::{LlmModel, ModelError, StepSeq};
use crate::sampling::{sample, InvalidParam, Sampled, SamplerRng, SamplingParams};
use crate::scheduler::{ScheduleError, Scheduler, SchedulerConfig};

/// Engine settings (vLLM's names where they exist).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes for the KV cache (all layers, K and V).
    pub kv_cache_bytes: usize,
    pub kv_dtype: KvDType,
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_cache_bytes: 256 << 20,
            kv_dtype: KvDType::F32,
            prefix_caching: true,
        }
    }
}

impl EngineConfig {
    /// The KV cache geometry this configuration gives `model`, checked before anything is loaded:
    /// fails when the cache cannot hold one sequence of `max_model_len` tokens.
    pub fn kv_config(&self, g: &crate::model::ModelGeometry) -> Result<PagedKvConfig, EngineError> {
        if self.block_size == 0 {
            return Err(EngineError::Invalid("block_size must be positive".into()));
        }
        let mut kv = PagedKvConfig {
            num_layers: g.num_layers,
            num_blocks: 0,
            block_size: self.block_size,
            num_kv_heads: g.num_kv_heads,
            head_dim: g.head_dim,
            dtype: self.kv_dtype,
        };
        kv.num_blocks = self.kv_cache_bytes / kv.bytes_per_block();
        let max_len = self.scheduler.max_model_len.min(g.max_position_embeddings);
        if kv.num_blocks * kv.block_size < max_len {
            return Err(EngineError::Invalid(format!(
                "kv_cache_bytes {} gives {} blocks of {} tokens ({} bytes each for this model), fewer than one sequence of max_model_len {max_len} needs ({} bytes)",
                self.kv_cache_bytes,
                kv.num_blocks,
                kv.block_size,
                kv.bytes_per_block(),
                max_len.div_ceil(kv.block_size) * kv.bytes_per_block()
            )));
        }
        Ok(kv)
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    /// Tokens to generate at most (per answer).
    pub max_tokens: usize,
    /// Extra ids that end an answer (the model's end-of-sequence ids always do unless `ignore_eos`).
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    /// Answers to generate from the prompt.
    pub n: usize,
}

impl Request {
    pub fn greedy(prompt: Vec<TokenId>, max_tokens: usize) -> Self {
        Request {
            prompt,
            params: SamplingParams::greedy(),
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: false,
            n: 1,
        }
    }
}

/// Caller-chosen request id.
pub type RequestId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token (or, at the text layer, a stop string).
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// Cancelled (client gone, deadline passed).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Answer `index` of `request` got a token; `finish` is set on its last one.
    Token {
        request: RequestId,
        index: usize,
        sampled: Sampled,
        finish: Option<FinishReason>,
    },
    /// The request failed (a model step error); its sequences are gone.
    Failed { request: RequestId, message: String },
    /// The request was cancelled (deadline passed); its sequences are gone.
    Aborted { request: RequestId, reason: String },
}

impl Event {
    pub fn request(&self) -> RequestId {
        match self {
            Event::Token { request, .. } | Event::Failed { request, .. } | Event::Aborted { request, .. } => *request,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Param(#[from] InvalidParam),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug)]
struct SeqState {
    request: RequestId,
    index: usize,
    rng: SamplerRng,
    /// Answers still to fork from this one after its prefill (`n - 1` on the first sequence).
    pending_forks: usize,
}

#[derive(Debug)]
struct RequestState {
    req: Request,
    seqs: Vec<SeqId>,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub steps: u64,
    pub prompt_tokens_computed: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
}

/// The engine. See the module documentation.
pub struct Engine {
    model: Arc<LlmModel>,
    cache: Arc<PagedKvCache>,
    sched: Scheduler,
    seqs: HashMap<SeqId, SeqState>,
    requests: HashMap<RequestId, RequestState>,
    next_seq: SeqId,
    stats: EngineStats,
}

impl Engine {
    pub fn new(model: Arc<LlmModel>, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let g = model.geometry();
        let kv = cfg.kv_config(g)?;
        let mut sc = cfg.scheduler.clone();
        sc.max_model_len = sc.max_model_len.min(g.max_position_embeddings);
        let sched = Scheduler::new(
            sc,
            KvBlockManager::new(kv.num_blocks, cfg.block_size, cfg.prefix_caching),
        )?;
        let cache = PagedKvCache::new(kv).map_err(|e| EngineError::Invalid(e.to_string()))?;
        Ok(Engine {
            model,
            cache: Arc::new(cache),
            sched,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            next_seq: 0,
            stats: EngineStats::default(),
        })
    }

    pub fn model(&self) -> &Arc<LlmModel> {
        &self.model
    }
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            preemptions: self.sched.num_preemptions(),
            ..self.stats
        }
    }
    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }
    /// Longest prompt + output a sequence may have.
    pub fn max_model_len(&self) -> usize {
        self.sched.config().max_model_len
    }

    /// Queue a request. Refused (with nothing queued) when the parameters are out of range, the
    /// prompt is empty or longer than `max_model_len`, or a token id is outside the vocabulary.
    pub fn add_request(&mut self, id: RequestId, req: Request) -> Result<(), EngineError> {
        req.params.validate()?;
        if self.requests.contains_key(&id) {
            return Err(EngineError::Invalid(format!("request {id} already exists")));
        }
        if req.n == 0 || req.n > 64 {
            return Err(EngineError::Invalid(format!("n must be in 1..=64, got {}", req.n)));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        let vocab = self.model.geometry().vocab_size;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Invalid(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let seq = self.next_seq;
        self.sched.add(seq, req.prompt.clone())?;
        self.next_seq += 1;
        self.seqs.insert(
            seq,
            SeqState {
                request: id,
                index: 0,
                rng: SamplerRng::new(req.params.seed, 0),
                pending_forks: req.n - 1,
            },
        );
        self.requests.insert(id, RequestState { req, seqs: vec![seq] });
        Ok(())
    }

    /// Cancel a request: its sequences leave the batch and their KV blocks are freed now.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(r) = self.requests.remove(&id) else {
            return false;
        };
        for s in r.seqs {
            self.sched.finish(s);
            self.seqs.remove(&s);
        }
        true
    }

    fn finish_seq(&mut self, seq: SeqId) {
        self.sched.finish(seq);
        if let Some(st) = self.seqs.remove(&seq) {
            if let Some(r) = self.requests.get_mut(&st.request) {
                r.seqs.retain(|&s| s != seq);
                if r.seqs.is_empty() {
                    self.requests.remove(&st.request);
                }
            }
        }
    }

    /// Run one iteration. Returns no events when there is nothing to do.
    pub fn step(&mut self) -> Vec<Event> {
        let plan = self.sched.schedule();
        if plan.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        let copies = plan
            .copies
            .iter()
            .try_for_each(|c| self.cache.copy_block(c.src, c.dst, c.num_tokens));
        let result = match copies {
            Err(e) => Err(ModelError::Output(e.to_string())),
            Ok(()) => {
                let step_seqs: Vec<StepSeq> = plan
                    .seqs
                    .iter()
                    .map(|x| {
                        let s = self.sched.sequence(x.seq).expect("scheduled sequences exist");
                        StepSeq {
                            tokens: &s.tokens[x.start..x.start + x.num_tokens],
                            start: x.start,
                            block_table: self.sched.block_table(x.seq).expect("scheduled sequences have blocks"),
                            sample: x.sample,
                        }
                    })
                    .collect();
                self.model.step(&self.cache, &step_seqs)
            }
        };
        self.stats.steps += 1;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Fail the requests in this step; the engine and everyone else carry on.
                let mut failed: Vec<RequestId> = plan
                    .seqs
                    .iter()
                    .filter_map(|x| self.seqs.get(&x.seq))
                    .map(|s| s.request)
                    .collect();
                failed.dedup();
                for r in failed {
                    if self.abort(r) {
                        events.push(Event::Failed {
                            request: r,
                            message: e.to_string(),
                        });
                    }
                }
                return events;
            }
        };
        self.sched.complete(&plan);
        let mut next_row = 0..logits.len();
        for x in &plan.seqs {
            let s = self.sched.sequence(x.seq).expect("scheduled sequences exist");
            let prompt_part = (x.start + x.num_tokens).min(s.prompt_len).saturating_sub(x.start);
            self.stats.prompt_tokens_computed += prompt_part as u64;
            if !x.sample {
                continue;
            }
            let row = logits.row(next_row.next().expect("one logits row per sampled sequence"));
            // Fork the other answers of an n > 1 request off the prefilled prompt.
            let forks = self
                .seqs
                .get_mut(&x.seq)
                .map(|st| std::mem::take(&mut st.pending_forks))
                .unwrap_or(0);
            let mut targets = vec![x.seq];
            if forks > 0 {
                let st = &self.seqs[&x.seq];
                let (request, seed) = (st.request, self.requests[&st.request].req.params.seed);
                for i in 1..=forks {
                    let child = self.next_seq;
                    self.next_seq += 1;
                    if self.sched.fork(x.seq, child).is_ok() {
                        self.seqs.insert(
                            child,
                            SeqState {
                                request,
                                index: i,
                                rng: SamplerRng::new(seed, i as u64),
                                pending_forks: 0,
                            },
                        );
                        if let Some(r) = self.requests.get_mut(&request) {
                            r.seqs.push(child);
                        }
                        targets.push(child);
                    }
                }
            }
            for seq in targets {
                events.push(self.sample_one(seq, row));
            }
        }
        events
    }

    fn sample_one(&mut self, seq: SeqId, logits: &[f32]) -> Event {
        let st = self.seqs.get_mut(&seq).expect("sampled sequences exist");
        let req = &self.requests[&st.request].req;
        let s = self.sched.sequence(seq).expect("sampled sequences exist");
        let sampled = sample(
            logits,
            &req.params,
            &s.tokens[..s.prompt_len],
            s.generated(),
            &mut st.rng,
        );
        let generated = s.generated().len() + 1;
        let total = s.tokens.len() + 1;
        let tok = sampled.token;
        let eos = !req.ignore_eos && self.model.geometry().eos_token_ids.contains(&tok);
        let max_model_len = self.sched.config().max_model_len;
        let finish = if eos || req.stop_token_ids.contains(&tok) {
            Some(FinishReason::Stop)
        } else if generated >= req.max_tokens || total >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let (request, index) = (st.request, st.index);
        self.stats.generated_tokens += 1;
        if finish.is_some() {
            self.finish_seq(seq);
        } else {
            self.sched.append_token(seq, tok).expect("running sequences exist");
        }
        Event::Token {
            request,
            index,
            sampled,
            finish,
        }
    }
}

//! The engine on its own thread, for servers: [`LlmService::submit`] checks a request, queues it
//! and returns a [`Generation`] whose channel receives the request's [`Event`]s as steps produce
//! them. Dropping the `Generation` (a client that went away) aborts the request and frees its KV
//! blocks before the next step; so does a passed deadline (the last event then says `Abort`).
//! When more requests are in the engine than `max_pending`, `submit` refuses at once
//! ([`SubmitError::Overloaded`]) instead of queueing without bound.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::{Engine, EngineConfig, EngineError, Event, Request, RequestId};
use crate::model::LlmModel;

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Bad parameters or prompt (a 400).
    #[error(transparent)]
    Invalid(#[from] EngineError),
    /// Too many requests in the engine (a 503).
    #[error("the model is overloaded: {0} requests in the engine; try again later")]
    Overloaded(usize),
    /// The engine thread is gone (a 503).
    #[error("the LLM engine has stopped")]
    Stopped,
}

enum Command {
    Submit {
        id: RequestId,
        req: Request,
        deadline: Option<Instant>,
        events: mpsc::UnboundedSender<Event>,
    },
    Abort(RequestId),
}

/// Gauges and counters the engine thread keeps current (for metrics endpoints).
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_cache_queried_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub aborted: AtomicU64,
}

/// A queued request: its events arrive on `events`. Dropping it cancels the request.
pub struct Generation {
    pub id: RequestId,
    pub events: mpsc::UnboundedReceiver<Event>,
    cancel: std_mpsc::Sender<Command>,
    done: bool,
}

impl Generation {
    /// Mark the request finished so dropping this handle sends no abort.
    pub fn set_done(&mut self) {
        self.done = true;
    }

    /// Cancel the request now (its KV blocks are freed before the next step).
    pub fn abort(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.cancel.send(Command::Abort(self.id));
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cancel.send(Command::Abort(self.id));
        }
    }
}

/// An engine running on its own thread. Cheap to share (`Arc`).
pub struct LlmService {
    tx: std_mpsc::Sender<Command>,
    model: Arc<LlmModel>,
    max_model_len: usize,
    max_pending: usize,
    pending: Arc<AtomicUsize>,
    next_id: AtomicU64,
    stats: Arc<ServiceStats>,
}

impl std::fmt::Debug for LlmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmService").field("model", &self.model).finish()
    }
}

impl LlmService {
    /// Build the engine and start its thread. `max_pending` bounds the requests in the engine
    /// (waiting and running).
    pub fn start(model: Arc<LlmModel>, cfg: &EngineConfig, max_pending: usize) -> Result<Self, EngineError> {
        let engine = Engine::new(model.clone(), cfg)?;
        let max_model_len = engine.max_model_len();
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(ServiceStats::default());
        let pending = Arc::new(AtomicUsize::new(0));
        let (st, pe) = (stats.clone(), pending.clone());
        std::thread::Builder::new()
            .name("kiln-llm-engine".into())
            .spawn(move || run(engine, rx, st, pe))
            .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(LlmService {
            tx,
            model,
            max_model_len,
            max_pending: max_pending.max(1),
            pending,
            next_id: AtomicU64::new(1),
            stats,
        })
    }

    pub fn model(&self) -> &Arc<LlmModel> {
        &self.model
    }
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// Check and queue a request.
    pub fn submit(&self, req: Request, deadline: Option<Instant>) -> Result<Generation, SubmitError> {
        check_request(&self.model, self.max_model_len, &req)?;
        let n = self.pending.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded(n));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::unbounded_channel();
        if self
            .tx
            .send(Command::Submit {
                id,
                req,
                deadline,
                events: etx,
            })
            .is_err()
        {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(Generation {
            id,
            events: erx,
            cancel: self.tx.clone(),
            done: false,
        })
    }
}

/// The checks `Engine::add_request` makes, done before queueing so the caller gets them at once.
fn check_request(model: &LlmModel, max_model_len: usize, req: &Request) -> Result<(), EngineError> {
    req.params.validate()?;
    if req.prompt.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.prompt.len() >= max_model_len {
        return Err(EngineError::Invalid(format!(
            "the prompt has {} tokens; this model's context (max_model_len) is {max_model_len}, so at most {} prompt tokens",
            req.prompt.len(),
            max_model_len - 1
        )));
    }
    if req.n == 0 || req.n > 64 {
        return Err(EngineError::Invalid(format!("n must be in 1..=64, got {}", req.n)));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
    }
    let vocab = model.geometry().vocab_size;
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Invalid(format!(
            "token id {t} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

struct Live {
    events: mpsc::UnboundedSender<Event>,
    deadline: Option<Instant>,
    /// Answers of the request still running.
    open: usize,
}

fn run(mut engine: Engine, rx: std_mpsc::Receiver<Command>, stats: Arc<ServiceStats>, pending: Arc<AtomicUsize>) {
    let mut live: std::collections::HashMap<RequestId, Live> = std::collections::HashMap::new();
    let end = |live: &mut std::collections::HashMap<RequestId, Live>, id: RequestId| {
        if live.remove(&id).is_some() {
            pending.fetch_sub(1, Ordering::SeqCst);
        }
    };
    loop {
        // Take every command waiting; block only when there is nothing to run.
        let mut first = true;
        loop {
            let cmd = if first && !engine.has_work() {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return, // every handle gone
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) if engine.has_work() => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            };
            first = false;
            match cmd {
                Command::Submit {
                    id,
                    req,
                    deadline,
                    events,
                } => {
                    let n = req.n;
                    match engine.add_request(id, req) {
                        Ok(()) => {
                            live.insert(
                                id,
                                Live {
                                    events,
                                    deadline,
                                    open: n,
                                },
                            );
                        }
                        Err(e) => {
                            let _ = events.send(Event::Failed {
                                request: id,
                                message: e.to_string(),
                            });
                            pending.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
                Command::Abort(id) => {
                    if engine.abort(id) {
                        stats.aborted.fetch_add(1, Ordering::Relaxed);
                    }
                    end(&mut live, id);
                }
            }
        }
        // Deadlines.
        let now = Instant::now();
        let expired: Vec<RequestId> = live
            .iter()
            .filter(|(_, l)| l.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            engine.abort(id);
            stats.aborted.fetch_add(1, Ordering::Relaxed);
            if let Some(l) = live.get(&id) {
                let _ = l.events.send(Event::Aborted {
                    request: id,
                    reason: "the request's deadline passed".into(),
                });
            }
            end(&mut live, id);
        }
        if !engine.has_work() {
            publish(&engine, &stats);
            continue;
        }
        let events = engine.step();
        // Gauges first, so a client that sees a token and then reads the metrics sees this step.
        publish(&engine, &stats);
        for e in events {
            let id = e.request();
            let finished = match &e {
                Event::Token { finish, .. } => finish.is_some(),
                Event::Failed { .. } | Event::Aborted { .. } => true,
            };
            let failed = !matches!(e, Event::Token { .. });
            let Some(l) = live.get_mut(&id) else { continue };
            if l.events.send(e).is_err() {
                // The client is gone: free its blocks now.
                engine.abort(id);
                stats.aborted.fetch_add(1, Ordering::Relaxed);
                end(&mut live, id);
                continue;
            }
            if failed {
                end(&mut live, id);
            } else if finished {
                l.open = l.open.saturating_sub(1);
                if l.open == 0 {
                    end(&mut live, id);
                }
            }
        }
        publish(&engine, &stats);
    }
}

fn publish(engine: &Engine, stats: &ServiceStats) {
    let s = engine.scheduler();
    let b = s.blocks();
    let e = engine.stats();
    stats.running.store(s.num_running(), Ordering::Relaxed);
    stats.waiting.store(s.num_waiting(), Ordering::Relaxed);
    stats.kv_blocks_total.store(b.num_blocks(), Ordering::Relaxed);
    stats.kv_blocks_used.store(b.num_used_blocks(), Ordering::Relaxed);
    stats.preemptions.store(e.preemptions, Ordering::Relaxed);
    stats.prompt_tokens.store(e.prompt_tokens_computed, Ordering::Relaxed);
    stats.generation_tokens.store(e.generated_tokens, Ordering::Relaxed);
    let p = b.prefix_cache_stats();
    stats
        .prefix_cache_queried_tokens
        .store(p.queried_tokens, Ordering::Relaxed);
    stats.prefix_cache_hit_tokens.store(p.hit_tokens, Ordering::Relaxed);
    stats.steps.store(e.steps, Ordering::Relaxed);
}

//! LLM serving for Kiln: a vLLM-style engine for ONNX decoders.
//!
//! - [`block_manager`]: paged KV-cache blocks, per-sequence block tables, copy-on-write, prefix caching.
//! - [`scheduler`]: iteration-level (continuous) batching with chunked prefill and preemption.
//! - [`sampling`]: greedy and random sampling with OpenAI's and vLLM's parameters.
//! - [`model`]: an ONNX decoder rewritten for paged attention, one step over a flat token batch.
//! - [`engine`]: requests in, tokens out; continuous batching over the model.
//! - [`service`]: the engine on its own thread, with cancellation, deadlines and overload refusal.
//! - [`text`]: text in, streamed text out (tokenizing, chat templates, stop strings).
//! - [`tokenizer`]: text <-> ids from Hugging Face `tokenizer.json` and `tokenizer_config.json`.
//! - [`chat`]: chat templates (Jinja), rendered as transformers renders them.
//! - [`detokenize`]: streaming detokenization and stop strings.

pub mod block_manager;
pub mod chat;
pub mod detokenize;
pub mod engine;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod testing;
pub mod text;
pub mod tokenizer;

pub use block_manager::{BlockError, BlockHash, BlockId, CopyOp, KvBlockManager, PrefixCacheStats, SeqId, TokenId};
pub use chat::{ChatMessage, ChatTemplate, SpecialTokens};
pub use detokenize::{IncrementalDecoder, StopMatcher, StopOutcome};
pub use engine::{Engine, EngineConfig, EngineError, EngineStats, Event, FinishReason, Request, RequestId};
pub use model::{LlmModel, Logits, ModelError, ModelGeometry, StepSeq};
pub use sampling::{InvalidParam, Sampled, SamplerRng, SamplingParams};
pub use scheduler::{ScheduleError, ScheduledSeq, Scheduler, SchedulerConfig, Sequence, StepPlan};
pub use service::{Generation, LlmService, ServiceStats, SubmitError};
pub use tokenizer::{LlmTokenizer, TokenizerError};

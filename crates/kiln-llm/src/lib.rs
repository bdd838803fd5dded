//! LLM serving for Kiln: the parts of a vLLM-style engine that do not depend on a model.
//!
//! - [`block_manager`]: paged KV-cache blocks, per-sequence block tables, copy-on-write, prefix caching.
//! - [`scheduler`]: iteration-level (continuous) batching with chunked prefill and preemption.
//! - [`sampling`]: greedy and random sampling with OpenAI's and vLLM's parameters.

pub mod block_manager;
pub mod sampling;
pub mod scheduler;

pub use block_manager::{BlockError, BlockHash, BlockId, CopyOp, KvBlockManager, PrefixCacheStats, SeqId, TokenId};
pub use sampling::{InvalidParam, Sampled, SamplerRng, SamplingParams};
pub use scheduler::{ScheduleError, ScheduledSeq, Scheduler, SchedulerConfig, Sequence, StepPlan};

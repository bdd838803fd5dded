//! Iteration-level scheduling (Orca, vLLM): every model step runs one flat batch of tokens from
//! many sequences. Waiting requests join the batch at any step and finished ones leave at once;
//! long prompts are split into chunks that share the step's token budget with decode tokens
//! (chunked prefill, Sarathi-Serve), so decoding does not stall behind a long prompt.
//!
//! Policy per step, first come first served:
//! 1. Running sequences in arrival order each get their next chunk (a decode token, or the rest of
//!    a prompt up to the remaining budget). When the KV blocks run out, the most recently arrived
//!    running sequence is preempted by recompute: its blocks are freed, it goes back to the front
//!    of the queue and is prefilled again later (its committed blocks usually still sit in the
//!    prefix cache, so the recompute is mostly hits).
//! 2. If nothing was preempted, waiting sequences are admitted in order while the sequence limit,
//!    the token budget and the free blocks allow; the first one that does not fit stops admission
//!    (no overtaking, so a long prompt is not starved).

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockError, BlockId, CopyOp, KvBlockManager, SeqId, TokenId};

/// Limits, named as vLLM's engine arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences in one step (decode batch size).
    pub max_num_seqs: usize,
    /// Tokens in one step, prefill chunks and decode tokens together.
    pub max_num_batched_tokens: usize,
    /// Prompt plus generated tokens of one sequence.
    pub max_model_len: usize,
    /// Split prompts longer than the remaining budget across steps. Without it a prompt is
    /// scheduled whole, so `max_num_batched_tokens` must be at least `max_model_len`.
    pub chunked_prefill: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
            chunked_prefill: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {len} tokens; this model's limit (max_model_len) is {max}")]
    PromptTooLong { len: usize, max: usize },
    #[error("sequence {0} already exists")]
    Duplicate(SeqId),
    #[error("sequence {0} does not exist")]
    Unknown(SeqId),
    #[error("sequence {0} is not running")]
    NotRunning(SeqId),
    #[error("the KV cache ({blocks} blocks of {block_size} tokens) cannot hold one sequence of max_model_len {max_model_len}")]
    CacheTooSmall {
        blocks: usize,
        block_size: usize,
        max_model_len: usize,
    },
    #[error("max_num_batched_tokens {budget} is below max_model_len {max_model_len} without chunked prefill")]
    BudgetTooSmall { budget: usize, max_model_len: usize },
    #[error("invalid scheduler limit: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Blocks(#[from] BlockError),
}

/// The scheduler's view of a sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt then generated tokens.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    /// Leading tokens whose KV is in the cache.
    pub num_computed: usize,
    /// Times it was preempted (and recomputed).
    pub num_preemptions: u32,
    /// Tokens found in the prefix cache at its (last) admission.
    pub num_cached_tokens: usize,
}

impl Sequence {
    pub fn generated(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len..]
    }
}

/// One sequence's part of a step: positions `start..start + num_tokens` of its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    pub start: usize,
    pub num_tokens: usize,
    /// The chunk ends at the sequence's last token: its logits are sampled after the step.
    pub sample: bool,
}

/// What one model step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Block copies to perform before the step (copy-on-write).
    pub copies: Vec<CopyOp>,
    /// Sequences preempted during this scheduling (freed, requeued).
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// Iteration-level scheduler over a [`KvBlockManager`]. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: KvBlockManager,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    seqs: HashMap<SeqId, Sequence>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: KvBlockManager) -> Result<Self, ScheduleError> {
        if cfg.max_num_seqs == 0 {
            return Err(ScheduleError::Invalid("max_num_seqs must be positive"));
        }
        if cfg.max_num_batched_tokens == 0 {
            return Err(ScheduleError::Invalid("max_num_batched_tokens must be positive"));
        }
        if cfg.max_model_len == 0 {
            return Err(ScheduleError::Invalid("max_model_len must be positive"));
        }
        if blocks.num_blocks() * blocks.block_size() < cfg.max_model_len {
            return Err(ScheduleError::CacheTooSmall {
                blocks: blocks.num_blocks(),
                block_size: blocks.block_size(),
                max_model_len: cfg.max_model_len,
            });
        }
        if !cfg.chunked_prefill && cfg.max_num_batched_tokens < cfg.max_model_len {
            return Err(ScheduleError::BudgetTooSmall {
                budget: cfg.max_num_batched_tokens,
                max_model_len: cfg.max_model_len,
            });
        }
        Ok(Scheduler {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            seqs: HashMap::new(),
            num_preemptions: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn blocks(&self) -> &KvBlockManager {
        &self.blocks
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    /// Preemptions since the start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }
    /// Token slots allocated to the running sequences (tokens whose KV is held or being written).
    pub fn allocated_tokens(&self) -> usize {
        self.running.iter().filter_map(|&s| self.blocks.num_slots(s)).sum()
    }
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }
    pub fn block_table(&self, id: SeqId) -> Option<&[BlockId]> {
        self.blocks.block_table(id)
    }

    /// Queue a new sequence.
    pub fn add(&mut self, id: SeqId, prompt: Vec<TokenId>) -> Result<(), ScheduleError> {
        if prompt.is_empty() {
            return Err(ScheduleError::EmptyPrompt);
        }
        if prompt.len() > self.cfg.max_model_len {
            return Err(ScheduleError::PromptTooLong {
                len: prompt.len(),
                max: self.cfg.max_model_len,
            });
        }
        if self.seqs.contains_key(&id) {
            return Err(ScheduleError::Duplicate(id));
        }
        let prompt_len = prompt.len();
        self.seqs.insert(
            id,
            Sequence {
                id,
                tokens: prompt,
                prompt_len,
                num_computed: 0,
                num_preemptions: 0,
                num_cached_tokens: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Start `child` as a copy of running `parent` sharing its KV blocks (`n > 1`). The child
    /// runs right after its parent.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), ScheduleError> {
        if self.seqs.contains_key(&child) {
            return Err(ScheduleError::Duplicate(child));
        }
        let pos = self
            .running
            .iter()
            .position(|&s| s == parent)
            .ok_or(ScheduleError::NotRunning(parent))?;
        self.blocks.fork(parent, child)?;
        let mut s = self.seqs[&parent].clone();
        s.id = child;
        self.seqs.insert(child, s);
        self.running.insert(pos + 1, child);
        Ok(())
    }

    /// Append a sampled token to a sequence (it is computed in a later step).
    pub fn append_token(&mut self, id: SeqId, token: TokenId) -> Result<(), ScheduleError> {
        let s = self.seqs.get_mut(&id).ok_or(ScheduleError::Unknown(id))?;
        s.tokens.push(token);
        Ok(())
    }

    /// Remove a sequence (finished, cancelled or expired) and free its blocks at once.
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let s = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.blocks.free(id);
        Some(s)
    }

    fn preempt(&mut self, id: SeqId) {
        self.blocks.free(id);
        let s = self.seqs.get_mut(&id).expect("running sequences exist");
        s.num_computed = 0;
        s.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Plan the next step. An empty plan means nothing can run (no work, or every waiting
    /// sequence waits for blocks held by nobody, which the constructor's checks rule out).
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let remaining = s.tokens.len() - s.num_computed;
            let n = remaining.min(budget);
            if n == 0 || (!self.cfg.chunked_prefill && n < remaining) {
                i += 1;
                continue;
            }
            let start = s.num_computed;
            match self.blocks.append_slots(id, n) {
                Ok(copy) => {
                    plan.copies.extend(copy);
                    plan.seqs.push(ScheduledSeq {
                        seq: id,
                        start,
                        num_tokens: n,
                        sample: n == remaining,
                    });
                    budget -= n;
                    i += 1;
                }
                Err(BlockError::OutOfBlocks { .. }) => {
                    let victim = self.running.pop().expect("i < len");
                    self.preempt(victim);
                    plan.preempted.push(victim);
                }
                Err(e) => unreachable!("running sequence {id} has a block table: {e}"),
            }
        }
        if plan.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else { break };
                let s = &self.seqs[&id];
                let cached = self.blocks.cached_prefix_len(&s.tokens);
                let remaining = s.tokens.len() - cached;
                let n = remaining.min(budget);
                if !self.cfg.chunked_prefill && n < remaining {
                    break;
                }
                match self.blocks.admit(id, &s.tokens, n) {
                    Ok(hit) => {
                        debug_assert_eq!(hit, cached);
                        let s = self.seqs.get_mut(&id).expect("waiting sequences exist");
                        s.num_computed = hit;
                        s.num_cached_tokens = hit;
                        let sample = hit + n == s.tokens.len();
                        plan.seqs.push(ScheduledSeq {
                            seq: id,
                            start: hit,
                            num_tokens: n,
                            sample,
                        });
                        self.waiting.pop_front();
                        self.running.push(id);
                        budget -= n;
                    }
                    Err(BlockError::OutOfBlocks { .. }) => break,
                    Err(e) => unreachable!("waiting sequence {id} has no block table: {e}"),
                }
            }
        }
        plan
    }

    /// Record that `plan` ran: the scheduled tokens' KV is written (and full blocks enter the
    /// prefix cache). Sequences finished or cancelled since scheduling are skipped.
    pub fn complete(&mut self, plan: &StepPlan) {
        for sched in &plan.seqs {
            let Some(s) = self.seqs.get_mut(&sched.seq) else {
                continue;
            };
            if !self.blocks.contains(sched.seq) || s.num_computed != sched.start {
                continue; // preempted or restarted in between
            }
            s.num_computed += sched.num_tokens;
            self.blocks
                .commit(sched.seq, &s.tokens, s.num_computed)
                .expect("scheduled sequences have block tables");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, block_size: usize, cfg: SchedulerConfig) -> Scheduler {
        Scheduler::new(cfg, KvBlockManager::new(blocks, block_size, true)).unwrap()
    }

    fn cfg(max_num_seqs: usize, budget: usize, max_model_len: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            max_model_len,
            chunked_prefill: true,
        }
    }

    /// Run a step: complete it and append token 7 to every sampled sequence.
    fn step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        s.complete(&plan);
        for x in &plan.seqs {
            if x.sample {
                s.append_token(x.seq, 7).unwrap();
            }
        }
        plan
    }

    #[test]
    fn prompts_join_and_decode_together() {
        let mut s = sched(64, 4, cfg(8, 64, 128));
        s.add(1, vec![1; 10]).unwrap();
        let p = step(&mut s);
        assert_eq!(
            p.seqs,
            vec![ScheduledSeq {
                seq: 1,
                start: 0,
                num_tokens: 10,
                sample: true
            }]
        );
        s.add(2, vec![2; 5]).unwrap();
        let p = step(&mut s);
        assert_eq!(
            p.seqs,
            vec![
                ScheduledSeq {
                    seq: 1,
                    start: 10,
                    num_tokens: 1,
                    sample: true
                },
                ScheduledSeq {
                    seq: 2,
                    start: 0,
                    num_tokens: 5,
                    sample: true
                },
            ]
        );
        let done = s.finish(1).unwrap();
        assert_eq!(done.generated(), &[7, 7]);
        let p = step(&mut s);
        assert_eq!(
            p.seqs,
            vec![ScheduledSeq {
                seq: 2,
                start: 5,
                num_tokens: 1,
                sample: true
            }]
        );
        s.blocks().check_invariants().unwrap();
    }

    #[test]
    fn long_prompts_are_chunked_beside_decodes() {
        let mut s = sched(64, 4, cfg(8, 16, 128));
        s.add(1, vec![1; 3]).unwrap();
        step(&mut s);
        s.add(2, vec![2; 40]).unwrap();
        let p = step(&mut s);
        assert_eq!(
            p.seqs[0],
            ScheduledSeq {
                seq: 1,
                start: 3,
                num_tokens: 1,
                sample: true
            }
        );
        assert_eq!(
            p.seqs[1],
            ScheduledSeq {
                seq: 2,
                start: 0,
                num_tokens: 15,
                sample: false
            }
        );
        let p = step(&mut s);
        assert_eq!(
            p.seqs[1],
            ScheduledSeq {
                seq: 2,
                start: 15,
                num_tokens: 15,
                sample: false
            }
        );
        let p = step(&mut s);
        assert_eq!(
            p.seqs[1],
            ScheduledSeq {
                seq: 2,
                start: 30,
                num_tokens: 10,
                sample: true
            }
        );
        assert_eq!(p.num_tokens(), 11);
    }

    #[test]
    fn without_chunking_a_prompt_waits_for_a_whole_budget() {
        let c = SchedulerConfig {
            chunked_prefill: false,
            ..cfg(8, 32, 32)
        };
        let mut s = sched(64, 4, c);
        s.add(1, vec![1; 20]).unwrap();
        s.add(2, vec![2; 20]).unwrap();
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 1);
        let p = step(&mut s);
        assert_eq!(p.seqs.iter().map(|x| x.num_tokens).collect::<Vec<_>>(), vec![1, 20]);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_recomputes_it() {
        // 6 blocks of 4 tokens: two sequences of 8-token prompts take 4 blocks; growth exhausts it.
        let mut s = sched(6, 4, cfg(8, 64, 24));
        s.add(1, vec![1; 8]).unwrap();
        s.add(2, vec![2; 8]).unwrap();
        step(&mut s);
        let mut preempted = None;
        for _ in 0..12 {
            let p = step(&mut s);
            if let Some(&v) = p.preempted.first() {
                preempted = Some(v);
                assert!(p.seqs.iter().all(|x| x.seq != v));
                break;
            }
        }
        assert_eq!(preempted, Some(2));
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.sequence(2).unwrap().num_computed, 0);
        s.blocks().check_invariants().unwrap();
        s.finish(1);
        // Sequence 2 comes back with its tokens (prompt and what it generated) recomputed, mostly
        // from its own blocks still in the prefix cache.
        let p = step(&mut s);
        let len = s.sequence(2).unwrap().tokens.len() - 1;
        assert_eq!(p.seqs.len(), 1);
        let x = &p.seqs[0];
        assert_eq!(x.start + x.num_tokens, len);
        assert!(x.start >= 8, "prefix cache hit on recompute: start {}", x.start);
        assert_eq!(s.sequence(2).unwrap().num_preemptions, 1);
    }

    #[test]
    fn max_num_seqs_bounds_the_running_set() {
        let mut s = sched(64, 4, cfg(2, 64, 32));
        for id in 0..4 {
            s.add(id, vec![id as u32 + 1; 3]).unwrap();
        }
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 2);
        assert_eq!(s.num_waiting(), 2);
        s.finish(0);
        let p = step(&mut s);
        assert_eq!(p.seqs.iter().map(|x| x.seq).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn bad_prompts_and_limits_are_refused() {
        let mut s = sched(64, 4, cfg(2, 64, 32));
        assert_eq!(s.add(1, vec![]), Err(ScheduleError::EmptyPrompt));
        assert_eq!(
            s.add(1, vec![1; 33]),
            Err(ScheduleError::PromptTooLong { len: 33, max: 32 })
        );
        s.add(1, vec![1]).unwrap();
        assert_eq!(s.add(1, vec![1]), Err(ScheduleError::Duplicate(1)));
        assert!(matches!(
            Scheduler::new(cfg(2, 64, 1000), KvBlockManager::new(4, 4, true)),
            Err(ScheduleError::CacheTooSmall { .. })
        ));
        let c = SchedulerConfig {
            chunked_prefill: false,
            ..cfg(2, 16, 32)
        };
        assert!(matches!(
            Scheduler::new(c, KvBlockManager::new(64, 4, true)),
            Err(ScheduleError::BudgetTooSmall { .. })
        ));
    }

    #[test]
    fn fork_runs_the_child_next_to_its_parent() {
        let mut s = sched(64, 4, cfg(8, 64, 64));
        s.add(1, vec![1; 6]).unwrap();
        let p = s.schedule();
        s.complete(&p);
        s.fork(1, 2).unwrap();
        s.append_token(1, 10).unwrap();
        s.append_token(2, 20).unwrap();
        let p = s.schedule();
        assert_eq!(
            p.seqs.iter().map(|x| (x.seq, x.start)).collect::<Vec<_>>(),
            vec![(1, 6), (2, 6)]
        );
        // The second writer of the shared partial block gets a copy.
        assert_eq!(p.copies.len(), 1);
        s.complete(&p);
        s.blocks().check_invariants().unwrap();
    }
}

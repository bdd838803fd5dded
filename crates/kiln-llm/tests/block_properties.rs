//! Property tests for the KV block manager and the scheduler: random operation sequences over a
//! simulated KV arena. After every operation every block is accounted for (reference counts,
//! free list, prefix-cache map), every sequence reads back exactly its own tokens through its block
//! table (prefix sharing and copy-on-write never let one sequence see another's KV), and when all
//! sequences end every block is free.

use kiln_llm::{BlockError, KvBlockManager, Scheduler, SchedulerConfig, SeqId, TokenId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// The KV arena stand-in: slot `b * block_size + i` holds the token whose KV was written there.
struct Arena {
    block_size: usize,
    slots: Vec<Option<TokenId>>,
}

impl Arena {
    fn new(blocks: usize, block_size: usize) -> Self {
        Arena {
            block_size,
            slots: vec![None; blocks * block_size],
        }
    }
    fn write(&mut self, table: &[u32], pos: usize, tok: TokenId) {
        let b = table[pos / self.block_size] as usize;
        self.slots[b * self.block_size + pos % self.block_size] = Some(tok);
    }
    fn read(&self, table: &[u32], pos: usize) -> Option<TokenId> {
        let b = table[pos / self.block_size] as usize;
        self.slots[b * self.block_size + pos % self.block_size]
    }
    fn copy(&mut self, src: u32, dst: u32, n: usize) {
        let bs = self.block_size;
        for i in 0..n {
            self.slots[dst as usize * bs + i] = self.slots[src as usize * bs + i];
        }
    }
}

struct SeqModel {
    tokens: Vec<TokenId>,
    computed: usize,
}

/// Tokens from a small alphabet with shared prefixes so prefix-cache hits are frequent.
fn random_tokens(rng: &mut ChaCha8Rng, prefixes: &[Vec<TokenId>]) -> Vec<TokenId> {
    let mut t = if rng.random_bool(0.6) {
        prefixes[rng.random_range(0..prefixes.len())].clone()
    } else {
        vec![]
    };
    let extra = rng.random_range(1..20);
    t.extend((0..extra).map(|_| rng.random_range(0..4)));
    t
}

#[test]
fn block_manager_random_operations_keep_every_block_accounted_for() {
    // What the runs exercised, so the test cannot pass by never reaching a case.
    let (mut hits, mut copies, mut refusals) = (0, 0, 0);
    for seed in 0..150u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bs = rng.random_range(1..6);
        let nblocks = rng.random_range(4..40);
        let caching = seed % 5 != 0;
        let mut m = KvBlockManager::new(nblocks, bs, caching);
        let mut arena = Arena::new(nblocks, bs);
        let prefixes: Vec<Vec<TokenId>> = (0..3)
            .map(|_| (0..rng.random_range(1..12)).map(|_| rng.random_range(0..4)).collect())
            .collect();
        let mut seqs: HashMap<SeqId, SeqModel> = HashMap::new();
        let mut next_id = 0;
        for op in 0..400 {
            let ids: Vec<SeqId> = seqs.keys().copied().collect();
            let pick = |rng: &mut ChaCha8Rng| ids[rng.random_range(0..ids.len())];
            match rng.random_range(0..10) {
                0..=2 => {
                    let tokens = random_tokens(&mut rng, &prefixes);
                    let cached = m.cached_prefix_len(&tokens);
                    let n = rng.random_range(1..=tokens.len() - cached);
                    let id = next_id;
                    next_id += 1;
                    match m.admit(id, &tokens, n) {
                        Ok(hit) => {
                            assert_eq!(hit, cached);
                            hits += usize::from(hit > 0);
                            let table = m.block_table(id).unwrap().to_vec();
                            // The cache hit must already hold this prompt's tokens.
                            for (pos, &tok) in tokens.iter().enumerate().take(hit) {
                                assert_eq!(arena.read(&table, pos), Some(tok), "seed {seed} op {op}: stale hit");
                            }
                            for (pos, &tok) in tokens.iter().enumerate().skip(hit).take(n) {
                                arena.write(&table, pos, tok);
                            }
                            m.commit(id, &tokens, hit + n).unwrap();
                            seqs.insert(
                                id,
                                SeqModel {
                                    tokens,
                                    computed: hit + n,
                                },
                            );
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {
                            refusals += 1;
                            assert!(!m.contains(id));
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                3..=5 if !ids.is_empty() => {
                    // Compute the rest of the prompt or one new token.
                    let id = pick(&mut rng);
                    let s = seqs.get_mut(&id).unwrap();
                    if s.computed == s.tokens.len() {
                        s.tokens.push(rng.random_range(0..4));
                    }
                    let n = rng.random_range(1..=s.tokens.len() - s.computed);
                    match m.append_slots(id, n) {
                        Ok(copy) => {
                            if let Some(c) = copy {
                                copies += 1;
                                arena.copy(c.src, c.dst, c.num_tokens);
                            }
                            let table = m.block_table(id).unwrap().to_vec();
                            for pos in s.computed..s.computed + n {
                                arena.write(&table, pos, s.tokens[pos]);
                            }
                            s.computed += n;
                            m.commit(id, &s.tokens, s.computed).unwrap();
                        }
                        Err(BlockError::OutOfBlocks { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                6 if !ids.is_empty() => {
                    let parent = pick(&mut rng);
                    let child = next_id;
                    next_id += 1;
                    m.fork(parent, child).unwrap();
                    let s = &seqs[&parent];
                    let copy = SeqModel {
                        tokens: s.tokens[..s.computed].to_vec(),
                        computed: s.computed,
                    };
                    seqs.insert(child, copy);
                }
                7..=8 if !ids.is_empty() => {
                    let id = pick(&mut rng);
                    m.free(id);
                    seqs.remove(&id);
                }
                _ => {}
            }
            if let Err(e) = m.check_invariants() {
                panic!("seed {seed} op {op}: {e}");
            }
            for (id, s) in &seqs {
                let table = m.block_table(*id).unwrap();
                for pos in 0..s.computed {
                    assert_eq!(
                        arena.read(table, pos),
                        Some(s.tokens[pos]),
                        "seed {seed} op {op}: seq {id} pos {pos}"
                    );
                }
            }
        }
        for id in seqs.keys().copied().collect::<Vec<_>>() {
            m.free(id);
        }
        m.check_invariants().unwrap();
        assert_eq!(m.num_free_blocks(), nblocks, "seed {seed}: blocks leaked");
    }
    assert!(
        hits > 100 && copies > 100 && refusals > 100,
        "hits {hits}, copies {copies}, refusals {refusals}"
    );
}

#[test]
fn scheduler_random_workloads_finish_every_sequence_and_leak_nothing() {
    let (mut preemptions, mut hit_tokens, mut chunks) = (0, 0, 0);
    for seed in 0..60u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bs = rng.random_range(2..6);
        let max_model_len: usize = rng.random_range(16..48);
        let nblocks = max_model_len.div_ceil(bs) + rng.random_range(0..20);
        let cfg = SchedulerConfig {
            max_num_seqs: rng.random_range(1..8),
            max_num_batched_tokens: rng.random_range(1..64),
            max_model_len,
            chunked_prefill: true,
        };
        let mut s = Scheduler::new(cfg, KvBlockManager::new(nblocks, bs, seed % 3 != 0)).unwrap();
        let mut arena = Arena::new(nblocks, bs);
        let prefixes: Vec<Vec<TokenId>> = (0..2)
            .map(|_| (0..8).map(|_| rng.random_range(0..3)).collect())
            .collect();
        let mut target_len: HashMap<SeqId, usize> = HashMap::new();
        let mut finished = 0;
        let total = 25;
        let mut next = 0;
        for step in 0..5000 {
            if next < total && rng.random_bool(0.3) {
                let mut p = random_tokens(&mut rng, &prefixes);
                p.truncate(max_model_len - 1);
                target_len.insert(next, (p.len() + rng.random_range(1..10)).min(max_model_len));
                s.add(next, p).unwrap();
                next += 1;
            }
            let plan = s.schedule();
            for c in &plan.copies {
                arena.copy(c.src, c.dst, c.num_tokens);
            }
            for x in &plan.seqs {
                let table = s.block_table(x.seq).unwrap().to_vec();
                let seq = s.sequence(x.seq).unwrap();
                // Everything before the chunk is already in the cache (computed or a prefix hit).
                for pos in 0..x.start {
                    assert_eq!(
                        arena.read(&table, pos),
                        Some(seq.tokens[pos]),
                        "seed {seed} step {step}"
                    );
                }
                for pos in x.start..x.start + x.num_tokens {
                    arena.write(&table, pos, seq.tokens[pos]);
                }
            }
            assert!(plan.num_tokens() <= s.config().max_num_batched_tokens);
            chunks += plan.seqs.iter().filter(|x| !x.sample).count();
            assert!(s.num_running() <= s.config().max_num_seqs);
            s.complete(&plan);
            for x in plan.seqs.iter().filter(|x| x.sample) {
                let len = s.sequence(x.seq).unwrap().tokens.len();
                if len >= target_len[&x.seq] {
                    s.finish(x.seq);
                    finished += 1;
                } else {
                    s.append_token(x.seq, rng.random_range(0..3)).unwrap();
                }
            }
            s.blocks()
                .check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            if next == total && !s.has_work() {
                break;
            }
        }
        assert_eq!(finished, total, "seed {seed}: every sequence finishes");
        assert_eq!(s.blocks().num_free_blocks(), nblocks, "seed {seed}: blocks leaked");
        preemptions += s.num_preemptions();
        hit_tokens += s.blocks().prefix_cache_stats().hit_tokens;
    }
    assert!(
        preemptions > 20 && hit_tokens > 100 && chunks > 100,
        "{preemptions} {hit_tokens} {chunks}"
    );
}

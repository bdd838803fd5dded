//! Paged KV-cache bookkeeping: fixed-size blocks, a free list in eviction order, per-sequence block
//! tables, reference counts with copy-on-write, and automatic prefix caching.
//!
//! The manager owns no KV data. It hands out block ids; the engine's KV arena stores
//! `block_size` token slots per block and per layer, and performs the copies this manager asks for
//! ([`CopyOp`]) before a step writes into a block.
//!
//! Prefix caching follows vLLM's design: a full block is identified by the hash of its tokens
//! chained with its parent block's hash, so one block id can serve every sequence whose prefix
//! matches. A block whose last user finishes keeps its contents and hash and goes to the tail of
//! the free list; it is evicted (its hash forgotten) only when the free list hands it out again.
//! Blocks that hold nothing reusable go to the head so they are reused first. Unlike vLLM, a hit
//! is confirmed by comparing the block's tokens and parent hash, so a 64-bit hash collision can
//! never hand a sequence another prompt's KV.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Index of a block in the KV arena.
pub type BlockId = u32;
/// A sequence (one generated answer; `n > 1` forks one per answer).
pub type SeqId = u64;
/// A vocabulary id.
pub type TokenId = u32;

const NIL: u32 = u32::MAX;

/// Chained hash of a full block: its parent's hash and its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// The hash of `tokens` following the block hashed `parent` (`None` for the first block).
    pub fn of(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        let mut h = DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        tokens.hash(&mut h);
        BlockHash(h.finish())
    }
}

/// Why a block operation could not be done. Nothing was changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0} is not known to the block manager")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already has blocks")]
    DuplicateSequence(SeqId),
}

/// A copy the engine must perform on every layer's K and V before the step that writes `dst`:
/// slots `0..num_tokens` of block `src` into block `dst` (copy-on-write of a shared partial block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub src: BlockId,
    pub dst: BlockId,
    pub num_tokens: usize,
}

#[derive(Debug, Clone)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache (full, immutable).
    hash: Option<BlockHash>,
    parent: Option<BlockHash>,
    tokens: Vec<TokenId>,
    // Free-list links (NIL when not in the list).
    prev: u32,
    next: u32,
    in_free: bool,
}

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Token slots allocated (the table holds `ceil(num_slots / block_size)` blocks).
    num_slots: usize,
    /// Leading full blocks whose hashes are known (registered in the cache or found there).
    hashes: Vec<BlockHash>,
}

/// Prefix-cache counters, in tokens (vLLM's `prefix_cache_queries` / `prefix_cache_hits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

/// Block allocator and per-sequence block tables. See the module documentation.
#[derive(Debug)]
pub struct KvBlockManager {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
    seqs: HashMap<SeqId, SeqBlocks>,
    stats: PrefixCacheStats,
}

impl KvBlockManager {
    /// `num_blocks` blocks of `block_size` token slots each.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks < NIL as usize, "too many blocks");
        let mut m = KvBlockManager {
            block_size,
            prefix_caching,
            blocks: (0..num_blocks)
                .map(|_| Block {
                    ref_count: 0,
                    hash: None,
                    parent: None,
                    tokens: Vec::new(),
                    prev: NIL,
                    next: NIL,
                    in_free: false,
                })
                .collect(),
            free_head: NIL,
            free_tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
            seqs: HashMap::new(),
            stats: PrefixCacheStats::default(),
        };
        for b in 0..num_blocks as u32 {
            m.push_free_tail(b);
        }
        m
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Blocks that can be handed out (including evictable cached blocks).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }
    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.num_free
    }
    /// Share of blocks in use, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            0.0
        } else {
            self.num_used_blocks() as f64 / self.blocks.len() as f64
        }
    }
    /// Blocks holding reusable prefix-cache contents (in use or evictable).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }
    /// The sequence's block table, in token order.
    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }
    /// Token slots allocated to the sequence.
    pub fn num_slots(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_slots)
    }
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The cached blocks holding a prefix of `tokens`, longest first match, leaving at least one
    /// token uncomputed (a step must run on some token to produce logits). No side effects.
    fn lookup(&self, tokens: &[TokenId]) -> (Vec<BlockId>, Vec<BlockHash>) {
        let mut hit = Vec::new();
        let mut hashes = Vec::new();
        if !self.prefix_caching || tokens.is_empty() {
            return (hit, hashes);
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = BlockHash::of(parent, chunk);
            match self.cached.get(&h) {
                Some(&b) if self.blocks[b as usize].parent == parent && self.blocks[b as usize].tokens == chunk => {
                    hit.push(b);
                    hashes.push(h);
                    parent = Some(h);
                }
                _ => break,
            }
        }
        (hit, hashes)
    }

    /// Tokens of `tokens` a new sequence would find in the prefix cache now.
    pub fn cached_prefix_len(&self, tokens: &[TokenId]) -> usize {
        self.lookup(tokens).0.len() * self.block_size
    }

    /// Start `seq` with prompt (or recomputed) `tokens`: take the cached prefix blocks and allocate
    /// slots for the next `num_new_tokens` tokens after it. Returns the number of tokens found in
    /// the cache (their KV need not be computed). All or nothing.
    pub fn admit(&mut self, seq: SeqId, tokens: &[TokenId], num_new_tokens: usize) -> Result<usize, BlockError> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::DuplicateSequence(seq));
        }
        let (hit, hashes) = self.lookup(tokens);
        let cached_tokens = hit.len() * self.block_size;
        let total = self.blocks_for(cached_tokens + num_new_tokens);
        let new_blocks = total.saturating_sub(hit.len());
        // Hit blocks sitting in the free list stop being free once taken.
        let hit_free = hit.iter().filter(|&&b| self.blocks[b as usize].ref_count == 0).count();
        let available = self.num_free - hit_free;
        if new_blocks > available {
            return Err(BlockError::OutOfBlocks {
                needed: new_blocks,
                free: available,
            });
        }
        self.stats.queried_tokens += tokens.len() as u64;
        self.stats.hit_tokens += cached_tokens as u64;
        for &b in &hit {
            self.take_ref(b);
        }
        let mut blocks = hit;
        for _ in 0..new_blocks {
            blocks.push(self.pop_free());
        }
        self.seqs.insert(
            seq,
            SeqBlocks {
                blocks,
                num_slots: cached_tokens + num_new_tokens,
                hashes,
            },
        );
        Ok(cached_tokens)
    }

    /// Number of new blocks [`append_slots`](Self::append_slots) would need for `num_new_tokens`
    /// more tokens (including a copy-on-write block).
    pub fn blocks_needed_to_append(&self, seq: SeqId, num_new_tokens: usize) -> Result<usize, BlockError> {
        let s = self.seqs.get(&seq).ok_or(BlockError::UnknownSequence(seq))?;
        let grow = self.blocks_for(s.num_slots + num_new_tokens) - s.blocks.len();
        Ok(grow + usize::from(self.needs_cow(s, num_new_tokens)))
    }

    fn needs_cow(&self, s: &SeqBlocks, num_new_tokens: usize) -> bool {
        num_new_tokens > 0
            && s.num_slots % self.block_size != 0
            && s.blocks.last().is_some_and(|&b| self.blocks[b as usize].ref_count > 1)
    }

    /// Allocate slots for `num_new_tokens` more tokens of a running sequence. When the sequence's
    /// last block is partially filled and shared with another sequence (after [`fork`](Self::fork)),
    /// it is replaced by a private copy and the copy is returned. All or nothing.
    pub fn append_slots(&mut self, seq: SeqId, num_new_tokens: usize) -> Result<Option<CopyOp>, BlockError> {
        let needed = self.blocks_needed_to_append(seq, num_new_tokens)?;
        if needed > self.num_free {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.num_free,
            });
        }
        let s = &self.seqs[&seq];
        let cow = self.needs_cow(s, num_new_tokens);
        let grow = self.blocks_for(s.num_slots + num_new_tokens) - s.blocks.len();
        let mut copy = None;
        if cow {
            let dst = self.pop_free();
            let s = self.seqs.get_mut(&seq).expect("checked above");
            let last = s.blocks.len() - 1;
            let src = std::mem::replace(&mut s.blocks[last], dst);
            let num_tokens = s.num_slots % self.block_size;
            copy = Some(CopyOp { src, dst, num_tokens });
            self.drop_ref(src);
        }
        for _ in 0..grow {
            let b = self.pop_free();
            self.seqs.get_mut(&seq).expect("checked above").blocks.push(b);
        }
        self.seqs.get_mut(&seq).expect("checked above").num_slots += num_new_tokens;
        Ok(copy)
    }

    /// Record that the KV of `tokens[..num_computed]` is written: full blocks not yet hashed are
    /// registered in the prefix cache. `tokens` is the sequence's whole token list so far.
    pub fn commit(&mut self, seq: SeqId, tokens: &[TokenId], num_computed: usize) -> Result<(), BlockError> {
        let bs = self.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(BlockError::UnknownSequence(seq))?;
        if !self.prefix_caching {
            return Ok(());
        }
        let full = num_computed.min(tokens.len()).min(s.num_slots) / bs;
        while s.hashes.len() < full {
            let i = s.hashes.len();
            let parent = s.hashes.last().copied();
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = BlockHash::of(parent, chunk);
            s.hashes.push(h);
            let b = s.blocks[i];
            let blk = &mut self.blocks[b as usize];
            if blk.hash.is_some() {
                continue; // shared with a fork, or taken from the cache
            }
            if self.cached.contains_key(&h) {
                continue; // the same prefix was computed twice in one step; keep the first copy
            }
            blk.hash = Some(h);
            blk.parent = parent;
            blk.tokens = chunk.to_vec();
            self.cached.insert(h, b);
        }
        Ok(())
    }

    /// `child` shares every block of `parent` (`n > 1` answers from one prompt). Writing into a
    /// shared partial block later copies it first (see [`append_slots`](Self::append_slots)).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), BlockError> {
        if self.seqs.contains_key(&child) {
            return Err(BlockError::DuplicateSequence(child));
        }
        let s = self
            .seqs
            .get(&parent)
            .ok_or(BlockError::UnknownSequence(parent))?
            .clone();
        for &b in &s.blocks {
            self.take_ref(b);
        }
        self.seqs.insert(child, s);
        Ok(())
    }

    /// Release every block of `seq`. Blocks left with no user return to the free list: cached ones
    /// at the tail, the sequence's last blocks first so a shared prefix outlives its suffixes;
    /// the rest at the head. Unknown sequences are ignored (freeing is idempotent).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for &b in s.blocks.iter().rev() {
                self.drop_ref(b);
            }
        }
    }

    fn take_ref(&mut self, b: BlockId) {
        if self.blocks[b as usize].ref_count == 0 {
            self.unlink_free(b);
        }
        self.blocks[b as usize].ref_count += 1;
    }

    fn drop_ref(&mut self, b: BlockId) {
        let blk = &mut self.blocks[b as usize];
        debug_assert!(blk.ref_count > 0);
        blk.ref_count -= 1;
        if blk.ref_count == 0 {
            if blk.hash.is_some() {
                self.push_free_tail(b);
            } else {
                self.push_free_head(b);
            }
        }
    }

    /// Take the block at the head of the free list, evicting its cached contents.
    fn pop_free(&mut self) -> BlockId {
        let b = self.free_head;
        assert!(b != NIL, "pop_free on an empty free list (callers check num_free)");
        self.unlink_free(b);
        let blk = &mut self.blocks[b as usize];
        if let Some(h) = blk.hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        blk.parent = None;
        blk.tokens.clear();
        blk.ref_count = 1;
        b
    }

    fn unlink_free(&mut self, b: BlockId) {
        let (prev, next) = {
            let blk = &self.blocks[b as usize];
            debug_assert!(blk.in_free);
            (blk.prev, blk.next)
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NIL;
        blk.next = NIL;
        blk.in_free = false;
        self.num_free -= 1;
    }

    fn push_free_tail(&mut self, b: BlockId) {
        let tail = self.free_tail;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = tail;
            blk.next = NIL;
            blk.in_free = true;
        }
        if tail == NIL {
            self.free_head = b;
        } else {
            self.blocks[tail as usize].next = b;
        }
        self.free_tail = b;
        self.num_free += 1;
    }

    fn push_free_head(&mut self, b: BlockId) {
        let head = self.free_head;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = NIL;
            blk.next = head;
            blk.in_free = true;
        }
        if head == NIL {
            self.free_tail = b;
        } else {
            self.blocks[head as usize].prev = b;
        }
        self.free_head = b;
        self.num_free += 1;
    }

    /// Check that every block is accounted for: reference counts equal the number of block-table
    /// entries naming the block, exactly the unreferenced blocks are in the free list (once), the
    /// free count matches, cache entries name blocks carrying that hash, and every table has the
    /// blocks its slot count needs. Returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for (id, s) in &self.seqs {
            if s.blocks.len() != self.blocks_for(s.num_slots) {
                return Err(format!("seq {id}: {} blocks for {} slots", s.blocks.len(), s.num_slots));
            }
            if s.hashes.len() > s.blocks.len() {
                return Err(format!("seq {id}: more hashes than blocks"));
            }
            for &b in &s.blocks {
                refs[b as usize] += 1;
            }
        }
        let mut seen = vec![false; self.blocks.len()];
        let mut n = 0;
        let mut prev = NIL;
        let mut cur = self.free_head;
        while cur != NIL {
            if seen[cur as usize] {
                return Err(format!("block {cur} twice in the free list"));
            }
            seen[cur as usize] = true;
            let blk = &self.blocks[cur as usize];
            if blk.prev != prev || !blk.in_free {
                return Err(format!("free list links broken at block {cur}"));
            }
            n += 1;
            prev = cur;
            cur = blk.next;
        }
        if prev != self.free_tail {
            return Err("free list tail is wrong".into());
        }
        if n != self.num_free {
            return Err(format!("free list holds {n} blocks, count says {}", self.num_free));
        }
        for (b, blk) in self.blocks.iter().enumerate() {
            if blk.ref_count != refs[b] {
                return Err(format!(
                    "block {b}: ref_count {} but {} table entries",
                    blk.ref_count, refs[b]
                ));
            }
            if (blk.ref_count == 0) != seen[b] {
                return Err(format!(
                    "block {b}: ref_count {} and in free list = {}",
                    blk.ref_count, seen[b]
                ));
            }
            if let Some(h) = blk.hash {
                if self.cached.get(&h) != Some(&(b as BlockId)) {
                    return Err(format!("block {b} has a hash the cache does not map to it"));
                }
                if blk.tokens.len() != self.block_size {
                    return Err(format!("cached block {b} holds {} tokens", blk.tokens.len()));
                }
            }
        }
        for (h, &b) in &self.cached {
            if self.blocks[b as usize].hash != Some(*h) {
                return Err(format!("cache entry for block {b} does not match the block's hash"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<TokenId> {
        (0..n as u32).map(|i| base + i).collect()
    }

    #[test]
    fn admit_append_free_round_trip() {
        let mut m = KvBlockManager::new(8, 4, true);
        let t = toks(10, 0);
        assert_eq!(m.admit(1, &t, 10).unwrap(), 0);
        assert_eq!(m.block_table(1).unwrap().len(), 3);
        assert_eq!(m.num_free_blocks(), 5);
        // Two more tokens fill block 3; a third needs block 4.
        assert_eq!(m.append_slots(1, 2).unwrap(), None);
        assert_eq!(m.block_table(1).unwrap().len(), 3);
        m.append_slots(1, 1).unwrap();
        assert_eq!(m.block_table(1).unwrap().len(), 4);
        m.check_invariants().unwrap();
        m.free(1);
        assert_eq!(m.num_free_blocks(), 8);
        m.check_invariants().unwrap();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut m = KvBlockManager::new(2, 4, true);
        m.admit(1, &toks(5, 0), 5).unwrap();
        assert_eq!(
            m.admit(2, &toks(5, 100), 5),
            Err(BlockError::OutOfBlocks { needed: 2, free: 0 })
        );
        assert!(!m.contains(2));
        m.append_slots(1, 3).unwrap();
        assert!(matches!(m.append_slots(1, 1), Err(BlockError::OutOfBlocks { .. })));
        assert_eq!(m.num_slots(1), Some(8));
        m.check_invariants().unwrap();
    }

    #[test]
    fn a_finished_prompt_is_found_by_the_next_one() {
        let mut m = KvBlockManager::new(16, 4, true);
        let system = toks(8, 500);
        let mut a = system.clone();
        a.extend([1, 2, 3]);
        m.admit(1, &a, a.len()).unwrap();
        m.commit(1, &a, a.len()).unwrap();
        let shared: Vec<BlockId> = m.block_table(1).unwrap()[..2].to_vec();
        m.free(1);
        let mut b = system.clone();
        b.extend([9, 9]);
        assert_eq!(m.cached_prefix_len(&b), 8);
        assert_eq!(m.admit(2, &b, 2).unwrap(), 8);
        assert_eq!(&m.block_table(2).unwrap()[..2], &shared[..]);
        // A prompt that is exactly the cached blocks still leaves one token to compute.
        assert_eq!(m.cached_prefix_len(&system), 4);
        let stats = m.prefix_cache_stats();
        assert_eq!((stats.queried_tokens, stats.hit_tokens), (21, 8));
        m.check_invariants().unwrap();
    }

    #[test]
    fn concurrent_sequences_share_cached_blocks() {
        let mut m = KvBlockManager::new(16, 4, true);
        let p = toks(9, 0);
        m.admit(1, &p, 9).unwrap();
        m.commit(1, &p, 9).unwrap();
        assert_eq!(m.admit(2, &p, 1).unwrap(), 8);
        let t1 = m.block_table(1).unwrap().to_vec();
        let t2 = m.block_table(2).unwrap().to_vec();
        assert_eq!(t1[..2], t2[..2]);
        assert_ne!(t1[2], t2[2]);
        m.check_invariants().unwrap();
        m.free(1);
        m.free(2);
        assert_eq!(m.num_free_blocks(), 16);
        assert_eq!(m.num_cached_blocks(), 2);
        m.check_invariants().unwrap();
    }

    #[test]
    fn eviction_takes_uncached_blocks_first_then_the_oldest_cached() {
        let mut m = KvBlockManager::new(4, 2, true);
        let p = toks(5, 0); // two full blocks + one partial
        m.admit(1, &p, 5).unwrap();
        m.commit(1, &p, 5).unwrap();
        m.free(1);
        assert_eq!(m.num_cached_blocks(), 2);
        // Three new blocks: the partial one and the never-used one go first, then one cached block
        // (the deeper one: freed first, so it sits nearer the head).
        m.admit(2, &toks(6, 100), 6).unwrap();
        assert_eq!(m.num_cached_blocks(), 1);
        assert_eq!(m.cached_prefix_len(&p), 2);
        m.check_invariants().unwrap();
    }

    #[test]
    fn fork_shares_blocks_and_copies_the_partial_one_on_write() {
        let mut m = KvBlockManager::new(8, 4, true);
        let p = toks(6, 0);
        m.admit(1, &p, 6).unwrap();
        m.commit(1, &p, 6).unwrap();
        m.fork(1, 2).unwrap();
        assert_eq!(m.block_table(1), m.block_table(2));
        m.check_invariants().unwrap();
        let before = m.block_table(2).unwrap().to_vec();
        let copy = m.append_slots(2, 1).unwrap().expect("shared partial block is copied");
        assert_eq!(copy.src, before[1]);
        assert_eq!(copy.num_tokens, 2);
        let after = m.block_table(2).unwrap();
        assert_eq!(after[0], before[0]);
        assert_eq!(after[1], copy.dst);
        // The original owner now holds the old block alone and appends without a copy.
        assert_eq!(m.append_slots(1, 1).unwrap(), None);
        m.check_invariants().unwrap();
        m.free(1);
        m.free(2);
        assert_eq!(m.num_free_blocks(), 8);
        m.check_invariants().unwrap();
    }

    #[test]
    fn prefix_caching_off_never_shares() {
        let mut m = KvBlockManager::new(8, 4, false);
        let p = toks(9, 0);
        m.admit(1, &p, 9).unwrap();
        m.commit(1, &p, 9).unwrap();
        assert_eq!(m.admit(2, &p, 9).unwrap(), 0);
        assert_eq!(m.num_cached_blocks(), 0);
        m.check_invariants().unwrap();
    }

    #[test]
    fn lookalike_blocks_with_another_parent_do_not_hit() {
        let mut m = KvBlockManager::new(8, 2, true);
        let a = vec![1, 2, 3, 4, 5];
        m.admit(1, &a, 5).unwrap();
        m.commit(1, &a, 5).unwrap();
        // Same second block, different first block: the chain breaks at block 0.
        let b = vec![9, 9, 3, 4, 5];
        assert_eq!(m.cached_prefix_len(&b), 0);
    }
}

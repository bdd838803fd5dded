//! Operator family `text`: TfIdfVectorizer over integer tokens (string tensors are not supported).

use std::collections::HashMap;

use kiln_graph::DType;

use super::common::tin;
use super::{kernel, out1, NodeCtx, OpKernel, Registry};
use crate::{bail, Result, Tensor};

pub fn register(r: &mut Registry) {
    r.add("TfIdfVectorizer", tfidf_vectorizer);
}

#[derive(Clone, Copy, PartialEq)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

/// One trie node: `id` is the 1-based n-gram id (0 = no n-gram ends here).
#[derive(Default)]
struct GramNode {
    id: usize,
    children: Option<HashMap<i64, usize>>,
}

struct Trie {
    nodes: Vec<GramNode>,
}

impl Trie {
    fn has_leaves(&self, n: usize) -> bool {
        self.nodes
            .get(n)
            .and_then(|g| g.children.as_ref())
            .is_some_and(|c| !c.is_empty())
    }

    fn child(&self, n: usize, key: i64) -> Option<usize> {
        self.nodes.get(n)?.children.as_ref()?.get(&key).copied()
    }

    /// Returns the child for `key`, creating it (with id 0) when missing; `n` gets a child map.
    fn emplace(&mut self, n: usize, key: i64) -> usize {
        if let Some(c) = self.child(n, key) {
            return c;
        }
        let new = self.nodes.len();
        self.nodes.push(GramNode::default());
        if let Some(node) = self.nodes.get_mut(n) {
            node.children.get_or_insert_with(HashMap::new).insert(key, new);
        }
        new
    }
}

struct TfIdf {
    weighting: Weighting,
    min_gram: usize,
    max_gram: usize,
    max_skip: usize,
    ngram_indexes: Vec<usize>,
    output_size: usize,
    weights: Vec<f32>,
    trie: Trie,
}

fn tfidf_vectorizer(n: &NodeCtx) -> Result<Box<dyn OpKernel>> {
    let mode = n.attr_s("mode", "")?;
    let weighting = match mode.as_str() {
        "TF" => Weighting::Tf,
        "IDF" => Weighting::Idf,
        "TFIDF" => Weighting::TfIdf,
        m => return Err(n.err(format!("unknown mode '{m}'"))),
    };
    let min_gram = n.attr_i("min_gram_length", 0)?;
    let max_gram = n.attr_i("max_gram_length", 0)?;
    let max_skip = n.attr_i("max_skip_count", 0)?;
    if min_gram < 1 || max_gram < min_gram {
        return Err(n.err(format!(
            "bad gram lengths: min_gram_length {min_gram}, max_gram_length {max_gram}"
        )));
    }
    if max_skip < 0 {
        return Err(n.err("max_skip_count must be >= 0"));
    }
    if n.attr("pool_strings").is_some() {
        return Err(n.err("pool_strings (string tensors) are not supported"));
    }
    let pool = n.attr_ints("pool_int64s")?.unwrap_or_default();
    let ngram_counts = n.attr_ints("ngram_counts")?.unwrap_or_default();
    let idx_raw = n.attr_ints("ngram_indexes")?.unwrap_or_default();
    let mut ngram_indexes = Vec::with_capacity(idx_raw.len());
    for &i in &idx_raw {
        if i < 0 {
            return Err(n.err(format!("negative ngram index {i}")));
        }
        ngram_indexes.push(i as usize);
    }
    let output_size = ngram_indexes.iter().copied().max().map_or(0, |m| m + 1);
    let weights = n.attr_floats("weights")?.unwrap_or_default();
    if !weights.is_empty() && weights.len() < output_size {
        return Err(n.err(format!(
            "weights has {} values, the output has {output_size}",
            weights.len()
        )));
    }
    let (trie, ngram_id) =
        build_trie(&pool, &ngram_counts, min_gram as usize, max_gram as usize).map_err(|e| n.err(e))?;
    if ngram_id - 1 > ngram_indexes.len() {
        return Err(n.err(format!(
            "the pool defines {} n-grams but ngram_indexes has {}",
            ngram_id - 1,
            ngram_indexes.len()
        )));
    }
    let op = TfIdf {
        weighting,
        min_gram: min_gram as usize,
        max_gram: max_gram as usize,
        max_skip: max_skip as usize,
        ngram_indexes,
        output_size,
        weights,
        trie,
    };
    Ok(kernel(move |cx, ins| {
        let x = tin(ins, 0)?;
        if !matches!(x.dtype(), DType::I32 | DType::I64) {
            bail!("TfIdfVectorizer input must be int32 or int64, got {}", x.dtype());
        }
        let (rows, c, out_dims) = match x.dims() {
            [] => (1, 1, vec![op.output_size]),
            [c] => (1, *c, vec![op.output_size]),
            [b, c] => (*b, *c, vec![*b, op.output_size]),
            d => bail!("input must be [C] or [B, C], got {d:?}"),
        };
        cx.check_alloc((rows as u128) * (op.output_size as u128), DType::F32)?;
        let xs = x.to_i64_vec()?;
        let mut freq = vec![0u64; rows * op.output_size];
        for r in 0..rows {
            let row = xs.get(r * c..(r + 1) * c).unwrap_or(&[]);
            let f = freq
                .get_mut(r * op.output_size..(r + 1) * op.output_size)
                .unwrap_or(&mut []);
            op.count_row(row, f)?;
        }
        let mut y = vec![0f32; freq.len()];
        for (p, (&f, y)) in freq.iter().zip(y.iter_mut()).enumerate() {
            let w = op.weights.get(p % op.output_size.max(1)).copied();
            *y = match (op.weighting, w) {
                (Weighting::Tf, _) | (Weighting::TfIdf, None) => f as f32,
                (Weighting::Idf, Some(w)) => {
                    if f > 0 {
                        w
                    } else {
                        0.0
                    }
                }
                (Weighting::Idf, None) => (f > 0) as u8 as f32,
                (Weighting::TfIdf, Some(w)) => w * f as f32,
            };
        }
        let t = candle_core::Tensor::from_vec(y, out_dims.as_slice(), cx.device)?;
        out1(Tensor::new(t, DType::F32)?)
    }))
}

/// Builds the n-gram trie exactly like the reference implementation; returns it and the next id.
fn build_trie(
    pool: &[i64],
    ngram_counts: &[i64],
    min_gram: usize,
    max_gram: usize,
) -> std::result::Result<(Trie, usize), String> {
    let mut trie = Trie {
        nodes: vec![GramNode {
            id: 0,
            children: Some(HashMap::new()),
        }],
    };
    let total = pool.len();
    let mut ngram_id = 1usize;
    for (i, &start) in ngram_counts.iter().enumerate() {
        let ngram_size = i + 1;
        let end = ngram_counts.get(i + 1).copied().unwrap_or(total as i64);
        if start < 0 || end < start || end as usize > total {
            return Err(format!("bad ngram_counts {ngram_counts:?} for a pool of {total}"));
        }
        let items = (end - start) as usize;
        if items == 0 {
            continue;
        }
        let ngrams = items / ngram_size;
        if ngram_size >= min_gram && ngram_size <= max_gram {
            let mut idx = start as usize;
            for _ in 0..ngrams {
                let mut m = 0usize;
                let mut k = 1usize;
                while let Some(&tok) = pool.get(idx) {
                    let p = trie.emplace(m, tok);
                    idx += 1;
                    if k == ngram_size {
                        if let Some(node) = trie.nodes.get_mut(p) {
                            node.id = ngram_id;
                        }
                        ngram_id += 1;
                        break;
                    }
                    m = p;
                    k += 1;
                }
            }
        } else {
            ngram_id += ngrams;
        }
    }
    Ok((trie, ngram_id))
}

impl TfIdf {
    fn count_row(&self, row: &[i64], freq: &mut [u64]) -> Result<()> {
        let row_end = row.len();
        let mut start_size = self.min_gram;
        // Skips beyond the row length find nothing (and unigrams are counted once).
        let max_dist = (self.max_skip + 1).min(row_end.max(1));
        for skip in 1..=max_dist {
            let mut ngram_start = 0usize;
            while ngram_start < row_end {
                if ngram_start.saturating_add(skip.saturating_mul(start_size - 1)) >= row_end {
                    break;
                }
                let mut item = ngram_start;
                let mut node = 0usize;
                let mut size = 1usize;
                while self.trie.has_leaves(node) && size <= self.max_gram && item < row_end {
                    let Some(next) = row.get(item).and_then(|&v| self.trie.child(node, v)) else {
                        break;
                    };
                    let id = self.trie.nodes.get(next).map_or(0, |g| g.id);
                    if size >= start_size && id != 0 {
                        let Some(&oi) = self.ngram_indexes.get(id - 1) else {
                            bail!("n-gram id {id} has no ngram_indexes entry");
                        };
                        if let Some(f) = freq.get_mut(oi) {
                            *f += 1;
                        }
                    }
                    node = next;
                    size += 1;
                    item += skip;
                }
                ngram_start += 1;
            }
            if start_size == 1 {
                start_size += 1;
                if start_size > self.max_gram {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(min_gram: usize, max_gram: usize, max_skip: usize) -> TfIdf {
        // Unigrams 2 3 5 4, bigrams (5 6) (7 8), trigram (6 7 8).
        let pool = [2, 3, 5, 4, 5, 6, 7, 8, 6, 7, 8];
        let (trie, next) = build_trie(&pool, &[0, 4, 8], min_gram, max_gram).unwrap();
        assert_eq!(next, 8);
        TfIdf {
            weighting: Weighting::Tf,
            min_gram,
            max_gram,
            max_skip,
            ngram_indexes: (0..7).collect(),
            output_size: 7,
            weights: vec![],
            trie,
        }
    }

    fn counts(o: &TfIdf, row: &[i64]) -> Vec<u64> {
        let mut f = vec![0; o.output_size];
        o.count_row(row, &mut f).unwrap();
        f
    }

    #[test]
    fn unigrams_and_bigrams_without_skips() {
        let o = op(1, 2, 0);
        assert_eq!(counts(&o, &[2, 5, 6, 5, 6, 7, 8]), vec![1, 0, 2, 0, 2, 1, 0]);
    }

    #[test]
    fn skips_find_spread_bigrams_and_trigrams() {
        let o = op(2, 3, 1);
        // Expected counts checked against onnx.reference: skipped bigrams and a skipped trigram.
        assert_eq!(counts(&o, &[5, 1, 6, 7, 1, 8]), vec![0, 0, 0, 0, 1, 1, 0]);
        assert_eq!(counts(&o, &[6, 0, 7, 0, 8]), vec![0, 0, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn huge_skip_count_is_cheap_and_safe() {
        let o = op(1, 3, usize::MAX / 4);
        assert_eq!(counts(&o, &[7, 8]), vec![0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(counts(&o, &[]), vec![0; 7]);
    }

    #[test]
    fn bad_ngram_counts_are_errors() {
        assert!(build_trie(&[1, 2], &[0, 5], 1, 2).is_err());
        assert!(build_trie(&[1, 2], &[-1], 1, 2).is_err());
    }
}

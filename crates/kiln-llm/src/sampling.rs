//! Token sampling from one sequence's logits: penalties, temperature, top-k, top-p, min-p, seeded
//! random draws and log-probabilities, with the meaning OpenAI's and vLLM's parameters have.
//!
//! Order: repetition penalty (prompt and output tokens, as Hugging Face applies it), frequency and
//! presence penalties (output tokens, as OpenAI defines them), then temperature; temperature 0 is
//! greedy (the lowest id among equal maxima). Otherwise top-k, top-p and min-p cut the candidates
//! and one is drawn from the renormalised rest. Log-probabilities are those of the model's own
//! distribution (log-softmax of the raw logits), as vLLM reports them by default.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::block_manager::TokenId;

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// > 1 discourages tokens already in the prompt or output; 1 is off.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the output (-2..=2).
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurs in the output (-2..=2).
    pub presence_penalty: f32,
    /// Makes draws reproducible; answer `i` of `n` uses `seed + i`.
    pub seed: Option<u64>,
    /// Number of log-probabilities of the most likely tokens to return per position.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// Why parameters were refused (the API answers 400 with this text).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid sampling parameter {name}: {message}")]
pub struct InvalidParam {
    pub name: &'static str,
    pub message: String,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Check ranges as OpenAI and vLLM do.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |name, message: String| Err(InvalidParam { name, message });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", format!("must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = self.logprobs {
            if n > 20 {
                return bad("logprobs", format!("at most 20, got {n}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// A drawn token with its log-probability and, if asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// The token's log-probability under the model's distribution, when the request asked for
    /// log-probabilities (`SamplingParams::logprobs`): a softmax over the whole vocabulary per token.
    pub logprob: Option<f32>,
    /// `(token, logprob)`, most likely first.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The random stream of one answer. Seeded answers are reproducible.
#[derive(Debug, Clone)]
pub struct SamplerRng(ChaCha8Rng);

impl SamplerRng {
    /// Answer `index` of a request with `seed`, or a fresh random stream.
    pub fn new(seed: Option<u64>, index: u64) -> Self {
        match seed {
            Some(s) => SamplerRng(ChaCha8Rng::seed_from_u64(s.wrapping_add(index))),
            None => SamplerRng(ChaCha8Rng::from_rng(&mut rand::rng())),
        }
    }
}

/// Apply penalties in place. `prompt` and `output` are the sequence's tokens so far.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[TokenId], output: &[TokenId]) {
    if p.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &t in prompt.iter().chain(output) {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<TokenId, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

fn log_softmax_at(logits: &[f32], max: f32, log_sum: f32, t: usize) -> f32 {
    logits[t] - max - log_sum
}

fn max_and_log_sum(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = exp_shifted(logits, max).iter().map(|&e| e as f64).sum();
    (max, sum.ln() as f32)
}

/// `exp(l - max)` for every logit, vectorized (a vocabulary is tens of thousands of values per token).
fn exp_shifted(logits: &[f32], max: f32) -> Vec<f32> {
    let mut e: Vec<f32> = logits.iter().map(|&l| l - max).collect();
    kiln::paged::exp_in_place(&mut e);
    e
}

fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest logits, largest first (ties: lower id first).
fn top_indices(logits: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(logits.len());
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Draw one token. `logits` are the raw model logits (left unchanged); the penalties see the
/// sequence's `prompt` and `output` tokens.
pub fn sample(
    logits: &[f32],
    p: &SamplingParams,
    prompt: &[TokenId],
    output: &[TokenId],
    rng: &mut SamplerRng,
) -> Sampled {
    // The model's log-probabilities cost a softmax over the vocabulary: only when asked for.
    let raw = p.logprobs.map(|_| max_and_log_sum(logits));
    let raw_logprob = |t: usize| raw.map(|(max, log_sum)| log_softmax_at(logits, max, log_sum, t));
    let top_logprobs = match p.logprobs {
        Some(n) if n > 0 => top_indices(logits, n)
            .into_iter()
            .filter_map(|t| Some((t as TokenId, raw_logprob(t)?)))
            .collect(),
        _ => Vec::new(),
    };
    let penalised = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
    let token = if p.is_greedy() && !penalised {
        // The common case reads the logits in place (a vocabulary row is 200 KB).
        argmax(logits)
    } else {
        let mut l = logits.to_vec();
        apply_penalties(&mut l, p, prompt, output);
        if p.is_greedy() {
            argmax(&l)
        } else {
            draw(&mut l, p, rng)
        }
    };
    Sampled {
        token: token as TokenId,
        logprob: raw_logprob(token),
        top_logprobs,
    }
}

/// Temperature, truncation and the draw itself over penalised logits.
fn draw(l: &mut [f32], p: &SamplingParams, rng: &mut SamplerRng) -> usize {
    let inv_t = 1.0 / p.temperature;
    for x in l.iter_mut() {
        *x *= inv_t;
    }
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(l);
    }
    let truncated = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    if !truncated {
        // Plain softmax draw over the whole vocabulary, no sort.
        let probs: Vec<f64> = exp_shifted(l, max).iter().map(|&e| e as f64).collect();
        return pick(&probs, rng).unwrap_or_else(|| argmax(l));
    }
    // Candidates most likely first. With top-p alone, look at the best 256 first and fall back to
    // the whole vocabulary only if they do not reach top_p.
    let total: f64 = exp_shifted(l, max).iter().map(|&e| e as f64).sum();
    let mut k = if p.top_k > 0 {
        p.top_k.min(l.len())
    } else {
        l.len().min(256)
    };
    let mut cand = top_indices(l, k);
    if p.top_k == 0 && p.top_p < 1.0 {
        let mass: f64 = cand.iter().map(|&i| ((l[i] - max) as f64).exp()).sum::<f64>() / total;
        if mass < p.top_p as f64 && k < l.len() {
            k = l.len();
            cand = top_indices(l, k);
        }
    }
    let mut probs: Vec<f64> = cand.iter().map(|&i| ((l[i] - max) as f64).exp() / total).collect();
    if p.top_p < 1.0 {
        // Renormalise over the top-k survivors first, as vLLM does.
        let kept: f64 = probs.iter().sum();
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (j, &q) in probs.iter().enumerate() {
            cum += q / kept;
            if cum >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        probs.truncate(keep);
    }
    match pick(&probs, rng) {
        Some(j) => cand[j],
        None => cand[0],
    }
}

/// Index drawn with probability proportional to `weights`.
fn pick(weights: &[f64], rng: &mut SamplerRng) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let mut u = rng.0.random::<f64>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return Some(i);
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 3.0, -1.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_logprobs() {
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let s = sample(&logits(), &p, &[], &[], &mut SamplerRng::new(Some(0), 0));
        assert_eq!(s.token, 1);
        let (max, ls) = max_and_log_sum(&logits());
        assert!((s.logprob.unwrap() - (3.0 - max - ls)).abs() < 1e-6);
        let plain = sample(
            &logits(),
            &SamplingParams::greedy(),
            &[],
            &[],
            &mut SamplerRng::new(Some(0), 0),
        );
        assert_eq!(
            (plain.token, plain.logprob),
            (1, None),
            "no softmax when no log-probabilities are asked"
        );
        assert_eq!(s.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = logits().iter().map(|&l| (l - max - ls).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let p = SamplingParams {
            seed: Some(42),
            ..Default::default()
        };
        let draw_all = |seed| {
            let mut rng = SamplerRng::new(Some(seed), 0);
            (0..4000)
                .map(|_| sample(&logits(), &p, &[], &[], &mut rng).token)
                .collect::<Vec<_>>()
        };
        let a = draw_all(42);
        assert_eq!(a, draw_all(42));
        assert_ne!(a, draw_all(43));
        // Empirical frequencies within 3 points of softmax.
        let (max, ls) = max_and_log_sum(&logits());
        for t in 0..6 {
            let want = (logits()[t] - max - ls).exp();
            let got = a.iter().filter(|&&x| x as usize == t).count() as f32 / a.len() as f32;
            assert!((got - want).abs() < 0.03, "token {t}: {got} vs {want}");
        }
    }

    #[test]
    fn truncation_keeps_only_the_allowed_tokens() {
        let mut rng = SamplerRng::new(Some(1), 0);
        let cases: [(SamplingParams, &[u32]); 3] = [
            (
                SamplingParams {
                    top_k: 2,
                    ..Default::default()
                },
                &[1, 3],
            ),
            // softmax of the logits: the two 3.0s hold 0.384 each, 2.0 holds 0.141: top_p 0.8 needs 1, 3, 2.
            (
                SamplingParams {
                    top_p: 0.8,
                    ..Default::default()
                },
                &[1, 2, 3],
            ),
            (
                SamplingParams {
                    min_p: 0.5,
                    ..Default::default()
                },
                &[1, 3],
            ),
        ];
        for (p, allowed) in cases {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..500 {
                seen.insert(sample(&logits(), &p, &[], &[], &mut rng).token);
            }
            assert_eq!(seen.into_iter().collect::<Vec<_>>(), allowed, "{p:?}");
        }
    }

    #[test]
    fn top_p_over_a_flat_vocabulary_falls_back_to_every_token() {
        let l = vec![0.0f32; 1000];
        let p = SamplingParams {
            top_p: 0.9,
            seed: Some(3),
            ..Default::default()
        };
        let mut rng = SamplerRng::new(p.seed, 0);
        let max = (0..2000)
            .map(|_| sample(&l, &p, &[], &[], &mut rng).token)
            .max()
            .unwrap();
        assert!(max > 500, "draws reach past the first 256 candidates: {max}");
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let greedy = SamplingParams::greedy();
        let rep = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy.clone()
        };
        // Token 1 was in the prompt: 3.0 / 2 = 1.5, so token 3 wins.
        assert_eq!(
            sample(&logits(), &rep, &[1], &[], &mut SamplerRng::new(Some(0), 0)).token,
            3
        );
        let freq = SamplingParams {
            frequency_penalty: 0.6,
            ..greedy.clone()
        };
        // Tokens 1 and 3 appeared twice in the output: 3.0 - 1.2 = 1.8 < token 2's 2.0.
        let out = [3, 3, 1, 1];
        assert_eq!(
            sample(&logits(), &freq, &[], &out, &mut SamplerRng::new(Some(0), 0)).token,
            2
        );
        let pres = SamplingParams {
            presence_penalty: 1.5,
            ..greedy
        };
        assert_eq!(
            sample(&logits(), &pres, &[], &[1, 3], &mut SamplerRng::new(Some(0), 0)).token,
            2
        );
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            },
            SamplingParams {
                logprobs: Some(21),
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        let l = vec![f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        let mut rng = SamplerRng::new(Some(0), 0);
        for p in [
            SamplingParams::default(),
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            SamplingParams::greedy(),
        ] {
            let s = sample(&l, &p, &[], &[], &mut rng);
            assert!((s.token as usize) < l.len());
        }
    }
}

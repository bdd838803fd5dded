//! Paged serving against the model as exported: greedy decoding of 8 prompts of different lengths
//! through the engine (one continuous batch: prompts join at different steps, long ones are
//! chunked beside decode tokens, blocks are scattered) must give the same tokens as Kiln running
//! the original ONNX graph with dense `past_key_values`, one prompt at a time. A step whose two
//! best dense logits differ by less than 1e-4 may legitimately diverge and is reported instead;
//! the last-token logits of both paths must agree within 1e-3 at every step (fp32 activations).
//!
//! Models: the 4-layer SmolLM2 built by `models/fetch.sh --llm` under `$KILN_MODELS/llm/` (Llama:
//! grouped KV heads, RoPE, RMSNorm; without `KILN_MODELS` that test prints SKIP and passes, with
//! `KILN_MODELS_REQUIRED=1`, the README's test command, it fails instead), and the committed tiny
//! exports: GPT-2-style `models/llm/gpt2-tiny` (multi-head attention, learned positions, LayerNorm),
//! the same with ONNX `Attention` (`gpt2-tiny-attn23`), and ONNX Runtime GenAI's form (`genai-tiny`).

use std::path::PathBuf;
use std::sync::Arc;

use kiln::{Level, Session, TensorData};
use kiln_llm::{Engine, EngineConfig, Event, LlmModel, ModelGeometry, Request, SchedulerConfig};

fn model_dir() -> Option<PathBuf> {
    kiln_llm::testing::model_dir(kiln_llm::testing::SMALL_MODEL)
}

/// Greedy decoding with the dense graph: prefill, then one token per step with the presents fed
/// back as pasts. Returns the tokens and the logits each token was chosen from.
fn dense_greedy(s: &Session, g: &ModelGeometry, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut past: Vec<TensorData> = (0..2 * g.num_layers)
        .map(|i| {
            let name = format!("past_key_values.{}.{}", i / 2, if i % 2 == 0 { "key" } else { "value" });
            TensorData::from_values(name, vec![1, g.num_kv_heads, 0, g.head_dim], &[] as &[f32]).unwrap()
        })
        .collect();
    let mut tokens = prompt.to_vec();
    let mut feed_from = 0;
    let (mut out, mut all_logits) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let new: Vec<i64> = tokens[feed_from..].iter().map(|&t| t as i64).collect();
        let pos: Vec<i64> = (feed_from as i64..tokens.len() as i64).collect();
        let mut feeds = vec![
            (
                "input_ids".to_string(),
                TensorData::from_values("input_ids", vec![1, new.len()], &new).unwrap(),
            ),
            (
                "attention_mask".to_string(),
                TensorData::from_values("attention_mask", vec![1, tokens.len()], &vec![1i64; tokens.len()]).unwrap(),
            ),
            (
                "position_ids".to_string(),
                TensorData::from_values("position_ids", vec![1, new.len()], &pos).unwrap(),
            ),
        ];
        feeds.extend(past.drain(..).map(|t| (t.name.clone(), t)));
        // Only what the graph declares (ONNX Runtime GenAI's export has no position_ids).
        feeds.retain(|(name, _)| s.inputs().iter().any(|i| &i.name == name));
        let outs = s.run(feeds).unwrap();
        let logits = outs[0].values::<f32>().unwrap();
        let v = logits.len() / new.len();
        let last = logits[(new.len() - 1) * v..].to_vec();
        let next = argmax(&last);
        // present.N.key/value -> past_key_values.N.key/value, by name (exports order them differently).
        past = outs[1..]
            .iter()
            .zip(&s.outputs()[1..])
            .map(|(t, o)| {
                let mut t = t.clone();
                t.name = o.name.replacen("present", "past_key_values", 1);
                t
            })
            .collect();
        feed_from = tokens.len();
        tokens.push(next);
        out.push(next);
        all_logits.push(last);
    }
    (out, all_logits)
}

fn argmax(x: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[b] {
            b = i;
        }
    }
    b as u32
}

fn margin(x: &[f32]) -> f32 {
    let mut v = x.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

#[test]
fn paged_continuous_batch_matches_dense_past_decoding() {
    let Some(dir) = model_dir() else { return };
    check_paged_against_dense(&dir);
}

/// The GPT-2-style export (`models/llm/make_gpt2.py`: multi-head attention with no KV-head repeat,
/// learned positions, LayerNorm, GELU, fused QKV, scores divided by sqrt(d)), committed in the
/// repository, so this runs everywhere.
#[test]
fn gpt2_style_export_matches_too() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/llm/gpt2-tiny");
    check_paged_against_dense(&dir);
}

/// ONNX Runtime GenAI's export form (`models/llm/make_genai_tiny.py`, a tiny random Llama:
/// `com.microsoft::GroupQueryAttention` with packed QKV and the rotary embedding inside, positions
/// from the attention mask, SkipSimplifiedLayerNormalization), committed in the repository.
#[test]
fn onnxruntime_genai_export_matches_too() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/llm/genai-tiny");
    check_paged_against_dense(&dir);
}

/// Its int4 build (`--int4`: MatMulNBits weights, a GatherBlockQuantized embedding).
#[test]
fn onnxruntime_genai_int4_export_matches_too() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/llm/genai-tiny-int4");
    check_paged_against_dense(&dir);
}

/// The same decoder written with ONNX's own `Attention` (opset 23) taking `past_key`/`past_value`
/// (`make_gpt2.py --attention-op`): the rewrite replaces the operator rather than a decomposed chain.
#[test]
fn onnx_attention_op_export_matches_too() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/llm/gpt2-tiny-attn23");
    check_paged_against_dense(&dir);
}

fn check_paged_against_dense(dir: &std::path::Path) {
    const NEW_TOKENS: usize = 10;
    // Token ids from a fixed generator; lengths cover one token, block boundaries (16, 17) and
    // prompts longer than the step budget (chunked).
    let lengths = [1usize, 5, 16, 17, 23, 40, 3, 70];
    let mut seed = 12345u64;
    let model = Arc::new(LlmModel::load(dir, Level::All).unwrap());
    let vocab = model.geometry().vocab_size as u64;
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect();

    let g = model.geometry().clone();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 48,
            max_model_len: 256,
            chunked_prefill: true,
        },
        block_size: 16,
        // 64 blocks of 16 tokens: K and V, every layer and KV head, f32.
        kv_cache_bytes: 64 * (2 * g.num_layers * 16 * g.num_kv_heads * g.head_dim * 4),
        ..Default::default()
    };
    let mut engine = Engine::new(model.clone(), &cfg).unwrap();
    // Half the prompts start at once, the rest join while the first ones decode.
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut got_logprobs: Vec<Vec<Vec<(u32, f32)>>> = vec![Vec::new(); prompts.len()];
    let mut pending: Vec<usize> = (0..prompts.len()).collect();
    let mut steps = 0;
    let mut mixed_steps = 0;
    while !pending.is_empty() || engine.has_work() {
        if !pending.is_empty() && (steps == 0 || steps % 3 == 2) {
            for _ in 0..2.min(pending.len()) {
                let i = pending.remove(0);
                let mut r = Request::greedy(prompts[i].clone(), NEW_TOKENS);
                r.ignore_eos = true;
                r.params.logprobs = Some(5);
                engine.add_request(i as u64, r).unwrap();
            }
        }
        let before = engine.stats();
        let events = engine.step();
        let after = engine.stats();
        let decoded = events.len();
        if after.prompt_tokens_computed > before.prompt_tokens_computed && decoded > 0 {
            mixed_steps += 1;
        }
        for e in events {
            match e {
                Event::Token { request, sampled, .. } => {
                    got[request as usize].push(sampled.token);
                    got_logprobs[request as usize].push(sampled.top_logprobs);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        steps += 1;
        assert!(steps < 1000, "engine does not finish");
    }
    assert!(mixed_steps > 0, "no step mixed prefill and decode");
    assert_eq!(
        engine.scheduler().blocks().num_free_blocks(),
        engine.scheduler().blocks().num_blocks()
    );

    let dense = Session::builder()
        .optimization(Level::All)
        .build_from_file(dir.join("model.onnx"))
        .unwrap();
    let mut diverged = Vec::new();
    let mut worst = 0.0f32;
    for (i, p) in prompts.iter().enumerate() {
        let (want, logits) = dense_greedy(&dense, &g, p, NEW_TOKENS);
        assert_eq!(got[i].len(), NEW_TOKENS, "prompt {i}: token count");
        let first_diff = (0..NEW_TOKENS).find(|&k| got[i][k] != want[k]);
        if let Some(k) = first_diff {
            let m = margin(&logits[k]);
            assert!(
                m < 1e-4,
                "prompt {i} (len {}): step {k}: paged {} vs dense {} (margin {m})",
                p.len(),
                got[i][k],
                want[k]
            );
            diverged.push((i, k, m));
        }
        // Log-probabilities of the top tokens agree up to the first divergence (after it the two
        // paths decode different texts).
        for k in 0..first_diff.unwrap_or(NEW_TOKENS) {
            let l = &logits[k];
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + l.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
            assert_eq!(got_logprobs[i][k].len(), 5);
            for &(t, lp) in &got_logprobs[i][k] {
                let d = (lp - (l[t as usize] - lse)).abs();
                worst = worst.max(d);
                assert!(
                    d <= 1e-3,
                    "prompt {i} step {k} token {t}: logprob {lp} vs dense {}",
                    l[t as usize] - lse
                );
            }
        }
    }
    eprintln!(
        "{steps} steps, {mixed_steps} mixing prefill and decode; max |logprob diff| {worst:.2e}; near-tie divergences: {diverged:?}"
    );
}

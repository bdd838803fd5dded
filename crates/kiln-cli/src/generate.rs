//! `kiln generate`: one answer from an LLM directory (model.onnx, config.json, tokenizer files),
//! streamed to stdout as it is generated, with the timings on stderr. The same engine and text
//! layer as `kiln serve`'s `[llm]` models, on a one-request service.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln::paged::{KvDType, PagedKvConfig};
use kiln::Level;
use kiln_llm::text::{self, Prompt, TextEvent, TextRequest};
use kiln_llm::{ChatMessage, EngineConfig, FinishReason, LlmModel, LlmService, LlmTokenizer, SamplingParams};
use kiln_llm::{ModelGeometry, SchedulerConfig};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory: model.onnx (a decoder with KV-cache inputs), config.json (or ONNX Runtime
    /// GenAI's genai_config.json), tokenizer.json and tokenizer_config.json (generation_config.json
    /// optional).
    model_dir: PathBuf,
    /// The prompt (with --chat, the user message).
    #[arg(long, short = 'p')]
    prompt: String,
    /// Render the prompt through the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message before the user message (needs --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, short = 't', default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to P (1 keeps all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the K most likely tokens (0 or -1 keeps all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: i64,
    /// Makes sampling reproducible.
    #[arg(long)]
    seed: Option<u64>,
    /// End the answer before this string (repeatable).
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (up to --max-tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Graph optimization level: disabled, basic, extended or all (see `kiln run --help`).
    #[arg(long, default_value = "all")]
    level: Level,
    /// KV-cache size in MiB (default: enough for one sequence of --max-model-len tokens).
    #[arg(long, value_name = "MIB")]
    kv_cache_mb: Option<usize>,
    /// Prompt plus answer tokens at most (default: the model's context length up to 4096; never
    /// more than the context length).
    #[arg(long, value_name = "N")]
    max_model_len: Option<usize>,
}

const BLOCK_SIZE: usize = 16;
/// As `kiln serve`'s `llm.max_model_len`: bounds the default KV cache of long-context models.
const DEFAULT_MAX_MODEL_LEN: usize = 4096;

pub fn generate(args: GenerateArgs) -> Result<()> {
    let dir = &args.model_dir;
    check_dir(dir)?;
    let top_k = match args.top_k {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => bail!("--top-k must be -1, 0 or positive, got {k}"),
    };
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.validate()?;

    let loading = Instant::now();
    let geometry = ModelGeometry::from_dir(dir)?;
    let max_model_len = match args.max_model_len {
        Some(0) => bail!("--max-model-len must be positive"),
        Some(n) => n.min(geometry.max_position_embeddings),
        None => geometry.max_position_embeddings.min(DEFAULT_MAX_MODEL_LEN),
    };
    let kv = PagedKvConfig {
        num_layers: geometry.num_layers,
        num_blocks: 0,
        block_size: BLOCK_SIZE,
        num_kv_heads: geometry.num_kv_heads,
        head_dim: geometry.head_dim,
        dtype: KvDType::F32,
    };
    let kv_cache_bytes = match args.kv_cache_mb {
        Some(mb) => mb.checked_mul(1 << 20).context("--kv-cache-mb is too large")?,
        None => max_model_len.div_ceil(BLOCK_SIZE) * kv.bytes_per_block(),
    };
    if kv_cache_bytes / kv.bytes_per_block() * BLOCK_SIZE < max_model_len {
        bail!(
            "a KV cache of {} MiB holds {} tokens of this model, fewer than --max-model-len {max_model_len}; raise --kv-cache-mb (at least {}) or lower --max-model-len",
            kv_cache_bytes >> 20,
            kv_cache_bytes / kv.bytes_per_block() * BLOCK_SIZE,
            (max_model_len.div_ceil(BLOCK_SIZE) * kv.bytes_per_block()).div_ceil(1 << 20)
        );
    }
    let model = LlmModel::load(dir, args.level).with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer =
        LlmTokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    if tokenizer.vocab_size() > model.geometry().vocab_size {
        bail!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            model.geometry().vocab_size
        );
    }
    let engine = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 1,
            max_num_batched_tokens: 512,
            max_model_len,
            chunked_prefill: true,
        },
        block_size: BLOCK_SIZE,
        kv_cache_bytes,
        kv_dtype: KvDType::F32,
        prefix_caching: false,
    };
    let service = LlmService::start(Arc::new(model), &engine, 1)?;
    let tokenizer = Arc::new(tokenizer);
    let loaded = loading.elapsed();

    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: args.prompt,
        });
        Prompt::Chat(messages)
    } else {
        Prompt::Text(args.prompt)
    };
    let req = TextRequest {
        params,
        max_tokens: args.max_tokens,
        stop: args.stop.into_iter().filter(|s| !s.is_empty()).collect(),
        ignore_eos: args.ignore_eos,
        ..TextRequest::new(prompt)
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = Instant::now();
    let mut stream = text::start(&service, &tokenizer, req)?;
    let (mut first, mut last) = (None::<Duration>, None::<Duration>);
    let mut finish = None;
    let mut stdout = std::io::stdout().lock();
    rt.block_on(async {
        while let Some(event) = stream.next().await {
            match event {
                TextEvent::Delta { text, .. } => {
                    let at = started.elapsed();
                    first.get_or_insert(at);
                    last = Some(at);
                    if !text.is_empty() {
                        stdout
                            .write_all(text.as_bytes())
                            .and_then(|()| stdout.flush())
                            .map_err(crate::stdout_error)?;
                    }
                }
                TextEvent::Finished { reason, .. } => finish = Some(reason),
                TextEvent::Failed(m) => bail!("generation failed: {m}"),
            }
        }
        Ok(())
    })?;
    // End the answer's line when the answer did not.
    writeln!(stdout)
        .and_then(|()| stdout.flush())
        .map_err(crate::stdout_error)?;
    drop(stdout);

    let generated = stream.completion_tokens();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let decode = match (first, last) {
        (Some(f), Some(l)) if generated > 1 => format!(
            "{:.1} ms/token ({:.1} tokens/s)",
            ms(l - f) / (generated - 1) as f64,
            (generated - 1) as f64 / (l - f).as_secs_f64().max(1e-9)
        ),
        _ => "-".into(),
    };
    // stderr may be closed; the answer is already out.
    let _ = writeln!(
        std::io::stderr(),
        "prompt tokens: {}, generated tokens: {generated}, time to first token: {}, decode: {decode}, finish reason: {} (model loaded in {:.2} s)",
        stream.prompt_tokens(),
        first.map_or("-".into(), |f| format!("{:.1} ms", ms(f))),
        finish.map_or("-", FinishReason::as_str),
        loaded.as_secs_f64()
    );
    Ok(())
}

/// A clear error for a path that is not a model directory, before the loaders' own.
fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{}: no such model directory (expected model.onnx, config.json and tokenizer.json in it)",
            dir.display()
        );
    }
    // The geometry comes from Hugging Face's config.json, or ONNX Runtime GenAI's genai_config.json.
    let has = |f: &str| dir.join(f).exists();
    let missing: Vec<&str> = [
        ("model.onnx", has("model.onnx")),
        (
            "config.json (or genai_config.json)",
            has("config.json") || has("genai_config.json"),
        ),
        ("tokenizer.json", has("tokenizer.json")),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(f, _)| f)
    .collect();
    if !missing.is_empty() {
        bail!("{}: missing {}", dir.display(), missing.join(", "));
    }
    Ok(())
}

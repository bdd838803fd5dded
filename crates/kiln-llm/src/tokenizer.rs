//! Text <-> token ids for an LLM, from a Hugging Face model directory.
//!
//! `tokenizer.json` is run by the `tokenizers` crate (pure Rust: the `fancy-regex` backend, no
//! Oniguruma), with any truncation or padding it configures switched off: the server decides
//! lengths. `tokenizer_config.json` (optional) gives the chat template and the special-token
//! strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`); a `chat_template.jinja` file
//! beside it takes precedence, as in transformers. `generation_config.json` (optional) adds its
//! `eos_token_id`s to [`LlmTokenizer::eos_token_ids`].
//!
//! Special tokens written in the text (`<|im_end|>`) are always recognised as the special token,
//! as transformers and llama.cpp (`special=True`) do; `add_special_tokens` only controls what the
//! post-processor adds around the text (a BOS for Llama-style tokenizers).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::chat::{ChatMessage, ChatTemplate, SpecialTokens};

/// Everything that can go wrong loading a tokenizer, coding text or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a tokenizer the `tokenizers` crate can load: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path} is not valid JSON: {source}")]
    ConfigJson { path: PathBuf, source: serde_json::Error },
    #[error("{path}: `{field}` {problem}")]
    Config {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("token id {id} is outside the vocabulary (ids 0..{vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("the tokenizer has no chat template (tokenizer_config.json has no `chat_template`)")]
    NoChatTemplate,
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    #[error("chat template failed to render: {0}")]
    TemplateRender(String),
    /// The template called `raise_exception(message)`: typically a conversation it does not
    /// accept (roles not alternating, a system message where none is allowed).
    #[error("chat template raised an exception: {0}")]
    TemplateException(String),
}

/// A model's tokenizer, special tokens and chat template. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct LlmTokenizer {
    inner: tokenizers::Tokenizer,
    /// Highest id + 1, added tokens included.
    vocab_size: usize,
    special_ids: HashSet<u32>,
    special: SpecialTokens,
    eos_ids: Vec<u32>,
    template: Option<ChatTemplate>,
}

impl LlmTokenizer {
    /// Loads `dir/tokenizer.json` (required), `dir/tokenizer_config.json`, `dir/chat_template.jinja`
    /// and `dir/generation_config.json` (each optional). A chat template that does not compile is
    /// an error here, not at the first request.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let text = read(&tok_path)?;
        let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e: tokenizers::Error| TokenizerError::Load {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;
        inner.with_truncation(None).map_err(|e| TokenizerError::Load {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;
        inner.with_padding(None);

        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();

        let mut tok = LlmTokenizer {
            inner,
            vocab_size,
            special_ids,
            special: SpecialTokens::default(),
            eos_ids: Vec::new(),
            template: None,
        };

        let cfg_path = dir.join("tokenizer_config.json");
        let mut template_src = None;
        if cfg_path.exists() {
            let cfg = read_json(&cfg_path)?;
            tok.special = SpecialTokens {
                bos_token: special_token_string(&cfg, "bos_token", &cfg_path)?,
                eos_token: special_token_string(&cfg, "eos_token", &cfg_path)?,
                unk_token: special_token_string(&cfg, "unk_token", &cfg_path)?,
                pad_token: special_token_string(&cfg, "pad_token", &cfg_path)?,
            };
            template_src = chat_template_from_config(&cfg, &cfg_path)?;
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            template_src = Some(read(&jinja_path)?);
        }
        if let Some(src) = template_src {
            tok.template = Some(ChatTemplate::new(src)?);
        }

        let mut eos_ids: Vec<u32> = tok
            .special
            .eos_token
            .as_deref()
            .and_then(|s| tok.token_to_id(s))
            .into_iter()
            .collect();
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen = read_json(&gen_path)?;
            let bad = |problem: String| TokenizerError::Config {
                path: gen_path.clone(),
                field: "eos_token_id",
                problem,
            };
            let ids = match gen.get("eos_token_id") {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::Array(a)) => a
                    .iter()
                    .map(json_id)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(format!("has a non-id entry: {gen}")))?,
                Some(v) => vec![json_id(v).ok_or_else(|| bad(format!("is not a token id: {v}")))?],
            };
            for id in ids {
                if id as usize >= tok.vocab_size {
                    return Err(bad(format!(
                        "{id} is outside the vocabulary (ids 0..{})",
                        tok.vocab_size
                    )));
                }
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        tok.eos_ids = eos_ids;
        Ok(tok)
    }

    /// Token ids of `text`. Special tokens written in the text become their ids;
    /// `add_special_tokens` lets the post-processor add its tokens (a BOS, if it has one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. Ids outside the vocabulary are an error. Bytes that do not form valid UTF-8
    /// (a character cut between tokens) decode to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids (highest id + 1, added tokens included): the logits width.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The vocabulary entry of `id` (byte-level BPE: in the GPT-2 byte alphabet, `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special added token (`<|im_end|>`), the ones `skip_special_tokens` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos_token.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos_token.as_deref()
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|s| self.token_to_id(s))
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|s| self.token_to_id(s))
    }

    /// Ids that end generation: `eos_token`'s id, then `generation_config.json`'s `eos_token_id`s
    /// (SmolLM2: `[2, 0]`, `<|im_end|>` and `<|endoftext|>`), without repeats.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_ref().map(ChatTemplate::source)
    }

    /// Replaces the chat template (for a model whose files have none, or a deployment override).
    /// The template is compiled now; on error the current one stays.
    pub fn set_chat_template(&mut self, template: String) -> Result<(), TokenizerError> {
        self.template = Some(ChatTemplate::new(template)?);
        Ok(())
    }

    /// The prompt text for `messages`, rendered as transformers' `apply_chat_template(tokenize=False)`
    /// does. Encode the result with `add_special_tokens = false`: the template writes the specials.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let t = self.template.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        t.render(messages, add_generation_prompt, &self.special)
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }
}

fn read(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    serde_json::from_str(&read(path)?).map_err(|source| TokenizerError::ConfigJson {
        path: path.to_path_buf(),
        source,
    })
}

fn json_id(v: &Json) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// `"<s>"`, or transformers' serialized AddedToken `{"content": "<s>", ...}`, or null / absent.
fn special_token_string(cfg: &Json, field: &'static str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match cfg.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(v @ Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config {
                path: path.to_path_buf(),
                field,
                problem: format!("is an object without a string `content`: {v}"),
            }),
        },
        Some(v) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            field,
            problem: format!("is neither a string nor an added token: {v}"),
        }),
    }
}

/// `chat_template`: a string, or a list of `{"name", "template"}` from which transformers takes
/// the one named `default`.
fn chat_template_from_config(cfg: &Json, path: &Path) -> Result<Option<String>, TokenizerError> {
    let bad = |problem: String| TokenizerError::Config {
        path: path.to_path_buf(),
        field: "chat_template",
        problem,
    };
    match cfg.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut named = HashMap::new();
            for item in list {
                match (
                    item.get("name").and_then(Json::as_str),
                    item.get("template").and_then(Json::as_str),
                ) {
                    (Some(n), Some(t)) => {
                        named.insert(n, t);
                    }
                    _ => {
                        return Err(bad(format!(
                            "has an entry without string `name` and `template`: {item}"
                        )))
                    }
                }
            }
            match named.get("default") {
                Some(t) => Ok(Some((*t).to_string())),
                None => Err(bad(format!(
                    "is a list of named templates without one named `default` (names: {:?})",
                    named.keys().collect::<Vec<_>>()
                ))),
            }
        }
        Some(v) => Err(bad(format!("is neither a string nor a list of named templates: {v}"))),
    }
}

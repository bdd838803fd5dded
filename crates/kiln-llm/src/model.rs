//! A decoder loaded for paged serving: the ONNX model with its KV-cache attention rewritten into
//! `ai.kiln::PagedAttention` (see `kiln::paged`), its geometry from `config.json` (Hugging Face
//! keys), and one model step over a flat token batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln::paged::{PagedKvCache, PagedRewriteOptions, PagedSeq, PagedStep, LOGITS_INDICES};
use kiln::{Device, Level, RunOptions, Session, TensorData};

use crate::block_manager::TokenId;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("loading the decoder: {0}")]
    Load(#[source] Box<kiln::Error>),
    #[error("model step: {0}")]
    Run(#[source] Box<kiln::Error>),
    #[error("model step: {0}")]
    Output(String),
}

/// Model geometry, read from `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelGeometry {
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest context the model was trained for (`max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// End-of-sequence ids (`generation_config.json`'s `eos_token_id`, else `config.json`'s).
    pub eos_token_ids: Vec<TokenId>,
}

impl ModelGeometry {
    /// Read `config.json` (and `generation_config.json` if present) from a model directory; without
    /// a `config.json`, ONNX Runtime GenAI's `genai_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let genai = dir.join("genai_config.json");
        if !path.exists() && genai.exists() {
            return Self::from_genai_config(&genai);
        }
        let c = read_json(&path)?;
        let get = |k: &str| -> Result<usize, ModelError> {
            c.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config {
                    path: path.clone(),
                    reason: format!("'{k}' is missing or not a non-negative integer"),
                })
        };
        let num_heads = get("num_attention_heads")?;
        let hidden = get("hidden_size")?;
        let head_dim = match c.get("head_dim").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None if num_heads > 0 => hidden / num_heads,
            None => 0,
        };
        let num_kv_heads = c
            .get("num_key_value_heads")
            .and_then(|v| v.as_u64())
            .map_or(num_heads, |v| v as usize);
        let gen_path = dir.join("generation_config.json");
        let mut eos = if gen_path.exists() {
            token_ids(read_json(&gen_path)?.get("eos_token_id"))
        } else {
            Vec::new()
        };
        if eos.is_empty() {
            eos = token_ids(c.get("eos_token_id"));
        }
        let g = ModelGeometry {
            num_layers: get("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: get("vocab_size")?,
            max_position_embeddings: get("max_position_embeddings")?,
            eos_token_ids: eos,
        };
        g.checked(path)
    }

    /// ONNX Runtime GenAI's `genai_config.json`: `model.decoder.{num_hidden_layers,
    /// num_attention_heads, num_key_value_heads, head_size, hidden_size}`, `model.{vocab_size,
    /// context_length, eos_token_id}`.
    fn from_genai_config(path: &Path) -> Result<Self, ModelError> {
        let c = read_json(path)?;
        let model = c.get("model").cloned().unwrap_or_default();
        let decoder = model.get("decoder").cloned().unwrap_or_default();
        let get = |obj: &serde_json::Value, k: &str| -> Result<usize, ModelError> {
            obj.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config {
                    path: path.into(),
                    reason: format!("'{k}' is missing or not a non-negative integer"),
                })
        };
        let num_heads = get(&decoder, "num_attention_heads")?;
        let head_dim = match decoder.get("head_size").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => get(&decoder, "hidden_size")? / num_heads.max(1),
        };
        let g = ModelGeometry {
            num_layers: get(&decoder, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: get(&decoder, "num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            vocab_size: get(&model, "vocab_size")?,
            max_position_embeddings: get(&model, "context_length")?,
            eos_token_ids: token_ids(model.get("eos_token_id")),
        };
        g.checked(path.into())
    }

    fn checked(self, path: PathBuf) -> Result<Self, ModelError> {
        let g = self;
        if g.num_layers == 0 || g.num_heads == 0 || g.num_kv_heads == 0 || g.head_dim == 0 || g.vocab_size == 0 {
            return Err(ModelError::Config {
                path,
                reason: format!("every dimension must be positive: {g:?}"),
            });
        }
        Ok(g)
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(p).map_err(|e| ModelError::Config {
        path: p.into(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: p.into(),
        reason: e.to_string(),
    })
}

/// A token id or a list of them (`eos_token_id` comes in both forms).
fn token_ids(v: Option<&serde_json::Value>) -> Vec<TokenId> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as TokenId]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as TokenId).collect(),
        _ => Vec::new(),
    }
}

/// One sequence's share of a model step.
#[derive(Debug, Clone)]
pub struct StepSeq<'a> {
    /// The tokens to run (positions `start..start + tokens.len()`).
    pub tokens: &'a [TokenId],
    pub start: usize,
    pub block_table: &'a [u32],
    /// Return logits for the last token.
    pub sample: bool,
}

/// A paged decoder session.
pub struct LlmModel {
    session: Session,
    geometry: ModelGeometry,
    has_attention_mask: bool,
    has_position_ids: bool,
    selects_logits: bool,
    dir: PathBuf,
}

impl std::fmt::Debug for LlmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmModel")
            .field("dir", &self.dir)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl LlmModel {
    /// Load `dir/model.onnx` with `dir/config.json`, rewritten for paged attention, on the CPU.
    pub fn load(dir: &Path, level: Level) -> Result<Self, ModelError> {
        let geometry = ModelGeometry::from_dir(dir)?;
        let session = Session::builder()
            .device(Device::Cpu)
            .optimization(level)
            .paged_attention(PagedRewriteOptions::default())
            .build_from_file(dir.join("model.onnx"))
            .map_err(|e| ModelError::Load(Box::new(e)))?;
        let rw = session.paged_rewrite().expect("built with paged attention").clone();
        if rw.num_layers != geometry.num_layers {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                reason: format!(
                    "config.json says {} layers; the model has {} KV-cache attention layers",
                    geometry.num_layers, rw.num_layers
                ),
            });
        }
        for (what, got, want) in [
            ("KV heads", rw.num_kv_heads, geometry.num_kv_heads),
            ("head size", rw.head_dim, geometry.head_dim),
        ] {
            if got.is_some_and(|g| g != want) {
                return Err(ModelError::Config {
                    path: dir.join("config.json"),
                    reason: format!(
                        "{what}: config.json says {want}, the model's past inputs {}",
                        got.unwrap_or(0)
                    ),
                });
            }
        }
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name.as_str()).collect();
        for n in &names {
            if !matches!(*n, "input_ids" | "attention_mask" | "position_ids" | LOGITS_INDICES) {
                return Err(ModelError::Config {
                    path: dir.join("model.onnx"),
                    reason: format!("after the paged rewrite the model still needs input '{n}'"),
                });
            }
        }
        if !names.contains(&"input_ids") {
            return Err(ModelError::Config {
                path: dir.join("model.onnx"),
                reason: "no input_ids input".into(),
            });
        }
        Ok(LlmModel {
            has_attention_mask: names.contains(&"attention_mask"),
            has_position_ids: names.contains(&"position_ids"),
            selects_logits: names.contains(&LOGITS_INDICES),
            session,
            geometry,
            dir: dir.to_path_buf(),
        })
    }

    pub fn geometry(&self) -> &ModelGeometry {
        &self.geometry
    }
    pub fn session(&self) -> &Session {
        &self.session
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run one step: write the KV of every sequence's tokens into `cache` and return the
    /// last-token logits of the sequences with `sample`, in order.
    pub fn step(&self, cache: &Arc<PagedKvCache>, seqs: &[StepSeq]) -> Result<Logits, ModelError> {
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut ids = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut paged = Vec::with_capacity(seqs.len());
        let mut rows = Vec::new();
        for s in seqs {
            let start = ids.len();
            ids.extend(s.tokens.iter().map(|&x| x as i64));
            pos.extend((s.start..s.start + s.tokens.len()).map(|p| p as i64));
            paged.push(PagedSeq {
                query_start: start,
                num_query: s.tokens.len(),
                context_len: s.start + s.tokens.len(),
                block_table: s.block_table.to_vec(),
            });
            if s.sample {
                rows.push((ids.len() - 1) as i64);
            }
        }
        let tensor = |name: &str, dims: Vec<usize>, v: &[i64]| {
            TensorData::from_values(name, dims, v).map_err(|e| ModelError::Output(e.to_string()))
        };
        let mut feeds = vec![("input_ids".to_string(), tensor("input_ids", vec![1, t], &ids)?)];
        if self.has_position_ids {
            feeds.push(("position_ids".into(), tensor("position_ids", vec![1, t], &pos)?));
        }
        if self.has_attention_mask {
            feeds.push((
                "attention_mask".into(),
                tensor("attention_mask", vec![1, t], &vec![1; t])?,
            ));
        }
        if self.selects_logits {
            feeds.push((LOGITS_INDICES.into(), tensor(LOGITS_INDICES, vec![rows.len()], &rows)?));
        }
        let options = RunOptions {
            paged_kv: Some(Arc::new(PagedStep {
                cache: cache.clone(),
                seqs: paged,
            })),
            // One step is hundreds of small parallel kernels (a decode step's matrix-vector
            // products): run it inside the pool so they do not wake it from outside one by one.
            on_thread_pool: true,
            ..self.session.run_options().clone()
        };
        let (outs, _) = self
            .session
            .run_with_options(feeds, &options)
            .map_err(|e| ModelError::Run(Box::new(e)))?;
        let logits = outs
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::Output("no outputs".into()))?;
        let v = self.geometry.vocab_size;
        let picks: Vec<usize> = if self.selects_logits {
            (0..rows.len()).collect()
        } else {
            rows.iter().map(|&r| r as usize).collect()
        };
        // Read in place (the logits of 32 sequences are 6 MB a step); copy only when misaligned.
        let values = match logits.f32_slice() {
            Some(_) => None,
            None => Some(
                logits
                    .values::<f32>()
                    .ok_or_else(|| ModelError::Output(format!("logits are {}, not f32", logits.dtype)))?,
            ),
        };
        let out = Logits {
            data: logits,
            values,
            rows: picks,
            vocab: v,
        };
        let have = out.all().len() / v.max(1);
        if let Some(&r) = out.rows.iter().find(|&&r| r >= have || out.all().len() % v != 0) {
            return Err(ModelError::Output(format!(
                "logits {:?} do not hold row {r} of {v}",
                out.data.dims
            )));
        }
        Ok(out)
    }
}

/// The logits a step returns: one vocabulary row per sampled sequence, read in place from the
/// model's output.
#[derive(Debug)]
pub struct Logits {
    data: TensorData,
    /// The values when the output could not be read in place.
    values: Option<Vec<f32>>,
    /// Output row of each sampled sequence, in step order.
    rows: Vec<usize>,
    vocab: usize,
}

impl Logits {
    fn all(&self) -> &[f32] {
        match &self.values {
            Some(v) => v,
            None => self.data.f32_slice().unwrap_or_default(),
        }
    }

    /// Sampled sequences in this step.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The `i`-th sampled sequence's logits (`vocab_size` values).
    pub fn row(&self, i: usize) -> &[f32] {
        let r = self.rows[i];
        &self.all()[r * self.vocab..(r + 1) * self.vocab]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ONNX Runtime GenAI's `genai_config.json` gives the same geometry as the Hugging Face
    /// `config.json` of the same model (the committed tiny GenAI export has both).
    #[test]
    fn genai_config_gives_the_config_json_geometry() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/llm/genai-tiny");
        let from_hf = ModelGeometry::from_dir(&src).unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-genai-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("genai_config.json"), dir.join("genai_config.json")).unwrap();
        let from_genai = ModelGeometry::from_dir(&dir).unwrap();
        assert_eq!(from_genai, from_hf);
        // A broken one is a clear error naming the key.
        std::fs::write(dir.join("genai_config.json"), r#"{"model": {"decoder": {}}}"#).unwrap();
        let err = ModelGeometry::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

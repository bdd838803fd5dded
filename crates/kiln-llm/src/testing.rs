//! Where tests find the LLM test models: `$KILN_MODELS/llm/<name>`, built by `models/fetch.sh --llm`.

use std::path::PathBuf;

/// The 4-layer SmolLM2 with f16 weights (quick to load; tests of mechanics use it).
pub const SMALL_MODEL: &str = "smollm2-135m-4l-fp16";

/// `$KILN_MODELS/llm/<name>` when it holds `model.onnx`. Otherwise `None` after printing `SKIP` with
/// the reason, so a bare offline `cargo test` passes; with `KILN_MODELS_REQUIRED` set (the README's
/// test command) it panics instead, so CI never skips.
pub fn model_dir(name: &str) -> Option<PathBuf> {
    let reason = match std::env::var_os("KILN_MODELS") {
        Some(m) => {
            let dir = PathBuf::from(m).join("llm").join(name);
            if dir.join("model.onnx").exists() {
                return Some(dir);
            }
            format!("{} is missing (run models/fetch.sh --llm)", dir.display())
        }
        None => "KILN_MODELS is not set".to_string(),
    };
    assert!(
        std::env::var_os("KILN_MODELS_REQUIRED").is_none(),
        "{reason} (KILN_MODELS_REQUIRED is set)"
    );
    eprintln!("SKIP: {reason}");
    None
}

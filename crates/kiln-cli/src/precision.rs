//! The `--precision` flag shared by `kiln run` and `kiln bench`.

use kiln::Precision;

/// Numeric precision of the session.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PrecisionArg {
    /// fp32 (the model as written), fp16 (f16 weights and activations, f32 accumulation and
    /// inputs/outputs) or int8-weight (MatMul/Gemm weights in int8 with per-channel scales;
    /// activations stay float).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
}

//! `kiln quantize in.onnx out.onnx [--mode int8-weight|dynamic-int8|int4-weight|fp16] [--min-elements N]`:
//! rewrites MatMul/Gemm weights to int8 with one scale per output channel and prints what it
//! quantized with the weight bytes before and after. Every mode writes standard ONNX that
//! onnxruntime runs: `int8-weight` puts `DequantizeLinear` before the weights (activations and
//! products stay float); `dynamic-int8` quantizes MatMul activations at run time
//! (DynamicQuantizeLinear) and multiplies in integers (MatMulInteger), the form of onnxruntime's
//! `quantize_dynamic`; `int4-weight` stores MatMul weights as 4-bit codes with a scale and zero
//! point per `--block-size` values along K (`com.microsoft::MatMulNBits`, the form of onnxruntime's
//! `MatMul4BitsQuantizer` and its int4 LLM builds); `fp16` converts the graph to f16 weights and compute with the model's inputs
//! and outputs and the overflow-prone ops kept f32 behind Casts (the conversion `kiln optimize
//! --precision fp16` and fp16 sessions use, without optimizing the graph; docs/precision.md).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln::internals::onnx;

/// Settings of one `kiln quantize` run.
pub struct QuantizeConfig {
    pub mode: String,
    pub min_elements: usize,
    /// `int4-weight`: values per block along K.
    pub block_size: usize,
}

pub fn quantize(input: &Path, output: &Path, cfg: &QuantizeConfig) -> Result<()> {
    let mode = cfg.mode.as_str();
    match mode {
        "int8-weight" | "int8" | "dynamic-int8" | "int4-weight" | "int4" => {}
        "fp16" | "float16" => return to_fp16(input, output),
        other => bail!("unknown --mode '{other}' (int8-weight, dynamic-int8, int4-weight, fp16)"),
    }
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let report = match mode {
        "dynamic-int8" => kiln::quantize::quantize_model_dynamic(&mut model, cfg.min_elements),
        "int4-weight" | "int4" => kiln::quantize::quantize_model_int4(&mut model, cfg.min_elements, cfg.block_size),
        _ => kiln::quantize::quantize_model(&mut model, cfg.min_elements, true),
    }
    .context("quantizing the weights")?;
    let kind = if mode.starts_with("int4") { "int4" } else { "int8" };
    let bytes = onnx::export_model_bytes(&model).context("exporting the quantized model")?;
    crate::output::write(output, &bytes)?;

    for w in &report.weights {
        let readers = if w.readers > 1 {
            format!(", {} readers", w.readers)
        } else {
            String::new()
        };
        outln!("{kind}  {:?} axis {}  {}{readers}", w.dims, w.axis, w.name);
    }
    for (name, why) in &report.skipped {
        outln!("f32   {name}: {why}");
    }
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    outln!(
        "quantized {} weight(s): {:.2} MiB -> {:.2} MiB ({:.1}x smaller)",
        report.weights.len(),
        mib(report.bytes_before),
        mib(report.bytes_after),
        report.bytes_before as f64 / report.bytes_after.max(1) as f64
    );
    wrote(input, output, bytes.len())
}

/// `--mode fp16`: the fp16 conversion alone, with its report and the file sizes.
fn to_fp16(input: &Path, output: &Path) -> Result<()> {
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let report = kiln::convert_model_to_float16(&mut model).context("converting to fp16")?;
    let bytes = onnx::export_model_bytes(&model).context("exporting the fp16 model")?;
    crate::output::write(output, &bytes)?;
    outln!("{report}");
    wrote(input, output, bytes.len())
}

/// The closing line: the written file's size beside the input's.
fn wrote(input: &Path, output: &Path, len: usize) -> Result<()> {
    let before = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    outln!("wrote {} ({len} bytes; input {before} bytes)", output.display());
    Ok(())
}

//! `kiln quantize in.onnx out.onnx [--mode int8-weight] [--min-elements N]`: rewrites MatMul/Gemm
//! weights to int8 with one scale per output channel (`DequantizeLinear` nodes, standard ONNX that
//! onnxruntime runs) and prints what it quantized with the weight bytes before and after.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln::internals::onnx;

/// Settings of one `kiln quantize` run.
pub struct QuantizeConfig {
    pub mode: String,
    pub min_elements: usize,
}

pub fn quantize(input: &Path, output: &Path, cfg: &QuantizeConfig) -> Result<()> {
    if !matches!(cfg.mode.as_str(), "int8-weight" | "int8") {
        bail!("unknown --mode '{}' (int8-weight)", cfg.mode);
    }
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let report =
        kiln::quantize::quantize_model(&mut model, cfg.min_elements, true).context("quantizing the weights")?;
    let bytes = onnx::export_model_bytes(&model).context("exporting the quantized model")?;
    crate::output::write(output, &bytes)?;

    for w in &report.weights {
        let readers = if w.readers > 1 {
            format!(", {} readers", w.readers)
        } else {
            String::new()
        };
        outln!("int8  {:?} axis {}  {}{readers}", w.dims, w.axis, w.name);
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
    let before = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    outln!(
        "wrote {} ({} bytes; input {} bytes)",
        output.display(),
        bytes.len(),
        before
    );
    Ok(())
}

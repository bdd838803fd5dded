//! `kiln optimize in.onnx out.onnx --level extended`: runs the graph optimizer and writes the
//! result as ONNX, printing node counts by operator before and after.
//!
//! Unlike an in-memory session, the written model must stay valid for other runtimes: fusions only
//! emit default-domain ops the model's opset declares (others go to `com.microsoft`, which ONNX
//! Runtime implements), and constant folding may grow the file by at most `--fold-limit` bytes
//! per folded node. `--precision fp16` then converts the graph to fp16 (docs/precision.md).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use kiln::internals::{graph, onnx, runtime};
use kiln::{Level, Precision};

/// Settings of one `kiln optimize` run.
pub struct OptimizeConfig {
    pub level: Level,
    pub fold_limit: usize,
    /// `Precision::F16` converts the optimized graph to fp16 (`kiln::convert_model_to_float16`).
    pub precision: Precision,
}

pub fn optimize(input: &Path, output: &Path, cfg: &OptimizeConfig) -> Result<()> {
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    let before = onnx::op_counts(&model.graph);
    let level = match cfg.level {
        Level::Disabled => graph::passes::OptLevel::Disabled,
        Level::Basic => graph::passes::OptLevel::Basic,
        Level::Extended => graph::passes::OptLevel::Extended,
        Level::All => graph::passes::OptLevel::All,
    };
    let mut options = graph::passes::Options::for_model(&model, level);
    options.strict_opsets = true;
    options.max_fold_growth_bytes = cfg.fold_limit;
    let report =
        graph::passes::optimize(&mut model.graph, &options, &runtime::CpuConstEval).context("optimizing the graph")?;
    let fp16 = match cfg.precision {
        Precision::F32 => None,
        Precision::F16 => Some(kiln::convert_model_to_float16(&mut model).context("converting to fp16")?),
        other => anyhow::bail!("kiln optimize cannot write precision {other:?}"),
    };
    let after = onnx::op_counts(&model.graph);
    let bytes = onnx::export_model_bytes(&model).context("exporting the optimized model")?;
    crate::output::write(output, &bytes)?;

    outln!("{:>8}  {:>8}  op", "before", "after");
    let ops: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for op in ops {
        let (b, a) = (
            before.get(op).copied().unwrap_or(0),
            after.get(op).copied().unwrap_or(0),
        );
        outln!("{b:>8}  {a:>8}  {op}{}", if a != b { "  *" } else { "" });
    }
    outln!("{:>8}  {:>8}  total", report.nodes_before, report.nodes_after);
    for (rule, n) in &report.rewrites {
        outln!("rule {rule}: {n}");
    }
    if let Some(r) = fp16 {
        outln!("{r}");
    }
    outln!("wrote {} ({} bytes)", output.display(), bytes.len());
    Ok(())
}

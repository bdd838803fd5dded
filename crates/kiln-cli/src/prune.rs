//! `kiln prune in.onnx out.onnx (--amount F | --structured N:M) [--exclude OP_OR_NODE ...]`: magnitude
//! pruning of MatMul/Gemm/Conv weights (`kiln_graph::passes::prune`), written as ONNX with the same ops
//! and shapes (zeros stored densely: any runtime runs it; Kiln runs it as a dense model, no sparse
//! kernel). Prints each weight's zeros before and after and the overall sparsity.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln::internals::{graph, onnx};

/// Settings of one `kiln prune` run.
pub struct PruneConfig {
    pub amount: Option<f64>,
    pub structured: Option<String>,
    pub exclude: Vec<String>,
}

pub fn prune(input: &Path, output: &Path, cfg: &PruneConfig) -> Result<()> {
    use graph::passes::prune::{prune_weights, PruneMode};
    let mode = match (cfg.amount, cfg.structured.as_deref()) {
        (Some(f), None) => PruneMode::Unstructured(f),
        (None, Some(nm)) => {
            let parsed = nm
                .split_once(':')
                .and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)));
            let Some((n, m)) = parsed else {
                bail!("--structured {nm:?} is not N:M (e.g. 2:4)");
            };
            PruneMode::NOfM { n, m }
        }
        _ => bail!("give exactly one of --amount F (0 <= F < 1) and --structured N:M"),
    };
    let mut model = onnx::load_model(input).with_context(|| format!("loading {}", input.display()))?;
    // Filters an exporter wrote as Constant nodes are weights too.
    graph::passes::edit::constants_to_initializers(&mut model.graph);
    let report = prune_weights(&mut model.graph, &mode, &cfg.exclude).context("pruning the weights")?;
    let bytes = onnx::export_model_bytes(&model).context("exporting the pruned model")?;
    crate::output::write(output, &bytes)?;
    for w in &report.weights {
        let n: usize = w.dims.iter().product();
        outln!(
            "pruned {:?}  zeros {} -> {} ({:.1}%)  {}",
            w.dims,
            w.zeros_before,
            w.zeros_after,
            100.0 * w.zeros_after as f64 / n.max(1) as f64,
            w.name
        );
    }
    for (name, why) in &report.skipped {
        outln!("kept   {name}: {why}");
    }
    outln!(
        "pruned {} weight(s) to {:.1}% zeros; wrote {} ({} bytes)",
        report.weights.len(),
        100.0 * report.sparsity(),
        output.display(),
        bytes.len()
    );
    Ok(())
}

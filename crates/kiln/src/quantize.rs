//! Weight quantization (int8, dynamic int8, block-wise int4): the graph transforms (`kiln quantize`,
//! [`crate::Precision::Int8WeightOnly`]) and the fusion that lets the runtime keep int8 weights in int8.

use kiln_graph::passes::int8_matmul::FuseInt8WeightMatMul;
use kiln_graph::passes::quantize::{quantize_dynamic_int8, quantize_weights_int8, QuantizeOptions};
use kiln_graph::passes::quantize_int4::{quantize_weights_int4, MS_DOMAIN};
use kiln_graph::passes::{OptLevel, Options, Pass, PassCx};
use kiln_graph::Model;
use kiln_runtime::CpuConstEval;

pub use crate::calibrate::{calibrate, Calibration};
pub use kiln_graph::passes::quantize::{QuantizeReport, QuantizedWeight, DEFAULT_MIN_ELEMENTS};
pub use kiln_graph::passes::quantize_static::StaticQuantizeOptions;

use crate::Result;

/// Quantizes the MatMul/Gemm weights of `model` with at least `min_elements` elements to int8 with
/// per-output-channel scales, as standard `DequantizeLinear` nodes. `strict_opsets`: the model will
/// be exported, so nothing is quantized when its opset lacks per-axis DequantizeLinear (< 13).
pub fn quantize_model(model: &mut Model, min_elements: usize, strict_opsets: bool) -> Result<QuantizeReport> {
    kiln_graph::passes::edit::constants_to_initializers(&mut model.graph);
    let mut options = QuantizeOptions::for_model(model);
    options.min_elements = min_elements;
    options.options.strict_opsets = strict_opsets;
    Ok(quantize_weights_int8(&mut model.graph, &options)?)
}

/// Dynamic int8 (onnxruntime `quantize_dynamic`'s QOperator form, per-column weight scales): every
/// MatMul with a constant f32 weight of at least `min_elements` elements becomes
/// DynamicQuantizeLinear (activation, at run time) + MatMulInteger (int8 weight) + Cast + Mul by
/// the two scales; standard ONNX (opset >= 11) that ONNX Runtime runs too.
pub fn quantize_model_dynamic(model: &mut Model, min_elements: usize) -> Result<QuantizeReport> {
    kiln_graph::passes::edit::constants_to_initializers(&mut model.graph);
    let mut options = QuantizeOptions::for_model(model);
    options.min_elements = min_elements;
    Ok(quantize_dynamic_int8(&mut model.graph, &options)?)
}

/// Block-wise 4-bit weights: every MatMul with a constant f32 weight of at least `min_elements`
/// elements becomes `com.microsoft::MatMulNBits` (4 bits, `block_size` values per block along K,
/// a scale and a zero point per block), the form ONNX Runtime's `MatMul4BitsQuantizer` writes; the
/// model then declares the `com.microsoft` opset.
pub fn quantize_model_int4(model: &mut Model, min_elements: usize, block_size: usize) -> Result<QuantizeReport> {
    kiln_graph::passes::edit::constants_to_initializers(&mut model.graph);
    let mut options = QuantizeOptions::for_model(model);
    options.min_elements = min_elements;
    let report = quantize_weights_int4(&mut model.graph, &options, block_size)?;
    if !report.weights.is_empty() {
        model.opsets.entry(MS_DOMAIN.to_string()).or_insert(1);
    }
    Ok(report)
}

/// Static int8 in QDQ form (ONNX Runtime `quantize_static`'s default form): calibrates the input
/// and output ranges of every Conv/MatMul/Gemm with a constant weight on `samples` with `method`,
/// then rewrites the model (int8 per-channel weights, u8 activations, int32 Conv biases). Nodes
/// whose op type or name is in `exclude` stay f32. `progress` sees the number of calibration runs.
pub fn quantize_model_static(
    model: &mut Model,
    samples: &[Vec<(String, kiln_graph::TensorData)>],
    method: Calibration,
    exclude: &[String],
    progress: &mut dyn FnMut(usize),
) -> Result<QuantizeReport> {
    kiln_graph::passes::edit::constants_to_initializers(&mut model.graph);
    let mut options = StaticQuantizeOptions::for_model(model);
    options.exclude = exclude.to_vec();
    // Which activations are f32 comes from inference on a copy; only the element types are kept
    // (the written file declares no shapes it did not have).
    let mut inferred = model.graph.clone();
    kiln_graph::infer::infer_shapes(&mut inferred);
    for (v, i) in model.graph.values.iter_mut().zip(&inferred.values) {
        if v.dtype.is_none() {
            v.dtype = i.dtype;
        }
    }
    let tensors = kiln_graph::passes::quantize_static::calibration_tensors(&model.graph, &options);
    let ranges = calibrate(model, &tensors, samples, method, progress)?;
    Ok(kiln_graph::passes::quantize_static::quantize_static_int8(
        &mut model.graph,
        &options,
        &ranges,
    )?)
}

/// Replaces `DequantizeLinear(int8 constant) -> MatMul/Gemm` by Kiln's int8 MatMul kernel, which
/// keeps the weight in int8. Returns how many MatMul/Gemm nodes were fused.
pub(crate) fn fuse_int8_weight_matmuls(model: &mut Model) -> Result<usize> {
    let options = Options::for_model(model, OptLevel::Basic);
    let cx = PassCx {
        options: &options,
        eval: &CpuConstEval,
    };
    Ok(FuseInt8WeightMatMul.run(&mut model.graph, &cx)?)
}

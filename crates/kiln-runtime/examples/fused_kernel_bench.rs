//! Microbenchmark of the fused CUDA kernels (`kernels/*.cu`), each through a one-node
//! `ExecutionPlan` on `cuda:0` (so the numbers include Kiln's per-node executor overhead, a few
//! microseconds): achieved GB/s for the memory-bound kernels (LayerNorm, Softmax, BiasGelu,
//! Transpose: one read and one write of the tensor; Add: two reads and a write) and TFLOP/s for
//! attention (4 B H S T D), the int8 GEMM and the cuBLAS products under MatMul/MatMulBias (2 M N K).
//! Shapes are BERT-base at batch 64, sequence 128. Add and MatMul run candle's kernels (cuBLAS for
//! the products), for comparison with the fused ones.
//!
//!   cargo build --release --features cuda -p kiln-runtime --example fused_kernel_bench
//!   fused_kernel_bench [--iters N]      (KILN_PEAK_GBPS / KILN_PEAK_TFLOPS / KILN_PEAK_TC_TFLOPS
//!                                         add "% of peak"; the last for f16 products on tensor cores)
//!
//! Each case checks that a fused kernel launched (else it says the generic path ran).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType as CDType, Device as CDevice, Tensor as CT};
use kiln_graph::{Attribute, DType, Graph, Node, TensorData, ValueInfo};
use kiln_runtime::{fused_kernel_launches, ExecutionPlan, PlanOptions, RunOptions, Tensor, Value};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Case {
    name: String,
    op: (&'static str, &'static str, i64),
    attrs: Vec<(&'static str, Attribute)>,
    inputs: Vec<Tensor>,
    /// Bytes moved (memory-bound kernels) or flops (attention, GEMM) per run.
    work: f64,
    flops: bool,
    /// An f16 product cuBLAS runs on tensor cores (its peak is `KILN_PEAK_TC_TFLOPS`).
    tensor_cores: bool,
}

fn plan(dev: &CDevice, c: &Case) -> Res<ExecutionPlan> {
    let mut g = Graph::default();
    for (i, t) in c.inputs.iter().enumerate() {
        let id = g.add_value(ValueInfo {
            name: format!("in{i}"),
            dtype: Some(t.dtype()),
            ..Default::default()
        });
        g.inputs.push(id);
    }
    let out = g.add_value(ValueInfo {
        name: "out".into(),
        ..Default::default()
    });
    g.outputs.push(out);
    g.nodes.push(Node {
        name: c.name.clone(),
        op_type: c.op.1.into(),
        domain: c.op.0.into(),
        inputs: g.inputs.iter().map(|&v| Some(v)).collect(),
        outputs: vec![Some(out)],
        attributes: c.attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        implicit_inputs: vec![],
    });
    let options = PlanOptions {
        device: dev.clone(),
        opsets: HashMap::from([(c.op.0.to_string(), c.op.2)]),
        host_shapes: None,
    };
    Ok(ExecutionPlan::compile_graph(&g, &options)?)
}

fn rand(dims: &[usize], dt: DType, dev: &CDevice) -> Res<Tensor> {
    let t = CT::randn(0f32, 1.0, dims, dev)?;
    let t = if dt == DType::F16 { t.to_dtype(CDType::F16)? } else { t };
    Ok(Tensor::new(t, dt)?)
}

fn cases(dev: &CDevice) -> Res<Vec<Case>> {
    let (b, s, h, heads, d, ff) = (64usize, 128usize, 768usize, 12usize, 64usize, 3072usize);
    let mut v = Vec::new();
    for dt in [DType::F32, DType::F16] {
        let sz = if dt == DType::F16 { 2.0 } else { 4.0 };
        let x = rand(&[b, s, h], dt, dev)?;
        let n = (b * s * h) as f64;
        v.push(Case {
            name: format!("LayerNorm {dt} [{b},{s},{h}]"),
            op: ("", "LayerNormalization", 17),
            attrs: vec![("axis", Attribute::Int(-1))],
            inputs: vec![x.clone(), rand(&[h], dt, dev)?, rand(&[h], dt, dev)?],
            work: 2.0 * n * sz,
            flops: false,
            tensor_cores: false,
        });
        let scores = rand(&[b, heads, s, s], dt, dev)?;
        v.push(Case {
            name: format!("Softmax {dt} [{b},{heads},{s},{s}]"),
            op: ("", "Softmax", 13),
            attrs: vec![],
            inputs: vec![scores],
            work: 2.0 * (b * heads * s * s) as f64 * sz,
            flops: false,
            tensor_cores: false,
        });
        v.push(Case {
            name: format!("BiasGelu {dt} [{b},{s},{ff}]"),
            op: ("com.microsoft", "BiasGelu", 1),
            attrs: vec![],
            inputs: vec![rand(&[b, s, ff], dt, dev)?, rand(&[ff], dt, dev)?],
            work: 2.0 * (b * s * ff) as f64 * sz,
            flops: false,
            tensor_cores: false,
        });
        let qkv = || rand(&[b, heads, s, d], dt, dev);
        v.push(Case {
            name: format!("Attention {dt} [{b},{heads},{s},{d}]"),
            op: ("", "Attention", 23),
            attrs: vec![],
            inputs: vec![qkv()?, qkv()?, qkv()?],
            work: 4.0 * (b * heads * s * s * d) as f64,
            flops: true,
            tensor_cores: false,
        });
        let codes: Vec<i8> = (0..h * ff).map(|i| ((i * 37) % 255) as i32 as i8).collect();
        v.push(Case {
            name: format!("MatMulInt8Weight {dt} [{},{h}]x[{h},{ff}]", b * s),
            op: ("ai.kiln", "MatMulInt8Weight", 1),
            attrs: vec![
                (
                    "weight",
                    Attribute::Tensor(TensorData::from_values("w", vec![h, ff], &codes)?),
                ),
                (
                    "scale",
                    Attribute::Tensor(TensorData::from_values("s", vec![ff], &vec![0.01f32; ff])?),
                ),
            ],
            inputs: vec![rand(&[b, s, h], dt, dev)?],
            work: 2.0 * (b * s * h * ff) as f64,
            flops: true,
            tensor_cores: false,
        });
        v.push(Case {
            name: format!("Transpose {dt} [{b},{s},{heads},{d}] perm 0213"),
            op: ("", "Transpose", 13),
            attrs: vec![("perm", Attribute::Ints(vec![0, 2, 1, 3]))],
            inputs: vec![rand(&[b, s, heads, d], dt, dev)?],
            work: 2.0 * n * sz,
            flops: false,
            tensor_cores: false,
        });
        v.push(Case {
            name: format!("Add {dt} [{b},{s},{h}] (candle)"),
            op: ("", "Add", 14),
            attrs: vec![],
            inputs: vec![x.clone(), rand(&[b, s, h], dt, dev)?],
            work: 3.0 * n * sz,
            flops: false,
            tensor_cores: false,
        });
        for (k, nn) in [(h, h), (h, ff), (ff, h)] {
            v.push(Case {
                name: format!("MatMul {dt} [{},{k}]x[{k},{nn}] (cuBLAS)", b * s),
                op: ("", "MatMul", 13),
                attrs: vec![],
                inputs: vec![rand(&[b * s, k], dt, dev)?, rand(&[k, nn], dt, dev)?],
                work: 2.0 * (b * s * k * nn) as f64,
                flops: true,
                tensor_cores: dt == DType::F16,
            });
        }
        v.push(Case {
            name: format!("MatMulBias {dt} [{},{h}]x[{h},{h}] + bias", b * s),
            op: ("ai.kiln", "MatMulBias", 1),
            attrs: vec![],
            inputs: vec![
                rand(&[b, s, h], dt, dev)?,
                rand(&[h, h], dt, dev)?,
                rand(&[h], dt, dev)?,
            ],
            work: 2.0 * (b * s * h * h) as f64,
            flops: true,
            tensor_cores: dt == DType::F16,
        });
    }
    Ok(v)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = match args.iter().position(|a| a == "--iters") {
        Some(i) => args.get(i + 1).ok_or("--iters needs a value")?.parse()?,
        None => 50,
    };
    let peak = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<f64>().ok());
    let dev = CDevice::new_cuda(0)?;
    let opts = RunOptions::default();
    println!("case\tms/run\tachieved\tfused");
    for c in cases(&dev)? {
        let p = plan(&dev, &c)?;
        let feeds = || {
            c.inputs
                .iter()
                .map(|t| Some(Value::Tensor(t.clone())))
                .collect::<Vec<_>>()
        };
        for _ in 0..3 {
            p.run(feeds(), &HashMap::new(), &opts)?;
        }
        dev.synchronize()?;
        let launches = fused_kernel_launches();
        let t0 = Instant::now();
        for _ in 0..iters {
            p.run(feeds(), &HashMap::new(), &opts)?;
        }
        dev.synchronize()?;
        let secs = t0.elapsed().as_secs_f64() / iters as f64;
        let fused = fused_kernel_launches() > launches;
        let (value, unit, pk) = if c.flops {
            let var = if c.tensor_cores {
                "KILN_PEAK_TC_TFLOPS"
            } else {
                "KILN_PEAK_TFLOPS"
            };
            (c.work / secs / 1e12, "TFLOP/s", peak(var))
        } else {
            (c.work / secs / 1e9, "GB/s", peak("KILN_PEAK_GBPS"))
        };
        let pct = pk
            .map(|p| format!(" ({:.1}% of {p})", 100.0 * value / p))
            .unwrap_or_default();
        let path = if fused { "fused kernel" } else { "generic path" };
        println!("{}\t{:.3}\t{value:.2} {unit}{pct}\t{path}", c.name, secs * 1e3);
    }
    Ok(())
}

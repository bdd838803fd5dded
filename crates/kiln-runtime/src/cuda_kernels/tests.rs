//! GPU checks of the fused kernels (built with the `cuda` feature only). Each test runs an
//! operator through the same kernel factory on the CPU and on `cuda:0` with the same random
//! inputs (odd sizes, masks, causal, f32 and f16) and compares: f32 within 1e-4 and f16 within
//! 1e-2 of the CPU result, relative to the largest |CPU value| of the output (`check`). Each also
//! asserts that a fused kernel launched, so a silent fall back to candle's generic CUDA ops fails.
//! Without a visible GPU each test prints `skipped: no CUDA device (<reason>)` and returns.
//!
//! Run (GPU machine): `kiln-runtime-<hash> cuda_kernels --test-threads 1 --nocapture`
//! (scripts/cuda/build.sh packs the binary; scripts/cuda/gpu-check.sh runs it).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType as CDType, Device as CDevice, Tensor as CT};
use kiln_graph::{Attribute, DType, Graph, Node, TensorData, ValueInfo};

use super::{fused_kernel_launches, Act, SoftmaxSpec};
use crate::ops::{NodeCtx, Registry, RunCx};
use crate::{PlanOptions, RunOptions, Tensor, Value};

const TOL_F32: f64 = 1e-4;
const TOL_F16: f64 = 1e-2;

/// `cuda:0`, or `None` after printing why not. A missing driver library makes cudarc panic while
/// loading it; that is caught and reported as a skip too.
fn gpu() -> Option<CDevice> {
    let r = std::panic::catch_unwind(|| CDevice::new_cuda(0));
    match r {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            println!("skipped: no CUDA device ({})", crate::error::candle_message(&e));
            None
        }
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA driver library could not be loaded".into());
            println!("skipped: no CUDA device ({why})");
            None
        }
    }
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A CPU tensor of `dt` (F32 or F16) with deterministic values.
fn rand(dims: &[usize], seed: u64, scale: f32, dt: DType) -> Tensor {
    let n = dims.iter().product();
    let t = CT::from_vec(values(n, seed, scale), dims, &CDevice::Cpu).unwrap();
    let t = if dt == DType::F16 {
        t.to_dtype(CDType::F16).unwrap()
    } else {
        t
    };
    Tensor::new(t, dt).unwrap()
}

fn tol(dt: DType) -> f64 {
    if dt == DType::F16 {
        TOL_F16
    } else {
        TOL_F32
    }
}

/// Runs one node of `op` on `device` through the registered kernel, as the executor would (but
/// without its per-node CPU fallback, so a CUDA failure is an error here).
fn run_op(
    device: &CDevice,
    (domain, op, opset): (&str, &str, i64),
    attrs: &[(&str, Attribute)],
    inputs: &[Option<&Tensor>],
) -> crate::Result<Tensor> {
    let mut graph = Graph::default();
    let mut ids = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        ids.push(t.map(|t| {
            graph.add_value(ValueInfo {
                name: format!("in{i}"),
                dtype: Some(t.dtype()),
                ..Default::default()
            })
        }));
    }
    let out = graph.add_value(ValueInfo {
        name: "out".into(),
        ..Default::default()
    });
    let node = Node {
        name: format!("test_{op}"),
        op_type: op.into(),
        domain: domain.into(),
        inputs: ids,
        outputs: vec![Some(out)],
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        implicit_inputs: vec![],
    };
    let options = PlanOptions {
        device: device.clone(),
        opsets: HashMap::from([(domain.to_string(), opset)]),
        host_shapes: None,
    };
    let cx = NodeCtx {
        node: &node,
        graph: &graph,
        opset,
        options: &options,
        subplans: Default::default(),
        consumed: Default::default(),
        held: Default::default(),
        packs: Default::default(),
    };
    let factory = Registry::global()
        .get(domain, op)
        .ok_or_else(|| crate::RuntimeError::msg(format!("no kernel for {op}")))?;
    let kernel = factory(&cx)?;
    let moved: Vec<Option<Value>> = inputs
        .iter()
        .map(|t| t.map(|t| t.to_device(device).map(Value::Tensor)).transpose())
        .collect::<crate::Result<_>>()?;
    let refs: Vec<Option<&Value>> = moved.iter().map(Option::as_ref).collect();
    let run_options = RunOptions::default();
    let rcx = RunCx {
        device,
        options: &run_options,
    };
    match kernel.run(&rcx, &refs)?.into_iter().next() {
        Some(Value::Tensor(t)) => Ok(t),
        _ => Err(crate::RuntimeError::msg("no tensor output")),
    }
}

/// `got` (any device) against `want` (CPU): same shape and dtype, max |got - want| <= tol * max
/// |want|. Returns the relative error for the log.
fn check(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let g = got.to_f64_vec().unwrap();
    let w = want.to_f64_vec().unwrap();
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    let mut err = 0f64;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(a.is_finite() == b.is_finite(), "{what}: element {i}: {a} vs {b}");
        if b.is_finite() {
            err = err.max((a - b).abs());
        }
    }
    let rel = err / scale;
    let t = tol(want.dtype());
    println!("{what}: max |d| {err:.3e}, max |ref| {scale:.3e}, relative {rel:.3e} (tolerance {t:e})");
    assert!(rel <= t, "{what}: relative error {rel:e} over {t:e}");
    rel
}

/// Runs `op` on the CPU and the GPU and checks that a fused kernel launched on the GPU.
fn compare(gpu: &CDevice, what: &str, op: (&str, &str, i64), attrs: &[(&str, Attribute)], inputs: &[Option<&Tensor>]) {
    let want = run_op(&CDevice::Cpu, op, attrs, inputs).unwrap();
    let before = fused_kernel_launches();
    let got = run_op(gpu, op, attrs, inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(fused_kernel_launches() > before, "{what}: no fused kernel launched");
    check(what, &got, &want);
}

const FLOATS: [DType; 2] = [DType::F32, DType::F16];

#[test]
fn layer_norm_matches_cpu() {
    let Some(dev) = gpu() else { return };
    // Rows of odd, vector-friendly, long and 1-element sizes; axis -1 and a two-axis norm.
    let cases: &[(&[usize], i64)] = &[
        (&[3, 7, 33], -1),
        (&[2, 5, 768], -1),
        (&[4, 4100], -1),
        (&[2, 3, 5, 8], 2),
        (&[6, 1], -1),
    ];
    for &dt in &FLOATS {
        for (ci, &(dims, axis)) in cases.iter().enumerate() {
            let a = if axis < 0 { dims.len() - 1 } else { axis as usize };
            let pdims = &dims[a..];
            let x = rand(dims, 10 + ci as u64, 3.0, dt);
            let (g, b) = (
                rand(pdims, 20 + ci as u64, 1.5, dt),
                rand(pdims, 30 + ci as u64, 0.5, dt),
            );
            let attrs = [("axis", Attribute::Int(axis)), ("epsilon", Attribute::Float(1e-5))];
            let op = ("", "LayerNormalization", 17);
            compare(
                &dev,
                &format!("LayerNorm {dt} {dims:?} axis {axis}"),
                op,
                &attrs,
                &[Some(&x), Some(&g), Some(&b)],
            );
            compare(
                &dev,
                &format!("LayerNorm {dt} {dims:?} no bias"),
                op,
                &attrs,
                &[Some(&x), Some(&g)],
            );
            let op = ("", "RMSNormalization", 23);
            compare(
                &dev,
                &format!("RMSNorm {dt} {dims:?} axis {axis}"),
                op,
                &attrs,
                &[Some(&x), Some(&g)],
            );
        }
    }
}

#[test]
fn bias_gelu_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let ms = "com.microsoft";
    // [.., 3072] takes the 16-byte vector path; 37 and 5 the scalar one.
    for &dt in &FLOATS {
        for (ci, dims) in [&[2usize, 7, 3072][..], &[3, 5, 37], &[1, 5]].iter().enumerate() {
            let x = rand(dims, 40 + ci as u64, 4.0, dt);
            let last = dims[dims.len() - 1];
            let b = rand(&[last], 50 + ci as u64, 1.0, dt);
            compare(
                &dev,
                &format!("BiasGelu {dt} {dims:?}"),
                (ms, "BiasGelu", 1),
                &[],
                &[Some(&x), Some(&b)],
            );
            compare(&dev, &format!("Gelu {dt} {dims:?}"), (ms, "Gelu", 1), &[], &[Some(&x)]);
            compare(
                &dev,
                &format!("FastGelu {dt} {dims:?}"),
                (ms, "FastGelu", 1),
                &[],
                &[Some(&x), Some(&b)],
            );
            compare(
                &dev,
                &format!("FastGelu {dt} {dims:?} no bias"),
                (ms, "FastGelu", 1),
                &[],
                &[Some(&x)],
            );
        }
    }
}

#[test]
fn bias_relu_and_bias_alone_match_cpu() {
    let Some(dev) = gpu() else { return };
    for &dt in &FLOATS {
        for dims in [&[4usize, 256][..], &[3, 37]] {
            for act in [Act::Relu, Act::None] {
                let x = rand(dims, 60, 2.0, dt);
                let b = rand(&[dims[1]], 61, 1.0, dt);
                let want = x.candle().to_dtype(CDType::F32).unwrap();
                let mut want = want.broadcast_add(&b.candle().to_dtype(CDType::F32).unwrap()).unwrap();
                if act == Act::Relu {
                    want = want.relu().unwrap();
                }
                let want = Tensor::new(want.to_dtype(x.candle().dtype()).unwrap(), dt).unwrap();
                let xg = x.candle().to_device(&dev).unwrap();
                let bg = b.candle().to_device(&dev).unwrap();
                let got = super::bias_act(&xg, Some(&bg), act)
                    .unwrap()
                    .expect("the kernel takes f32/f16 on CUDA");
                check(
                    &format!("bias {act:?} {dt} {dims:?}"),
                    &Tensor::new(got, dt).unwrap(),
                    &want,
                );
            }
        }
    }
}

#[test]
fn softmax_matches_cpu() {
    let Some(dev) = gpu() else { return };
    // Warp kernel (<= 1024 columns) and block kernel (longer rows); opset 11 flattens from axis 1.
    let cases: &[(&[usize], i64, i64)] = &[
        (&[2, 12, 37, 37], -1, 13),
        (&[3, 2000], -1, 13),
        (&[2, 9000], 1, 13),
        (&[5, 1], -1, 13),
        (&[2, 3, 4, 5], 1, 11),
    ];
    for &dt in &FLOATS {
        for (ci, &(dims, axis, opset)) in cases.iter().enumerate() {
            let x = rand(dims, 70 + ci as u64, 8.0, dt);
            let attrs = [("axis", Attribute::Int(axis))];
            compare(
                &dev,
                &format!("Softmax {dt} {dims:?} axis {axis} opset {opset}"),
                ("", "Softmax", opset),
                &attrs,
                &[Some(&x)],
            );
        }
    }
}

/// Scaled masked softmax with a head-broadcast mask and causal masking, against an f64 loop.
#[test]
fn masked_causal_softmax_matches_reference() {
    let Some(dev) = gpu() else { return };
    let (b, h, s, t) = (2usize, 3usize, 19usize, 1100usize);
    for &dt in &FLOATS {
        for &(causal, offset, cols) in &[(false, 0i64, t), (true, 0, 37), (true, 5, t)] {
            let x = rand(&[b, h, s, cols], 80, 4.0, dt);
            // Key-padding mask [B, 1, 1, T]: batch 1 masks its last third; plus a finite bias.
            let mut m = values(b * cols, 81, 1.0);
            for j in 2 * cols / 3..cols {
                m[cols + j] = f32::NEG_INFINITY;
            }
            let mask = CT::from_vec(m.clone(), (b, 1, 1, cols), &CDevice::Cpu).unwrap();
            let scale = 0.37f32;
            let mask_gpu = mask.to_device(&dev).unwrap();
            let spec = SoftmaxSpec {
                cols,
                heads: h,
                seq: s,
                scale,
                mask: Some(&mask_gpu),
                causal,
                causal_offset: offset,
            };
            let got = super::softmax(&x.candle().to_device(&dev).unwrap(), &spec)
                .unwrap()
                .expect("softmax on CUDA");
            let xv = x.to_f64_vec().unwrap();
            let mut want = vec![0f64; xv.len()];
            for r in 0..b * h * s {
                let (bi, si) = (r / (h * s), r % s);
                let logit = |j: usize| -> f64 {
                    if causal && j as i64 > si as i64 + offset {
                        return f64::NEG_INFINITY;
                    }
                    scale as f64 * xv[r * cols + j] + m[bi * cols + j] as f64
                };
                let mx = (0..cols).map(logit).fold(f64::NEG_INFINITY, f64::max);
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = (0..cols).map(|j| (logit(j) - mx).exp()).sum();
                for j in 0..cols {
                    want[r * cols + j] = (logit(j) - mx).exp() / sum;
                }
            }
            let want = Tensor::from_f64s(want, &[b, h, s, cols], dt, &CDevice::Cpu).unwrap();
            check(
                &format!("masked softmax {dt} causal {causal} offset {offset} cols {cols}"),
                &Tensor::new(got, dt).unwrap(),
                &want,
            );
        }
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(dev) = gpu() else { return };
    // Both CUDA routes: the flash-style kernel and cuBLAS products around the fused softmax (the
    // GEMM route declines boolean and short masks and nonpad_kv_seqlen: those cases run flash).
    use crate::ops::attention::{with_cuda_attention_route, CudaAttentionRoute};
    for route in [CudaAttentionRoute::Flash, CudaAttentionRoute::Gemm] {
        println!("route {route:?}");
        with_cuda_attention_route(route, || attention_cases(&dev));
    }
}

fn attention_cases(dev: &CDevice) {
    let dev = dev.clone();
    let op = ("", "Attention", 23);
    // (B, Hq, Hk, S, T, D): odd lengths, S != T, every head-dim tile (32, 64, 128; 80 pads), GQA.
    let shapes = [
        (2usize, 4usize, 4usize, 37usize, 37usize, 64usize),
        (1, 2, 2, 130, 130, 128),
        (2, 8, 2, 16, 45, 32),
        (1, 3, 3, 5, 77, 80),
        (3, 2, 1, 1, 200, 64),
    ];
    for &dt in &FLOATS {
        for (ci, &(b, hq, hk, s, t, d)) in shapes.iter().enumerate() {
            let seed = 100 + 10 * ci as u64;
            let q = rand(&[b, hq, s, d], seed, 1.0, dt);
            let k = rand(&[b, hk, t, d], seed + 1, 1.0, dt);
            let v = rand(&[b, hk, t, d], seed + 2, 1.0, dt);
            let what = |x: &str| format!("Attention {dt} B{b} Hq{hq} Hk{hk} S{s} T{t} D{d} {x}");
            let qkv = [Some(&q), Some(&k), Some(&v)];
            compare(&dev, &what("no mask"), op, &[], &qkv);
            compare(&dev, &what("causal"), op, &[("is_causal", Attribute::Int(1))], &qkv);
            let scale = [("scale", Attribute::Float(0.3))];
            // Additive key-padding mask [B, 1, 1, T]: batch 0 keeps its first 60% of keys.
            let mut pad = vec![0f32; b * t];
            pad[(t * 3 / 5).max(1)..t]
                .iter_mut()
                .for_each(|p| *p = f32::NEG_INFINITY);
            let pad = Tensor::new(CT::from_vec(pad, (b, 1, 1, t), &CDevice::Cpu).unwrap(), DType::F32).unwrap();
            let pad = if dt == DType::F16 {
                Tensor::new(pad.candle().to_dtype(CDType::F16).unwrap(), dt).unwrap()
            } else {
                pad
            };
            compare(
                &dev,
                &what("padding mask, scale"),
                op,
                &scale,
                &[Some(&q), Some(&k), Some(&v), Some(&pad)],
            );
            // Boolean [S, T] mask with one fully masked query row (gives zeros) and a short
            // last dimension (padded with -inf as the reference does).
            let tm = t.saturating_sub(3).max(1);
            let mut allowed: Vec<u8> = values(s * tm, seed + 3, 1.0)
                .iter()
                .map(|&x| u8::from(x > -0.6))
                .collect();
            allowed[..tm].iter_mut().for_each(|a| *a = 0);
            let mb = Tensor::new(CT::from_vec(allowed, (s, tm), &CDevice::Cpu).unwrap(), DType::Bool).unwrap();
            compare(
                &dev,
                &what("bool mask + causal"),
                op,
                &[("is_causal", Attribute::Int(1))],
                &[Some(&q), Some(&k), Some(&v), Some(&mb)],
            );
            // Full float bias [B, Hq, S, T].
            let bias = rand(&[b, hq, s, t], seed + 4, 2.0, dt);
            compare(
                &dev,
                &what("float bias"),
                op,
                &[],
                &[Some(&q), Some(&k), Some(&v), Some(&bias)],
            );
            // nonpad_kv_seqlen with causal (the frontier moves to kv_len - S).
            let lens: Vec<i64> = (0..b).map(|i| (t - i * t / 4).max(1) as i64).collect();
            let np = Tensor::new(CT::from_vec(lens, b, &CDevice::Cpu).unwrap(), DType::I64).unwrap();
            compare(
                &dev,
                &what("nonpad_kv_seqlen + causal"),
                op,
                &[("is_causal", Attribute::Int(1))],
                &[Some(&q), Some(&k), Some(&v), None, None, None, Some(&np)],
            );
        }
        // 3-D (B, S, H*D) inputs with head attributes.
        let (b, s, h, d) = (2usize, 21usize, 4usize, 32usize);
        let x = |seed| rand(&[b, s, h * d], seed, 1.0, dt);
        let (q, k, v) = (x(200), x(201), x(202));
        let heads = [
            ("q_num_heads", Attribute::Int(h as i64)),
            ("kv_num_heads", Attribute::Int(h as i64)),
        ];
        compare(
            &dev,
            &format!("Attention {dt} 3-D"),
            op,
            &heads,
            &[Some(&q), Some(&k), Some(&v)],
        );
    }
}

#[test]
fn int8_matmul_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let op = ("ai.kiln", "MatMulInt8Weight", 1);
    for &dt in &FLOATS {
        for &(batch, m, k, n, trans_b) in &[
            (1usize, 1usize, 77usize, 65usize, false),
            (2, 37, 768, 3, true),
            (1, 130, 768, 3072, false),
            (3, 7, 300, 1000, true),
        ] {
            let dims = if trans_b { vec![n, k] } else { vec![k, n] };
            let codes: Vec<i8> = values(k * n, 300 + k as u64, 127.0).iter().map(|&v| v as i8).collect();
            let scale: Vec<f32> = values(n, 301, 0.01).iter().map(|v| v.abs() + 1e-3).collect();
            let attrs = [
                (
                    "weight",
                    Attribute::Tensor(TensorData::from_values("w", dims, &codes).unwrap()),
                ),
                (
                    "scale",
                    Attribute::Tensor(TensorData::from_values("s", vec![n], &scale).unwrap()),
                ),
                ("transB", Attribute::Int(i64::from(trans_b))),
                ("alpha", Attribute::Float(0.5)),
            ];
            let a = rand(&[batch, m, k], 302, 1.0, dt);
            let c = rand(&[n], 303, 1.0, dt);
            let what = format!("MatMulInt8Weight {dt} [{batch},{m},{k}] x [{k},{n}] transB {trans_b}");
            compare(&dev, &what, op, &attrs, &[Some(&a)]);
            compare(&dev, &format!("{what} + bias"), op, &attrs, &[Some(&a), Some(&c)]);
        }
    }
}

/// `got` against `want` (flat, same order): max |got - want| <= tol * max |want|, every value
/// finite. Returns the relative error for the log.
fn check_values(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    let mut err = 0f64;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a.is_finite(), "{what}: element {i} is {a} (want {b})");
        err = err.max((a - b).abs());
    }
    let rel = err / scale;
    println!("{what}: max |d| {err:.3e}, max |ref| {scale:.3e}, relative {rel:.3e} (tolerance {tol:e})");
    assert!(rel <= tol, "{what}: relative error {rel:e} over {tol:e}");
    rel
}

/// `v` rounded to `dt` (what the kernel and the reference both see).
fn rounded(v: Vec<f32>, dt: DType) -> Vec<f32> {
    if dt == DType::F16 {
        v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect()
    } else {
        v
    }
}

fn cdtype(dt: DType) -> CDType {
    if dt == DType::F16 {
        CDType::F16
    } else {
        CDType::F32
    }
}

/// A `dt` tensor on `dev` from f32 values.
fn on(dev: &CDevice, v: &[f32], dims: &[usize], dt: DType) -> CT {
    CT::from_slice(v, dims, &CDevice::Cpu)
        .unwrap()
        .to_dtype(cdtype(dt))
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn host_f64(t: &CT) -> Vec<f64> {
    t.to_device(&CDevice::Cpu)
        .unwrap()
        .to_dtype(CDType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `[a, b, d]` -> `[b, a, d]`.
fn swap01(x: &[f32], a: usize, b: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for i in 0..a {
        for j in 0..b {
            y[(j * a + i) * d..][..d].copy_from_slice(&x[(i * b + j) * d..][..d]);
        }
    }
    y
}

/// A NaN-filled paged cache on `dev` (a kernel reading a slot no step wrote gives NaN) and a
/// scattered block table per sequence (`lens` tokens each) over its `num_blocks` blocks.
fn paged_cache(
    dev: &CDevice,
    dt: DType,
    (kvh, d, bs): (usize, usize, usize),
    lens: &[usize],
) -> (CT, CT, Vec<Vec<u32>>, usize) {
    let need: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let nb = need + 3;
    // Block ids in a scrambled order: b -> (b * step + 3) mod nb, a permutation for step coprime to nb.
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let step = (7..).find(|&s| gcd(s, nb) == 1).unwrap();
    let mut ids = (0..nb).map(|b| ((b * step + 3) % nb) as u32);
    let tables = lens
        .iter()
        .map(|l| ids.by_ref().take(l.div_ceil(bs)).collect())
        .collect();
    let nan = || {
        CT::full(f32::NAN, (nb, kvh, bs, d), dev)
            .unwrap()
            .to_dtype(cdtype(dt))
            .unwrap()
    };
    (nan(), nan(), tables, nb)
}

/// Paged attention and the cache write (kernels/paged_attention.cu) against the CPU paged KV
/// cache (`PagedKvCache::attend`, the ai.kiln PagedAttention operator's kernel) over three mixed
/// steps of six sequences: prefill chunks, decode tokens at block edges, a first token.
#[test]
fn paged_attention_matches_cpu() {
    let Some(dev) = gpu() else { return };
    use crate::cuda_kernels::{PagedLayerKv, PagedMeta};
    use crate::paged_kv::{KvDType, PagedKvCache, PagedKvConfig, PagedSeq};
    // Each step: (sequence, first position, end position) of its query tokens.
    let lens = [300usize, 17, 1, 100, 16, 45];
    let steps: [&[(usize, usize, usize)]; 3] = [
        &[(0, 0, 200), (1, 0, 15), (2, 0, 1), (3, 0, 64), (4, 0, 16), (5, 0, 20)],
        &[(0, 200, 201), (1, 15, 16), (3, 64, 99), (5, 20, 44)],
        &[(0, 201, 300), (1, 16, 17), (3, 99, 100), (5, 44, 45)],
    ];
    for &dt in &FLOATS {
        for &(h, kvh, d, bs) in &[
            (9usize, 3usize, 128usize, 16usize),
            (4, 4, 64, 16),
            (8, 2, 96, 32),
            (4, 1, 32, 8),
        ] {
            let (kc, vc, tables, nb) = paged_cache(&dev, dt, (kvh, d, bs), &lens);
            let layer = PagedLayerKv {
                k_cache: &kc,
                v_cache: &vc,
            };
            let cpu = PagedKvCache::new(PagedKvConfig {
                num_layers: 1,
                num_blocks: nb,
                block_size: bs,
                num_kv_heads: kvh,
                head_dim: d,
                dtype: if dt == DType::F16 { KvDType::F16 } else { KvDType::F32 },
            })
            .unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            for (si, step) in steps.iter().enumerate() {
                let mut seqs = Vec::new();
                for &(s, a, b) in step.iter() {
                    let query_start = seqs.iter().map(|q: &PagedSeq| q.num_query).sum();
                    seqs.push(PagedSeq {
                        query_start,
                        num_query: b - a,
                        context_len: b,
                        block_table: tables[s].clone(),
                    });
                }
                let t: usize = seqs.iter().map(|s| s.num_query).sum();
                let seed = 500 + 10 * si as u64 + d as u64;
                let q = rounded(values(t * h * d, seed, 2.0), dt);
                let k = rounded(values(t * kvh * d, seed + 1, 1.0), dt);
                let v = rounded(values(t * kvh * d, seed + 2, 1.0), dt);
                let want = cpu
                    .attend(
                        0,
                        &seqs,
                        &swap01(&q, t, h, d),
                        &swap01(&k, t, kvh, d),
                        &swap01(&v, t, kvh, d),
                        h,
                        scale,
                    )
                    .unwrap();
                let want: Vec<f64> = swap01(&want, h, t, d).into_iter().map(f64::from).collect();
                let meta = PagedMeta::new(&seqs, bs, nb, &dev).unwrap();
                let before = fused_kernel_launches();
                let (kg, vg) = (on(&dev, &k, &[t, kvh, d], dt), on(&dev, &v, &[t, kvh, d], dt));
                super::reshape_and_cache(&kg, &vg, &layer, &meta)
                    .unwrap()
                    .expect("reshape_and_cache takes this case");
                let got = super::paged_attention(&on(&dev, &q, &[t, h, d], dt), &layer, &meta, scale)
                    .unwrap()
                    .expect("paged_attention takes this case");
                assert!(fused_kernel_launches() >= before + 2, "no fused kernel launched");
                assert_eq!(got.dims(), &[t, h, d]);
                check_values(
                    &format!("PagedAttention {dt} H{h} KV{kvh} D{d} bs{bs} step {si} ({t} tokens)"),
                    &host_f64(&got),
                    &want,
                    tol(dt),
                );
            }
        }
    }
}

/// Decode tokens with long contexts (up to 8192 keys) against an f64 loop over each sequence's
/// logical K/V; the earlier positions go into the cache through one large reshape_and_cache step.
#[test]
fn paged_attention_long_contexts_match_reference() {
    let Some(dev) = gpu() else { return };
    use crate::cuda_kernels::{PagedLayerKv, PagedMeta};
    use crate::paged_kv::PagedSeq;
    let (h, kvh, d, bs) = (8usize, 2usize, 128usize, 16usize);
    let lens = [8192usize, 4097, 1000, 17];
    for &dt in &FLOATS {
        let (kc, vc, tables, nb) = paged_cache(&dev, dt, (kvh, d, bs), &lens);
        let layer = PagedLayerKv {
            k_cache: &kc,
            v_cache: &vc,
        };
        let row = kvh * d;
        let kl: Vec<Vec<f32>> = (0..lens.len())
            .map(|i| rounded(values(lens[i] * row, 600 + i as u64, 1.0), dt))
            .collect();
        let vl: Vec<Vec<f32>> = (0..lens.len())
            .map(|i| rounded(values(lens[i] * row, 700 + i as u64, 1.0), dt))
            .collect();
        // Step 1 (write only): every position but the last; step 2: the last, attended.
        for last in [false, true] {
            let mut seqs = Vec::new();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            let mut start = 0;
            for (i, &len) in lens.iter().enumerate() {
                let (a, b) = if last { (len - 1, len) } else { (0, len - 1) };
                seqs.push(PagedSeq {
                    query_start: start,
                    num_query: b - a,
                    context_len: b,
                    block_table: tables[i].clone(),
                });
                start += b - a;
                k.extend_from_slice(&kl[i][a * row..b * row]);
                v.extend_from_slice(&vl[i][a * row..b * row]);
            }
            let meta = PagedMeta::new(&seqs, bs, nb, &dev).unwrap();
            let t = meta.num_tokens();
            super::reshape_and_cache(
                &on(&dev, &k, &[t, kvh, d], dt),
                &on(&dev, &v, &[t, kvh, d], dt),
                &layer,
                &meta,
            )
            .unwrap()
            .expect("reshape_and_cache takes this case");
            if !last {
                continue;
            }
            let q = rounded(values(t * h * d, 800, 2.0), dt);
            let scale = 1.0 / (d as f32).sqrt();
            let got = super::paged_attention(&on(&dev, &q, &[t, h, d], dt), &layer, &meta, scale)
                .unwrap()
                .expect("paged_attention takes this case");
            let mut want = vec![0f64; t * h * d];
            for (ti, &len) in lens.iter().enumerate() {
                for hh in 0..h {
                    let g = hh / (h / kvh);
                    let qr = &q[(ti * h + hh) * d..][..d];
                    let logits: Vec<f64> = (0..len)
                        .map(|j| {
                            let kr = &kl[ti][j * row + g * d..][..d];
                            qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
                    for c in 0..d {
                        want[(ti * h + hh) * d + c] = (0..len)
                            .map(|j| (logits[j] - mx).exp() / z * vl[ti][j * row + g * d + c] as f64)
                            .sum();
                    }
                }
            }
            check_values(
                &format!("PagedAttention {dt} H{h} KV{kvh} D{d} bs{bs} contexts {lens:?}"),
                &host_f64(&got),
                &want,
                tol(dt),
            );
        }
    }
}

/// Speed of one decode step (no assertion, a figure for docs/gpu.md): 64 sequences of 2048 keys,
/// 32 query heads over 8 K/V heads, head dim 128, f16, blocks of 16. Prints the time per step and
/// the K/V bytes the step must read (each K/V head once) per second.
#[test]
fn paged_attention_decode_speed() {
    let Some(dev) = gpu() else { return };
    use crate::cuda_kernels::{PagedLayerKv, PagedMeta};
    use crate::paged_kv::PagedSeq;
    let (seqs_n, ctx, h, kvh, d, bs) = (64usize, 2048usize, 32usize, 8usize, 128usize, 16usize);
    let dt = DType::F16;
    let per_seq = ctx.div_ceil(bs);
    let nb = seqs_n * per_seq;
    let cache = || {
        CT::rand(-1f32, 1f32, (nb, kvh, bs, d), &dev)
            .unwrap()
            .to_dtype(cdtype(dt))
            .unwrap()
    };
    let (kc, vc) = (cache(), cache());
    let layer = PagedLayerKv {
        k_cache: &kc,
        v_cache: &vc,
    };
    // Sequence i owns blocks i, i + 64, i + 128, ... (interleaved, as a block manager's would be).
    let seqs: Vec<PagedSeq> = (0..seqs_n)
        .map(|i| PagedSeq {
            query_start: i,
            num_query: 1,
            context_len: ctx,
            block_table: (0..per_seq).map(|b| (b * seqs_n + i) as u32).collect(),
        })
        .collect();
    let meta = PagedMeta::new(&seqs, bs, nb, &dev).unwrap();
    let q = on(&dev, &values(seqs_n * h * d, 902, 1.0), &[seqs_n, h, d], dt);
    let scale = 1.0 / (d as f32).sqrt();
    let run = || {
        super::paged_attention(&q, &layer, &meta, scale)
            .unwrap()
            .expect("paged_attention takes this case")
    };
    run();
    dev.synchronize().unwrap();
    let iters = 50;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        run();
    }
    dev.synchronize().unwrap();
    let secs = t0.elapsed().as_secs_f64() / iters as f64;
    let bytes = (2 * seqs_n * ctx * kvh * d * 2) as f64;
    println!(
        "paged attention decode f16: {seqs_n} seqs x {ctx} keys, H{h} KV{kvh} D{d} bs{bs}: {:.1} us per step, {:.0} GB/s of K/V",
        secs * 1e6,
        bytes / secs / 1e9
    );
}

/// The host side of the paged step layout: per-token table offsets, contexts and slots, and the
/// checks that keep the kernels in bounds. Needs no GPU.
#[test]
fn paged_meta_layout_and_checks() {
    use crate::cuda_kernels::PagedMeta;
    use crate::paged_kv::PagedSeq;
    let seq = |query_start, num_query, context_len, block_table: &[u32]| PagedSeq {
        query_start,
        num_query,
        context_len,
        block_table: block_table.to_vec(),
    };
    // Sequence 0: a decode token at position 4 (blocks of 4: block 7, slot 0); sequence 1: a
    // prefill chunk at positions 1..3 of blocks [2]; the unused tail of a table is not uploaded.
    let (tables, start, ctx, slots) = PagedMeta::host(&[seq(0, 1, 5, &[3, 7, 9]), seq(1, 2, 3, &[2])], 4, 10).unwrap();
    assert_eq!(tables, vec![3, 7, 2]);
    assert_eq!(start, vec![0, 2, 2]);
    assert_eq!(ctx, vec![5, 2, 3]);
    assert_eq!(slots, vec![28, 9, 10]);
    let bad = |seqs: &[PagedSeq], bs, nb| PagedMeta::host(seqs, bs, nb).is_err();
    assert!(bad(&[seq(0, 1, 5, &[3, 7])], 3, 10), "block size not a power of two");
    assert!(bad(&[seq(0, 1, 5, &[3])], 4, 10), "table too short");
    assert!(bad(&[seq(0, 1, 5, &[3, 10])], 4, 10), "block id out of range");
    assert!(bad(&[seq(1, 1, 5, &[3, 7])], 4, 10), "does not start at token 0");
    assert!(bad(&[seq(0, 6, 5, &[3, 7])], 4, 10), "more query tokens than context");
    assert!(bad(&[], 4, 10), "empty step");
    assert!(bad(&[seq(0, 1, 5, &[3, 7])], 1 << 16, 1 << 16), "slots past i32");
}

#[test]
fn conv2d_matches_cpu() {
    let Some(dev) = gpu() else { return };
    // (n, c, h, w, m, k, stride, dilation, pad, bias): 3x3 same, stride 2, dilated, 1x1, 7x7 stem.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize, usize, bool);
    let cases: &[Case] = &[
        (2, 3, 17, 19, 8, 3, 1, 1, 1, true),
        (3, 16, 20, 20, 32, 3, 2, 1, 1, false),
        (1, 8, 15, 13, 4, 3, 1, 2, 2, true),
        (2, 32, 7, 7, 48, 1, 1, 1, 0, true),
        (1, 3, 40, 40, 16, 7, 2, 1, 3, true),
    ];
    for &dt in &FLOATS {
        for &(n, c, h, w, m, k, stride, dil, pad, with_bias) in cases {
            let x = rand(&[n, c, h, w], 80, 1.0, dt);
            let wt = rand(&[m, c, k, k], 81, 0.3, dt);
            let b = rand(&[m], 82, 1.0, dt);
            let f32_ = |t: &Tensor| t.candle().to_dtype(CDType::F32).unwrap();
            let mut want = f32_(&x).conv2d(&f32_(&wt), pad, stride, dil, 1).unwrap();
            if with_bias {
                want = want.broadcast_add(&f32_(&b).reshape((1, m, 1, 1)).unwrap()).unwrap();
            }
            let (oh, ow) = (want.dim(2).unwrap(), want.dim(3).unwrap());
            let want = Tensor::new(want.to_dtype(x.candle().dtype()).unwrap(), dt).unwrap();
            let geometry = super::Conv2dGeometry {
                out: [oh, ow],
                stride: [stride; 2],
                dilation: [dil; 2],
                pad: [pad; 2],
            };
            let on = |t: &Tensor| t.candle().to_device(&dev).unwrap();
            let before = super::fused_kernel_launches();
            let got = super::conv2d(&on(&x), &on(&wt), with_bias.then(|| on(&b)).as_ref(), &geometry)
                .unwrap()
                .expect("f32/f16 one-group convs take the kernel");
            assert!(super::fused_kernel_launches() > before, "the im2col kernel launched");
            check(
                &format!("conv2d {dt} x[{n},{c},{h},{w}] w[{m},{c},{k},{k}] s{stride} d{dil} p{pad} bias {with_bias}"),
                &Tensor::new(got, dt).unwrap(),
                &want,
            );
        }
    }
}

#[test]
fn permute_matches_cpu() {
    let Some(dev) = gpu() else { return };
    // (shape, perm, narrow the last axis to make a strided source): attention-head transposes (the
    // 16-byte path for both dtypes), a full reversal and rank 6 (element path), a strided source.
    let cases: &[(&[usize], &[usize], bool)] = &[
        (&[2, 5, 3, 16], &[0, 2, 1, 3], false),
        (&[64, 12, 9, 64], &[0, 2, 1, 3], false),
        (&[3, 7, 5], &[2, 1, 0], false),
        (&[2, 3, 2, 3, 2, 5], &[5, 0, 4, 1, 3, 2], false),
        (&[4, 9, 6], &[1, 0, 2], true),
    ];
    for &dt in &FLOATS {
        for &(dims, perm, narrow) in cases {
            let x = rand(dims, 70, 3.0, dt).candle().clone();
            let x = if narrow {
                let last = dims.len() - 1;
                x.narrow(last, 1, dims[last] - 2).unwrap()
            } else {
                x
            };
            let want = x.permute(perm).unwrap().contiguous().unwrap();
            let before = super::fused_kernel_launches();
            let got = super::permute(&x.to_device(&dev).unwrap(), perm)
                .unwrap()
                .expect("2- and 4-byte dtypes take the kernel");
            assert!(
                super::fused_kernel_launches() > before,
                "{dims:?} {perm:?}: the kernel launched"
            );
            let got = got.to_device(&CDevice::Cpu).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, w) = (
                got.to_dtype(CDType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                want.to_dtype(CDType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            assert_eq!(g, w, "permute {dt} {dims:?} {perm:?} narrow {narrow}: bit for bit");
            println!("permute {dt} {dims:?} {perm:?} narrow {narrow}: identical to the CPU copy");
        }
    }
}

/// The embedded PTX has every entry point the launchers name, each launcher's argument list (the
/// parameter names its `kernel_args!` pushes follow, in order: a push out of order does not build)
/// equals the parameter names of the `.cu` signature, and the PTX parameter widths are those of the
/// signature's C types. So swapping two arguments of the same width in a launcher, or two parameters
/// in a `.cu` file, fails here, without a GPU.
#[test]
fn ptx_entry_points_match_the_launchers() {
    use super::launch::{
        attention, bias_act, im2col, int8_gemm, layer_norm, paged_attention, permute, ptx, signatures, softmax,
    };
    // (entry-name prefix, the PTX module it lives in, the launcher's parameter list)
    let launchers: &[(&str, &str, &[&str])] = &[
        ("kiln_layer_norm_", ptx::LAYER_NORM, layer_norm::PARAMS),
        ("kiln_rms_norm_", ptx::LAYER_NORM, layer_norm::PARAMS),
        ("kiln_bias_", ptx::BIAS_ACT, bias_act::PARAMS),
        ("kiln_softmax_", ptx::SOFTMAX, softmax::PARAMS),
        ("kiln_attention_", ptx::ATTENTION, attention::PARAMS),
        ("kiln_int8_gemm_", ptx::INT8_GEMM, int8_gemm::PARAMS),
        ("kiln_paged_attention_", ptx::PAGED_ATTENTION, paged_attention::PARAMS),
        (
            "kiln_reshape_and_cache_",
            ptx::PAGED_ATTENTION,
            paged_attention::CACHE_PARAMS,
        ),
        ("kiln_permute_", ptx::PERMUTE, permute::PARAMS),
        ("kiln_im2col_", ptx::IM2COL, im2col::PARAMS),
    ];
    // The PTX parameter type of a C parameter type (8-byte pointers and integers "u64", 32-bit
    // integers "u32", float "f32", a struct by value ".align N .b8 [..]").
    let ptx_type = |c: &str| -> &str {
        if c.contains('*') {
            "u64"
        } else {
            match c {
                "long long" | "unsigned long long" | "size_t" | "long" | "unsigned long" => "u64",
                "int" | "unsigned" | "unsigned int" => "u32",
                "float" => "f32",
                _ => "align",
            }
        }
    };
    // The names the launchers form (`format!` in each launch/*.rs).
    let mut named: Vec<String> = Vec::new();
    for sfx in ["f32", "f16"] {
        for n in ["layer_norm", "rms_norm"] {
            named.push(format!("kiln_{n}_{sfx}"));
        }
        for a in ["gelu_erf", "gelu_tanh", "relu", "none"] {
            named.push(format!("kiln_bias_{a}_{sfx}"));
        }
        for k in ["warp", "block"] {
            named.push(format!("kiln_softmax_{k}_{sfx}"));
        }
        for d in [32, 64, 128] {
            named.push(format!("kiln_attention_{sfx}_d{d}"));
        }
        for t in ["nn", "nt"] {
            named.push(format!("kiln_int8_gemm_{sfx}_{t}"));
        }
        for d in [32, 64, 96, 128] {
            named.push(format!("kiln_paged_attention_{sfx}_d{d}"));
        }
        named.push(format!("kiln_reshape_and_cache_{sfx}"));
        named.push(format!("kiln_im2col_{sfx}"));
    }
    for b in ["b2", "b4", "b16"] {
        named.push(format!("kiln_permute_{b}"));
    }
    let sigs = signatures::SIGNATURES;
    for name in &named {
        assert!(
            sigs.iter().any(|(n, _)| n == name),
            "{name}: no such entry point in kernels/*.cu"
        );
    }
    assert!(
        sigs.len() >= named.len(),
        "{} signatures for {} launcher names",
        sigs.len(),
        named.len()
    );
    for (name, params) in sigs {
        let matching: Vec<_> = launchers.iter().filter(|(p, _, _)| name.starts_with(p)).collect();
        let [(_, text, launcher)] = matching[..] else {
            panic!("{name}: {} launchers claim this entry point", matching.len());
        };
        let cu_names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            &cu_names, launcher,
            "{name}: the launcher's arguments against the .cu parameters"
        );
        let head = format!(".visible .entry {name}(");
        let at = text.find(&head).unwrap_or_else(|| panic!("{name}: no such PTX entry"));
        let rest = &text[at + head.len()..];
        let list = &rest[..rest.find(')').expect("closed parameter list")];
        let got: Vec<&str> = list
            .split(".param .")
            .skip(1)
            .map(|p| p.split_whitespace().next().unwrap_or(""))
            .collect();
        let want: Vec<&str> = params.iter().map(|(_, t)| ptx_type(t)).collect();
        assert_eq!(got, want, "{name}: PTX parameter widths against the C types {params:?}");
    }
}

/// CPU tensors never take the CUDA entry points.
#[test]
fn cpu_tensors_are_declined() {
    let x = rand(&[2, 8], 1, 1.0, DType::F32);
    assert!(super::bias_act(x.candle(), None, Act::Relu).unwrap().is_none());
    assert!(super::layer_norm(x.candle(), None, None, 1, 1e-5, false)
        .unwrap()
        .is_none());
    assert!(super::softmax(x.candle(), &SoftmaxSpec::plain(8)).unwrap().is_none());
}

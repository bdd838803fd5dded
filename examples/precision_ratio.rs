//! fp32 vs int8 weight-only latency of one model, both sessions in one process, runs interleaved
//! (so machine noise hits both alike); prints min and median per precision and their ratio.
//!
//! `cargo run --release -p kiln --example precision_ratio -- MODEL.onnx [SYMBOL=SIZE ...] [-n 20]`
//! (one CPU thread; inputs synthesized from the declared shapes: ids 0..100, masks all ones,
//! floats 0.5; symbolic dims default to 1).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln::{DType, Dim, Precision, Session, TensorData};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: precision_ratio MODEL.onnx [SYM=N ..] [-n N]"))?;
    let (mut dims, mut runs) = (HashMap::new(), 20usize);
    while let Some(a) = args.next() {
        if a == "-n" {
            runs = args.next().unwrap_or_default().parse()?;
        } else if let Some((k, v)) = a.split_once('=') {
            dims.insert(k.to_string(), v.parse::<usize>()?);
        }
    }
    kiln::set_num_threads(1)?;
    // Resident memory each session adds (Linux; the load's transient buffers are freed by then).
    let mut rss = vec![resident_bytes()];
    let mut build = |p| -> anyhow::Result<Session> {
        let s = Session::builder()
            .precision(p)
            .optimization(kiln::Level::Extended)
            .build_from_file(&model)?;
        rss.push(resident_bytes());
        Ok(s)
    };
    let (fp32, int8) = (build(Precision::F32)?, build(Precision::Int8WeightOnly)?);
    if let [Some(a), Some(b), Some(c)] = rss[..] {
        let mib = |x: u64, y: u64| (y as f64 - x as f64) / (1 << 20) as f64;
        println!(
            "session memory (RSS added): fp32 {:.1} MiB, int8-weight {:.1} MiB",
            mib(a, b),
            mib(b, c)
        );
    }
    let mut feeds = Vec::new();
    for i in fp32.inputs() {
        let shape: Vec<usize> = i
            .shape
            .as_ref()
            .map(|s| {
                s.0.iter()
                    .map(|d| match d {
                        Dim::Known(n) => *n,
                        Dim::Sym(s) => dims.get(s).copied().unwrap_or(1),
                        Dim::Unknown => 1,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let n: usize = shape.iter().product();
        let t = match i.dtype {
            Some(DType::I64) if i.name.contains("mask") => TensorData::from_values(&i.name, shape, &vec![1i64; n])?,
            Some(DType::I64) => {
                TensorData::from_values(&i.name, shape, &(0..n).map(|v| (v % 100) as i64).collect::<Vec<_>>())?
            }
            _ => TensorData::from_values(&i.name, shape, &vec![0.5f32; n])?,
        };
        feeds.push((i.name.clone(), t));
    }
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..runs + 2 {
        for (k, s) in [&fp32, &int8].into_iter().enumerate() {
            let t = Instant::now();
            s.run(feeds.clone())?;
            if round >= 2 {
                times[k].push(t.elapsed());
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut stats = Vec::new();
    for (name, t) in ["fp32", "int8-weight"].iter().zip(&mut times) {
        t.sort();
        let (min, med) = (ms(t[0]), ms(t[t.len() / 2]));
        println!("{name:<12} min {min:9.3} ms  median {med:9.3} ms  ({} runs)", t.len());
        stats.push((min, med));
    }
    println!(
        "int8/fp32    min {:.3}x  median {:.3}x",
        stats[1].0 / stats[0].0,
        stats[1].1 / stats[0].1
    );
    Ok(())
}

/// VmRSS of this process from /proc (None elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

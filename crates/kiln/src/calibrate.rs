//! Activation ranges for static int8: the f32 model runs on calibration samples with the tensors
//! to quantize added as outputs (optimizer off, so every name survives), and each tensor's range
//! comes from one of three methods, those of ONNX Runtime's calibrators:
//!
//! - `MinMax`: the smallest and largest value seen.
//! - `Percentile(p)`: the range clipped to the `p`-th percentile of `|x|` (outliers saturate
//!   instead of stretching the scale).
//! - `Entropy`: the clipping threshold of `|x|` whose 128-level quantized histogram is closest to
//!   the 2048-bin original in KL divergence (TensorRT's method).
//!
//! Percentile and entropy take a second pass over the samples to fill a 2048-bin histogram of
//! `|x|` on `[0, max |x|]`.

use std::collections::HashMap;

use kiln_graph::{Model, TensorData};

use crate::{Error, Level, Result, Session};

/// How a tensor's range is chosen from what calibration saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    MinMax,
    /// Percent of `|x|` kept inside the range (e.g. 99.999).
    Percentile(f64),
    Entropy,
}

impl std::str::FromStr for Calibration {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "minmax" | "min-max" => Ok(Calibration::MinMax),
            "entropy" => Ok(Calibration::Entropy),
            "percentile" => Ok(Calibration::Percentile(99.999)),
            p if p.starts_with("percentile=") => match p["percentile=".len()..].parse::<f64>() {
                Ok(v) if v > 0.0 && v <= 100.0 => Ok(Calibration::Percentile(v)),
                _ => Err(format!("'{p}': the percentile must be in (0, 100]")),
            },
            other => Err(format!(
                "unknown calibration '{other}' (minmax, percentile, percentile=P, entropy)"
            )),
        }
    }
}

const BINS: usize = 2048;
const QUANTIZED_BINS: usize = 128;

/// Per-tensor statistics.
#[derive(Clone)]
struct Stats {
    lo: f32,
    hi: f32,
    hist: Vec<u64>,
}

/// Ranges (`(lo, hi)` by tensor name) of `tensors` over `samples` (each a full set of model
/// inputs). `progress` is called after each model run with the number of runs done.
pub fn calibrate(
    model: &Model,
    tensors: &[String],
    samples: &[Vec<(String, TensorData)>],
    method: Calibration,
    progress: &mut dyn FnMut(usize),
) -> Result<HashMap<String, (f32, f32)>> {
    if samples.is_empty() {
        return Err(Error::Calibration("at least one sample is needed".into()));
    }
    let mut m = model.clone();
    for name in tensors {
        let id = (0..m.graph.values.len())
            .map(|i| kiln_graph::ValueId(i as u32))
            .find(|&v| m.graph.value_name(v) == name)
            .ok_or_else(|| Error::Calibration(format!("no tensor '{name}' in the model")))?;
        if !m.graph.outputs.contains(&id) {
            m.graph.outputs.push(id);
        }
    }
    let session = Session::builder().optimization(Level::Disabled).build_from_model(m)?;
    let position: Vec<usize> = tensors
        .iter()
        .map(|t| {
            session
                .outputs()
                .iter()
                .position(|o| &o.name == t)
                .unwrap_or(usize::MAX)
        })
        .collect();
    let mut stats = vec![
        Stats {
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            hist: Vec::new(),
        };
        tensors.len()
    ];
    let passes = if method == Calibration::MinMax { 1 } else { 2 };
    let mut runs = 0;
    for pass in 0..passes {
        for sample in samples {
            let outs = session.run(sample.clone())?;
            for (s, &p) in stats.iter_mut().zip(&position) {
                let Some(v) = outs.get(p).and_then(|t| t.values::<f32>()) else {
                    continue;
                };
                if pass == 0 {
                    for x in v.iter().filter(|x| x.is_finite()) {
                        s.lo = s.lo.min(*x);
                        s.hi = s.hi.max(*x);
                    }
                } else {
                    add_to_histogram(s, &v);
                }
            }
            runs += 1;
            progress(runs);
        }
    }
    Ok(tensors
        .iter()
        .zip(&stats)
        .filter(|(_, s)| s.lo <= s.hi)
        .map(|(name, s)| {
            let t = match method {
                Calibration::MinMax => f32::INFINITY,
                Calibration::Percentile(p) => percentile_threshold(s, p),
                Calibration::Entropy => entropy_threshold(s),
            };
            (name.clone(), (s.lo.max(-t), s.hi.min(t)))
        })
        .collect())
}

fn abs_max(s: &Stats) -> f32 {
    s.lo.abs().max(s.hi.abs())
}

fn add_to_histogram(s: &mut Stats, v: &[f32]) {
    if s.hist.is_empty() {
        s.hist = vec![0; BINS];
    }
    let top = abs_max(s);
    if top <= 0.0 {
        s.hist[0] += v.len() as u64;
        return;
    }
    let per = BINS as f32 / top;
    for x in v.iter().filter(|x| x.is_finite()) {
        let b = ((x.abs() * per) as usize).min(BINS - 1);
        s.hist[b] += 1;
    }
}

/// The smallest bin edge below which `p` percent of `|x|` lie.
fn percentile_threshold(s: &Stats, p: f64) -> f32 {
    let total: u64 = s.hist.iter().sum();
    if total == 0 {
        return f32::INFINITY;
    }
    let want = (p / 100.0 * total as f64).ceil() as u64;
    let mut seen = 0;
    for (i, &c) in s.hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return abs_max(s) * (i + 1) as f32 / BINS as f32;
        }
    }
    f32::INFINITY
}

/// TensorRT's entropy calibration: for each candidate threshold `i` bins (128..=2048), the
/// reference is the histogram cut at `i` with the tail folded into its last bin; the candidate is
/// the cut histogram (tail left out) merged into 128 levels and spread back evenly over the bins
/// of each level that are non-empty in the reference. The threshold with the least
/// KL(reference || candidate) wins.
fn entropy_threshold(s: &Stats) -> f32 {
    let h = &s.hist;
    if h.iter().sum::<u64>() == 0 {
        return f32::INFINITY;
    }
    let mut best = (f64::INFINITY, BINS);
    for i in QUANTIZED_BINS..=BINS {
        let mut reference: Vec<f64> = h[..i].iter().map(|&c| c as f64).collect();
        reference[i - 1] += h[i..].iter().sum::<u64>() as f64;
        let mut candidate = vec![0f64; i];
        let per = i as f64 / QUANTIZED_BINS as f64;
        for q in 0..QUANTIZED_BINS {
            let (a, b) = ((q as f64 * per) as usize, (((q + 1) as f64 * per) as usize).min(i));
            let nonzero = reference[a..b].iter().filter(|&&c| c > 0.0).count();
            if nonzero == 0 {
                continue;
            }
            let each = h[a..b].iter().map(|&c| c as f64).sum::<f64>() / nonzero as f64;
            for j in a..b {
                if reference[j] > 0.0 {
                    candidate[j] = each;
                }
            }
        }
        let (rs, cs) = (reference.iter().sum::<f64>(), candidate.iter().sum::<f64>());
        if rs == 0.0 || cs == 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for (r, c) in reference.iter().zip(&candidate) {
            if *r > 0.0 {
                let (p, q) = (r / rs, (c / cs).max(1e-12));
                kl += p * (p / q).ln();
            }
        }
        if kl < best.0 {
            best = (kl, i);
        }
    }
    abs_max(s) * best.1 as f32 / BINS as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(values: &[f32]) -> Stats {
        let mut s = Stats {
            lo: values.iter().copied().fold(f32::INFINITY, f32::min),
            hi: values.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            hist: Vec::new(),
        };
        add_to_histogram(&mut s, values);
        s
    }

    #[test]
    fn percentile_and_entropy_clip_a_rare_outlier() {
        // 100k values spread over [-1, 1) and one at 100.
        let mut v: Vec<f32> = (0..100_000).map(|i| (i % 2000) as f32 / 1000.0 - 1.0).collect();
        v.push(100.0);
        let s = stats(&v);
        let p = percentile_threshold(&s, 99.99);
        assert!((1.0..1.2).contains(&p), "{p}");
        assert_eq!(percentile_threshold(&s, 100.0), 100.0);
        let e = entropy_threshold(&s);
        assert!(e < 10.0, "{e}");
        assert!(e >= 0.9, "{e}");
    }

    #[test]
    fn calibration_names_parse() {
        assert_eq!("minmax".parse::<Calibration>(), Ok(Calibration::MinMax));
        assert_eq!(
            "percentile=99.9".parse::<Calibration>(),
            Ok(Calibration::Percentile(99.9))
        );
        assert!("percentile=101".parse::<Calibration>().is_err());
        assert!("kl".parse::<Calibration>().is_err());
    }
}

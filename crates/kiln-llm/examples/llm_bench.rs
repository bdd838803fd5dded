//! LLM serving benchmark on one machine, engine in process (no HTTP), bounded:
//!
//! ```text
//! cargo run --release -p kiln-llm --example llm_bench -- MODEL_DIR [--threads N] [--requests N]
//!     [--rate R] [--concurrency C] [--seed S] [--modes continuous,static,static-padded,serial] [--serial-requests N]
//!     [--prefix] [--decode] [--streams C] [--kv-dtype f32|f16]
//! ```
//!
//! - Modes over one workload (`--requests` requests, Poisson arrivals at `--rate` per second, prompt
//!   lengths uniform in 16..=512, outputs uniform in 16..=256 tokens, random token ids, end of
//!   sequence ignored): `continuous` (iteration-level batching, up to `--concurrency` sequences),
//!   `static` (batches of up to `--concurrency` requests run to completion before the next batch
//!   starts; a finished request leaves the step), `static-padded` (the same batches run as
//!   request-level batchers such as Hugging Face `generate` run them: prompts padded to the batch's
//!   longest, every sequence stepped until the batch's longest output is done), `serial` (one request at a time; `--serial-requests` of them, since its rate is what
//!   counts). Reported: output tokens/s over the makespan, TTFT and inter-token latency p50/p99,
//!   and for `continuous` the KV-cache waste (allocated slots not holding a token) beside what a
//!   dense max-length preallocation per running sequence would waste.
//! - `--prefix`: 16 requests, one after another, sharing a 256-token system prompt plus 16 tokens of
//!   their own, 16 output tokens: mean TTFT with the prefix cache on and off.
//! - `--streams C`: C streams at once (prompts of 16..=64 tokens, 128 output tokens each, all
//!   arriving together) against the same kind of request one at a time (2 of them): output tokens/s
//!   of both and their ratio, the decode-dominated case.
//! - `--decode`: single-stream greedy decode of 128 tokens after a 32-token prompt: ms/token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::Level;
use kiln_llm::{Engine, EngineConfig, Event, LlmModel, Request, SamplingParams, SchedulerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The allocator `kiln serve` runs with (the CLI's), so allocation costs match the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    dir: std::path::PathBuf,
    threads: usize,
    requests: usize,
    serial_requests: usize,
    rate: f64,
    concurrency: usize,
    seed: u64,
    modes: Vec<String>,
    prefix: bool,
    decode: bool,
    streams: Option<usize>,
}

/// The KV cache's element type (`--kv-dtype`), for every engine the benchmark builds.
static KV_DTYPE: std::sync::OnceLock<kiln::paged::KvDType> = std::sync::OnceLock::new();

fn parse() -> Args {
    let mut a = std::env::args().skip(1);
    let mut args = Args {
        dir: a.next().expect("usage: llm_bench MODEL_DIR [options]").into(),
        threads: 2,
        requests: 32,
        serial_requests: 4,
        rate: 4.0,
        concurrency: 32,
        seed: 1,
        modes: vec![],
        prefix: false,
        decode: false,
        streams: None,
    };
    while let Some(k) = a.next() {
        let mut v = || a.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--threads" => args.threads = v().parse().unwrap(),
            "--requests" => args.requests = v().parse().unwrap(),
            "--serial-requests" => args.serial_requests = v().parse().unwrap(),
            "--rate" => args.rate = v().parse().unwrap(),
            "--concurrency" => args.concurrency = v().parse().unwrap(),
            "--seed" => args.seed = v().parse().unwrap(),
            "--modes" => args.modes = v().split(',').map(str::to_string).collect(),
            "--prefix" => args.prefix = true,
            "--decode" => args.decode = true,
            "--streams" => args.streams = Some(v().parse().unwrap()),
            "--kv-dtype" => {
                let dt = match v().as_str() {
                    "f32" => kiln::paged::KvDType::F32,
                    "f16" => kiln::paged::KvDType::F16,
                    other => panic!("--kv-dtype is f32 or f16, not {other}"),
                };
                KV_DTYPE.set(dt).expect("--kv-dtype given twice");
            }
            other => panic!("unknown option {other}"),
        }
    }
    args
}

#[derive(Clone)]
struct Job {
    arrival: Duration,
    prompt: Vec<u32>,
    output: usize,
}

fn workload(n: usize, rate: f64, seed: u64) -> Vec<Job> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let u: f64 = rng.random::<f64>().max(1e-12);
            t += -u.ln() / rate;
            let plen = rng.random_range(16..=512);
            Job {
                arrival: Duration::from_secs_f64(t),
                prompt: (0..plen).map(|_| rng.random_range(100..49000)).collect(),
                output: rng.random_range(16..=256),
            }
        })
        .collect()
}

#[derive(Default, Clone)]
struct Trace {
    arrival: Option<Instant>,
    tokens: Vec<Instant>,
}

struct Outcome {
    traces: Vec<Trace>,
    makespan: Duration,
    waste: Option<(f64, f64)>,
}

fn engine(model: &Arc<LlmModel>, max_num_seqs: usize, prefix: bool) -> Engine {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: 512,
            max_model_len: 1024,
            chunked_prefill: true,
        },
        block_size: 16,
        kv_cache_bytes: 1 << 30,
        prefix_caching: prefix,
        kv_dtype: KV_DTYPE.get().copied().unwrap_or(kiln::paged::KvDType::F32),
    };
    Engine::new(model.clone(), &cfg).expect("engine")
}

fn request(job: &Job) -> Request {
    let mut r = Request::greedy(job.prompt.clone(), job.output);
    r.ignore_eos = true;
    r.params = SamplingParams::greedy();
    r
}

/// How requests are grouped into steps.
#[derive(Clone, Copy, PartialEq)]
enum Batching {
    /// Requests join the running batch when they arrive and leave when they finish.
    Continuous,
    /// Closed batches: the requests that have arrived when the engine is idle (up to the limit) run
    /// together, the next batch starts when all of them have finished; a finished request leaves the
    /// step (no compute spent on it).
    Static,
    /// Closed batches as request-level batchers run them (Hugging Face `generate`, FasterTransformer):
    /// every prompt of the batch padded to the batch's longest and every sequence stepped until the
    /// batch's longest output is done. Padding tokens are random (as costly as real ones, no prefix
    /// cache hits); a request's own output is its first `output` tokens.
    StaticPadded,
}

/// Drive the engine in real time over `jobs` (arrival times from the start).
fn run(model: &Arc<LlmModel>, jobs: &[Job], max_num_seqs: usize, batching: Batching) -> Outcome {
    let static_batches = batching != Batching::Continuous;
    let mut pad_rng = ChaCha8Rng::seed_from_u64(7);
    let mut e = engine(model, max_num_seqs, true);
    let start = Instant::now();
    let mut traces = vec![Trace::default(); jobs.len()];
    let mut next = 0;
    let mut in_batch = 0usize;
    let (mut slots_sum, mut tokens_sum, mut dense_sum, mut samples) = (0f64, 0f64, 0f64, 0u64);
    let max_len = 1024f64;
    loop {
        let now = start.elapsed();
        let may_admit = !static_batches || in_batch == 0;
        if may_admit {
            let first = next;
            while next < jobs.len() && jobs[next].arrival <= now && (!static_batches || next - first < max_num_seqs) {
                traces[next].arrival = Some(start + jobs[next].arrival);
                next += 1;
            }
            let batch = &jobs[first..next];
            let longest_prompt = batch.iter().map(|j| j.prompt.len()).max().unwrap_or(0);
            let longest_output = batch.iter().map(|j| j.output).max().unwrap_or(0);
            for (i, job) in (first..).zip(batch) {
                let r = if batching == Batching::StaticPadded {
                    let mut prompt: Vec<u32> = (job.prompt.len()..longest_prompt)
                        .map(|_| pad_rng.random_range(100..49000))
                        .collect();
                    prompt.extend_from_slice(&job.prompt);
                    request(&Job {
                        arrival: job.arrival,
                        prompt,
                        output: longest_output,
                    })
                } else {
                    request(job)
                };
                e.add_request(i as u64, r).expect("valid request");
            }
            let admitted = batch.len();
            if static_batches {
                in_batch = admitted;
            }
        }
        if !e.has_work() {
            if next == jobs.len() {
                break;
            }
            let wait = jobs[next].arrival.saturating_sub(start.elapsed());
            std::thread::sleep(wait);
            continue;
        }
        for ev in e.step() {
            if let Event::Token { request, finish, .. } = ev {
                let r = request as usize;
                if traces[r].tokens.len() < jobs[r].output {
                    traces[r].tokens.push(Instant::now());
                }
                if finish.is_some() && static_batches {
                    in_batch -= 1;
                }
            }
        }
        let s = e.scheduler();
        let b = s.blocks();
        let running = s.num_running();
        if running > 0 {
            let slots = (b.num_used_blocks() * b.block_size()) as f64;
            let held = s.allocated_tokens() as f64;
            slots_sum += slots;
            tokens_sum += held;
            dense_sum += running as f64 * max_len;
            samples += 1;
        }
    }
    let waste = (samples > 0).then(|| (1.0 - tokens_sum / slots_sum, 1.0 - tokens_sum / dense_sum));
    Outcome {
        traces,
        makespan: start.elapsed(),
        waste,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, o: &Outcome) {
    let out_tokens: usize = o.traces.iter().map(|t| t.tokens.len()).sum();
    let mut ttft: Vec<f64> = o
        .traces
        .iter()
        .filter_map(|t| Some((*t.tokens.first()? - t.arrival?).as_secs_f64() * 1e3))
        .collect();
    let mut itl: Vec<f64> = o
        .traces
        .iter()
        .flat_map(|t| t.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3))
        .collect();
    let tps = out_tokens as f64 / o.makespan.as_secs_f64();
    print!(
        "| {name} | {} | {out_tokens} | {:.1} | {tps:.1} | {:.0} / {:.0} | {:.1} / {:.1} |",
        o.traces.len(),
        o.makespan.as_secs_f64(),
        pct(&mut ttft, 0.5),
        pct(&mut ttft, 0.99),
        pct(&mut itl, 0.5),
        pct(&mut itl, 0.99)
    );
    match o.waste {
        Some((paged, dense)) => println!(" {:.1}% (dense: {:.1}%) |", paged * 100.0, dense * 100.0),
        None => println!(" |"),
    }
}

fn main() {
    let args = parse();
    kiln::set_num_threads(args.threads).expect("thread pool");
    let t = Instant::now();
    let model = Arc::new(LlmModel::load(&args.dir, Level::All).expect("load"));
    eprintln!(
        "loaded {} in {:.1} s; {} threads",
        args.dir.display(),
        t.elapsed().as_secs_f64(),
        kiln::num_threads()
    );
    if !args.modes.is_empty() {
        let jobs = workload(args.requests, args.rate, args.seed);
        println!("| mode | requests | output tokens | makespan s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | KV waste |");
        println!("|---|---|---|---|---|---|---|---|");
        for m in &args.modes {
            let o = match m.as_str() {
                "continuous" => run(&model, &jobs, args.concurrency, Batching::Continuous),
                "static" => run(&model, &jobs, args.concurrency, Batching::Static),
                "static-padded" => run(&model, &jobs, args.concurrency, Batching::StaticPadded),
                "serial" => {
                    let n = args.serial_requests.min(jobs.len());
                    let serial: Vec<Job> = jobs[..n]
                        .iter()
                        .map(|j| Job {
                            arrival: Duration::ZERO,
                            ..j.clone()
                        })
                        .collect();
                    run(&model, &serial, 1, Batching::Continuous)
                }
                other => panic!("unknown mode {other}"),
            };
            report(m, &o);
        }
    }
    if let Some(c) = args.streams {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let jobs: Vec<Job> = (0..c)
            .map(|_| {
                let plen = rng.random_range(16..=64);
                Job {
                    arrival: Duration::ZERO,
                    prompt: (0..plen).map(|_| rng.random_range(100..49000)).collect(),
                    output: 128,
                }
            })
            .collect();
        let many = run(&model, &jobs, c, Batching::Continuous);
        let one = run(&model, &jobs[..2], 1, Batching::Continuous);
        let rate =
            |o: &Outcome| o.traces.iter().map(|t| t.tokens.len()).sum::<usize>() as f64 / o.makespan.as_secs_f64();
        println!("| mode | requests | output tokens | makespan s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | KV waste |");
        println!("|---|---|---|---|---|---|---|---|");
        report(&format!("{c} streams at once"), &many);
        report("one at a time", &one);
        println!("ratio: {:.2}x", rate(&many) / rate(&one));
    }
    if args.prefix {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let system: Vec<u32> = (0..256).map(|_| rng.random_range(100..49000)).collect();
        for on in [false, true] {
            let mut e = engine(&model, 8, on);
            let mut ttfts = Vec::new();
            for i in 0..16u64 {
                let mut p = system.clone();
                p.extend((0..16).map(|_| rng.random_range(100..49000)));
                let job = Job {
                    arrival: Duration::ZERO,
                    prompt: p,
                    output: 16,
                };
                let t0 = Instant::now();
                e.add_request(i, request(&job)).unwrap();
                let mut first = None;
                while e.has_work() {
                    for ev in e.step() {
                        if matches!(ev, Event::Token { .. }) && first.is_none() {
                            first = Some(t0.elapsed());
                        }
                    }
                }
                if i > 0 {
                    ttfts.push(first.unwrap().as_secs_f64() * 1e3);
                }
            }
            let mean = ttfts.iter().sum::<f64>() / ttfts.len() as f64;
            println!(
                "prefix cache {}: mean TTFT {mean:.1} ms over 15 requests after the first (256 shared + 16 own tokens)",
                if on { "on" } else { "off" }
            );
        }
    }
    if args.decode {
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let mut e = engine(&model, 1, false);
        let job = Job {
            arrival: Duration::ZERO,
            prompt: (0..32).map(|_| rng.random_range(100..49000)).collect(),
            output: 129,
        };
        e.add_request(0, request(&job)).unwrap();
        let mut times = Vec::new();
        while e.has_work() {
            let t0 = Instant::now();
            e.step();
            times.push(t0.elapsed());
        }
        let decode = &times[1..];
        let ms = decode.iter().map(|d| d.as_secs_f64()).sum::<f64>() / decode.len() as f64 * 1e3;
        println!(
            "single-stream decode: {ms:.2} ms/token over {} tokens (prefill of 32 tokens: {:.1} ms)",
            decode.len(),
            times[0].as_secs_f64() * 1e3
        );
    }
}

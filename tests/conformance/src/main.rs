//! `kiln-conformance`: runs the ONNX node test suite (written by `scripts/gen-conformance-data.sh`)
//! on Kiln's CPU backend, compares with THE RULE (see `compare.rs`), and optionally runs
//! candle-onnx on the same tests, writes `docs/conformance.md`, and checks `expected_pass.txt`.

#[cfg(feature = "candle-baseline")]
mod candle_baseline;
mod compare;
mod mutate;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln::internals::onnx::{read_value_file, DataValue};
use kiln::internals::runtime::{Tensor, Value};
use kiln::{Device, Level, Precision, Session};

use compare::{compare, Tol};

#[derive(Parser, Debug)]
#[command(about = "ONNX node-test conformance runner for Kiln")]
struct Args {
    /// Directory of generated node tests.
    #[arg(long, env = "KILN_NODE_TESTS")]
    data: PathBuf,
    /// Only run tests whose name contains one of these substrings.
    #[arg(long)]
    filter: Vec<String>,
    /// Optimization level.
    #[arg(long, default_value = "basic")]
    level: Level,
    /// Numeric precision (docs/precision.md). fp16 compares with `|a-e| <= 1e-2 + 1e-2*|e|`; its
    /// pass set differs from fp32's, so use it for a report, not with `--check`.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Device: cpu, cuda or cuda:N (CUDA needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Fail when a test listed in this file no longer passes.
    #[arg(long)]
    check: Option<PathBuf>,
    /// Write the names of passing tests here.
    #[arg(long)]
    write_expected: Option<PathBuf>,
    /// Write the markdown report here (needs ORT results in DATA/ort_results.tsv).
    #[arg(long)]
    write_doc: Option<PathBuf>,
    /// Write per-test results (TSV).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Also run candle-onnx (needs the `candle-baseline` feature).
    #[arg(long)]
    candle: bool,
    /// Per-test timeout in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Instead of checking results, run every model with malformed inputs and fail on any panic.
    #[arg(long)]
    mutate: bool,
    /// Print every non-passing test.
    #[arg(long, short)]
    verbose: bool,
    /// Compare with meta.json's rtol/atol as written (no 1e-3 / 1e-5 floors); for generated data
    /// with tolerances chosen per case (tests/fuzz/op_fuzz.py).
    #[arg(long)]
    exact_tol: bool,
    /// TSV of tests the reference engine rejects (`name<TAB>kind<TAB>message`, written by
    /// tests/fuzz/op_fuzz.py): they have no expected outputs and must end in a clean Kiln error
    /// (no panic, no hang). Kind `invalid`: returning outputs is a failure too; kind
    /// `ort-unsupported`: outputs are accepted (a valid model the reference does not implement).
    #[arg(long)]
    expect_errors: Option<PathBuf>,
    /// Exit non-zero when any test does not pass (including --expect-errors tests).
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail(String),
    Error(String),
    Unsupported(String),
    /// The run panicked (message and location) or did not finish within the timeout.
    Panic(String),
}

impl Status {
    fn tag(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail(_) => "fail",
            Status::Error(_) => "error",
            Status::Unsupported(_) => "unsupported",
            Status::Panic(_) => "panic",
        }
    }
    fn detail(&self) -> &str {
        match self {
            Status::Pass => "",
            Status::Fail(d) | Status::Error(d) | Status::Unsupported(d) | Status::Panic(d) => d,
        }
    }
}

#[derive(serde::Deserialize, Clone)]
pub struct Meta {
    pub rtol: f64,
    pub atol: f64,
    pub inputs: Vec<IoMeta>,
    pub outputs: Vec<IoMeta>,
}

#[derive(serde::Deserialize, Clone)]
pub struct IoMeta {
    pub name: String,
    pub kind: String,
}

pub struct TestCase {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

impl TestCase {
    /// meta.json's rtol/atol as written.
    pub fn exact_tol(&self) -> Tol {
        Tol {
            rtol: self.meta.rtol,
            atol: self.meta.atol,
        }
    }

    /// The inputs of the first data set (for tests without expected outputs).
    pub fn first_inputs(&self) -> Result<Vec<DataValue>> {
        let d = self.dir.join("test_data_set_0");
        self.meta
            .inputs
            .iter()
            .enumerate()
            .map(|(i, m)| Ok(read_value_file(&d.join(format!("input_{i}.pb")), &m.kind)?))
            .collect()
    }

    pub fn tol(&self) -> Tol {
        Tol {
            rtol: self.meta.rtol.max(1e-3),
            atol: self.meta.atol.max(1e-5),
        }
    }

    /// Every data set: (inputs, expected outputs).
    pub fn data_sets(&self) -> Result<Vec<(Vec<DataValue>, Vec<DataValue>)>> {
        let mut sets = Vec::new();
        let mut k = 0;
        loop {
            let d = self.dir.join(format!("test_data_set_{k}"));
            if !d.is_dir() {
                break;
            }
            let mut ins = Vec::new();
            for (i, m) in self.meta.inputs.iter().enumerate() {
                ins.push(read_value_file(&d.join(format!("input_{i}.pb")), &m.kind)?);
            }
            let mut outs = Vec::new();
            for (i, m) in self.meta.outputs.iter().enumerate() {
                outs.push(read_value_file(&d.join(format!("output_{i}.pb")), &m.kind)?);
            }
            sets.push((ins, outs));
            k += 1;
        }
        Ok(sets)
    }
}

fn to_value(v: &DataValue, dev: &candle_core::Device) -> Result<Value> {
    Ok(match v {
        DataValue::Tensor(t) => Value::Tensor(Tensor::from_data(t, dev)?),
        DataValue::Sequence(items) => {
            let mut ts = Vec::new();
            for i in items {
                match i {
                    DataValue::Tensor(t) => ts.push(Tensor::from_data(t, dev)?),
                    _ => bail!("nested sequences are not supported"),
                }
            }
            let dt = ts.first().map(Tensor::dtype);
            Value::Sequence(ts, dt)
        }
        DataValue::Optional(o) => {
            Value::Optional(o.as_ref().map(|x| to_value(x, dev)).transpose()?.map(Box::new), None)
        }
    })
}

fn from_value(v: Value, name: &str) -> Result<DataValue> {
    Ok(match v {
        Value::Tensor(t) => DataValue::Tensor(t.to_data(name)?),
        Value::Sequence(ts, _) => DataValue::Sequence(
            ts.iter()
                .map(|t| Ok(DataValue::Tensor(t.to_data(name)?)))
                .collect::<Result<_>>()?,
        ),
        Value::Optional(o, _) => DataValue::Optional(o.map(|x| from_value(*x, name)).transpose()?.map(Box::new)),
    })
}

/// A panic Kiln caught itself (reported as an internal error) counts as a panic.
fn is_internal(e: &kiln::Error) -> bool {
    matches!(
        e,
        kiln::Error::Internal { .. } | kiln::Error::Runtime(kiln::internals::runtime::RuntimeError::Internal { .. })
    )
}

fn run_kiln(case: &TestCase, level: Level, precision: Precision, device: Device, exact_tol: bool) -> Status {
    let dev = match device.to_candle() {
        Ok(d) => d,
        Err(e) => return Status::Error(e.to_string()),
    };
    let session = match Session::builder()
        .device(device)
        .optimization(level)
        .precision(precision)
        .build_from_file(case.dir.join("model.onnx"))
    {
        Ok(s) => s,
        Err(e) if is_internal(&e) => return Status::Panic(e.to_string()),
        Err(e) => {
            let msg = e.to_string();
            return if msg.contains("unsupported") || msg.contains("not supported") {
                Status::Unsupported(msg)
            } else {
                Status::Error(msg)
            };
        }
    };
    let sets = match case.data_sets() {
        Ok(s) => s,
        Err(e) => return Status::Error(format!("test data: {e}")),
    };
    let model = match kiln::internals::onnx::load_model(case.dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Status::Error(e.to_string()),
    };
    let graph_inputs: Vec<String> = model
        .graph
        .inputs
        .iter()
        .map(|v| model.graph.value_name(*v).to_string())
        .collect();
    for (ins, expected) in sets {
        let by_name: HashMap<&str, &DataValue> = case
            .meta
            .inputs
            .iter()
            .map(|m| m.name.as_str())
            .zip(ins.iter())
            .collect();
        let mut feeds = Vec::new();
        for n in &graph_inputs {
            match by_name.get(n.as_str()) {
                Some(v) => match to_value(v, &dev) {
                    Ok(v) => feeds.push(Some(v)),
                    Err(e) => return Status::Unsupported(format!("input '{n}': {e}")),
                },
                None => feeds.push(None),
            }
        }
        let outs = match session.run_values(feeds) {
            Ok(o) => o,
            Err(e) if is_internal(&e) => return Status::Panic(e.to_string()),
            Err(e) => {
                let msg = e.to_string();
                return if msg.contains("not supported") {
                    Status::Unsupported(msg)
                } else {
                    Status::Error(msg)
                };
            }
        };
        if outs.len() != expected.len() {
            return Status::Fail(format!("{} outputs, expected {}", outs.len(), expected.len()));
        }
        for (i, (o, e)) in outs.into_iter().zip(&expected).enumerate() {
            let name = &case.meta.outputs[i].name;
            let got = match from_value(o, name) {
                Ok(g) => g,
                Err(err) => return Status::Error(format!("output '{name}': {err}")),
            };
            let mut tol = if exact_tol { case.exact_tol() } else { case.tol() };
            if precision == Precision::F16 {
                tol.rtol = tol.rtol.max(1e-2);
                tol.atol = tol.atol.max(1e-2);
            }
            if let Err(m) = compare(&got, e, &tol) {
                return Status::Fail(format!("output '{name}': {m}"));
            }
        }
    }
    Status::Pass
}

/// Runs a test the reference engine rejects. `Error`/`Unsupported`: Kiln refused it cleanly;
/// `Fail`: Kiln returned outputs (acceptable only for kind `ort-unsupported`, see `--expect-errors`);
/// `Panic` from `guarded`.
fn run_expect_error(case: &TestCase, level: Level, device: Device) -> Status {
    let dev = match device.to_candle() {
        Ok(d) => d,
        Err(e) => return Status::Error(e.to_string()),
    };
    let session = match Session::builder()
        .device(device)
        .optimization(level)
        .build_from_file(case.dir.join("model.onnx"))
    {
        Ok(s) => s,
        Err(e) if is_internal(&e) => return Status::Panic(e.to_string()),
        Err(e) => return Status::Error(format!("at load: {e}")),
    };
    let ins = match case.first_inputs() {
        Ok(i) => i,
        Err(e) => return Status::Unsupported(format!("test data: {e}")),
    };
    let model = match kiln::internals::onnx::load_model(case.dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Status::Error(e.to_string()),
    };
    let mut feeds = Vec::new();
    for v in &model.graph.inputs {
        let n = model.graph.value_name(*v);
        match case.meta.inputs.iter().position(|m| m.name == n) {
            Some(i) => match to_value(&ins[i], &dev) {
                Ok(v) => feeds.push(Some(v)),
                Err(e) => return Status::Unsupported(format!("input '{n}': {e}")),
            },
            None => feeds.push(None),
        }
    }
    match session.run_values(feeds) {
        Ok(outs) => {
            let shapes: Vec<String> = outs
                .iter()
                .map(|o| match o {
                    Value::Tensor(t) => format!("{:?}", t.dims()),
                    _ => "non-tensor".into(),
                })
                .collect();
            Status::Fail(format!("returned outputs of shapes {}", shapes.join(" ")))
        }
        Err(e) if is_internal(&e) => Status::Panic(e.to_string()),
        Err(e) => Status::Error(format!("at run: {e}")),
    }
}

thread_local! {
    static PANIC_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `f` on a worker thread with a timeout; panics become errors naming where they happened.
fn guarded(timeout: Duration, f: impl FnOnce() -> Status + Send + 'static) -> Status {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANIC_AT.with(|p| *p.borrow_mut() = at);
        }))
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|p| (p, PANIC_AT.with(|a| a.borrow().clone())));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(s)) => s,
        Ok(Err((p, at))) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Status::Panic(format!("panic at {at}: {msg}"))
        }
        Err(_) => Status::Panic(format!("timed out after {}s", timeout.as_secs())),
    }
}

fn load_cases(data: &Path, filters: &[String]) -> Result<Vec<TestCase>> {
    let mut cases = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(data)
        .with_context(|| format!("reading {}", data.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)
            .with_context(|| format!("{name}/meta.json"))?;
        cases.push(TestCase { name, dir, meta });
    }
    Ok(cases)
}

fn read_tsv(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// The operator a test exercises: the single node's op, or for `_expanded` tests the op of the
/// unexpanded sibling.
fn test_ops(cases: &[TestCase]) -> BTreeMap<String, String> {
    let mut single: BTreeMap<String, String> = BTreeMap::new();
    for c in cases {
        if let Ok(m) = kiln::internals::onnx::load_model(c.dir.join("model.onnx")) {
            let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
            let op = if ops.len() == 1 {
                ops[0].to_string()
            } else {
                String::new()
            };
            single.insert(c.name.clone(), op);
        }
    }
    let mut out = BTreeMap::new();
    for c in cases {
        let mut op = single.get(&c.name).cloned().unwrap_or_default();
        if op.is_empty() {
            if let Some(i) = c.name.find("_expanded") {
                op = single.get(&c.name[..i]).cloned().unwrap_or_default();
            }
        }
        if op.is_empty() {
            op = "(multi-node)".into();
        }
        out.insert(c.name.clone(), op);
    }
    out
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cases = load_cases(&args.data, &args.filter)?;
    if cases.is_empty() {
        bail!("no tests found in {}", args.data.display());
    }
    let device: Device = args.device.parse()?;
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    if args.mutate {
        let mut bad = Vec::new();
        for c in &cases {
            let (name, dir, meta) = (c.name.clone(), c.dir.clone(), c.meta.clone());
            let st = guarded(timeout, move || mutate::run(&TestCase { name, dir, meta }));
            if st != Status::Pass {
                println!("{:<60} {}", c.name, st.detail().chars().take(300).collect::<String>());
                bad.push(c.name.clone());
            }
        }
        println!(
            "mutated inputs: {} of {} models panicked or hung ({:.1}s)",
            bad.len(),
            cases.len(),
            started.elapsed().as_secs_f64()
        );
        if !bad.is_empty() {
            bail!("{} models panicked or hung on malformed inputs", bad.len());
        }
        return Ok(());
    }
    let expect_errors: BTreeMap<String, String> = match &args.expect_errors {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            text.lines()
                .filter_map(|l| {
                    let mut it = l.split('\t');
                    Some((it.next()?.to_string(), it.next()?.to_string()))
                })
                .collect()
        }
        None => BTreeMap::new(),
    };
    // name -> (kind, Kiln's outcome, acceptable)
    let mut error_results: BTreeMap<String, (String, Status, bool)> = BTreeMap::new();
    let mut kiln_results: BTreeMap<String, Status> = BTreeMap::new();
    let mut fallbacks: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for c in &cases {
        if let Some(kind) = expect_errors.get(&c.name) {
            let (name, dir, meta, level) = (c.name.clone(), c.dir.clone(), c.meta.clone(), args.level);
            let st = guarded(timeout, move || {
                run_expect_error(&TestCase { name, dir, meta }, level, device)
            });
            let ok = match &st {
                Status::Error(_) | Status::Unsupported(_) => true,
                Status::Fail(_) => kind == "ort-unsupported",
                Status::Pass | Status::Panic(_) => false,
            };
            if (args.verbose || args.strict) && !ok {
                println!(
                    "{:<60} {:<11} expected an error ({kind}): {}",
                    c.name,
                    st.tag(),
                    st.detail().chars().take(300).collect::<String>()
                );
            }
            error_results.insert(c.name.clone(), (kind.clone(), st, ok));
            continue;
        }
        let (name, dir, meta, level, precision, exact_tol) = (
            c.name.clone(),
            c.dir.clone(),
            c.meta.clone(),
            args.level,
            args.precision,
            args.exact_tol,
        );
        let before = kiln::internals::runtime::host_fallback_count();
        let st = guarded(timeout, move || {
            run_kiln(&TestCase { name, dir, meta }, level, precision, device, exact_tol)
        });
        if kiln::internals::runtime::host_fallback_count() > before {
            fallbacks.insert(c.name.clone());
        }
        if (args.verbose || args.strict) && st != Status::Pass {
            println!(
                "{:<60} {:<11} {}",
                c.name,
                st.tag(),
                st.detail().chars().take(200).collect::<String>()
            );
        }
        kiln_results.insert(c.name.clone(), st);
    }
    let passed = kiln_results.values().filter(|s| **s == Status::Pass).count();
    if !matches!(device, Device::Cpu) {
        let fell_back: Vec<&String> = kiln_results.keys().filter(|n| fallbacks.contains(*n)).collect();
        println!(
            "{} nodes switched to the CPU (no {device} kernel) in {} tests: {}",
            kiln::internals::runtime::host_fallback_count(),
            fell_back.len(),
            fell_back.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
        );
    }
    println!(
        "kiln ({device}): {passed} of {} node tests pass ({:.1}s)",
        kiln_results.len(),
        started.elapsed().as_secs_f64()
    );
    if args.expect_errors.is_some() {
        let count = |f: &dyn Fn(&Status) -> bool| error_results.values().filter(|(_, s, _)| f(s)).count();
        let bad = error_results.values().filter(|(_, _, ok)| !ok).count();
        println!(
            "expected errors: {} tests: {} clean errors, {} outputs returned ({} of them where the model is invalid), {} panics or hangs; {bad} not acceptable",
            error_results.len(),
            count(&|s| matches!(s, Status::Error(_) | Status::Unsupported(_))),
            count(&|s| matches!(s, Status::Fail(_))),
            error_results
                .values()
                .filter(|(k, s, _)| matches!(s, Status::Fail(_)) && k != "ort-unsupported")
                .count(),
            count(&|s| matches!(s, Status::Panic(_))),
        );
    }

    let candle_results: Option<BTreeMap<String, Status>> = if args.candle {
        #[cfg(feature = "candle-baseline")]
        {
            let mut m = BTreeMap::new();
            for c in &cases {
                let (name, dir, meta) = (c.name.clone(), c.dir.clone(), c.meta.clone());
                m.insert(
                    c.name.clone(),
                    guarded(timeout, move || candle_baseline::run(&TestCase { name, dir, meta })),
                );
            }
            let p = m.values().filter(|s| **s == Status::Pass).count();
            println!("candle-onnx: {p} of {} node tests pass", cases.len());
            Some(m)
        }
        #[cfg(not(feature = "candle-baseline"))]
        bail!("--candle needs the candle-baseline feature")
    } else {
        None
    };

    if let Some(p) = &args.results {
        let mut s = String::new();
        for (n, st) in &kiln_results {
            s.push_str(&format!(
                "{n}\t{}\t{}\n",
                st.tag(),
                st.detail().replace(['\t', '\n'], " ")
            ));
        }
        // Expect-error tests: tag `expect-error:<outcome>`, `ok`/`bad`, then the detail.
        for (n, (_, st, ok)) in &error_results {
            s.push_str(&format!(
                "{n}\texpect-error:{}\t{}\t{}\n",
                st.tag(),
                if *ok { "ok" } else { "bad" },
                st.detail().replace(['\t', '\n'], " ")
            ));
        }
        std::fs::write(p, s)?;
    }
    if let Some(p) = &args.write_expected {
        let mut s = String::from("# Node tests Kiln's CPU backend passes; CI fails if one regresses.\n# Regenerate: scripts/conformance.sh --write-expected\n");
        for (n, st) in &kiln_results {
            if *st == Status::Pass {
                s.push_str(n);
                s.push('\n');
            }
        }
        std::fs::write(p, s)?;
    }
    if let Some(p) = &args.write_doc {
        let ort = read_tsv(&args.data.join("ort_results.tsv"));
        let ops = test_ops(&cases);
        std::fs::write(p, report(&cases, &kiln_results, &ort, candle_results.as_ref(), &ops))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.check {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let mut regressions = Vec::new();
        for name in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            match kiln_results.get(name) {
                Some(Status::Pass) => {}
                Some(st) => regressions.push(format!("{name}: {} {}", st.tag(), st.detail())),
                None if args.filter.is_empty() => regressions.push(format!("{name}: missing from the data")),
                None => {}
            }
        }
        if !regressions.is_empty() {
            for r in &regressions {
                eprintln!("REGRESSION {r}");
            }
            bail!("{} expected-pass tests regressed", regressions.len());
        }
        println!("conformance check: no regressions against {}", p.display());
    }
    if args.strict {
        let failed = kiln_results.values().filter(|s| **s != Status::Pass).count();
        let bad = error_results.values().filter(|(_, _, ok)| !ok).count();
        if failed + bad > 0 {
            bail!("{failed} tests did not pass, {bad} expected-error tests panicked, hung or returned outputs");
        }
    }
    Ok(())
}

fn report(
    cases: &[TestCase],
    kiln: &BTreeMap<String, Status>,
    ort: &BTreeMap<String, String>,
    candle: Option<&BTreeMap<String, Status>>,
    ops: &BTreeMap<String, String>,
) -> String {
    let total = cases.len();
    let kp = kiln.values().filter(|s| **s == Status::Pass).count();
    let op_ = ort.values().filter(|s| *s == "pass").count();
    let both = kiln
        .iter()
        .filter(|(n, s)| **s == Status::Pass && ort.get(*n).map(String::as_str) == Some("pass"))
        .count();
    let pct = |a: usize, b: usize| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
    let mut s = String::new();
    s.push_str("# Conformance: the ONNX node test suite\n\n");
    s.push_str("Generated by `bash scripts/conformance.sh` (the `kiln-conformance` runner, 2 cores, no GPU). Data: onnx 1.23.2 node tests\n");
    s.push_str(
        "(`onnx.backend.test.case.node.collect_testcases()`), written by `scripts/gen-conformance-data.sh`.\n\n",
    );
    s.push_str(
        "Rule: output count equal; shapes and dtypes exactly equal; floats `|a-e| <= atol + rtol*|e|` in f64 with\n",
    );
    s.push_str(
        "rtol = max(1e-3, test rtol), atol = max(1e-5, test atol), NaN == NaN, infinities exact; ints/bools exact.\n",
    );
    s.push_str(
        "The same rule is applied to ONNX Runtime (`tests/conformance/ort_rates.py`, Python onnxruntime 1.32.0, CPU)\n",
    );
    s.push_str("and to candle-onnx 0.11.1 `simple_eval`.\n\n");
    s.push_str("| engine | passed | of | rate |\n|---|---|---|---|\n");
    s.push_str(&format!("| Kiln CPU | {kp} | {total} | {:.1}% |\n", pct(kp, total)));
    s.push_str(&format!(
        "| ONNX Runtime 1.32 (CPU) | {op_} | {total} | {:.1}% |\n",
        pct(op_, total)
    ));
    if let Some(c) = candle {
        let cp = c.values().filter(|s| **s == Status::Pass).count();
        s.push_str(&format!(
            "| candle-onnx 0.11.1 | {cp} | {total} | {:.1}% |\n",
            pct(cp, total)
        ));
    }
    s.push_str(&format!(
        "\n**Kiln passes {both} of the {op_} tests ONNX Runtime passes ({:.1}%).**\n\n",
        pct(both, op_)
    ));
    // The GPU figure cannot be regenerated here (no GPU); it is the last measured one, with its run.
    s.push_str(
        "On CUDA (fp32), last measured on an NVIDIA H200 (driver 580.159.04) on 2026-11-26 at commit 27125ea with the\n\
         same runner and rule (`kiln-conformance --device cuda:0`, `scripts/cuda/gpu-check.sh`): **Kiln CUDA 1814 of\n\
         1884 (96.3%)**, the same pass set as the CPU build on that machine, with 31 nodes (in 31 tests) run on the\n\
         CPU fallback; details in [gpu.md](gpu.md). That run predates the fused CUDA kernels.\n\n",
    );
    // Per-op table.
    let mut per: BTreeMap<&str, [usize; 5]> = BTreeMap::new();
    for c in cases {
        let op = ops.get(&c.name).map(String::as_str).unwrap_or("(multi-node)");
        let e = per.entry(op).or_default();
        match kiln.get(&c.name) {
            Some(Status::Pass) => e[0] += 1,
            Some(Status::Fail(_)) => e[1] += 1,
            Some(Status::Error(_) | Status::Panic(_)) => e[2] += 1,
            _ => e[3] += 1,
        }
        if ort.get(&c.name).map(String::as_str) == Some("pass") {
            e[4] += 1;
        }
    }
    s.push_str("## Per operator\n\n`_expanded` tests count under the operator they expand. Unsupported = an operator or dtype Kiln refuses at load.\n\n");
    s.push_str("| op | tests | Kiln pass | fail | error | unsupported | ORT pass |\n|---|---|---|---|---|---|---|\n");
    for (op, e) in &per {
        let n: usize = e[..4].iter().sum();
        s.push_str(&format!(
            "| {op} | {n} | {} | {} | {} | {} | {} |\n",
            e[0], e[1], e[2], e[3], e[4]
        ));
    }
    s.push_str(
        "\nKnown gaps: Kiln refuses string tensors (StringConcat, StringSplit, StringNormalizer, RegexFullMatch, ",
    );
    s.push_str(
        "string Equal, string LabelEncoder); training-mode Dropout with a ratio above 0 is random by definition.\n",
    );
    s.push_str("\n## Tests ORT passes and Kiln does not\n\n| test | Kiln | detail |\n|---|---|---|\n");
    for (n, st) in kiln {
        if *st != Status::Pass && ort.get(n).map(String::as_str) == Some("pass") {
            let d: String = st.detail().chars().take(120).collect::<String>().replace('|', "\\|");
            s.push_str(&format!("| {n} | {} | {d} |\n", st.tag()));
        }
    }
    s
}

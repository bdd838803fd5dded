//! Fixed-budget fuzzing that runs on stable Rust inside `cargo test`: a seeded xorshift RNG,
//! byte-level mutations (bit flips, interesting values, protobuf varint and length-field edits,
//! JSON token edits, splices, truncation), and [`Fuzzer`], which runs each input under
//! `catch_unwind`, treats errors the target reports as caught panics as crashes too, flags slow
//! inputs, aborts the process with the input saved when one hangs, and at the end writes every
//! distinct crashing input to a directory and fails listing them.
//!
//! Budgets: [`iterations`] reads `KILN_FUZZ_ITERS` (`5000` for an absolute count, `10x` to
//! multiply the harness's default); `KILN_FUZZ_SEED` changes the RNG seed (default fixed, so a
//! CI run is reproducible).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

pub use arbitrary;

/// xorshift64* seeded through splitmix64 (never zero).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Executions for a harness: `default`, or `KILN_FUZZ_ITERS` (`N`, or `Nx` for `N * default`).
pub fn iterations(default: usize) -> usize {
    match std::env::var("KILN_FUZZ_ITERS") {
        Ok(v) => {
            let v = v.trim();
            if let Some(m) = v.strip_suffix('x') {
                m.parse::<usize>().map(|m| m * default).unwrap_or(default)
            } else {
                v.parse().unwrap_or(default)
            }
        }
        Err(_) => default,
    }
}

/// The RNG seed: `KILN_FUZZ_SEED` or a fixed default, mixed with the harness name.
pub fn seed_for(name: &str) -> u64 {
    let base = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0x6b69_6c6e);
    name.bytes()
        .fold(base, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

pub const INTERESTING_8: &[u8] = &[0, 1, 2, 0x7f, 0x80, 0x81, 0xff, 0xfe, 0x40, 0x10, 0x20, 0x08];
pub const INTERESTING_32: &[u32] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];
pub const INTERESTING_64: &[u64] = &[
    0,
    1,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_ffff,
];
/// Numbers that stress JSON decoders: overflow per integer width, negative zero, out-of-range floats.
pub const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "-0",
    "1",
    "2",
    "127",
    "128",
    "-129",
    "255",
    "256",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e309",
    "-1e309",
    "1.5",
    "3.4028236e38",
    "65520",
    "1e-400",
    "100000000000000000000000000000",
];
/// Tokens inserted into JSON text.
pub const JSON_TOKENS: &[&str] = &[
    "[", "]", "{", "}", "\"", ",", ":", "null", "true", "[[", "]]", "[]", "{}", "\"\"", "-", "e", ".", "\\u0000",
    "\\ud800",
];

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Stacked byte-level mutations ("havoc"): 1, 2, 4 or 8 edits per call, then capped at `max_len`.
/// `corpus` supplies the other side of splices. `text` favors JSON-aware edits.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], max_len: usize, text: bool) {
    let rounds = 1usize << rng.below(4);
    for _ in 0..rounds {
        let op = if text && rng.chance(1, 2) {
            100 + rng.below(4)
        } else {
            rng.below(14)
        };
        mutate_once(rng, data, corpus, op);
    }
    data.truncate(max_len);
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], op: usize) {
    let len = data.len();
    match op {
        // bit flip
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // interesting byte
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(INTERESTING_8);
        }
        // random byte
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        // insert a byte
        3 => {
            let i = rng.below(len + 1);
            let b = if rng.chance(1, 2) {
                *rng.pick(INTERESTING_8)
            } else {
                rng.next_u64() as u8
            };
            data.insert(i, b);
        }
        // delete a range
        4 if len > 0 => {
            let i = rng.below(len);
            let n = rng.range(1, 16.min(len - i));
            data.drain(i..i + n);
        }
        // a run of varint continuation bytes (a huge or overlong length/tag)
        5 => {
            let i = rng.below(len + 1);
            let n = rng.range(1, 10);
            let mut run: Vec<u8> = (0..n).map(|_| 0x80 | rng.next_u64() as u8).collect();
            if rng.chance(2, 3) {
                run.push(rng.next_u64() as u8 & 0x7f);
            }
            data.splice(i..i, run);
        }
        // protobuf length field: after a length-delimited key (wire type 2), replace the varint
        6 => {
            let keys: Vec<usize> = (0..len.saturating_sub(1)).filter(|&i| data[i] & 7 == 2).collect();
            if keys.is_empty() {
                return mutate_once(rng, data, corpus, 0);
            }
            let at = *rng.pick(&keys) + 1;
            let mut end = at;
            let mut old: u64 = 0;
            while end < len && end - at < 10 {
                old |= u64::from(data[end] & 0x7f) << (7 * (end - at));
                end += 1;
                if data[end - 1] & 0x80 == 0 {
                    break;
                }
            }
            let new = match rng.below(6) {
                0 => old.wrapping_add(1),
                1 => old.saturating_sub(1),
                2 => old.wrapping_add(rng.range(2, 64) as u64),
                3 => 0,
                4 => *rng.pick(INTERESTING_64),
                _ => old.saturating_sub(rng.range(2, 64) as u64),
            };
            let mut enc = Vec::new();
            varint(new, &mut enc);
            data.splice(at..end, enc);
        }
        // 4 or 8 bytes with an interesting little-endian integer
        7 if len >= 4 => {
            if len >= 8 && rng.chance(1, 2) {
                let i = rng.below(len - 7);
                data[i..i + 8].copy_from_slice(&rng.pick(INTERESTING_64).to_le_bytes());
            } else {
                let i = rng.below(len - 3);
                data[i..i + 4].copy_from_slice(&rng.pick(INTERESTING_32).to_le_bytes());
            }
        }
        // splice: a prefix of this input and a suffix of another
        8 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            let a = rng.below(len + 1);
            let b = rng.below(other.len() + 1);
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        // truncate
        9 if len > 0 => {
            let n = rng.below(len);
            data.truncate(n);
        }
        // duplicate a chunk elsewhere
        10 if len > 0 => {
            let i = rng.below(len);
            let n = rng.range(1, 32.min(len - i));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        // small arithmetic on a byte
        11 if len > 0 => {
            let i = rng.below(len);
            let d = rng.range(1, 35) as u8;
            data[i] = if rng.chance(1, 2) {
                data[i].wrapping_add(d)
            } else {
                data[i].wrapping_sub(d)
            };
        }
        // overwrite a random range with random bytes
        12 if len > 0 => {
            let i = rng.below(len);
            let n = rng.range(1, 8.min(len - i));
            for b in &mut data[i..i + n] {
                *b = rng.next_u64() as u8;
            }
        }
        // the whole input of another seed, then keep mutating
        13 if !corpus.is_empty() => {
            *data = rng.pick(corpus).clone();
        }
        // JSON: replace a number with an interesting one
        100 | 101 => {
            let starts: Vec<usize> = (0..len)
                .filter(|&i| {
                    (data[i].is_ascii_digit() || data[i] == b'-') && (i == 0 || !data[i - 1].is_ascii_alphanumeric())
                })
                .collect();
            if starts.is_empty() {
                return mutate_once(rng, data, corpus, 102);
            }
            let s = *rng.pick(&starts);
            let mut e = s + 1;
            while e < len && (data[e].is_ascii_digit() || b".eE+-".contains(&data[e])) {
                e += 1;
            }
            let num = rng.pick(INTERESTING_NUMBERS).as_bytes().to_vec();
            data.splice(s..e, num);
        }
        // JSON: insert a structural token
        102 => {
            let i = rng.below(len + 1);
            let t = rng.pick(JSON_TOKENS).as_bytes().to_vec();
            data.splice(i..i, t);
        }
        // JSON: delete from one structural character to another
        103 if len > 0 => {
            let marks: Vec<usize> = (0..len).filter(|&i| b"[]{},:\"".contains(&data[i])).collect();
            if marks.len() < 2 {
                return mutate_once(rng, data, corpus, 4);
            }
            let a = rng.below(marks.len() - 1);
            let b = rng.range(a + 1, (a + 4).min(marks.len() - 1));
            data.drain(marks[a]..marks[b]);
        }
        _ if len == 0 => data.push(rng.next_u64() as u8),
        _ => mutate_once(rng, data, corpus, 3),
    }
}

/// Where the panic hook reports panics raised inside [`Fuzzer::exec`] (location and message).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Executions running right now, all fuzzers of the process together; the hook stays quiet while
/// any runs and defers to the previous hook otherwise.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if ACTIVE.load(Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let loc = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                s.to_string()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                String::new()
            };
            if let Ok(mut p) = PANICS.lock() {
                if p.len() < 64 {
                    p.push(format!("{loc}: {msg}"));
                }
            }
        }));
    });
}

/// One distinct crash (the smallest input seen with its signature).
#[derive(Debug, Clone)]
pub struct Finding {
    /// `panic`, `error` (a caught panic the target reported as an error), or `slow`.
    pub kind: &'static str,
    pub signature: String,
    pub message: String,
    pub input: Vec<u8>,
    pub hits: usize,
}

struct Watch {
    current: Mutex<Option<(Instant, Vec<u8>)>>,
    done: AtomicBool,
}

/// Runs inputs against a target and collects crashes; see the crate docs.
pub struct Fuzzer {
    name: String,
    dir: PathBuf,
    rng: Rng,
    execs: usize,
    started: Instant,
    findings: HashMap<String, Finding>,
    slow: Duration,
    watch: Arc<Watch>,
}

impl Fuzzer {
    /// A fuzzer whose findings go to `<tmp_dir>/fuzz-<name>/` (emptied now). Executions slower
    /// than `KILN_FUZZ_SLOW_SECS` (default 10) are findings; one still running after
    /// `KILN_FUZZ_HANG_SECS` (default 120) has its input written to `hang.bin` there and the
    /// process exits with status 101.
    pub fn new(name: &str, tmp_dir: impl AsRef<Path>) -> Self {
        install_hook();
        let dir = tmp_dir.as_ref().join(format!("fuzz-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        let secs = |var: &str, default: u64| {
            std::env::var(var)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(default)
        };
        let watch = Arc::new(Watch {
            current: Mutex::new(None),
            done: AtomicBool::new(false),
        });
        let hang = Duration::from_secs(secs("KILN_FUZZ_HANG_SECS", 120));
        {
            let watch = watch.clone();
            let dir = dir.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                while !watch.done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let cur = watch.current.lock().map(|c| c.clone()).unwrap_or(None);
                    if let Some((start, input)) = cur {
                        if start.elapsed() > hang {
                            let _ = std::fs::create_dir_all(&dir);
                            let path = dir.join("hang.bin");
                            let _ = std::fs::write(&path, &input);
                            eprintln!(
                                "fuzz {name}: an input has run for over {} s (hang); saved to {}",
                                hang.as_secs(),
                                path.display()
                            );
                            std::process::exit(101);
                        }
                    }
                }
            });
        }
        Fuzzer {
            name: name.to_string(),
            dir,
            rng: Rng::new(seed_for(name)),
            execs: 0,
            started: Instant::now(),
            findings: HashMap::new(),
            slow: Duration::from_secs(secs("KILN_FUZZ_SLOW_SECS", 10)),
            watch,
        }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    pub fn execs(&self) -> usize {
        self.execs
    }

    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.values()
    }

    /// Runs `f` on `input` (saved if it crashes). `f` returns `Err(message)` for a crash the
    /// target caught itself (an internal error made from a panic). Returns whether it passed.
    pub fn exec(&mut self, input: &[u8], f: impl FnOnce() -> Result<(), String>) -> bool {
        self.execs += 1;
        if let Ok(mut c) = self.watch.current.lock() {
            *c = Some((Instant::now(), input.to_vec()));
        }
        if let Ok(mut p) = PANICS.lock() {
            p.clear();
        }
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(f));
        let took = start.elapsed();
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut c) = self.watch.current.lock() {
            *c = None;
        }
        let where_ = PANICS.lock().map(|p| p.first().cloned()).unwrap_or(None);
        let (kind, message) = match result {
            Ok(Ok(())) if took > self.slow => ("slow", format!("took {:.1} s", took.as_secs_f64())),
            Ok(Ok(())) => return true,
            Ok(Err(m)) => ("error", m),
            Err(payload) => {
                let m = if let Some(s) = payload.downcast_ref::<&str>() {
                    s.to_string()
                } else if let Some(s) = payload.downcast_ref::<String>() {
                    s.clone()
                } else {
                    "panic without a message".to_string()
                };
                ("panic", m)
            }
        };
        let message = match where_ {
            Some(w) => format!("{message} [panic at {w}]"),
            None => message,
        };
        let signature = match kind {
            "slow" => "slow".to_string(),
            _ => signature_of(&message),
        };
        let entry = self.findings.entry(signature.clone()).or_insert_with(|| Finding {
            kind,
            signature,
            message: message.clone(),
            input: input.to_vec(),
            hits: 0,
        });
        entry.hits += 1;
        if input.len() < entry.input.len() {
            entry.input = input.to_vec();
            entry.message = message;
        }
        false
    }

    /// Writes the findings to the directory and panics listing them; prints the tally either way.
    pub fn finish(self) {
        self.watch.done.store(true, Ordering::SeqCst);
        let secs = self.started.elapsed().as_secs_f64();
        println!(
            "fuzz {}: {} executions in {secs:.1} s, {} distinct findings",
            self.name,
            self.execs,
            self.findings.len()
        );
        if self.findings.is_empty() {
            return;
        }
        let _ = std::fs::create_dir_all(&self.dir);
        let mut list: Vec<&Finding> = self.findings.values().collect();
        list.sort_by(|a, b| a.signature.cmp(&b.signature));
        let mut lines = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let path = self.dir.join(format!("{}-{i}.bin", f.kind));
            let _ = std::fs::write(&path, &f.input);
            let _ = std::fs::write(path.with_extension("txt"), &f.message);
            lines.push(format!(
                "  {} ({} hits, {} bytes): {}\n    {}",
                path.display(),
                f.hits,
                f.input.len(),
                f.kind,
                f.message.chars().take(400).collect::<String>()
            ));
        }
        panic!(
            "fuzz {}: {} crashing inputs out of {} executions:\n{}",
            self.name,
            list.len(),
            self.execs,
            lines.join("\n")
        );
    }
}

impl Drop for Fuzzer {
    fn drop(&mut self) {
        self.watch.done.store(true, Ordering::SeqCst);
    }
}

/// The panic location when the hook saw one (`[panic at file:line: ..]`), else the message with
/// digits dropped, cut short: one bug with varying numbers is one finding.
fn signature_of(message: &str) -> String {
    if let Some(i) = message.rfind("[panic at ") {
        let at = &message[i + "[panic at ".len()..];
        // `file:line: message`: keep `file:line`.
        let mut parts = at.splitn(3, ':');
        if let (Some(file), Some(line)) = (parts.next(), parts.next()) {
            return format!("{file}:{line}");
        }
    }
    message.chars().filter(|c| !c.is_ascii_digit()).take(160).collect()
}

/// An [`arbitrary::Unstructured`] source: `n` random bytes from the RNG.
pub fn entropy(rng: &mut Rng, n: usize) -> Vec<u8> {
    rng.bytes(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut hist = [0usize; 4];
        for _ in 0..4000 {
            hist[a.below(4)] += 1;
        }
        assert!(hist.iter().all(|&h| h > 800), "{hist:?}");
    }

    #[test]
    fn mutations_stay_within_the_cap_and_change_inputs() {
        let mut rng = Rng::new(1);
        let corpus = vec![b"{\"a\": [1, 2, 3]}".to_vec(), vec![0x0a, 0x03, 1, 2, 3, 0x12, 0x01, 9]];
        let mut changed = 0;
        for i in 0..2000 {
            let mut d = corpus[i % 2].clone();
            mutate(&mut rng, &mut d, &corpus, 64, i % 4 == 0);
            assert!(d.len() <= 64);
            changed += usize::from(d != corpus[i % 2]);
        }
        assert!(changed > 1500, "{changed}");
    }

    #[test]
    fn fuzzer_reports_panics_and_internal_errors() {
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-self-test-{}", std::process::id()));
        let mut f = Fuzzer::new("self-test", &dir);
        assert!(f.exec(b"ok", || Ok(())));
        fn boom(n: usize) -> Result<(), String> {
            panic!("boom {n}")
        }
        assert!(!f.exec(b"boom", || boom(1)));
        assert!(!f.exec(b"bo", || boom(2)));
        assert!(!f.exec(b"e", || Err("internal error 3".into())));
        assert_eq!(f.findings().count(), 2);
        let small = f.findings().find(|x| x.kind == "panic").unwrap();
        assert_eq!((small.input.as_slice(), small.hits), (&b"bo"[..], 2));
        let r = catch_unwind(AssertUnwindSafe(|| f.finish()));
        assert!(r.is_err());
        let saved = std::fs::read_dir(dir.join("fuzz-self-test")).unwrap().count();
        assert_eq!(saved, 4, "two inputs, two messages");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

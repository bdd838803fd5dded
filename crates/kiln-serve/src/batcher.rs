//! The dynamic batcher: a bounded queue per model version and one OS thread per instance.
//! A worker takes the oldest request, gathers queued requests with the same non-batch shapes
//! until `max_batch_size` rows, a preferred batch size, or `max_queue_delay` after the oldest
//! request arrived; stacks them along dim 0, runs the model once, and splits the outputs back.
//! Model execution never runs on the async reactor.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln::{DType, Session, TensorData};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use crate::error::{Result, ServeError};
use crate::metrics::ModelMetrics;

/// How a model version batches; built from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct BatcherConfig {
    /// 0: no batch dim; requests run one at a time as given.
    pub max_batch_size: usize,
    /// `Some`: gather requests for up to this long after the oldest one arrived.
    pub max_queue_delay: Option<Duration>,
    /// Batch sizes that run without waiting for the delay (sorted ascending).
    pub preferred_batch_sizes: Vec<usize>,
    /// Queued requests beyond this are refused.
    pub max_queue_size: usize,
    /// Worker threads (model instances).
    pub instance_count: usize,
}

/// What a finished job carries back.
#[derive(Debug)]
pub(crate) struct JobOutput {
    pub outputs: Vec<TensorData>,
    pub queue: Duration,
}

/// One queued request, inputs already checked and ordered as the model's inputs.
pub(crate) struct Job {
    pub inputs: Vec<TensorData>,
    /// Rows along the batch dim (0 for models without one).
    pub rows: usize,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Result<JobOutput>>,
}

impl Job {
    /// Requests batch together only when every input has the same dtype and non-batch dims.
    fn compatible(&self, other: &Job) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.name == b.name && a.dtype == b.dtype && a.dims.get(1..) == b.dims.get(1..))
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    fn time_out(self) {
        let waited = self.enqueued.elapsed();
        let _ = self.reply.send(Err(ServeError::Timeout(waited)));
    }
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Runs one (stacked) request on the session; [`execute`] outside tests.
type ExecFn = fn(&Shared, Vec<TensorData>, Option<Instant>) -> Result<Vec<TensorData>>;

struct Shared {
    state: Mutex<QueueState>,
    ready: Condvar,
    session: Session,
    config: BatcherConfig,
    metrics: ModelMetrics,
    model: String,
    version: u64,
    /// Worker threads running now; the version is ready while it is above 0.
    alive: AtomicUsize,
    exec: ExecFn,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue and workers of one model version. Dropping it closes the queue: workers finish
/// what is queued and in flight, then exit, and the model is freed with the last of them.
pub struct DynamicBatcher {
    shared: Arc<Shared>,
}

impl DynamicBatcher {
    /// Starts `config.instance_count` worker threads over `session`.
    pub(crate) fn start(
        session: Session,
        config: BatcherConfig,
        metrics: ModelMetrics,
        model: &str,
        version: u64,
    ) -> Result<DynamicBatcher> {
        Self::start_with(session, config, metrics, model, version, execute)
    }

    fn start_with(
        session: Session,
        config: BatcherConfig,
        metrics: ModelMetrics,
        model: &str,
        version: u64,
        exec: ExecFn,
    ) -> Result<DynamicBatcher> {
        let mut preferred = config.preferred_batch_sizes.clone();
        preferred.sort_unstable();
        preferred.dedup();
        let config = BatcherConfig {
            preferred_batch_sizes: preferred,
            ..config
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            session,
            config,
            metrics,
            model: model.to_string(),
            version,
            alive: AtomicUsize::new(0),
            exec,
        });
        let batcher = DynamicBatcher { shared };
        for i in 0..batcher.shared.config.instance_count {
            spawn_worker(&batcher.shared, i).map_err(|e| ServeError::Load {
                model: model.to_string(),
                version,
                reason: format!("starting worker thread: {e}"),
            })?;
        }
        Ok(batcher)
    }

    /// Queues a job; refuses at once when the queue is full or closed, or no worker is alive
    /// (a queued job would never run).
    pub(crate) fn submit(&self, job: Job) -> Result<()> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(ServeError::ShuttingDown);
        }
        if !self.is_ready() {
            return Err(ServeError::NotReady {
                model: self.shared.model.clone(),
                reason: format!("version {}: no model worker is running", self.shared.version),
            });
        }
        if st.jobs.len() >= self.shared.config.max_queue_size {
            return Err(ServeError::QueueFull {
                model: self.shared.model.clone(),
                version: self.shared.version,
                size: st.jobs.len(),
            });
        }
        st.jobs.push_back(job);
        self.shared.metrics.pending.inc();
        drop(st);
        self.shared.ready.notify_one();
        Ok(())
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Whether a worker thread is alive to run queued requests.
    pub fn is_ready(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst) > 0
    }
}

impl Drop for DynamicBatcher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        debug!(model = %self.shared.model, version = self.shared.version, "batcher closed; workers drain and exit");
    }
}

/// Starts worker thread `index`; it counts itself in `alive` until it exits.
fn spawn_worker(shared: &Arc<Shared>, index: usize) -> std::io::Result<()> {
    shared.alive.fetch_add(1, Ordering::SeqCst);
    shared.metrics.ready.set(1);
    let name = format!("kiln-{}-{}-{index}", shared.model, shared.version);
    let for_thread = shared.clone();
    // The guard lives on the new thread only, so a failed spawn (here, maybe while unwinding a
    // dead worker) cannot trigger another restart.
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        worker(WorkerGuard {
            shared: for_thread,
            index,
        })
    });
    if let Err(e) = spawned {
        if shared.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            shared.metrics.ready.set(0);
        }
        return Err(e);
    }
    Ok(())
}

/// Uncounts a worker thread when it ends. One that ends by a panic while the queue is open is
/// replaced (the panic reached past every catch: the queue must keep being served); the version
/// reads not ready while no worker is alive.
struct WorkerGuard {
    shared: Arc<Shared>,
    index: usize,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let shared = &self.shared;
        let left = shared.alive.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        let closed = shared.lock().closed;
        if left == 0 && !closed {
            shared.metrics.ready.set(0);
        }
        if std::thread::panicking() && !closed {
            shared.metrics.worker_restarts.inc();
            error!(model = %shared.model, version = shared.version, worker = self.index,
                   "model worker died; starting a new one");
            if let Err(e) = spawn_worker(shared, self.index) {
                error!(model = %shared.model, version = shared.version,
                       "could not restart the model worker ({e}); the version is not ready");
            }
        }
    }
}

fn worker(guard: WorkerGuard) {
    let shared = &guard.shared;
    while let Some(batch) = next_batch(shared) {
        // A panic escaping a batch (kernel panics are already errors; this is for bugs in the
        // batcher itself) drops the batch's reply senders, so each of its requests gets an
        // error, and the worker goes on with the next batch.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(shared, batch)));
        if let Err(payload) = run {
            shared.metrics.panics.inc();
            shared.metrics.worker_restarts.inc();
            error!(model = %shared.model, version = shared.version,
                   "model worker panicked ({}); its batch failed, the worker carries on",
                   kiln::internals::runtime::panic_message(payload.as_ref()));
        }
    }
    debug!(model = %shared.model, version = shared.version, "worker exited");
}

/// Blocks until a batch is ready; `None` once the queue is closed and empty.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let cfg = &shared.config;
    let mut st = shared.lock();
    loop {
        let first = loop {
            match st.jobs.pop_front() {
                Some(j) => break j,
                None if st.closed => return None,
                None => st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        };
        // `pending` counts requests not yet executing: queued or held in a forming batch.
        if first.reply.is_closed() {
            shared.metrics.pending.dec();
            continue; // the client went away
        }
        if first.expired(Instant::now()) {
            shared.metrics.pending.dec();
            first.time_out();
            continue;
        }
        let delay = match cfg.max_queue_delay {
            Some(d) if cfg.max_batch_size > 0 => d,
            _ => return Some(vec![first]),
        };
        let deadline = first.enqueued + delay;
        let mut rows = first.rows;
        let mut batch = vec![first];
        loop {
            let now = Instant::now();
            let mut i = 0;
            while i < st.jobs.len() && rows < cfg.max_batch_size {
                let fits = st
                    .jobs
                    .get(i)
                    .is_some_and(|j| rows + j.rows <= cfg.max_batch_size && batch[0].compatible(j));
                if !fits {
                    i += 1;
                    continue;
                }
                if let Some(j) = st.jobs.remove(i) {
                    if j.reply.is_closed() {
                        shared.metrics.pending.dec();
                        continue;
                    }
                    if j.expired(now) {
                        shared.metrics.pending.dec();
                        j.time_out();
                        continue;
                    }
                    rows += j.rows;
                    batch.push(j);
                }
            }
            let preferred = cfg.preferred_batch_sizes.contains(&rows)
                || cfg.preferred_batch_sizes.last().is_some_and(|&p| rows >= p);
            if rows >= cfg.max_batch_size || preferred || st.closed || now >= deadline {
                return Some(batch);
            }
            st = shared
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn run_batch(shared: &Shared, batch: Vec<Job>) {
    shared.metrics.pending.sub(batch.len() as i64);
    let start = Instant::now();
    if batch.len() == 1 {
        for job in batch {
            run_single(shared, job, start);
        }
        return;
    }
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    // The batch may run until its latest request's deadline (none if any request has none); a
    // request whose own deadline passes meanwhile still gets its result.
    let deadline = batch.iter().try_fold(None::<Instant>, |acc, j| {
        j.deadline.map(|d| Some(acc.map_or(d, |a: Instant| a.max(d))))
    });
    let result = stack_inputs(&batch, rows).and_then(|inputs| {
        let outputs = (shared.exec)(shared, inputs, deadline.flatten())?;
        split_outputs(outputs, &batch, rows)
    });
    match result {
        Ok(per_job) => {
            let compute = start.elapsed();
            record_exec(shared, rows, compute);
            for (job, outputs) in batch.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(JobOutput {
                    outputs,
                    queue: start.saturating_duration_since(job.enqueued),
                }));
            }
        }
        Err(ServeError::Timeout(_)) => {
            for job in batch {
                job.time_out();
            }
        }
        Err(e) => {
            // One bad request must not fail its batch mates: run each on its own.
            warn!(model = %shared.model, version = shared.version, requests = batch.len(),
                  "batched run failed ({e}); running the requests one by one");
            for job in batch {
                run_single(shared, job, Instant::now());
            }
        }
    }
}

fn run_single(shared: &Shared, job: Job, start: Instant) {
    if job.expired(start) {
        job.time_out();
        return;
    }
    let result = (shared.exec)(shared, job.inputs.clone(), job.deadline);
    let compute = start.elapsed();
    record_exec(shared, job.rows.max(1), compute);
    let queue = start.saturating_duration_since(job.enqueued);
    let _ = job.reply.send(result.map(|outputs| JobOutput { outputs, queue }));
}

fn record_exec(shared: &Shared, rows: usize, compute: Duration) {
    let m = &shared.metrics;
    m.exec_count.inc();
    m.inference_count.inc_by(rows as u64);
    m.batch_size.observe(rows as f64);
    m.compute_us.inc_by(compute.as_micros() as u64);
}

/// Runs the model; past `deadline` the run stops between kernels and the request times out.
fn execute(shared: &Shared, inputs: Vec<TensorData>, deadline: Option<Instant>) -> Result<Vec<TensorData>> {
    let feeds = inputs.into_iter().map(|t| (t.name.clone(), t)).collect();
    let options = kiln::RunOptions {
        deadline,
        ..shared.session.run_options().clone()
    };
    let started = Instant::now();
    let run = shared
        .session
        .run_with_options(feeds, &options)
        .map(|(outputs, _)| outputs);
    use kiln::internals::runtime::RuntimeError;
    run.map_err(|e| match e {
        kiln::Error::Runtime(RuntimeError::DeadlineExceeded { .. }) => ServeError::Timeout(started.elapsed()),
        kiln::Error::Input { .. } => ServeError::InvalidInput(e.to_string()),
        other => {
            if matches!(
                other,
                kiln::Error::Runtime(RuntimeError::Internal { .. }) | kiln::Error::Internal { .. }
            ) {
                // A caught panic: counted, and the session stays in service.
                shared.metrics.panics.inc();
            }
            ServeError::Execution {
                model: shared.model.clone(),
                version: shared.version,
                reason: other.to_string(),
            }
        }
    })
}

/// Concatenates every job's inputs along dim 0 (row-major: the byte blocks follow each other).
fn stack_inputs(batch: &[Job], rows: usize) -> Result<Vec<TensorData>> {
    let first = batch.first().ok_or_else(|| ServeError::Server("empty batch".into()))?;
    let mut out = Vec::with_capacity(first.inputs.len());
    for (i, proto) in first.inputs.iter().enumerate() {
        let mut dims = proto.dims.clone();
        match dims.first_mut() {
            Some(d) => *d = rows,
            None => return Err(ServeError::invalid(format!("input '{}' has no batch dim", proto.name))),
        }
        let parts = batch.iter().filter_map(|j| j.inputs.get(i));
        let stacked = if proto.dtype == DType::String {
            let strings: Vec<Vec<u8>> = parts
                .flat_map(|t| t.string_data().unwrap_or_default().iter().cloned())
                .collect();
            TensorData::strings(proto.name.clone(), dims, strings)
        } else {
            let bytes: Vec<u8> = parts.flat_map(|t| t.bytes().iter().copied()).collect();
            TensorData::new(proto.name.clone(), proto.dtype, dims, bytes)
        };
        out.push(stacked.map_err(|e| ServeError::invalid(e.to_string()))?);
    }
    Ok(out)
}

/// Splits each output along dim 0 into the jobs' row counts.
fn split_outputs(outputs: Vec<TensorData>, batch: &[Job], rows: usize) -> Result<Vec<Vec<TensorData>>> {
    let mut per_job: Vec<Vec<TensorData>> = batch.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in outputs {
        if out.dims.first() != Some(&rows) {
            return Err(ServeError::Server(format!(
                "output '{}' has dims {:?}, expected {rows} rows along dim 0",
                out.name, out.dims
            )));
        }
        let row_elems: usize = out.dims.iter().skip(1).product();
        let mut offset = 0usize;
        for (job, dst) in batch.iter().zip(per_job.iter_mut()) {
            let mut dims = out.dims.clone();
            dims[0] = job.rows;
            let n = row_elems * job.rows;
            let piece = if let Some(strings) = out.string_data() {
                let s = strings
                    .get(offset..offset + n)
                    .ok_or_else(|| ServeError::Server(format!("output '{}' is shorter than its dims", out.name)))?;
                TensorData::strings(out.name.clone(), dims, s.to_vec())
            } else {
                if out.dtype.is_packed() {
                    return Err(ServeError::Server(format!(
                        "output '{}' ({}) is bit-packed and cannot be split by rows",
                        out.name, out.dtype
                    )));
                }
                let size = out.dtype.size_in_bytes();
                let b = out
                    .bytes()
                    .get(offset * size..(offset + n) * size)
                    .ok_or_else(|| ServeError::Server(format!("output '{}' is shorter than its dims", out.name)))?;
                TensorData::new(out.name.clone(), out.dtype, dims, b.to_vec())
            };
            dst.push(piece.map_err(|e| ServeError::Server(e.to_string()))?);
            offset += n;
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp_session() -> Session {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/repository/mlp/1/model.onnx");
        Session::builder().build_from_file(path).expect("mlp model")
    }

    /// Panics on inputs whose first value is negative (a bug in the serving code, not caught by
    /// the session); doubles the values otherwise.
    fn panics_on_negative(_: &Shared, inputs: Vec<TensorData>, _: Option<Instant>) -> Result<Vec<TensorData>> {
        let x = inputs[0].values::<f32>().expect("f32");
        assert!(x[0] >= 0.0, "a negative value reached the batch code");
        let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        Ok(vec![
            TensorData::from_values("y", inputs[0].dims.clone(), &y).expect("y")
        ])
    }

    fn batcher(exec: ExecFn) -> (DynamicBatcher, ModelMetrics) {
        let metrics = crate::metrics::Metrics::new().expect("metrics").model("m", 1);
        let config = BatcherConfig {
            max_batch_size: 0,
            max_queue_delay: None,
            preferred_batch_sizes: vec![],
            max_queue_size: 8,
            instance_count: 1,
        };
        let b = DynamicBatcher::start_with(mlp_session(), config, metrics.clone(), "m", 1, exec).expect("start");
        (b, metrics)
    }

    fn submit(b: &DynamicBatcher, first: f32) -> oneshot::Receiver<Result<JobOutput>> {
        let (j, rx) = job(vec![1, 2], &[first, 1.0]);
        b.submit(j).expect("queued");
        rx
    }

    #[test]
    fn a_panic_in_a_batch_fails_that_request_and_the_worker_serves_the_next() {
        let (b, metrics) = batcher(panics_on_negative);
        let bad = submit(&b, -1.0);
        let good = submit(&b, 3.0);
        assert!(
            bad.blocking_recv().is_err(),
            "the panicking request gets an error, not silence"
        );
        let out = good.blocking_recv().expect("answered").expect("served");
        assert_eq!(out.outputs[0].values::<f32>().unwrap(), vec![6.0, 2.0]);
        assert!(b.is_ready());
        assert_eq!(metrics.panics.get(), 1);
        assert_eq!(submit(&b, 1.0).blocking_recv().unwrap().unwrap().outputs.len(), 1);
    }

    #[test]
    fn a_worker_thread_that_dies_is_replaced_and_readiness_follows() {
        let (b, metrics) = batcher(panics_on_negative);
        assert_eq!(b.shared.alive.load(Ordering::SeqCst), 1);
        // A thread counted as a worker dies by a panic: its guard starts a replacement.
        b.shared.alive.fetch_add(1, Ordering::SeqCst);
        let guard = WorkerGuard {
            shared: b.shared.clone(),
            index: 7,
        };
        let died = std::thread::spawn(move || {
            let _guard = guard;
            panic!("worker bug");
        })
        .join();
        assert!(died.is_err());
        assert_eq!(metrics.worker_restarts.get(), 1);
        let end = Instant::now() + Duration::from_secs(5);
        while b.shared.alive.load(Ordering::SeqCst) != 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.shared.alive.load(Ordering::SeqCst), 2);
        assert!(b.is_ready());
        assert_eq!(submit(&b, 2.0).blocking_recv().unwrap().unwrap().outputs.len(), 1);
        // With no worker left the version is not ready and refuses work instead of queueing it.
        b.shared.alive.store(0, Ordering::SeqCst);
        assert!(!b.is_ready());
        let (j, _rx) = job(vec![1, 2], &[1.0, 1.0]);
        assert!(matches!(b.submit(j), Err(ServeError::NotReady { .. })));
        b.shared.alive.store(2, Ordering::SeqCst);
    }

    fn job(dims: Vec<usize>, values: &[f32]) -> (Job, oneshot::Receiver<Result<JobOutput>>) {
        let (tx, rx) = oneshot::channel();
        let rows = dims[0];
        let job = Job {
            inputs: vec![TensorData::from_values("x", dims, values).unwrap()],
            rows,
            enqueued: Instant::now(),
            deadline: None,
            reply: tx,
        };
        (job, rx)
    }

    #[test]
    fn only_same_non_batch_shapes_batch_together() {
        let (a, _ra) = job(vec![1, 2], &[1.0, 2.0]);
        let (b, _rb) = job(vec![3, 2], &[0.0; 6]);
        let (c, _rc) = job(vec![1, 3], &[0.0; 3]);
        assert!(a.compatible(&b));
        assert!(!a.compatible(&c));
        let (mut d, _rd) = job(vec![1, 2], &[1.0, 2.0]);
        d.inputs[0] = TensorData::from_values("x", vec![1, 2], &[1i64, 2]).unwrap();
        assert!(!a.compatible(&d), "dtypes differ");
    }

    #[test]
    fn stack_then_split_restores_each_request() {
        let (a, _ra) = job(vec![1, 2], &[1.0, 2.0]);
        let (b, _rb) = job(vec![2, 2], &[3.0, 4.0, 5.0, 6.0]);
        let batch = vec![a, b];
        let stacked = stack_inputs(&batch, 3).unwrap();
        assert_eq!(stacked[0].dims, vec![3, 2]);
        assert_eq!(stacked[0].values::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // An "output" with 3 rows of 1 element each.
        let out = TensorData::from_values("y", vec![3, 1], &[10i32, 20, 30]).unwrap();
        let per_job = split_outputs(vec![out], &batch, 3).unwrap();
        assert_eq!(per_job[0][0].dims, vec![1, 1]);
        assert_eq!(per_job[0][0].values::<i32>().unwrap(), vec![10]);
        assert_eq!(per_job[1][0].dims, vec![2, 1]);
        assert_eq!(per_job[1][0].values::<i32>().unwrap(), vec![20, 30]);
        // Outputs without the batch rows along dim 0 cannot be split.
        let wrong = TensorData::from_values("y", vec![2], &[1.0f32, 2.0]).unwrap();
        assert!(split_outputs(vec![wrong], &batch, 3).is_err());
    }

    #[test]
    fn string_tensors_stack_and_split() {
        let (tx, _r) = oneshot::channel();
        let s = |v: &[&str]| v.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        let a = Job {
            inputs: vec![TensorData::strings("s", vec![1], s(&["a"])).unwrap()],
            rows: 1,
            enqueued: Instant::now(),
            deadline: None,
            reply: tx,
        };
        let (tx, _r2) = oneshot::channel();
        let b = Job {
            inputs: vec![TensorData::strings("s", vec![2], s(&["bb", "ccc"])).unwrap()],
            rows: 2,
            enqueued: Instant::now(),
            deadline: None,
            reply: tx,
        };
        let batch = vec![a, b];
        let stacked = stack_inputs(&batch, 3).unwrap();
        assert_eq!(stacked[0].string_data().unwrap(), s(&["a", "bb", "ccc"]).as_slice());
        let per_job = split_outputs(stacked, &batch, 3).unwrap();
        assert_eq!(per_job[1][0].string_data().unwrap(), s(&["bb", "ccc"]).as_slice());
    }
}

//! Prometheus metrics, named as Triton names them (`nv_inference_*`, `nv_cache_*`) with
//! `model` and `version` labels so existing dashboards work, plus latency and batch-size
//! histograms, model-load failures, process CPU/memory read from `/proc/self`, and GPU
//! utilization/memory/power through NVML where a GPU is present (`gpu_metrics.rs`).

use std::sync::Mutex;

use prometheus::{
    Counter, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::error::{Result, ServeError};

/// Why a request failed, as Triton's `reason` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Refused before running (queue full, bad input).
    Rejected,
    /// The model failed or the request timed out.
    Backend,
    Other,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::Rejected => "REJECTED",
            FailureReason::Backend => "BACKEND",
            FailureReason::Other => "OTHER",
        }
    }
}

/// Every metric the server exports, in one registry.
pub struct Metrics {
    registry: Registry,
    request_success: IntCounterVec,
    request_failure: IntCounterVec,
    inference_count: IntCounterVec,
    exec_count: IntCounterVec,
    request_duration_us: IntCounterVec,
    queue_duration_us: IntCounterVec,
    compute_infer_duration_us: IntCounterVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    pending: IntGaugeVec,
    latency: HistogramVec,
    batch_size: HistogramVec,
    load_failures: IntCounterVec,
    version_ready: IntGaugeVec,
    panics: IntCounterVec,
    worker_restarts: IntCounterVec,
    process_cpu: Counter,
    process_cpu_seen: Mutex<f64>,
    process_rss: IntGauge,
    process_vms: IntGauge,
    process_threads: IntGauge,
    gpu: Option<crate::gpu_metrics::GpuMetrics>,
}

const MV: &[&str] = &["model", "version"];

fn metric_err(e: prometheus::Error) -> ServeError {
    ServeError::Server(format!("metrics: {e}"))
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels).map_err(metric_err)?;
            registry.register(Box::new(c.clone())).map_err(metric_err)?;
            Ok(c)
        };
        let request_success = counter(
            "nv_inference_request_success",
            "Number of successful inference requests",
            MV,
        )?;
        let request_failure = counter(
            "nv_inference_request_failure",
            "Number of failed inference requests",
            &["model", "version", "reason"],
        )?;
        let inference_count = counter(
            "nv_inference_count",
            "Number of inferences performed (a batch of n rows counts n)",
            MV,
        )?;
        let exec_count = counter(
            "nv_inference_exec_count",
            "Number of model executions (batches run)",
            MV,
        )?;
        let request_duration_us = counter(
            "nv_inference_request_duration_us",
            "Cumulative end-to-end inference request handling time (us)",
            MV,
        )?;
        let queue_duration_us = counter(
            "nv_inference_queue_duration_us",
            "Cumulative time requests spent waiting in the queue (us)",
            MV,
        )?;
        let compute_infer_duration_us = counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative model execution time (us)",
            MV,
        )?;
        let cache_hits = counter("nv_cache_num_hits_per_model", "Number of response cache hits", MV)?;
        let cache_misses = counter("nv_cache_num_misses_per_model", "Number of response cache misses", MV)?;
        let load_failures = counter(
            "kiln_model_load_failures_total",
            "Model versions that failed to load (the serving version, if any, stays in place)",
            MV,
        )?;
        let panics = counter(
            "kiln_model_panics_total",
            "Requests whose run panicked (a bug in Kiln, caught: the request got a 500, the model kept serving)",
            MV,
        )?;
        let worker_restarts = counter(
            "kiln_model_worker_restarts_total",
            "Model worker threads restarted after a panic escaped a batch run",
            MV,
        )?;
        let pending = IntGaugeVec::new(
            Opts::new("nv_inference_pending_request_count", "Requests waiting in the queue"),
            MV,
        )
        .map_err(metric_err)?;
        registry.register(Box::new(pending.clone())).map_err(metric_err)?;
        let version_ready = IntGaugeVec::new(
            Opts::new("kiln_model_version_ready", "1 while the model version serves requests"),
            MV,
        )
        .map_err(metric_err)?;
        registry.register(Box::new(version_ready.clone())).map_err(metric_err)?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "kiln_inference_request_duration_seconds",
                "End-to-end inference request latency",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            MV,
        )
        .map_err(metric_err)?;
        registry.register(Box::new(latency.clone())).map_err(metric_err)?;
        let batch_size = HistogramVec::new(
            HistogramOpts::new("kiln_inference_batch_size", "Rows per model execution")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            MV,
        )
        .map_err(metric_err)?;
        registry.register(Box::new(batch_size.clone())).map_err(metric_err)?;
        let process_cpu = Counter::new(
            "process_cpu_seconds_total",
            "User and system CPU time of the server process",
        )
        .map_err(metric_err)?;
        registry.register(Box::new(process_cpu.clone())).map_err(metric_err)?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help).map_err(metric_err)?;
            registry.register(Box::new(g.clone())).map_err(metric_err)?;
            Ok(g)
        };
        let process_rss = gauge("process_resident_memory_bytes", "Resident memory of the server process")?;
        let process_vms = gauge("process_virtual_memory_bytes", "Virtual memory of the server process")?;
        let process_threads = gauge("process_threads", "Threads of the server process")?;
        let gpu = crate::gpu_metrics::GpuMetrics::try_new(&registry)?;
        Ok(Metrics {
            registry,
            request_success,
            request_failure,
            inference_count,
            exec_count,
            request_duration_us,
            queue_duration_us,
            compute_infer_duration_us,
            cache_hits,
            cache_misses,
            pending,
            latency,
            batch_size,
            load_failures,
            version_ready,
            panics,
            worker_restarts,
            process_cpu,
            process_cpu_seen: Mutex::new(0.0),
            process_rss,
            process_vms,
            process_threads,
            gpu,
        })
    }

    /// Handles for one model version.
    pub fn model(&self, model: &str, version: u64) -> ModelMetrics {
        let v = version.to_string();
        let l = [model, v.as_str()];
        ModelMetrics {
            model: model.to_string(),
            version: v.clone(),
            success: self.request_success.with_label_values(&l),
            inference_count: self.inference_count.with_label_values(&l),
            exec_count: self.exec_count.with_label_values(&l),
            request_duration_us: self.request_duration_us.with_label_values(&l),
            queue_duration_us: self.queue_duration_us.with_label_values(&l),
            compute_us: self.compute_infer_duration_us.with_label_values(&l),
            cache_hits: self.cache_hits.with_label_values(&l),
            cache_misses: self.cache_misses.with_label_values(&l),
            pending: self.pending.with_label_values(&l),
            latency: self.latency.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            failure: self.request_failure.clone(),
            panics: self.panics.with_label_values(&l),
            worker_restarts: self.worker_restarts.with_label_values(&l),
            ready: self.version_ready.with_label_values(&l),
        }
    }

    /// Counts a version that failed to load.
    pub fn load_failed(&self, model: &str, version: u64) {
        self.load_failures
            .with_label_values(&[model, &version.to_string()])
            .inc();
    }

    /// Marks a version as serving (1) or not (0).
    pub fn set_ready(&self, model: &str, version: u64, ready: bool) {
        self.version_ready
            .with_label_values(&[model, &version.to_string()])
            .set(i64::from(ready));
    }

    /// The Prometheus text exposition of every metric, process figures refreshed first.
    pub fn render(&self) -> String {
        self.refresh_process();
        if let Some(g) = &self.gpu {
            g.refresh();
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn refresh_process(&self) {
        if let Some(p) = ProcessStats::read() {
            let mut seen = self.process_cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
            if p.cpu_seconds > *seen {
                self.process_cpu.inc_by(p.cpu_seconds - *seen);
                *seen = p.cpu_seconds;
            }
            self.process_rss.set(p.rss_bytes as i64);
            self.process_vms.set(p.vm_bytes as i64);
            self.process_threads.set(p.threads as i64);
        }
    }
}

/// Metric handles of one model version, labels resolved once.
#[derive(Clone)]
pub struct ModelMetrics {
    model: String,
    version: String,
    pub(crate) success: IntCounter,
    pub(crate) inference_count: IntCounter,
    pub(crate) exec_count: IntCounter,
    pub(crate) request_duration_us: IntCounter,
    pub(crate) queue_duration_us: IntCounter,
    pub(crate) compute_us: IntCounter,
    pub(crate) cache_hits: IntCounter,
    pub(crate) cache_misses: IntCounter,
    pub(crate) pending: IntGauge,
    pub(crate) latency: prometheus::Histogram,
    pub(crate) batch_size: prometheus::Histogram,
    failure: IntCounterVec,
    pub(crate) panics: IntCounter,
    pub(crate) worker_restarts: IntCounter,
    /// `kiln_model_version_ready` of this version (0 once its workers are gone).
    pub(crate) ready: IntGauge,
}

impl ModelMetrics {
    pub(crate) fn failed(&self, reason: FailureReason) {
        self.failure
            .with_label_values(&[self.model.as_str(), self.version.as_str(), reason.label()])
            .inc();
    }
}

/// CPU and memory of this process from `/proc/self` (Linux; `None` elsewhere).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vm_bytes: u64,
    pub threads: u64,
}

impl ProcessStats {
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse(&stat, &status)
    }

    /// `stat`: /proc/self/stat (utime, stime in USER_HZ = 100 ticks/s, the Linux ABI value);
    /// `status`: /proc/self/status (VmRSS, VmSize in kB, Threads).
    fn parse(stat: &str, status: &str) -> Option<ProcessStats> {
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let kb = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].split_whitespace().next()?.parse().ok()
        };
        Some(ProcessStats {
            cpu_seconds: (utime + stime) / 100.0,
            rss_bytes: kb("VmRSS:")? * 1024,
            vm_bytes: kb("VmSize:")? * 1024,
            threads: kb("Threads:")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (kiln (serve) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 100 0 0";
        let status = "Name:\tkiln\nVmSize:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t7\n";
        let p = ProcessStats::parse(stat, status).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.rss_bytes, 1024 * 1024);
        assert_eq!(p.vm_bytes, 2048 * 1024);
        assert_eq!(p.threads, 7);
    }

    #[test]
    fn renders_triton_names_with_labels() {
        let m = Metrics::new().unwrap();
        let mm = m.model("mlp", 1);
        mm.success.inc();
        mm.cache_hits.inc_by(2);
        mm.failed(FailureReason::Rejected);
        let text = m.render();
        assert!(
            text.contains("nv_inference_request_success{model=\"mlp\",version=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("nv_cache_num_hits_per_model{model=\"mlp\",version=\"1\"} 2"));
        assert!(text.contains("nv_inference_request_failure{model=\"mlp\",reason=\"REJECTED\",version=\"1\"} 1"));
        assert!(text.contains("process_resident_memory_bytes "));
    }

    /// GPU gauges appear exactly when NVML works here (a GPU machine) and the server still
    /// starts and renders without them (no driver library, as in CI).
    #[test]
    fn gpu_metrics_follow_nvml_availability() {
        let nvml_gpus = nvml_wrapper::Nvml::init().and_then(|n| n.device_count()).unwrap_or(0);
        let text = Metrics::new().unwrap().render();
        let has_gpu_metrics = text.contains("nv_gpu_memory_total_bytes{gpu_uuid=");
        assert_eq!(has_gpu_metrics, nvml_gpus > 0, "{text}");
        if nvml_gpus == 0 {
            eprintln!("no GPU visible through NVML: checked that no GPU metrics are exported");
        } else {
            assert!(text.contains("nv_gpu_utilization{gpu_uuid="));
            assert!(text.contains("nv_gpu_memory_used_bytes{gpu_uuid="));
        }
    }
}

//! GPU metrics through NVML, named as Triton names them (`nv_gpu_utilization`,
//! `nv_gpu_memory_total_bytes`, `nv_gpu_memory_used_bytes`, `nv_gpu_power_usage`,
//! `nv_gpu_power_limit`, `nv_energy_consumption`, label `gpu_uuid`).
//!
//! `nvml-wrapper` loads `libnvidia-ml.so` when the server starts, so the binary has no link-time
//! dependency on the driver: where the library or a GPU is missing, the server logs it once and
//! exports no GPU metrics. Values are read from NVML at each scrape.

use nvml_wrapper::Nvml;
use prometheus::{GaugeVec, Opts, Registry};

use crate::error::{Result, ServeError};

pub(crate) struct GpuMetrics {
    nvml: Nvml,
    /// (NVML index, UUID) of every visible GPU.
    devices: Vec<(u32, String)>,
    utilization: GaugeVec,
    memory_total: GaugeVec,
    memory_used: GaugeVec,
    power_usage: GaugeVec,
    power_limit: GaugeVec,
    energy: GaugeVec,
}

impl GpuMetrics {
    /// Registers the GPU gauges when NVML initializes and sees at least one GPU; `None` (logged)
    /// otherwise.
    pub(crate) fn try_new(registry: &Registry) -> Result<Option<GpuMetrics>> {
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::info!(reason = %e, "NVML is not available: no GPU metrics");
                return Ok(None);
            }
        };
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "NVML could not count GPUs: no GPU metrics");
                return Ok(None);
            }
        };
        let mut devices = Vec::new();
        for i in 0..count {
            match nvml.device_by_index(i).and_then(|d| d.uuid()) {
                Ok(uuid) => devices.push((i, uuid)),
                Err(e) => tracing::warn!(index = i, error = %e, "NVML: skipping a GPU"),
            }
        }
        if devices.is_empty() {
            tracing::info!("NVML sees no GPU: no GPU metrics");
            return Ok(None);
        }
        let err = |e: prometheus::Error| ServeError::Server(format!("metrics: {e}"));
        let gauge = |name: &str, help: &str| -> Result<GaugeVec> {
            let g = GaugeVec::new(Opts::new(name, help), &["gpu_uuid"]).map_err(err)?;
            registry.register(Box::new(g.clone())).map_err(err)?;
            Ok(g)
        };
        let m = GpuMetrics {
            utilization: gauge("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)")?,
            memory_total: gauge("nv_gpu_memory_total_bytes", "GPU total memory, in bytes")?,
            memory_used: gauge("nv_gpu_memory_used_bytes", "GPU used memory, in bytes")?,
            power_usage: gauge("nv_gpu_power_usage", "GPU power usage in watts")?,
            power_limit: gauge("nv_gpu_power_limit", "GPU power management limit in watts")?,
            energy: gauge(
                "nv_energy_consumption",
                "GPU energy consumption in joules since the driver loaded",
            )?,
            nvml,
            devices,
        };
        tracing::info!(gpus = m.devices.len(), "GPU metrics through NVML");
        Ok(Some(m))
    }

    /// Reads every GPU's figures; a figure NVML cannot give (e.g. power on some boards) is left
    /// as last read.
    pub(crate) fn refresh(&self) {
        for (index, uuid) in &self.devices {
            let Ok(d) = self.nvml.device_by_index(*index) else {
                continue;
            };
            let l = [uuid.as_str()];
            if let Ok(u) = d.utilization_rates() {
                self.utilization.with_label_values(&l).set(f64::from(u.gpu) / 100.0);
            }
            if let Ok(m) = d.memory_info() {
                self.memory_total.with_label_values(&l).set(m.total as f64);
                self.memory_used.with_label_values(&l).set(m.used as f64);
            }
            if let Ok(mw) = d.power_usage() {
                self.power_usage.with_label_values(&l).set(f64::from(mw) / 1e3);
            }
            if let Ok(mw) = d.enforced_power_limit() {
                self.power_limit.with_label_values(&l).set(f64::from(mw) / 1e3);
            }
            if let Ok(mj) = d.total_energy_consumption() {
                self.energy.with_label_values(&l).set(mj as f64 / 1e3);
            }
        }
    }
}

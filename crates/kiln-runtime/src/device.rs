use crate::{Result, RuntimeError};

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal; needs the `cuda` feature.
    Cuda(usize),
}

impl Device {
    /// Opens the candle device. Without the `cuda` feature CUDA devices return
    /// [`RuntimeError::NotCompiledWithCuda`].
    pub fn to_candle(self) -> Result<candle_core::Device> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(n)
        .map_err(|e| RuntimeError::Device(format!("cuda:{n}: {}", crate::error::candle_message(&e))))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize) -> Result<candle_core::Device> {
    Err(RuntimeError::NotCompiledWithCuda)
}

impl std::str::FromStr for Device {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| RuntimeError::msg(format!("unknown device '{s}' (expected cpu, cuda or cuda:N)"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

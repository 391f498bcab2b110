//! Choosing a device and building a ready model from a config and a weight source.

use crate::backend::cpu::CpuBackend;
use crate::config::{Config, ensure_fits};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::HostWeights;
use std::path::PathBuf;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The best available: CPU in this build (the CUDA backend is not built yet).
    Auto,
    /// The f32 CPU backend.
    Cpu,
    /// The CUDA bf16 backend.
    Cuda,
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// A safetensors file.
    File(PathBuf),
    /// Seeded random weights ([`HostWeights::random`]).
    Random(u64),
}

/// Resolves `device` to the backend this build can run, explaining the choice for `auto`.
pub fn resolve_device(device: Device) -> Result<(Device, Option<String>)> {
    match device {
        Device::Cpu => Ok((Device::Cpu, None)),
        Device::Auto => Ok((
            Device::Cpu,
            Some("device auto: using the CPU backend (this build has no CUDA backend)".into()),
        )),
        Device::Cuda => Err(Error::Unavailable(
            "the CUDA backend is not part of this build yet; use --device cpu (or auto)".into(),
        )),
    }
}

/// Builds a CPU model, refusing up front a model whose f32 weights would not fit in memory.
pub fn cpu_model(cfg: Config, source: &WeightSource) -> Result<Model<CpuBackend>> {
    cfg.validate()?;
    let bytes = cfg.param_count() * 4;
    ensure_fits(
        &format!(
            "the model's {:.2} B parameters in f32 on the CPU backend",
            cfg.param_count() as f64 / 1e9
        ),
        bytes,
    )?;
    let weights = match source {
        WeightSource::File(path) => HostWeights::load(path, &cfg)?,
        WeightSource::Random(seed) => HostWeights::random(&cfg, *seed),
    };
    Model::new(CpuBackend::new(), cfg, weights)
}

/// The host CPU's model name and thread count, for benchmark reports.
pub fn cpu_description() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{name}, {} threads", rayon::current_num_threads())
}

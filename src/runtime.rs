//! Choosing a device and building a ready model from a config and a weight source.

use crate::backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use crate::backend::{
    Backend,
    cuda::{self, CudaBackend},
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::{ensure_fits, human_count};
use crate::model::Model;
use crate::weights::HostWeights;
use std::path::PathBuf;

/// Why the CUDA backend is missing from a build without the `cuda` feature.
pub const NO_CUDA_FEATURE: &str = "the CUDA backend is not in this build: the `cuda` cargo \
    feature is off; rebuild with it (the default)";

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CUDA backend when a GPU, its driver, the compiled kernels and cuBLASLt are there and
    /// the model's head_dim has an attention kernel; the CPU backend otherwise.
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
    /// Seeded random weights: [`HostWeights::random`] on the CPU backend, generated on the
    /// device on the CUDA backend (`Model::random_on_device`: same distributions, other
    /// numbers).
    Random(u64),
}

/// The backend a [`Device`] resolved to.
#[derive(Debug)]
pub enum Resolved {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend, opened.
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaBackend>),
}

/// Resolves `device` for a model of `cfg`: opens the CUDA backend when asked for (or when `auto`
/// finds it usable) and explains the choice of `auto` in the returned note. `cuda` that cannot
/// run is an error saying why: no driver, no device, no compiled kernels, no cuBLASLt, or an
/// unsupported head_dim.
pub fn resolve_device(device: Device, cfg: &Config) -> Result<(Resolved, Option<String>)> {
    #[cfg(not(feature = "cuda"))]
    let _ = cfg;
    match device {
        Device::Cpu => Ok((Resolved::Cpu, None)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::Unavailable(format!(
            "--device cuda: {NO_CUDA_FEATURE}"
        ))),
        #[cfg(not(feature = "cuda"))]
        Device::Auto => Ok((
            Resolved::Cpu,
            Some("device auto: using the CPU backend (CUDA is not in this build)".into()),
        )),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            let why = |e: Error| match e {
                Error::Unavailable(m) => {
                    Error::Unavailable(format!("--device cuda: the CUDA backend cannot run: {m}"))
                }
                other => other,
            };
            let backend = CudaBackend::new().map_err(why)?;
            cuda::check_config(cfg).map_err(why)?;
            Ok((Resolved::Cuda(Box::new(backend)), None))
        }
        #[cfg(feature = "cuda")]
        Device::Auto => {
            let cpu = |why: String| {
                Ok((
                    Resolved::Cpu,
                    Some(format!("device auto: using the CPU backend ({why})")),
                ))
            };
            let backend = match CudaBackend::new() {
                Ok(b) => b,
                // A bad setting (`SL_GEMM_TUNE`) is the user's to fix, not a reason to run
                // elsewhere.
                Err(e @ Error::Input(_)) => return Err(e),
                Err(e) => return cpu(format!("CUDA unavailable: {}", reason(&e))),
            };
            if let Err(e) = cuda::check_config(cfg) {
                return cpu(reason(&e));
            }
            let note = format!("device auto: using the CUDA backend, {}", backend.name());
            Ok((Resolved::Cuda(Box::new(backend)), Some(note)))
        }
    }
}

/// Why a backend is unavailable, without the error kind's prefix.
pub fn reason(e: &Error) -> String {
    match e {
        Error::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

/// A model on whichever backend [`resolve_device`] chose.
pub enum AnyModel {
    /// On the CPU backend.
    Cpu(Box<Model<CpuBackend>>),
    /// On the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(Box<Model<CudaBackend>>),
}

impl AnyModel {
    /// The model's config.
    pub fn config(&self) -> &Config {
        match self {
            AnyModel::Cpu(m) => m.config(),
            #[cfg(feature = "cuda")]
            AnyModel::Cuda(m) => m.config(),
        }
    }
}

/// Resolves `device` and builds the model there; also returns the note of [`resolve_device`].
pub fn build_model(
    cfg: Config,
    device: Device,
    source: &WeightSource,
) -> Result<(AnyModel, Option<String>)> {
    cfg.validate()?;
    let (resolved, note) = resolve_device(device, &cfg)?;
    Ok((build_on(resolved, cfg, source)?, note))
}

/// Builds the model on an already resolved device (after the caller bounded the request's
/// memory there, see [`crate::memory`]).
pub fn build_on(resolved: Resolved, cfg: Config, source: &WeightSource) -> Result<AnyModel> {
    Ok(match resolved {
        Resolved::Cpu => AnyModel::Cpu(Box::new(cpu_model(cfg, source)?)),
        #[cfg(feature = "cuda")]
        Resolved::Cuda(backend) => AnyModel::Cuda(Box::new(cuda_model(*backend, cfg, source)?)),
    })
}

fn host_weights(cfg: &Config, source: &WeightSource) -> Result<HostWeights> {
    match source {
        WeightSource::File(path) => HostWeights::load(path, cfg),
        WeightSource::Random(seed) => Ok(HostWeights::random(cfg, *seed)),
    }
}

/// Builds a CPU model, refusing up front a model whose f32 weights and their packed copies
/// would not fit in memory, and packs its projection weights (once, here, not in the first
/// step).
pub fn cpu_model(cfg: Config, source: &WeightSource) -> Result<Model<CpuBackend>> {
    cfg.validate()?;
    let bytes = crate::weights::f32_bytes(&cfg)
        .checked_add(crate::memory::cpu_packed_weight_bytes(&cfg)?)
        .ok_or_else(|| crate::Error::OutOfMemory("the model's size overflows 64 bits".into()))?;
    ensure_fits(
        &format!(
            "the model's {} parameters in f32 on the CPU backend, with the packed projections",
            human_count(cfg.param_count())
        ),
        bytes,
    )?;
    let weights = host_weights(&cfg, source)?;
    let model = Model::new(CpuBackend::new(), cfg, weights)?;
    for lw in model.layer_weights().iter().flatten() {
        for w in [&lw.qkv, &lw.o, &lw.gate_up, &lw.down] {
            w.packed()?;
        }
    }
    for bw in model.branch_weights() {
        bw.head.packed()?;
    }
    Ok(model)
}

/// Builds a model on `backend`. Weights from a file are read on the host in f32, then uploaded
/// as bf16; seeded random weights are generated on the device
/// ([`Model::random_on_device`]: the distributions of [`HostWeights::random`], other numbers),
/// with no host copy. Refuses up front a model whose bf16 weights do not fit in the device's
/// free memory, or (from a file) whose f32 host copy does not fit in the machine's memory; the
/// K/V pool is checked against what is left when a generation allocates it.
#[cfg(feature = "cuda")]
pub fn cuda_model(
    backend: CudaBackend,
    cfg: Config,
    source: &WeightSource,
) -> Result<Model<CudaBackend>> {
    cfg.validate()?;
    cuda::check_config(&cfg)?;
    let params = cfg.param_count();
    backend.ensure_fits(
        &format!(
            "the model's {} parameters in bf16 ({})",
            human_count(params),
            crate::memory::human_bytes(params.saturating_mul(2))
        ),
        params.saturating_mul(2),
    )?;
    if let WeightSource::Random(seed) = source {
        return Model::random_on_device(backend, cfg, *seed);
    }
    ensure_fits(
        &format!(
            "the host copy of the model's {} parameters in f32 (before the upload)",
            human_count(params)
        ),
        params.saturating_mul(4),
    )?;
    let weights = host_weights(&cfg, source)?;
    Model::new(backend, cfg, weights)
}

#[cfg(feature = "cuda")]
impl Model<CudaBackend> {
    /// A model of `cfg` on `backend` with seeded random weights generated on the device: no
    /// host copy, so only the bf16 weights (2 bytes a parameter) need room, on the device.
    ///
    /// Tensor `i` of [`Config::tensor_shapes`] is filled by `sl_init_uniform` with key `seed`
    /// and tensor index `i`, from the distribution of [`crate::weights::init_range`] — the same
    /// distributions as [`crate::weights::HostWeights::random`], not the same numbers (that one
    /// draws from ChaCha8 on the host). The same `(cfg, seed)` gives the same weights on every
    /// run and device.
    pub fn random_on_device(backend: CudaBackend, cfg: Config, seed: u64) -> Result<Self> {
        let model = Model::from_uploaded(backend, cfg, |be, index, name, shape| {
            let index = u32::try_from(index)
                .map_err(|_| Error::Input(format!("tensor index {index} beyond u32")))?;
            be.random_weight(shape, seed, index, crate::weights::init_range(name, shape))
        })?;
        // Launch errors of the init kernels surface here, not at the first forward.
        model.backend().device().synchronize()?;
        Ok(model)
    }
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

//! Model weights on the host: safetensors load/save (SPEC §2.2 names) and seeded random init.

use crate::config::Config;
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// A dense f32 tensor on the host (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// On-disk element type for [`HostWeights::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

/// Every tensor of a model, by SPEC §2.2 name.
#[derive(Debug, Clone, PartialEq)]
pub struct HostWeights {
    /// Tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl HostWeights {
    /// Loads and validates a safetensors file against `cfg` (bf16/f16/f32 → f32).
    pub fn load(path: &Path, cfg: &Config) -> Result<HostWeights> {
        let _ = (path, cfg);
        todo!("helper")
    }

    /// Seeded random weights for `cfg`.
    pub fn random(cfg: &Config, seed: u64) -> HostWeights {
        let _ = (cfg, seed);
        todo!("helper")
    }

    /// Writes a safetensors file.
    pub fn save(&self, path: &Path, dtype: SaveDtype) -> Result<()> {
        let _ = (path, dtype);
        todo!("helper")
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        let _ = name;
        todo!("helper")
    }
}

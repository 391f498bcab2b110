//! Sparse-LaViDa masked-diffusion sampling: a step-causal, KV-cached re-parameterisation of
//! LaViDa-O's sampling loop. See README.md and SPEC.md.
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod error;
pub mod plan;
pub mod schedule;
pub mod weights;

pub use error::{Error, Result};

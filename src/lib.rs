//! Sparse-LaViDa masked-diffusion sampling: a step-causal, KV-cached re-parameterisation of
//! LaViDa-O's sampling loop, with an f32 CPU backend (the oracle) behind a [`backend::Backend`]
//! trait that the CUDA backend implements.
//!
//! Data flow: [`config`] → [`weights`] → [`schedule`] → [`plan`] → [`backend`] → [`model`] →
//! [`sampler`] → CLI (`src/main.rs`, with [`request`], [`case`], [`bench`](mod@bench) and
//! [`runtime`]). [`memory`] bounds what a request needs before anything is allocated; [`io`]
//! writes every output atomically; [`image`] draws a t2i generation. [`cuda`] holds the CUDA
//! kernels' ABI and the kernel images `build.rs` compiles; [`profile`] the NVTX ranges and the
//! Nsight capture region. The contract all of it implements is `docs/SPEC.md`.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod case;
pub mod config;
pub mod contract;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod exec;
pub mod image;
pub mod io;
pub mod memory;
pub mod model;
pub mod plan;
pub mod profile;
pub mod request;
pub mod runtime;
pub mod sampler;
pub mod schedule;
pub mod weights;

pub use error::{Error, Result};

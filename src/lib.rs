//! Sparse-LaViDa masked-diffusion sampling: a step-causal, KV-cached re-parameterisation of
//! LaViDa-O's sampling loop, with an f32 CPU backend (the oracle) behind a [`backend::Backend`]
//! trait that the CUDA backend implements, and hand-written CUDA kernels that other engines can
//! take alone. The contract all of it implements is `docs/SPEC.md`.
//!
//! # Layers
//! Every arrow points down; `tests/layers.rs` reads the source and fails on an import against
//! them, or on any import cycle.
//!
//! ```text
//! CLI (src/main.rs, feature `cli`)
//!   bench, runtime (device choice, model construction), request, case, image
//!     exec — executors: the host loop, the program interpreter, the device-resident executor
//!       sampler — requests compiled into per-step plans (Sampling) or a Program (plans + patches)
//!         model — the SPEC §2.3 graph over the Backend trait
//!           backend — the Backend trait (plans, weights, matrices; no model, no sampler);
//!                     backend::cpu, backend::cuda (feature `cuda`)
//!             plan · schedule · weights · memory · config · io · profile
//! ── the kernel layer, usable alone ─────────────────────────────────────────────────────────
//!   cuda (feature `cuda`): device ← raw ← ops; blas, profiler
//!   contract: the formats the kernels consume and the params.h ABI (no CUDA needed)
//!   error
//! ```
//!
//! - [`contract`]: tags, the CSR key lists, the query tiling and split rule, the sampler's
//!   parameters, Philox, the program patch format, the aggregation inputs, and [`contract::abi`]
//!   (the structs of `kernels/params.h`). The planner, the samplers and the CPU twins build
//!   these formats; the kernels consume them.
//! - `cuda` (feature `cuda`): the kernel images `build.rs` compiles and embeds
//!   (`cfg(sl_kernels)` when there are any), the device probe and module loading, raw launches
//!   and safe, validated ops, cuBLASLt products, the Nsight capture region. It imports nothing
//!   of the runtime.
//! - the runtime: [`config`] → [`weights`] / [`schedule`] → [`plan`] → [`backend`] → [`model`]
//!   → [`sampler`] → [`exec`] → [`runtime`] / [`bench`](mod@bench) → CLI; [`memory`] bounds what
//!   a request needs before anything is allocated, [`io`] writes every output atomically,
//!   [`image`] draws a t2i generation, [`profile`] opens NVTX ranges.
//!
//! # Features
//! - `cuda` (default): the CUDA kernel layer, the bf16 backend and the device-resident executor
//!   (cudarc, cuBLASLt, nvcc at build time when it is there).
//! - `cli` (default): the `sparse-lavida` binary and what only it needs (clap, indicatif,
//!   plotters: `bench --plot`).
//! - `emulator`: the emulated CUDA device for tests (implies `cuda`).
//!
//! `default-features = false, features = ["cuda"]` is the kernel layer and the runtime with none
//! of the CLI's dependencies; `default-features = false` is the CPU runtime alone.
//!
//! # Use from another engine
//! Four ways in, each a program in `examples/` that CI runs (on the emulated device where it
//! needs CUDA) and that checks its results against the crate's CPU oracles.
//!
//! **A Rust engine on cudarc** (candle's CUDA storage is cudarc's): the safe ops of `cuda::ops`
//! on the engine's own `CudaSlice`s and stream, FlashInfer-style. `AttnPlan::new` is the *plan*
//! (on the host, outside any capture: validates the ragged layout, cuts query tiles, picks the
//! split count, uploads the index arrays, allocates the split workspace); `ops::attention` is
//! the *run*: it allocates nothing, never synchronizes, and can be captured in a CUDA graph and
//! replayed on new contents of the same buffers. The sampler splits the same way
//! (`BannedMask::new`, then `ops::sample_to_device`). Full program: `examples/engine_cudarc.rs`.
//!
#![cfg_attr(feature = "cuda", doc = "```no_run")]
#![cfg_attr(not(feature = "cuda"), doc = "```ignore")]
//! # fn main() -> sparse_lavida::Result<()> {
//! use sparse_lavida::contract::{AttnLayout, AttnShape, Branch, Tag};
//! use sparse_lavida::cuda::device::CudaDevice;
//! use sparse_lavida::cuda::ops::{self, AttnArgs, AttnOut, AttnPlan};
//!
//! let ctx = cudarc::driver::CudaContext::new(0)?;
//! // SAFETY: before any allocation; this engine orders its work on one stream.
//! unsafe { ctx.disable_event_tracking() }; // so that the launches can be captured
//! let stream = ctx.new_stream()?;
//! let dev = CudaDevice::with_stream(stream.clone())?; // kernels loaded into the engine's context
//! let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
//! // The engine's buffers: 3 query rows of one sequence over 4 pool slots.
//! let q = stream.alloc_zeros::<half::bf16>(3 * shape.q_dim())?;
//! let (k, v) = (stream.alloc_zeros(4 * shape.kv_dim())?, stream.alloc_zeros(4 * shape.kv_dim())?);
//! let mut o = stream.alloc_zeros::<half::bf16>(3 * shape.q_dim())?;
//! let clean = Tag::new(Branch::Text, 0, false);
//! let layout = AttnLayout {
//!     shape,
//!     row_tags: &[clean; 3],
//!     seq_indptr: &[0, 3],
//!     kv_indptr: &[0, 4],
//!     kv_indices: &[3, 0, 2, 1],
//!     kv_tags: &[clean; 4],
//!     n_slots: 4,
//! };
//! let mut plan = AttnPlan::new(&dev, &layout, None)?; // plan: host work, allocation
//! let args = AttnArgs { q: &q, q_stride: shape.q_dim(), k_pool: &k, v_pool: &v,
//!                       kv_stride: shape.kv_dim(), joint: true };
//! stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
//! ops::attention(&dev, &mut plan, &args, AttnOut { o: &mut o, o_stride: shape.q_dim(), lse: None })?;
//! let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?.unwrap();
//! graph.launch()?; // replay as often as the engine likes
//! # Ok(()) }
//! ```
//!
//! **Raw device pointers and a `CUstream`**, for engines that allocate memory themselves:
//! `cuda::raw` has one `unsafe fn` per kernel taking the kernel's params struct
//! ([`contract::abi`]) and a `CUstream`, with the safety contract on each function; the host
//! planning helpers are the contract's ([`contract::query_tiles`], [`contract::choose_splits`],
//! [`contract::abi::split_chunk`]). Load the kernels with `cuda::device::Kernels::load` into
//! the engine's context. Full program: `examples/engine_raw.rs`.
//!
//! **C, C++ and Python engines**: `libsparse_lavida_capi.so` (the workspace member `capi/`,
//! `cargo build --release -p sparse-lavida-capi`) with the header `include/sparse_lavida.h`:
//! `sl_kernels_load(device, &k)`, then `sl_launch_attention(k, &params, stream)` and the other
//! launches, each a params struct of `kernels/params.h` and a stream in, an error code out
//! (`sl_last_error()` for the message; no panic crosses the boundary). A C program:
//! `examples/c/attention.c`; Python can call the same functions through `ctypes` with a
//! `torch.cuda.current_stream().cuda_stream`.
//!
//! **The kernels' sources in another build**: `kernels/*.cu` need only `kernels/` and nvcc:
//! `nvcc -std=c++17 -O3 -lineinfo -arch=sm_90 -I kernels -c kernels/*.cu -odir build/`
//! gives one object per file with the `extern "C"` kernels of `params.h` (README, "Use from
//! another engine").
//!
//! **The CPU runtime alone** (`default-features = false`):
//!
//! ```no_run
//! # fn main() -> sparse_lavida::Result<()> {
//! use sparse_lavida::config::Config;
//! use sparse_lavida::exec;
//! use sparse_lavida::runtime::{WeightSource, cpu_model};
//! use sparse_lavida::sampler::{Mode, RunOptions, Switches, T2iRequest, Task};
//!
//! let model = cpu_model(Config::preset("tiny")?, &WeightSource::Random(0))?;
//! let task = Task::T2i(T2iRequest {
//!     prompt: vec![1, 2, 3],
//!     height: 8,
//!     width: 8,
//!     steps: 8,
//!     guidance: 2.0,
//!     temperature: 1.0,
//!     order: sparse_lavida::schedule::Order::Stratified,
//!     seed: 0,
//! });
//! let g = exec::generate(&model, &task, Mode::Sparse(Switches::ALL_ON), RunOptions::default())?;
//! println!("{} tokens in {} steps", g.tokens.len(), g.steps.len());
//! # Ok(()) }
//! ```
//!
//! Full program: `examples/cpu_runtime.rs`.
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

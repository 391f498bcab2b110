//! Executors: what runs a generation the sampler compiled, on a model.
//!
//! - [`host`]: the host loop ([`generate`]: each step planned on the host from the decode state,
//!   run op by op, its tokens read back) and the host interpreter of a compiled [`Program`](crate::sampler::Program)
//!   ([`run_program`]); any backend.
//! - `resident` (feature `cuda`): the device-resident executor of the CUDA backend, which takes
//!   a compiled [`BatchProgram`] and a model, uploads every step's template plan and patches once,
//!   and queues every step — plan patch, forward, sampler, commit — with no host round trip,
//!   launched op by op ([`Execution::Queued`]) or captured as CUDA graphs ([`Execution::Graphs`]).
//!
//! [`generate_with`] picks one: the backend's device-resident executor when it has one
//! ([`Resident`]) and the run asks for nothing only the host loop can do, else the host loop.
//! The backend knows none of this: executors sit above the model and the sampler and drive them.

pub mod host;
#[cfg(feature = "cuda")]
pub mod resident;

pub use host::{generate, generate_batch, run_batch_program, run_program};

use std::time::Instant;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::error::Result;
use crate::model::Model;
use crate::sampler::{self, BatchProgram, Execution, Generation, Mode, Request, RunOptions, Task};

/// A device-resident executor: runs a compiled batch program on a model with
/// [`Execution::Queued`] or [`Execution::Graphs`], one generation per request; `progress` sees
/// (steps done, steps in total).
pub type ResidentExecutor<B> = fn(
    &Model<B>,
    &BatchProgram,
    Execution,
    Option<&mut dyn FnMut(usize, usize)>,
) -> Result<Vec<Generation>>;

/// The executors a backend offers beyond the host loop (which runs on every backend).
pub trait Resident: Backend + Sized {
    /// The backend's device-resident executor, or `None` (the default) when it has none.
    fn resident_executor() -> Option<ResidentExecutor<Self>> {
        None
    }
}

/// The CPU backend computes synchronously: the host loop is its only executor.
impl Resident for CpuBackend {}

#[cfg(feature = "cuda")]
impl Resident for crate::backend::cuda::CudaBackend {
    fn resident_executor() -> Option<ResidentExecutor<Self>> {
        Some(resident::run)
    }
}

/// Runs a whole generation with `exec`: device-resident when the backend has such an executor
/// ([`Resident`]) and `opts` asks for nothing only the host loop can do (recorded logits,
/// teacher forcing, a plan hook) — the sampler then compiles the request into a
/// [`crate::sampler::Program`] first, its time counted in the generation's setup — else the
/// host loop of [`generate`]. The tokens are the same either way. A batch of one
/// ([`generate_batch_with`]).
pub fn generate_with<B: Resident>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    exec: Execution,
    opts: RunOptions,
) -> Result<Generation> {
    let mut g = generate_batch_with(model, std::slice::from_ref(task), mode, exec, opts)?;
    Ok(g.pop().expect("one generation per request"))
}

/// [`generate_with`] for a batch of requests of one task ([`crate::sampler::batch`]): one
/// generation per request, in order, each with the tokens the request gives alone.
pub fn generate_batch_with<B: Resident>(
    model: &Model<B>,
    requests: &[Request],
    mode: Mode,
    exec: Execution,
    mut opts: RunOptions,
) -> Result<Vec<Generation>> {
    let host_only = opts.record_logits || opts.teacher.is_some() || opts.on_plan.is_some();
    if exec != Execution::Eager
        && !host_only
        && let Some(run) = B::resident_executor()
    {
        let start = Instant::now();
        let program = sampler::batch_program(model.config(), requests, mode)?;
        let compile_s = start.elapsed().as_secs_f64();
        // Lent, not taken: the caller's callback stays theirs.
        let progress = opts
            .progress
            .as_mut()
            .map(|p| &mut **p as &mut dyn FnMut(usize, usize));
        let mut gs = run(model, &program, exec, progress)?;
        for g in &mut gs {
            g.setup_s += compile_s;
            g.wall_s += compile_s;
        }
        return Ok(gs);
    }
    generate_batch(model, requests, mode, opts)
}

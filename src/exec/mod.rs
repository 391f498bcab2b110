//! Executors: what runs a generation the sampler compiled, on a model.
//!
//! - [`host`]: the host loop ([`generate`]: each step planned on the host from the decode state,
//!   run op by op, its tokens read back) and the host interpreter of a compiled [`Program`]
//!   ([`run_program`]); any backend.
//! - `resident` (feature `cuda`): the device-resident executor of the CUDA backend, which takes
//!   a compiled [`Program`] and a model, uploads every step's template plan and patches once,
//!   and queues every step — plan patch, forward, sampler, commit — with no host round trip,
//!   launched op by op ([`Execution::Queued`]) or captured as CUDA graphs ([`Execution::Graphs`]).
//!
//! [`generate_with`] picks one: the backend's device-resident executor when it has one
//! ([`Resident`]) and the run asks for nothing only the host loop can do, else the host loop.
//! The backend knows none of this: executors sit above the model and the sampler and drive them.

pub mod host;
#[cfg(feature = "cuda")]
pub mod resident;

pub use host::{generate, run_program};

use std::time::Instant;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::error::Result;
use crate::model::Model;
use crate::sampler::{self, Execution, Generation, Mode, Program, RunOptions, Task};

/// A device-resident executor: runs a compiled program on a model with [`Execution::Queued`] or
/// [`Execution::Graphs`]; `progress` sees (steps done, steps in total).
pub type ResidentExecutor<B> =
    fn(&Model<B>, &Program, Execution, Option<&mut dyn FnMut(usize, usize)>) -> Result<Generation>;

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
/// teacher forcing, a plan hook) — the sampler then compiles the request into a [`Program`]
/// first, its time counted in the generation's setup — else the host loop of [`generate`]. The
/// tokens are the same either way.
pub fn generate_with<B: Resident>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    exec: Execution,
    mut opts: RunOptions,
) -> Result<Generation> {
    let host_only = opts.record_logits || opts.teacher.is_some() || opts.on_plan.is_some();
    if exec != Execution::Eager
        && !host_only
        && let Some(run) = B::resident_executor()
    {
        let start = Instant::now();
        let program = sampler::program(model.config(), task, mode)?;
        let compile_s = start.elapsed().as_secs_f64();
        // Lent, not taken: the caller's callback stays theirs.
        let progress = opts
            .progress
            .as_mut()
            .map(|p| &mut **p as &mut dyn FnMut(usize, usize));
        let mut g = run(model, &program, exec, progress)?;
        g.setup_s += compile_s;
        g.wall_s += compile_s;
        return Ok(g);
    }
    generate(model, task, mode, opts)
}

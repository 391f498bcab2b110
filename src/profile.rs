//! Profiling hooks for Nsight: NVTX ranges and the capture region of `generate --profile`.
//!
//! **Ranges.** [`range`] opens an NVTX push/pop range on the calling thread and closes it when
//! the returned guard drops, so a call site is one line (`let _r = profile::range("gemm");`).
//! Ranges nest: `prefill` / `step k` (the sampler) ⊃ `layer i` (the model) ⊃ one kernel family
//! per backend op (`embed`, `rmsnorm`, `gemm`, `rope_kv`, `attention`, `swiglu`, `sample`; CUDA
//! backend only). NVTX here is the header-only NVTX3 C code, compiled into the binary by the
//! `nvtx` crate (no CUDA, no shared library, no libclang at build time): without a tool that
//! injects itself (`nsys`, `ncu` set `NVTX_INJECTION64_PATH`) every call is a no-op behind one
//! function pointer, plus the formatting of the range's name.
//!
//! **Capture region.** [`Capture`] brackets GPU work with `cuProfilerStart` / `cuProfilerStop`,
//! so `nsys profile --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` record
//! only that work (not model load, weight upload or warm-up).

use std::fmt::Display;
use std::marker::PhantomData;

use crate::cuda::device::{CudaDevice, cuda_err};
use crate::error::Result;

/// An open NVTX range; dropping it closes the range. NVTX push/pop ranges belong to the thread
/// that opened them and close innermost first, so a guard is neither `Send` nor meant to be
/// stored: bind it to a local (`let _r = ...`) for the scope it measures.
#[must_use = "the range closes when this guard drops: bind it with `let _r = ...`"]
pub struct Range {
    _not_send: PhantomData<*const ()>,
}

/// Opens the NVTX range `name` on this thread until the returned guard drops. `name` must not
/// contain a NUL byte (every name in this crate is a fixed word plus a number).
pub fn range(name: impl Display) -> Range {
    nvtx::range_push!("{name}");
    Range {
        _not_send: PhantomData,
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        nvtx::range_pop!();
    }
}

/// The profiled region of a run on `dev`: started by [`Capture::start`], ended by
/// [`Capture::stop`] (or, ignoring errors, on drop).
pub struct Capture<'a> {
    dev: &'a CudaDevice,
    stopped: bool,
}

impl<'a> Capture<'a> {
    /// Waits for the work queued so far (it stays outside the region), then calls
    /// `cuProfilerStart` on `dev`'s context.
    pub fn start(dev: &'a CudaDevice) -> Result<Capture<'a>> {
        dev.synchronize()?;
        dev.context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context for cuProfilerStart"))?;
        cudarc::driver::profiler_start().map_err(cuda_err("cuProfilerStart"))?;
        Ok(Capture {
            dev,
            stopped: false,
        })
    }

    /// Waits for the work queued inside the region, then calls `cuProfilerStop` (also when the
    /// wait reports a fault; the first error is returned).
    pub fn stop(mut self) -> Result<()> {
        self.stopped = true;
        let drained = self.dev.synchronize();
        let stopped = self
            .dev
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the context for cuProfilerStop"))
            .and_then(|()| cudarc::driver::profiler_stop().map_err(cuda_err("cuProfilerStop")));
        drained.and(stopped)
    }
}

impl Drop for Capture<'_> {
    /// A region left by an error still ends, so a profiler does not record the error path.
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.dev.context().bind_to_thread();
            let _ = cudarc::driver::profiler_stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a profiler attached ranges are no-ops: nesting, numbers in names and early drops
    /// must neither fail nor panic.
    #[test]
    fn ranges_nest_and_close_without_a_profiler() {
        let _outer = range("prefill");
        for k in 0..3 {
            let _step = range(format_args!("step {k}"));
            let layer = range(format_args!("layer {k}"));
            drop(layer);
            let _gemm = range("gemm");
        }
    }
}

//! Profiling hooks for Nsight: NVTX ranges. (The capture region of `generate --profile`,
//! `cuProfilerStart` / `Stop`, is the kernel layer's `cuda::profiler`.)
//!
//! **Ranges.** [`range`] opens an NVTX push/pop range on the calling thread and closes it when
//! the returned guard drops, so a call site is one line (`let _r = profile::range("gemm");`).
//! Ranges nest: `prefill` / `step k` (the sampler) ⊃ `layer i` (the model) ⊃ one kernel family
//! per backend op (`embed`, `rmsnorm`, `gemm`, `rope_kv`, `attention`, `swiglu`, `sample`; CUDA
//! backend only). NVTX here is the header-only NVTX3 C code, compiled into the binary by the
//! `nvtx` crate (no CUDA, no shared library, no libclang at build time): without a tool that
//! injects itself (`nsys`, `ncu` set `NVTX_INJECTION64_PATH`) every call is a no-op behind one
//! function pointer, plus the formatting of the range's name.

use std::fmt::Display;
use std::marker::PhantomData;

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

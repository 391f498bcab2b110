//! The Nsight capture region: [`Capture`] brackets GPU work with `cuProfilerStart` /
//! `cuProfilerStop`, so `nsys profile --capture-range=cudaProfilerApi` and
//! `ncu --profile-from-start off` record only that work (not model load, weight upload or
//! warm-up). The CLI's `generate --profile` uses it.

use crate::cuda::device::{CudaDevice, cuda_err};
use crate::error::Result;

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

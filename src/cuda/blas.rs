//! Matrix products on cuBLASLt: `out[m, n] (+)= x[m, k] · w[n, k]ᵀ` with `x` and `w` bf16
//! row-major (PyTorch's `[out, in]` weights), f32 compute and scale, and `out` bf16 or f32.
//!
//! cuBLASLt is column-major. A row-major `[r, c]` matrix is the column-major `c × r` matrix with
//! leading dimension `c`, so the row-major product is computed as the transposed column-major
//! problem `D' = op(A) · op(B)` with
//!
//! ```text
//! A = w   (column-major k × n, ld k), op(A) = Aᵀ (n × k)   TRANSA = T
//! B = x   (column-major k × m, ld k), op(B) = B  (k × m)   TRANSB = N
//! D = out (column-major n × m, ld n) = the row-major [m, n] result
//! ```
//!
//! so `D'[j, i] = Σ_l w[j, l] · x[i, l] = out[i, j]`. The residual add is fused as `beta = 1`
//! with `C = D` (the f32 residual stream).
//!
//! [`Gemm`] owns the cuBLASLt handle and a workspace; for every distinct problem (shape, output
//! type, accumulate flag, pointer alignments) it creates the descriptors and asks the heuristic
//! for its best [`ALGO_CANDIDATES`] algorithms once, then reuses them: layouts are chosen once
//! per shape. On a GPU it times each candidate once (on scratch operands of the problem's shape,
//! a few launches between CUDA events) and keeps the fastest; on the emulated device, or while
//! the stream is being captured (which the executors avoid by preparing every product first),
//! it keeps the heuristic's first. Each choice is recorded ([`Gemm::choices`]).
//!
//! The library is loaded at run time (cudarc's `dynamic-loading`). [`Gemm::new`] first checks
//! that it can be found under its usual names; failing that it looks in the usual install
//! places (`$SL_CUBLASLT` naming the file, `$CUDA_HOME`/`$CUDA_PATH`, `/usr/local/cuda`, and the
//! `nvidia/cu13` folders of Python's CUDA wheels) and loads it from there, so that the
//! by-name lookup finds it already loaded. Nothing here panics on a missing library: it is
//! [`Error::Unavailable`] saying where it looked.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::cuda::device::{CudaDevice, cuda_err};
use crate::error::{Error, Result};

/// Bytes of the cuBLASLt workspace (NVIDIA's recommendation for Hopper; ample for Ampere).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// `cublasOperation_t` values (cublas_api.h): no transpose, transpose.
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// The largest alignment the heuristic is told about (its default assumption).
const MAX_ALIGN: u32 = 256;

/// Algorithms asked of the heuristic per problem (the best it ranks first).
pub const ALGO_CANDIDATES: usize = 4;

/// Timed launches per candidate when choosing among them on a GPU (after one untimed).
const TUNE_REPS: usize = 3;

/// How the algorithm of one problem was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmChoice {
    /// The product's shape.
    pub shape: GemmShape,
    /// f32 output (the residual stream, logits) rather than bf16.
    pub f32_out: bool,
    /// `out += x · wᵀ`.
    pub accumulate: bool,
    /// Algorithms the heuristic returned that fit the workspace.
    pub candidates: usize,
    /// Index of the one kept, in the heuristic's order.
    pub chosen: usize,
    /// Seconds per launch of each candidate, when they were timed (a GPU, not capturing).
    pub seconds: Option<Vec<f64>>,
}

/// Shape of one product: `out[m, n] (+)= x[m, k] · w[n, k]ᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Rows of `x` and `out`.
    pub m: usize,
    /// Rows of `w`, columns of `out`.
    pub n: usize,
    /// Columns of `x` and `w`.
    pub k: usize,
}

/// The output of a product and its element type.
#[derive(Debug)]
pub enum GemmOut<'a> {
    /// bf16 output (an activation).
    Bf16(&'a mut CudaSlice<bf16>),
    /// f32 output (the residual stream, or logits).
    F32(&'a mut CudaSlice<f32>),
}

/// Element type of the output, part of a plan's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// Everything a cached plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: GemmShape,
    out: OutType,
    accumulate: bool,
    /// Alignment in bytes (power of two, at most 256) of `w`, `x` and `out`.
    align: [u32; 3],
}

/// Descriptors and the chosen algorithm of one problem; destroyed on drop.
struct GemmPlan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    /// Layout of both C and D (same type and shape; C is D when accumulating).
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates that fit the workspace, best-ranked first.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
}

impl Drop for GemmPlan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by `GemmPlan::new` and is destroyed exactly once,
        // here; no launch that uses them is queued after the plan is dropped (the plan lives in
        // the `Gemm` that launches). Destroy errors are ignored: nothing can be done about them
        // in a destructor, and the descriptors are host objects.
        unsafe {
            if !self.a.is_null() {
                let _ = lt::destroy_matrix_layout(self.a);
            }
            if !self.b.is_null() {
                let _ = lt::destroy_matrix_layout(self.b);
            }
            if !self.d.is_null() {
                let _ = lt::destroy_matrix_layout(self.d);
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

fn blas_err(what: impl std::fmt::Display) -> impl FnOnce(CublasError) -> Error {
    move |e| Error::Cuda(format!("cuBLASLt {what}: {e}"))
}

/// Sets a descriptor attribute from a plain value.
///
/// # Safety
/// `set` must be one of cuBLASLt's attribute setters applied to a live descriptor, and `T` the
/// attribute's documented type.
unsafe fn set_attr<H, A, T>(
    set: unsafe fn(H, A, *const c_void, usize) -> std::result::Result<(), CublasError>,
    handle: H,
    attr: A,
    value: &T,
) -> std::result::Result<(), CublasError> {
    // SAFETY: the caller's contract; `value` is live for the call, which copies it.
    unsafe {
        set(
            handle,
            attr,
            (value as *const T).cast(),
            std::mem::size_of::<T>(),
        )
    }
}

impl GemmPlan {
    /// Creates the descriptors of `key` and asks the heuristic for its best [`ALGO_CANDIDATES`]
    /// algorithms that fit the workspace and the pointers' alignment (`algo` = the first).
    fn new(handle: sys::cublasLtHandle_t, key: &PlanKey, workspace: usize) -> Result<GemmPlan> {
        let GemmShape { m, n, k } = key.shape;
        let (m, n, k) = (m as u64, n as u64, k as u64);
        let mut plan = GemmPlan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            // SAFETY: cublasLtMatmulAlgo_t is a plain array of u64 words; all-zero is a valid
            // (unused) value, overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            candidates: Vec::new(),
        };
        // `plan` destroys whatever was created if a later step fails.
        plan.desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(blas_err("creating the matmul descriptor"))?;
        // SAFETY: `plan.desc` is live; TRANSA / TRANSB take a cublasOperation_t (int32).
        unsafe {
            set_attr(
                lt::set_matmul_desc_attribute,
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &OP_T,
            )
            .and_then(|()| {
                set_attr(
                    lt::set_matmul_desc_attribute,
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &OP_N,
                )
            })
        }
        .map_err(blas_err("setting the transposes"))?;
        let bf = sys::cudaDataType::CUDA_R_16BF;
        // Layouts describe the stored matrices (before op): see the module docs.
        plan.a = lt::create_matrix_layout(bf, k, n, k as i64).map_err(blas_err("layout of w"))?;
        plan.b = lt::create_matrix_layout(bf, k, m, k as i64).map_err(blas_err("layout of x"))?;
        plan.d = lt::create_matrix_layout(key.out.cuda(), n, m, n as i64)
            .map_err(blas_err("layout of out"))?;
        let pref = Preference(lt::create_matmul_pref().map_err(blas_err("creating a preference"))?);
        let [align_a, align_b, align_d] = key.align;
        type P = sys::cublasLtMatmulPreferenceAttributes_t;
        // SAFETY: `pref.0` is live; MAX_WORKSPACE_BYTES takes a uint64, the MIN_ALIGNMENT
        // attributes a uint32 (cublasLt.h).
        unsafe {
            let set = |attr, v: &u32| set_attr(lt::set_matmul_pref_attribute, pref.0, attr, v);
            set_attr(
                lt::set_matmul_pref_attribute,
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(workspace as u64),
            )
            .and_then(|()| set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a))
            .and_then(|()| set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b))
            .and_then(|()| set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d))
            .and_then(|()| set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d))
        }
        .map_err(blas_err("setting the search preferences"))?;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            Vec::with_capacity(ALGO_CANDIDATES);
        let mut returned = 0i32;
        // SAFETY: every descriptor is live and describes this problem; `results` has room for
        // ALGO_CANDIDATES entries, of which the library fills `returned` (set_len below).
        let status = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.d,
                plan.d,
                pref.0,
                ALGO_CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut returned,
            )
        };
        let returned = if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            (returned.max(0) as usize).min(ALGO_CANDIDATES)
        } else {
            0
        };
        // SAFETY: the library initialised the first `returned` entries (at most the capacity).
        unsafe { results.set_len(returned) };
        let mut candidates: Vec<sys::cublasLtMatmulAlgo_t> = results
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .filter(|r| r.workspaceSize <= workspace)
            .map(|r| r.algo)
            .collect();
        if candidates.is_empty() {
            return Err(Error::Cuda(format!(
                "cuBLASLt found no algorithm within {workspace} bytes of workspace for a bf16 \
                 product [{m}, {k}] · [{n}, {k}]ᵀ → {:?} (alignments {:?} bytes): {status:?}",
                key.out, key.align
            )));
        }
        plan.algo = candidates[0];
        plan.candidates = std::mem::take(&mut candidates);
        Ok(plan)
    }
}

/// A matmul preference descriptor, destroyed on drop.
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed once, here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// cuBLASLt on one [`CudaDevice`]'s stream: the handle, a workspace, and the plans made so far.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<PlanKey, GemmPlan>>,
    /// Time the candidates (a GPU) or keep the heuristic's first (the emulated device, or
    /// `SL_GEMM_TUNE=0`: see [`tune_from_env`]).
    tune: bool,
    choices: Mutex<Vec<GemmChoice>>,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plans = self.plans.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Gemm")
            .field("workspace_bytes", &self.workspace.len())
            .field("plans", &plans)
            .finish()
    }
}

// SAFETY: a cuBLASLt handle may be used from any host thread (the library is thread safe);
// the descriptors in `plans` are only touched under the mutex; every launch goes to the one
// stream, whose context each call binds first.
unsafe impl Send for Gemm {}
// SAFETY: as for Send: shared use goes through `&self` methods that lock `plans`.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        // Products queued with the workspace must finish before it is freed with the handle.
        ctx.record_err(self.stream.synchronize());
        if let Ok(plans) = self.plans.get_mut() {
            plans.clear();
        }
        // SAFETY: the handle was created in `Gemm::new` and is destroyed exactly once, here,
        // after the work queued with it has finished.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Largest power of two (at most [`MAX_ALIGN`]) dividing the address `ptr`.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        MAX_ALIGN
    } else {
        (1u64 << ptr.trailing_zeros().min(MAX_ALIGN.trailing_zeros())) as u32
    }
}

fn bad<T>(msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("matmul: {msg}")))
}

/// `a · b` as a length, or an error naming it.
fn elems(name: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .map_or_else(|| bad(format_args!("{name} size {a} × {b} overflows")), Ok)
}

/// Whether a GPU times cuBLASLt's candidates for each new shape (`SL_GEMM_TUNE` unset, empty
/// or `1`) or keeps the heuristic's first (`0`). Timing picks the fastest, but near-ties can go
/// either way between processes, so logits may differ in their last bits from run to run; `0`
/// makes a card's products the same in every run (for comparing against stored results).
/// Any other value is an error naming it.
pub fn tune_from_env() -> Result<bool> {
    parse_tune(std::env::var("SL_GEMM_TUNE").ok().as_deref())
}

/// [`tune_from_env`] of the variable's value (`None`: unset).
fn parse_tune(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("") | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(Error::Input(format!(
            "SL_GEMM_TUNE={other:?}: use 1 (time cuBLASLt's candidates, the default) or 0 (keep \
             its heuristic's first, the same algorithm in every run)"
        ))),
    }
}

impl Gemm {
    /// Creates the handle and a [`WORKSPACE_BYTES`] workspace on `dev`'s stream.
    /// [`Error::Unavailable`] when the cuBLASLt library cannot be found or loaded.
    pub fn new(dev: &CudaDevice) -> Result<Gemm> {
        ensure_library()?;
        let tune = tune_from_env()? && !dev.info().emulated;
        let stream = dev.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))?;
        let workspace = dev.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        let handle = guarded(lt::create_handle)?
            .map_err(|e| Error::Unavailable(format!("cuBLASLt could not create a handle: {e}")))?;
        Ok(Gemm {
            handle,
            stream,
            workspace,
            plans: Mutex::new(HashMap::new()),
            tune,
            choices: Mutex::new(Vec::new()),
        })
    }

    /// How each problem's algorithm was chosen, in the order the problems were first run.
    pub fn choices(&self) -> Vec<GemmChoice> {
        self.choices.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Picks `plan.algo` among its candidates: on a GPU, outside a capture, the fastest over
    /// [`TUNE_REPS`] launches each on scratch operands of the shape (the weight operand is the
    /// problem's own, read only; the real output is untouched); else the heuristic's first.
    fn choose(&self, plan: &mut GemmPlan, key: &PlanKey, w_ptr: u64) -> Result<GemmChoice> {
        let capturing = self
            .stream
            .capture_status()
            .map(|s| s != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            .unwrap_or(true);
        let mut choice = GemmChoice {
            shape: key.shape,
            f32_out: key.out == OutType::F32,
            accumulate: key.accumulate,
            candidates: plan.candidates.len(),
            chosen: 0,
            seconds: None,
        };
        if !self.tune || capturing || plan.candidates.len() < 2 {
            plan.algo = plan.candidates[0];
            return Ok(choice);
        }
        let GemmShape { m, n, k } = key.shape;
        let x = self
            .stream
            .alloc_zeros::<bf16>(m * k)
            .map_err(cuda_err("allocating a tuning operand"))?;
        let out_bytes = m * n * if key.out == OutType::F32 { 4 } else { 2 };
        let mut out = self
            .stream
            .alloc_zeros::<u8>(out_bytes)
            .map_err(cuda_err("allocating a tuning output"))?;
        let ctx = self.stream.context();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            ctx.new_event(timing)
                .map_err(cuda_err("creating an event"))?,
            ctx.new_event(timing)
                .map_err(cuda_err("creating an event"))?,
        );
        let stream = &*self.stream;
        let mut seconds = Vec::with_capacity(plan.candidates.len());
        {
            let (x_ptr, _xg) = x.device_ptr(stream);
            let (out_ptr, _og) = out.device_ptr_mut(stream);
            let (ws_ptr, _wg) = self.workspace.device_ptr(stream);
            let beta = if key.accumulate { 1.0f32 } else { 0.0 };
            for algo in &plan.candidates {
                let launch = || {
                    // SAFETY: as in `matmul`: the descriptors describe this problem; the scratch
                    // x (m·k bf16) and out (m·n of the output type) are fresh allocations of this
                    // context, 256-byte aligned (any promised alignment holds), w is the
                    // problem's weight (read only); the workspace is large enough for every
                    // candidate (filtered by the heuristic's workspace size).
                    unsafe { self.launch(plan, algo, [w_ptr, x_ptr, out_ptr, ws_ptr], beta) }
                        .map_err(blas_err("timing a matmul algorithm"))
                };
                launch()?;
                start
                    .record(stream)
                    .map_err(cuda_err("recording an event"))?;
                for _ in 0..TUNE_REPS {
                    launch()?;
                }
                end.record(stream).map_err(cuda_err("recording an event"))?;
                let ms = start
                    .elapsed_ms(&end)
                    .map_err(cuda_err("reading the event timer"))?;
                seconds.push(f64::from(ms) * 1e-3 / TUNE_REPS as f64);
            }
        }
        let best = (0..seconds.len())
            .min_by(|&i, &j| seconds[i].total_cmp(&seconds[j]))
            .unwrap_or(0);
        plan.algo = plan.candidates[best];
        choice.chosen = best;
        choice.seconds = Some(seconds);
        Ok(choice)
    }

    /// Number of distinct problems planned so far.
    pub fn plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ`, or `out += x · wᵀ` when `accumulate`, queued on the
    /// stream. Buffers may be longer than the shape needs (the first `m·k`, `n·k`, `m·n` values
    /// are used). With `k = 0` the product is zero (so `out` is zeroed, or left as it is when
    /// accumulating); with `m = 0` or `n = 0` nothing happens.
    pub fn matmul(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        shape: GemmShape,
        out: GemmOut,
        accumulate: bool,
    ) -> Result<()> {
        let GemmShape { m, n, k } = shape;
        for (name, v) in [("m", m), ("n", n), ("k", k)] {
            if v > i32::MAX as usize {
                return bad(format_args!("{name} = {v} exceeds cuBLASLt's i32 limit"));
            }
        }
        let (need_x, need_w, need_out) =
            (elems("x", m, k)?, elems("w", n, k)?, elems("out", m, n)?);
        let out_len = match &out {
            GemmOut::Bf16(o) => o.len(),
            GemmOut::F32(o) => o.len(),
        };
        for (name, len, need) in [
            ("x", x.len(), need_x),
            ("w", w.len(), need_w),
            ("out", out_len, need_out),
        ] {
            if len < need {
                return bad(format_args!(
                    "{name} holds {len} values, needs {need} for [{m}, {k}] · [{n}, {k}]ᵀ"
                ));
            }
        }
        let ctx = self.stream.context();
        let same_ctx = |c: &Arc<cudarc::driver::CudaContext>| **c == **ctx;
        let out_ctx = match &out {
            GemmOut::Bf16(o) => o.stream().context(),
            GemmOut::F32(o) => o.stream().context(),
        };
        if !(same_ctx(x.stream().context()) && same_ctx(w.stream().context()) && same_ctx(out_ctx))
        {
            return bad("a buffer was allocated in another CUDA context");
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if accumulate {
                return Ok(());
            }
            let zeroed = match out {
                GemmOut::Bf16(o) => self.stream.memset_zeros(&mut o.slice_mut(..need_out)),
                GemmOut::F32(o) => self.stream.memset_zeros(&mut o.slice_mut(..need_out)),
            };
            return zeroed.map_err(cuda_err("zeroing a product with k = 0"));
        }
        ctx.bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))?;
        let stream = &*self.stream;
        let (x_ptr, _x_guard) = x.device_ptr(stream);
        let (w_ptr, _w_guard) = w.device_ptr(stream);
        let (out_type, (out_ptr, _out_guard)) = match out {
            GemmOut::Bf16(o) => (OutType::Bf16, o.device_ptr_mut(stream)),
            GemmOut::F32(o) => (OutType::F32, o.device_ptr_mut(stream)),
        };
        let (ws_ptr, _ws_guard) = self.workspace.device_ptr(stream);
        let key = PlanKey {
            shape,
            out: out_type,
            accumulate,
            align: [alignment(w_ptr), alignment(x_ptr), alignment(out_ptr)],
        };
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| Error::Cuda("cuBLASLt plan cache poisoned by an earlier panic".into()))?;
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut plan = GemmPlan::new(self.handle, &key, self.workspace.len())?;
                let choice = self.choose(&mut plan, &key, w_ptr)?;
                if let Ok(mut c) = self.choices.lock() {
                    c.push(choice);
                }
                e.insert(plan)
            }
        };
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: the plan's descriptors describe exactly this problem (the key holds the shape,
        // output type and the alignments of these very pointers); x holds ≥ m·k, w ≥ n·k and
        // out ≥ m·n values (checked above) of the types the layouts name; all buffers live in
        // this stream's context and stay borrowed (the guards) until the product is queued; out
        // is borrowed mutably, so it aliases neither input, and C = D is allowed in place; the
        // workspace holds `workspace.len()` bytes, at least what the algorithm asked for.
        unsafe { self.launch(plan, &plan.algo, [w_ptr, x_ptr, out_ptr, ws_ptr], beta) }.map_err(
            blas_err(format_args!(
                "matmul [{m}, {k}] · [{n}, {k}]ᵀ → {out_type:?}"
            )),
        )
    }

    /// Queues `out = w·x + beta·out` (cuBLASLt's `D = αAB + βC` with α = 1, A the weight, C = D
    /// in place) for `plan`'s layouts with `algo`, on the stream with the handle's workspace;
    /// `ptrs` are the device addresses `[w, x, out, workspace]`.
    ///
    /// # Safety
    /// `plan`'s descriptors describe the buffers at `ptrs` (shape, types, alignment), which
    /// live in this stream's context and are not freed before the product runs (the callers keep
    /// them borrowed until it is queued, as every launch in this crate does); `out` aliases
    /// neither input; `algo` is one of `plan`'s candidates; the workspace at `ptrs[3]` holds
    /// `self.workspace.len()` bytes.
    unsafe fn launch(
        &self,
        plan: &GemmPlan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ptrs: [u64; 4],
        beta: f32,
    ) -> std::result::Result<(), CublasError> {
        let [w, x, out, ws] = ptrs.map(|p| p as usize as *mut c_void);
        let alpha = 1.0f32;
        // SAFETY: the caller's contract above; alpha and beta are host f32 scalars that live
        // through the call, which reads them before it returns.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w,
                plan.a,
                x,
                plan.b,
                out,
                plan.d,
                out,
                plan.d,
                algo,
                ws,
                self.workspace.len(),
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }
}

/// Runs `f`, turning a panic inside cudarc's lazy symbol loading into [`Error::Unavailable`].
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown reason");
        Error::Unavailable(format!("the cuBLASLt library is unusable: {why}"))
    })
}

// ------------------------------------------------------------------------------------------
// Finding the library
// ------------------------------------------------------------------------------------------

/// The file name the by-name lookup accepts for CUDA 13 (cudarc's `cuda-13000` feature).
const LIB_FILE: &str = "libcublasLt.so.13";

/// Makes sure cuBLASLt can be loaded (see the module docs); the answer is computed once.
pub fn ensure_library() -> Result<()> {
    static ANSWER: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    ANSWER
        .get_or_init(find_and_load)
        .clone()
        .map_err(Error::Unavailable)
}

fn find_and_load() -> std::result::Result<(), String> {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its usual names (running
    // its initialisers, which is what loading cuBLASLt means) and closes it again.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let candidates = library_candidates();
    let mut errors = Vec::new();
    for path in &candidates {
        // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's cuBLASLt
        // files found by name in the install locations listed in the module docs.
        match unsafe { libloading::Library::new(path) } {
            Ok(lib) => {
                // Kept loaded for the life of the process: the by-name lookup of cudarc then
                // finds it by its soname.
                std::mem::forget(lib);
                // SAFETY: as above.
                if unsafe { sys::is_culib_present() } {
                    return Ok(());
                }
                errors.push(format!(
                    "{}: loaded, but not found by its soname",
                    path.display()
                ));
            }
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    let tried = if errors.is_empty() {
        "no copy found".to_string()
    } else {
        errors.join("; ")
    };
    Err(format!(
        "the cuBLASLt library ({LIB_FILE}) was not found: not on the loader's path, nor in \
         $SL_CUBLASLT, $CUDA_HOME/lib64, $CUDA_PATH/lib64, /usr/local/cuda or Python's \
         nvidia/cu13 wheels ({tried}); set LD_LIBRARY_PATH to its folder"
    ))
}

/// Existing files that may be cuBLASLt 13, most specific first.
fn library_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("SL_CUBLASLT") {
        out.push(PathBuf::from(p));
    }
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    // Python wheels (nvidia-cublas for CUDA 13 installs into nvidia/cu13/lib).
    for pattern in [
        "/opt/*/.venv/lib/python3*/site-packages",
        "/opt/*/lib/python3*/site-packages",
        "/usr/local/lib/python3*/dist-packages",
        "/usr/local/lib/python3*/site-packages",
        "/usr/lib/python3/dist-packages",
    ] {
        for site in expand(pattern) {
            dirs.push(site.join("nvidia/cu13/lib"));
            dirs.push(site.join("nvidia/cublas/lib"));
        }
    }
    out.extend(
        dirs.into_iter()
            .map(|d| d.join(LIB_FILE))
            .filter(|p| p.is_file()),
    );
    out
}

/// Expands `*` inside path components (`/opt/*/lib/python3*`) against the file system; a
/// pattern without `*` yields itself when it exists. Unreadable folders are skipped.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/")];
    for comp in Path::new(pattern).components().skip(1) {
        let comp = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for base in &paths {
            match comp.split_once('*') {
                None => next.push(base.join(comp.as_ref())),
                Some((pre, post)) => {
                    let Ok(entries) = std::fs::read_dir(base) else {
                        continue;
                    };
                    let mut found: Vec<PathBuf> = entries
                        .flatten()
                        .filter(|e| {
                            let name = e.file_name();
                            let name = name.to_string_lossy();
                            name.len() >= pre.len() + post.len()
                                && name.starts_with(pre)
                                && name.ends_with(post)
                        })
                        .map(|e| e.path())
                        .collect();
                    found.sort();
                    next.extend(found);
                }
            }
        }
        paths = next;
    }
    paths.into_iter().filter(|p| p.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sl_gemm_tune_is_1_0_or_an_error_naming_it() {
        assert!(parse_tune(None).unwrap());
        assert!(parse_tune(Some("")).unwrap());
        assert!(parse_tune(Some("1")).unwrap());
        assert!(!parse_tune(Some("0")).unwrap());
        let e = parse_tune(Some("off")).unwrap_err().to_string();
        assert!(
            e.contains("SL_GEMM_TUNE=\"off\"") && e.contains("use 1"),
            "{e}"
        );
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1001), 1);
    }

    #[test]
    fn expand_matches_stars_within_components() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["a1/x", "a2/x", "b1/x", "a3/y"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let root = dir.path().to_str().unwrap();
        let got = expand(&format!("{root}/a*/x"));
        let want: Vec<PathBuf> = ["a1/x", "a2/x"]
            .iter()
            .map(|s| dir.path().join(s))
            .collect();
        assert_eq!(got, want);
        assert!(expand(&format!("{root}/c*/x")).is_empty());
        assert_eq!(expand(root), vec![PathBuf::from(root)]);
    }
}

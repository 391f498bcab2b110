//! The seam between the model and the hardware.
//!
//! The model graph and the samplers above it are written once against [`Backend`], which knows
//! plans ([`StepPlan`]), weights and matrices and nothing of a model or a generation. A backend
//! owns its activation matrices, weights, uploaded plans and K/V pool; the CPU backend ([`cpu`])
//! computes in f32 and is the oracle; the CUDA backend (`cuda`, feature `cuda`) stores bf16 (f32
//! for the residual stream and logits) and accumulates in f32.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::config::{Branch, Config};
use crate::error::Result;
use crate::plan::StepPlan;
use crate::weights::HostTensor;

/// The sampler pass's parameters and results: the kernels' formats ([`crate::contract`]).
pub use crate::contract::{SampleParams, Sampled};

/// What a matrix holds, so that a backend can choose its storage: the CUDA backend keeps the
/// residual stream and the logits in f32 and every other activation in bf16 (the inputs of its
/// tensor-core products); the CPU backend computes in f32 throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixKind {
    /// The residual stream `x` (read by RMSNorm, accumulated into by the output projections).
    Residual,
    /// Normalised inputs, projections, attention outputs, MLP activations.
    Activation,
    /// Logits for the sampler.
    Logits,
}

/// One matrix product of a forward pass: an `[m, k]` activation times an `[n, k]` weight into an
/// `[m, n]` matrix of kind `out`, added to it when `accumulate` (the residual adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Rows.
    pub m: usize,
    /// Output columns (the weight's rows).
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// The output's kind (its storage on a backend).
    pub out: MatrixKind,
    /// `out += x · wᵀ` instead of `out = x · wᵀ`.
    pub accumulate: bool,
}

/// Operations the model graph needs. Matrices are row-major `[rows, cols]`; "rows of branch `b`"
/// means `plan.rows(b)` in order.
pub trait Backend {
    /// An activation matrix on the backend.
    type Matrix;
    /// A weight tensor (matrix `[out, in]` or vector) on the backend.
    type Weight;
    /// A [`StepPlan`] uploaded to the backend.
    type Plan;
    /// The K/V pool: per layer, `slots × kv_dim` keys and values.
    type Cache;

    /// Human-readable name (device, precision, threads).
    fn name(&self) -> String;
    /// Uploads a weight tensor.
    fn upload_weight(&self, t: HostTensor) -> Result<Self::Weight>;
    /// Concatenates weight matrices `[n_i, k]` of one `k` into one `[Σ n_i, k]` (rows in the
    /// given order), consuming them: done at load time, so that the products sharing an input
    /// run as one (the model's q|k|v and gate|up). The weights file is unchanged.
    fn concat_weights(&self, parts: Vec<Self::Weight>) -> Result<Self::Weight>;
    /// Uploads a plan.
    fn upload_plan(&self, plan: &StepPlan) -> Result<Self::Plan>;
    /// Allocates a zeroed K/V pool for `slots` slots.
    fn new_cache(&self, cfg: &Config, slots: usize) -> Result<Self::Cache>;
    /// Allocates a `[rows, cols]` matrix of `kind` (contents unspecified).
    fn matrix(&self, rows: usize, cols: usize, kind: MatrixKind) -> Result<Self::Matrix>;
    /// Views `m`'s storage as `[rows, cols]` (contents unspecified); [`crate::Error::Input`] when
    /// it holds fewer than `rows · cols` values. Lets one set of activation buffers serve passes
    /// of any size up to the one it was allocated for.
    fn reshape(&self, m: &mut Self::Matrix, rows: usize, cols: usize) -> Result<()>;
    /// Copies a matrix to the host as f32.
    fn to_host(&self, m: &Self::Matrix) -> Result<Vec<f32>>;

    /// `out[i] = table[id_i]`, or `register` for [`crate::plan::REGISTER`] rows, over rows of `b`.
    fn embed(
        &self,
        plan: &Self::Plan,
        b: Branch,
        table: &Self::Weight,
        register: &Self::Weight,
        out: &mut Self::Matrix,
    ) -> Result<()>;
    /// `out = x / sqrt(mean(x²) + eps) · w`, row-wise.
    fn rmsnorm(
        &self,
        x: &Self::Matrix,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Matrix,
    ) -> Result<()>;
    /// `out = x · wᵀ`, or `out += x · wᵀ` when `accumulate` (the residual add).
    fn matmul(
        &self,
        x: &Self::Matrix,
        w: &Self::Weight,
        out: &mut Self::Matrix,
        accumulate: bool,
    ) -> Result<()>;
    /// Applies RoPE (at the positions of rows of `b`) to the queries in place and to the keys,
    /// then stores the rotated keys and the values into the pool slots of rows of `b` at `layer`.
    /// `qkv` is `[rows, n_heads·head_dim + 2·kv_dim]`: each row holds q, then k, then v (the
    /// product by the concatenated q|k|v weights).
    fn rope_store_kv(
        &self,
        plan: &Self::Plan,
        b: Branch,
        layer: usize,
        qkv: &mut Self::Matrix,
        cache: &mut Self::Cache,
    ) -> Result<()>;
    /// Attention of the rows of `b` over their sequence's keys at `layer`, under the SPEC §3
    /// rule (`joint`: cross-branch layer). The queries are the first `n_heads·head_dim` columns
    /// of `q` (which may be wider: the fused q|k|v). Fully hidden rows give zeros.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        plan: &Self::Plan,
        b: Branch,
        layer: usize,
        joint: bool,
        q: &Self::Matrix,
        cache: &Self::Cache,
        out: &mut Self::Matrix,
    ) -> Result<()>;
    /// `out = silu(gate) ⊙ up`, with `gate_up` `[rows, 2F]` holding gate then up in each row
    /// (the product by the concatenated gate|up weights) and `out` `[rows, F]`.
    fn swiglu(&self, gate_up: &Self::Matrix, out: &mut Self::Matrix) -> Result<()>;
    /// `out[j] = x[plan.logits_rows[j]]`: the rows of the residual stream that need logits.
    fn gather_logit_rows(
        &self,
        plan: &Self::Plan,
        x: &Self::Matrix,
        out: &mut Self::Matrix,
    ) -> Result<()>;
    /// The sampler pass over rows `first_row..` of `logits` (`n`, or `2n` with CFG, rows of
    /// `[rows, V]`; `n = params.positions.len()`), one result per sampled row. A batch samples
    /// each request's rows with its own parameters.
    fn sample(
        &self,
        logits: &Self::Matrix,
        first_row: usize,
        params: &SampleParams,
    ) -> Result<Vec<Sampled>>;

    /// A clock for the sampler's per-step time: wall time by default; a GPU backend times its
    /// stream with events, so the time is the device's, not the host's view of it.
    fn step_clock(&self) -> Result<Box<dyn StepClock + '_>> {
        Ok(Box::new(WallClock::default()))
    }

    /// What a benchmark can ask of the device beyond computing (its name, driver, memory high
    /// watermark, copy bandwidth); `None` for a backend on the host.
    fn device_stats(&self) -> Option<&dyn DeviceStats> {
        None
    }

    /// Whether a pass computes its last layer past the K/V only for the rows that need logits
    /// (the model then uploads the plan's [`StepPlan::logits_tail`] too): the backend's [`Backend::gather_logit_rows`] must take a
    /// matrix of any kind and width (the fused q|k|v), and its row results must not depend on
    /// the rows around them, so the logits stay bit for bit what the whole layer gives.
    fn prunes_last_layer(&self) -> bool {
        false
    }

    /// The time spent in [`Backend::matmul`] and the FLOPs it did (`2·m·n·k` per product), summed
    /// since the backend was made, for a backend that keeps that count (the CPU backend, whose
    /// products finish inside the call; `None` where they run asynchronously). A benchmark
    /// reads it before and after a run for the rate of the products inside real steps.
    fn product_time(&self) -> Option<ProductTime> {
        None
    }
}

/// Seconds spent in products and the FLOPs they did ([`Backend::product_time`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProductTime {
    /// Seconds inside `matmul` calls.
    pub seconds: f64,
    /// `2·m·n·k` summed over the calls.
    pub flops: f64,
}

impl ProductTime {
    /// The FLOP rate between `earlier` and `self` (`None` when no product ran in between).
    pub fn rate_since(&self, earlier: &ProductTime) -> Option<f64> {
        let s = self.seconds - earlier.seconds;
        (s > 0.0).then(|| (self.flops - earlier.flops) / s)
    }
}

/// Times one step at a time: [`StepClock::start`] before the step's work is queued,
/// [`StepClock::stop`] after the last of it.
pub trait StepClock {
    /// What the clock measures, for reports: `wall` or `cuda events`.
    fn kind(&self) -> &'static str;
    /// Marks the start of a step.
    fn start(&mut self) -> Result<()>;
    /// Seconds since [`StepClock::start`], once the work queued since then has finished;
    /// [`crate::Error::Input`] when the clock was not started.
    fn stop(&mut self) -> Result<f64>;
}

/// Host wall time ([`std::time::Instant`]): the clock of backends that compute synchronously.
#[derive(Debug, Default)]
pub struct WallClock {
    start: Option<std::time::Instant>,
}

impl StepClock for WallClock {
    fn kind(&self) -> &'static str {
        "wall"
    }

    fn start(&mut self) -> Result<()> {
        self.start = Some(std::time::Instant::now());
        Ok(())
    }

    fn stop(&mut self) -> Result<f64> {
        let t0 = self
            .start
            .take()
            .ok_or_else(|| crate::Error::Input("step clock stopped before it started".into()))?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// Facts and measurements of a device backend for `bench`.
pub trait DeviceStats {
    /// The card, e.g. `NVIDIA H100 80GB HBM3`.
    fn device_name(&self) -> String;
    /// Whether the device is the emulated one (a CPU model for correctness): its timings, copy
    /// bandwidth and GEMM rate describe the host, not a GPU, so benchmarks skip the ceilings.
    fn emulated(&self) -> bool;
    /// The driver's version (e.g. `13.0`), when it can be read.
    fn driver_version(&self) -> Option<String>;
    /// Bytes of one stored weight parameter (2 for bf16).
    fn weight_bytes_per_param(&self) -> usize;
    /// How [`DeviceStats::peak_memory`] is measured, for reports.
    fn memory_source(&self) -> String;
    /// Restarts the device-memory high watermark; returns the bytes in use now (weights and
    /// workspaces), or `None` when the device cannot tell.
    fn reset_peak_memory(&self) -> Result<Option<u64>>;
    /// The most bytes in use at once since [`DeviceStats::reset_peak_memory`], or `None` when
    /// the device cannot tell.
    fn peak_memory(&self) -> Result<Option<u64>>;
    /// Device-to-device copy bandwidth measured now with a copy of `bytes`: bytes read plus
    /// bytes written per second.
    fn copy_bandwidth(&self, bytes: usize) -> Result<f64>;
    /// Bytes of device memory free now.
    fn free_memory(&self) -> Result<usize>;
    /// Seconds of one matrix product `p` (bf16 inputs, f32 accumulation, the output's kind and
    /// `accumulate` as given) through the backend's own GEMM path, on random inputs: `reps`
    /// products queued back to back between two timing points after a warm-up, divided by
    /// `reps` (so the host's launch cost is not in a small product's time).
    fn gemm_seconds(&self, p: &Product, reps: usize) -> Result<f64>;
}

//! `bench`: dense vs sparse (and the eight-switch ablation) in one process, same weights and
//! schedule, reported as a table, as JSON and (feature `cli`, which brings plotters) as an SVG
//! plot of the per-step latency.
//!
//! Per run: wall time, forwards, rows fed, every step's latency on the backend's
//! [`crate::backend::StepClock`] (CUDA events on the GPU, wall time on the CPU) with its median
//! and 90th percentile, and on a device the peak device memory
//! ([`DeviceStats::peak_memory`]).
//!
//! On a device the report also holds the *floor* of a sparse step: the bytes of the weights an
//! all-on sparse step must read ([`active_weight_params`], the rule is in
//! [`FLOOR_RULE`]) divided by the device-to-device copy bandwidth measured in the same process
//! (read + write bytes per second, as `benches/kernels.rs` counts it), and the ratio of the
//! all-on sparse step's median to it.

use crate::backend::DeviceStats;
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::exec::{self, Resident};
use crate::model::{Model, Product};
use crate::plan::StepPlan;
use crate::sampler::{self, Execution, Generation, Mode, RunOptions, Switches, Task};
use serde::Serialize;
use std::time::Instant;

pub mod batch;
#[cfg(feature = "cli")]
mod plot;
pub use batch::{BatchReport, BatchRun, BatchSpec, run_batch_bench};
#[cfg(feature = "cli")]
pub use plot::{LOG_Y_RATIO, plot_batch_svg, plot_steps_svg};

/// Bytes of the copy that measures the bandwidth for the floor (halved until two buffers of
/// it take at most a quarter of the free device memory, down to [`MIN_COPY_BYTES`]).
pub const COPY_BYTES: usize = 1 << 30;
/// The smallest copy worth timing; below it the floor is not computed.
pub const MIN_COPY_BYTES: usize = 64 << 20;

/// How [`active_weight_params`] counts, for the report.
pub const FLOOR_RULE: &str = "floor_step_s = active weight bytes of one all-on sparse step ÷ \
    measured copy bandwidth (a device-to-device copy of copy_bytes, 1 GiB unless less memory is \
    free, read + write bytes per second, in the same process). Active weights: every layer of the response branch (attn_norm, q, k, v, o, \
    ffn_norm, gate, up, down) plus its final_norm and head; the other branch only when the step \
    feeds its rows (text rows in t2i exist only when the prompt is not cached, and then only \
    its joint layers compute them; a text answer feeds no image rows), so with the prompt \
    cached a t2i step touches image weights only. Embedding tables (gathered by row), the K/V \
    pool and activations are not counted.";

/// How `bf16_peak_flops_per_s` and `dense_gemm_flops_per_s` are measured (in the report).
pub const GEMM_RULE: &str = "bf16_peak_flops_per_s = 2·8192³ ÷ the time of one 8192³ bf16 \
    product through the backend's own cuBLASLt path (f32 accumulation, bf16 out; 10 products \
    back to back between two CUDA events, after 2 untimed). dense_gemm_flops_per_s = the FLOPs \
    of one dense step's matrix products (per computed layer and branch q, k, v, o, gate, up, \
    down, plus the head over the logits rows; 2·m·n·k each) ÷ their time, each distinct \
    product (shape, output type, residual add) timed alone the same way (20 back to back, \
    random bf16 inputs) and weighted by how often the step runs it. \
    dense_gemm_fraction_of_peak is their ratio.";

/// Side of the square product that measures the card's bf16 rate.
const PEAK_GEMM: usize = 8192;

/// The distinct matrix products of one forward pass over `plan` (those of
/// [`crate::model::products`] with rows: shape, output kind and residual add), each with how
/// many times the pass runs it, in order of first use.
pub fn distinct_products(cfg: &Config, plan: &StepPlan, prune: bool) -> Vec<(Product, usize)> {
    let mut distinct: Vec<(Product, usize)> = Vec::new();
    for p in crate::model::products(cfg, plan, prune) {
        if p.m == 0 {
            continue;
        }
        match distinct.iter_mut().find(|(q, _)| *q == p) {
            Some((_, c)) => *c += 1,
            None => distinct.push((p, 1)),
        }
    }
    distinct
}

/// FLOPs of `products` (`2·m·n·k` each, times its count).
pub fn products_flops(products: &[(Product, usize)]) -> f64 {
    products
        .iter()
        .map(|&(p, c)| 2.0 * p.m as f64 * p.n as f64 * p.k as f64 * c as f64)
        .sum()
}

/// The card's bf16 product rate and the rate of one dense step's products (see [`GEMM_RULE`]),
/// FLOP/s.
fn measure_gemms(stats: &dyn DeviceStats, cfg: &Config, task: &Task) -> Result<(f64, f64)> {
    let p = PEAK_GEMM;
    let square = Product {
        m: p,
        n: p,
        k: p,
        out: crate::backend::MatrixKind::Activation,
        accumulate: false,
    };
    let peak = 2.0 * (p as f64).powi(3) / stats.gemm_seconds(&square, 10)?;
    let program = sampler::program(cfg, task, Mode::Dense)?;
    let plan = &program
        .steps
        .first()
        .ok_or_else(|| Error::Input("the dense run has no step".into()))?
        .plan;
    // Each distinct product timed once, counted as often as the step runs it.
    // The CUDA backend takes every row through every layer.
    let distinct = distinct_products(cfg, plan, false);
    let mut seconds = 0.0;
    for (prod, c) in &distinct {
        seconds += *c as f64 * stats.gemm_seconds(prod, 20)?;
    }
    let flops = products_flops(&distinct);
    Ok((peak, flops / seconds))
}

/// One measured generation.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    /// `dense` or `sparse`.
    pub mode: String,
    /// Switches (all false for dense).
    pub cache_prompt: bool,
    /// See [`Switches::cache_decoded`].
    pub cache_decoded: bool,
    /// See [`Switches::truncate`].
    pub truncate: bool,
    /// How it ran: `eager` (the host loop), `queued` or `graphs` (device-resident).
    pub execution: Execution,
    /// Best wall time over the repeats, seconds (setup included).
    pub wall_s: f64,
    /// Of `wall_s`, host seconds before the first step could start (device-resident runs:
    /// plan uploads, graph capture and instantiation; 0 for the host loop).
    pub setup_s: f64,
    /// `wall_s − setup_s`: the generation itself.
    pub run_s: f64,
    /// Forward passes.
    pub forwards: usize,
    /// Mean rows fed per step (prefill included in the total).
    pub mean_rows: f64,
    /// Rows fed over the generation.
    pub rows_fed: usize,
    /// Median per-step latency of the best repeat, seconds.
    pub step_median_s: f64,
    /// 90th percentile (nearest rank) of the per-step latency of the best repeat, seconds.
    pub step_p90_s: f64,
    /// Every step's latency of the best repeat, seconds, in step order (the prefill of a
    /// cached prompt is not a step: it is in `wall_s` only).
    pub step_s: Vec<f64>,
    /// Most device memory in use at once during the run's repeats (weights included), bytes;
    /// null on the CPU (the host has no such watermark).
    pub peak_device_bytes: Option<u64>,
    /// Whether this run's tokens equal the all-on sparse run's; null for the dense run, whose
    /// attention rule (full bidirectional, SPEC §3) differs, so equal tokens are not expected.
    pub tokens_match_sparse: Option<bool>,
    /// The generated response ids, in position order (as `generate --out` writes them): two
    /// runs of one workload on different executions or machines can be compared exactly.
    pub tokens: Vec<u32>,
    /// The rate of the run's matrix products inside its steps, FLOP/s: their FLOPs over the
    /// time spent in them ([`crate::backend::Backend::product_time`]); null on a backend
    /// without that count (CUDA, whose products are asynchronous).
    pub product_flops_per_s: Option<f64>,
}

impl BenchRun {
    /// Whether this is the sparse run with every saving on.
    pub fn is_sparse_all_on(&self) -> bool {
        self.mode == "sparse" && self.cache_prompt && self.cache_decoded && self.truncate
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Backend name.
    pub backend: String,
    /// The card (`NVIDIA H100 80GB HBM3`) on a device backend, `cpu` on the CPU backend.
    pub device: String,
    /// The GPU driver (`570.133.20 (CUDA 12.8)`); null on the CPU backend.
    pub driver: Option<String>,
    /// The model: a preset name or the config file's path.
    pub preset: String,
    /// The host machine (CPU model and threads).
    pub machine: String,
    /// Free-form description of the workload.
    pub workload: String,
    /// What timed each step: `cuda events` or `wall`.
    pub step_clock: String,
    /// Every run, dense first.
    pub runs: Vec<BenchRun>,
    /// Dense wall time ÷ all-on sparse wall time (setup included).
    pub speedup_sparse_vs_dense: f64,
    /// Dense `run_s` ÷ all-on sparse `run_s`: the same without the one-time setup (graph
    /// capture), which a server replaying a captured shape would not pay per request.
    pub speedup_run_sparse_vs_dense: f64,
    /// Dense median step ÷ all-on sparse median step.
    pub speedup_step_median_sparse_vs_dense: f64,
    /// How the peak device memory is measured; null on the CPU backend.
    pub memory_source: Option<String>,
    /// Device memory in use before the runs (weights, workspaces), bytes; null on the CPU.
    pub resident_device_bytes: Option<u64>,
    /// Measured device-to-device copy bandwidth, bytes read + written per second; null on the
    /// CPU backend or when too little memory was free to measure it.
    pub copy_bandwidth_bytes_per_s: Option<f64>,
    /// Bytes of the copy that measured `copy_bandwidth_bytes_per_s`.
    pub copy_bytes: Option<usize>,
    /// How the floor is computed.
    pub floor_rule: String,
    /// Weight parameters an all-on sparse step reads ([`active_weight_params`]).
    pub active_weight_params: u64,
    /// `active_weight_params` × the device's bytes per parameter; null on the CPU backend.
    pub active_weight_bytes: Option<u64>,
    /// Active weight bytes ÷ copy bandwidth, seconds; null without a measured bandwidth.
    pub floor_step_s: Option<f64>,
    /// All-on sparse median step ÷ `floor_step_s`.
    pub sparse_step_over_floor: Option<f64>,
    /// How the two GEMM rates are measured ([`GEMM_RULE`]).
    pub gemm_rule: String,
    /// The card's bf16 product rate measured in this process, FLOP/s; null on the CPU.
    pub bf16_peak_flops_per_s: Option<f64>,
    /// The rate of one dense step's matrix products, FLOP/s; null on the CPU.
    pub dense_gemm_flops_per_s: Option<f64>,
    /// `dense_gemm_flops_per_s ÷ bf16_peak_flops_per_s`: how strong the dense baseline is.
    pub dense_gemm_fraction_of_peak: Option<f64>,
    /// On the CPU backend, the machine's f32 sgemm rate: a 1024³ product through
    /// `matrixmultiply` (`ops::matmul_t`), best of 3, FLOP/s; the runs'
    /// `product_flops_per_s` compare with it. Null elsewhere.
    pub cpu_sgemm_flops_per_s: Option<f64>,
    /// The PyTorch peer's report (`--peer-json`), embedded as is; null without one.
    pub peer: Option<serde_json::Value>,
    /// With a peer report: this run against the peer's run of the same task and mode (dense,
    /// and the all-on sparse run against the peer's sparse), see [`PeerComparison`].
    pub vs_peer: Vec<PeerComparison>,
}

impl BenchReport {
    /// The dense run.
    pub fn dense(&self) -> Option<&BenchRun> {
        self.runs.iter().find(|r| r.mode == "dense")
    }

    /// The all-on sparse run.
    pub fn sparse_all_on(&self) -> Option<&BenchRun> {
        self.runs.iter().find(|r| r.is_sparse_all_on())
    }
}

/// What to run: the workload's description, the model's name, and how much.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Free-form description of the workload.
    pub workload: String,
    /// The model: a preset name or the config file's path.
    pub preset: String,
    /// Run all eight sparse switch combinations (else dense and all-on sparse).
    pub ablation: bool,
    /// Repeats per mode; the best wall time's repeat is kept.
    pub repeat: usize,
    /// How each generation runs ([`Execution::Graphs`] unless asked otherwise; the CPU backend
    /// always runs the host loop).
    pub execution: Execution,
}

/// Median of `v` (mean of the two middle values for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// The `p`-th percentile (0 < p ≤ 100) of `v` by nearest rank: the smallest value with at least
/// `p`% of the values at or below it; 0 for none.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Parameters of one layer of branch `b` (norms, attention projections, SwiGLU).
fn layer_params(cfg: &Config, b: Branch) -> u64 {
    let (d, f) = (cfg.d_model(b) as u64, cfg.d_mlp(b) as u64);
    let (a, kv) = (cfg.attn_dim() as u64, cfg.kv_dim() as u64);
    2 * d + a * d + 2 * kv * d + d * a + 3 * f * d
}

/// Weight parameters a step reads (see [`FLOOR_RULE`]): every layer of the `response` branch
/// plus its final norm and head, and, when `text_rows_fed` with an image response, the text
/// branch's joint layers (the only ones that compute text rows during text-to-image).
pub fn active_weight_params(cfg: &Config, response: Branch, text_rows_fed: bool) -> u64 {
    let d = cfg.d_model(response) as u64;
    let mut n =
        cfg.n_layers as u64 * layer_params(cfg, response) + d + cfg.vocab(response) as u64 * d;
    if response == Branch::Image && text_rows_fed {
        n += cfg.n_joint_layers as u64 * layer_params(cfg, Branch::Text);
    }
    n
}

/// The response branch of `task` and whether a sparse step under `sw` feeds text rows besides
/// it (t2i with a non-empty prompt that is not cached).
pub fn step_branches(task: &Task, sw: Switches) -> (Branch, bool) {
    match task {
        Task::T2i(r) => (Branch::Image, !sw.cache_prompt && !r.prompt.is_empty()),
        Task::Text(_) => (Branch::Text, false),
    }
}

struct Measured {
    g: Generation,
    wall_s: f64,
    peak: Option<u64>,
    /// The best run's product rate ([`BenchRun::product_flops_per_s`]).
    products: Option<f64>,
}

fn measure<B: Resident>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    spec: &BenchSpec,
    progress: &mut dyn FnMut(Mode, usize, usize),
) -> Result<Measured> {
    let stats = model.backend().device_stats();
    if let Some(s) = stats {
        s.reset_peak_memory()?;
    }
    let mut best: Option<(Generation, Option<f64>)> = None;
    for _ in 0..spec.repeat.max(1) {
        let mut tick = |done, total| progress(mode, done, total);
        let opts = RunOptions {
            progress: Some(&mut tick),
            ..RunOptions::default()
        };
        let before = model.backend().product_time();
        let g = exec::generate_with(model, task, mode, spec.execution, opts)?;
        let after = model.backend().product_time();
        let products = after.zip(before).and_then(|(a, b)| a.rate_since(&b));
        if best.as_ref().is_none_or(|(b, _)| g.wall_s < b.wall_s) {
            best = Some((g, products));
        }
    }
    let (g, products) = best.expect("at least one repeat");
    let peak = match stats {
        Some(s) => s.peak_memory()?,
        None => None,
    };
    Ok(Measured {
        wall_s: g.wall_s,
        g,
        peak,
        products,
    })
}

/// Measures the copy bandwidth with the largest copy up to [`COPY_BYTES`] whose two buffers
/// take at most a quarter of the free memory; `None` when even [`MIN_COPY_BYTES`] does not fit.
fn measure_copy(stats: &dyn DeviceStats) -> Result<Option<(f64, usize)>> {
    let free = stats.free_memory()?;
    let mut bytes = COPY_BYTES;
    while bytes >= MIN_COPY_BYTES {
        if 2 * bytes <= free / 4 {
            return Ok(Some((stats.copy_bandwidth(bytes)?, bytes)));
        }
        bytes /= 2;
    }
    Ok(None)
}

/// Runs dense, then sparse with all savings (and, with `ablation`, the other seven switch
/// combinations), each `repeat` times keeping the best wall time. On a device backend it first
/// measures the copy bandwidth, and reads the peak device memory of each run. `on_run` sees
/// each run as it finishes, with the generation of its best repeat; `progress` sees each
/// generation's steps as they finish (mode, steps done, steps in total). The report's `peer` is
/// left null.
pub fn run_bench<B: Resident>(
    model: &Model<B>,
    task: &Task,
    spec: &BenchSpec,
    mut on_run: impl FnMut(&BenchRun, &Generation),
    mut progress: impl FnMut(Mode, usize, usize),
) -> Result<BenchReport> {
    let be = model.backend();
    let stats = be.device_stats();
    let step_clock = be.step_clock()?.kind().to_string();
    // The ceilings (copy bandwidth, bf16 GEMM rate) of an emulated device would measure the
    // host, and its 8192³ product alone takes minutes: skipped, reported as null.
    let ceilings = stats.filter(|s| !s.emulated());
    let copy = match ceilings {
        Some(s) => measure_copy(s)?,
        None => None,
    };
    let gemms = match ceilings {
        Some(s) => Some(measure_gemms(s, model.config(), task)?),
        None => None,
    };
    let resident = match stats {
        Some(s) => s.reset_peak_memory()?,
        None => None,
    };
    let modes = if spec.ablation {
        Mode::all()
    } else {
        vec![Mode::Dense, Mode::Sparse(Switches::ALL_ON)]
    };
    let mut runs = Vec::new();
    let mut reference: Option<Vec<u32>> = None;
    for mode in modes {
        let m = measure(model, task, mode, spec, &mut progress)?;
        let (name, sw, matches) = match mode {
            Mode::Dense => (
                "dense",
                Switches {
                    cache_prompt: false,
                    cache_decoded: false,
                    truncate: false,
                },
                None,
            ),
            Mode::Sparse(sw) => {
                let r = reference.get_or_insert_with(|| m.g.tokens.clone());
                ("sparse", sw, Some(*r == m.g.tokens))
            }
        };
        let step_s: Vec<f64> = m.g.steps.iter().map(|s| s.time_s).collect();
        let run = BenchRun {
            mode: name.into(),
            cache_prompt: sw.cache_prompt,
            cache_decoded: sw.cache_decoded,
            truncate: sw.truncate,
            execution: m.g.execution,
            wall_s: m.wall_s,
            setup_s: m.g.setup_s,
            run_s: m.wall_s - m.g.setup_s,
            forwards: m.g.forwards,
            mean_rows: m.g.mean_rows(),
            rows_fed: m.g.rows_fed,
            step_median_s: median(&step_s),
            step_p90_s: percentile(&step_s, 90.0),
            step_s,
            peak_device_bytes: m.peak,
            tokens_match_sparse: matches,
            tokens: m.g.tokens.clone(),
            product_flops_per_s: m.products,
        };
        on_run(&run, &m.g);
        runs.push(run);
    }
    let dense = &runs[0];
    let sparse = runs
        .iter()
        .find(|r| r.is_sparse_all_on())
        .expect("all-on sparse run");
    let (response, text_rows) = step_branches(task, Switches::ALL_ON);
    let params = active_weight_params(model.config(), response, text_rows);
    let active_bytes = stats.map(|s| params * s.weight_bytes_per_param() as u64);
    let floor = match (active_bytes, copy) {
        (Some(b), Some((bw, _))) => Some(b as f64 / bw),
        _ => None,
    };
    Ok(BenchReport {
        backend: be.name(),
        device: stats.map_or("cpu".into(), |s| s.device_name()),
        driver: stats.and_then(|s| s.driver_version()),
        preset: spec.preset.clone(),
        machine: crate::runtime::cpu_description(),
        workload: spec.workload.clone(),
        step_clock,
        speedup_sparse_vs_dense: dense.wall_s / sparse.wall_s,
        speedup_run_sparse_vs_dense: dense.run_s / sparse.run_s,
        speedup_step_median_sparse_vs_dense: dense.step_median_s / sparse.step_median_s,
        memory_source: stats.map(|s| s.memory_source()),
        resident_device_bytes: resident,
        copy_bandwidth_bytes_per_s: copy.map(|(bw, _)| bw),
        copy_bytes: copy.map(|(_, b)| b),
        floor_rule: FLOOR_RULE.into(),
        active_weight_params: params,
        active_weight_bytes: active_bytes,
        sparse_step_over_floor: floor.map(|f| sparse.step_median_s / f),
        floor_step_s: floor,
        runs,
        gemm_rule: GEMM_RULE.into(),
        bf16_peak_flops_per_s: gemms.map(|g| g.0),
        dense_gemm_flops_per_s: gemms.map(|g| g.1),
        dense_gemm_fraction_of_peak: gemms.map(|(peak, dense)| dense / peak),
        cpu_sgemm_flops_per_s: be.product_time().map(|_| cpu_sgemm_rate()).transpose()?,
        peer: None,
        vs_peer: Vec::new(),
    })
}

/// The host's f32 sgemm rate: a 1024³ product through `matrixmultiply` on the rayon pool, best
/// of 3, FLOP/s.
fn cpu_sgemm_rate() -> Result<f64> {
    const N: usize = 1024;
    let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
    let mut c = vec![0.0f32; N * N];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        crate::backend::cpu::ops::matmul_t(&a, N, N, &a, N, &mut c, false)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (N * N * N) as f64 / best)
}

/// One mode of the crate against the same task and mode of the PyTorch peer (`--peer-json`).
#[derive(Debug, Clone, Serialize)]
pub struct PeerComparison {
    /// `t2i` or `text`.
    pub task: String,
    /// `dense` or `sparse` (the crate's all-on sparse run).
    pub mode: String,
    /// The crate's best wall time, seconds.
    pub crate_wall_s: f64,
    /// The peer's wall time (its report's `wall_s`: the median of its timed runs), seconds.
    pub peer_wall_s: f64,
    /// The peer's best timed run, seconds (its `walls_s`), when it reports them.
    pub peer_best_wall_s: Option<f64>,
    /// `peer_best_wall_s` (or `peer_wall_s`) over `crate_wall_s`: above 1, the crate is faster.
    pub crate_speedup: f64,
}

/// Matches the crate's dense and all-on sparse runs of `task` (`t2i` / `text`) with the peer
/// report's runs (`runs[].task`, `.mode`, `.wall_s`, `.walls_s`); modes the peer did not run
/// are left out. Best against best: the crate keeps its best repeat, so the peer's best timed
/// run is used when it lists them.
pub fn compare_with_peer(
    runs: &[BenchRun],
    task: &str,
    peer: &serde_json::Value,
) -> Vec<PeerComparison> {
    let peer_runs = peer["runs"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for mode in ["dense", "sparse"] {
        let ours = runs
            .iter()
            .find(|r| r.mode == mode && (mode == "dense" || r.is_sparse_all_on()));
        let theirs = peer_runs
            .iter()
            .find(|r| r["task"].as_str() == Some(task) && r["mode"].as_str() == Some(mode));
        let (Some(ours), Some(theirs)) = (ours, theirs) else {
            continue;
        };
        let Some(peer_wall_s) = theirs["wall_s"].as_f64() else {
            continue;
        };
        let peer_best_wall_s = theirs["walls_s"]
            .as_array()
            .and_then(|w| w.iter().filter_map(|x| x.as_f64()).reduce(f64::min));
        out.push(PeerComparison {
            task: task.into(),
            mode: mode.into(),
            crate_wall_s: ours.wall_s,
            peer_wall_s,
            peer_best_wall_s,
            crate_speedup: peer_best_wall_s.unwrap_or(peer_wall_s) / ours.wall_s,
        });
    }
    out
}

/// Formats one run as a table row (see [`table_header`]).
pub fn table_row(r: &BenchRun, dense_wall_s: f64) -> String {
    let sw = |b: bool| if b { "on" } else { "off" };
    let (p, d, t) = if r.mode == "dense" {
        ("-", "-", "-")
    } else {
        (sw(r.cache_prompt), sw(r.cache_decoded), sw(r.truncate))
    };
    format!(
        "{:<7} {:>6} {:>6} {:>6} {:>9} {:>11.1} {:>10.3} {:>8.2}x {:>10.3} {:>10.3}",
        r.mode,
        p,
        d,
        t,
        r.forwards,
        r.mean_rows,
        r.wall_s,
        dense_wall_s / r.wall_s,
        r.step_median_s * 1e3,
        r.step_p90_s * 1e3
    )
}

/// The table's header line.
pub fn table_header() -> String {
    format!(
        "{:<7} {:>6} {:>6} {:>6} {:>9} {:>11} {:>10} {:>9} {:>10} {:>10}",
        "mode",
        "prompt",
        "decod",
        "trunc",
        "forwards",
        "rows/step",
        "wall_s",
        "speedup",
        "step_ms",
        "p90_ms"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&v, 1.0), 1.0);
        assert_eq!(percentile(&[5.0], 90.0), 5.0);
        assert_eq!(percentile(&[], 90.0), 0.0);
    }

    /// The floor's parameter count against the config's own tensor list: the response
    /// branch's layer tensors plus its final norm and head, nothing of the other branch unless
    /// its rows are fed.
    #[test]
    fn active_weights_follow_the_rule() {
        for preset in ["tiny", "small", "lavida-o"] {
            let cfg = Config::preset(preset).unwrap();
            let count = |pred: &dyn Fn(&str) -> bool| -> u64 {
                cfg.tensor_shapes()
                    .iter()
                    .filter(|(n, _)| pred(n))
                    .map(|(_, s)| s.iter().product::<usize>() as u64)
                    .sum()
            };
            let layer_of = |n: &str| -> Option<(usize, String)> {
                let rest = n.strip_prefix("layers.")?;
                let (i, rest) = rest.split_once('.')?;
                Some((i.parse().ok()?, rest.split('.').next()?.to_string()))
            };
            for b in Branch::ALL {
                let own = count(&|n| {
                    layer_of(n).is_some_and(|(_, br)| br == b.name())
                        || n == format!("{}.final_norm", b.name())
                        || n == format!("{}.head", b.name())
                });
                assert_eq!(active_weight_params(&cfg, b, false), own, "{preset} {b:?}");
            }
            let joint_text = count(&|n| {
                layer_of(n).is_some_and(|(i, br)| br == "text" && i < cfg.n_joint_layers)
            });
            assert_eq!(
                active_weight_params(&cfg, Branch::Image, true),
                active_weight_params(&cfg, Branch::Image, false) + joint_text
            );
            assert_eq!(
                active_weight_params(&cfg, Branch::Text, true),
                active_weight_params(&cfg, Branch::Text, false)
            );
        }
        // lavida-o's image branch: 32 layers of 2·2048 + 2·4096·2048 + 2·4096·2048 + 3·8192·2048
        // parameters, plus 2048 + 8192·2048: about 2.70 B (5.4 GB in bf16).
        let cfg = Config::preset("lavida-o").unwrap();
        let n = active_weight_params(&cfg, Branch::Image, false);
        assert_eq!(
            n,
            32 * (2 * 2048 + 4 * 4096 * 2048 + 3 * 8192 * 2048) + 2048 + 8192 * 2048
        );
    }

    #[test]
    fn text_rows_are_fed_only_without_a_cached_prompt_in_t2i() {
        use crate::sampler::{T2iRequest, TextRequest};
        use crate::schedule::Order;
        let t2i = |prompt: Vec<u32>| {
            Task::T2i(T2iRequest {
                prompt,
                height: 4,
                width: 4,
                steps: 4,
                guidance: 0.0,
                temperature: 0.0,
                order: Order::Raster,
                seed: 0,
            })
        };
        let off = Switches {
            cache_prompt: false,
            ..Switches::ALL_ON
        };
        assert_eq!(
            step_branches(&t2i(vec![1]), Switches::ALL_ON),
            (Branch::Image, false)
        );
        assert_eq!(step_branches(&t2i(vec![1]), off), (Branch::Image, true));
        assert_eq!(step_branches(&t2i(vec![]), off), (Branch::Image, false));
        let text = Task::Text(TextRequest {
            prompt: vec![1],
            answer_len: 4,
            block_len: 4,
            steps: 2,
            temperature: 0.0,
            banned: vec![],
            seed: 0,
        });
        assert_eq!(step_branches(&text, off), (Branch::Text, false));
    }
}

//! `bench --batch 1,2,4,...`: throughput against batch size (SPEC §8, batches). For each batch
//! size `B` the workload's request is run as `B` requests (seeds `seed + i`, as `generate
//! --batch`), dense and all-on sparse (with `--ablation`, every switch combination), each
//! `repeat` times keeping the best wall time, in one process on the same weights. Per run:
//! images (t2i) or answer tokens (text) per second, the batch's wall time (every request of a
//! batch finishes with it: its per-request latency), the per-step latency of the batch's
//! passes, and the peak memory (on a device its stream-ordered pool's high watermark; on the
//! host the process's peak resident set, [`crate::memory::PeakRss`]).

use serde::Serialize;

use super::{median, percentile};
use crate::backend::DeviceStats;
use crate::error::{Error, Result};
use crate::exec::{self, Resident};
use crate::memory::PeakRss;
use crate::model::Model;
use crate::sampler::{Execution, Generation, Mode, Request, RunOptions, Switches, Task};

/// One measured batch: `batch` requests in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct BatchRun {
    /// Requests in the batch.
    pub batch: usize,
    /// `dense` or `sparse`.
    pub mode: String,
    /// Switches (all false for dense).
    pub cache_prompt: bool,
    /// See [`Switches::cache_decoded`].
    pub cache_decoded: bool,
    /// See [`Switches::truncate`].
    pub truncate: bool,
    /// How it ran.
    pub execution: Execution,
    /// Best wall time of the whole batch over the repeats, seconds (setup included): every
    /// request's latency.
    pub wall_s: f64,
    /// Of `wall_s`, host seconds before the first step could start (plan uploads, graph
    /// capture; 0 for the host loop).
    pub setup_s: f64,
    /// `wall_s − setup_s`.
    pub run_s: f64,
    /// Images (t2i: one per request) or answer tokens (text) the batch produces.
    pub items: usize,
    /// `items / wall_s`: images or tokens per second.
    pub items_per_s: f64,
    /// `items / run_s`: the same without the one-time setup.
    pub items_per_s_run: f64,
    /// Forward passes of the batch (prefill included).
    pub forwards: usize,
    /// Rows fed per pass, all requests together (prefill rows included in the total).
    pub mean_rows: f64,
    /// Median latency of the batch's steps, seconds.
    pub step_median_s: f64,
    /// 90th percentile (nearest rank) of the step latency, seconds.
    pub step_p90_s: f64,
    /// Every step's latency, seconds.
    pub step_s: Vec<f64>,
    /// Most device memory in use at once during the repeats (weights included), bytes; null
    /// on the CPU.
    pub peak_device_bytes: Option<u64>,
    /// The process's peak resident set during the repeats (weights included), bytes; null
    /// where the host cannot tell.
    pub peak_host_bytes: Option<u64>,
    /// Whether request 0 (the same seed in every batch) chose the tokens it chose in the batch
    /// of one of this mode; null without a batch of one in the sweep.
    pub first_matches_batch1: Option<bool>,
}

/// The best batch of one mode against its batch of one.
#[derive(Debug, Clone, Serialize)]
pub struct BatchBest {
    /// `dense`, `sparse` or the switches of an ablation run (`sparse[PD-]`).
    pub mode: String,
    /// The batch size with the most items per second.
    pub batch: usize,
    /// Its items per second.
    pub items_per_s: f64,
    /// Its items per second over the batch of one's; null without a batch of one.
    pub throughput_vs_batch1: Option<f64>,
    /// Its per-request latency (wall time) over the batch of one's; null without one.
    pub latency_vs_batch1: Option<f64>,
}

/// The report of `bench --batch`.
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    /// Backend name.
    pub backend: String,
    /// The card on a device backend, `cpu` on the CPU backend.
    pub device: String,
    /// The GPU driver; null on the CPU backend.
    pub driver: Option<String>,
    /// The model: a preset name or the config file's path.
    pub preset: String,
    /// The host machine (CPU model and threads).
    pub machine: String,
    /// The workload of one request.
    pub workload: String,
    /// What timed each step: `cuda events` or `wall`.
    pub step_clock: String,
    /// What `items` counts: `images` or `tokens`.
    pub items: String,
    /// The host's load average (1, 5, 15 minutes) before the first run and after the last
    /// (other processes compete for the cores); null where it cannot be read.
    pub load_before: Option<[f64; 3]>,
    /// See `load_before`.
    pub load_after: Option<[f64; 3]>,
    /// How `peak_device_bytes` is measured; null on the CPU.
    pub memory_source: Option<String>,
    /// How `peak_host_bytes` is measured.
    pub host_memory_source: String,
    /// Every run: per batch size (in the order asked), dense then sparse.
    pub runs: Vec<BatchRun>,
    /// Per mode, the batch with the most items per second.
    pub best: Vec<BatchBest>,
}

impl BatchReport {
    /// The runs of `mode` (`dense`, `sparse`, ...), in batch order.
    pub fn series(&self, mode: &str) -> Vec<&BatchRun> {
        self.runs.iter().filter(|r| run_name(r) == mode).collect()
    }
}

/// A run's mode as reported in [`BatchBest::mode`].
fn run_name(r: &BatchRun) -> String {
    if r.mode == "dense" {
        return "dense".into();
    }
    let sw = Switches {
        cache_prompt: r.cache_prompt,
        cache_decoded: r.cache_decoded,
        truncate: r.truncate,
    };
    if sw == Switches::ALL_ON {
        "sparse".into()
    } else {
        Mode::Sparse(sw).to_string()
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    /// The workload of one request.
    pub workload: String,
    /// The model: a preset name or the config file's path.
    pub preset: String,
    /// Batch sizes, in the order to run them.
    pub batches: Vec<usize>,
    /// Every switch combination, not only dense and all-on sparse.
    pub ablation: bool,
    /// Repeats per batch and mode; the best wall time's repeat is kept.
    pub repeat: usize,
    /// How each generation runs.
    pub execution: Execution,
}

/// The host's load average, from `/proc/loadavg`.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Images (t2i) or answer tokens (text) of a batch.
fn items(requests: &[Request]) -> usize {
    (requests.iter())
        .map(|r| match r {
            Task::T2i(_) => 1,
            Task::Text(t) => t.answer_len,
        })
        .sum()
}

/// Runs the sweep: for each batch size of `spec`, the requests `requests(b)` in dense and
/// all-on sparse mode (every combination with `ablation`). `on_run` sees each run as it
/// finishes; `progress` each generation's steps (batch, mode, done, total).
pub fn run_batch_bench<B: Resident>(
    model: &Model<B>,
    requests: &dyn Fn(usize) -> Result<Vec<Request>>,
    spec: &BatchSpec,
    mut on_run: impl FnMut(&BatchRun),
    mut progress: impl FnMut(usize, Mode, usize, usize),
) -> Result<BatchReport> {
    if spec.batches.is_empty() || spec.batches.contains(&0) {
        return Err(Error::Input(
            "bench --batch: give batch sizes of at least 1".into(),
        ));
    }
    let be = model.backend();
    let stats = be.device_stats();
    let step_clock = be.step_clock()?.kind().to_string();
    let load_before = load_average();
    let modes = if spec.ablation {
        Mode::all()
    } else {
        vec![Mode::Dense, Mode::Sparse(Switches::ALL_ON)]
    };
    let mut runs: Vec<BatchRun> = Vec::new();
    // Request 0's tokens of every run, and of the batches of one per mode.
    let mut first_tokens: Vec<Vec<u32>> = Vec::new();
    let mut batch1: Vec<(String, Vec<u32>)> = Vec::new();
    let mut kind = "images";
    for &b in &spec.batches {
        let reqs = requests(b)?;
        if let Some(Task::Text(_)) = reqs.first() {
            kind = "tokens";
        }
        for &mode in &modes {
            if let Some(s) = stats {
                s.reset_peak_memory()?;
            }
            let rss = PeakRss::reset();
            let mut best: Option<Vec<Generation>> = None;
            for _ in 0..spec.repeat.max(1) {
                let mut tick = |done, total| progress(b, mode, done, total);
                let opts = RunOptions {
                    progress: Some(&mut tick),
                    ..RunOptions::default()
                };
                let gs = exec::generate_batch_with(model, &reqs, mode, spec.execution, opts)?;
                if best.as_ref().is_none_or(|x| gs[0].wall_s < x[0].wall_s) {
                    best = Some(gs);
                }
            }
            let gs = best.expect("at least one repeat");
            let peak_device_bytes = match stats {
                Some(s) => s.peak_memory()?,
                None => None,
            };
            let peak_host_bytes = rss.peak();
            let longest = (gs.iter())
                .max_by_key(|g| g.steps.len())
                .expect("a batch has a request");
            let step_s: Vec<f64> = longest.steps.iter().map(|s| s.time_s).collect();
            let (wall_s, setup_s) = (gs[0].wall_s, gs[0].setup_s);
            let prefill = usize::from(gs.iter().any(|g| g.forwards > g.steps.len()));
            let forwards = longest.steps.len() + prefill;
            let rows: usize = gs.iter().map(|g| g.rows_fed).sum();
            let n_items = items(&reqs);
            let sw = match mode {
                Mode::Dense => Switches {
                    cache_prompt: false,
                    cache_decoded: false,
                    truncate: false,
                },
                Mode::Sparse(sw) => sw,
            };
            let name = if mode == Mode::Dense {
                "dense"
            } else {
                "sparse"
            };
            let mut run = BatchRun {
                batch: b,
                mode: name.into(),
                cache_prompt: sw.cache_prompt,
                cache_decoded: sw.cache_decoded,
                truncate: sw.truncate,
                execution: gs[0].execution,
                wall_s,
                setup_s,
                run_s: wall_s - setup_s,
                items: n_items,
                items_per_s: n_items as f64 / wall_s,
                items_per_s_run: n_items as f64 / (wall_s - setup_s),
                forwards,
                mean_rows: rows as f64 / step_s.len().max(1) as f64,
                step_median_s: median(&step_s),
                step_p90_s: percentile(&step_s, 90.0),
                step_s,
                peak_device_bytes,
                peak_host_bytes,
                first_matches_batch1: None,
            };
            let key = run_name(&run);
            if b == 1 {
                batch1.push((key.clone(), gs[0].tokens.clone()));
            }
            run.first_matches_batch1 = (batch1.iter())
                .find(|(m, _)| *m == key)
                .map(|(_, t)| *t == gs[0].tokens);
            on_run(&run);
            first_tokens.push(gs[0].tokens.clone());
            runs.push(run);
        }
    }
    // A batch of one measured after others still answers for them.
    for (run, tokens) in runs.iter_mut().zip(&first_tokens) {
        let key = run_name(run);
        run.first_matches_batch1 = (batch1.iter())
            .find(|(m, _)| *m == key)
            .map(|(_, t)| t == tokens);
    }
    let mut best = Vec::new();
    for mode in &modes {
        let key = match mode {
            Mode::Dense => "dense".to_string(),
            Mode::Sparse(sw) if *sw == Switches::ALL_ON => "sparse".to_string(),
            m => m.to_string(),
        };
        let series: Vec<&BatchRun> = runs.iter().filter(|r| run_name(r) == key).collect();
        let Some(top) = series
            .iter()
            .max_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s))
        else {
            continue;
        };
        let one = series.iter().find(|r| r.batch == 1);
        best.push(BatchBest {
            mode: key,
            batch: top.batch,
            items_per_s: top.items_per_s,
            throughput_vs_batch1: one.map(|o| top.items_per_s / o.items_per_s),
            latency_vs_batch1: one.map(|o| top.wall_s / o.wall_s),
        });
    }
    Ok(BatchReport {
        backend: be.name(),
        device: stats.map_or("cpu".into(), |s: &dyn DeviceStats| s.device_name()),
        driver: stats.and_then(|s| s.driver_version()),
        preset: spec.preset.clone(),
        machine: crate::runtime::cpu_description(),
        workload: spec.workload.clone(),
        step_clock,
        items: kind.into(),
        load_before,
        load_after: load_average(),
        memory_source: stats.map(|s| s.memory_source()),
        host_memory_source: PeakRss::SOURCE.into(),
        runs,
        best,
    })
}

/// The table's header line for [`batch_table_row`].
pub fn batch_table_header(items: &str) -> String {
    format!(
        "{:>5} {:<7} {:>9} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "batch",
        "mode",
        "wall_s",
        format!("{items}/s"),
        "vs_b1",
        "step_ms",
        "p90_ms",
        "peak_MB"
    )
}

/// One run as a table row; `batch1`: the same mode's batch of one, when measured.
pub fn batch_table_row(r: &BatchRun, batch1: Option<&BatchRun>) -> String {
    let peak = r.peak_device_bytes.or(r.peak_host_bytes);
    format!(
        "{:>5} {:<7} {:>9.3} {:>12.2} {:>10} {:>10.3} {:>10.3} {:>10}",
        r.batch,
        run_name(r),
        r.wall_s,
        r.items_per_s,
        batch1.map_or("-".into(), |o| format!(
            "{:.2}x",
            r.items_per_s / o.items_per_s
        )),
        r.step_median_s * 1e3,
        r.step_p90_s * 1e3,
        peak.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6)),
    )
}

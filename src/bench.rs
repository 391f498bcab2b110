//! `bench`: dense vs sparse (and the eight-switch ablation) in one process, same weights and
//! schedule, reported as a table and as JSON.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::Model;
use crate::sampler::{self, Generation, Mode, RunOptions, Switches, Task};
use serde::Serialize;

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
    /// Best wall time over the repeats, seconds.
    pub wall_s: f64,
    /// Forward passes.
    pub forwards: usize,
    /// Mean rows fed per step (prefill included in the total).
    pub mean_rows: f64,
    /// Rows fed over the generation.
    pub rows_fed: usize,
    /// Whether this run's tokens equal the all-on sparse run's (sparse runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_match_sparse: Option<bool>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Backend name.
    pub backend: String,
    /// The machine (CPU model and threads; the card for a GPU backend).
    pub machine: String,
    /// Free-form description of the workload.
    pub workload: String,
    /// Every run, dense first.
    pub runs: Vec<BenchRun>,
    /// Dense wall time ÷ all-on sparse wall time.
    pub speedup_sparse_vs_dense: f64,
}

fn measure<B: Backend>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    repeat: usize,
) -> Result<(Generation, f64)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let g = sampler::generate(model, task, mode, RunOptions::default())?;
        best = best.min(g.wall_s);
        last = Some(g);
    }
    Ok((last.expect("at least one repeat"), best))
}

/// Runs dense, then sparse with all savings (and, with `ablation`, the other seven switch
/// combinations), each `repeat` times keeping the best wall time. `on_run` sees each run as it
/// finishes.
pub fn run_bench<B: Backend>(
    model: &Model<B>,
    task: &Task,
    workload: String,
    ablation: bool,
    repeat: usize,
    mut on_run: impl FnMut(&BenchRun),
) -> Result<BenchReport> {
    let mut modes = vec![Mode::Dense];
    if ablation {
        modes.extend(Switches::all_combinations().into_iter().map(Mode::Sparse));
    } else {
        modes.push(Mode::Sparse(Switches::ALL_ON));
    }
    let mut runs = Vec::new();
    let mut reference: Option<Vec<u32>> = None;
    for mode in modes {
        let (g, wall_s) = measure(model, task, mode, repeat)?;
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
                let r = reference.get_or_insert_with(|| g.tokens.clone());
                ("sparse", sw, Some(*r == g.tokens))
            }
        };
        let run = BenchRun {
            mode: name.into(),
            cache_prompt: sw.cache_prompt,
            cache_decoded: sw.cache_decoded,
            truncate: sw.truncate,
            wall_s,
            forwards: g.forwards,
            mean_rows: g.mean_rows(),
            rows_fed: g.rows_fed,
            tokens_match_sparse: matches,
        };
        on_run(&run);
        runs.push(run);
    }
    let dense = runs[0].wall_s;
    let sparse = runs
        .iter()
        .find(|r| r.mode == "sparse" && r.cache_prompt && r.cache_decoded && r.truncate)
        .expect("all-on sparse run")
        .wall_s;
    Ok(BenchReport {
        backend: model.backend().name(),
        machine: crate::runtime::cpu_description(),
        workload,
        runs,
        speedup_sparse_vs_dense: dense / sparse,
    })
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
        "{:<7} {:>6} {:>6} {:>6} {:>9} {:>11.1} {:>10.3} {:>8.2}x",
        r.mode,
        p,
        d,
        t,
        r.forwards,
        r.mean_rows,
        r.wall_s,
        dense_wall_s / r.wall_s
    )
}

/// The table's header line.
pub fn table_header() -> String {
    format!(
        "{:<7} {:>6} {:>6} {:>6} {:>9} {:>11} {:>10} {:>9}",
        "mode", "prompt", "decod", "trunc", "forwards", "rows/step", "wall_s", "speedup"
    )
}

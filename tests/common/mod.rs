//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::config::Config;
use sparse_lavida::exec;
use sparse_lavida::model::Model;
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{Mode, RunOptions, T2iRequest, Task, TextRequest};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::HostWeights;

/// A `tiny` model with seeded random weights on the CPU backend.
pub fn tiny_model(seed: u64) -> Model<CpuBackend> {
    let cfg = Config::preset("tiny").unwrap();
    let w = HostWeights::random(&cfg, seed);
    Model::new(CpuBackend::new(), cfg, w).unwrap()
}

/// A deterministic prompt of `len` text ids for `seed`, all below 299: inside `tiny`'s text
/// vocabulary and never its `[MASK]` (299).
pub fn prompt(len: usize, seed: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((i * 7919 + seed * 104_729) % 299) as u32)
        .collect()
}

/// `max |a − b| / max |b|`: the error relative to the reference's largest magnitude, so
/// near-zero entries do not blow it up.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max((x as f64).abs()))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    assert!(a.iter().all(|x| x.is_finite()), "non-finite value");
    diff / scale
}

/// `‖a − b‖₂ / ‖b‖₂`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Why a device test failed to open a device: it runs on a GPU, or on the emulated device when
/// built with the `emulator` feature and its libraries are on the loader's path.
pub const NEED_DEVICE: &str = "this test needs a CUDA device: a GPU, or the emulated one (built \
    with --features emulator into target/<profile>/emu; scripts/test and scripts/emu put it on \
    LD_LIBRARY_PATH)";

pub mod twin;

/// Every plan `model`'s generation of `task` in `mode` runs, in order (prefill included).
pub fn plans_of(model: &Model<CpuBackend>, task: &Task, mode: Mode) -> Vec<StepPlan> {
    let mut plans = Vec::new();
    let mut on_plan = |_: Option<usize>, p: &StepPlan| plans.push(p.clone());
    exec::generate(
        model,
        task,
        mode,
        RunOptions {
            on_plan: Some(&mut on_plan),
            ..RunOptions::default()
        },
    )
    .unwrap();
    plans
}

/// A small `tiny` t2i request: prompt 3, a 3×4 grid in 5 steps, random order, guidance as given.
pub fn small_t2i(guidance: f32) -> Task {
    Task::T2i(T2iRequest {
        prompt: vec![3, 4, 5],
        height: 3,
        width: 4,
        steps: 5,
        guidance,
        temperature: 1.0,
        order: Order::Random,
        seed: 5,
    })
}

/// A small `tiny` text request: prompt 4, answer 8 in blocks of 4, 6 steps, τ = 0.5.
pub fn small_text() -> Task {
    Task::Text(TextRequest {
        prompt: vec![1, 2, 3, 4],
        answer_len: 8,
        block_len: 4,
        steps: 6,
        temperature: 0.5,
        banned: Vec::new(),
        seed: 2,
    })
}

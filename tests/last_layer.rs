//! The CPU backend takes only the rows that need logits past their K/V in the last layer
//! (`Backend::prunes_last_layer`, `StepPlan::logits_tail`). The oracle is the same pass with
//! every row through every layer (`Model::prepare_whole`): over every plan of t2i (with and
//! without CFG) and text generations in all 9 modes, the pruned pass gives the same logits bit
//! for bit and leaves the same K/V pool.

mod common;

use common::tiny_model;
use sparse_lavida::exec;
use sparse_lavida::model::Workspace;
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{Mode, RunOptions, T2iRequest, Task, TextRequest};
use sparse_lavida::schedule::Order;

fn plans_of(task: &Task, mode: Mode) -> Vec<StepPlan> {
    let model = tiny_model(7);
    let mut plans = Vec::new();
    let mut on_plan = |_: Option<usize>, p: &StepPlan| plans.push(p.clone());
    exec::generate(
        &model,
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

/// Returns how many of the passes had a tail.
fn check(task: &Task, mode: Mode) -> usize {
    let model = tiny_model(7);
    let plans = plans_of(task, mode);
    let slots = plans.iter().map(|p| p.pool_slots).max().unwrap();
    let mut cache = model.new_cache(slots).unwrap();
    let mut ws = Workspace::new();
    let mut pruned = 0;
    for (k, plan) in plans.into_iter().enumerate() {
        let mut whole_cache = cache.clone();
        let whole = model
            .forward(
                &model.prepare_whole(plan.clone()).unwrap(),
                &mut whole_cache,
            )
            .unwrap();
        let prepared = model.prepare(plan).unwrap();
        pruned += usize::from(prepared.tail.is_some());
        let has = model.forward_in(&prepared, &mut cache, &mut ws).unwrap();
        assert_eq!(has, whole.is_some(), "{mode} pass {k}");
        if let Some(whole) = whole {
            let got = ws.logits().unwrap();
            assert_eq!(
                (got.rows, got.cols),
                (whole.rows, whole.cols),
                "{mode} pass {k}"
            );
            let differ = got
                .data
                .iter()
                .zip(&whole.data)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{mode} pass {k}: {differ} logits differ");
        }
        assert!(cache == whole_cache, "{mode} pass {k}: the pools differ");
    }
    pruned
}

#[test]
fn pruned_last_layer_gives_the_whole_layers_logits() {
    let t2i = |guidance| {
        Task::T2i(T2iRequest {
            prompt: vec![3, 4, 5],
            height: 4,
            width: 4,
            steps: 5,
            guidance,
            temperature: 1.0,
            order: Order::Random,
            seed: 5,
        })
    };
    let text = Task::Text(TextRequest {
        prompt: vec![1, 2, 3, 4],
        answer_len: 8,
        block_len: 4,
        steps: 6,
        temperature: 0.5,
        banned: Vec::new(),
        seed: 2,
    });
    for task in [t2i(0.0), t2i(2.0), text] {
        let mut pruned = 0;
        for mode in Mode::all() {
            pruned += check(&task, mode);
        }
        // Steps that decode part of what they feed have a tail: the oracle compared real ones.
        assert!(pruned > 0, "{task:?}: no pass had a tail");
    }
}

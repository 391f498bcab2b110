//! A reused workspace computes what fresh buffers compute: replaying every plan of a
//! generation (sizes going up and down) through one workspace and one pool gives, step by step,
//! the logits of a pass with fresh buffers over a copy of the same pool; a frozen workspace
//! refuses a pass that needs more rows instead of growing.

mod common;

use common::tiny_model;
use sparse_lavida::exec;
use sparse_lavida::model::Workspace;
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{Mode, RunOptions, Switches, T2iRequest, Task, TextRequest};
use sparse_lavida::schedule::Order;

fn plans_of(task: &Task, mode: Mode) -> Vec<StepPlan> {
    let model = tiny_model(3);
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

fn check(task: &Task, mode: Mode) {
    let model = tiny_model(3);
    let plans = plans_of(task, mode);
    let slots = plans.iter().map(|p| p.pool_slots).max().unwrap();
    let mut cache = model.new_cache(slots).unwrap();
    let mut ws = Workspace::new();
    for (k, plan) in plans.into_iter().enumerate() {
        // The oracle: fresh buffers over a copy of the pool before this pass.
        let mut fresh_cache = cache.clone();
        let prepared = model.prepare(plan).unwrap();
        let want = model.forward(&prepared, &mut fresh_cache).unwrap();
        let has = model.forward_in(&prepared, &mut cache, &mut ws).unwrap();
        assert_eq!(has, want.is_some(), "{mode} pass {k}");
        if let Some(want) = want {
            let got = ws.logits().unwrap();
            assert_eq!(
                (got.rows, got.cols),
                (want.rows, want.cols),
                "{mode} pass {k}"
            );
            assert_eq!(got.data, want.data, "{mode} pass {k}: logits differ");
        }
        assert!(cache == fresh_cache, "{mode} pass {k}: the pools differ");
    }
}

#[test]
fn reused_workspace_equals_fresh_buffers() {
    let t2i = Task::T2i(T2iRequest {
        prompt: vec![3, 4, 5],
        height: 3,
        width: 4,
        steps: 5,
        guidance: 2.0,
        temperature: 1.0,
        order: Order::Random,
        seed: 5,
    });
    let text = Task::Text(TextRequest {
        prompt: vec![1, 2, 3, 4],
        answer_len: 8,
        block_len: 4,
        steps: 6,
        temperature: 0.5,
        banned: Vec::new(),
        seed: 2,
    });
    for task in [&t2i, &text] {
        check(task, Mode::Dense);
        check(task, Mode::Sparse(Switches::ALL_ON));
        check(
            task,
            Mode::Sparse(Switches {
                cache_prompt: false,
                cache_decoded: true,
                truncate: false,
            }),
        );
    }
}

#[test]
fn frozen_workspace_refuses_to_grow() {
    let model = tiny_model(3);
    let text = Task::Text(TextRequest {
        prompt: vec![1, 2, 3],
        answer_len: 4,
        block_len: 4,
        steps: 2,
        temperature: 0.0,
        banned: Vec::new(),
        seed: 1,
    });
    let plans = plans_of(&text, Mode::Dense);
    let rows = plans[0].n_rows();
    let mut ws = model.workspace([rows - 1, 0], 8).unwrap();
    ws.freeze();
    let mut cache = model.new_cache(plans[0].pool_slots).unwrap();
    let e = model
        .forward_in(
            &model.prepare(plans[0].clone()).unwrap(),
            &mut cache,
            &mut ws,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("{rows} text rows")), "{msg}");
    assert!(msg.contains(&format!("holds {}", rows - 1)), "{msg}");
    // Unfrozen and big enough, the same pass runs.
    let mut ws = model.workspace([rows, 0], 8).unwrap();
    ws.freeze();
    model
        .forward_in(
            &model.prepare(plans[0].clone()).unwrap(),
            &mut cache,
            &mut ws,
        )
        .unwrap();
}

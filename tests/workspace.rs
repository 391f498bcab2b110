//! A reused workspace computes what fresh buffers compute: replaying every plan of a
//! generation (sizes going up and down) through one workspace and one pool gives, step by step,
//! the logits of a pass with fresh buffers over a copy of the same pool; a frozen workspace
//! refuses a pass that needs more rows instead of growing.

mod common;

use common::{plans_of, small_t2i, small_text, tiny_model};
use sparse_lavida::model::Workspace;
use sparse_lavida::sampler::{Mode, Switches, Task, TextRequest};

fn check(task: &Task, mode: Mode) {
    let model = tiny_model(3);
    let plans = plans_of(&model, task, mode);
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
    let (t2i, text) = (small_t2i(2.0), small_text());
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
    let plans = plans_of(&model, &text, Mode::Dense);
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

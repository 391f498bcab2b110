//! A reused workspace computes what fresh buffers compute: replaying every plan of a
//! generation (sizes going up and down) through one workspace and one pool gives, step by step,
//! the logits of a pass with fresh buffers over a copy of the same pool, whether the workspace
//! grows to exactly what a pass needs or with room to spare; a frozen workspace refuses a pass
//! that needs more rows instead of growing. The bounds the host loop grows a workspace towards
//! hold every pass of every mode.

mod common;

use common::{plans_of, small_t2i, small_text, tiny_model};
use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::config::Branch;
use sparse_lavida::exec;
use sparse_lavida::model::{Model, Workspace};
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{
    BatchSampling, Mode, RunOptions, Switches, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::Order;

fn check(task: &Task, mode: Mode) {
    let model = tiny_model(3);
    let plans = plans_of(&model, task, mode);
    // Exact growth; doubling with bounds past every pass; doubling with bounds below some.
    let most = |b: Branch| plans.iter().map(|p| p.rows(b).len()).max().unwrap();
    let most_logits = plans.iter().map(|p| p.logits_rows.len()).max().unwrap();
    let (text, image) = (most(Branch::Text), most(Branch::Image));
    check_with(&model, &plans, mode, &mut Workspace::new());
    check_with(
        &model,
        &plans,
        mode,
        &mut Workspace::growing_to([4 * text, 4 * image], 4 * most_logits),
    );
    check_with(
        &model,
        &plans,
        mode,
        &mut Workspace::growing_to([text / 2, image / 2], most_logits / 2),
    );
}

fn check_with(
    model: &Model<CpuBackend>,
    plans: &[StepPlan],
    mode: Mode,
    ws: &mut Workspace<CpuBackend>,
) {
    let slots = plans.iter().map(|p| p.pool_slots).max().unwrap();
    let mut cache = model.new_cache(slots).unwrap();
    for (k, plan) in plans.iter().cloned().enumerate() {
        // The oracle: fresh buffers over a copy of the pool before this pass.
        let mut fresh_cache = cache.clone();
        let prepared = model.prepare(plan).unwrap();
        let want = model.forward(&prepared, &mut fresh_cache).unwrap();
        let has = model.forward_in(&prepared, &mut cache, ws).unwrap();
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

/// Doubling growth, on a sparse generation whose passes grow (a 12×12 grid in 24 steps, the
/// schedule's groups growing): after each pass the workspace holds what it held if that was
/// enough, else exactly `max(need, min(2 · held, bound))`, for each branch's rows and the logits
/// rows; under the host loop's bounds and under bounds that some doubling would pass. Every
/// pass's logits are those of fresh buffers.
#[test]
fn growing_workspace_doubles_up_to_its_bounds() {
    let model = tiny_model(3);
    let task = Task::T2i(T2iRequest {
        prompt: vec![3, 4, 5],
        height: 12,
        width: 12,
        steps: 24,
        guidance: 2.0,
        temperature: 1.0,
        order: Order::Random,
        seed: 5,
    });
    let text = Task::Text(TextRequest {
        prompt: vec![1, 2, 3, 4],
        answer_len: 48,
        block_len: 16,
        steps: 12,
        temperature: 0.5,
        banned: Vec::new(),
        seed: 2,
    });
    let (mut spare, mut capped) = (0, 0);
    for task in [task, text] {
        let (s, c) = grows_as_it_should(&model, &task);
        (spare, capped) = (spare + s, capped + c);
    }
    assert!(
        spare > 0,
        "no growth left room: the cases do not test doubling"
    );
    assert!(
        capped > 0,
        "no growth was capped: the cases do not test the bound"
    );
}

/// Checks every pass of `task`'s sparse generation; returns how many growths left room to
/// spare and how many a bound held below twice what was held.
fn grows_as_it_should(model: &Model<CpuBackend>, task: &Task) -> (usize, usize) {
    let mode = Mode::Sparse(Switches::ALL_ON);
    let plans = plans_of(model, task, mode);
    let s = BatchSampling::new(model.config(), std::slice::from_ref(task), mode).unwrap();
    let most = |b: Branch| plans.iter().map(|p| p.rows(b).len()).max().unwrap();
    let most_logits = plans.iter().map(|p| p.logits_rows.len()).max().unwrap();
    let tight = ([most(Branch::Text), most(Branch::Image)], most_logits);
    let (mut spare, mut capped) = (0, 0);
    for (bound_rows, bound_logits) in [s.pass_bounds(), tight] {
        let mut ws = Workspace::growing_to(bound_rows, bound_logits);
        let slots = plans.iter().map(|p| p.pool_slots).max().unwrap();
        let mut cache = model.new_cache(slots).unwrap();
        let want = |held: usize, need: usize, bound: usize| match need <= held && held > 0 {
            true => held,
            false => need.max((2 * held).min(bound)),
        };
        for (k, plan) in plans.iter().cloned().enumerate() {
            let (held, held_logits) = ws.capacity();
            let held_tail = ws.tail_capacity();
            let need = Branch::ALL.map(|b| plan.rows(b).len());
            let need_logits = plan.logits_rows.len();
            let prepared = model.prepare(plan).unwrap();
            let need_tail = prepared.tail.as_ref().map_or(0, |t| t.plan.n_rows());
            let want_logits = model.forward(&prepared, &mut cache.clone()).unwrap();
            model.forward_in(&prepared, &mut cache, &mut ws).unwrap();
            assert_eq!(
                ws.logits().map(|l| &l.data),
                want_logits.as_ref().map(|l| &l.data)
            );
            let (rows, logits) = ws.capacity();
            let mut check = |what: &str, got: usize, held: usize, need: usize, bound: usize| {
                if need == 0 {
                    return;
                }
                assert_eq!(got, want(held, need, bound), "pass {k}: {what}");
                spare += usize::from(got > need && got != held);
                capped += usize::from(got != held && got < 2 * held);
            };
            for b in Branch::ALL {
                let i = b as usize;
                check(b.name(), rows[i], held[i], need[i], bound_rows[i]);
            }
            check(
                "logits rows",
                logits,
                held_logits,
                need_logits,
                bound_logits,
            );
            let tail = ws.tail_capacity();
            check(
                "the last layer's rows",
                tail,
                held_tail,
                need_tail,
                bound_logits,
            );
        }
    }
    (spare, capped)
}

/// Every pass of every mode, t2i (with and without CFG) and text, alone and in batches (a t2i
/// request with CFG beside one without and a longer prompt; text requests of different answer
/// lengths), feeds at most the bounds `BatchSampling::pass_bounds` gives: rows per branch and
/// logits rows.
#[test]
fn pass_bounds_hold_every_pass() {
    let model = tiny_model(3);
    let t2i_no_cfg = Task::T2i(T2iRequest {
        prompt: vec![7, 8, 9, 10, 11],
        height: 3,
        width: 4,
        steps: 5,
        guidance: 1.0,
        temperature: 0.5,
        order: Order::Random,
        seed: 6,
    });
    let longer_text = Task::Text(TextRequest {
        prompt: vec![5, 6],
        answer_len: 16,
        block_len: 4,
        steps: 9,
        temperature: 1.0,
        banned: Vec::new(),
        seed: 3,
    });
    let batches = [
        vec![small_t2i(2.0)],
        vec![small_t2i(1.0)],
        vec![small_text()],
        vec![small_t2i(2.0), t2i_no_cfg],
        vec![small_text(), longer_text],
    ];
    for batch in &batches {
        for mode in Mode::all() {
            let s = BatchSampling::new(model.config(), batch, mode).unwrap();
            let (rows, logits) = s.pass_bounds();
            let mut plans = Vec::new();
            let mut on_plan = |_: Option<usize>, p: &StepPlan| plans.push(p.clone());
            let opts = RunOptions {
                on_plan: Some(&mut on_plan),
                ..RunOptions::default()
            };
            exec::generate_batch(&model, batch, mode, opts).unwrap();
            assert!(!plans.is_empty());
            for (k, plan) in plans.iter().enumerate() {
                for b in Branch::ALL {
                    let n = plan.rows(b).len();
                    assert!(
                        n <= rows[b as usize],
                        "{mode} pass {k}: {n} {} rows",
                        b.name()
                    );
                }
                assert!(
                    plan.logits_rows.len() <= logits,
                    "{mode} pass {k}: logits rows"
                );
            }
        }
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

/// The head is sized for the logits branch, not the widest vocabulary (a `lavida-o` image's
/// logits are 8192 wide, a text answer's 127,378): one workspace through a t2i generation holds
/// image-vocabulary logits rows, then through a text generation widens to the text vocabulary,
/// every pass's logits those of fresh buffers; a frozen one made for image logits refuses a
/// text pass, naming both widths.
#[test]
fn the_head_is_as_wide_as_the_logits_branch() {
    let model = tiny_model(3);
    let cfg = model.config().clone();
    assert!(
        cfg.image_vocab < cfg.text_vocab,
        "the case needs a narrower image vocabulary"
    );
    let t2i = plans_of(&model, &small_t2i(2.0), Mode::Sparse(Switches::ALL_ON));
    let text = plans_of(&model, &small_text(), Mode::Dense);
    let mut ws = Workspace::new();
    check_with(&model, &t2i, Mode::Sparse(Switches::ALL_ON), &mut ws);
    assert_eq!(ws.logits_width(), cfg.image_vocab);
    check_with(&model, &text, Mode::Dense, &mut ws);
    assert_eq!(ws.logits_width(), cfg.text_vocab);
    let slots = (t2i.iter().chain(&text))
        .map(|p| p.pool_slots)
        .max()
        .unwrap();

    let rows = text.iter().map(|p| p.n_rows()).max().unwrap();
    let logits = text.iter().map(|p| p.logits_rows.len()).max().unwrap();
    let mut frozen = model
        .workspace([rows, rows], logits, Branch::Image)
        .unwrap();
    assert_eq!(frozen.logits_width(), cfg.image_vocab);
    frozen.freeze();
    let pass = text
        .iter()
        .find(|p| !p.logits_rows.is_empty())
        .unwrap()
        .clone();
    let mut cache = model.new_cache(slots).unwrap();
    let e = model
        .forward_in(&model.prepare(pass).unwrap(), &mut cache, &mut frozen)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("text branch ({} wide)", cfg.text_vocab))
            && e.contains(&format!("holds {}", cfg.image_vocab)),
        "{e}"
    );
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
    let mut ws = model.workspace([rows - 1, 0], 8, Branch::Text).unwrap();
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
    let mut ws = model.workspace([rows, 0], 8, Branch::Text).unwrap();
    ws.freeze();
    model
        .forward_in(
            &model.prepare(plans[0].clone()).unwrap(),
            &mut cache,
            &mut ws,
        )
        .unwrap();
}

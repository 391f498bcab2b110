//! SPEC §4.3: every sparse execution strategy gives the same `C_k` logits and tokens at every
//! step, and the incremental sparse path equals one full forward pass over SPEC §3-tagged rows.

mod common;

use common::{max_rel_err, prompt, tiny_model};
use proptest::prelude::*;
use sparse_lavida::case::{Case, CaseId, CaseRow, RegisterMarker};
use sparse_lavida::config::Branch;
use sparse_lavida::exec;
use sparse_lavida::sampler::{
    self, Generation, Mode, RunOptions, Switches, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::Order;

fn run(
    model: &sparse_lavida::model::Model<sparse_lavida::backend::cpu::CpuBackend>,
    task: &Task,
    mode: Mode,
) -> Generation {
    exec::generate(
        model,
        task,
        mode,
        RunOptions {
            record_logits: true,
            ..RunOptions::default()
        },
    )
    .unwrap()
}

/// All eight switch combinations against the all-on run, step by step.
fn assert_all_switches_agree(weights_seed: u64, task: &Task) {
    let model = tiny_model(weights_seed);
    let reference = run(&model, task, Mode::Sparse(Switches::ALL_ON));
    for sw in Switches::all_combinations() {
        let g = run(&model, task, Mode::Sparse(sw));
        assert_eq!(g.steps.len(), reference.steps.len());
        for (a, b) in g.steps.iter().zip(&reference.steps) {
            assert_eq!(
                a.query_positions, b.query_positions,
                "{sw:?} step {}",
                a.step
            );
            let err = max_rel_err(a.logits.as_ref().unwrap(), b.logits.as_ref().unwrap());
            assert!(
                err <= 1e-4,
                "{sw:?} step {}: logits max rel err {err:e}",
                a.step
            );
            assert_eq!(
                a.decoded_positions, b.decoded_positions,
                "{sw:?} step {}",
                a.step
            );
            assert_eq!(a.tokens, b.tokens, "{sw:?} step {}", a.step);
        }
        assert_eq!(g.tokens, reference.tokens, "{sw:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn t2i_switches_agree(
        wseed in 0u64..1000, seed in 0u64..1000, plen in 0usize..6, h in 1usize..5, w in 1usize..6,
        steps_frac in 0.0f64..1.0, cfg in any::<bool>(), hot in any::<bool>(), order in 0usize..3,
    ) {
        let n = h * w;
        let steps = 1 + ((n - 1) as f64 * steps_frac) as usize;
        let task = Task::T2i(T2iRequest {
            prompt: prompt(plen, seed),
            height: h,
            width: w,
            steps,
            guidance: if cfg { 2.5 } else { 0.0 },
            temperature: if hot { 1.0 } else { 0.0 },
            order: [Order::Stratified, Order::Raster, Order::Random][order],
            seed,
        });
        assert_all_switches_agree(wseed, &task);
    }

    #[test]
    fn text_switches_agree(
        wseed in 0u64..1000, seed in 0u64..1000, plen in 1usize..6, answer in 1usize..24,
        block in 1usize..10, steps_frac in 0.0f64..1.0, hot in any::<bool>(),
    ) {
        // Every block gets the same number of steps, at most the smallest (last) block's size.
        let nblocks = answer.div_ceil(block);
        let smallest = answer - (nblocks - 1) * block;
        let steps = nblocks * (1 + ((smallest - 1) as f64 * steps_frac) as usize);
        let task = Task::Text(TextRequest {
            prompt: prompt(plen, seed),
            answer_len: answer,
            block_len: block,
            steps,
            temperature: if hot { 1.0 } else { 0.0 },
            banned: vec![],
            seed,
        });
        assert_all_switches_agree(wseed, &task);
    }
}

/// Builds the case of one sequence at step `k`: prompt (block 0), groups decoded at steps `< k`
/// (clean block j+1, real ids), the masked block (step k's query masks and the registers).
fn full_case(
    cfg: &sparse_lavida::config::Config,
    prompt: &[u32],
    branch: Branch,
    n: usize,
    g: &Generation,
    k: usize,
) -> Case {
    let p = prompt.len() as u32;
    let mut rows = Vec::new();
    for (j, &id) in prompt.iter().enumerate() {
        rows.push(CaseRow {
            branch: Branch::Text,
            id: CaseId::Token(id),
            pos: j as u32,
            block: 0,
            masked: false,
        });
    }
    for (j, s) in g.steps[..k].iter().enumerate() {
        for (&i, &t) in s.decoded_positions.iter().zip(&s.tokens) {
            rows.push(CaseRow {
                branch,
                id: CaseId::Token(t),
                pos: p + i,
                block: j as u32 + 1,
                masked: false,
            });
        }
    }
    let mut logits_for = Vec::new();
    let block = k as u32 + 1;
    for &i in &g.steps[k].query_positions {
        logits_for.push(rows.len());
        rows.push(CaseRow {
            branch,
            id: CaseId::Token(cfg.mask_id(branch)),
            pos: p + i,
            block,
            masked: true,
        });
    }
    for r in 0..cfg.n_registers as u32 {
        let id = CaseId::Register(RegisterMarker::Reg);
        rows.push(CaseRow {
            branch,
            id,
            pos: p + n as u32 + r,
            block,
            masked: true,
        });
    }
    Case { rows, logits_for }
}

fn forward_logits(
    model: &sparse_lavida::model::Model<sparse_lavida::backend::cpu::CpuBackend>,
    case: &Case,
) -> Vec<f32> {
    let plan = case.plan(model.config()).unwrap();
    let mut cache = model.new_cache(plan.pool_slots).unwrap();
    let out = model
        .forward(&model.prepare(plan).unwrap(), &mut cache)
        .unwrap()
        .unwrap();
    out.data
}

#[test]
fn incremental_t2i_with_cfg_equals_full_forward() {
    let model = tiny_model(11);
    let cfg = model.config().clone();
    let prompt = prompt(5, 3);
    let (h, w) = (4, 5);
    let task = Task::T2i(T2iRequest {
        prompt: prompt.clone(),
        height: h,
        width: w,
        steps: 6,
        guidance: 3.0,
        temperature: 1.0,
        order: Order::Stratified,
        seed: 9,
    });
    let g = run(&model, &task, Mode::Sparse(Switches::ALL_ON));
    let uncond = vec![cfg.text_mask_id; prompt.len()];
    for k in 0..g.steps.len() {
        let logits = g.steps[k].logits.as_ref().unwrap();
        let half = logits.len() / 2;
        let cond = forward_logits(
            &model,
            &full_case(&cfg, &prompt, Branch::Image, h * w, &g, k),
        );
        let unc = forward_logits(
            &model,
            &full_case(&cfg, &uncond, Branch::Image, h * w, &g, k),
        );
        let e1 = max_rel_err(&logits[..half], &cond);
        let e2 = max_rel_err(&logits[half..], &unc);
        assert!(
            e1 <= 1e-4 && e2 <= 1e-4,
            "step {k}: cond {e1:e}, uncond {e2:e}"
        );
    }
}

#[test]
fn incremental_text_equals_full_forward() {
    let model = tiny_model(12);
    let cfg = model.config().clone();
    let prompt = prompt(6, 4);
    let task = Task::Text(TextRequest {
        prompt: prompt.clone(),
        answer_len: 20,
        block_len: 8,
        steps: 9,
        temperature: 0.7,
        banned: vec![3],
        seed: 5,
    });
    let g = run(&model, &task, Mode::Sparse(Switches::ALL_ON));
    for k in 0..g.steps.len() {
        let full = forward_logits(&model, &full_case(&cfg, &prompt, Branch::Text, 20, &g, k));
        let err = max_rel_err(g.steps[k].logits.as_ref().unwrap(), &full);
        assert!(err <= 1e-4, "step {k}: {err:e}");
    }
    assert!(g.tokens.iter().all(|&t| t != cfg.text_mask_id && t != 3));
}

#[test]
fn dense_and_sparse_decode_every_position_once() {
    let model = tiny_model(13);
    for task in [
        Task::T2i(T2iRequest {
            prompt: prompt(4, 1),
            height: 3,
            width: 7,
            steps: 5,
            guidance: 1.0,
            temperature: 1.0,
            order: Order::Random,
            seed: 2,
        }),
        Task::Text(TextRequest {
            prompt: prompt(4, 1),
            answer_len: 13,
            block_len: 5,
            steps: 7,
            temperature: 1.0,
            banned: vec![],
            seed: 2,
        }),
    ] {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let g = run(&model, &task, mode);
            let mut seen: Vec<u32> = g
                .steps
                .iter()
                .flat_map(|s| s.decoded_positions.clone())
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                (0..g.tokens.len() as u32).collect::<Vec<_>>(),
                "{mode}"
            );
            let dense_rows = matches!(mode, Mode::Dense);
            // Dense feeds every row every step; sparse feeds fewer per step than dense would.
            let p = 4;
            let full = g.tokens.len() + p;
            for s in &g.steps {
                if dense_rows {
                    assert!(s.rows_fed >= full, "{mode}: {} < {full}", s.rows_fed);
                }
            }
        }
    }
}

fn run_forced(
    model: &sparse_lavida::model::Model<sparse_lavida::backend::cpu::CpuBackend>,
    task: &Task,
    mode: Mode,
    teacher: &[sampler::StepTrace],
) -> sparse_lavida::Result<Generation> {
    exec::generate(
        model,
        task,
        mode,
        RunOptions {
            record_logits: true,
            teacher: Some(teacher),
            ..RunOptions::default()
        },
    )
}

/// Teacher forcing: a run forced by its own trace reproduces it exactly (positions, tokens and
/// logits, bit for bit); a run forced by another seed's trace commits that trace's tokens; a
/// trace that does not fit the run is an error naming the step.
#[test]
fn teacher_forcing_reproduces_its_trace_and_forces_another() {
    let model = tiny_model(21);
    let t2i = |seed| {
        Task::T2i(T2iRequest {
            prompt: prompt(4, 3),
            height: 4,
            width: 4,
            steps: 5,
            guidance: 2.0,
            temperature: 1.0,
            // Raster: the groups do not depend on the seed, only the noise does.
            order: Order::Raster,
            seed,
        })
    };
    let text = |seed| {
        Task::Text(TextRequest {
            prompt: prompt(4, 3),
            answer_len: 12,
            block_len: 5,
            steps: 6,
            temperature: 1.0,
            banned: vec![],
            seed,
        })
    };
    for make in [&t2i as &dyn Fn(u64) -> Task, &text] {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let (task, other_task) = (make(1), make(2));
            let base = run(&model, &task, mode);
            let forced = run_forced(&model, &task, mode, &base.steps).unwrap();
            assert_eq!(forced.tokens, base.tokens, "{mode}");
            for (a, b) in forced.steps.iter().zip(&base.steps) {
                assert_eq!(a.query_positions, b.query_positions, "{mode}");
                assert_eq!(a.decoded_positions, b.decoded_positions, "{mode}");
                assert_eq!(a.tokens, b.tokens, "{mode}");
                assert_eq!(a.logits, b.logits, "{mode} step {}", a.step);
            }
            let other = run(&model, &other_task, mode);
            assert_ne!(other.tokens, base.tokens, "{mode}: the seeds should differ");
            let forced = run_forced(&model, &task, mode, &other.steps).unwrap();
            assert_eq!(forced.tokens, other.tokens, "{mode}");
            for (a, b) in forced.steps.iter().zip(&other.steps) {
                assert_eq!(a.decoded_positions, b.decoded_positions, "{mode}");
            }

            // A short trace, a position the step does not decode, a token outside the vocabulary.
            let e = run_forced(&model, &task, mode, &base.steps[..2]).unwrap_err();
            assert!(
                e.to_string().contains("step 2: the trace has only 2"),
                "{e}"
            );
            let mut wrong = base.steps.clone();
            let last = *base.steps.last().unwrap().decoded_positions.last().unwrap();
            wrong[0].decoded_positions[0] = last;
            let e = run_forced(&model, &task, mode, &wrong).unwrap_err();
            assert!(e.to_string().contains("step 0: position"), "{e}");
            let mut wrong = base.steps.clone();
            wrong[1].tokens[0] = 1_000_000;
            let e = run_forced(&model, &task, mode, &wrong).unwrap_err();
            assert!(e.to_string().contains("token 1000000"), "{e}");
        }
    }
}

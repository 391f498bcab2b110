//! Host programs for device-resident generation: resolved plans equal the incremental run's for
//! any decode history, the host interpreter `run_program` equals `generate` bit for bit, and
//! `Program::traces` rebuilds the run's traces from the final state.

mod common;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::{prompt, tiny_model};
use proptest::prelude::*;
use sparse_lavida::Error;
use sparse_lavida::exec::{self, run_program};
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::patch::{self, DeviceState, UNDECODED};
use sparse_lavida::sampler::{
    Generation, Mode, Program, RunOptions, StepTrace, Switches, T2iRequest, Task, TextRequest,
    program,
};
use sparse_lavida::schedule::Order;

/// Every plan a run hands to `on_plan`: the prefill, then each step in order.
#[derive(Default, Debug, PartialEq)]
struct Plans {
    prefill: Option<StepPlan>,
    steps: Vec<StepPlan>,
}

impl Plans {
    fn record(&mut self, k: Option<usize>, p: &StepPlan) {
        match k {
            None => self.prefill = Some(p.clone()),
            Some(k) => {
                assert_eq!(k, self.steps.len(), "steps out of order");
                self.steps.push(p.clone());
            }
        }
    }
}

/// The final state a generation leaves on the device, rebuilt from its traces.
fn final_state(g: &Generation, mask_id: u32) -> DeviceState {
    let mut st = DeviceState::new(g.tokens.len(), mask_id);
    let mut rank = 0;
    for s in &g.steps {
        for (&i, &t) in s.decoded_positions.iter().zip(&s.tokens) {
            st.order[rank] = i;
            st.tokens[i as usize] = t;
            st.decoded_step[i as usize] = s.step as u32;
            rank += 1;
        }
    }
    st
}

fn trace_triples(g: &Generation) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    (g.steps.iter())
        .map(|s| {
            let q = s.query_positions.clone();
            (q, s.decoded_positions.clone(), s.tokens.clone())
        })
        .collect()
}

/// A random history driven on the device side (random confidences through `patch::commit`),
/// then replayed by the host loop with teacher forcing: at every step the program's resolved
/// plan, query and sampler positions equal what the host loop builds from the same history.
fn check_random_history(task: &Task, wseed: u64, hseed: u64) {
    let model = tiny_model(wseed);
    let cfg = model.config();
    let p = match task {
        Task::T2i(r) => r.prompt.len(),
        Task::Text(r) => r.prompt.len(),
    } as u32;
    for mode in Mode::all() {
        let prog = program(cfg, task, mode).unwrap();
        let vocab = cfg.vocab(prog.branch) as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(hseed);
        let mut dev = DeviceState::new(prog.n, prog.mask_id);
        let mut resolved = Vec::new();
        let mut teacher = Vec::new();
        for (k, step) in prog.steps.iter().enumerate() {
            let (plan, positions, query) = step.resolve(prog.branch, &dev);
            // Few confidence levels: ties (broken by position) are common.
            let conf: Vec<f32> = (0..query.len())
                .map(|_| (rng.next_u64() % 3) as f32)
                .collect();
            let tokens: Vec<u32> = (0..query.len())
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect();
            patch::commit(&mut dev, &query, &tokens, &conf, step.commit).unwrap();
            let first = step.commit.rank_base as usize;
            let decoded = dev.order[first..first + step.commit.n_commit as usize].to_vec();
            teacher.push(StepTrace {
                step: k,
                tokens: decoded.iter().map(|&i| dev.tokens[i as usize]).collect(),
                decoded_positions: decoded,
                rows_fed: 0,
                time_s: 0.0,
                query_positions: query.clone(),
                logits: None,
            });
            resolved.push((plan, positions, query));
        }
        let mut seen = Plans::default();
        let mut hook = |k: Option<usize>, p: &StepPlan| seen.record(k, p);
        let g = exec::generate(
            &model,
            task,
            mode,
            RunOptions {
                teacher: Some(&teacher),
                on_plan: Some(&mut hook),
                ..RunOptions::default()
            },
        )
        .unwrap();
        assert_eq!(prog.prefill, seen.prefill, "{mode}: prefill");
        assert_eq!(resolved.len(), seen.steps.len(), "{mode}: steps");
        for (k, ((plan, positions, query), want)) in resolved.iter().zip(&seen.steps).enumerate() {
            assert_eq!(plan, want, "{mode} step {k}: plan");
            assert_eq!(query, &g.steps[k].query_positions, "{mode} step {k}: query");
            let want_pos: Vec<u32> = query.iter().map(|&i| p + i).collect();
            assert_eq!(positions, &want_pos, "{mode} step {k}: sampler positions");
        }
        assert_eq!(g.tokens, dev.tokens, "{mode}: tokens");
        assert_eq!(prog.traces(&dev).unwrap(), trace_triples(&g), "{mode}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn text_programs_follow_any_history(
        wseed in 0u64..1000, hseed in any::<u64>(), plen in 0usize..5, answer_len in 1usize..24,
        block_len in 1usize..10, steps_frac in 0.0f64..1.0,
    ) {
        let nblocks = answer_len.div_ceil(block_len);
        let steps = nblocks + ((answer_len - nblocks) as f64 * steps_frac) as usize;
        prop_assume!(sparse_lavida::schedule::text_schedule(answer_len, block_len, steps).is_ok());
        let req = TextRequest {
            prompt: prompt(plen, hseed),
            answer_len,
            block_len,
            steps,
            temperature: 1.0,
            banned: Vec::new(),
            seed: hseed,
        };
        check_random_history(&Task::Text(req), wseed, hseed);
    }

    #[test]
    fn t2i_programs_follow_any_history(
        wseed in 0u64..1000, hseed in any::<u64>(), plen in 0usize..5, h in 1usize..4,
        w in 1usize..5, steps_frac in 0.0f64..1.0, cfg in any::<bool>(), order in 0usize..3,
    ) {
        let n = h * w;
        let req = T2iRequest {
            prompt: prompt(plen, hseed),
            height: h,
            width: w,
            steps: 1 + ((n - 1) as f64 * steps_frac) as usize,
            guidance: if cfg { 2.0 } else { 0.0 },
            temperature: 1.0,
            order: Order::ALL[order],
            seed: hseed,
        };
        check_random_history(&Task::T2i(req), wseed, hseed);
    }
}

fn t2i_task(temperature: f32, guidance: f32) -> Task {
    Task::T2i(T2iRequest {
        prompt: prompt(4, 3),
        height: 3,
        width: 4,
        steps: 5,
        guidance,
        temperature,
        order: Order::Stratified,
        seed: 11,
    })
}

fn text_task(temperature: f32, plen: usize) -> Task {
    Task::Text(TextRequest {
        prompt: prompt(plen, 5),
        answer_len: 13,
        block_len: 5,
        steps: 7,
        temperature,
        banned: vec![7, 8],
        seed: 23,
    })
}

/// `run_program` and `generate` on the CPU backend: same tokens, traces (positions, tokens,
/// queries, rows), forwards, plans and logits, bit for bit.
fn check_same_run(task: &Task) {
    let model = tiny_model(42);
    for mode in Mode::all() {
        let run = |via_program: bool| {
            let mut plans = Plans::default();
            let mut progress = Vec::new();
            let mut hook = |k: Option<usize>, p: &StepPlan| plans.record(k, p);
            let mut tick = |done: usize, total: usize| progress.push((done, total));
            let opts = RunOptions {
                record_logits: true,
                on_plan: Some(&mut hook),
                progress: Some(&mut tick),
                ..RunOptions::default()
            };
            let g = if via_program {
                let prog = program(model.config(), task, mode).unwrap();
                run_program(&model, &prog, opts).unwrap()
            } else {
                exec::generate(&model, task, mode, opts).unwrap()
            };
            (g, plans, progress)
        };
        let (want, want_plans, want_progress) = run(false);
        let (got, got_plans, got_progress) = run(true);
        assert_eq!(got.tokens, want.tokens, "{mode}: tokens");
        assert_eq!(got.forwards, want.forwards, "{mode}: forwards");
        assert_eq!(got.rows_fed, want.rows_fed, "{mode}: rows fed");
        assert_eq!(got_plans, want_plans, "{mode}: plans");
        assert_eq!(got_progress, want_progress, "{mode}: progress");
        assert_eq!(got.steps.len(), want.steps.len(), "{mode}: steps");
        for (a, b) in got.steps.iter().zip(&want.steps) {
            let k = b.step;
            assert_eq!(a.step, k, "{mode}");
            assert_eq!(a.decoded_positions, b.decoded_positions, "{mode} step {k}");
            assert_eq!(a.tokens, b.tokens, "{mode} step {k}: tokens");
            assert_eq!(
                a.query_positions, b.query_positions,
                "{mode} step {k}: query"
            );
            assert_eq!(a.rows_fed, b.rows_fed, "{mode} step {k}: rows");
            let bits = |l: &Option<Vec<f32>>| -> Vec<u32> {
                l.as_ref().unwrap().iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&a.logits), bits(&b.logits), "{mode} step {k}: logits");
        }
        // The device's final state gives back the run's traces.
        let prog = program(model.config(), task, mode).unwrap();
        let st = final_state(&want, prog.mask_id);
        assert_eq!(prog.traces(&st).unwrap(), trace_triples(&want), "{mode}");
        // Workspace sizes cover every plan.
        for p in want_plans.prefill.iter().chain(&want_plans.steps) {
            for b in sparse_lavida::config::Branch::ALL {
                assert!(p.rows(b).len() <= prog.max_rows()[b as usize], "{mode}");
            }
        }
        let longest = want.steps.iter().map(|s| s.query_positions.len()).max();
        assert_eq!(Some(prog.max_query()), longest, "{mode}: max query");
    }
}

#[test]
fn run_program_equals_generate_t2i() {
    for (temperature, guidance) in [(0.0, 0.0), (1.0, 0.0), (0.0, 2.5), (0.8, 2.5)] {
        check_same_run(&t2i_task(temperature, guidance));
    }
}

#[test]
fn run_program_equals_generate_text() {
    for (temperature, plen) in [(0.0, 4), (1.0, 4), (0.7, 0)] {
        check_same_run(&text_task(temperature, plen));
    }
}

fn input_error<T: std::fmt::Debug>(r: sparse_lavida::Result<T>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn bad_requests_fail_as_in_generate() {
    let model = tiny_model(1);
    let bad_t2i = |f: &dyn Fn(&mut T2iRequest)| {
        let Task::T2i(mut r) = t2i_task(1.0, 2.0) else {
            unreachable!()
        };
        f(&mut r);
        Task::T2i(r)
    };
    let bad_text = |f: &dyn Fn(&mut TextRequest)| {
        let Task::Text(mut r) = text_task(1.0, 3) else {
            unreachable!()
        };
        f(&mut r);
        Task::Text(r)
    };
    let tasks = [
        bad_t2i(&|r| r.steps = 13),
        bad_t2i(&|r| r.guidance = -1.0),
        bad_t2i(&|r| r.prompt[1] = 300),
        bad_text(&|r| r.steps = 14),
        bad_text(&|r| r.steps = 2),
        bad_text(&|r| r.banned.push(300)),
        bad_text(&|r| r.temperature = f32::NAN),
    ];
    for task in &tasks {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let want = input_error(exec::generate(&model, task, mode, RunOptions::default()));
            let got = input_error(program(model.config(), task, mode));
            assert_eq!(got, want, "{task:?}");
        }
    }
}

#[test]
fn run_program_refuses_teacher_forcing() {
    let model = tiny_model(2);
    let task = text_task(1.0, 2);
    let prog = program(model.config(), &task, Mode::Dense).unwrap();
    let g = exec::generate(&model, &task, Mode::Dense, RunOptions::default()).unwrap();
    let opts = RunOptions {
        teacher: Some(&g.steps),
        ..RunOptions::default()
    };
    let err = input_error(run_program(&model, &prog, opts));
    assert!(err.contains("teacher forcing needs the host loop"), "{err}");
}

#[test]
fn traces_reject_states_that_do_not_fit_the_program() {
    let model = tiny_model(3);
    let task = text_task(1.0, 2);
    let prog: Program = program(model.config(), &task, Mode::Sparse(Switches::ALL_ON)).unwrap();
    let g = exec::generate(
        &model,
        &task,
        Mode::Sparse(Switches::ALL_ON),
        RunOptions::default(),
    )
    .unwrap();
    let good = final_state(&g, prog.mask_id);
    assert!(prog.traces(&good).is_ok());

    let short = DeviceState::new(prog.n - 1, prog.mask_id);
    assert!(input_error(prog.traces(&short)).contains("response of 13"));

    // The last step's commits never happened.
    let mut unfinished = good.clone();
    let last = prog.steps.last().unwrap().commit;
    for r in last.rank_base..last.rank_base + last.n_commit {
        let i = unfinished.order[r as usize];
        unfinished.decoded_step[i as usize] = UNDECODED;
        unfinished.order[r as usize] = UNDECODED;
    }
    let err = input_error(prog.traces(&unfinished));
    assert!(err.contains(&format!("step {}", last.step)), "{err}");

    // A position recorded at the wrong step.
    let mut moved = good;
    let i = moved.order[0];
    moved.decoded_step[i as usize] = 1;
    let err = input_error(prog.traces(&moved));
    assert!(err.contains("rank 0 of step 0"), "{err}");
}

/// The device memory bound's warm-up part (`memory::add_batch` with `Target::Cuda`) covers the
/// largest matrix product any plan of the batch's program runs (`model::products`, every plan
/// the device-resident executor warms): its input and output, held by `warm_products` while
/// cuBLASLt's tuning holds another pair. At `lavida-o`: the default t2i batch, a text batch
/// whose 128-position block makes the head's product (127,378 logits wide) the widest, and a
/// dense text batch.
#[test]
fn device_warmup_bound_covers_every_product() {
    use sparse_lavida::backend::MatrixKind;
    use sparse_lavida::config::Config;
    use sparse_lavida::memory::{self, Need, Target};
    use sparse_lavida::request::{TaskKind, Workload};
    use sparse_lavida::sampler::program::batch_program;
    let cfg = Config::preset("lavida-o").unwrap();
    let text = Workload {
        answer_len: Some(128),
        block: Some(128),
        ..Workload::new(TaskKind::Text)
    };
    let sparse = Mode::Sparse(Switches::ALL_ON);
    for (work, n, mode) in [
        (Workload::new(TaskKind::T2i), 2, sparse),
        (text.clone(), 3, sparse),
        (text, 2, Mode::Dense),
    ] {
        let works = work.batch(n, None).unwrap();
        let shapes: Vec<_> = works.iter().map(|w| w.shape(&cfg).unwrap()).collect();
        let tasks: Vec<_> = works.iter().map(|w| w.task(&cfg).unwrap()).collect();
        let mut need = Need::default();
        let target = Target::Cuda { attn_workers: 264 };
        memory::add_batch(&mut need, &cfg, &shapes, target, 0).unwrap();
        let bound = (need.device.iter())
            .find(|p| p.what.starts_with("matrix-product warm-up"))
            .unwrap()
            .bytes;
        let prog = batch_program(&cfg, &tasks, mode).unwrap();
        let plans = prog
            .prefill
            .iter()
            .chain(prog.steps.iter().map(|s| &s.plan));
        let widest = plans
            .flat_map(|p| sparse_lavida::model::products(&cfg, p, false))
            .map(|p| {
                let out = if p.out == MatrixKind::Activation {
                    2
                } else {
                    4
                };
                2 * (p.m * p.k * 2 + p.m * p.n * out) as u64
            })
            .max()
            .unwrap();
        assert!(
            widest <= bound,
            "{mode}, {n} of {work:?}: a product holds {widest} B, the bound {bound} B"
        );
    }
}

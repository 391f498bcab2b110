//! Batches (SPEC §8) on the CPU backend: every request of a random batch — mixed prompt
//! lengths, guidance, temperatures, answer lengths, in all nine modes — gives the tokens,
//! traces and logits it gives alone, bit for bit; the batch's plan at every pass is the
//! requests' own plans side by side; the device-resident algorithm (the host interpreter of a
//! batch program) equals the host loop; a batch with one bad request is refused as a whole,
//! naming it, before any work; and the CPU's matrix product gives every row the same bits
//! whatever the rows around it.

mod common;

use common::{prompt, tiny_model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::Error;
use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::backend::cpu::ops::matmul_t;
use sparse_lavida::exec;
use sparse_lavida::model::Model;
use sparse_lavida::plan::StepPlan;
use sparse_lavida::sampler::{
    self, Generation, Mode, Request, RunOptions, Sampling, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::{self, Order};

/// A batch of `n` text-to-image requests on a shared `h × w` grid, `steps` and `order`, each
/// with its own prompt length (0..7), seed, guidance (none for about half) and temperature.
fn t2i_batch(r: &mut ChaCha8Rng, n: usize, (h, w): (usize, usize), steps: usize) -> Vec<Request> {
    let order = Order::ALL[r.gen_range(0..3)];
    (0..n)
        .map(|_| {
            let seed = r.r#gen::<u64>();
            Task::T2i(T2iRequest {
                prompt: prompt(r.gen_range(0..7), seed),
                height: h,
                width: w,
                steps,
                guidance: if r.gen_bool(0.5) {
                    0.0
                } else {
                    r.gen_range(0.5..4.0)
                },
                temperature: [0.0, 0.7, 1.0][r.gen_range(0..3)],
                order,
                seed,
            })
        })
        .collect()
}

/// A batch of `n` text requests sharing `block_len`, each with its own prompt, answer length
/// (so its own steps: a request may leave the batch early), bans and seed.
fn text_batch(r: &mut ChaCha8Rng, n: usize, block_len: usize) -> Vec<Request> {
    (0..n)
        .map(|_| {
            let seed = r.r#gen::<u64>();
            let answer_len: usize = r.gen_range(1..14);
            let nblocks = answer_len.div_ceil(block_len);
            let steps = loop {
                let k = r.gen_range(nblocks..=answer_len);
                if schedule::text_schedule(answer_len, block_len, k).is_ok() {
                    break k;
                }
            };
            Task::Text(TextRequest {
                prompt: prompt(r.gen_range(0..7), seed),
                answer_len,
                block_len,
                steps,
                temperature: [0.0, 0.7, 1.0][r.gen_range(0..3)],
                banned: if r.gen_bool(0.5) { vec![7, 8] } else { vec![] },
                seed,
            })
        })
        .collect()
}

/// The plans a run feeds, in order (prefill first when there is one).
#[derive(Default, Debug, PartialEq)]
struct Plans {
    prefill: Option<StepPlan>,
    steps: Vec<StepPlan>,
}

type Run = (Vec<Generation>, Plans);

/// `requests` as one batch on the host loop (`program`: through the host interpreter of the
/// batch's program instead), recording logits and plans.
fn run_batch(model: &Model<CpuBackend>, requests: &[Request], mode: Mode, program: bool) -> Run {
    let mut plans = Plans::default();
    let mut hook = |k: Option<usize>, p: &StepPlan| match k {
        None => plans.prefill = Some(p.clone()),
        Some(_) => plans.steps.push(p.clone()),
    };
    let opts = RunOptions {
        record_logits: true,
        on_plan: Some(&mut hook),
        ..RunOptions::default()
    };
    let gs = if program {
        let prog = sampler::batch_program(model.config(), requests, mode).unwrap();
        exec::run_batch_program(model, &prog, opts).unwrap()
    } else {
        exec::generate_batch(model, requests, mode, opts).unwrap()
    };
    (gs, plans)
}

/// Everything but the times, bit for bit (logits as bits).
fn assert_same_generation(got: &Generation, want: &Generation, what: &str) {
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    assert_eq!(got.forwards, want.forwards, "{what}: forwards");
    assert_eq!(got.rows_fed, want.rows_fed, "{what}: rows fed");
    assert_eq!(got.steps.len(), want.steps.len(), "{what}: steps");
    for (a, b) in got.steps.iter().zip(&want.steps) {
        let k = b.step;
        assert_eq!(a.step, k, "{what}");
        assert_eq!(a.query_positions, b.query_positions, "{what} step {k}");
        assert_eq!(a.decoded_positions, b.decoded_positions, "{what} step {k}");
        assert_eq!(a.tokens, b.tokens, "{what} step {k}: tokens");
        assert_eq!(a.rows_fed, b.rows_fed, "{what} step {k}: rows");
        let bits = |l: &Option<Vec<f32>>| -> Vec<u32> {
            l.as_ref()
                .expect("recorded")
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&a.logits), bits(&b.logits), "{what} step {k}: logits");
    }
}

/// The batch against each request alone, in every mode: generations equal bit for bit, and
/// every pass's plan is the solo plans side by side in the batch's regions. Also the host
/// interpreter of the batch program against the host loop.
fn check_batch(model: &Model<CpuBackend>, requests: &[Request], what: &str) {
    let cfg = model.config();
    for mode in Mode::all() {
        let what = format!("{what} {mode}");
        let (batch, batch_plans) = run_batch(model, requests, mode, false);
        assert_eq!(batch.len(), requests.len(), "{what}");
        let solo: Vec<Run> = (requests.iter())
            .map(|r| run_batch(model, std::slice::from_ref(r), mode, false))
            .collect();
        for (i, ((s, _), b)) in solo.iter().zip(&batch).enumerate() {
            assert_same_generation(b, &s[0], &format!("{what} request {i}"));
        }
        // The batch's plans: the solo plans side by side.
        let samplings: Vec<Sampling> = (requests.iter())
            .map(|r| Sampling::new(cfg, r, mode).unwrap())
            .collect();
        let regions = sampler::batch::regions(
            (samplings.iter()).map(|s| (s.layout().n_seqs(), s.layout().pool_slots())),
        )
        .unwrap();
        let concat = |plans: Vec<Option<&StepPlan>>| {
            let parts: Vec<_> = (regions.iter().zip(plans))
                .map(|(r, p)| r.part(p))
                .collect();
            StepPlan::concat(&parts).unwrap().0
        };
        let prefills: Vec<Option<&StepPlan>> =
            solo.iter().map(|(_, p)| p.prefill.as_ref()).collect();
        let want_prefill = prefills
            .iter()
            .any(Option::is_some)
            .then(|| concat(prefills));
        assert_eq!(batch_plans.prefill, want_prefill, "{what}: prefill plan");
        for (k, plan) in batch_plans.steps.iter().enumerate() {
            let want = concat(solo.iter().map(|(_, p)| p.steps.get(k)).collect());
            assert_eq!(plan, &want, "{what}: plan of step {k}");
        }
        // The device-resident algorithm, run on the host: the same generations and plans.
        let (prog, prog_plans) = run_batch(model, requests, mode, true);
        assert_eq!(prog_plans, batch_plans, "{what}: program plans");
        for (i, (p, b)) in prog.iter().zip(&batch).enumerate() {
            assert_same_generation(p, b, &format!("{what} request {i} (program)"));
        }
    }
}

#[test]
fn t2i_batches_equal_solo_runs_bit_for_bit() {
    let model = tiny_model(7);
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for (n, grid, steps) in [
        (3, (3, 4), 5),
        (4, (2, 3), 6),
        (2, (4, 4), 3),
        (1, (3, 3), 4),
    ] {
        let batch = t2i_batch(&mut r, n, grid, steps);
        check_batch(&model, &batch, &format!("t2i batch of {n}"));
    }
}

#[test]
fn text_batches_equal_solo_runs_bit_for_bit() {
    let model = tiny_model(8);
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for (n, block) in [(3, 4), (4, 3), (2, 5)] {
        let batch = text_batch(&mut r, n, block);
        check_batch(&model, &batch, &format!("text batch of {n}"));
    }
}

/// Sequences long enough (prompts of about 300) that the CPU attention walks several key tiles
/// and query tiles, run with 16 threads: a row's bits depend on its own sequence's keys alone,
/// so a batch still matches the solo runs bit for bit. A key tiling (or split) chosen from the
/// whole batch (a solo sequence's ~300 keys against the batch's ~900 and 3 or 6 sequences)
/// would change them (`scripts/emu-mutants --runtime` has such a mutant).
#[test]
fn long_sequences_stay_batch_invariant() {
    let model = tiny_model(9);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .unwrap();
    pool.install(|| {
        let mk = |plen: usize, seed: u64, guidance: f32| {
            Task::T2i(T2iRequest {
                prompt: prompt(plen, seed),
                height: 3,
                width: 3,
                steps: 3,
                guidance,
                temperature: 1.0,
                order: Order::Stratified,
                seed,
            })
        };
        let batch = vec![mk(300, 1, 2.0), mk(290, 2, 0.0), mk(310, 3, 1.5)];
        for mode in [Mode::Dense, Mode::Sparse(sampler::Switches::ALL_ON)] {
            let (b, _) = run_batch(&model, &batch, mode, false);
            for (i, req) in batch.iter().enumerate() {
                let (s, _) = run_batch(&model, std::slice::from_ref(req), mode, false);
                assert_same_generation(&b[i], &s[0], &format!("{mode} request {i}"));
            }
        }
    });
}

/// A request's randomness is its own: the same request anywhere in a batch gives the same
/// tokens, and the default seeds of `--batch` (`seed + i`) give different ones.
#[test]
fn the_same_request_gives_the_same_tokens_anywhere_in_a_batch() {
    let model = tiny_model(10);
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let mut batch = t2i_batch(&mut r, 3, (4, 4), 4);
    batch.insert(2, batch[0].clone());
    let mode = Mode::Sparse(sampler::Switches::ALL_ON);
    let (gs, _) = run_batch(&model, &batch, mode, false);
    assert_eq!(gs[0].tokens, gs[2].tokens);
    assert_eq!(gs[0].steps, gs[2].steps);
}

fn input_error<T: std::fmt::Debug>(r: sparse_lavida::Result<T>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

/// One bad request (or one that does not share what it must) refuses the whole batch, naming
/// it, before any pass runs; the batch program refuses it the same way.
#[test]
fn a_bad_request_refuses_the_batch_before_any_work() {
    let model = tiny_model(11);
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let good = t2i_batch(&mut r, 3, (3, 3), 3);
    let with = |i: usize, f: &dyn Fn(&mut T2iRequest)| {
        let mut b = good.clone();
        let Task::T2i(req) = &mut b[i] else {
            unreachable!()
        };
        f(req);
        b
    };
    let text = text_batch(&mut r, 1, 4).remove(0);
    let mut mixed = good.clone();
    mixed.push(text);
    let cases: Vec<(Vec<Request>, &str)> = vec![
        (with(2, &|q| q.prompt.push(299)), "request 2: prompt token"),
        (with(1, &|q| q.temperature = -1.0), "request 1: temperature"),
        (with(2, &|q| q.guidance = f32::NAN), "request 2: guidance"),
        (with(1, &|q| q.height = 4), "request 1: grid 4x3 differs"),
        (with(2, &|q| q.steps = 2), "request 2: 2 steps differ"),
        (with(1, &|q| q.order = Order::Raster), "request 1: order"),
        (mixed, "request 3: another task"),
        (Vec::new(), "at least one request"),
    ];
    for (batch, want) in cases {
        for mode in [Mode::Dense, Mode::Sparse(sampler::Switches::ALL_ON)] {
            let mut passes = 0;
            let mut hook = |_: Option<usize>, _: &StepPlan| passes += 1;
            let opts = RunOptions {
                on_plan: Some(&mut hook),
                ..RunOptions::default()
            };
            let m = input_error(exec::generate_batch(&model, &batch, mode, opts));
            assert!(m.contains(want), "{mode}: {m} (want {want})");
            assert_eq!(passes, 0, "{mode}: {want}: a pass ran");
            let m = input_error(sampler::batch_program(model.config(), &batch, mode));
            assert!(m.contains(want), "{mode} program: {m} (want {want})");
        }
    }
    // A single request keeps its unprefixed message.
    let m = input_error(exec::generate(
        &model,
        &with(0, &|q| q.prompt.push(299))[0],
        Mode::Dense,
        RunOptions::default(),
    ));
    assert!(m.starts_with("prompt token"), "{m}");
}

/// `matmul_t` computes every output element from its row of `x` and its row of `w` in a fixed
/// order: the same bits for a row alone, in any batch, and whatever the thread count (which
/// decides how rows or columns are split into blocks).
#[test]
fn matmul_rows_do_not_depend_on_the_rows_around_them() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    for (rows, k, n) in [(37, 300, 70), (5, 513, 129), (130, 64, 33), (1, 1000, 9)] {
        let x: Vec<f32> = (0..rows * k).map(|_| r.gen_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.gen_range(-1.0..1.0)).collect();
        let acc: Vec<f32> = (0..rows * n).map(|_| r.gen_range(-1.0..1.0)).collect();
        for accumulate in [false, true] {
            let full = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = acc.clone();
                pool.install(|| matmul_t(&x, rows, k, &w, n, &mut out, accumulate).unwrap());
                out
            };
            let want = full(1);
            for threads in [2, 3, 8] {
                let got = full(threads);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{rows}x{k}x{n}, {threads} threads"
                );
            }
            for i in 0..rows {
                let mut out = acc[i * n..(i + 1) * n].to_vec();
                matmul_t(&x[i * k..(i + 1) * k], 1, k, &w, n, &mut out, accumulate).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&want[i * n..(i + 1) * n]), "row {i} alone");
            }
        }
    }
}

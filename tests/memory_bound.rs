//! Property: random configs and flag sets (valid, invalid and absurdly large) either run or fail
//! with the crate's `Error` — never a panic, never a hang — and a run never allocates more heap
//! than `memory` computed for it before it started.
//!
//! A counting global allocator measures the heap: its high watermark over a run, less what was
//! allocated before, must stay within the bound. Everything in this file runs in one test so
//! that no other test's allocations mix in.

use proptest::prelude::*;
use sparse_lavida::case::{Case, CaseId, CaseRow, RegisterMarker};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::error::Error;
use sparse_lavida::exec;
use sparse_lavida::image::{GridPicture, PictureLayout};
use sparse_lavida::memory::{self, Limit, Need, Target, WeightsFrom};
use sparse_lavida::request::{PromptSpec, TaskKind, Workload};
use sparse_lavida::runtime::{WeightSource, cpu_model};
use sparse_lavida::sampler::{self, Execution, Mode, RunOptions};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::{HostTensor, HostWeights, SaveDtype};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes in use and their high watermark.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    IN_USE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counters are only bookkeeping beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is: `ptr` came from this allocator (hence `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is: `ptr` came from `System` with `layout`; the caller upholds
        // `realloc`'s contract for `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as a new block beside the old one: `System` may copy, so both can exist
            // at once.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most heap it had in use at once beyond what was in
/// use before.
fn measured<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = IN_USE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (out, peak as u64)
}

/// Runs above this bound are not run: the check must refuse them against this limit.
const BUDGET: u64 = 256 << 20;
/// A case that passes its bound must finish well within this (they are tiny).
const TIME: Duration = Duration::from_secs(30);

/// Mostly small sizes, sometimes zero, sometimes absurd.
fn size(small: std::ops::Range<usize>) -> impl Strategy<Value = usize> {
    prop_oneof![
        40 => small,
        1 => Just(0usize),
        1 => Just(1usize << 40),
        1 => Just(1usize << 62),
        1 => Just(usize::MAX),
    ]
}

/// A valid small config, then, one time in four, one field set to a bad or absurd value.
fn config() -> impl Strategy<Value = Config> {
    let valid = (
        (1usize..40, 1usize..40, 1usize..5, 0usize..4, 1usize..9),
        (1usize..64, 1usize..64, 1usize..4, 0usize..4),
        (
            2usize..400,
            any::<prop::sample::Index>(),
            1usize..80,
            0usize..10,
        ),
    )
        .prop_map(
            |(
                (d_text, d_image, n_heads, kv, half_dim),
                (mlp_text, mlp_image, n_layers, joint),
                (tv, mask, iv, r),
            )| {
                let divisors: Vec<usize> = (1..=n_heads).filter(|d| n_heads % d == 0).collect();
                Config {
                    d_text,
                    d_image,
                    n_heads,
                    n_kv_heads: divisors[kv % divisors.len()],
                    head_dim: 2 * half_dim,
                    mlp_text,
                    mlp_image,
                    n_layers,
                    n_joint_layers: joint.min(n_layers),
                    rope_theta: 10000.0,
                    norm_eps: 1e-5,
                    text_vocab: tv,
                    text_mask_id: mask.index(tv) as u32,
                    image_vocab: iv,
                    n_registers: r,
                }
            },
        );
    let bad = prop_oneof![
        Just(0usize),
        Just(1 << 20),
        Just(1 << 40),
        Just(1 << 62),
        Just(usize::MAX)
    ];
    (valid, 0usize..40, bad).prop_map(|(mut c, field, v)| {
        match field {
            0 => c.d_text = v,
            1 => c.d_image = v,
            2 => c.n_heads = v,
            3 => c.n_kv_heads = v,
            4 => c.head_dim = v,
            5 => c.mlp_text = v,
            6 => c.mlp_image = v,
            7 => c.n_layers = v,
            8 => c.n_joint_layers = v,
            9 => c.text_vocab = v,
            10 => c.image_vocab = v,
            11 => c.n_registers = v,
            12 => c.text_mask_id = v as u32,
            _ => {}
        }
        c
    })
}

fn workload() -> impl Strategy<Value = (Workload, bool)> {
    let t2i = any::<bool>();
    (
        (
            t2i,
            prop::option::weighted(0.6, size(1..20)),
            size(1..13),
            size(1..13),
        ),
        (prop_oneof![3 => size(0..12).prop_map(PromptSpec::Random),
                     1 => prop::collection::vec(0u32..420, 0..8).prop_map(PromptSpec::Ids)]),
        (
            size(1..70),
            size(1..40),
            prop_oneof![4 => Just(0.0f32), 4 => Just(2.5), 1 => Just(f32::NAN)],
        ),
        (
            prop_oneof![4 => Just(1.0f32), 2 => Just(0.0), 2 => Just(0.7), 1 => Just(-1.0)],
            0u8..3,
            any::<u64>(),
        ),
        (0.0f64..1.0, any::<bool>()),
    )
        .prop_map(
            |(
                (t2i, steps, h, w),
                prompt,
                (answer, block, guidance),
                (temperature, order, seed),
                (stray, image),
            )| {
                let task = if t2i { TaskKind::T2i } else { TaskKind::Text };
                // Flags of the other task now and then: they must be refused.
                let other = stray < 0.1;
                let work = Workload {
                    task,
                    steps,
                    grid: (t2i || other).then_some((h, w)),
                    prompt,
                    answer_len: (!t2i || other).then_some(answer),
                    block: (!t2i || other).then_some(block),
                    guidance: t2i.then_some(guidance),
                    temperature,
                    order: t2i
                        .then(|| [Order::Stratified, Order::Raster, Order::Random][order as usize]),
                    seed,
                };
                (work, image && t2i)
            },
        )
}

fn forward_case() -> impl Strategy<Value = Case> {
    let row = (
        any::<bool>(),
        0u32..420,
        any::<bool>(),
        0u32..64,
        0u32..4,
        any::<bool>(),
    )
        .prop_map(|(image, id, reg, pos, block, masked)| CaseRow {
            branch: if image { Branch::Image } else { Branch::Text },
            id: if reg && id % 5 == 0 {
                CaseId::Register(RegisterMarker::Reg)
            } else {
                CaseId::Token(id)
            },
            pos,
            block,
            masked,
        });
    (
        prop::collection::vec(row, 0..40),
        prop::collection::vec(0usize..44, 0..6),
    )
        .prop_map(|(rows, logits_for)| Case { rows, logits_for })
}

/// An error from a refused or failed request: any variant of the crate's `Error` is fine, as
/// long as it says something.
fn acceptable(e: &Error) {
    assert!(!e.to_string().is_empty());
}

/// The bound of a generation, or `None` when computing it already refused the request.
fn generation_need(cfg: &Config, work: &Workload, image: bool) -> Option<u64> {
    let shape = match work.shape(cfg) {
        Ok(s) => s,
        Err(e) => {
            acceptable(&e);
            return None;
        }
    };
    let px = match (image, shape.grid) {
        (true, Some((h, w))) => match PictureLayout::of(h as usize, w as usize) {
            Ok(l) => l.pixels(),
            Err(e) => {
                acceptable(&e);
                return None;
            }
        },
        _ => 0,
    };
    let mut need = Need::default();
    let r = memory::add_weights(&mut need, cfg, Target::Cpu, WeightsFrom::Random)
        .and_then(|_| memory::add_generation(&mut need, cfg, &shape, Target::Cpu, px))
        .and_then(|_| need.host_total());
    match r {
        Ok(total) => Some(total),
        Err(e) => {
            assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
            None
        }
    }
}

/// Refuses against the test's budget when over it; true when the request may run.
fn within_budget(need: &Need, total: u64) -> bool {
    let limit = Some(Limit {
        bytes: BUDGET,
        source: "the test's budget",
    });
    let checked = need.check_host_against("this request", limit);
    if total > BUDGET {
        let e = checked.expect_err("over the budget but not refused");
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert!(e.to_string().contains("the test's budget"), "{e}");
        false
    } else {
        checked.unwrap();
        true
    }
}

/// Runs a generation as the CLI does (with its outputs) and checks its heap peak against
/// `total`; returns the peak.
fn run_generation(cfg: Config, work: &Workload, image: bool, mode: Mode, total: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let (result, peak) = measured(|| -> sparse_lavida::Result<()> {
        let task = work.task(&cfg)?;
        let model = cpu_model(cfg.clone(), &WeightSource::Random(work.seed))?;
        let g = exec::generate_with(
            &model,
            &task,
            mode,
            Execution::Graphs,
            RunOptions::default(),
        )?;
        // The outputs the CLI writes.
        sparse_lavida::io::write_json(&dir.path().join("out.json"), &g.tokens)?;
        sparse_lavida::io::write_json(&dir.path().join("trace.json"), &g.steps)?;
        if let (true, sampler::Task::T2i(r)) = (image, &task) {
            GridPicture::from_trace(r.height, r.width, cfg.image_vocab, &g.steps)?
                .write_png(&dir.path().join("g.png"))?;
        }
        Ok(())
    });
    if let Err(e) = &result {
        acceptable(e);
    }
    assert!(
        peak <= total,
        "{mode} {work:?} on {cfg:?}: peak heap {peak} B over the bound {total} B ({result:?})"
    );
    assert!(
        start.elapsed() < TIME,
        "{work:?} took {:?}",
        start.elapsed()
    );
    peak
}

fn run_forward(cfg: Config, case: &Case) {
    let vocab = case
        .logits_for
        .first()
        .and_then(|&i| case.rows.get(i))
        .map_or(0, |r| cfg.vocab(r.branch)) as u64;
    let mut need = Need::default();
    let total = memory::add_weights(&mut need, &cfg, Target::Cpu, WeightsFrom::Random)
        .and_then(|_| {
            memory::add_forward(
                &mut need,
                &cfg,
                case.rows_per_branch(),
                case.logits_for.len() as u64,
                vocab,
                Target::Cpu,
            )
        })
        .and_then(|_| need.host_total());
    let total = match total {
        Ok(t) => t,
        Err(e) => return assert!(matches!(e, Error::OutOfMemory(_)), "{e}"),
    };
    if !within_budget(&need, total) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (result, peak) = measured(|| -> sparse_lavida::Result<()> {
        let plan = case.plan(&cfg)?;
        let model = cpu_model(cfg.clone(), &WeightSource::Random(1))?;
        let n = plan.logits_rows.len();
        let mut cache = model.new_cache(plan.pool_slots)?;
        let logits = model.forward(&model.prepare(plan)?, &mut cache)?;
        let data = logits.map(|m| m.data).unwrap_or_default();
        let tensor = HostTensor {
            shape: vec![n, data.len() / n.max(1)],
            data,
        };
        HostWeights {
            tensors: [("logits".to_string(), tensor)].into(),
        }
        .save(&dir.path().join("o.safetensors"), SaveDtype::F32)
    });
    if let Err(e) = &result {
        acceptable(e);
    }
    assert!(
        peak <= total,
        "forward {case:?}: peak {peak} B over the bound {total} B"
    );
}

#[derive(Debug, Clone)]
enum Request {
    Generate(Workload, bool, usize),
    Forward(Case),
}

/// The CLI's own workloads on `small`: the bound holds, and it is not so loose that it would
/// refuse them on a machine with a few times their real need.
fn realistic_requests_fit_their_bound_tightly() {
    let small = Config::preset("small").unwrap();
    let t2i = |grid, steps, guidance| Workload {
        grid: Some(grid),
        steps: Some(steps),
        guidance: Some(guidance),
        ..Workload::new(TaskKind::T2i)
    };
    let sparse = |cache_prompt, cache_decoded, truncate| {
        Mode::Sparse(sampler::Switches {
            cache_prompt,
            cache_decoded,
            truncate,
        })
    };
    for (work, mode, image) in [
        (t2i((32, 32), 64, 4.0), sparse(true, true, true), true),
        (t2i((16, 16), 8, 4.0), Mode::Dense, false),
        (t2i((24, 16), 8, 0.0), sparse(false, false, false), true),
        (
            Workload::new(TaskKind::Text),
            sparse(true, true, true),
            false,
        ),
        (Workload::new(TaskKind::Text), Mode::Dense, false),
    ] {
        let total = generation_need(&small, &work, image).unwrap();
        let sized = total - memory::FIXED_OVERHEAD;
        let peak = run_generation(small.clone(), &work, image, mode, total);
        assert!(
            sized < 4 * peak,
            "{mode} {work:?}: bound {sized} B (without the fixed overhead) is over 4x the \
             real peak {peak} B"
        );
    }
}

/// Batches (`generate --batch`) on `small`: the bound of [`memory::add_batch`] holds for the
/// whole batch, and is not so loose that it would refuse it on a machine with a few times its
/// real need.
fn batches_fit_their_bound() {
    let small = Config::preset("small").unwrap();
    let t2i = Workload {
        grid: Some((16, 16)),
        steps: Some(8),
        prompt: PromptSpec::Random(24),
        ..Workload::new(TaskKind::T2i)
    };
    let text = Workload {
        answer_len: Some(64),
        ..Workload::new(TaskKind::Text)
    };
    for (work, n, mode) in [
        (&t2i, 4, Mode::Sparse(sampler::Switches::ALL_ON)),
        (&t2i, 3, Mode::Dense),
        (&text, 3, Mode::Sparse(sampler::Switches::ALL_ON)),
    ] {
        let works = work.batch(n, None).unwrap();
        let shapes: Vec<_> = works.iter().map(|w| w.shape(&small).unwrap()).collect();
        let mut need = Need::default();
        memory::add_weights(&mut need, &small, Target::Cpu, WeightsFrom::Random).unwrap();
        memory::add_batch(&mut need, &small, &shapes, Target::Cpu, 0).unwrap();
        let total = need.host_total().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (result, peak) = measured(|| -> sparse_lavida::Result<()> {
            let tasks = (works.iter())
                .map(|w| w.task(&small))
                .collect::<sparse_lavida::Result<Vec<_>>>()?;
            let model = cpu_model(small.clone(), &WeightSource::Random(1))?;
            let gs = exec::generate_batch_with(
                &model,
                &tasks,
                mode,
                Execution::Graphs,
                RunOptions::default(),
            )?;
            for (i, g) in gs.iter().enumerate() {
                sparse_lavida::io::write_json(&dir.path().join(format!("o{i}.json")), &g.tokens)?;
                sparse_lavida::io::write_json(&dir.path().join(format!("t{i}.json")), &g.steps)?;
            }
            Ok(())
        });
        result.unwrap();
        assert!(
            peak <= total,
            "{mode} batch of {n}: peak heap {peak} B over the bound {total} B"
        );
        let sized = total - memory::FIXED_OVERHEAD;
        assert!(
            sized < 4 * peak,
            "{mode} batch of {n}: bound {sized} B (without the fixed overhead) is over 4x the \
             real peak {peak} B"
        );
    }
}

#[test]
fn requests_run_or_fail_cleanly_within_their_bound() {
    realistic_requests_fit_their_bound_tightly();
    batches_fit_their_bound();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    });
    let requests = prop_oneof![
        3 => (workload(), 0usize..9).prop_map(|((w, image), mode)| Request::Generate(w, image, mode)),
        1 => forward_case().prop_map(Request::Forward),
    ];
    runner
        .run(&(config(), requests), |(cfg, request)| {
            one_request(cfg, request);
            Ok(())
        })
        .unwrap();
}

/// One random request: refused at once from the config and flags, refused against the
/// budget, or run within its bound.
fn one_request(cfg: Config, request: Request) {
    let start = Instant::now();
    if let Err(e) = cfg.validate() {
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
        return;
    }
    match request {
        Request::Generate(work, image, mode) => {
            let Some(total) = generation_need(&cfg, &work, image) else {
                // Refused from the flags and the config alone: at once.
                assert!(start.elapsed() < Duration::from_secs(1));
                return;
            };
            let shape = work.shape(&cfg).unwrap();
            let mut need = Need::default();
            memory::add_weights(&mut need, &cfg, Target::Cpu, WeightsFrom::Random).unwrap();
            let px = if image {
                let (h, w) = shape.grid.unwrap();
                PictureLayout::of(h as usize, w as usize).unwrap().pixels()
            } else {
                0
            };
            memory::add_generation(&mut need, &cfg, &shape, Target::Cpu, px).unwrap();
            if !within_budget(&need, total) {
                assert!(start.elapsed() < Duration::from_secs(1));
                return;
            }
            run_generation(cfg, &work, image, Mode::all()[mode], total);
        }
        Request::Forward(case) => run_forward(cfg, &case),
    }
}

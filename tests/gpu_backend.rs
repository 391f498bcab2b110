//! The CUDA backend against the CPU oracle (SPEC §6): cuBLASLt products, whole generations
//! step by step (teacher-forced, so both backends see identical inputs at every step), and the
//! `forward` pass on random cases.
//!
//! Device tests need a CUDA device: built with the `emulator` feature they run on the emulated
//! one (`./scripts/test` puts it on the loader's path), otherwise they are ignored and a GPU
//! machine runs them with `cargo test --release --test gpu_backend -- --include-ignored
//! --nocapture --test-threads=1` (`scripts/gpu-check`; they print the largest error of each
//! case; one thread, as graph captures must not share the device with another test's
//! synchronising calls). Every model uses the same bf16-rounded weights (the CUDA backend stores
//! bf16 weights by design), so the comparison measures the bf16 activations and the kernels,
//! not the weights' storage.
//!
//! Accuracy rule (SPEC §6): relative L2 error of the logits ≤ 1e-2, or ≤ 2× the error of a
//! naive bf16 implementation of the same computation. That implementation is [`Bf16Twin`]: the
//! CPU backend with every bf16 store of the CUDA backend (activations, the rotated q, the K/V
//! pool) rounded to bf16. Through several layers of random weights its own error is already
//! close to 1e-2, so each step's bound is `max(1e-2, 2 · twin error)`.
//!
//! The tests without a GPU check that the probe and the device choice fail cleanly, and run the
//! comparison harness CPU against CPU and the twin.

mod common;

use common::rel_l2;
use common::twin::{Bf16Twin, bound};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::Error;
use sparse_lavida::backend::cpu::CpuBackend;
use sparse_lavida::backend::cpu::ops as cpu;
use sparse_lavida::backend::cuda::CudaBackend;
use sparse_lavida::backend::{Backend, MatrixKind};
use sparse_lavida::case::{Case, CaseId, CaseRow, RegisterMarker};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::cuda::blas::{Gemm, GemmOut, GemmShape};
use sparse_lavida::cuda::device::{CudaDevice, NO_DRIVER};
use sparse_lavida::exec;
use sparse_lavida::model::Model;
use sparse_lavida::runtime::{self, Device, Resolved, WeightSource};
use sparse_lavida::sampler::{
    Execution, Generation, Mode, RunOptions, StepTrace, Switches, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::{HostTensor, HostWeights};

// ------------------------------------------------------------------------------------------
// Host-side tests (no GPU)
// ------------------------------------------------------------------------------------------

#[test]
fn cuda_backend_new_is_an_error_not_a_panic_without_a_gpu() {
    match CudaBackend::new() {
        Ok(be) => assert!(be.name().starts_with("cuda (bf16, "), "{}", be.name()),
        Err(Error::Unavailable(msg)) => {
            assert!(!msg.is_empty());
            if msg.contains("libcuda") {
                assert_eq!(msg, NO_DRIVER);
            }
        }
        Err(e) => panic!("expected Unavailable, got: {e}"),
    }
}

#[test]
fn auto_falls_back_to_cpu_with_a_note_and_cuda_names_the_reason() {
    // `tiny` has head_dim 16: no attention kernel, so auto picks the CPU on every machine.
    let tiny = Config::preset("tiny").unwrap();
    let (resolved, note) = runtime::resolve_device(Device::Auto, &tiny).unwrap();
    assert!(matches!(resolved, Resolved::Cpu));
    let note = note.expect("auto explains its choice");
    assert!(note.contains("using the CPU backend"), "{note}");
    let why = match CudaBackend::new() {
        Err(e) => runtime::reason(&e),
        Ok(_) => "head_dim 16".into(),
    };
    assert!(note.contains(&why), "{note} lacks {why}");
    let e = runtime::resolve_device(Device::Cuda, &tiny).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(e.to_string().contains(&why), "{e}");

    // `small` (head_dim 64) runs on CUDA exactly when the backend opens.
    let small = Config::preset("small").unwrap();
    let (resolved, note) = runtime::resolve_device(Device::Auto, &small).unwrap();
    match CudaBackend::new() {
        Ok(_) => assert!(matches!(resolved, Resolved::Cuda(_))),
        Err(e) => {
            assert!(matches!(resolved, Resolved::Cpu));
            assert!(note.unwrap().contains(&runtime::reason(&e)));
        }
    }
    let (model, _) = runtime::build_model(tiny, Device::Auto, &WeightSource::Random(1)).unwrap();
    assert!(matches!(model, runtime::AnyModel::Cpu(_)));
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn backend() -> CudaBackend {
    CudaBackend::new().unwrap_or_else(|e| panic!("{}: {e}", common::NEED_DEVICE))
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `tiny` with head_dim 64 (2 query heads sharing 1 K/V head: GQA), which the CUDA attention
/// kernels support.
fn tiny_hd64() -> Config {
    Config {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
        ..Config::preset("tiny").unwrap()
    }
}

/// The configs every model test runs on.
fn configs() -> Vec<(&'static str, Config)> {
    vec![
        ("small", Config::preset("small").unwrap()),
        ("tiny-hd64", tiny_hd64()),
    ]
}

/// Random weights rounded to bf16, so both backends hold exactly the same values.
fn bf16_weights(cfg: &Config, seed: u64) -> HostWeights {
    let mut w = HostWeights::random(cfg, seed);
    for t in w.tensors.values_mut() {
        for v in &mut t.data {
            *v = bf16::from_f32(*v).to_f32();
        }
    }
    w
}

/// The CPU oracle and its naive bf16 twin, on the same bf16-rounded weights.
struct Oracles {
    cpu: Model<CpuBackend>,
    twin: Model<Bf16Twin>,
}

fn oracles(cfg: &Config, seed: u64) -> (Oracles, HostWeights) {
    let w = bf16_weights(cfg, seed);
    let cpu = Model::new(CpuBackend::new(), cfg.clone(), w.clone()).unwrap();
    let twin = Model::new(Bf16Twin(CpuBackend::new()), cfg.clone(), w.clone()).unwrap();
    (Oracles { cpu, twin }, w)
}

fn cuda_model(cfg: &Config, w: HostWeights) -> Model<CudaBackend> {
    Model::new(backend(), cfg.clone(), w).unwrap()
}

fn prompt(cfg: &Config, len: usize, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..len)
        .map(|_| {
            loop {
                let id = r.gen_range(0..cfg.text_vocab as u32);
                if id != cfg.text_mask_id {
                    break id;
                }
            }
        })
        .collect()
}

/// Text-to-image with CFG on, and a text answer of three blocks.
fn tasks(cfg: &Config, seed: u64) -> Vec<Task> {
    vec![
        Task::T2i(T2iRequest {
            prompt: prompt(cfg, 7, seed),
            height: 6,
            width: 5,
            steps: 6,
            guidance: 2.0,
            temperature: 1.0,
            order: Order::Stratified,
            seed,
        }),
        Task::Text(TextRequest {
            prompt: prompt(cfg, 9, seed),
            answer_len: 20,
            block_len: 8,
            steps: 9,
            temperature: 1.0,
            banned: vec![],
            seed,
        }),
    ]
}

fn generate<B: Backend>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    teacher: Option<&[StepTrace]>,
) -> Generation {
    exec::generate(
        model,
        task,
        mode,
        RunOptions {
            record_logits: true,
            teacher,
            ..RunOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{mode}: {e}"))
}

fn task_name(t: &Task) -> &'static str {
    match t {
        Task::T2i(_) => "t2i",
        Task::Text(_) => "text",
    }
}

// ------------------------------------------------------------------------------------------
// cuBLASLt
// ------------------------------------------------------------------------------------------

/// `Gemm::matmul` against `cpu::matmul_t` on the same bf16 values: bf16 output (rel L2 ≤ 1e-2),
/// f32 output and the fused residual add (≤ 1e-3), odd sizes included; outputs are poisoned
/// first, values past the shape are left alone, and a shape is planned once.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_gemm_matches_cpu_matmul() {
    let be = backend();
    let dev: &CudaDevice = be.device();
    let gemm = Gemm::new(dev).unwrap();
    let mut r = rng(5);
    let shapes = [
        (1, 3, 40),
        (7, 300, 40),
        (1, 300, 40),
        (7, 3, 40),
        (64, 256, 128),
        (33, 129, 72),
        (130, 64, 256),
    ];
    const TAIL: usize = 5;
    for &(m, n, k) in &shapes {
        let shape = GemmShape { m, n, k };
        let x: Vec<bf16> = (0..m * k)
            .map(|_| bf16::from_f32(r.gen_range(-1.0..1.0)))
            .collect();
        let w: Vec<bf16> = (0..n * k)
            .map(|_| bf16::from_f32(r.gen_range(-1.0..1.0)))
            .collect();
        let (xf, wf): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|v| v.to_f32()).collect(),
            w.iter().map(|v| v.to_f32()).collect(),
        );
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
        let what = format!("[{m}, {k}] · [{n}, {k}]ᵀ");

        // bf16 out, overwritten: poison with NaN, and a tail that must stay as it was.
        let mut want = vec![0f32; m * n];
        cpu::matmul_t(&xf, m, k, &wf, n, &mut want, false).unwrap();
        let mut out = dev
            .upload(&vec![bf16::from_f32(f32::NAN); m * n + TAIL])
            .unwrap();
        gemm.matmul(&xd, &wd, shape, GemmOut::Bf16(&mut out), false)
            .unwrap();
        let got: Vec<f32> = dev
            .download(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert!(
            got[m * n..].iter().all(|v| v.is_nan()),
            "{what}: tail written"
        );
        let got = &got[..m * n];
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what}: unwritten output"
        );
        let e = rel_l2(got, &want);
        assert!(e <= 1e-2, "{what} bf16 out: rel L2 {e}");

        // f32 out, overwritten.
        let mut out = dev.upload(&vec![f32::NAN; m * n]).unwrap();
        gemm.matmul(&xd, &wd, shape, GemmOut::F32(&mut out), false)
            .unwrap();
        let got = dev.download(&out).unwrap();
        let e = rel_l2(&got, &want);
        assert!(e <= 1e-3, "{what} f32 out: rel L2 {e}");

        // f32 out, accumulated into a random residual (beta = 1, C = D).
        let residual: Vec<f32> = (0..m * n).map(|_| r.gen_range(-2.0..2.0)).collect();
        let mut want_acc = residual.clone();
        cpu::matmul_t(&xf, m, k, &wf, n, &mut want_acc, true).unwrap();
        let mut out = dev.upload(&residual).unwrap();
        gemm.matmul(&xd, &wd, shape, GemmOut::F32(&mut out), true)
            .unwrap();
        let got = dev.download(&out).unwrap();
        let e = rel_l2(&got, &want_acc);
        assert!(e <= 1e-3, "{what} f32 accumulate: rel L2 {e}");
        println!("gemm {what}: ok");
    }
    let planned = gemm.plans();
    assert!(planned >= shapes.len(), "{planned} plans");
    // The same shapes again reuse their plans.
    for &(m, n, k) in &shapes {
        let x = dev.alloc_zeros::<bf16>(m * k).unwrap();
        let w = dev.alloc_zeros::<bf16>(n * k).unwrap();
        let mut out = dev.alloc_zeros::<f32>(m * n).unwrap();
        gemm.matmul(&x, &w, GemmShape { m, n, k }, GemmOut::F32(&mut out), true)
            .unwrap();
    }
    assert_eq!(gemm.plans(), planned, "a shape was planned twice");
    // Every plan's algorithm choice is recorded once: among the heuristic's candidates, the
    // fastest on a GPU (every candidate timed), the first on the emulated device.
    let choices = gemm.choices();
    assert_eq!(choices.len(), planned, "{choices:?}");
    for c in &choices {
        assert!(c.candidates >= 1 && c.chosen < c.candidates, "{c:?}");
        if dev.info().emulated {
            assert_eq!((c.chosen, &c.seconds), (0, &None), "{c:?}");
        } else if c.candidates > 1 {
            let t = c.seconds.as_ref().expect("timed on a GPU");
            assert_eq!(t.len(), c.candidates, "{c:?}");
            assert!(
                t.iter().all(|&s| s >= t[c.chosen]),
                "not the fastest: {c:?}"
            );
        }
    }

    // Bad lengths are errors before anything is queued.
    let x = dev.alloc_zeros::<bf16>(10).unwrap();
    let w = dev.alloc_zeros::<bf16>(12).unwrap();
    let mut out = dev.alloc_zeros::<f32>(6).unwrap();
    let e = gemm
        .matmul(
            &x,
            &w,
            GemmShape { m: 3, n: 2, k: 4 },
            GemmOut::F32(&mut out),
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("x holds 10 values, needs 12"), "{e}");
}

// ------------------------------------------------------------------------------------------
// Whole generations
// ------------------------------------------------------------------------------------------

/// Runs every task of [`tasks`] in every mode on the CPU oracle, then on its bf16 twin and on
/// `other`, both teacher-forced by the CPU trace, and checks each step's `C_k` logits: `other`
/// within [`bound`] of the CPU's. Returns the worst (twin, other) errors.
fn compare_generations<B: Backend>(
    name: &str,
    cfg: &Config,
    o: &Oracles,
    other: &Model<B>,
) -> (f64, f64) {
    let (mut worst_twin, mut worst_other) = (0f64, 0f64);
    for task in tasks(cfg, 3) {
        for mode in Mode::all() {
            let want = generate(&o.cpu, &task, mode, None);
            let twin = generate(&o.twin, &task, mode, Some(&want.steps));
            let got = generate(other, &task, mode, Some(&want.steps));
            let what = format!("{name} {} {mode}", task_name(&task));
            assert_eq!(got.tokens, want.tokens, "{what}: teacher forcing");
            assert_eq!(got.steps.len(), want.steps.len(), "{what}");
            let (mut wt, mut wo) = (0f64, 0f64);
            for ((g, t), w) in got.steps.iter().zip(&twin.steps).zip(&want.steps) {
                let step = g.step;
                assert_eq!(g.query_positions, w.query_positions, "{what} step {step}");
                assert_eq!(g.rows_fed, w.rows_fed, "{what} step {step}");
                let wl = w.logits.as_ref().unwrap();
                let (gl, tl) = (g.logits.as_ref().unwrap(), t.logits.as_ref().unwrap());
                assert!(gl.iter().all(|v| v.is_finite()), "{what} step {step}: NaN");
                let (et, eo) = (rel_l2(tl, wl), rel_l2(gl, wl));
                assert!(
                    eo <= bound(et),
                    "{what} step {step}: logits rel L2 {eo:.3e} (naive bf16: {et:.3e})"
                );
                (wt, wo) = (wt.max(et), wo.max(eo));
            }
            println!("{what}: worst step rel L2 {wo:.2e} (naive bf16 {wt:.2e})");
            (worst_twin, worst_other) = (worst_twin.max(wt), worst_other.max(wo));
        }
    }
    (worst_twin, worst_other)
}

/// The comparison harness itself, on the head_dim-64 `tiny` (runs here): the tasks are valid in
/// every mode, a run teacher-forced by an identical CPU model reproduces its logits exactly,
/// and the bf16 twin's error is real (not zero) but small.
#[test]
fn comparison_harness_runs_on_cpu() {
    let cfg = tiny_hd64();
    let (o, w) = oracles(&cfg, 11);
    let same = Model::new(CpuBackend::new(), cfg.clone(), w).unwrap();
    let (twin, other) = compare_generations("cpu", &cfg, &o, &same);
    assert_eq!(other, 0.0);
    assert!(twin > 1e-4 && twin < 3e-2, "naive bf16 error {twin}");
}

/// Every task (t2i with CFG, text), mode (dense and the eight switch combinations) and config:
/// the CUDA run, teacher-forced by the CPU run's trace, gives each step's `C_k` logits within
/// SPEC §6's bound of the CPU's.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_generations_match_cpu_step_by_step() {
    for (name, cfg) in configs() {
        let (o, w) = oracles(&cfg, 11);
        let gpu = cuda_model(&cfg, w);
        let (twin, cuda) = compare_generations(name, &cfg, &o, &gpu);
        println!(
            "{name}: worst step rel L2 over every task and mode {cuda:.2e} (naive bf16 {twin:.2e})"
        );
    }
}

/// The same request twice on CUDA chooses the same tokens (and, as the kernels and the cached
/// cuBLASLt algorithms are deterministic, the same logits).
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_same_seed_twice_gives_identical_tokens() {
    let cfg = Config::preset("small").unwrap();
    let gpu = cuda_model(&cfg, bf16_weights(&cfg, 4));
    for task in tasks(&cfg, 8) {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let a = generate(&gpu, &task, mode, None);
            let b = generate(&gpu, &task, mode, None);
            let what = format!("{} {mode}", task_name(&task));
            assert_eq!(a.tokens, b.tokens, "{what}");
            let same_logits = a
                .steps
                .iter()
                .zip(&b.steps)
                .all(|(x, y)| x.logits == y.logits);
            println!("{what}: tokens identical, logits bit-identical: {same_logits}");
        }
    }
}

/// `Model::random_on_device` holds exactly `HostWeights::random_like_device` (its CPU twin, which
/// `init-weights --like-device` writes and the PyTorch peer's `--weights-device-seed`
/// reproduces): every tensor, downloaded in `Config::tensor_shapes` order (q|k|v and gate|up
/// concatenated, as the model holds them from load), equal bit for bit.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_device_random_weights_equal_the_host_twin_bit_for_bit() {
    for (seed, cfg) in [
        (7, tiny_hd64()),
        (0x1_0000_0003, Config::preset("small").unwrap()),
    ] {
        let model = Model::random_on_device(backend(), cfg.clone(), seed).unwrap();
        let dev = model.backend().device();
        let bufs = model.tensors();
        let twin = HostWeights::random_like_device(&cfg, seed).unwrap();
        // The model holds q|k|v and gate|up concatenated (rows in that order): group the
        // file's tensors the same way.
        let mut groups: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (name, shape) in cfg.tensor_shapes() {
            let data = &twin.get(&name).unwrap().data;
            let joins = [".k", ".v", ".up"].iter().any(|s| name.ends_with(s));
            match groups.last_mut() {
                Some((n, sh, d)) if joins => {
                    *n = format!("{n}+{}", name.rsplit('.').next().unwrap());
                    sh[0] += shape[0];
                    d.extend_from_slice(data);
                }
                _ => groups.push((name, shape, data.clone())),
            }
        }
        assert_eq!(bufs.len(), groups.len());
        for (w, (name, shape, want)) in bufs.iter().zip(&groups) {
            assert_eq!(&w.shape, shape, "{name}");
            let got = dev.download(&w.buf).unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            let bad = got
                .iter()
                .zip(want)
                .position(|(g, w)| g.to_f32().to_bits() != w.to_bits());
            assert!(
                bad.is_none(),
                "seed {seed}, {name}: first difference at {bad:?}"
            );
        }
    }
}

/// Device-side random weights (`Model::random_on_device`, what `--device cuda` without
/// `--weights` uses): the same seed gives bit-identical weights and tokens twice, another seed
/// other weights; every tensor follows its distribution (range and mean of
/// `weights::init_range`); and a generation runs on them in every mode.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_device_random_weights_are_seeded_and_run() {
    let cfg = tiny_hd64();
    let a = Model::random_on_device(backend(), cfg.clone(), 11).unwrap();
    let b = runtime::cuda_model(backend(), cfg.clone(), &WeightSource::Random(11)).unwrap();
    let c = Model::random_on_device(backend(), cfg.clone(), 12).unwrap();
    let weights = |m: &Model<CudaBackend>| -> Vec<Vec<bf16>> {
        let dev = m.backend().device();
        (m.tensors().iter())
            .map(|w| dev.download(&w.buf).unwrap())
            .collect()
    };
    let (wa, wb, wc) = (weights(&a), weights(&b), weights(&c));
    assert_eq!(wa, wb, "same seed, same weights");
    assert_ne!(wa, wc, "another seed, other weights");
    // Text branch: embed U(-1, 1), register U(-1, 1), final_norm 1 + U(-0.1, 0.1), head
    // U(-a, a) with a = sqrt(3 / d).
    let d = cfg.d_model(Branch::Text) as f32;
    let ranges = [(0.0, 1.0), (0.0, 1.0), (1.0, 0.1), (0.0, (3.0 / d).sqrt())];
    for (t, &(offset, scale)) in wa.iter().zip(&ranges) {
        let vals: Vec<f32> = t.iter().map(|v| v.to_f32()).collect();
        // bf16 rounding may reach the bound itself.
        assert!(
            vals.iter()
                .all(|&v| (v - offset).abs() <= scale * (1.0 + 1.0 / 128.0)),
            "values outside {offset} ± {scale}"
        );
        let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / vals.len() as f64;
        let tol = 5.0 * f64::from(scale) / (3.0 * vals.len() as f64).sqrt() + 1e-2;
        assert!(
            (mean - f64::from(offset)).abs() < tol,
            "mean {mean}, want {offset}"
        );
    }
    for task in tasks(&cfg, 3) {
        for mode in [Mode::Dense, Mode::Sparse(Switches::ALL_ON)] {
            let ga = generate(&a, &task, mode, None);
            let gb = generate(&b, &task, mode, None);
            assert_eq!(ga.tokens, gb.tokens, "{} {mode}", task_name(&task));
            assert!(!ga.tokens.is_empty());
        }
    }
}

// ------------------------------------------------------------------------------------------
// forward on random cases
// ------------------------------------------------------------------------------------------

fn random_case(cfg: &Config, r: &mut ChaCha8Rng) -> Case {
    let n = r.gen_range(2..40);
    let mut rows: Vec<CaseRow> = (0..n)
        .map(|_| {
            let branch = if r.gen_bool(0.5) {
                Branch::Text
            } else {
                Branch::Image
            };
            let id = if r.gen_bool(0.15) {
                CaseId::Register(RegisterMarker::Reg)
            } else {
                CaseId::Token(r.gen_range(0..cfg.embed_rows(branch) as u32))
            };
            CaseRow {
                branch,
                id,
                pos: r.gen_range(0..300),
                block: r.gen_range(0..4),
                masked: r.gen_bool(0.4),
            }
        })
        .collect();
    rows[0].id = CaseId::Token(1);
    let branch = rows[0].branch;
    let logits_for: Vec<usize> = (0..n)
        .filter(|&i| rows[i].branch == branch && matches!(rows[i].id, CaseId::Token(_)))
        .filter(|&i| i == 0 || r.gen_bool(0.6))
        .collect();
    Case { rows, logits_for }
}

fn forward<B: Backend>(model: &Model<B>, case: &Case) -> Vec<f32> {
    let plan = case.plan(model.config()).unwrap();
    let mut cache = model.new_cache(plan.pool_slots).unwrap();
    let logits = model
        .forward(&model.prepare(plan).unwrap(), &mut cache)
        .unwrap()
        .expect("the case asks for logits");
    model.backend().to_host(&logits).unwrap()
}

/// One full `forward` over random SPEC §3-tagged rows: CUDA within SPEC §6's bound of the CPU.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_forward_matches_cpu_on_random_cases() {
    let mut r = rng(17);
    for (name, cfg) in configs() {
        let (o, w) = oracles(&cfg, 23);
        let gpu = cuda_model(&cfg, w);
        let (mut worst, mut worst_twin) = (0f64, 0f64);
        for i in 0..12 {
            let case = random_case(&cfg, &mut r);
            let want = forward(&o.cpu, &case);
            let (twin, got) = (forward(&o.twin, &case), forward(&gpu, &case));
            assert!(got.iter().all(|v| v.is_finite()), "{name} case {i}: NaN");
            let (et, e) = (rel_l2(&twin, &want), rel_l2(&got, &want));
            assert!(
                e <= bound(et),
                "{name} case {i} ({} rows): rel L2 {e:.3e} (naive bf16 {et:.3e})",
                case.rows.len()
            );
            (worst, worst_twin) = (worst.max(e), worst_twin.max(et));
        }
        println!("{name} forward: worst rel L2 {worst:.2e} (naive bf16 {worst_twin:.2e})");
    }
}

// ------------------------------------------------------------------------------------------
// Validation on the device
// ------------------------------------------------------------------------------------------

/// Wrong element types, shapes and head widths are errors naming the problem, not panics.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_backend_rejects_bad_inputs() {
    let be = backend();
    let tiny = Config::preset("tiny").unwrap();
    let e = be.new_cache(&tiny, 8).unwrap_err();
    assert!(e.to_string().contains("head_dim 16"), "{e}");
    let e = be
        .upload_weight(HostTensor {
            shape: vec![2, 3],
            data: vec![0.0; 5],
        })
        .unwrap_err();
    assert!(e.to_string().contains("5 values"), "{e}");
    let w = be
        .upload_weight(HostTensor {
            shape: vec![4, 8],
            data: (0..32).map(|i| i as f32 / 32.0).collect(),
        })
        .unwrap();
    let norm = be
        .upload_weight(HostTensor {
            shape: vec![8],
            data: vec![1.0; 8],
        })
        .unwrap();
    let x_f32 = be.matrix(3, 8, MatrixKind::Residual).unwrap();
    let x_bf16 = be.matrix(3, 8, MatrixKind::Activation).unwrap();
    let mut out = be.matrix(3, 4, MatrixKind::Activation).unwrap();
    let e = be.matmul(&x_f32, &w, &mut out, false).unwrap_err();
    assert!(
        e.to_string()
            .contains("matmul input: the matrix holds f32, expected bf16"),
        "{e}"
    );
    be.matmul(&x_bf16, &w, &mut out, false).unwrap();
    let mut wrong = be.matrix(3, 5, MatrixKind::Activation).unwrap();
    let e = be.matmul(&x_bf16, &w, &mut wrong, false).unwrap_err();
    assert!(e.to_string().contains("expected [3, 4]"), "{e}");
    let mut normed = be.matrix(3, 8, MatrixKind::Activation).unwrap();
    let e = be.rmsnorm(&x_bf16, &norm, 1e-5, &mut normed).unwrap_err();
    assert!(
        e.to_string()
            .contains("rmsnorm input: the matrix holds bf16, expected f32"),
        "{e}"
    );
    be.rmsnorm(&x_f32, &norm, 1e-5, &mut normed).unwrap();
    assert_eq!(be.to_host(&normed).unwrap().len(), 24);
}

// ------------------------------------------------------------------------------------------
// Device-resident generation (CUDA graphs)
// ------------------------------------------------------------------------------------------

fn run_exec(model: &Model<CudaBackend>, task: &Task, mode: Mode, exec: Execution) -> Generation {
    let g = sparse_lavida::exec::generate_with(model, task, mode, exec, RunOptions::default())
        .unwrap_or_else(|e| panic!("{} {mode} {exec}: {e}", task_name(task)));
    assert_eq!(g.execution, exec, "{} {mode}", task_name(task));
    g
}

/// What must be identical between two executions of one request: tokens, and per step the
/// positions computed and decoded, the tokens chosen, the rows fed; and the forwards.
fn assert_same_run(a: &Generation, b: &Generation, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.forwards, b.forwards, "{what}: forwards");
    assert_eq!(a.rows_fed, b.rows_fed, "{what}: rows fed");
    assert_eq!(a.steps.len(), b.steps.len(), "{what}: steps");
    for (x, y) in a.steps.iter().zip(&b.steps) {
        let k = x.step;
        assert_eq!(
            x.query_positions, y.query_positions,
            "{what} step {k}: query"
        );
        assert_eq!(
            x.decoded_positions, y.decoded_positions,
            "{what} step {k}: decoded"
        );
        assert_eq!(x.tokens, y.tokens, "{what} step {k}: tokens");
        assert_eq!(x.rows_fed, y.rows_fed, "{what} step {k}: rows fed");
        assert!(y.time_s > 0.0, "{what} step {k}: no step time");
    }
}

/// The device-resident run, queued and captured as CUDA graphs, chooses exactly what the eager
/// host loop chooses (same kernels on the same plans), for t2i (CFG on and off) and text, in
/// dense mode and every switch combination, at temperature 0 and 1; running the graphs twice
/// gives the same tokens again.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_graphs_equal_eager_tokens() {
    for (name, cfg) in configs() {
        let gpu = cuda_model(&cfg, bf16_weights(&cfg, 21));
        let mut tasks = tasks(&cfg, 5);
        if let Task::T2i(r) = &tasks[0] {
            tasks.push(Task::T2i(T2iRequest {
                guidance: 0.0,
                temperature: 0.0,
                ..r.clone()
            }));
        }
        if let Task::Text(r) = &tasks[1] {
            tasks.push(Task::Text(TextRequest {
                temperature: 0.0,
                banned: vec![1, 2],
                ..r.clone()
            }));
        }
        for task in &tasks {
            for mode in Mode::all() {
                let what = format!("{name} {} {mode}", task_name(task));
                let eager = run_exec(&gpu, task, mode, Execution::Eager);
                let queued = run_exec(&gpu, task, mode, Execution::Queued);
                assert_same_run(&eager, &queued, &format!("{what}: queued vs eager"));
                let graphs = run_exec(&gpu, task, mode, Execution::Graphs);
                assert_same_run(&eager, &graphs, &format!("{what}: graphs vs eager"));
                let again = run_exec(&gpu, task, mode, Execution::Graphs);
                assert_same_run(&graphs, &again, &format!("{what}: graphs twice"));
                assert!(graphs.setup_s > 0.0, "{what}: no setup time");
            }
            println!(
                "{name} {}: graphs == queued == eager in 9 modes",
                task_name(task)
            );
        }
    }
}

/// A device-resident run that cannot be planned fails before anything is queued, naming the
/// problem, and the backend stays usable.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_resident_bad_requests_are_errors() {
    let cfg = Config::preset("small").unwrap();
    let gpu = cuda_model(&cfg, bf16_weights(&cfg, 2));
    let bad = Task::Text(TextRequest {
        prompt: vec![1, 2, 3],
        answer_len: 4,
        block_len: 4,
        steps: 9,
        temperature: 0.0,
        banned: vec![],
        seed: 1,
    });
    let e = exec::generate_with(
        &gpu,
        &bad,
        Mode::Sparse(Switches::ALL_ON),
        Execution::Graphs,
        RunOptions::default(),
    )
    .unwrap_err();
    let eager = exec::generate(
        &gpu,
        &bad,
        Mode::Sparse(Switches::ALL_ON),
        RunOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), eager.to_string());
    let ok = &tasks(&cfg, 3)[1];
    run_exec(&gpu, ok, Mode::Sparse(Switches::ALL_ON), Execution::Graphs);
}

/// What the device finds while a resident run is queued (here a non-finite logit: one head row
/// of +inf weights, so the logits of every image row hold inf) is reported once the run ends,
/// through the sampler's sticky flag, as the same kind of error the eager loop gives; the next
/// run on a sound model starts with clear flags.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_resident_reports_device_errors_after_the_run() {
    let cfg = Config::preset("small").unwrap();
    let mut w = bf16_weights(&cfg, 6);
    // `Model::new` refuses non-finite weights; upload them one by one instead.
    let head = w.tensors.get_mut("image.head").unwrap();
    let d = head.shape[1];
    head.data[5 * d..6 * d].fill(f32::INFINITY);
    let mut tensors = w.tensors;
    let broken = Model::from_uploaded(backend(), cfg.clone(), |be, _, name, _| {
        be.upload_weight(tensors.remove(name).unwrap())
    })
    .unwrap();
    let t2i = tasks(&cfg, 4).remove(0);
    let mode = Mode::Sparse(Switches::ALL_ON);
    for exec in [Execution::Eager, Execution::Queued, Execution::Graphs] {
        let e =
            sparse_lavida::exec::generate_with(&broken, &t2i, mode, exec, RunOptions::default())
                .expect_err("an inf logit must be an error");
        assert!(matches!(e, Error::Input(_)), "{exec}: {e}");
        assert!(e.to_string().contains("non-finite logit"), "{exec}: {e}");
    }
    let gpu = cuda_model(&cfg, bf16_weights(&cfg, 6));
    run_exec(&gpu, &t2i, mode, Execution::Graphs);
    run_exec(&gpu, &t2i, mode, Execution::Queued);
}

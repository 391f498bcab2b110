//! Batches on the CUDA backend (SPEC §8): every request of a batch chooses the tokens it
//! chooses alone, in all nine modes, on the eager host loop, queued device-resident and under
//! CUDA graphs (one graph for a text-to-image batch); its logits stay within SPEC §6 of the
//! solo run's; and a batch with one bad request is refused before anything is queued.
//!
//! Shapes are tiny (`tiny` with head_dim 64, sequences of a few dozen keys), so the emulated
//! suite stays quick. There a request's rows get the arithmetic they get alone: the emulated
//! cuBLASLt sums every output element in one fixed order whatever the row count, and sequences
//! this short take one attention split alone or in a batch. On a GPU the products' algorithm
//! and the split count may follow the batch's size, which changes rounding only: the logits
//! check (relative L2 ≤ 1e-2) holds there, and the tokens are expected to match unless two
//! candidates tie within that rounding (the test prints the largest logits difference).
//!
//! Device tests need a CUDA device: built with the `emulator` feature they run on the emulated
//! one (`./scripts/test`), otherwise they are ignored and a GPU machine runs them with
//! `--include-ignored --test-threads=1` (`scripts/gpu-check`).

mod common;

use common::rel_l2;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::Error;
use sparse_lavida::backend::cuda::CudaBackend;
use sparse_lavida::config::Config;
use sparse_lavida::exec;
use sparse_lavida::model::Model;
use sparse_lavida::sampler::{
    self, Execution, Generation, Mode, Request, RunOptions, T2iRequest, Task, TextRequest,
};
use sparse_lavida::schedule::Order;
use sparse_lavida::weights::HostWeights;

/// `tiny` with head_dim 64 (2 query heads sharing 1 K/V head), which the attention kernels
/// support.
fn tiny_hd64() -> Config {
    Config {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
        ..Config::preset("tiny").unwrap()
    }
}

fn model(cfg: &Config, seed: u64) -> Model<CudaBackend> {
    let mut w = HostWeights::random(cfg, seed);
    for t in w.tensors.values_mut() {
        for v in &mut t.data {
            *v = bf16::from_f32(*v).to_f32();
        }
    }
    let be = CudaBackend::new().unwrap_or_else(|e| panic!("{}: {e}", common::NEED_DEVICE));
    Model::new(be, cfg.clone(), w).unwrap()
}

fn prompt(cfg: &Config, len: usize, r: &mut ChaCha8Rng) -> Vec<u32> {
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

/// Three t2i requests on a 4x4 grid, 4 steps: prompts of 0, 3 and 6 ids, CFG on for two.
fn t2i_batch(cfg: &Config, r: &mut ChaCha8Rng) -> Vec<Request> {
    [(0, 2.0, 1.0), (3, 0.0, 0.0), (6, 3.0, 0.7)]
        .into_iter()
        .map(|(plen, guidance, temperature)| {
            Task::T2i(T2iRequest {
                prompt: prompt(cfg, plen, r),
                height: 4,
                width: 4,
                steps: 4,
                guidance,
                temperature,
                order: Order::Stratified,
                seed: r.r#gen(),
            })
        })
        .collect()
}

/// Three text requests in blocks of 4: answers of 9, 4 and 6 (so 5, 2 and 3 steps: requests
/// leave the batch at different steps), one with bans.
fn text_batch(cfg: &Config, r: &mut ChaCha8Rng) -> Vec<Request> {
    [(9, 5, 4, vec![]), (4, 2, 0, vec![1, 2]), (6, 3, 5, vec![])]
        .into_iter()
        .map(|(answer_len, steps, plen, banned)| {
            Task::Text(TextRequest {
                prompt: prompt(cfg, plen, r),
                answer_len,
                block_len: 4,
                steps,
                temperature: 1.0,
                banned,
                seed: r.r#gen(),
            })
        })
        .collect()
}

fn run(
    model: &Model<CudaBackend>,
    requests: &[Request],
    mode: Mode,
    exec: Execution,
) -> Vec<Generation> {
    let opts = RunOptions {
        record_logits: exec == Execution::Eager,
        ..RunOptions::default()
    };
    let gs = exec::generate_batch_with(model, requests, mode, exec, opts)
        .unwrap_or_else(|e| panic!("{mode} {exec}: {e}"));
    assert!(gs.iter().all(|g| g.execution == exec), "{mode} {exec}");
    gs
}

/// Tokens, per-step positions, tokens and rows, forwards: what two runs of one request share.
fn assert_same_choices(a: &Generation, b: &Generation, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.forwards, b.forwards, "{what}: forwards");
    assert_eq!(a.rows_fed, b.rows_fed, "{what}: rows fed");
    assert_eq!(a.steps.len(), b.steps.len(), "{what}: steps");
    for (x, y) in a.steps.iter().zip(&b.steps) {
        let k = y.step;
        assert_eq!(x.query_positions, y.query_positions, "{what} step {k}");
        assert_eq!(x.decoded_positions, y.decoded_positions, "{what} step {k}");
        assert_eq!(x.tokens, y.tokens, "{what} step {k}: tokens");
        assert_eq!(x.rows_fed, y.rows_fed, "{what} step {k}: rows");
    }
}

/// Every request of a t2i and a text batch, in every mode: the eager batch, the queued batch
/// and the batch under graphs choose the solo eager run's tokens; the eager batch's logits are
/// within SPEC §6 of the solo run's; a t2i batch runs as one graph, a text batch as one per
/// step plus the prologue.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_batches_choose_the_solo_tokens_in_every_mode_and_execution() {
    let cfg = tiny_hd64();
    let gpu = model(&cfg, 31);
    let mut r = ChaCha8Rng::seed_from_u64(6);
    for (name, batch) in [
        ("t2i", t2i_batch(&cfg, &mut r)),
        ("text", text_batch(&cfg, &mut r)),
    ] {
        let mut worst = 0f64;
        for mode in Mode::all() {
            let solo: Vec<Generation> = (batch.iter())
                .map(|q| run(&gpu, std::slice::from_ref(q), mode, Execution::Eager).remove(0))
                .collect();
            let eager = run(&gpu, &batch, mode, Execution::Eager);
            for (i, (b, s)) in eager.iter().zip(&solo).enumerate() {
                let what = format!("{name} {mode} request {i}: eager batch vs solo");
                assert_same_choices(b, s, &what);
                for (x, y) in b.steps.iter().zip(&s.steps) {
                    let (x, y) = (x.logits.as_ref().unwrap(), y.logits.as_ref().unwrap());
                    let err = rel_l2(x, y);
                    assert!(err <= 1e-2, "{what}: logits rel L2 {err:e}");
                    worst = worst.max(err);
                }
            }
            for exec in [Execution::Queued, Execution::Graphs] {
                let gs = run(&gpu, &batch, mode, exec);
                for (i, (b, s)) in gs.iter().zip(&solo).enumerate() {
                    let what = format!("{name} {mode} request {i}: {exec} batch vs solo");
                    assert_same_choices(b, s, &what);
                }
                let steps = gs.iter().map(|g| g.steps.len()).max().unwrap();
                let want = match (exec, name) {
                    (Execution::Queued, _) => 0,
                    (_, "t2i") => 1,
                    _ => steps + 1,
                };
                assert!(gs.iter().all(|g| g.graphs == want), "{name} {mode} {exec}");
            }
        }
        println!("{name} batch: solo tokens in 9 modes x 3 executions; logits rel L2 ≤ {worst:e}");
    }
}

/// One bad request refuses the batch before anything is queued, naming it, and the backend
/// stays usable.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_batch_with_a_bad_request_is_refused() {
    let cfg = tiny_hd64();
    let gpu = model(&cfg, 32);
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let mut batch = t2i_batch(&cfg, &mut r);
    if let Task::T2i(q) = &mut batch[1] {
        q.prompt.push(cfg.text_mask_id);
    }
    for exec in [Execution::Eager, Execution::Graphs] {
        let e = exec::generate_batch_with(
            &gpu,
            &batch,
            Mode::Sparse(sampler::Switches::ALL_ON),
            exec,
            RunOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Input(m) if m.contains("request 1: prompt token")),
            "{exec}: {e}"
        );
    }
    batch.remove(1);
    let gs = run(&gpu, &batch, Mode::Dense, Execution::Graphs);
    assert_eq!(gs.len(), 2);
}

/// The memory bound on the CUDA backend (`memory::add_weights` and `add_batch` with
/// `Target::Cuda`, what the CLI checks before it allocates): the device pool's high watermark
/// over uploading `small`'s weights and a device-resident batch under graphs (every step's plan
/// and split workspace kept, the products warmed) stays within the bound's parts without the
/// fixed device overhead, measured from the pool's use before the weights (the backend's own
/// buffers, which that overhead covers). A t2i batch with CFG in both mode families, and a
/// text batch.
#[test]
#[cfg_attr(not(feature = "emulator"), ignore = "needs a CUDA device")]
fn gpu_device_memory_stays_within_the_bound() {
    use sparse_lavida::backend::DeviceStats;
    use sparse_lavida::memory::{self, Need, Target, WeightsFrom};
    use sparse_lavida::request::{PromptSpec, TaskKind, Workload};
    let cfg = Config::preset("small").unwrap();
    let t2i = Workload {
        grid: Some((12, 12)),
        steps: Some(8),
        prompt: PromptSpec::Random(16),
        ..Workload::new(TaskKind::T2i)
    };
    let text = Workload {
        answer_len: Some(48),
        block: Some(16),
        prompt: PromptSpec::Random(12),
        ..Workload::new(TaskKind::Text)
    };
    let sparse = Mode::Sparse(sampler::Switches::ALL_ON);
    for (work, n, mode) in [
        (&t2i, 3, sparse),
        (&t2i, 2, Mode::Dense),
        (&text, 3, sparse),
    ] {
        let works = work.batch(n, None).unwrap();
        let shapes: Vec<_> = works.iter().map(|w| w.shape(&cfg).unwrap()).collect();
        let requests: Vec<Request> = works.iter().map(|w| w.task(&cfg).unwrap()).collect();
        let be = CudaBackend::new().unwrap_or_else(|e| panic!("{}: {e}", common::NEED_DEVICE));
        let target = Target::Cuda {
            attn_workers: be.attention_workers(cfg.head_dim).unwrap() as u64,
        };
        let mut need = Need::default();
        memory::add_weights(&mut need, &cfg, target, WeightsFrom::Random).unwrap();
        memory::add_batch(&mut need, &cfg, &shapes, target, 0).unwrap();
        let bound = need.device_total().unwrap() - memory::DEVICE_OVERHEAD;
        let before = be
            .reset_peak_memory()
            .unwrap()
            .expect("the pool's statistics");
        let gpu = Model::new(be, cfg.clone(), HostWeights::random(&cfg, 5)).unwrap();
        run(&gpu, &requests, mode, Execution::Graphs);
        let peak = gpu.backend().peak_memory().unwrap().unwrap() - before;
        assert!(
            peak <= bound,
            "{mode}, {n} requests of {work:?}: {peak} B at the peak, bound {bound} B ({:?})",
            need.device
        );
    }
}

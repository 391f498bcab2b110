//! A Rust engine on cudarc (candle's CUDA storage is cudarc's `CudaSlice`) taking the kernel
//! layer alone: gathered-token attention and the fused sampler on `CudaSlice`s the engine owns,
//! on the engine's stream, with no copy — FlashInfer-style: a *plan* on the host (validation,
//! query tiles, split count, index upload, split workspace; outside any capture), then a *run*
//! that allocates nothing and never synchronizes, captured once into a CUDA graph and replayed
//! on new contents of the same buffers. Each replay is checked against the crate's CPU oracles
//! (naive f64 attention, the CPU sampler); exits 1 on a mismatch, 2 without a CUDA device.
//!
//! ```sh
//! cargo run --release --example engine_cudarc                    # on a GPU
//! LD_LIBRARY_PATH=target/release/emu cargo run --release --features emulator --example engine_cudarc
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, sys};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::backend::cpu::attention::{AttnInputs, attention_naive};
use sparse_lavida::backend::cpu::ops::sample_rows;
use sparse_lavida::contract::{AttnLayout, AttnShape, Branch, SampleParams, Tag};
use sparse_lavida::cuda::device::{CudaDevice, device_count};
use sparse_lavida::cuda::ops::{
    self, AttnArgs, AttnOut, AttnPlan, BannedMask, DeviceSampleArgs, SampleOut,
};
use sparse_lavida::{Error, Result};

const SHAPE: AttnShape = AttnShape {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 64,
};
const SLOTS: usize = 640;
const VOCAB: usize = 1000;
const SAMPLED: usize = 6;

/// The engine's device buffers (it allocated them; the kernels only read and write them).
struct Buffers {
    q: CudaSlice<bf16>,
    k_pool: CudaSlice<bf16>,
    v_pool: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    positions: CudaSlice<u32>,
    token: CudaSlice<u32>,
    confidence: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    flag: CudaSlice<u32>,
}

/// The ragged layout of the attention call: 2 sequences (70 and 30 rows, masked and clean
/// rows of both branches), each gathering 300 of the pool's slots in its own order.
struct Layout {
    row_tags: Vec<Tag>,
    seq_indptr: Vec<u32>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<Tag>,
}

fn layout(rng: &mut ChaCha8Rng) -> Layout {
    let branch = |r: &mut ChaCha8Rng| {
        if r.gen_bool(0.5) {
            Branch::Image
        } else {
            Branch::Text
        }
    };
    let tag = |r: &mut ChaCha8Rng| {
        if r.gen_bool(0.3) {
            Tag::new(branch(r), 9, true)
        } else {
            Tag::new(branch(r), r.gen_range(0..8), false)
        }
    };
    let seq_indptr = vec![0, 70, 100];
    let row_tags = (0..100).map(|_| tag(rng)).collect();
    let mut slots: Vec<u32> = (0..SLOTS as u32).collect();
    let (mut kv_indices, mut kv_tags, mut kv_indptr) = (Vec::new(), Vec::new(), vec![0]);
    for _ in 0..2 {
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.gen_range(0..=i));
        }
        kv_indices.extend_from_slice(&slots[..300]);
        kv_tags.extend((0..300).map(|_| tag(rng)));
        kv_indptr.push(kv_indices.len() as u32);
    }
    Layout {
        row_tags,
        seq_indptr,
        kv_indptr,
        kv_indices,
        kv_tags,
    }
}

/// bf16-rounded random values, as f32 (the oracle's input) and bf16 (the device's).
fn random_bf16(rng: &mut ChaCha8Rng, n: usize) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0)))
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

/// The run: one attention call and one sampler pass, queued on the engine's stream. No
/// allocation, no synchronization: capturable.
fn run(dev: &CudaDevice, plan: &mut AttnPlan, banned: &BannedMask, b: &mut Buffers) -> Result<()> {
    let args = AttnArgs {
        q: &b.q,
        q_stride: SHAPE.q_dim(),
        k_pool: &b.k_pool,
        v_pool: &b.v_pool,
        kv_stride: SHAPE.kv_dim(),
        joint: true,
    };
    let out = AttnOut {
        o: &mut b.o,
        o_stride: SHAPE.q_dim(),
        lse: None,
    };
    ops::attention(dev, plan, &args, out)?;
    let args = DeviceSampleArgs {
        positions: &b.positions,
        banned: Some(banned),
        n: SAMPLED,
        guidance: None,
        temperature: 0.8,
        seed: 42,
        step: 3,
        request: 0,
    };
    let out = SampleOut {
        token: &mut b.token,
        confidence: &mut b.confidence,
        lse: &mut b.lse,
        error_flag: &mut b.flag,
    };
    ops::sample_to_device(dev, &b.logits, VOCAB, VOCAB, args, out)
}

fn relative_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Writes new inputs into the engine's buffers (outside the graph), replays the graph, and
/// checks both outputs against the CPU oracles.
fn replay_and_check(
    stream: &Arc<CudaStream>,
    graph: &cudarc::driver::CudaGraph,
    l: &Layout,
    b: &mut Buffers,
    seed: u64,
) -> Result<bool> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (q, q_dev) = random_bf16(&mut rng, 100 * SHAPE.q_dim());
    let (k, k_dev) = random_bf16(&mut rng, SLOTS * SHAPE.kv_dim());
    let (v, v_dev) = random_bf16(&mut rng, SLOTS * SHAPE.kv_dim());
    let logits: Vec<f32> = (0..SAMPLED * VOCAB)
        .map(|_| rng.gen_range(-4.0..4.0))
        .collect();
    stream.memcpy_htod(&q_dev, &mut b.q)?;
    stream.memcpy_htod(&k_dev, &mut b.k_pool)?;
    stream.memcpy_htod(&v_dev, &mut b.v_pool)?;
    stream.memcpy_htod(&logits, &mut b.logits)?;
    graph.launch()?;
    stream.synchronize()?;
    let o: Vec<f32> = stream
        .clone_dtoh(&b.o)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let (token, confidence) = (
        stream.clone_dtoh(&b.token)?,
        stream.clone_dtoh(&b.confidence)?,
    );

    let (want, _) = attention_naive(&AttnInputs {
        q: &q,
        row_tags: &l.row_tags,
        seq_indptr: &l.seq_indptr,
        k_pool: &k,
        v_pool: &v,
        kv_indptr: &l.kv_indptr,
        kv_indices: &l.kv_indices,
        kv_tags: &l.kv_tags,
        joint: true,
        shape: SHAPE,
    })?;
    let err = relative_l2(&o, &want);
    let sampled = sample_rows(&logits, VOCAB, &sample_params())?;
    let tokens_equal = sampled.iter().zip(&token).all(|(s, &t)| s.token == t);
    let conf_err = (sampled.iter().zip(&confidence))
        .map(|(s, &c)| (s.confidence - c).abs())
        .fold(0f32, f32::max);
    println!(
        "replay {seed}: attention rel. L2 {err:.2e} vs naive f64; tokens {:?} ({}), max \
         confidence error {conf_err:.1e}",
        token,
        if tokens_equal { "= CPU" } else { "≠ CPU" }
    );
    Ok(err <= 1e-2 && !o.iter().any(|x| x.is_nan()) && tokens_equal && conf_err <= 1e-4)
}

fn sample_params() -> SampleParams {
    SampleParams {
        guidance: None,
        temperature: 0.8,
        banned: vec![0, 7],
        seed: 42,
        step: 3,
        request: 0,
        positions: (100..100 + SAMPLED as u32).collect(),
    }
}

fn main() -> Result<()> {
    // Probing first: without a driver, cudarc would panic at its first call.
    if let Err(e) = device_count() {
        eprintln!("no CUDA device: {e}");
        std::process::exit(2);
    }
    // The engine's context and stream. It captures launches into a graph below, so it turns
    // cudarc's event tracking off before allocating (sparse-lavida's own device does the same).
    let ctx = CudaContext::new(0)?;
    // SAFETY: called before any allocation of this context, and this program orders all work
    // on one stream, so no cross-stream event is needed.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    // The kernels, loaded into the engine's context, launching on the engine's stream.
    let dev = CudaDevice::with_stream(stream.clone())?;

    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let l = layout(&mut rng);
    let zeros = |n: usize| stream.alloc_zeros::<bf16>(n);
    let mut b = Buffers {
        q: zeros(100 * SHAPE.q_dim())?,
        k_pool: zeros(SLOTS * SHAPE.kv_dim())?,
        v_pool: zeros(SLOTS * SHAPE.kv_dim())?,
        o: zeros(100 * SHAPE.q_dim())?,
        logits: stream.alloc_zeros(SAMPLED * VOCAB)?,
        positions: stream.clone_htod(&sample_params().positions)?,
        token: stream.alloc_zeros(SAMPLED)?,
        confidence: stream.alloc_zeros(SAMPLED)?,
        lse: stream.alloc_zeros(SAMPLED)?,
        flag: stream.alloc_zeros(1)?,
    };

    // Plan, on the host and outside any capture.
    let attn_layout = AttnLayout {
        shape: SHAPE,
        row_tags: &l.row_tags,
        seq_indptr: &l.seq_indptr,
        kv_indptr: &l.kv_indptr,
        kv_indices: &l.kv_indices,
        kv_tags: &l.kv_tags,
        n_slots: SLOTS,
    };
    let mut plan = AttnPlan::new(&dev, &attn_layout, None)?;
    let banned = BannedMask::new(&dev, VOCAB, &sample_params().banned)?;
    println!(
        "plan: {} rows in {} query tiles, keys split {} way(s) on {} SMs",
        plan.rows(),
        plan.qtile_seq().len(),
        plan.n_splits(),
        dev.info().sm_count
    );

    // Run, captured once.
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let queued = run(&dev, &mut plan, &banned, &mut b);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    queued?;
    let graph = graph?.ok_or_else(|| Error::Cuda("the capture is empty".into()))?;

    // Replayed on new contents of the same buffers.
    let mut ok = true;
    for seed in [10, 11] {
        ok &= replay_and_check(&stream, &graph, &l, &mut b, seed)?;
    }
    if stream.clone_dtoh(&b.flag)?[0] != 0 {
        eprintln!("the sampler flagged a non-finite logit");
        ok = false;
    }
    drop(graph);
    if !ok {
        eprintln!("MISMATCH against the CPU oracles");
        std::process::exit(1);
    }
    println!("ok");
    Ok(())
}

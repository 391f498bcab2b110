//! CUDA kernel benchmarks (criterion) at lavida-o shapes (32 heads × 128, GQA off, d 4096),
//! timed on the GPU with CUDA events. `cargo bench --bench kernels`; on a machine without a
//! usable GPU it prints one line saying why and exits 0.
//!
//! # What is measured
//! - **Ceilings**, once, in the same process: HBM copy bandwidth (a 1 GiB device-to-device
//!   copy, counted as read + write bytes) and the bf16 tensor-core rate (a cuBLASLt bf16 GEMM
//!   8192³ with f32 accumulation; where cuBLASLt cannot be loaded, the attention kernel itself at
//!   a large dense shape, 2 × 4096 rows, and the output says so).
//! - **attention** (the current kernel, then the previous one, `attention v1`, ids suffixed
//!   `-v1`, on the same problems), sparse steps of the t2i 1024-position schedule (K = 64 steps): per sequence
//!   `n = R + C_k + C_{k-1}` rows (R = 64 registers) for the steps where `C_k` first reaches 4,
//!   16 and 64, two sequences (a CFG pair), against 128, 1024 and 5000 keys per sequence (the
//!   fresh rows' own keys included; a combination with fewer keys than rows is skipped). Tags as
//!   the aggregation kernel makes them (params.h): the `C_{k-1}` rows clean block k, the `C_k`
//!   and register rows the masked block k+1, the cached keys clean; joint layer; K/V slots
//!   shuffled within each sequence's region of the pool. Dense: 2 × 1152 rows, all visible
//!   (clean block 0), each sequence's rows are its keys.
//! - **sample**: the fused sampler pass, rows ∈ {64, 1024} at V ∈ {8192, 127378}, CFG on
//!   (2·rows logit rows read, g = 4), τ = 1, nothing banned.
//! - **rmsnorm**: 2048 rows × 4096, f32 x in, bf16 out, no residual add.
//! - **rope_kv**: 2048 rows, 32 heads × 128: RoPE on q (in place) and k, k/v stored into the pool
//!   at shuffled distinct slots.
//!
//! # Figures
//! - attention FLOPs = 4 · head_dim · n_heads · (visible (row, key) pairs), i.e. QKᵀ and P·V at
//!   2 FLOPs per multiply-add, over the pairs the visibility rule admits (counted on the host
//!   with `plan::visible`); dense: 4 · 2 · 1152² · 128 · 32. Percent of the tensor ceiling.
//! - attention bytes = K and V rows read once (2 · keys · kv_dim · 2 per sequence) + q read +
//!   o written (rows · q_dim · 2 each); index arrays and the split workspace are not counted.
//!   Percent of the copy ceiling.
//! - sample bytes = the logits read (2 · rows · V · 4); rmsnorm bytes = x read (4 B) + out
//!   written (2 B) per element; rope_kv bytes = q read and written, k and v read, k and v
//!   stored (6 · rows · 4096 · 2). Percent of the copy ceiling.
//!
//! # Timing
//! Cudarc's per-buffer event tracking is turned off (everything runs on one stream), so a
//! launch queues nothing but the kernel. Every case rotates over enough copies of its inputs
//! (at least 3× the L2 cache in total, at most 64 copies) that each launch reads from HBM as it
//! would in the model, where every layer has its own K/V. One *round* launches the kernel once
//! on each copy; it is captured once into a CUDA graph, so the timed region holds the kernels
//! back to back with no host launch gaps (`SL_BENCH_NO_GRAPH=1`: direct launches instead). A
//! CUDA event is recorded before and after a batch of rounds and the GPU time between them,
//! divided by the launches, is the time per launch: criterion's `iter_custom` gets that for its
//! iterations, and the summary table takes the median of 21 batches of ≥ 2 ms each.
//!
//! The summary table is printed at the end and, when `SL_BENCH_JSON` is set, written there as
//! JSON (with the ceilings, the card and the table as markdown). `scripts/gpu-check` sets it.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use cudarc::driver::sys::{
    self, CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    ValidAsZeroBits,
};
use half::bf16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::backend::SampleParams;
use sparse_lavida::backend::cpu::attention::AttnShape;
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::contract::AttnVersion;
use sparse_lavida::cuda::abi::SlSampleParams;
use sparse_lavida::cuda::device::CudaDevice;
use sparse_lavida::cuda::ops::{
    self, AttnArgs, AttnLayout, AttnOut, AttnPlan, IndexBuf, KvPool, RopeKv, RopeQkv, RopeTable,
};
use sparse_lavida::cuda::raw;
use sparse_lavida::plan::{Tag, visible};
use sparse_lavida::schedule::shift_counts;
use sparse_lavida::{Error, Result};

// ------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------

/// Image positions of the t2i schedule the sparse steps come from (a 32 × 32 grid).
const T2I_POSITIONS: usize = 1024;
/// Its step count (the CLI default).
const T2I_STEPS: usize = 64;
/// The sparse steps benchmarked: the first steps whose `C_k` reaches these sizes.
const CK_TARGETS: [usize; 3] = [4, 16, 64];
/// Keys per sequence of the sparse steps.
const SPARSE_KEYS: [usize; 3] = [128, 1024, 5000];
/// Rows (= keys) per sequence of the dense baseline step: a 128-token prompt + 1024 positions.
const DENSE_ROWS: usize = 1152;
/// Rows per sequence of the fallback tensor-ceiling attention.
const CEILING_ROWS: usize = 4096;
/// Sequences of every attention and sampler case: a CFG pair.
const N_SEQS: usize = 2;
/// Sampler rows and vocabularies (lavida-o image and text heads).
const SAMPLE_ROWS: [usize; 2] = [64, 1024];
/// Rows of the RMSNorm and RoPE cases.
const ROWS_2048: usize = 2048;
/// Guidance scale of the sampler (lavida-o t2i).
const GUIDANCE: f32 = 4.0;

/// Copy ceiling: bytes copied device to device.
const COPY_BYTES: usize = 1 << 30;
/// Tensor ceiling: the GEMM size.
const GEMM_N: u64 = 8192;

/// Rotate over input copies totalling at least this many times the L2 cache.
const ROTATE_L2_FACTOR: usize = 3;
/// L2 size assumed when the device does not report one.
const DEFAULT_L2: usize = 50 << 20;
/// At most this many input copies per case.
const MAX_SETS: usize = 64;
/// GPU time of one timed batch of the summary measurement, seconds.
const BATCH_SECONDS: f64 = 2e-3;
/// Timed batches of the summary measurement (the median is reported).
const BATCHES: usize = 21;

/// Targets of the issue.
const SPARSE_TARGET_PCT: f64 = 60.0;
const SAMPLE_TARGET_PCT: f64 = 70.0;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// Maps a driver error to the crate's error, saying what was being done.
fn cuda(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// `n` values drawn once, repeated to fill device buffers (the kernels' speed does not depend on
/// the values, only on their being finite and not all equal).
fn pattern<T>(rng: &mut ChaCha8Rng, n: usize, draw: impl Fn(&mut ChaCha8Rng) -> T) -> Vec<T> {
    (0..n).map(|_| draw(rng)).collect()
}

/// A device buffer of `len` values (at least one) filled by repeating `pattern`.
fn filled<T: DeviceRepr + ValidAsZeroBits + Copy>(
    dev: &CudaDevice,
    len: usize,
    pattern: &[T],
) -> Result<CudaSlice<T>> {
    let mut buf = dev.alloc_zeros::<T>(len.max(1))?;
    let mut at = 0;
    while at < len {
        let n = pattern.len().min(len - at);
        dev.stream()
            .memcpy_htod(&pattern[..n], &mut buf.slice_mut(at..at + n))
            .map_err(cuda(format_args!("filling {len} values")))?;
        at += n;
    }
    Ok(buf)
}

/// Input copies for a case whose one copy is `set_bytes`: enough that all copies together are at
/// least `ROTATE_L2_FACTOR` L2 caches, at most `MAX_SETS`.
fn sets_for(set_bytes: f64, l2: usize) -> usize {
    let want = (ROTATE_L2_FACTOR * l2) as f64 / set_bytes.max(1.0);
    (want.ceil() as usize).clamp(1, MAX_SETS)
}

/// Two CUDA events with timing, around work queued on one stream.
struct Clock {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Clock {
    fn new(dev: &CudaDevice) -> Result<Clock> {
        let ctx = dev.context();
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Clock {
            start: ctx.new_event(timing).map_err(cuda("creating an event"))?,
            end: ctx.new_event(timing).map_err(cuda("creating an event"))?,
            stream: dev.stream().clone(),
        })
    }

    /// GPU seconds between an event recorded before `queue` runs and one recorded after it
    /// (waits for the second).
    fn time(&self, queue: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.start
            .record(&self.stream)
            .map_err(cuda("recording the start event"))?;
        queue()?;
        self.end
            .record(&self.stream)
            .map_err(cuda("recording the end event"))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(cuda("reading the event timer"))?;
        Ok(f64::from(ms) * 1e-3)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ------------------------------------------------------------------------------------------
// Workloads
// ------------------------------------------------------------------------------------------

/// One benchmarked kernel call over `sets()` copies of its inputs.
trait Workload {
    /// Copies of the inputs.
    fn sets(&self) -> usize;
    /// Queues one launch on copy `i` (asynchronous, nothing but the kernel).
    fn launch(&mut self, dev: &CudaDevice, i: usize) -> Result<()>;
}

/// What a case is and what one launch moves.
struct CaseInfo {
    /// `attention`, `sample`, `rmsnorm`, `rope_kv`.
    kernel: &'static str,
    /// Criterion id (file-system safe) and key shared with the PyTorch peer.
    id: String,
    /// Human-readable shape.
    shape: String,
    /// Anything else worth a column (split count).
    note: String,
    /// FLOPs of one launch (attention).
    flops: Option<f64>,
    /// Useful bytes one launch moves.
    bytes: f64,
    /// Minimum percent of the copy ceiling the issue asks for.
    target_pct: Option<f64>,
}

/// A workload ready to time: its rounds are either a captured CUDA graph or direct launches.
struct Runner {
    /// Declared before `work` so the graph (which points into its buffers) is dropped first.
    graph: Option<CudaGraph>,
    work: Box<dyn Workload>,
    launches_per_round: usize,
}

impl Runner {
    /// Runs one direct round (so bad input fails here, outside any capture), then captures one
    /// round into a graph unless `use_graph` is false; a failed capture falls back to direct
    /// launches and says why in `fallback`.
    fn new(
        dev: &CudaDevice,
        mut work: Box<dyn Workload>,
        use_graph: bool,
        fallback: &mut Option<String>,
    ) -> Result<Runner> {
        let n = work.sets();
        for i in 0..n {
            work.launch(dev, i)?;
        }
        dev.synchronize()?;
        let mut runner = Runner {
            graph: None,
            work,
            launches_per_round: n,
        };
        if use_graph {
            match runner.capture(dev) {
                Ok(g) => runner.graph = Some(g),
                Err(e) => {
                    *fallback = Some(format!("CUDA graph capture failed ({e}); direct launches"));
                }
            }
        }
        Ok(runner)
    }

    fn capture(&mut self, dev: &CudaDevice) -> Result<CudaGraph> {
        let stream = dev.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda("beginning a stream capture"))?;
        let queued = (0..self.work.sets()).try_for_each(|i| self.work.launch(dev, i));
        // End the capture whatever happened, so the stream is usable again.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        let graph = graph
            .map_err(cuda("ending the stream capture"))?
            .ok_or_else(|| Error::Cuda("the stream capture produced no graph".into()))?;
        graph.upload().map_err(cuda("uploading the graph"))?;
        Ok(graph)
    }

    /// Queues `rounds` rounds.
    fn rounds(&mut self, dev: &CudaDevice, rounds: u64) -> Result<()> {
        for _ in 0..rounds {
            match &self.graph {
                Some(g) => g.launch().map_err(cuda("launching the graph"))?,
                None => {
                    for i in 0..self.work.sets() {
                        self.work.launch(dev, i)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// GPU seconds per launch of `rounds` rounds.
    fn time(&mut self, dev: &CudaDevice, clock: &Clock, rounds: u64) -> Result<f64> {
        let t = clock.time(|| self.rounds(dev, rounds))?;
        Ok(t / (rounds as f64 * self.launches_per_round as f64))
    }

    /// Warm-up, then the median and minimum seconds per launch over `BATCHES` batches of at
    /// least `BATCH_SECONDS` each.
    fn measure(&mut self, dev: &CudaDevice, clock: &Clock) -> Result<(f64, f64)> {
        let per_round = self.time(dev, clock, 3)? * self.launches_per_round as f64;
        let batch = ((BATCH_SECONDS / per_round.max(1e-9)).ceil() as u64).clamp(1, 100_000);
        self.time(dev, clock, 5 * batch)?;
        let times = (0..BATCHES)
            .map(|_| self.time(dev, clock, batch))
            .collect::<Result<Vec<f64>>>()?;
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        Ok((median(times), min))
    }
}

// --- attention -----------------------------------------------------------------------------

/// The host-side layout of an attention case.
struct AttnProblem {
    shape: AttnShape,
    row_tags: Vec<Tag>,
    seq_indptr: Vec<u32>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<Tag>,
    n_slots: usize,
    joint: bool,
}

impl AttnProblem {
    /// `N_SEQS` sequences of `rows` = (clean rows of block `k`, masked rows of block `k + 1`)
    /// over `keys` keys each: `keys − clean − masked` cached clean keys of block 0, then the
    /// rows' own keys; slots shuffled within each sequence's `keys` pool rows.
    fn new(
        shape: AttnShape,
        (clean, masked): (usize, usize),
        k: u32,
        keys: usize,
        rng: &mut ChaCha8Rng,
    ) -> AttnProblem {
        let rows = clean + masked;
        let (clean_tag, masked_tag) = if masked == 0 {
            (
                Tag::new(Branch::Image, 0, false),
                Tag::new(Branch::Image, 0, false),
            )
        } else {
            (
                Tag::new(Branch::Image, k, false),
                Tag::new(Branch::Image, k + 1, true),
            )
        };
        let cached_tag = Tag::new(Branch::Image, 0, false);
        let mut p = AttnProblem {
            shape,
            row_tags: Vec::new(),
            seq_indptr: vec![0],
            kv_indptr: vec![0],
            kv_indices: Vec::new(),
            kv_tags: Vec::new(),
            n_slots: N_SEQS * keys,
            joint: true,
        };
        for s in 0..N_SEQS {
            let mut slots: Vec<u32> = ((s * keys) as u32..((s + 1) * keys) as u32).collect();
            if masked > 0 {
                slots.shuffle(rng);
            }
            p.row_tags.extend(std::iter::repeat_n(clean_tag, clean));
            p.row_tags.extend(std::iter::repeat_n(masked_tag, masked));
            p.kv_tags
                .extend(std::iter::repeat_n(cached_tag, keys - rows));
            p.kv_tags.extend(std::iter::repeat_n(clean_tag, clean));
            p.kv_tags.extend(std::iter::repeat_n(masked_tag, masked));
            p.kv_indices.extend(slots);
            p.seq_indptr.push(p.row_tags.len() as u32);
            p.kv_indptr.push(p.kv_indices.len() as u32);
        }
        p
    }

    fn layout(&self) -> AttnLayout<'_> {
        AttnLayout {
            shape: self.shape,
            row_tags: &self.row_tags,
            seq_indptr: &self.seq_indptr,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_tags: &self.kv_tags,
            n_slots: self.n_slots,
        }
    }

    fn rows(&self) -> usize {
        self.row_tags.len()
    }

    /// (row, key) pairs the visibility rule admits, over all sequences.
    fn visible_pairs(&self) -> u64 {
        let mut pairs = 0u64;
        for s in 0..N_SEQS {
            let rows = self.seq_indptr[s] as usize..self.seq_indptr[s + 1] as usize;
            let keys = self.kv_indptr[s] as usize..self.kv_indptr[s + 1] as usize;
            for &q in &self.row_tags[rows] {
                let seen = self.kv_tags[keys.clone()]
                    .iter()
                    .filter(|&&k| visible(q, k, self.joint))
                    .count();
                pairs += seen as u64;
            }
        }
        pairs
    }

    /// FLOPs of the visible pairs (QKᵀ and P·V).
    fn flops(&self) -> f64 {
        4.0 * (self.shape.head_dim * self.shape.n_heads) as f64 * self.visible_pairs() as f64
    }

    /// K/V rows read once, q read, o written.
    fn bytes(&self) -> f64 {
        let keys = self.kv_indices.len();
        let kv = 2 * keys * self.shape.kv_dim() * 2;
        let qo = 2 * self.rows() * self.shape.q_dim() * 2;
        (kv + qo) as f64
    }
}

struct AttnSet {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
}

struct AttnWork {
    plan: AttnPlan,
    sets: Vec<AttnSet>,
    q_dim: usize,
    kv_dim: usize,
    joint: bool,
}

impl AttnWork {
    fn new(
        dev: &CudaDevice,
        p: &AttnProblem,
        version: AttnVersion,
        n_sets: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let plan = AttnPlan::with_version(dev, &p.layout(), None, version)?;
        let (q_dim, kv_dim) = (p.shape.q_dim(), p.shape.kv_dim());
        let values = pattern(rng, 1 << 20, |r| bf16::from_f32(r.gen_range(-1.0..1.0)));
        let sets = (0..n_sets)
            .map(|_| {
                Ok(AttnSet {
                    q: filled(dev, p.rows() * q_dim, &values)?,
                    k: filled(dev, p.n_slots * kv_dim, &values)?,
                    v: filled(dev, p.n_slots * kv_dim, &values)?,
                    o: dev.alloc_zeros(p.rows() * q_dim)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AttnWork {
            plan,
            sets,
            q_dim,
            kv_dim,
            joint: p.joint,
        })
    }
}

impl Workload for AttnWork {
    fn sets(&self) -> usize {
        self.sets.len()
    }

    fn launch(&mut self, dev: &CudaDevice, i: usize) -> Result<()> {
        let s = &mut self.sets[i];
        let args = AttnArgs {
            q: &s.q,
            q_stride: self.q_dim,
            k_pool: &s.k,
            v_pool: &s.v,
            kv_stride: self.kv_dim,
            joint: self.joint,
        };
        let out = AttnOut {
            o: &mut s.o,
            o_stride: self.q_dim,
            lse: None,
        };
        ops::attention(dev, &mut self.plan, &args, out)
    }
}

/// A benchmark case of attention over `p` with the kernel `version` (v1, the previous kernel:
/// id suffixed `-v1`, so a GPU run compares the two on the same problems).
#[allow(clippy::too_many_arguments)]
fn attention_case(
    dev: &CudaDevice,
    l2: usize,
    id: String,
    shape: String,
    p: &AttnProblem,
    version: AttnVersion,
    target_pct: Option<f64>,
    rng: &mut ChaCha8Rng,
) -> Result<(CaseInfo, Box<dyn Workload>)> {
    let bytes = p.bytes();
    let work = AttnWork::new(dev, p, version, sets_for(bytes, l2), rng)?;
    let (id, kernel) = match version {
        AttnVersion::V2 => (id, "attention"),
        AttnVersion::V1 => (format!("{id}-v1"), "attention v1"),
    };
    let info = CaseInfo {
        kernel,
        id,
        shape,
        note: format!("{} split(s)", work.plan.n_splits()),
        flops: Some(p.flops()),
        bytes,
        target_pct,
    };
    Ok((info, Box::new(work)))
}

// --- sampler -------------------------------------------------------------------------------

/// Device address of a buffer (event tracking is off, so the guard records nothing).
fn addr<T>(b: &CudaSlice<T>, stream: &CudaStream) -> usize {
    b.device_ptr(stream).0 as usize
}

/// Device address of a buffer the kernel writes.
fn addr_mut<T>(b: &mut CudaSlice<T>, stream: &CudaStream) -> usize {
    b.device_ptr_mut(stream).0 as usize
}

struct SampleWork {
    /// One params struct per copy of the logits (pointers into `logits` and the buffers below).
    params: Vec<SlSampleParams>,
    _logits: Vec<CudaSlice<f32>>,
    _positions: CudaSlice<u32>,
    _token: CudaSlice<u32>,
    _confidence: CudaSlice<f32>,
    _lse: CudaSlice<f32>,
    _flag: CudaSlice<u32>,
}

impl SampleWork {
    fn new(
        dev: &CudaDevice,
        n: usize,
        vocab: usize,
        n_sets: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<SampleWork> {
        let values = pattern(rng, (1 << 20) + 7, |r| r.gen_range(-8.0f32..8.0));
        let logits = (0..n_sets)
            .map(|_| filled(dev, 2 * n * vocab, &values))
            .collect::<Result<Vec<_>>>()?;
        let host = SampleParams {
            guidance: Some(GUIDANCE),
            temperature: 1.0,
            banned: vec![],
            seed: 0x5eed_0000_0000_0001,
            step: 7,
            request: 0,
            positions: (0..n as u32).collect(),
        };
        // The safe op validates these exact buffers and shapes and checks that the kernel
        // flags no non-finite logit; the raw launches below reuse them unchanged.
        for l in &logits {
            ops::sample(dev, l, vocab, vocab, &host)?;
        }
        let positions = dev.upload(&host.positions)?;
        let mut token = dev.alloc_zeros::<u32>(n)?;
        let mut confidence = dev.alloc_zeros::<f32>(n)?;
        let mut lse = dev.alloc_zeros::<f32>(n)?;
        let mut flag = dev.alloc_zeros::<u32>(1)?;
        let stream = dev.stream();
        let (t, c, s, f) = (
            addr_mut(&mut token, stream) as *mut u32,
            addr_mut(&mut confidence, stream) as *mut f32,
            addr_mut(&mut lse, stream) as *mut f32,
            addr_mut(&mut flag, stream) as *mut u32,
        );
        let pos = addr(&positions, stream) as *const u32;
        let params = logits
            .iter()
            .map(|l| SlSampleParams {
                logits: addr(l, stream) as *const f32,
                positions: pos,
                banned: std::ptr::null(),
                out_token: t,
                out_confidence: c,
                out_lse: s,
                error_flag: f,
                n: n as u32,
                vocab: vocab as u32,
                stride: vocab as u32,
                cfg: 1,
                guidance: GUIDANCE,
                temperature: host.temperature,
                seed_lo: host.seed as u32,
                seed_hi: (host.seed >> 32) as u32,
                step: host.step,
                request: host.request,
            })
            .collect();
        Ok(SampleWork {
            params,
            _logits: logits,
            _positions: positions,
            _token: token,
            _confidence: confidence,
            _lse: lse,
            _flag: flag,
        })
    }
}

impl Workload for SampleWork {
    fn sets(&self) -> usize {
        self.params.len()
    }

    fn launch(&mut self, dev: &CudaDevice, i: usize) -> Result<()> {
        // `ops::sample` uploads, allocates and waits for its result; the kernel alone is timed
        // through the raw layer.
        // SAFETY: every pointer in `params[i]` points into a buffer owned by `self` (alive as
        // long as `self`, device memory does not move with the struct), allocated in the
        // device's context: logits of 2n rows × vocab (stride = vocab) f32 — `ops::sample`
        // validated exactly this shape on each of these buffers in `new` —, positions and the
        // three outputs of n entries, the flag of one; `banned` is null; the outputs are
        // written only by these launches, which are serialised on the one stream.
        unsafe { raw::sample(dev.kernels(), &self.params[i], dev.stream().cu_stream()) }
    }
}

// --- rmsnorm -------------------------------------------------------------------------------

struct NormSet {
    x: CudaSlice<f32>,
    out: CudaSlice<bf16>,
}

struct NormWork {
    w: CudaSlice<bf16>,
    sets: Vec<NormSet>,
    rows: usize,
    eps: f32,
}

impl Workload for NormWork {
    fn sets(&self) -> usize {
        self.sets.len()
    }

    fn launch(&mut self, dev: &CudaDevice, i: usize) -> Result<()> {
        let s = &mut self.sets[i];
        ops::rmsnorm(
            dev, &mut s.x, None, &self.w, self.eps, self.rows, &mut s.out,
        )
    }
}

// --- rope_kv -------------------------------------------------------------------------------

struct RopeSet {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    k_pool: CudaSlice<bf16>,
    v_pool: CudaSlice<bf16>,
}

struct RopeWork {
    shape: AttnShape,
    rows: usize,
    theta: f64,
    positions: CudaSlice<u32>,
    slots: IndexBuf,
    sets: Vec<RopeSet>,
    /// The generation's (cos, sin) table, as the CUDA backend runs it; `None`: every row
    /// computes its angles (two f64 transcendentals per pair).
    table: Option<RopeTable>,
}

impl Workload for RopeWork {
    fn sets(&self) -> usize {
        self.sets.len()
    }

    fn launch(&mut self, dev: &CudaDevice, i: usize) -> Result<()> {
        let s = &mut self.sets[i];
        let (q_dim, kv_dim) = (self.shape.q_dim(), self.shape.kv_dim());
        let a = RopeKv {
            shape: self.shape,
            n_rows: self.rows,
            positions: &self.positions,
            slots: &self.slots,
            rope_theta: self.theta,
            qkv: RopeQkv::Separate {
                q: &mut s.q,
                q_stride: q_dim,
                k: &s.k,
                v: &s.v,
                kv_stride: kv_dim,
            },
            table: self.table.as_ref(),
        };
        let pool = KvPool {
            k: &mut s.k_pool,
            v: &mut s.v_pool,
            stride: kv_dim,
        };
        ops::rope_kv(dev, a, pool)
    }
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

type Build<'a> = Box<dyn Fn(&mut ChaCha8Rng) -> Result<(CaseInfo, Box<dyn Workload>)> + 'a>;

/// A sparse step of the t2i schedule: step `k` decodes `ck`, step `k − 1` decoded `ck1`.
#[derive(Clone, Copy)]
struct SparseStep {
    k: usize,
    ck: usize,
    ck1: usize,
}

fn sparse_steps() -> Result<Vec<SparseStep>> {
    let counts = shift_counts(T2I_POSITIONS, T2I_STEPS)?;
    CK_TARGETS
        .iter()
        .map(|&t| {
            (1..counts.len())
                .find(|&k| counts[k] >= t)
                .map(|k| SparseStep {
                    k,
                    ck: counts[k],
                    ck1: counts[k - 1],
                })
                .ok_or_else(|| Error::Input(format!("no step of the schedule decodes {t}")))
        })
        .collect()
}

fn attn_shape(cfg: &Config) -> AttnShape {
    AttnShape {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    }
}

/// Every case, built lazily (one at a time, so their buffers never coexist).
fn cases<'a>(dev: &'a CudaDevice, cfg: &'a Config, l2: usize) -> Result<Vec<Build<'a>>> {
    let shape = attn_shape(cfg);
    let regs = cfg.n_registers;
    let mut out: Vec<Build<'a>> = Vec::new();
    // Each attention problem with the current kernel, then the previous one (kept for one
    // release): "did v2 help, and by how much", on the same card and problem.
    for version in [AttnVersion::V2, AttnVersion::V1] {
        for step in sparse_steps()? {
            let rows = regs + step.ck + step.ck1;
            for keys in SPARSE_KEYS {
                if keys < rows {
                    continue;
                }
                let SparseStep { k, ck, ck1 } = step;
                out.push(Box::new(move |rng| {
                    let p = AttnProblem::new(shape, (ck1, ck + regs), k as u32, keys, rng);
                    attention_case(
                        dev,
                        l2,
                        format!("sparse-ck{ck}-k{keys}"),
                        format!(
                            "sparse step {k}: {N_SEQS}x{rows} rows (C_k {ck} + C_k-1 {ck1} + R \
                             {regs}) x {keys} keys"
                        ),
                        &p,
                        version,
                        Some(SPARSE_TARGET_PCT),
                        rng,
                    )
                }));
            }
        }
        out.push(Box::new(move |rng| {
            let p = AttnProblem::new(shape, (DENSE_ROWS, 0), 0, DENSE_ROWS, rng);
            attention_case(
                dev,
                l2,
                "dense".into(),
                format!("dense: {N_SEQS}x{DENSE_ROWS} rows x {DENSE_ROWS} keys, all visible"),
                &p,
                version,
                None,
                rng,
            )
        }));
    }
    for vocab in [cfg.image_vocab, cfg.text_vocab] {
        for n in SAMPLE_ROWS {
            out.push(Box::new(move |rng| {
                let bytes = (2 * n * vocab * 4) as f64;
                let work = SampleWork::new(dev, n, vocab, sets_for(bytes, l2), rng)?;
                let info = CaseInfo {
                    kernel: "sample",
                    id: format!("sample-n{n}-v{vocab}"),
                    shape: format!("{n} rows (CFG: {} read) x V {vocab}, tau 1", 2 * n),
                    note: String::new(),
                    flops: None,
                    bytes,
                    target_pct: Some(SAMPLE_TARGET_PCT),
                };
                Ok((info, Box::new(work) as Box<dyn Workload>))
            }));
        }
    }
    let d = cfg.d_text;
    let eps = cfg.norm_eps as f32;
    out.push(Box::new(move |rng| {
        let n = ROWS_2048 * d;
        let bytes = (n * (4 + 2)) as f64;
        let values = pattern(rng, (1 << 20) + 3, |r| r.gen_range(-2.0f32..2.0));
        let w_host = pattern(rng, d, |r| bf16::from_f32(r.gen_range(0.5..1.5)));
        let sets = (0..sets_for(bytes, l2))
            .map(|_| {
                Ok(NormSet {
                    x: filled(dev, n, &values)?,
                    out: dev.alloc_zeros(n)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let work = NormWork {
            w: dev.upload(&w_host)?,
            sets,
            rows: ROWS_2048,
            eps,
        };
        let info = CaseInfo {
            kernel: "rmsnorm",
            id: format!("rmsnorm-{ROWS_2048}x{d}"),
            shape: format!("{ROWS_2048} rows x {d}, f32 in, bf16 out"),
            note: String::new(),
            flops: None,
            bytes,
            target_pct: None,
        };
        Ok((info, Box::new(work) as Box<dyn Workload>))
    }));
    let theta = cfg.rope_theta;
    for with_table in [true, false] {
        out.push(Box::new(move |rng| {
            let rows = ROWS_2048;
            let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
            let bytes = ((2 * rows * q_dim + 4 * rows * kv_dim) * 2) as f64;
            let values = pattern(rng, 1 << 20, |r| bf16::from_f32(r.gen_range(-2.0..2.0)));
            let sets = (0..sets_for(bytes, l2))
                .map(|_| {
                    Ok(RopeSet {
                        q: filled(dev, rows * q_dim, &values)?,
                        k: filled(dev, rows * kv_dim, &values)?,
                        v: filled(dev, rows * kv_dim, &values)?,
                        k_pool: dev.alloc_zeros(rows * kv_dim)?,
                        v_pool: dev.alloc_zeros(rows * kv_dim)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let positions: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..5000)).collect();
            let mut slots: Vec<u32> = (0..rows as u32).collect();
            slots.shuffle(rng);
            let table = if with_table {
                Some(RopeTable::new(dev, shape.head_dim, theta, 5000)?)
            } else {
                None
            };
            let work = RopeWork {
                shape,
                rows,
                theta,
                positions: dev.upload(&positions)?,
                slots: IndexBuf::upload(dev, &slots)?,
                sets,
                table,
            };
            let (id, note) = if with_table {
                (
                    format!("rope_kv-{rows}"),
                    "angles from the generation's table",
                )
            } else {
                (
                    format!("rope_kv-{rows}-angles"),
                    "angles computed per row (f64)",
                )
            };
            let info = CaseInfo {
                kernel: "rope_kv",
                id,
                shape: format!(
                    "{rows} rows, {} heads x {}, k/v stored at shuffled slots",
                    shape.n_heads, shape.head_dim
                ),
                note: note.into(),
                flops: None,
                bytes,
                target_pct: None,
            };
            Ok((info, Box::new(work) as Box<dyn Workload>))
        }));
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Ceilings
// ------------------------------------------------------------------------------------------

struct Ceilings {
    /// Measured copy bandwidth, bytes read + written per second.
    copy: f64,
    /// The memory interface's nominal rate from the device attributes, when reported.
    hbm_spec: Option<f64>,
    /// Measured bf16 tensor-core rate, FLOP/s.
    tensor: f64,
    /// How `tensor` was measured.
    tensor_source: String,
}

/// Median seconds per 1 GiB device-to-device copy.
fn copy_ceiling(dev: &CudaDevice, clock: &Clock) -> Result<f64> {
    let src = dev.alloc_zeros::<u8>(COPY_BYTES)?;
    let mut dst = dev.alloc_zeros::<u8>(COPY_BYTES)?;
    let stream = dev.stream();
    let mut copy = || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(cuda("copying 1 GiB on the device"))
    };
    for _ in 0..3 {
        copy()?;
    }
    let times = (0..10)
        .map(|_| clock.time(&mut copy))
        .collect::<Result<Vec<f64>>>()?;
    Ok(2.0 * COPY_BYTES as f64 / median(times))
}

/// Nominal memory bandwidth from the device attributes (memory clock × bus width × 2).
fn hbm_spec(dev: &CudaDevice) -> Option<f64> {
    let ctx = dev.context();
    let khz = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        .ok()?;
    let bits = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
        .ok()?;
    (khz > 0 && bits > 0).then(|| 2.0 * f64::from(khz) * 1e3 * f64::from(bits) / 8.0)
}

/// bf16 GEMM `GEMM_N`³ with f32 accumulation through cuBLASLt: FLOP/s (median of 10).
fn gemm_ceiling(dev: &CudaDevice, clock: &Clock) -> Result<f64> {
    use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    // SAFETY: `is_culib_present` only tries to dlopen the cuBLASLt library by its usual names.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "the cuBLASLt library (libcublasLt.so) was not found".into(),
        ));
    }
    let n = GEMM_N as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let values = pattern(&mut rng, (1 << 20) + 1, |r| {
        bf16::from_f32(r.gen_range(-1.0..1.0))
    });
    let a = filled(dev, n * n, &values)?;
    let b = filled(dev, n * n, &values)?;
    let mut c = dev.alloc_zeros::<bf16>(n * n)?;
    let blas = CudaBlasLT::new(dev.stream().clone())
        .map_err(|e| Error::Cuda(format!("creating a cuBLASLt handle: {e}")))?;
    let cfg = MatmulConfig {
        transa: false,
        transb: false,
        transc: false,
        m: GEMM_N,
        n: GEMM_N,
        k: GEMM_N,
        alpha: 1.0,
        lda: GEMM_N as i64,
        ldb: GEMM_N as i64,
        beta: 0.0,
        ldc: GEMM_N as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let mut gemm = || {
        // SAFETY: a, b and c are n × n bf16 matrices of this context (column-major, leading
        // dimension n, no transposes), exactly the sizes `cfg` describes; no bias, no batch.
        unsafe { <CudaBlasLT as Matmul<bf16>>::matmul(&blas, cfg, &a, &b, &mut c, None, None) }
            .map_err(|e| Error::Cuda(format!("cuBLASLt bf16 GEMM: {e}")))
    };
    for _ in 0..3 {
        gemm()?;
    }
    let times = (0..10)
        .map(|_| clock.time(&mut gemm))
        .collect::<Result<Vec<f64>>>()?;
    Ok(2.0 * (GEMM_N as f64).powi(3) / median(times))
}

/// Runs `f`, turning a panic (cudarc panics when a lazily loaded library lacks a symbol) into an
/// error.
fn unpanic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Unavailable(why))
    })
}

fn ceilings(dev: &CudaDevice, clock: &Clock, cfg: &Config, use_graph: bool) -> Result<Ceilings> {
    let copy = copy_ceiling(dev, clock)?;
    let (tensor, tensor_source) = match unpanic(|| gemm_ceiling(dev, clock)) {
        Ok(t) => (
            t,
            format!("cuBLASLt bf16 GEMM {GEMM_N}^3, f32 accumulate (median of 10)"),
        ),
        Err(e) => {
            let mut rng = ChaCha8Rng::seed_from_u64(12);
            let shape = attn_shape(cfg);
            let p = AttnProblem::new(shape, (CEILING_ROWS, 0), 0, CEILING_ROWS, &mut rng);
            let work = AttnWork::new(dev, &p, AttnVersion::V2, 1, &mut rng)?;
            let mut note = None;
            let mut runner = Runner::new(dev, Box::new(work), use_graph, &mut note)?;
            let (t, _) = runner.measure(dev, clock)?;
            (
                p.flops() / t,
                format!(
                    "this crate's attention kernel at dense {N_SEQS}x{CEILING_ROWS} rows \
                     (cuBLASLt unavailable: {e})"
                ),
            )
        }
    };
    Ok(Ceilings {
        copy,
        hbm_spec: hbm_spec(dev),
        tensor,
        tensor_source,
    })
}

// ------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------

/// One row of the summary table.
struct Row {
    info: CaseInfo,
    launches_per_round: usize,
    timing: String,
    /// Median and minimum seconds per launch, or why the case failed.
    result: std::result::Result<(f64, f64), String>,
}

impl Row {
    fn tflops(&self) -> Option<f64> {
        let (t, _) = self.result.as_ref().ok()?;
        self.info.flops.map(|f| f / t / 1e12)
    }

    fn gbps(&self) -> Option<f64> {
        let (t, _) = self.result.as_ref().ok()?;
        Some(self.info.bytes / t / 1e9)
    }

    fn pct_tensor(&self, c: &Ceilings) -> Option<f64> {
        self.tflops().map(|t| 100.0 * t * 1e12 / c.tensor)
    }

    fn pct_copy(&self, c: &Ceilings) -> Option<f64> {
        self.gbps().map(|g| 100.0 * g * 1e9 / c.copy)
    }

    fn target(&self, c: &Ceilings) -> String {
        match (self.info.target_pct, self.pct_copy(c)) {
            (Some(t), Some(p)) => {
                let verdict = if p >= t { "met" } else { "MISSED" };
                format!(">= {t:.0}% copy: {verdict}")
            }
            (Some(t), None) => format!(">= {t:.0}% copy"),
            (None, _) if self.info.id == "dense" => ">= SDPA flash (peer)".into(),
            (None, _) => String::new(),
        }
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn table_md(rows: &[Row], c: &Ceilings) -> String {
    let mut s = String::from(
        "| kernel | shape | note | time µs | TFLOP/s | % tensor | GB/s | % copy | target |\n\
         |---|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let time = match &r.result {
            Ok((t, _)) => format!("{:.2}", t * 1e6),
            Err(e) => format!("error: {e}"),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.info.kernel,
            r.info.shape,
            r.info.note,
            time,
            fmt_opt(r.tflops(), 1),
            fmt_opt(r.pct_tensor(c), 1),
            fmt_opt(r.gbps(), 0),
            fmt_opt(r.pct_copy(c), 1),
            r.target(c),
        );
    }
    s
}

fn ceilings_md(c: &Ceilings) -> String {
    let spec = c.hbm_spec.map_or_else(String::new, |s| {
        format!(
            " ({:.0}% of the nominal {:.0} GB/s)",
            100.0 * c.copy / s,
            s / 1e9
        )
    });
    format!(
        "copy ceiling: {:.0} GB/s (1 GiB device-to-device copy, read + write){spec}\n\
         tensor ceiling: {:.1} TFLOP/s ({})\n",
        c.copy / 1e9,
        c.tensor / 1e12,
        c.tensor_source
    )
}

fn driver_version() -> Option<String> {
    let mut v = 0i32;
    // SAFETY: the driver library is loaded (a device was opened) and the call only writes the
    // version into `v`.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result().ok()?;
    Some(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

fn write_json(path: &str, dev: &CudaDevice, c: &Ceilings, rows: &[Row], l2: usize) -> Result<()> {
    let info = dev.info();
    let runs: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (us, us_min, error) = match &r.result {
                Ok((t, m)) => (Some(t * 1e6), Some(m * 1e6), None),
                Err(e) => (None, None, Some(e.clone())),
            };
            serde_json::json!({
                "kernel": r.info.kernel,
                "key": r.info.id,
                "shape": r.info.shape,
                "note": r.info.note,
                "launches_per_round": r.launches_per_round,
                "timing": r.timing,
                "us": us,
                "us_min": us_min,
                "flops": r.info.flops,
                "bytes": r.info.bytes,
                "tflops": r.tflops(),
                "pct_tensor": r.pct_tensor(c),
                "gbps": r.gbps(),
                "pct_copy": r.pct_copy(c),
                "target_pct_copy": r.info.target_pct,
                "target": r.target(c),
                "error": error,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "bench": "kernels",
        "card": info.name,
        "cc": format!("{}.{}", info.cc.0, info.cc.1),
        "sm_count": info.sm_count,
        "cuda_driver": driver_version(),
        "l2_bytes": l2,
        "ceilings": {
            "copy_gbps": c.copy / 1e9,
            "copy_bytes": COPY_BYTES,
            "hbm_nominal_gbps": c.hbm_spec.map(|s| s / 1e9),
            "tensor_tflops": c.tensor / 1e12,
            "tensor_source": c.tensor_source,
        },
        "flop_formula": "4 * head_dim * n_heads * visible (row, key) pairs",
        "bytes_formula": {
            "attention": "2 * keys * kv_dim * 2 (K and V) + 2 * rows * q_dim * 2 (q, o)",
            "sample": "2 * rows * V * 4 (CFG logits)",
            "rmsnorm": "rows * d * (4 + 2)",
            "rope_kv": "rows * (2 * q_dim + 4 * kv_dim) * 2",
        },
        "runs": runs,
        "table_md": format!("{}\n{}", ceilings_md(c), table_md(rows, c)),
    });
    let text = serde_json::to_string_pretty(&doc)
        .map_err(|e| Error::Input(format!("serialising the results: {e}")))?;
    std::fs::write(path, text).map_err(|e| Error::Input(format!("writing {path}: {e}")))
}

// ------------------------------------------------------------------------------------------
// Main
// ------------------------------------------------------------------------------------------

fn run(dev: &CudaDevice) -> Result<()> {
    // SAFETY: this process uses one stream (the device's) for every allocation, copy and
    // launch, so cudarc's cross-stream event bookkeeping has nothing to order; every buffer is
    // allocated after this call (the device opened none), and none is freed while work that
    // uses it is queued on another stream (there is none).
    unsafe { dev.context().disable_event_tracking() };
    let cfg = Config::preset("lavida-o")?;
    let info = dev.info();
    let l2 = dev
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .ok()
        .filter(|&b| b > 0)
        .map_or(DEFAULT_L2, |b| b as usize);
    let use_graph = std::env::var_os("SL_BENCH_NO_GRAPH").is_none();
    println!(
        "kernels bench on {} (cc {}.{}, {} SMs, L2 {} MiB, CUDA driver {}), images {:?}",
        info.name,
        info.cc.0,
        info.cc.1,
        info.sm_count,
        l2 >> 20,
        driver_version().unwrap_or_else(|| "?".into()),
        dev.kernels().images()
    );
    let clock = Clock::new(dev)?;
    let ceil = ceilings(dev, &clock, &cfg, use_graph)?;
    print!("{}", ceilings_md(&ceil));

    let mut crit = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let mut rows = Vec::new();
    for build in cases(dev, &cfg, l2)? {
        let (info, work) = match build(&mut rng) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("a case failed to build: {e}");
                return Err(e);
            }
        };
        let mut fallback = None;
        let mut runner = match Runner::new(dev, work, use_graph, &mut fallback) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{} {}: {e}", info.kernel, info.shape);
                rows.push(Row {
                    info,
                    launches_per_round: 0,
                    timing: String::new(),
                    result: Err(e.to_string()),
                });
                continue;
            }
        };
        let timing = match (&runner.graph, fallback) {
            (Some(_), _) => "graph".to_string(),
            (None, Some(why)) => why,
            (None, None) => "direct launches".to_string(),
        };
        let result = runner.measure(dev, &clock).map_err(|e| e.to_string());
        if result.is_ok() {
            let mut group = crit.benchmark_group(info.kernel);
            group.throughput(match (info.flops, info.target_pct) {
                // Dense attention is compute-bound: elements are FLOPs.
                (Some(f), None) => Throughput::Elements(f as u64),
                _ => Throughput::Bytes(info.bytes as u64),
            });
            // One criterion iteration is one launch: run whole rounds covering `iters`
            // launches and report the per-launch GPU time times `iters`.
            let per_round = runner.launches_per_round as u64;
            group.bench_function(&info.id, |b| {
                b.iter_custom(|iters| {
                    let t = runner
                        .time(dev, &clock, iters.div_ceil(per_round).max(1))
                        .unwrap_or_else(|e| panic!("{}: {e}", info.id));
                    Duration::from_secs_f64(t * iters as f64)
                })
            });
            group.finish();
        }
        rows.push(Row {
            info,
            launches_per_round: runner.launches_per_round,
            timing,
            result,
        });
    }

    println!(
        "\nSummary (median of {BATCHES} event-timed batches; attention FLOPs = 4 * head_dim * \
         n_heads * visible pairs)\n"
    );
    print!("{}", ceilings_md(&ceil));
    print!("{}", table_md(&rows, &ceil));
    if let Some(path) = std::env::var_os("SL_BENCH_JSON") {
        let path = path.to_string_lossy().into_owned();
        write_json(&path, dev, &ceil, &rows, l2)?;
        println!("written to {path}");
    }
    crit.final_summary();
    if let Some(r) = rows.iter().find(|r| r.result.is_err()) {
        return Err(Error::Cuda(format!(
            "{} {} failed: {}",
            r.info.kernel,
            r.info.shape,
            r.result.as_ref().err().map_or("", String::as_str)
        )));
    }
    Ok(())
}

fn main() {
    let dev = match CudaDevice::new(0) {
        Ok(dev) => dev,
        Err(Error::Unavailable(why)) => {
            println!("kernels bench: nothing measured, no usable CUDA device ({why})");
            return;
        }
        Err(e) => {
            eprintln!("kernels bench: opening the CUDA device failed: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&dev) {
        eprintln!("kernels bench failed: {e}");
        std::process::exit(1);
    }
}

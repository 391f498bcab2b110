//! An engine that allocates device memory itself and hands the kernels raw device pointers and
//! a raw `CUstream` (`sparse_lavida::cuda::raw`, one `unsafe fn` per kernel, each with its
//! safety contract): here the memory comes from `cuMemAlloc` and the stream from
//! `cuStreamCreate`, as an engine with its own allocator would have them. The host side plans
//! with the kernel contract (`contract::query_tiles`, `contract::choose_splits`), fills
//! `SlAttnParams` / `SlRmsNormParams` of `kernels/params.h`, and launches. Results are checked
//! against the crate's CPU oracles; exits 1 on a mismatch, 2 without a CUDA device.
//!
//! ```sh
//! cargo run --release --example engine_raw                    # on a GPU
//! LD_LIBRARY_PATH=target/release/emu cargo run --release --features emulator --example engine_raw
//! ```

use std::ptr::null_mut;

use cudarc::driver::{CudaContext, result, sys};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::backend::cpu::attention::{AttnInputs, attention_naive};
use sparse_lavida::backend::cpu::ops::rmsnorm;
use sparse_lavida::contract::abi::{
    SL_ATTN_BLOCK_M, SL_ATTN_BLOCK_N, SlAttnParams, SlRmsNormParams,
};
use sparse_lavida::contract::attn::{AttnVersion, key_tile_summaries};
use sparse_lavida::contract::{AttnShape, Branch, Tag, choose_splits, query_tiles};
use sparse_lavida::cuda::device::{Kernels, device_count};
use sparse_lavida::cuda::raw;
use sparse_lavida::{Error, Result};

const SHAPE: AttnShape = AttnShape {
    n_heads: 8,
    n_kv_heads: 8,
    head_dim: 128,
};
const SLOTS: usize = 200;

/// A device allocation of the engine (freed on drop).
struct DevBuf {
    ptr: sys::CUdeviceptr,
}

impl DevBuf {
    fn upload<T: Copy>(host: &[T]) -> Result<DevBuf> {
        let buf = DevBuf::zeroed::<T>(host.len())?;
        // SAFETY: `buf` holds `host.len()` values of T (just allocated); the copy is synchronous.
        unsafe { result::memcpy_htod_sync(buf.ptr, host) }?;
        Ok(buf)
    }

    fn zeroed<T>(len: usize) -> Result<DevBuf> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: a plain allocation in the current context (bound in `main`).
        let ptr = unsafe { result::malloc_sync(bytes) }?;
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }?;
        Ok(DevBuf { ptr })
    }

    fn download<T: Copy + Default>(&self, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        // SAFETY: the buffer holds at least `len` values of T; the copy is synchronous.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }?;
        Ok(out)
    }

    fn ptr<T>(&self) -> *mut T {
        self.ptr as usize as *mut T
    }

    fn cptr<T>(&self) -> *const T {
        self.ptr as usize as *const T
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_sync`, freed once, after the stream was synchronized.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// bf16-rounded random values, as f32 (the oracle's input) and bf16 (the device's).
fn bf(rng: &mut ChaCha8Rng, n: usize) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0)))
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
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

fn main() -> Result<()> {
    if let Err(e) = device_count() {
        eprintln!("no CUDA device: {e}");
        std::process::exit(2);
    }
    // The engine's context, current on this thread, and its own stream.
    let ctx = CudaContext::new(0)?;
    ctx.bind_to_thread()?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking)?;
    let kernels = Kernels::load(&ctx)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);

    // --- Attention: one sequence of 90 rows (one 128-row query tile) over 150 gathered keys ---
    let (rows, q_dim, kv_dim) = (90usize, SHAPE.q_dim(), SHAPE.kv_dim());
    let (q, q_host) = bf(&mut rng, rows * q_dim);
    let (k, k_host) = bf(&mut rng, SLOTS * kv_dim);
    let (v, v_host) = bf(&mut rng, SLOTS * kv_dim);
    let row_tags: Vec<Tag> = (0..rows as u32)
        .map(|r| Tag::new(Branch::Text, 1 + r % 3, r % 4 == 0))
        .collect();
    let kv_indices: Vec<u32> = (0..150).map(|i| (i * 37 + 11) % SLOTS as u32).collect();
    let kv_tags: Vec<Tag> = (0..150u32)
        .map(|i| Tag::new(Branch::Text, i % 4, i % 7 == 0))
        .collect();
    let (seq_indptr, kv_indptr) = (vec![0u32, rows as u32], vec![0u32, 150]);
    // Host planning with the kernel contract.
    let (qtile_seq, qtile_row0) = query_tiles(&seq_indptr, SL_ATTN_BLOCK_M);
    let (ktile_indptr, summaries) =
        key_tile_summaries(&kv_indptr, &kv_tags, SL_ATTN_BLOCK_N as usize);
    let summary_words: Vec<u32> = summaries.iter().flat_map(|s| s.0).collect();
    let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    // The grid is sized to the CTAs that run at once: CTAs per SM (occupancy) times SMs.
    let workers = kernels.attention_ctas_per_sm(AttnVersion::V2, SHAPE.head_dim as u32) as usize
        * sms.max(1) as usize;
    let n_splits = choose_splits(qtile_seq.len(), SHAPE.n_heads, 150, workers);
    let tags = |t: &[Tag]| t.iter().map(|t| t.0).collect::<Vec<u32>>();
    let d = (
        DevBuf::upload(&q_host)?,
        DevBuf::upload(&k_host)?,
        DevBuf::upload(&v_host)?,
    );
    let o = DevBuf::zeroed::<bf16>(rows * q_dim)?;
    let partial_o = DevBuf::zeroed::<f32>(n_splits * rows * q_dim)?;
    let partial_lse = DevBuf::zeroed::<f32>(n_splits * rows * SHAPE.n_heads)?;
    let idx = [
        DevBuf::upload(&tags(&row_tags))?,
        DevBuf::upload(&qtile_seq)?,
        DevBuf::upload(&qtile_row0)?,
        DevBuf::upload(&seq_indptr)?,
        DevBuf::upload(&kv_indptr)?,
        DevBuf::upload(&kv_indices)?,
        DevBuf::upload(&tags(&kv_tags))?,
        DevBuf::upload(&ktile_indptr)?,
        DevBuf::upload(&summary_words)?,
    ];
    let p = SlAttnParams {
        q: d.0.cptr(),
        k_pool: d.1.cptr(),
        v_pool: d.2.cptr(),
        o: o.ptr(),
        lse: null_mut(),
        partial_o: if n_splits > 1 {
            partial_o.ptr()
        } else {
            null_mut()
        },
        partial_lse: if n_splits > 1 {
            partial_lse.ptr()
        } else {
            null_mut()
        },
        row_tags: idx[0].cptr(),
        qtile_seq: idx[1].cptr(),
        qtile_row0: idx[2].cptr(),
        seq_indptr: idx[3].cptr(),
        kv_indptr: idx[4].cptr(),
        kv_indices: idx[5].cptr(),
        kv_tags: idx[6].cptr(),
        ktile_indptr: idx[7].cptr(),
        kv_summary: idx[8].cptr(),
        n_rows: rows as u32,
        n_qtiles: qtile_seq.len() as u32,
        n_seqs: 1,
        n_slots: SLOTS as u32,
        q_stride: q_dim as u32,
        kv_stride: kv_dim as u32,
        o_stride: q_dim as u32,
        n_heads: SHAPE.n_heads as u32,
        n_kv_heads: SHAPE.n_kv_heads as u32,
        head_dim: SHAPE.head_dim as u32,
        n_splits: n_splits as u32,
        joint: 0,
        scale_log2: std::f32::consts::LOG2_E / (SHAPE.head_dim as f32).sqrt(),
        _pad: 0,
    };
    // SAFETY: every pointer is a live allocation of this context sized for the struct's counts
    // (q/o: rows × q_dim bf16, pools: SLOTS × kv_dim, the workspaces for n_splits, the index
    // arrays their lengths); the tiles come from `query_tiles` and the key tiles and summaries
    // from `key_tile_summaries` on the same keys, the CSR offsets are valid and
    // every kv_indices entry is below SLOTS; strides are multiples of 8 and cuMemAlloc's
    // pointers 256-byte aligned; o aliases no input; `stream` belongs to the kernels' context.
    unsafe { raw::attention(&kernels, &p, stream) }?;

    // --- RMSNorm, fused with the residual add, in place on the engine's f32 buffer ---
    let (n, dm) = (32usize, 256usize);
    let x: Vec<f32> = (0..n * dm).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let (add, add_host) = bf(&mut rng, n * dm);
    let (w, w_host) = bf(&mut rng, dm);
    let (x_dev, add_dev, w_dev) = (
        DevBuf::upload(&x)?,
        DevBuf::upload(&add_host)?,
        DevBuf::upload(&w_host)?,
    );
    let normed = DevBuf::zeroed::<bf16>(n * dm)?;
    let p = SlRmsNormParams {
        x: x_dev.ptr(),
        add: add_dev.cptr(),
        w: w_dev.cptr(),
        out: normed.ptr(),
        n_rows: n as u32,
        d: dm as u32,
        eps: 1e-5,
        _pad: 0,
    };
    // SAFETY: x, add and out hold n rows of d, w holds d, all live allocations of this context;
    // x is updated in place (params.h allows it), out aliases nothing; `stream` belongs to the
    // kernels' context.
    unsafe { raw::rmsnorm(&kernels, &p, stream) }?;
    // SAFETY: a live stream of this context.
    unsafe { result::stream::synchronize(stream) }?;

    // --- The oracles ---
    let got: Vec<f32> = o
        .download::<bf16>(rows * q_dim)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let (want, _) = attention_naive(&AttnInputs {
        q: &q,
        row_tags: &row_tags,
        seq_indptr: &seq_indptr,
        k_pool: &k,
        v_pool: &v,
        kv_indptr: &kv_indptr,
        kv_indices: &kv_indices,
        kv_tags: &kv_tags,
        joint: false,
        shape: SHAPE,
    })?;
    let attn_err = relative_l2(&got, &want);
    let summed: Vec<f32> = x.iter().zip(&add).map(|(a, b)| a + b).collect();
    let mut want_norm = vec![0f32; n * dm];
    rmsnorm(&summed, &w, 1e-5, &mut want_norm)?;
    let got_norm: Vec<f32> = normed
        .download::<bf16>(n * dm)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let want_norm: Vec<f64> = want_norm.iter().map(|&v| v as f64).collect();
    let norm_err = relative_l2(&got_norm, &want_norm);
    let x_after: Vec<f32> = x_dev.download(n * dm)?;
    let add_exact = x_after.iter().zip(&summed).all(|(a, b)| a == b);
    println!(
        "attention ({n_splits} split(s)): rel. L2 {attn_err:.2e} vs naive f64; rmsnorm: rel. L2 \
         {norm_err:.2e} vs the CPU twin, residual add {}",
        if add_exact { "exact" } else { "WRONG" }
    );
    // SAFETY: the stream is idle (synchronized) and destroyed once.
    unsafe { result::stream::destroy(stream) }?;
    if attn_err > 1e-2 || norm_err > 1e-2 || !add_exact || got.iter().any(|v| v.is_nan()) {
        eprintln!("MISMATCH against the CPU oracles");
        std::process::exit(1);
    }
    println!("ok");
    Ok::<(), Error>(())
}

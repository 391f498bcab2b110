//! The C ABI of sparse-lavida's CUDA kernel layer, for C, C++ and Python engines:
//! `libsparse_lavida_capi.so` with the entry points of `include/sparse_lavida.h`.
//!
//! Each entry point takes a parameter struct of `kernels/params.h` (raw device pointers the
//! engine owns) and the engine's `CUstream`, and returns an error code ([`SL_OK`] or one of
//! `SL_ERR_*`), with the message of the last failure on the calling thread in
//! [`sl_last_error`]. No panic crosses the boundary: every entry point runs under
//! `catch_unwind` and reports a panic as [`SL_ERR_INTERNAL`]. None allocates device memory or
//! synchronizes, so every launch can be captured into a CUDA graph (`cudaStreamBeginCapture`).
//!
//! The kernels are loaded once per device into its primary context ([`sl_kernels_load`]),
//! which is the context the CUDA runtime API (`cudaMalloc`, `cudaStreamCreate`), PyTorch and
//! most engines use: streams and pointers given to the launches must belong to it.
//!
//! Each `sl_launch_*` is the safe-to-call wrapper of the `unsafe` function of the same kernel
//! in `sparse_lavida::cuda::raw`: it checks the pointers it dereferences itself (the handle,
//! the params struct) and nothing else; the caller keeps that function's safety contract
//! (repeated in the header).

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::driver::{CudaContext, sys};
use sparse_lavida::Error;
use sparse_lavida::contract::Tag;
use sparse_lavida::contract::abi::{
    SlAggregateParams, SlAttnParams, SlCommitParams, SlEmbedParams, SlFillParams, SlGatherParams,
    SlInitParams, SlMaskedSoftmaxParams, SlResolveParams, SlRmsNormParams, SlRopeKvParams,
    SlSampleParams, SlSwigluParams,
};
use sparse_lavida::cuda::device::{Kernels, device_count};
use sparse_lavida::cuda::raw;

/// Success.
pub const SL_OK: c_int = 0;
/// A null pointer or an argument the launch refuses (a head_dim without a kernel, a grid
/// beyond the device's limits).
pub const SL_ERR_INVALID: c_int = 1;
/// No CUDA driver, no device, no kernels in this build, or none that runs on the device.
pub const SL_ERR_UNAVAILABLE: c_int = 2;
/// A CUDA driver call failed (the message names it).
pub const SL_ERR_CUDA: c_int = 3;
/// An internal error (a caught panic): a bug of this library.
pub const SL_ERR_INTERNAL: c_int = 4;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs `f`, turning an error or a panic into an error code and the thread's last error.
fn guard(f: impl FnOnce() -> sparse_lavida::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SL_OK,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            match e {
                Error::Input(_) => SL_ERR_INVALID,
                Error::Unavailable(_) => SL_ERR_UNAVAILABLE,
                Error::Cuda(_) => SL_ERR_CUDA,
                _ => SL_ERR_INTERNAL,
            }
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            set_last_error(&format!("internal error (a bug of sparse-lavida): {why}"));
            SL_ERR_INTERNAL
        }
    }
}

fn null(what: &str) -> Error {
    Error::Input(format!("{what} is null"))
}

/// The kernels loaded into one device's primary context (an opaque handle in C).
pub struct SlKernels {
    kernels: Kernels,
    /// Keeps the primary context retained while the kernels live.
    _ctx: Arc<CudaContext>,
    sm_count: u32,
}

/// The message of the last failed call on this thread (empty when none failed). The pointer
/// stays valid until the next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn sl_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Loads the kernels into the primary context of device `device` and stores a handle in
/// `*out` (null on failure).
///
/// # Safety
/// `out` is null (an error) or points at writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_kernels_load(device: c_int, out: *mut *mut SlKernels) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: checked non-null; the caller guarantees it is writable.
        unsafe { *out = std::ptr::null_mut() };
        let ordinal = usize::try_from(device)
            .map_err(|_| Error::Input(format!("device {device} is negative")))?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} requested, but there are {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::Cuda(format!("retaining the primary context: {e}")))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::Cuda(format!("reading the SM count: {e}")))?;
        let kernels = Kernels::load(&ctx)?;
        let handle = Box::new(SlKernels {
            kernels,
            _ctx: ctx,
            sm_count: sm_count.max(1) as u32,
        });
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Frees a handle of [`sl_kernels_load`] (null: nothing) and unloads its kernels: every launch
/// made through it must have completed (synchronize its streams first).
///
/// # Safety
/// `kernels` is null or a handle of [`sl_kernels_load`] not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_kernels_free(kernels: *mut SlKernels) {
    if kernels.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller guarantees a live handle made by Box::into_raw.
        drop(unsafe { Box::from_raw(kernels) });
    }));
}

/// The device's streaming multiprocessors (the `workers` of [`sl_choose_splits`]).
///
/// # Safety
/// `kernels` is null or a live handle; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_kernels_sm_count(kernels: *const SlKernels, out: *mut u32) -> c_int {
    guard(|| {
        // SAFETY: null checked; the caller guarantees a live handle.
        let k = unsafe { kernels.as_ref() }.ok_or_else(|| null("kernels"))?;
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: checked non-null; the caller guarantees it is writable.
        unsafe { *out = k.sm_count };
        Ok(())
    })
}

/// The query tiles of a ragged row set (`SlAttnParams::qtile_seq` / `qtile_row0`): tiles of up
/// to `SL_ATTN_BLOCK_M` rows of one sequence, in row order. Writes at most `capacity` tiles and
/// their count to `*n_qtiles` (a count above `capacity` is an error, with the count written).
///
/// # Safety
/// `seq_indptr` holds `n_seqs + 1` valid CSR offsets; `qtile_seq` and `qtile_row0` hold
/// `capacity` entries; `n_qtiles` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_query_tiles(
    seq_indptr: *const u32,
    n_seqs: u32,
    qtile_seq: *mut u32,
    qtile_row0: *mut u32,
    capacity: u32,
    n_qtiles: *mut u32,
) -> c_int {
    guard(|| {
        if seq_indptr.is_null() || qtile_seq.is_null() || qtile_row0.is_null() {
            return Err(null("an array"));
        }
        if n_qtiles.is_null() {
            return Err(null("n_qtiles"));
        }
        // SAFETY: the caller guarantees n_seqs + 1 readable entries.
        let indptr = unsafe { std::slice::from_raw_parts(seq_indptr, n_seqs as usize + 1) };
        let rows = indptr[indptr.len() - 1] as usize;
        sparse_lavida::contract::attn::check_indptr("query tiles", "seq_indptr", indptr, rows)?;
        let (seq, row0) = sparse_lavida::contract::query_tiles(
            indptr,
            sparse_lavida::contract::abi::SL_ATTN_BLOCK_M,
        );
        // SAFETY: checked non-null; writable per the contract.
        unsafe { *n_qtiles = seq.len() as u32 };
        if seq.len() > capacity as usize {
            return Err(Error::Input(format!(
                "{} query tiles for a capacity of {capacity}",
                seq.len()
            )));
        }
        // SAFETY: the caller guarantees `capacity` writable entries in each, and
        // `seq.len() <= capacity`.
        unsafe {
            std::ptr::copy_nonoverlapping(seq.as_ptr(), qtile_seq, seq.len());
            std::ptr::copy_nonoverlapping(row0.as_ptr(), qtile_row0, row0.len());
        }
        Ok(())
    })
}

/// The key tiles of each sequence and their summaries (`SlAttnParams::ktile_indptr` /
/// `kv_summary`): the keys `kv_indptr[s]..kv_indptr[s+1]` of sequence `s` cut into tiles of
/// `SL_ATTN_BLOCK_N`, `SL_ATTN_SUMMARY_WORDS` words per tile (`contract::attn::
/// key_tile_summaries`). Writes `n_seqs + 1` offsets to `ktile_indptr`, at most `capacity`
/// summaries to `summaries` and their count to `*n_ktiles` (a count above `capacity` is an
/// error, with the count written).
///
/// # Safety
/// `kv_indptr` holds `n_seqs + 1` valid CSR offsets and `kv_tags` `kv_indptr[n_seqs]` tags;
/// `ktile_indptr` holds `n_seqs + 1` entries and `summaries` `capacity ·
/// SL_ATTN_SUMMARY_WORDS`; `n_ktiles` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_key_tiles(
    kv_indptr: *const u32,
    n_seqs: u32,
    kv_tags: *const u32,
    ktile_indptr: *mut u32,
    summaries: *mut u32,
    capacity: u32,
    n_ktiles: *mut u32,
) -> c_int {
    guard(|| {
        if kv_indptr.is_null() || ktile_indptr.is_null() || summaries.is_null() {
            return Err(null("an array"));
        }
        if n_ktiles.is_null() {
            return Err(null("n_ktiles"));
        }
        // SAFETY: the caller guarantees n_seqs + 1 readable entries.
        let indptr = unsafe { std::slice::from_raw_parts(kv_indptr, n_seqs as usize + 1) };
        let keys = indptr[indptr.len() - 1] as usize;
        sparse_lavida::contract::attn::check_indptr("key tiles", "kv_indptr", indptr, keys)?;
        if keys > 0 && kv_tags.is_null() {
            return Err(null("kv_tags"));
        }
        let tags: Vec<Tag> = if keys == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller guarantees kv_indptr[n_seqs] readable tags (non-null).
            unsafe { std::slice::from_raw_parts(kv_tags, keys) }
                .iter()
                .map(|&t| Tag(t))
                .collect()
        };
        let (tile_indptr, sums) = sparse_lavida::contract::attn::key_tile_summaries(
            indptr,
            &tags,
            sparse_lavida::contract::abi::SL_ATTN_BLOCK_N as usize,
        );
        let count = u32::try_from(sums.len())
            .map_err(|_| Error::Input(format!("{} key tiles", sums.len())))?;
        // SAFETY: checked non-null; writable per the contract.
        unsafe { *n_ktiles = count };
        if count > capacity {
            return Err(Error::Input(format!(
                "{count} key tiles for a capacity of {capacity}"
            )));
        }
        let words: Vec<u32> = sums.iter().flat_map(|s| s.0).collect();
        // SAFETY: the caller guarantees n_seqs + 1 writable offsets and capacity summaries
        // (count <= capacity); the lengths match what was computed.
        unsafe {
            std::ptr::copy_nonoverlapping(tile_indptr.as_ptr(), ktile_indptr, tile_indptr.len());
            std::ptr::copy_nonoverlapping(words.as_ptr(), summaries, words.len());
        }
        Ok(())
    })
}

/// The attention CTAs that run at once for `head_dim` (the kernel's CTAs per SM, from the
/// driver's occupancy calculator at load, times the SMs): the `workers` of [`sl_choose_splits`].
///
/// # Safety
/// `kernels` is null or a live handle; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sl_kernels_attention_workers(
    kernels: *const SlKernels,
    head_dim: u32,
    out: *mut u32,
) -> c_int {
    guard(|| {
        // SAFETY: null checked; the caller guarantees a live handle.
        let k = unsafe { kernels.as_ref() }.ok_or_else(|| null("kernels"))?;
        if out.is_null() {
            return Err(null("out"));
        }
        if k.kernels.attention(head_dim).is_none() {
            return Err(Error::Input(format!(
                "no attention kernel for head_dim {head_dim} (64 and 128 are compiled)"
            )));
        }
        let ctas = k
            .kernels
            .attention_ctas_per_sm(sparse_lavida::contract::AttnVersion::V2, head_dim);
        // SAFETY: checked non-null; the caller guarantees it is writable.
        unsafe { *out = ctas.saturating_mul(k.sm_count) };
        Ok(())
    })
}

/// The split count of the crate's heuristic for `n_qtiles` query tiles of `n_heads` heads over
/// at most `max_keys` keys per sequence on `workers` concurrent CTAs
/// ([`sl_kernels_attention_workers`]; 1 split when the grid is already full).
#[unsafe(no_mangle)]
pub extern "C" fn sl_choose_splits(
    n_qtiles: u32,
    n_heads: u32,
    max_keys: u32,
    workers: u32,
) -> u32 {
    sparse_lavida::contract::choose_splits(
        n_qtiles as usize,
        n_heads as usize,
        max_keys as usize,
        workers as usize,
    ) as u32
}

/// Declares one `sl_launch_<kernel>(kernels, params, stream)` entry point over
/// `raw::<kernel>`.
macro_rules! launch {
    ($(#[$doc:meta])* $name:ident, $raw:ident, $params:ty) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `kernels` is null or a live handle of [`sl_kernels_load`]; `params` is null or points
        /// at a params struct that, with `stream`, keeps the safety contract of the same kernel's
        /// function in `sparse_lavida::cuda::raw` (pointers into live allocations of the
        /// kernels' context holding what params.h documents, outputs not aliasing inputs, the
        /// buffers untouched by other work until the stream reaches the launch); `stream` is
        /// null (the legacy default stream) or a live stream of that context.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            kernels: *const SlKernels,
            params: *const $params,
            stream: sys::CUstream,
        ) -> c_int {
            guard(|| {
                // SAFETY: null checked; the caller guarantees a live handle.
                let k = unsafe { kernels.as_ref() }.ok_or_else(|| null("kernels"))?;
                // SAFETY: null checked; the caller guarantees a live, aligned struct.
                let p = unsafe { params.as_ref() }.ok_or_else(|| null("params"))?;
                // SAFETY: the caller keeps the raw function's contract (above).
                unsafe { raw::$raw(&k.kernels, p, stream) }
            })
        }
    };
}

launch!(
    /// `sl_attention_hd64` / `sl_attention_hd128` (by `head_dim`), then `sl_attention_merge`
    /// when `n_splits > 1`.
    sl_launch_attention, attention, SlAttnParams
);
launch!(
    /// `sl_attention_merge` alone, for engines that schedule the two launches themselves.
    sl_launch_attention_merge, attention_merge, SlAttnParams
);
launch!(
    /// `sl_masked_softmax`.
    sl_launch_masked_softmax, masked_softmax, SlMaskedSoftmaxParams
);
launch!(
    /// `sl_sample`: the fused sampler pass.
    sl_launch_sample, sample, SlSampleParams
);
launch!(
    /// `sl_embed` (optionally fused with the first RMSNorm).
    sl_launch_embed, embed, SlEmbedParams
);
launch!(
    /// `sl_rmsnorm` (optionally fused with the residual add).
    sl_launch_rmsnorm, rmsnorm, SlRmsNormParams
);
launch!(
    /// `sl_rope_kv`: RoPE on q in place and on k, k and v stored at their pool slots.
    sl_launch_rope_kv, rope_kv, SlRopeKvParams
);
launch!(
    /// `sl_swiglu`.
    sl_launch_swiglu, swiglu, SlSwigluParams
);
launch!(
    /// `sl_aggregate_sparse`: a sparse step's rows and keys built on the device.
    sl_launch_aggregate_sparse, aggregate_sparse, SlAggregateParams
);
launch!(
    /// `sl_init_uniform`: seeded uniform bf16 values.
    sl_launch_init_uniform, init_uniform, SlInitParams
);
launch!(
    /// `sl_resolve_plan`: a step's template plan patched from the decode state.
    sl_launch_resolve_plan, resolve_plan, SlResolveParams
);
launch!(
    /// `sl_commit`: a step's choices recorded in the decode state.
    sl_launch_commit, commit, SlCommitParams
);
launch!(
    /// `sl_gather_rows`: rows of a matrix by a device index list.
    sl_launch_gather_rows, gather_rows, SlGatherParams
);
launch!(
    /// `sl_fill_u32`: a buffer set to one value.
    sl_launch_fill_u32, fill_u32, SlFillParams
);

/// The version of this library, as a static C string.
#[unsafe(no_mangle)]
pub extern "C" fn sl_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

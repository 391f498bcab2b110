//! The low-level layer: one `unsafe fn` per kernel, taking the kernel's parameter struct from
//! `kernels/params.h` (raw device pointers inside) and the `CUstream` to queue it on, and
//! launching with the geometry params.h fixes. Nothing is validated beyond what picks the launch
//! (a head_dim without a kernel, an empty grid); the safe ops above check everything.
//!
//! # Use from another engine
//! Load the kernels into your context with [`Kernels::load`] (or take them from a
//! [`CudaDevice`](crate::cuda::device::CudaDevice)), fill the params struct with device pointers
//! you own, and call the function with a `CUstream` of that context: a stream your engine made
//! (PyTorch's `torch.cuda.current_stream().cuda_stream`, a `cudaStream_t`, cudarc's
//! `CudaStream::cu_stream`), or null for the legacy default stream. Launches are asynchronous:
//! the buffers must stay allocated, and untouched by other streams, until the stream reaches
//! the launch. Every function binds the kernels' context to the calling thread first; none
//! allocates or synchronizes, so all of them can be captured into a CUDA graph.
//!
//! # Common safety contract
//! For every function here the caller guarantees:
//! 1. `stream` is null or a live stream of the context `kernels` was loaded into;
//! 2. every non-null pointer in the params struct points into a live device allocation of that
//!    context holding at least the elements params.h documents for it (with the struct's
//!    counts and strides), and nullable pointers are either null or such a pointer;
//! 3. output buffers are not read or written by other work until this launch completes on
//!    `stream`, and no output overlaps another buffer of the same launch (except where params.h
//!    says a buffer is updated in place);
//! 4. the additional conditions listed in the function's own `# Safety` section.

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use crate::contract::attn::AttnVersion;
use crate::cuda::abi::{
    self, SL_AGG_THREADS, SL_ATTN_THREADS, SL_ELEM_THREADS, SL_GATHER_THREADS, SL_MERGE_HEADS,
    SL_MERGE_THREADS, SL_PROGRAM_THREADS, SL_ROW_THREADS, SL_SAMPLE_THREADS, SL_SOFTMAX_THREADS,
    SlAggregateParams, SlAttnParams, SlCommitParams, SlEmbedParams, SlFillParams, SlGatherParams,
    SlInitParams, SlMaskedSoftmaxParams, SlResolveParams, SlRmsNormParams, SlRopeKvParams,
    SlSampleParams, SlSwigluParams,
};
use crate::cuda::device::{Kernel, Kernels, cuda_err};
use crate::error::{Error, Result};

/// Largest `gridDim.y` / `gridDim.z`.
const MAX_GRID_YZ: u32 = 65_535;
/// Blocks of the grid-stride elementwise kernels: enough to fill any current GPU, few enough
/// that each thread loops a few times on large inputs.
const ELEM_MAX_BLOCKS: u32 = 65_535;

/// Queues `kernel<<<grid, block, smem, stream>>>(*params)`.
///
/// # Safety
/// The raw-layer contract (module docs) for `params` and the kernel's geometry.
unsafe fn launch<P>(
    kernels: &Kernels,
    kernel: &Kernel,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    stream: sys::CUstream,
    params: &P,
) -> Result<()> {
    kernels
        .context()
        .bind_to_thread()
        .map_err(cuda_err("binding the CUDA context"))?;
    // cuLaunchKernel reads the argument through this pointer during the call (it copies the
    // struct into the launch), so pointing at a borrowed value is enough.
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: the kernel takes exactly one argument, the params struct `P` by value (params.h),
    // and `args[0]` points at a live `P`; the caller guarantees the pointers inside it (module
    // docs); the kernels' context, which `stream` belongs to, is current (bound above).
    unsafe {
        result::launch_kernel(
            kernel.cu_function(),
            grid,
            (block, 1, 1),
            smem,
            stream,
            &mut args,
        )
    }
    .map_err(cuda_err(format_args!("launching {}", kernel.name())))
}

/// Gathered-token attention (`sl_attention_hd64` / `sl_attention_hd128`), followed by
/// `sl_attention_merge` when `p.n_splits > 1`. Grid `(n_qtiles, n_heads, n_splits)`,
/// `SL_ATTN_THREADS` threads, `SL_ATTN_SMEM_BYTES(head_dim)` dynamic shared memory.
///
/// Errors: a head_dim other than 64 or 128, `n_splits == 0`, `n_heads` / `n_splits` above the
/// grid limit, a null `ktile_indptr` or `kv_summary`; a launch failure.
///
/// # Safety
/// The module's common contract, and:
/// - `qtile_seq` / `qtile_row0` list `n_qtiles` tiles, each at most `SL_ATTN_BLOCK_M` rows of
///   one sequence (`qtile_row0[t] + SL_ATTN_BLOCK_M` may pass the sequence's end; the kernel
///   stops there), every row in exactly one tile;
/// - `seq_indptr` and `kv_indptr` are valid CSR offsets over `n_seqs` sequences (`n_rows` rows,
///   `kv_indices` / `kv_tags` keys), every `kv_indices` entry is below `n_slots`, and `k_pool` /
///   `v_pool` hold `n_slots` rows of `kv_stride`;
/// - `ktile_indptr` and `kv_summary` are the key tiles and summaries of `kv_indptr` /
///   `kv_tags` (`contract::attn::key_tile_summaries` with `SL_ATTN_BLOCK_N`; a summary that
///   claims a visible tile where some pair is hidden yields wrong results, never a fault);
///   `kv_summary` is 16-byte aligned;
/// - `n_heads` is a multiple of `n_kv_heads`; `q_stride >= n_heads·head_dim`,
///   `o_stride >= n_heads·head_dim`, `kv_stride >= n_kv_heads·head_dim`; `q_stride`,
///   `kv_stride` and `o_stride` are multiples of 8 and `q`, `k_pool`, `v_pool`, `o`, `partial_o`
///   16-byte aligned (16-byte `cp.async` and stores), `kv_indices` / `kv_tags` 4-byte aligned;
/// - with `n_splits > 1`, `partial_o` / `partial_lse` hold `[n_splits, n_rows, n_heads,
///   head_dim]` / `[n_splits, n_rows, n_heads]` f32.
pub unsafe fn attention(kernels: &Kernels, p: &SlAttnParams, stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract, which is v2's.
    unsafe { attention_version(kernels, AttnVersion::V2, p, stream) }
}

/// The previous attention kernel (`sl_attention_v1_hd64` / `_hd128`, kept for one release so a
/// GPU run can compare it with [`attention`]), followed by `sl_attention_merge` when
/// `p.n_splits > 1`. Grid `(n_qtiles, n_heads, n_splits)`, `SL_ATTN_THREADS` threads,
/// `SL_ATTN_V1_SMEM_BYTES(head_dim)` dynamic shared memory. It ignores `ktile_indptr` and
/// `kv_summary`.
///
/// # Safety
/// As for [`attention`], except: query tiles of at most `SL_ATTN_V1_BLOCK_M` rows; `o` 4-byte
/// aligned with an even `o_stride` suffices; `ktile_indptr` / `kv_summary` are not read.
pub unsafe fn attention_v1(
    kernels: &Kernels,
    p: &SlAttnParams,
    stream: sys::CUstream,
) -> Result<()> {
    // SAFETY: the caller's contract, which is v1's.
    unsafe { attention_version(kernels, AttnVersion::V1, p, stream) }
}

/// [`attention`] or [`attention_v1`].
///
/// # Safety
/// The contract of the chosen version's function.
pub unsafe fn attention_version(
    kernels: &Kernels,
    version: AttnVersion,
    p: &SlAttnParams,
    stream: sys::CUstream,
) -> Result<()> {
    let Some(kernel) = kernels.attention_of(version, p.head_dim) else {
        return Err(Error::Input(format!(
            "attention: no kernel for head_dim {} (64 and 128 are compiled)",
            p.head_dim
        )));
    };
    if p.n_splits == 0 || p.n_splits > MAX_GRID_YZ || p.n_heads > MAX_GRID_YZ {
        return Err(Error::Input(format!(
            "attention: n_splits {} / n_heads {} outside 1..={MAX_GRID_YZ}",
            p.n_splits, p.n_heads
        )));
    }
    if version == AttnVersion::V2 && (p.ktile_indptr.is_null() || p.kv_summary.is_null()) {
        return Err(Error::Input(
            "attention: ktile_indptr and kv_summary are required (contract::attn::\
             key_tile_summaries, sl_key_tiles)"
                .into(),
        ));
    }
    if p.n_qtiles == 0 || p.n_heads == 0 {
        return Ok(());
    }
    let grid = (p.n_qtiles, p.n_heads, p.n_splits);
    // head_dim is 64 or 128 here (it picked the kernel), so the size fits.
    let smem = match version {
        AttnVersion::V2 => abi::attn_smem_bytes(p.head_dim),
        AttnVersion::V1 => abi::attn_v1_smem_bytes(p.head_dim),
    }
    .unwrap_or(u32::MAX);
    // SAFETY: the caller's contract above covers every pointer and count the kernel reads; the
    // geometry is the one params.h documents and the shared memory was opted into at load.
    unsafe { launch(kernels, kernel, grid, SL_ATTN_THREADS, smem, stream, p) }?;
    if p.n_splits > 1 {
        // SAFETY: same params; the partials were just written by the launch above, in stream
        // order.
        unsafe { attention_merge(kernels, p, stream) }?;
    }
    Ok(())
}

/// `sl_attention_merge`: combines the split partials of [`attention`] into `o` / `lse`. Grid
/// `(n_rows, ceil(n_heads / SL_MERGE_HEADS))`, `SL_MERGE_THREADS` threads (one warp per row and
/// head). [`attention`] calls it; it is public for engines that schedule the two launches
/// themselves.
///
/// # Safety
/// As for [`attention`] with `n_splits > 1`, and the partials were written by the attention
/// kernel (either version) with the same params earlier in stream order; head_dim 64 or 128.
pub unsafe fn attention_merge(
    kernels: &Kernels,
    p: &SlAttnParams,
    stream: sys::CUstream,
) -> Result<()> {
    if p.n_rows == 0 || p.n_heads == 0 {
        return Ok(());
    }
    let heads = p.n_heads.div_ceil(SL_MERGE_HEADS);
    if heads > MAX_GRID_YZ {
        return Err(Error::Input(format!(
            "attention merge: n_heads {} needs more than {MAX_GRID_YZ} blocks",
            p.n_heads
        )));
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.attention_merge(),
            (p.n_rows, heads, 1),
            SL_MERGE_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_masked_softmax`. Grid `n_rows`, `SL_SOFTMAX_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `stride >= n_cols`; in rule mode (`row_tags` set)
/// `col_tags` holds `n_cols` tags; in prefix mode every `prefix_len[r]` is at most `n_cols`.
pub unsafe fn masked_softmax(
    kernels: &Kernels,
    p: &SlMaskedSoftmaxParams,
    stream: sys::CUstream,
) -> Result<()> {
    if p.n_rows == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.masked_softmax(),
            (p.n_rows, 1, 1),
            SL_SOFTMAX_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_sample`: the fused sampler pass. Grid `n`, `SL_SAMPLE_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `logits` holds `n` (or `2n` with `cfg`) rows of `stride
/// >= vocab`; `banned`, when set, holds `vocab` bytes; `error_flag` points at one u32.
pub unsafe fn sample(kernels: &Kernels, p: &SlSampleParams, stream: sys::CUstream) -> Result<()> {
    if p.n == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.sample(),
            (p.n, 1, 1),
            SL_SAMPLE_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_embed` (optionally fused with the first RMSNorm). Grid `n_rows`, `SL_ROW_THREADS`
/// threads.
///
/// # Safety
/// The module's common contract, and: `table` holds `table_rows` rows of `d`, `reg` holds `d`;
/// `error_flag` points at one u32. Ids need not be valid (a bad id sets
/// the flag).
pub unsafe fn embed(kernels: &Kernels, p: &SlEmbedParams, stream: sys::CUstream) -> Result<()> {
    if p.n_rows == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.embed(),
            (p.n_rows, 1, 1),
            SL_ROW_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_rmsnorm` (optionally fused with the residual add). Grid `n_rows`, `SL_ROW_THREADS`
/// threads.
///
/// # Safety
/// The module's common contract, and: `x`, `add` (when set) and `out` hold `n_rows` rows of
/// `d` and `w` holds `d`.
pub unsafe fn rmsnorm(kernels: &Kernels, p: &SlRmsNormParams, stream: sys::CUstream) -> Result<()> {
    if p.n_rows == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.rmsnorm(),
            (p.n_rows, 1, 1),
            SL_ROW_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_rope_kv`: RoPE on `q` in place and on `k`, then `k` / `v` rows stored at their pool
/// slots. Grid `n_rows`, `SL_ROW_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `head_dim` is even; the strides cover their heads
/// (`q_stride >= n_heads·head_dim`, `kv_stride` and `pool_stride >= n_kv_heads·head_dim`);
/// every `slots[i]` is a row of both pools, and the slots of the launch are
/// distinct (two rows storing to one slot race).
pub unsafe fn rope_kv(kernels: &Kernels, p: &SlRopeKvParams, stream: sys::CUstream) -> Result<()> {
    if p.n_rows == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.rope_kv(),
            (p.n_rows, 1, 1),
            SL_ROW_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_swiglu`, grid-stride over `n_rows·width` elements, `SL_ELEM_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `gate` / `up` hold `n_rows` rows of their strides (each
/// `>= width`), `out` holds `n_rows·width`.
pub unsafe fn swiglu(kernels: &Kernels, p: &SlSwigluParams, stream: sys::CUstream) -> Result<()> {
    let total = u64::from(p.n_rows) * u64::from(p.width);
    if total == 0 {
        return Ok(());
    }
    let blocks = total
        .div_ceil(u64::from(SL_ELEM_THREADS))
        .min(u64::from(ELEM_MAX_BLOCKS)) as u32;
    // SAFETY: the caller's contract; the kernel loops over all elements whatever the grid size.
    unsafe {
        launch(
            kernels,
            kernels.swiglu(),
            (blocks, 1, 1),
            SL_ELEM_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_aggregate_sparse`: builds sparse step `k`'s rows and keys on the device. Grid `n_seqs`,
/// `SL_AGG_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: the decode arrays are consistent (every
/// `decoded_order[0..group_indptr[k]]` entry is a distinct response index below `n_response`
/// whose `decoded_step` is its group; every other index has `decoded_step >= k`; `query` lists
/// distinct undecoded indices); `rows_per_seq` / `keys_per_seq` are the values params.h
/// defines and the outputs hold `n_seqs` times that many entries (`logits_rows`: `n_seqs ·
/// n_query`); `prompt_len + n_response + n_query + n_registers <= slots_per_seq`.
pub unsafe fn aggregate_sparse(
    kernels: &Kernels,
    p: &SlAggregateParams,
    stream: sys::CUstream,
) -> Result<()> {
    if p.n_seqs == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.aggregate_sparse(),
            (p.n_seqs, 1, 1),
            SL_AGG_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_init_uniform`: `out[i] = bf16(offset + scale·u_i)` for `i < n` (params.h), grid-stride
/// over groups of 4 elements, `SL_ELEM_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `out` holds `n` elements.
pub unsafe fn init_uniform(
    kernels: &Kernels,
    p: &SlInitParams,
    stream: sys::CUstream,
) -> Result<()> {
    let groups = p.n.div_ceil(4);
    if groups == 0 {
        return Ok(());
    }
    let blocks = groups
        .div_ceil(u64::from(SL_ELEM_THREADS))
        .min(u64::from(ELEM_MAX_BLOCKS)) as u32;
    // SAFETY: the caller's contract; the kernel loops over all groups whatever the grid size.
    unsafe {
        launch(
            kernels,
            kernels.init_uniform(),
            (blocks, 1, 1),
            SL_ELEM_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_resolve_plan`: the step's lists into `list_q` / `list_m` / `list_d`, then the patches
/// applied to the plan arrays (params.h). Grid 1, `SL_PROGRAM_THREADS` threads. Queued even
/// when `n` and `n_patches` are 0 (it then writes nothing), so a captured program has the same
/// launches whatever the sizes.
///
/// # Safety
/// The module's common contract, and: `n < 2^31`; `tokens`, `order`, `decoded_step` and the
/// three lists hold `n` entries; `patches` holds `n_patches`; every non-null target holds its
/// length (`n_rows` / `n_keys` / `n_logits` / `n_samples`); no two patches name the same (field, index); the
/// targets alias neither each other, the state nor the lists. When `kv_summary` is set:
/// `kv_tags` is set, `kv_indptr` holds `n_seqs + 1` valid CSR offsets ending at most at
/// `n_keys` (and at most at kv_tags' length), and `kv_summary` holds `SL_ATTN_SUMMARY_WORDS`
/// words per key tile of those sequences.
pub unsafe fn resolve_plan(
    kernels: &Kernels,
    p: &SlResolveParams,
    stream: sys::CUstream,
) -> Result<()> {
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.resolve_plan(),
            (1, 1, 1),
            SL_PROGRAM_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_commit`: records a step's choices in the decode state (params.h). Grid 1,
/// `SL_PROGRAM_THREADS` threads; queued even when nothing is committed (see
/// [`resolve_plan`]).
///
/// # Safety
/// The module's common contract, and: `n < 2^31`; `query`, `token` and `confidence` hold
/// `n_query` entries, `tokens`, `order` and `decoded_step` hold `n`; `rank_base + n_commit
/// <= n`; the query entries below `n` are distinct; the outputs alias none of the inputs.
pub unsafe fn commit(kernels: &Kernels, p: &SlCommitParams, stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract; geometry from params.h.
    unsafe {
        launch(
            kernels,
            kernels.commit(),
            (1, 1, 1),
            SL_PROGRAM_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_gather_rows`: `out[j, :] = x[rows[j], :]` (NaN rows for out-of-range `rows[j]`). Grid
/// `min(n, 65535)` (the kernel loops over the rows), `SL_GATHER_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `x` holds `x_rows · cols` values, `rows` holds `n`
/// entries and `out` holds `n · cols` values.
pub unsafe fn gather_rows(
    kernels: &Kernels,
    p: &SlGatherParams,
    stream: sys::CUstream,
) -> Result<()> {
    if p.n == 0 || p.cols == 0 {
        return Ok(());
    }
    let blocks = p.n.min(ELEM_MAX_BLOCKS);
    // SAFETY: the caller's contract; the kernel loops over all rows whatever the grid size.
    unsafe {
        launch(
            kernels,
            kernels.gather_rows(),
            (blocks, 1, 1),
            SL_GATHER_THREADS,
            0,
            stream,
            p,
        )
    }
}

/// `sl_fill_u32`: `buf[i] = value` for `i < n`, grid-stride, `SL_ELEM_THREADS` threads.
///
/// # Safety
/// The module's common contract, and: `buf` holds `n` values.
pub unsafe fn fill_u32(kernels: &Kernels, p: &SlFillParams, stream: sys::CUstream) -> Result<()> {
    if p.n == 0 {
        return Ok(());
    }
    let blocks =
        p.n.div_ceil(u64::from(SL_ELEM_THREADS))
            .min(u64::from(ELEM_MAX_BLOCKS)) as u32;
    // SAFETY: the caller's contract; the kernel loops over all elements whatever the grid size.
    unsafe {
        launch(
            kernels,
            kernels.fill_u32(),
            (blocks, 1, 1),
            SL_ELEM_THREADS,
            0,
            stream,
            p,
        )
    }
}

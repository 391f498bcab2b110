//! The safe layer: one function per kernel on owned device buffers ([`CudaSlice`] of
//! [`bf16`], `f32`, `u32`), queued on the [`CudaDevice`]'s stream.
//!
//! Every function checks, before anything is queued, everything the kernel relies on: buffer
//! lengths against the shape (buffers may be longer than needed, so a backend can reuse them),
//! row strides (at least the row width; for attention also a multiple of 8 elements, so every
//! row starts 16-byte aligned for its `cp.async` loads — the support kernels pick 16-byte or
//! scalar accesses themselves at launch), index ranges, and that every buffer belongs to the
//! device's context. A violation is [`Error::Input`] naming the op, the argument and the
//! sizes; nothing is launched then. Index arrays whose values matter for memory safety (pool
//! slots, prefix lengths) are passed as an [`IndexBuf`], which records their maximum and
//! distinctness when it is uploaded; the attention and aggregation inputs are validated on the
//! host when their plan is built ([`AttnPlan`], [`aggregate`]).
//!
//! Attention follows FlashInfer's plan/run split: [`AttnPlan::new`] (the *plan*, on the host,
//! outside any capture) validates the ragged layout, cuts it into query tiles, summarises its key
//! tiles, picks the split count, uploads the index arrays and allocates the split workspace,
//! once per step;
//! [`attention`] (the *run*) then only checks the per-layer buffers and launches: it allocates
//! nothing, never synchronizes, and can be captured into a CUDA graph and replayed. The sampler
//! splits the same way: [`BannedMask::new`] is its plan, [`sample_to_device`] its run
//! ([`sample`] is the convenience that allocates and waits).
//!
//! Every op takes a [`CudaDevice`]: the crate's own ([`CudaDevice::new`]) or one on an engine's
//! stream ([`CudaDevice::with_stream`]); the buffers may be any `CudaSlice` of that context, the
//! engine's own included, used in place.

use std::ptr::{null, null_mut};

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};
use half::bf16;

use crate::contract::abi::{
    SL_ATTN_BLOCK_N, SlAggregateParams, SlAttnParams, SlCommitParams, SlEmbedParams, SlFillParams,
    SlGatherParams, SlInitParams, SlMaskedSoftmaxParams, SlPatch, SlResolveParams, SlRmsNormParams,
    SlRopeKvParams, SlSampleParams, SlSwigluParams,
};
use crate::contract::attn::{
    AttnVersion, MAX_SPLIT_WORKERS, SUMMARY_WORDS, TileSummary, key_tile_summaries,
};
use crate::contract::program::field_name;
use crate::contract::{AttnShape, REGISTER, SampleParams, Sampled, Tag};
use crate::cuda::device::CudaDevice;
use crate::cuda::raw;
use crate::error::{Error, Result};

/// The host-side formats the ops take, defined by the kernel contract ([`crate::contract`]).
pub use crate::contract::aggregate::{AggregateCounts, AggregateInputs, DecodeArrays};
pub use crate::contract::attn::{AttnLayout, choose_splits, query_tiles};
pub use crate::contract::program::{
    CommitRule, DeviceState, Field, Lists, MAX_PROGRAM_LEN, Patch, PatchLens, UNDECODED,
    check_patches,
};

/// bf16 elements per 16-byte vector: attention row strides must be a multiple of this.
pub const VEC: usize = 8;

/// The largest split count [`AttnPlan::new`] accepts when forced (the heuristic stays at or
/// below [`AttnTiling::MAX_SPLITS`](crate::contract::AttnTiling::MAX_SPLITS)).
pub const MAX_FORCED_SPLITS: usize = 256;

fn bad<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("{op}: {msg}")))
}

/// Checks that a buffer of `len` values holds a `[rows, width]` matrix with row stride `stride`
/// (`stride >= width`, a multiple of `align`, `(rows − 1) · stride + width <= len`).
fn check_matrix(
    op: &str,
    name: &str,
    len: usize,
    (rows, width, stride): (usize, usize, usize),
    align: usize,
) -> Result<()> {
    if stride < width {
        return bad(
            op,
            format_args!("{name} row stride {stride} is below its row width {width}"),
        );
    }
    if stride % align != 0 {
        return bad(
            op,
            format_args!(
                "{name} row stride {stride} is not a multiple of {align} (rows must be 16-byte \
                 aligned)"
            ),
        );
    }
    // The last row needs only its width: a matrix may be a view ending at its last element.
    let need = match rows.checked_sub(1) {
        None => 0,
        Some(r) => match r.checked_mul(stride).and_then(|v| v.checked_add(width)) {
            Some(need) => need,
            None => return bad(op, format_args!("{name} shape {rows} × {stride} overflows")),
        },
    };
    if need > len {
        return bad(
            op,
            format_args!(
                "{name} holds {len} values, needs {need} ({rows} rows of {width} at stride \
                 {stride})"
            ),
        );
    }
    Ok(())
}

/// Rows of `width` at `stride` that fit in `len` values (`stride >= width >= 1`).
fn rows_in(len: usize, width: usize, stride: usize) -> usize {
    if len < width {
        0
    } else {
        (len - width) / stride.max(1) + 1
    }
}

/// `v` as a u32 kernel argument, or an error naming it.
fn to_u32(op: &str, name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).or_else(|_| bad(op, format_args!("{name} = {v} does not fit in u32")))
}

/// Element types of device buffers and the type a params struct's pointer has for them.
pub trait DeviceElem {
    /// The params.h element type (`sl_bf16` is `u16` on the host).
    type C;
}
impl DeviceElem for bf16 {
    type C = u16;
}
impl DeviceElem for f32 {
    type C = f32;
}
impl DeviceElem for u32 {
    type C = u32;
}
impl DeviceElem for u8 {
    type C = u8;
}

/// Collects the device pointers of one launch: checks each buffer's context and keeps the
/// cudarc read/write records alive until the launch is queued (dropping them after the launch
/// orders later work on other streams after this kernel).
struct Bufs<'a> {
    op: &'static str,
    stream: &'a CudaStream,
    ctx: &'a CudaContext,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Bufs<'a> {
    fn new(dev: &'a CudaDevice, op: &'static str) -> Self {
        Bufs {
            op,
            stream: dev.stream(),
            ctx: dev.context(),
            guards: Vec::new(),
        }
    }

    fn check_ctx<T>(&self, name: &str, buf: &impl DeviceSlice<T>) -> Result<()> {
        if **buf.stream().context() != *self.ctx {
            return bad(
                self.op,
                format_args!("{name} was allocated in another CUDA context"),
            );
        }
        Ok(())
    }

    /// A buffer the kernel only reads.
    fn read<T: DeviceElem>(
        &mut self,
        name: &str,
        buf: &'a impl DevicePtr<T>,
    ) -> Result<*const T::C> {
        self.check_ctx(name, buf)?;
        let (ptr, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        Ok(ptr as usize as *const T::C)
    }

    /// A buffer the kernel writes (or reads and writes).
    fn write<T: DeviceElem>(&mut self, name: &str, buf: &'a mut CudaSlice<T>) -> Result<*mut T::C> {
        self.check_ctx(name, buf)?;
        let (ptr, guard) = buf.device_ptr_mut(self.stream);
        self.guards.push(guard);
        Ok(ptr as usize as *mut T::C)
    }
}

/// Uploads `host`, or one zero when it is empty (a zero-byte allocation is not portable); the
/// logical length is kept by the caller.
pub(crate) fn upload_padded<T: cudarc::driver::DeviceRepr + Copy + Default>(
    dev: &CudaDevice,
    host: &[T],
) -> Result<CudaSlice<T>> {
    if host.is_empty() {
        dev.upload(&[T::default()])
    } else {
        dev.upload(host)
    }
}

/// A zeroed buffer of `len` values (at least one).
fn zeros_padded<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros(len.max(1))
}

// ------------------------------------------------------------------------------------------
// Index buffers
// ------------------------------------------------------------------------------------------

/// A u32 index array on the device together with facts about its values recorded when it was
/// uploaded (its maximum, whether the values are distinct), so ops can bounds-check indices
/// without reading the device. The buffer cannot be written through this type, so the facts
/// stay true.
#[derive(Debug)]
pub struct IndexBuf {
    buf: CudaSlice<u32>,
    len: usize,
    max: Option<u32>,
    distinct: bool,
}

impl IndexBuf {
    /// Uploads `host` and records its facts.
    pub fn upload(dev: &CudaDevice, host: &[u32]) -> Result<IndexBuf> {
        let mut sorted = host.to_vec();
        sorted.sort_unstable();
        let distinct = sorted.windows(2).all(|w| w[0] != w[1]);
        Ok(IndexBuf {
            buf: upload_padded(dev, host)?,
            len: host.len(),
            max: sorted.last().copied(),
            distinct,
        })
    }

    /// Uploads `host` with a declared bound: the recorded maximum is `max_bound` (not the host
    /// maximum), so the buffer may later be overwritten on the device (by the patches of a
    /// device-resolved plan, [`resolve_plan`]) with any values up to it. Distinctness is computed from
    /// `host`. Errors: a value of `host` above `max_bound`.
    pub fn with_bound(dev: &CudaDevice, host: &[u32], max_bound: u32) -> Result<IndexBuf> {
        if let Some((i, &v)) = host.iter().enumerate().find(|&(_, &v)| v > max_bound) {
            return bad(
                "index buffer",
                format_args!("value [{i}] = {v} is above the declared bound {max_bound}"),
            );
        }
        let mut buf = IndexBuf::upload(dev, host)?;
        buf.max = Some(max_bound);
        Ok(buf)
    }

    /// The device buffer, writable, for the patches of a device-resolved plan
    /// ([`resolve_plan`]). The caller keeps the declared facts: every value it lets the device
    /// write stays at or below [`IndexBuf::max`], and stays distinct when [`IndexBuf::distinct`]
    /// says so (ops rely on both for memory safety).
    pub(crate) fn patch_target(&mut self) -> &mut CudaSlice<u32> {
        &mut self.buf
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no indices.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest index (`None` when empty).
    pub fn max(&self) -> Option<u32> {
        self.max
    }

    /// Whether no value occurs twice.
    pub fn distinct(&self) -> bool {
        self.distinct
    }

    /// The device buffer (at least one element long even when empty).
    pub fn device(&self) -> &CudaSlice<u32> {
        &self.buf
    }
}

// ------------------------------------------------------------------------------------------
// Attention
// ------------------------------------------------------------------------------------------

/// An attention call planned and uploaded: the ragged layout, its query tiles, its key tiles
/// and their summaries, the split count and the split workspace, for one kernel version. Build
/// once per step and branch; run once per layer with [`attention`].
#[derive(Debug)]
pub struct AttnPlan {
    version: AttnVersion,
    shape: AttnShape,
    n_rows: usize,
    n_seqs: usize,
    n_keys: usize,
    n_slots: usize,
    n_splits: usize,
    host_qtile_seq: Vec<u32>,
    host_qtile_row0: Vec<u32>,
    host_ktile_indptr: Vec<u32>,
    row_tags: CudaSlice<u32>,
    seq_indptr: CudaSlice<u32>,
    kv_indptr: CudaSlice<u32>,
    kv_indices: CudaSlice<u32>,
    kv_tags: CudaSlice<u32>,
    qtile_seq: CudaSlice<u32>,
    qtile_row0: CudaSlice<u32>,
    ktile_indptr: CudaSlice<u32>,
    /// `[n_ktiles, SUMMARY_WORDS]` key-tile summaries (rebuilt on the device when a
    /// device-resident step patches the key tags, [`resolve_plan`]).
    kv_summary: CudaSlice<u32>,
    /// `(partial_o, partial_lse)` when `n_splits > 1`.
    workspace: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// Where [`resolve_plan`] rebuilds an attention plan's key-tile summaries after patching its key
/// tags (the CUDA backend builds it from its attention plan).
#[derive(Debug)]
pub struct SummaryTarget<'a> {
    /// The plan's `n_seqs + 1` key offsets.
    pub kv_indptr: &'a CudaSlice<u32>,
    /// Sequences.
    pub n_seqs: usize,
    /// Keys (`kv_indptr[n_seqs]`): the key-tag target must hold this many.
    pub n_keys: usize,
    /// Key tiles of the sequences (the summaries' count).
    pub n_ktiles: usize,
    /// The summaries, `[n_ktiles, SUMMARY_WORDS]`.
    pub summary: &'a mut CudaSlice<u32>,
}

/// The concurrent CTAs the split rule fills for attention `version` at `head_dim` on `dev`: the
/// kernel's CTAs per SM times the SMs (the SM count alone for v1, as it had), at most
/// [`MAX_SPLIT_WORKERS`], which bounds every plan's split workspace on any card
/// (`memory::add_batch`'s split workspaces).
pub fn attention_workers(dev: &CudaDevice, version: AttnVersion, head_dim: usize) -> usize {
    let sms = dev.info().sm_count as usize;
    let ctas = match version {
        AttnVersion::V1 => 1,
        AttnVersion::V2 => dev
            .kernels()
            .attention_ctas_per_sm(version, head_dim as u32) as usize,
    };
    (ctas * sms).clamp(1, MAX_SPLIT_WORKERS)
}

impl AttnPlan {
    /// [`AttnPlan::with_version`] for the version the environment asks for
    /// ([`AttnVersion::from_env`]: `SL_ATTN=v1` selects the previous kernel; v2 otherwise).
    pub fn new(dev: &CudaDevice, layout: &AttnLayout, n_splits: Option<usize>) -> Result<Self> {
        Self::with_version(dev, layout, n_splits, AttnVersion::from_env()?)
    }

    /// Validates `layout`, builds the query tiles of `version` and the key-tile summaries,
    /// picks the split count ([`choose_splits`] on the kernel's concurrent CTAs — its CTAs per SM
    /// times the SMs; the SM count alone for v1, as it had — or `n_splits` when given:
    /// 1..=[`MAX_FORCED_SPLITS`]) and uploads everything.
    pub fn with_version(
        dev: &CudaDevice,
        layout: &AttnLayout,
        n_splits: Option<usize>,
        version: AttnVersion,
    ) -> Result<Self> {
        let op = "attention plan";
        layout.validate()?;
        let (qtile_seq, qtile_row0) = query_tiles(layout.seq_indptr, version.block_m());
        let (ktile_indptr, summaries) =
            key_tile_summaries(layout.kv_indptr, layout.kv_tags, SL_ATTN_BLOCK_N as usize);
        to_u32(op, "key tiles", summaries.len())?;
        let max_keys = layout
            .kv_indptr
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        let n_heads = layout.shape.n_heads;
        let n_splits = match n_splits {
            Some(n) if n == 0 || n > MAX_FORCED_SPLITS => {
                return bad(
                    op,
                    format_args!("n_splits {n} outside 1..={MAX_FORCED_SPLITS}"),
                );
            }
            Some(n) => n,
            None => {
                let workers = attention_workers(dev, version, layout.shape.head_dim);
                choose_splits(qtile_seq.len(), n_heads, max_keys, workers)
            }
        };
        let rows = layout.rows();
        let workspace = if n_splits > 1 {
            let lse_len = n_splits
                .checked_mul(rows)
                .and_then(|v| v.checked_mul(n_heads));
            let o_len = lse_len.and_then(|v| v.checked_mul(layout.shape.head_dim));
            let (Some(lse_len), Some(o_len)) = (lse_len, o_len) else {
                return bad(op, "split workspace size overflows");
            };
            Some((zeros_padded(dev, o_len)?, zeros_padded(dev, lse_len)?))
        } else {
            None
        };
        let tags = |t: &[Tag]| t.iter().map(|t| t.0).collect::<Vec<u32>>();
        let words: Vec<u32> = summaries.iter().flat_map(|s| s.0).collect();
        Ok(AttnPlan {
            version,
            shape: layout.shape,
            n_rows: rows,
            n_seqs: layout.seq_indptr.len() - 1,
            n_keys: layout.kv_indices.len(),
            n_slots: layout.n_slots,
            n_splits,
            row_tags: upload_padded(dev, &tags(layout.row_tags))?,
            seq_indptr: dev.upload(layout.seq_indptr)?,
            kv_indptr: dev.upload(layout.kv_indptr)?,
            kv_indices: upload_padded(dev, layout.kv_indices)?,
            kv_tags: upload_padded(dev, &tags(layout.kv_tags))?,
            qtile_seq: upload_padded(dev, &qtile_seq)?,
            qtile_row0: upload_padded(dev, &qtile_row0)?,
            ktile_indptr: dev.upload(&ktile_indptr)?,
            kv_summary: upload_padded(dev, &words)?,
            host_qtile_seq: qtile_seq,
            host_qtile_row0: qtile_row0,
            host_ktile_indptr: ktile_indptr,
            workspace,
        })
    }

    /// The kernel version the plan was built for.
    pub fn version(&self) -> AttnVersion {
        self.version
    }

    /// Head geometry.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// Query rows.
    pub fn rows(&self) -> usize {
        self.n_rows
    }

    /// The split count chosen (or forced).
    pub fn n_splits(&self) -> usize {
        self.n_splits
    }

    /// Sequence of each query tile.
    pub fn qtile_seq(&self) -> &[u32] {
        &self.host_qtile_seq
    }

    /// First row of each query tile.
    pub fn qtile_row0(&self) -> &[u32] {
        &self.host_qtile_row0
    }

    /// The key tiles of each sequence (`ktile_indptr`, `n_seqs + 1` offsets).
    pub fn ktile_indptr(&self) -> &[u32] {
        &self.host_ktile_indptr
    }

    /// The key-tile summaries as the kernel reads them (`[n_ktiles, SUMMARY_WORDS]`; a device
    /// read, for tests).
    pub fn download_summaries(&self, dev: &CudaDevice) -> Result<Vec<TileSummary>> {
        let n = *self.host_ktile_indptr.last().unwrap_or(&0) as usize;
        let words = dev.download(&self.kv_summary)?;
        Ok(words
            .chunks_exact(SUMMARY_WORDS)
            .take(n)
            .map(|c| TileSummary(c.try_into().expect("chunks of SUMMARY_WORDS")))
            .collect())
    }

    /// `(kv_indices, kv_tags, the summaries' target)`, writable, for the patches of a
    /// device-resolved plan ([`resolve_plan`], which rebuilds the summaries after patching the
    /// tags). The caller keeps what [`AttnPlan::new`] validated: every key's slot stays below
    /// the plan's pool rows (the attention kernel gathers through them unchecked).
    pub(crate) fn patch_targets(
        &mut self,
    ) -> (&mut CudaSlice<u32>, &mut CudaSlice<u32>, SummaryTarget<'_>) {
        let n_ktiles = *self.host_ktile_indptr.last().unwrap_or(&0) as usize;
        (
            &mut self.kv_indices,
            &mut self.kv_tags,
            SummaryTarget {
                kv_indptr: &self.kv_indptr,
                n_seqs: self.n_seqs,
                n_keys: self.n_keys,
                n_ktiles,
                summary: &mut self.kv_summary,
            },
        )
    }
}

/// Per-layer inputs of [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs<'a> {
    /// Queries `[rows, q_stride]`, head `h` at columns `h·head_dim..`.
    pub q: &'a CudaSlice<bf16>,
    /// Row stride of `q` (≥ n_heads·head_dim, a multiple of 8).
    pub q_stride: usize,
    /// Keys `[slots, kv_stride]`, K/V head `g` at columns `g·head_dim..`.
    pub k_pool: &'a CudaSlice<bf16>,
    /// Values, same layout as `k_pool`.
    pub v_pool: &'a CudaSlice<bf16>,
    /// Row stride of the pools (≥ n_kv_heads·head_dim, a multiple of 8).
    pub kv_stride: usize,
    /// Cross-branch layer.
    pub joint: bool,
}

/// Outputs of [`attention`].
#[derive(Debug)]
pub struct AttnOut<'a> {
    /// `[rows, o_stride]`; row `r`, head `h` at columns `h·head_dim..`; other columns untouched.
    pub o: &'a mut CudaSlice<bf16>,
    /// Row stride of `o` (≥ n_heads·head_dim, a multiple of 8).
    pub o_stride: usize,
    /// `[rows, n_heads]` natural-log LSE (−inf for a row that sees no key), when wanted.
    pub lse: Option<&'a mut CudaSlice<f32>>,
}

/// Gathered-token attention of the planned rows over their sequences' keys (SPEC §5), merging
/// splits when the plan has more than one. Rows that see no key get zeros and lse −inf.
pub fn attention(
    dev: &CudaDevice,
    plan: &mut AttnPlan,
    args: &AttnArgs,
    out: AttnOut,
) -> Result<()> {
    let op = "attention";
    let s = plan.shape;
    let (rows, q_dim, kv_dim) = (plan.n_rows, s.q_dim(), s.kv_dim());
    check_matrix(op, "q", args.q.len(), (rows, q_dim, args.q_stride), VEC)?;
    check_matrix(op, "o", out.o.len(), (rows, q_dim, out.o_stride), VEC)?;
    if args.k_pool.len() != args.v_pool.len() {
        return bad(
            op,
            format_args!(
                "k_pool holds {} values but v_pool {}",
                args.k_pool.len(),
                args.v_pool.len()
            ),
        );
    }
    check_matrix(
        op,
        "k_pool",
        args.k_pool.len(),
        (plan.n_slots, kv_dim, args.kv_stride),
        VEC,
    )?;
    let pool_rows = rows_in(args.k_pool.len(), kv_dim, args.kv_stride);
    if let Some(lse) = &out.lse {
        check_matrix(op, "lse", lse.len(), (rows, s.n_heads, s.n_heads), 1)?;
    }
    let mut b = Bufs::new(dev, op);
    let (partial_o, partial_lse) = match &mut plan.workspace {
        Some((o, l)) => (b.write("partial_o", o)?, b.write("partial_lse", l)?),
        None => (null_mut(), null_mut()),
    };
    let p = SlAttnParams {
        q: b.read("q", args.q)?,
        k_pool: b.read("k_pool", args.k_pool)?,
        v_pool: b.read("v_pool", args.v_pool)?,
        o: b.write("o", out.o)?,
        lse: match out.lse {
            Some(l) => b.write("lse", l)?,
            None => null_mut(),
        },
        partial_o,
        partial_lse,
        row_tags: b.read("row_tags", &plan.row_tags)?,
        qtile_seq: b.read("qtile_seq", &plan.qtile_seq)?,
        qtile_row0: b.read("qtile_row0", &plan.qtile_row0)?,
        seq_indptr: b.read("seq_indptr", &plan.seq_indptr)?,
        kv_indptr: b.read("kv_indptr", &plan.kv_indptr)?,
        kv_indices: b.read("kv_indices", &plan.kv_indices)?,
        kv_tags: b.read("kv_tags", &plan.kv_tags)?,
        ktile_indptr: b.read("ktile_indptr", &plan.ktile_indptr)?,
        kv_summary: b.read("kv_summary", &plan.kv_summary)?,
        n_rows: to_u32(op, "rows", rows)?,
        n_qtiles: to_u32(op, "query tiles", plan.host_qtile_seq.len())?,
        n_seqs: to_u32(op, "sequences", plan.n_seqs)?,
        n_slots: to_u32(op, "pool rows", pool_rows)?,
        q_stride: to_u32(op, "q_stride", args.q_stride)?,
        kv_stride: to_u32(op, "kv_stride", args.kv_stride)?,
        o_stride: to_u32(op, "o_stride", out.o_stride)?,
        n_heads: to_u32(op, "n_heads", s.n_heads)?,
        n_kv_heads: to_u32(op, "n_kv_heads", s.n_kv_heads)?,
        head_dim: to_u32(op, "head_dim", s.head_dim)?,
        n_splits: to_u32(op, "n_splits", plan.n_splits)?,
        joint: args.joint as u32,
        scale_log2: std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt(),
        _pad: 0,
    };
    // The kernels move q, K/V and o in 16-byte pieces (`cp.async`, vector stores): a slice made
    // at an offset (an engine's tensor view through cudarc's `upgrade_device_ptr`) is refused
    // here rather than faulting the context with a misaligned address.
    let pointers = [
        ("q", p.q as usize),
        ("k_pool", p.k_pool as usize),
        ("v_pool", p.v_pool as usize),
        ("o", p.o as usize),
    ];
    if let Some((what, at)) = pointers.into_iter().find(|&(_, at)| at % 16 != 0) {
        return bad(
            op,
            format_args!("{what} starts at {at:#x}, not on 16 bytes as the kernel's copies need"),
        );
    }
    // SAFETY: the plan validated the CSR layout, the tiles (built by `query_tiles`) and every
    // key's slot against `n_slots`; the checks above ensure q / o / lse hold `rows` rows of their
    // strides, the pools at least `n_slots` rows, strides are 8-aligned and cover the heads, the
    // workspace was sized for this plan's splits; every pointer comes from a live buffer of this
    // context borrowed for the launch (`b` holds the borrows), and the outputs are borrowed
    // mutably, so they alias no input. The plan built the key tiles and summaries from the same
    // layout (or resolve_plan rebuilt them after patching the tags); the caller's buffers start
    // on 16 bytes (checked above) and the plan's own are whole allocations (256-byte aligned),
    // as both versions' alignment rules need.
    unsafe { raw::attention_version(dev.kernels(), plan.version, &p, dev.stream().cu_stream()) }
}

// ------------------------------------------------------------------------------------------
// Mask-aware softmax and the sampler
// ------------------------------------------------------------------------------------------

/// The visibility rule of [`masked_softmax`], on device buffers.
#[derive(Debug, Clone, Copy)]
pub enum DeviceMask<'a> {
    /// SPEC §3 on tags: `row_tags` (≥ n_rows) and `col_tags` (≥ n_cols), `joint` layer or not.
    Rule {
        /// Tag of each row.
        row_tags: &'a CudaSlice<u32>,
        /// Tag of each column.
        col_tags: &'a CudaSlice<u32>,
        /// Cross-branch layer.
        joint: bool,
    },
    /// Per row, the number of leading visible columns (each ≤ n_cols).
    Prefix(&'a IndexBuf),
}

/// Shape of a score matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreShape {
    /// Rows.
    pub n_rows: usize,
    /// Columns.
    pub n_cols: usize,
    /// Row stride of both `scores` and `probs` (≥ n_cols).
    pub stride: usize,
}

/// Row softmax of `scale · scores` over the visible columns (SPEC §5 mask-aware softmax (a));
/// hidden columns and fully hidden rows get zeros.
pub fn masked_softmax(
    dev: &CudaDevice,
    scores: &CudaSlice<f32>,
    shape: ScoreShape,
    mask: DeviceMask,
    scale: f32,
    probs: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "masked_softmax";
    let ScoreShape {
        n_rows,
        n_cols,
        stride,
    } = shape;
    check_matrix(op, "scores", scores.len(), (n_rows, n_cols, stride), 1)?;
    check_matrix(op, "probs", probs.len(), (n_rows, n_cols, stride), 1)?;
    if !scale.is_finite() {
        return bad(op, format_args!("scale ({scale}) is not finite"));
    }
    let mut b = Bufs::new(dev, op);
    let (row_tags, col_tags, prefix_len, joint) = match mask {
        DeviceMask::Rule {
            row_tags,
            col_tags,
            joint,
        } => {
            if row_tags.len() < n_rows || col_tags.len() < n_cols {
                return bad(
                    op,
                    format_args!(
                        "{} row tags and {} column tags for a {n_rows} × {n_cols} matrix",
                        row_tags.len(),
                        col_tags.len()
                    ),
                );
            }
            let r = b.read("row_tags", row_tags)?;
            let c = b.read("col_tags", col_tags)?;
            (r, c, null(), joint)
        }
        DeviceMask::Prefix(prefix) => {
            if prefix.len() < n_rows {
                return bad(
                    op,
                    format_args!("{} prefix lengths for {n_rows} rows", prefix.len()),
                );
            }
            if let Some(m) = prefix.max().filter(|&m| m as usize > n_cols) {
                return bad(
                    op,
                    format_args!("a prefix length ({m}) exceeds the {n_cols} columns"),
                );
            }
            (
                null(),
                null(),
                b.read("prefix_len", prefix.device())?,
                false,
            )
        }
    };
    let p = SlMaskedSoftmaxParams {
        scores: b.read("scores", scores)?,
        probs: b.write("probs", probs)?,
        row_tags,
        col_tags,
        prefix_len,
        n_rows: to_u32(op, "n_rows", n_rows)?,
        n_cols: to_u32(op, "n_cols", n_cols)?,
        stride: to_u32(op, "stride", stride)?,
        joint: joint as u32,
        scale,
        _pad: 0,
    };
    // SAFETY: scores / probs hold n_rows rows of `stride >= n_cols`; the tags cover the rows and
    // columns, or every prefix length is at most n_cols (recorded at upload); all pointers are
    // live buffers of this context borrowed for the launch, `probs` mutably (no aliasing).
    unsafe { raw::masked_softmax(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// The shape rules of a sampler call (those of the CPU twin, `cpu::ops::sample_rows`, that do
/// not concern the banned ids) for `n` sampled rows; returns the number of logit rows read.
fn check_sample_shape(
    logits_len: usize,
    vocab: usize,
    stride: usize,
    n: usize,
    guidance: Option<f32>,
    temperature: f32,
) -> Result<usize> {
    let op = "sample";
    if vocab == 0 || vocab > u32::MAX as usize {
        return bad(
            op,
            format_args!("vocab ({vocab}) must be in 1..=u32::MAX (ids are u32)"),
        );
    }
    let rows = match guidance {
        Some(g) if !g.is_finite() => return bad(op, format_args!("guidance ({g}) is not finite")),
        Some(_) => n.saturating_mul(2),
        None => n,
    };
    check_matrix(op, "logits", logits_len, (rows, vocab, stride), 1)?;
    to_u32(op, "stride", stride)?;
    to_u32(op, "rows", rows)?;
    let tau = temperature;
    if !(tau.is_finite() && tau >= 0.0) {
        return bad(
            op,
            format_args!("temperature ({tau}) must be finite and >= 0"),
        );
    }
    Ok(rows)
}

/// The vocab-byte mask of `banned` (1 = banned), or an error when an id is outside the
/// vocabulary or every id is banned (no token could be sampled).
fn banned_bytes(vocab: usize, banned: &[u32]) -> Result<Vec<u8>> {
    let op = "sample";
    if let Some(&id) = banned.iter().find(|&&id| id as usize >= vocab) {
        return bad(
            op,
            format_args!("banned id {id} is out of range for vocab {vocab}"),
        );
    }
    let mut mask = vec![0u8; vocab];
    for &id in banned {
        mask[id as usize] = 1;
    }
    if mask.iter().all(|&b| b == 1) {
        return bad(
            op,
            format_args!("every id of the vocabulary ({vocab}) is banned"),
        );
    }
    Ok(mask)
}

/// Validates a sampler call (the rules of the CPU twin, `cpu::ops::sample_rows`); returns
/// the number of logit rows it reads and the banned-id mask (`None` when nothing is banned).
fn check_sample(
    logits_len: usize,
    vocab: usize,
    stride: usize,
    p: &SampleParams,
) -> Result<(usize, Option<Vec<u8>>)> {
    let rows = check_sample_shape(
        logits_len,
        vocab,
        stride,
        p.positions.len(),
        p.guidance,
        p.temperature,
    )?;
    let mask = if p.banned.is_empty() {
        None
    } else {
        Some(banned_bytes(vocab, &p.banned)?)
    };
    Ok((rows, mask))
}

/// The banned ids of a sampler call as the kernel reads them: one byte per id of a
/// vocabulary (1 = banned), with at least one id allowed. Build once per generation and pass
/// to [`sample_to_device`].
#[derive(Debug)]
pub struct BannedMask {
    buf: CudaSlice<u8>,
    vocab: usize,
}

impl BannedMask {
    /// Uploads the mask of `banned` over `vocab` ids. Errors: an id `>= vocab`, or every id
    /// banned.
    pub fn new(dev: &CudaDevice, vocab: usize, banned: &[u32]) -> Result<BannedMask> {
        if vocab == 0 {
            return bad("sample", "banned mask over an empty vocabulary");
        }
        let bytes = banned_bytes(vocab, banned)?;
        Ok(BannedMask {
            buf: dev.upload(&bytes)?,
            vocab,
        })
    }

    /// The vocabulary size the mask covers.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The device bytes (`vocab` of them).
    pub fn device(&self) -> &CudaSlice<u8> {
        &self.buf
    }
}

/// The per-call inputs of [`sample_to_device`] besides the logits: the rules of
/// [`SampleParams`] with the positions and bans on the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSampleArgs<'a> {
    /// Sequence position of each sampled row (Philox counter word 1), at least `n` entries.
    pub positions: &'a CudaSlice<u32>,
    /// Ids that never win, over the call's vocabulary.
    pub banned: Option<&'a BannedMask>,
    /// Rows sampled.
    pub n: usize,
    /// CFG scale (the logits hold `2n` rows), or `None`.
    pub guidance: Option<f32>,
    /// Gumbel temperature; 0 is plain argmax.
    pub temperature: f32,
    /// Philox key.
    pub seed: u64,
    /// Step index (Philox counter word 2).
    pub step: u32,
    /// Philox counter word 3 (0 for every request of this crate, SPEC §4.1).
    pub request: u32,
}

/// Where [`sample_to_device`] writes: `n` tokens, confidences and LSEs, and a sticky error flag
/// (one u32, ORed with 1 on a non-finite logit and never cleared by the kernel).
#[derive(Debug)]
pub struct SampleOut<'a> {
    /// Chosen ids, at least `n` entries.
    pub token: &'a mut CudaSlice<u32>,
    /// `softmax(logits/τ)[token]`, at least `n` entries.
    pub confidence: &'a mut CudaSlice<f32>,
    /// Natural log-sum-exp over the allowed ids, at least `n` entries.
    pub lse: &'a mut CudaSlice<f32>,
    /// Sticky error flag, at least one entry.
    pub error_flag: &'a mut CudaSlice<u32>,
}

/// Builds the kernel's params and queues `sl_sample`. The caller has validated the call
/// ([`check_sample_shape`], the lengths of [`sample_to_device`]).
fn launch_sample(
    dev: &CudaDevice,
    logits: &impl DevicePtr<f32>,
    vocab: usize,
    stride: usize,
    args: &DeviceSampleArgs,
    out: SampleOut,
) -> Result<()> {
    let op = "sample";
    let mut b = Bufs::new(dev, op);
    let params = SlSampleParams {
        logits: b.read("logits", logits)?,
        positions: b.read("positions", args.positions)?,
        banned: match args.banned {
            Some(m) => b.read("banned", &m.buf)?,
            None => null(),
        },
        out_token: b.write("out_token", out.token)?,
        out_confidence: b.write("out_confidence", out.confidence)?,
        out_lse: b.write("out_lse", out.lse)?,
        error_flag: b.write("error_flag", out.error_flag)?,
        n: to_u32(op, "n", args.n)?,
        vocab: to_u32(op, "vocab", vocab)?,
        stride: to_u32(op, "stride", stride)?,
        cfg: args.guidance.is_some() as u32,
        guidance: args.guidance.unwrap_or(0.0),
        temperature: args.temperature,
        seed_lo: args.seed as u32,
        seed_hi: (args.seed >> 32) as u32,
        step: args.step,
        request: args.request,
    };
    // SAFETY: the caller checked that logits hold n (2n with CFG) rows of `stride >= vocab`,
    // that the banned mask (a `BannedMask`) has vocab bytes, positions and the outputs n
    // entries and the flag one; all are live buffers of this context borrowed for the launch,
    // the outputs mutably (so they alias no input nor each other).
    unsafe { raw::sample(dev.kernels(), &params, dev.stream().cu_stream()) }
}

/// [`sample`] without the wait: the same kernel on device inputs, queued on the device's stream
/// (capturable in a CUDA graph). Outputs as [`sample`]'s; a non-finite logit sets
/// `out.error_flag` (sticky: read it once at the end of the generation) instead of returning
/// an error.
pub fn sample_to_device(
    dev: &CudaDevice,
    logits: &impl DevicePtr<f32>,
    vocab: usize,
    stride: usize,
    args: DeviceSampleArgs,
    out: SampleOut,
) -> Result<()> {
    let op = "sample";
    let n = args.n;
    check_sample_shape(
        logits.len(),
        vocab,
        stride,
        n,
        args.guidance,
        args.temperature,
    )?;
    if let Some(m) = args.banned
        && m.vocab != vocab
    {
        return bad(
            op,
            format_args!("the banned mask covers {} ids, the call {vocab}", m.vocab),
        );
    }
    for (name, len) in [
        ("positions", args.positions.len()),
        ("token", out.token.len()),
        ("confidence", out.confidence.len()),
        ("lse", out.lse.len()),
    ] {
        if len < n {
            return bad(op, format_args!("{name} holds {len} entries for {n} rows"));
        }
    }
    if out.error_flag.is_empty() {
        return bad(op, "error_flag is empty (it needs one entry)");
    }
    launch_sample(dev, logits, vocab, stride, &args, out)
}

/// The sampler pass (SPEC §4, mask-aware softmax (b)) over `logits` (`[n or 2n, stride]`,
/// `n = p.positions.len()`, the first `vocab` columns used): the same tokens, confidences and
/// LSEs as the CPU twin (`cpu::ops::sample_rows`). A non-finite logit (after the CFG combine
/// and temperature) is [`Error::Input`] naming "non-finite logit". Waits for the result.
pub fn sample(
    dev: &CudaDevice,
    logits: &impl DevicePtr<f32>,
    vocab: usize,
    stride: usize,
    p: &SampleParams,
) -> Result<Vec<Sampled>> {
    let op = "sample";
    let (_, mask) = check_sample(logits.len(), vocab, stride, p)?;
    let n = p.positions.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let banned = match mask {
        Some(bytes) => Some(BannedMask {
            buf: dev.upload(&bytes)?,
            vocab,
        }),
        None => None,
    };
    let positions = dev.upload(&p.positions)?;
    let mut token = zeros_padded::<u32>(dev, n)?;
    let mut confidence = zeros_padded::<f32>(dev, n)?;
    let mut lse = zeros_padded::<f32>(dev, n)?;
    let mut flag = zeros_padded::<u32>(dev, 1)?;
    let args = DeviceSampleArgs {
        positions: &positions,
        banned: banned.as_ref(),
        n,
        guidance: p.guidance,
        temperature: p.temperature,
        seed: p.seed,
        step: p.step,
        request: p.request,
    };
    let out = SampleOut {
        token: &mut token,
        confidence: &mut confidence,
        lse: &mut lse,
        error_flag: &mut flag,
    };
    launch_sample(dev, logits, vocab, stride, &args, out)?;
    if dev.download(&flag)?[0] != 0 {
        let cfg = if p.guidance.is_some() {
            " (after the CFG combine)"
        } else {
            ""
        };
        return bad(
            op,
            format_args!(
                "non-finite logit{cfg} in the {n} sampled rows (NaN, ±inf, or logit / \
                 temperature {} overflowing)",
                p.temperature
            ),
        );
    }
    let (token, confidence, lse) = (
        dev.download(&token)?,
        dev.download(&confidence)?,
        dev.download(&lse)?,
    );
    Ok((0..n)
        .map(|i| Sampled {
            token: token[i],
            confidence: confidence[i],
            lse: lse[i],
        })
        .collect())
}

// ------------------------------------------------------------------------------------------
// Support kernels
// ------------------------------------------------------------------------------------------

/// The first layer's RMSNorm fused into [`embed`].
#[derive(Debug)]
pub struct EmbedNorm<'a> {
    /// Norm weight `[d]`.
    pub w: &'a CudaSlice<bf16>,
    /// Epsilon (finite, > 0).
    pub eps: f32,
    /// `[n_rows, d]`: `bf16(rmsnorm(x) · w)`.
    pub out: &'a mut CudaSlice<bf16>,
}

/// `x[i] = table[ids[i]]` (or `register` for [`REGISTER`] ids) as f32, `d = register.len()`,
/// for `i < n_rows`; with `norm`, also the normalised bf16 rows. An id outside the table is
/// [`Error::Input`] naming the row and the id (found by the kernel, so this waits for it).
pub fn embed(
    dev: &CudaDevice,
    table: &CudaSlice<bf16>,
    register: &CudaSlice<bf16>,
    ids: &CudaSlice<u32>,
    n_rows: usize,
    x: &mut CudaSlice<f32>,
    norm: Option<EmbedNorm>,
) -> Result<()> {
    let op = "embed";
    let mut flag = zeros_padded::<u32>(dev, 1)?;
    embed_flagged(dev, table, register, ids, n_rows, x, norm, &mut flag)?;
    if dev.download(&flag)?[0] != 0 {
        let table_rows = table.len() / register.len();
        let host_ids = dev.download(ids)?;
        let bad_id = host_ids[..n_rows]
            .iter()
            .enumerate()
            .find(|&(_, &id)| id != REGISTER && id as usize >= table_rows);
        return match bad_id {
            Some((i, id)) => bad(
                op,
                format_args!("ids[{i}] = {id} is out of range for a table of {table_rows} rows"),
            ),
            None => Err(Error::Cuda(
                "embed: the kernel flagged an id, but every id is in range".into(),
            )),
        };
    }
    Ok(())
}

/// [`embed`] without the wait: the same kernel, queued on the device's stream (capturable in a
/// CUDA graph). An id outside the table ORs 1 into `error_flag[0]` (sticky: the kernel never
/// clears it; read it once at the end) and gives that row zeros.
#[allow(clippy::too_many_arguments)]
pub fn embed_flagged(
    dev: &CudaDevice,
    table: &CudaSlice<bf16>,
    register: &CudaSlice<bf16>,
    ids: &CudaSlice<u32>,
    n_rows: usize,
    x: &mut CudaSlice<f32>,
    norm: Option<EmbedNorm>,
    error_flag: &mut CudaSlice<u32>,
) -> Result<()> {
    let op = "embed";
    let d = register.len();
    if d == 0 {
        return bad(op, "width d (the register's length) is 0");
    }
    if !table.len().is_multiple_of(d) {
        return bad(
            op,
            format_args!(
                "table holds {} values, not a multiple of d = {d}",
                table.len()
            ),
        );
    }
    let table_rows = table.len() / d;
    if ids.len() < n_rows {
        return bad(op, format_args!("{} ids for {n_rows} rows", ids.len()));
    }
    check_matrix(op, "x", x.len(), (n_rows, d, d), 1)?;
    if let Some(nm) = &norm {
        if nm.w.len() != d {
            return bad(
                op,
                format_args!("norm weight has {} values, expected d = {d}", nm.w.len()),
            );
        }
        check_matrix(op, "normed", nm.out.len(), (n_rows, d, d), 1)?;
        if !(nm.eps.is_finite() && nm.eps > 0.0) {
            return bad(op, format_args!("eps ({}) must be finite and > 0", nm.eps));
        }
    }
    if error_flag.is_empty() {
        return bad(op, "error_flag is empty (it needs one entry)");
    }
    let mut b = Bufs::new(dev, op);
    let (norm_w, normed, eps) = match norm {
        Some(nm) => (b.read("norm_w", nm.w)?, b.write("normed", nm.out)?, nm.eps),
        None => (null(), null_mut(), 0.0),
    };
    let p = SlEmbedParams {
        table: b.read("table", table)?,
        reg: b.read("register", register)?,
        ids: b.read("ids", ids)?,
        x: b.write("x", x)?,
        norm_w,
        normed,
        error_flag: b.write("error_flag", error_flag)?,
        n_rows: to_u32(op, "n_rows", n_rows)?,
        d: to_u32(op, "d", d)?,
        table_rows: to_u32(op, "table rows", table_rows)?,
        eps,
    };
    // SAFETY: table holds table_rows rows of d, register d values, ids n_rows entries (the
    // kernel range-checks them), x and normed n_rows rows of d, the flag one entry; all are live
    // buffers of this context borrowed for the launch, outputs mutably.
    unsafe { raw::embed(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// The checks [`rmsnorm`] and [`rmsnorm_ro`] share; returns the width `d = w.len()`.
fn check_rmsnorm(
    x_len: usize,
    w: &CudaSlice<bf16>,
    eps: f32,
    n_rows: usize,
    out_len: usize,
) -> Result<usize> {
    let op = "rmsnorm";
    let d = w.len();
    if d == 0 {
        return bad(op, "width d (w's length) is 0");
    }
    if !(eps.is_finite() && eps > 0.0) {
        return bad(op, format_args!("eps ({eps}) must be finite and > 0"));
    }
    check_matrix(op, "x", x_len, (n_rows, d, d), 1)?;
    check_matrix(op, "out", out_len, (n_rows, d, d), 1)?;
    Ok(d)
}

/// For the first `n_rows` rows of width `d = w.len()`: `x += add` (f32, written back) when `add`
/// is given, then `out = bf16(x / sqrt(mean(x²) + eps) · w)`.
pub fn rmsnorm(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    add: Option<&CudaSlice<bf16>>,
    w: &CudaSlice<bf16>,
    eps: f32,
    n_rows: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let op = "rmsnorm";
    let d = check_rmsnorm(x.len(), w, eps, n_rows, out.len())?;
    if let Some(a) = add {
        check_matrix(op, "add", a.len(), (n_rows, d, d), 1)?;
    }
    let mut b = Bufs::new(dev, op);
    let p = SlRmsNormParams {
        x: b.write("x", x)?,
        add: match add {
            Some(a) => b.read("add", a)?,
            None => null(),
        },
        w: b.read("w", w)?,
        out: b.write("out", out)?,
        n_rows: to_u32(op, "n_rows", n_rows)?,
        d: to_u32(op, "d", d)?,
        eps,
        _pad: 0,
    };
    // SAFETY: x, add and out hold n_rows rows of d, w holds d; live buffers of
    // this context borrowed for the launch, x and out mutably (so neither aliases another).
    unsafe { raw::rmsnorm(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// [`rmsnorm`] without the residual add: `out = bf16(x / sqrt(mean(x²) + eps) · w)` for the first
/// `n_rows` rows of width `d = w.len()`, reading `x` only.
pub fn rmsnorm_ro(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<bf16>,
    eps: f32,
    n_rows: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let op = "rmsnorm";
    let d = check_rmsnorm(x.len(), w, eps, n_rows, out.len())?;
    let mut b = Bufs::new(dev, op);
    let p = SlRmsNormParams {
        // The kernel writes x only when `add` is set (params.h); here it is null.
        x: b.read("x", x)?.cast_mut(),
        add: null(),
        w: b.read("w", w)?,
        out: b.write("out", out)?,
        n_rows: to_u32(op, "n_rows", n_rows)?,
        d: to_u32(op, "d", d)?,
        eps,
        _pad: 0,
    };
    // SAFETY: x and out hold n_rows rows of d, w holds d; `add` is null, so the kernel only
    // reads x (the const-to-mut cast is never written through); live buffers of this context
    // borrowed for the launch, out mutably (so it aliases neither input).
    unsafe { raw::rmsnorm(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// The K/V pool of one layer.
#[derive(Debug)]
pub struct KvPool<'a> {
    /// Keys `[slots, stride]`.
    pub k: &'a mut CudaSlice<bf16>,
    /// Values, same layout.
    pub v: &'a mut CudaSlice<bf16>,
    /// Row stride (≥ n_kv_heads·head_dim).
    pub stride: usize,
}

/// The generation's RoPE table on the device: `(cos, sin)` of every position below
/// `positions` for every pair of a head ([`crate::contract::rope::table`], computed once on the
/// host by the CPU's expression), read by [`rope_kv`] instead of two f64 transcendentals per
/// pair and row.
#[derive(Debug)]
pub struct RopeTable {
    buf: CudaSlice<f32>,
    positions: usize,
    head_dim: usize,
    rope_theta: f64,
}

impl RopeTable {
    /// The table of positions `0..positions` for `head_dim` (even) and `rope_theta`.
    pub fn new(
        dev: &CudaDevice,
        head_dim: usize,
        rope_theta: f64,
        positions: usize,
    ) -> Result<Self> {
        let op = "rope table";
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || !(rope_theta.is_finite() && rope_theta > 0.0)
        {
            return bad(
                op,
                format_args!("head_dim {head_dim} (even, > 0), rope_theta {rope_theta} (> 0)"),
            );
        }
        to_u32(op, "positions", positions)?;
        let host = crate::contract::rope::table(head_dim, rope_theta, positions);
        Ok(RopeTable {
            buf: upload_padded(dev, &host)?,
            positions,
            head_dim,
            rope_theta,
        })
    }

    /// Positions held.
    pub fn positions(&self) -> usize {
        self.positions
    }
}

/// The queries, keys and values [`rope_kv`] reads: three matrices, or one fused `[n_rows,
/// q_dim + 2·kv_dim]` buffer whose row holds q, then k, then v (the output of one product by
/// the concatenated q|k|v weights).
#[derive(Debug)]
pub enum RopeQkv<'a> {
    /// Separate matrices.
    Separate {
        /// Queries `[n_rows, q_stride]`, rotated in place.
        q: &'a mut CudaSlice<bf16>,
        /// Row stride of `q`.
        q_stride: usize,
        /// Keys `[n_rows, kv_stride]` (rotated on the way to the pool).
        k: &'a CudaSlice<bf16>,
        /// Values `[n_rows, kv_stride]`.
        v: &'a CudaSlice<bf16>,
        /// Row stride of `k` and `v`.
        kv_stride: usize,
    },
    /// One buffer: q at columns `0..q_dim` (rotated in place), k at `q_dim..q_dim + kv_dim`,
    /// v after it.
    Fused {
        /// `[n_rows, stride]`.
        qkv: &'a mut CudaSlice<bf16>,
        /// Row stride (≥ q_dim + 2·kv_dim).
        stride: usize,
    },
}

/// Inputs of [`rope_kv`].
#[derive(Debug)]
pub struct RopeKv<'a> {
    /// Head geometry (head_dim even).
    pub shape: AttnShape,
    /// Rows.
    pub n_rows: usize,
    /// RoPE position of each row (≥ n_rows entries).
    pub positions: &'a CudaSlice<u32>,
    /// Pool slot of each row: exactly n_rows distinct slots of the pool.
    pub slots: &'a IndexBuf,
    /// RoPE base (finite, > 0).
    pub rope_theta: f64,
    /// The queries, keys and values.
    pub qkv: RopeQkv<'a>,
    /// The generation's table (same head_dim and rope_theta), or `None`: the kernel computes
    /// every row's angles.
    pub table: Option<&'a RopeTable>,
}

/// RoPE on q (in place) and k at each row's position, then k and v stored into the pool at each
/// row's slot (SPEC §2.3, §5). Angles from the table for positions it holds.
pub fn rope_kv(dev: &CudaDevice, a: RopeKv, pool: KvPool) -> Result<()> {
    let op = "rope_kv";
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = a.shape;
    if head_dim == 0 || head_dim % 2 != 0 || n_heads == 0 || n_kv_heads == 0 {
        return bad(
            op,
            format_args!(
                "shape {:?}: head_dim must be even and every size positive",
                a.shape
            ),
        );
    }
    if !(a.rope_theta.is_finite() && a.rope_theta > 0.0) {
        return bad(
            op,
            format_args!("rope_theta ({}) must be finite and > 0", a.rope_theta),
        );
    }
    if let Some(t) = a.table
        && (t.head_dim != head_dim || t.rope_theta != a.rope_theta)
    {
        return bad(
            op,
            format_args!(
                "the RoPE table is for head_dim {} and theta {}, not {head_dim} and {}",
                t.head_dim, t.rope_theta, a.rope_theta
            ),
        );
    }
    let (n, q_dim, kv_dim) = (a.n_rows, a.shape.q_dim(), a.shape.kv_dim());
    match &a.qkv {
        RopeQkv::Separate {
            q,
            q_stride,
            k,
            v,
            kv_stride,
        } => {
            check_matrix(op, "q", q.len(), (n, q_dim, *q_stride), 1)?;
            check_matrix(op, "k", k.len(), (n, kv_dim, *kv_stride), 1)?;
            check_matrix(op, "v", v.len(), (n, kv_dim, *kv_stride), 1)?;
        }
        RopeQkv::Fused { qkv, stride } => {
            check_matrix(op, "qkv", qkv.len(), (n, q_dim + 2 * kv_dim, *stride), 1)?;
        }
    }
    if pool.k.len() != pool.v.len() {
        return bad(
            op,
            format_args!(
                "k pool holds {} values but v pool {}",
                pool.k.len(),
                pool.v.len()
            ),
        );
    }
    check_matrix(op, "k pool", pool.k.len(), (0, kv_dim, pool.stride), 1)?;
    let pool_rows = rows_in(pool.k.len(), kv_dim, pool.stride);
    if a.positions.len() < n {
        return bad(
            op,
            format_args!("{} positions for {n} rows", a.positions.len()),
        );
    }
    if a.slots.len() != n {
        return bad(op, format_args!("{} slots for {n} rows", a.slots.len()));
    }
    if let Some(m) = a.slots.max().filter(|&m| m as usize >= pool_rows) {
        return bad(
            op,
            format_args!("slot {m} is not below the pool's {pool_rows} rows"),
        );
    }
    if !a.slots.distinct() {
        return bad(op, "two rows store to the same pool slot");
    }
    let mut b = Bufs::new(dev, op);
    let (q, k, v, q_stride, kv_stride) = match a.qkv {
        RopeQkv::Separate {
            q,
            q_stride,
            k,
            v,
            kv_stride,
        } => (
            b.write("q", q)?,
            b.read("k", k)?,
            b.read("v", v)?,
            q_stride,
            kv_stride,
        ),
        RopeQkv::Fused { qkv, stride } => {
            let q = b.write("qkv", qkv)?;
            // k and v are columns q_dim.. and q_dim + kv_dim.. of the same rows (checked above
            // to lie inside the buffer); the kernel reads them and writes only q's columns.
            (
                q,
                q.wrapping_add(q_dim).cast_const(),
                q.wrapping_add(q_dim + kv_dim).cast_const(),
                stride,
                stride,
            )
        }
    };
    let (rope_table, table_positions) = match a.table {
        Some(t) => (
            b.read("rope table", &t.buf)?,
            to_u32(op, "table positions", t.positions)?,
        ),
        None => (null(), 0),
    };
    let p = SlRopeKvParams {
        q,
        k,
        v,
        k_pool: b.write("k pool", pool.k)?,
        v_pool: b.write("v pool", pool.v)?,
        positions: b.read("positions", a.positions)?,
        slots: b.read("slots", a.slots.device())?,
        n_rows: to_u32(op, "n_rows", n)?,
        n_heads: to_u32(op, "n_heads", n_heads)?,
        n_kv_heads: to_u32(op, "n_kv_heads", n_kv_heads)?,
        head_dim: to_u32(op, "head_dim", head_dim)?,
        q_stride: to_u32(op, "q_stride", q_stride)?,
        kv_stride: to_u32(op, "kv_stride", kv_stride)?,
        pool_stride: to_u32(op, "pool stride", pool.stride)?,
        table_positions,
        rope_theta: a.rope_theta,
        rope_table,
    };
    // SAFETY: q, k, v hold n_rows rows of strides covering their heads (fused: disjoint column
    // ranges of one buffer's rows, q the only one written); every slot is a distinct row of both
    // pools (recorded at upload, checked above); positions cover the rows; the table holds
    // table_positions positions of head_dim / 2 pairs; live buffers of this context borrowed for
    // the launch, q and the pools mutably.
    unsafe { raw::rope_kv(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// Shape of a [`swiglu`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwigluShape {
    /// Rows.
    pub n_rows: usize,
    /// Output width.
    pub width: usize,
    /// Row stride of `gate` (≥ width).
    pub gate_stride: usize,
    /// Row stride of `up` (≥ width).
    pub up_stride: usize,
}

/// `out[n_rows, width] = bf16(silu(gate) · up)` in f32 math, `silu(g) = g / (1 + exp(−g))`.
pub fn swiglu(
    dev: &CudaDevice,
    gate: &impl DevicePtr<bf16>,
    up: &impl DevicePtr<bf16>,
    shape: SwigluShape,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let op = "swiglu";
    let SwigluShape {
        n_rows,
        width,
        gate_stride,
        up_stride,
    } = shape;
    check_matrix(op, "gate", gate.len(), (n_rows, width, gate_stride), 1)?;
    check_matrix(op, "up", up.len(), (n_rows, width, up_stride), 1)?;
    check_matrix(op, "out", out.len(), (n_rows, width, width), 1)?;
    let mut b = Bufs::new(dev, op);
    let p = SlSwigluParams {
        gate: b.read("gate", gate)?,
        up: b.read("up", up)?,
        out: b.write("out", out)?,
        n_rows: to_u32(op, "n_rows", n_rows)?,
        width: to_u32(op, "width", width)?,
        gate_stride: to_u32(op, "gate_stride", gate_stride)?,
        up_stride: to_u32(op, "up_stride", up_stride)?,
    };
    // SAFETY: gate / up hold n_rows rows of their strides (≥ width), out n_rows·width; live
    // buffers (or views) of this context, out borrowed mutably so it aliases neither input.
    unsafe { raw::swiglu(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// Seeded uniform init (params.h `sl_init_uniform`): every element `i` of `out` becomes
/// `bf16(offset + scale·u_i)`, `u_i` uniform on (−1, 1) from Philox4x32-10 with key `seed`
/// and counter `(i/4, tensor_index, 0x1A17)`. The f32 values before the bf16 rounding are
/// exactly [`crate::contract::rng::init_uniform`]'s.
///
/// Errors: a non-finite `offset` or `scale`.
pub fn init_uniform(
    dev: &CudaDevice,
    seed: u64,
    tensor_index: u32,
    offset: f32,
    scale: f32,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let op = "init_uniform";
    if !offset.is_finite() || !scale.is_finite() {
        return bad(
            op,
            format_args!("offset {offset} and scale {scale} must be finite"),
        );
    }
    let n = out.len() as u64;
    let mut b = Bufs::new(dev, op);
    let p = SlInitParams {
        out: b.write("out", out)?,
        n,
        offset,
        scale,
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        tensor_index,
        _pad: 0,
    };
    // SAFETY: out is a live buffer of this context holding n elements, borrowed mutably.
    unsafe { raw::init_uniform(dev.kernels(), &p, dev.stream().cu_stream()) }
}

// ------------------------------------------------------------------------------------------
// Register-token aggregation
// ------------------------------------------------------------------------------------------

/// The step's sparse representation built on the device by [`aggregate`] (params.h
/// `SlAggregateParams`): per-row ids, positions, tags and slots (sequence-major,
/// `rows_per_seq` each), keys (`keys_per_seq` per sequence), and the logits rows.
#[derive(Debug)]
pub struct Aggregated {
    /// Sizes.
    pub counts: AggregateCounts,
    /// Sequences.
    pub n_seqs: usize,
    /// Token id of each row ([`REGISTER`] for registers).
    pub row_ids: CudaSlice<u32>,
    /// RoPE position of each row.
    pub row_pos: CudaSlice<u32>,
    /// Tag of each row.
    pub row_tags: CudaSlice<u32>,
    /// Pool slot of each row.
    pub row_slots: CudaSlice<u32>,
    /// Pool slot of each key.
    pub kv_indices: CudaSlice<u32>,
    /// Tag of each key.
    pub kv_tags: CudaSlice<u32>,
    /// Row (index into the rows above) of each logits output.
    pub logits_rows: CudaSlice<u32>,
    logits_rows_len: usize,
}

/// [`Aggregated`] copied to the host, each array cut to its logical length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatedHost {
    /// See [`Aggregated::row_ids`].
    pub row_ids: Vec<u32>,
    /// See [`Aggregated::row_pos`].
    pub row_pos: Vec<u32>,
    /// See [`Aggregated::row_tags`].
    pub row_tags: Vec<u32>,
    /// See [`Aggregated::row_slots`].
    pub row_slots: Vec<u32>,
    /// See [`Aggregated::kv_indices`].
    pub kv_indices: Vec<u32>,
    /// See [`Aggregated::kv_tags`].
    pub kv_tags: Vec<u32>,
    /// See [`Aggregated::logits_rows`].
    pub logits_rows: Vec<u32>,
}

impl Aggregated {
    /// Rows in total.
    pub fn rows(&self) -> usize {
        self.n_seqs * self.counts.rows_per_seq
    }

    /// Keys in total.
    pub fn keys(&self) -> usize {
        self.n_seqs * self.counts.keys_per_seq
    }

    /// Logits rows in total.
    pub fn logits(&self) -> usize {
        self.logits_rows_len
    }

    /// Copies everything to the host (waits for the kernel).
    pub fn download(&self, dev: &CudaDevice) -> Result<AggregatedHost> {
        let get = |b: &CudaSlice<u32>, len: usize| -> Result<Vec<u32>> {
            let mut v = dev.download(b)?;
            v.truncate(len);
            Ok(v)
        };
        let (rows, keys) = (self.rows(), self.keys());
        Ok(AggregatedHost {
            row_ids: get(&self.row_ids, rows)?,
            row_pos: get(&self.row_pos, rows)?,
            row_tags: get(&self.row_tags, rows)?,
            row_slots: get(&self.row_slots, rows)?,
            kv_indices: get(&self.kv_indices, keys)?,
            kv_tags: get(&self.kv_tags, keys)?,
            logits_rows: get(&self.logits_rows, self.logits())?,
        })
    }
}

/// Builds sparse step `k`'s rows, keys and logits rows on the device, exactly as the host
/// planner does for the response branch (its twin: the sampler's sparse plan with every saving
/// on and a prefilled prompt). The output arrays are freshly allocated and filled with
/// `u32::MAX` before the launch: the kernel writes every entry, and one it missed would be an
/// impossible index rather than a plausible 0.
pub fn aggregate(dev: &CudaDevice, inp: &AggregateInputs) -> Result<Aggregated> {
    let op = "aggregate";
    let counts = inp.validate()?;
    let rows = inp.n_seqs * counts.rows_per_seq;
    let keys = inp.n_seqs * counts.keys_per_seq;
    let n_logits = inp.n_seqs * inp.query.len();
    let tokens = upload_padded(dev, inp.tokens)?;
    let decoded_step = upload_padded(dev, inp.decoded_step)?;
    let decoded_order = upload_padded(dev, inp.decoded_order)?;
    let group_indptr = dev.upload(inp.group_indptr)?;
    let query = upload_padded(dev, inp.query)?;
    let poisoned = |dev: &CudaDevice, len: usize| dev.upload(&vec![u32::MAX; len.max(1)]);
    let mut out = Aggregated {
        counts,
        n_seqs: inp.n_seqs,
        row_ids: poisoned(dev, rows)?,
        row_pos: poisoned(dev, rows)?,
        row_tags: poisoned(dev, rows)?,
        row_slots: poisoned(dev, rows)?,
        kv_indices: poisoned(dev, keys)?,
        kv_tags: poisoned(dev, keys)?,
        logits_rows: poisoned(dev, n_logits)?,
        logits_rows_len: n_logits,
    };
    {
        let mut b = Bufs::new(dev, op);
        let p = SlAggregateParams {
            tokens: b.read("tokens", &tokens)?,
            decoded_step: b.read("decoded_step", &decoded_step)?,
            decoded_order: b.read("decoded_order", &decoded_order)?,
            group_indptr: b.read("group_indptr", &group_indptr)?,
            query: b.read("query", &query)?,
            row_ids: b.write("row_ids", &mut out.row_ids)?,
            row_pos: b.write("row_pos", &mut out.row_pos)?,
            row_tags: b.write("row_tags", &mut out.row_tags)?,
            row_slots: b.write("row_slots", &mut out.row_slots)?,
            kv_indices: b.write("kv_indices", &mut out.kv_indices)?,
            kv_tags: b.write("kv_tags", &mut out.kv_tags)?,
            logits_rows: b.write("logits_rows", &mut out.logits_rows)?,
            k: counts.k,
            n_seqs: to_u32(op, "n_seqs", inp.n_seqs)?,
            prompt_len: to_u32(op, "prompt_len", inp.prompt_len)?,
            n_response: to_u32(op, "n_response", inp.tokens.len())?,
            n_registers: to_u32(op, "n_registers", inp.n_registers)?,
            n_query: to_u32(op, "n_query", inp.query.len())?,
            slots_per_seq: to_u32(op, "slots_per_seq", inp.slots_per_seq)?,
            mask_id: inp.mask_id,
            branch: inp.branch as u32,
            rows_per_seq: to_u32(op, "rows_per_seq", counts.rows_per_seq)?,
            keys_per_seq: to_u32(op, "keys_per_seq", counts.keys_per_seq)?,
            _pad: 0,
        };
        // SAFETY: `validate` checked the decode arrays' consistency (every index the kernel
        // follows is in range, groups and steps agree, the query is undecoded and distinct) and
        // that the slot layout fits; the outputs were sized from the same counts; all buffers
        // are live in this context and borrowed for the launch, outputs mutably.
        unsafe { raw::aggregate_sparse(dev.kernels(), &p, dev.stream().cu_stream()) }?;
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Device-resident generation
// ------------------------------------------------------------------------------------------

/// Queues `buf[i] = value` for every element of `buf` (`sl_fill_u32`; capturable).
pub fn fill_u32(dev: &CudaDevice, buf: &mut CudaSlice<u32>, value: u32) -> Result<()> {
    let op = "fill_u32";
    let n = buf.len() as u64;
    let mut b = Bufs::new(dev, op);
    let p = SlFillParams {
        buf: b.write("buf", buf)?,
        n,
        value,
        _pad: 0,
    };
    // SAFETY: `buf` holds n values and is a live buffer of this context borrowed mutably for
    // the launch.
    unsafe { raw::fill_u32(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// The decode state of a device-resident generation ([`DeviceState`] on the device) and the
/// lists of the last [`resolve_plan`] ([`Lists`]; entries past a list's
/// length are [`UNDECODED`]). Every buffer holds at least `len()` entries; the ops check that
/// again on every call, so a buffer swapped for a shorter one is an error, not a fault.
#[derive(Debug)]
pub struct DeviceStateBufs {
    /// `tokens[i]`: the decoded id, or the mask id while undecoded.
    pub tokens: CudaSlice<u32>,
    /// `order[r]`: the response index decoded with rank `r`, or [`UNDECODED`].
    pub order: CudaSlice<u32>,
    /// `decoded_step[i]`: the step that decoded `i`, or [`UNDECODED`].
    pub decoded_step: CudaSlice<u32>,
    /// List `q`: undecoded indices in the step's block (the text commit's query).
    pub q: CudaSlice<u32>,
    /// List `m`: undecoded indices outside the block.
    pub m: CudaSlice<u32>,
    /// List `d`: decoded indices.
    pub d: CudaSlice<u32>,
    n: usize,
}

impl DeviceStateBufs {
    /// Buffers for a response of `n` positions, queued to hold "nothing decoded" with tokens 0
    /// ([`DeviceStateBufs::reset`] sets the response's mask id). Errors: `n` above
    /// [`MAX_PROGRAM_LEN`].
    pub fn new(dev: &CudaDevice, n: usize) -> Result<DeviceStateBufs> {
        if n > MAX_PROGRAM_LEN {
            return bad(
                "device state",
                format_args!("response length {n} exceeds {MAX_PROGRAM_LEN}"),
            );
        }
        let mut st = DeviceStateBufs {
            tokens: zeros_padded(dev, n)?,
            order: zeros_padded(dev, n)?,
            decoded_step: zeros_padded(dev, n)?,
            q: zeros_padded(dev, n)?,
            m: zeros_padded(dev, n)?,
            d: zeros_padded(dev, n)?,
            n,
        };
        st.reset(dev, 0)?;
        Ok(st)
    }

    /// Queues the fills that make the state "nothing decoded" ([`DeviceState::new`]`(n,
    /// mask_id)`) and empty lists; capturable, so a graph can start a generation afresh.
    pub fn reset(&mut self, dev: &CudaDevice, mask_id: u32) -> Result<()> {
        self.check("device state reset")?;
        fill_u32(dev, &mut self.tokens, mask_id)?;
        for buf in [
            &mut self.order,
            &mut self.decoded_step,
            &mut self.q,
            &mut self.m,
            &mut self.d,
        ] {
            fill_u32(dev, buf, UNDECODED)?;
        }
        Ok(())
    }

    /// Response length.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the response is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Checks that every buffer still holds `len()` entries.
    fn check(&self, op: &str) -> Result<()> {
        for (name, len) in [
            ("tokens", self.tokens.len()),
            ("order", self.order.len()),
            ("decoded_step", self.decoded_step.len()),
            ("q", self.q.len()),
            ("m", self.m.len()),
            ("d", self.d.len()),
        ] {
            if len < self.n {
                return bad(
                    op,
                    format_args!(
                        "state buffer {name} holds {len} entries for a response of {}",
                        self.n
                    ),
                );
            }
        }
        Ok(())
    }

    /// The state, after the queued work (waits).
    pub fn download(&self, dev: &CudaDevice) -> Result<DeviceState> {
        self.check("device state download")?;
        let get = |buf: &CudaSlice<u32>| -> Result<Vec<u32>> {
            let mut v = dev.download(buf)?;
            v.truncate(self.n);
            Ok(v)
        };
        Ok(DeviceState {
            tokens: get(&self.tokens)?,
            order: get(&self.order)?,
            decoded_step: get(&self.decoded_step)?,
        })
    }

    /// The lists of the last [`resolve_plan`], each cut at its first [`UNDECODED`] entry
    /// (after the queued work; waits).
    pub fn download_lists(&self, dev: &CudaDevice) -> Result<Lists> {
        self.check("device state download")?;
        let get = |buf: &CudaSlice<u32>| -> Result<Vec<u32>> {
            let mut v = dev.download(buf)?;
            v.truncate(self.n);
            let len = v.iter().position(|&i| i == UNDECODED).unwrap_or(v.len());
            v.truncate(len);
            Ok(v)
        };
        Ok(Lists {
            q: get(&self.q)?,
            m: get(&self.m)?,
            d: get(&self.d)?,
        })
    }
}

/// A step's patches on the device, checked by [`check_patches`] against its [`PatchLens`].
#[derive(Debug)]
pub struct PatchBuf {
    /// `SlPatch` records, 4 u32 each ([`Patch::encode`]).
    buf: CudaSlice<u32>,
    len: usize,
    lens: PatchLens,
    /// Whether some patch writes field `f` (index `f as usize`).
    writes: [bool; 7],
}

impl PatchBuf {
    /// Number of patches.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no patches.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The plan lengths the patches were checked against.
    pub fn lens(&self) -> PatchLens {
        self.lens
    }
}

/// Checks and uploads a step's patches ([`check_patches`]).
pub fn upload_patches(dev: &CudaDevice, patches: &[Patch], lens: PatchLens) -> Result<PatchBuf> {
    check_patches(patches, lens)?;
    let mut writes = [false; 7];
    for p in patches {
        writes[p.field as usize] = true;
    }
    let words: Vec<u32> = patches.iter().flat_map(|p| p.encode()).collect();
    Ok(PatchBuf {
        buf: upload_padded(dev, &words)?,
        len: patches.len(),
        lens,
        writes,
    })
}

/// The plan arrays [`resolve_plan`] patches, one per [`Field`]. A target may be `None` when no patch writes its
/// field; a given target must hold at least its [`PatchLens`] length.
#[derive(Debug, Default)]
pub struct PatchTargets<'a> {
    /// Row ids of the program's branch (`rows`).
    pub row_ids: Option<&'a mut CudaSlice<u32>>,
    /// Row positions (`rows`).
    pub row_pos: Option<&'a mut CudaSlice<u32>>,
    /// Row slots (`rows`).
    pub row_slots: Option<&'a mut CudaSlice<u32>>,
    /// Key slots (`keys`).
    pub kv_indices: Option<&'a mut CudaSlice<u32>>,
    /// Key tags (`keys`).
    pub kv_tags: Option<&'a mut CudaSlice<u32>>,
    /// Logits rows (`logits`).
    pub logits_rows: Option<&'a mut CudaSlice<u32>>,
    /// Sampler positions (`logits`).
    pub sample_pos: Option<&'a mut CudaSlice<u32>>,
    /// The attention plan's key-tile summaries, rebuilt from the patched key tags (which must
    /// then be given) after the patches.
    pub kv_summary: Option<SummaryTarget<'a>>,
}

/// Checks the targets of [`resolve_plan`]: `given[f]` is the buffer length of field `f`'s target
/// (`None`: not given), `writes[f]` whether a patch writes field `f`. A field some patch writes
/// needs a target, and a given target must hold its [`PatchLens`] length.
fn check_targets(lens: PatchLens, writes: [bool; 7], given: [Option<usize>; 7]) -> Result<()> {
    let op = "resolve_plan";
    for f in Field::ALL {
        let need = lens.of(f);
        match given[f as usize] {
            None if writes[f as usize] => {
                return bad(
                    op,
                    format_args!(
                        "patches write {} but no {} target was given",
                        field_name(f),
                        field_name(f)
                    ),
                );
            }
            Some(len) if len < need => {
                return bad(
                    op,
                    format_args!(
                        "target {} holds {len} entries; the patches were checked against {need}",
                        field_name(f)
                    ),
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// Queues `sl_resolve_plan` (never waits; capturable): computes the lists of the state's
/// current decode progress for the step's block `[block.0, block.1)` into `state.q` / `m` /
/// `d`, then applies `patches` to the targets, exactly as the host twins (the sampler's
/// `patch::lists` and `patch::apply`); with a summary target, it then rebuilds the attention
/// plan's key-tile summaries from the patched key tags (`contract::attn::key_tile_summaries`).
/// Errors (nothing queued): `block.0 > block.1`, a field some patch writes without a target, a
/// target shorter than its [`PatchLens`] length, a state buffer shorter than the response, a
/// summary target without a key-tag target holding its keys or with too short a buffer.
pub fn resolve_plan(
    dev: &CudaDevice,
    patches: &PatchBuf,
    state: &mut DeviceStateBufs,
    block: (u32, u32),
    targets: PatchTargets,
) -> Result<()> {
    let op = "resolve_plan";
    state.check(op)?;
    if block.0 > block.1 {
        return bad(
            op,
            format_args!("block [{}, {}) ends before it begins", block.0, block.1),
        );
    }
    let PatchTargets {
        row_ids,
        row_pos,
        row_slots,
        kv_indices,
        kv_tags,
        logits_rows,
        sample_pos,
        kv_summary,
    } = targets;
    if let Some(t) = &kv_summary {
        let tags = kv_tags.as_ref().map_or(0, |b| b.len());
        if kv_tags.is_none() || tags < t.n_keys {
            return bad(
                op,
                format_args!(
                    "the key-tile summaries of {} keys need a kv_tags target holding them \
                     (given: {tags})",
                    t.n_keys
                ),
            );
        }
        if t.summary.len() < t.n_ktiles * SUMMARY_WORDS || t.kv_indptr.len() != t.n_seqs + 1 {
            return bad(
                op,
                format_args!(
                    "summary target: {} words for {} key tiles, {} offsets for {} sequences",
                    t.summary.len(),
                    t.n_ktiles,
                    t.kv_indptr.len(),
                    t.n_seqs
                ),
            );
        }
    }
    let mut ts = [
        row_ids,
        row_pos,
        row_slots,
        kv_indices,
        kv_tags,
        logits_rows,
        sample_pos,
    ];
    let given = ts.each_ref().map(|t| t.as_ref().map(|b| b.len()));
    let lens = patches.lens;
    check_targets(lens, patches.writes, given)?;
    let n = state.n;
    let DeviceStateBufs {
        tokens,
        order,
        decoded_step,
        q,
        m,
        d,
        ..
    } = state;
    let mut b = Bufs::new(dev, op);
    let mut ptrs = [null_mut::<u32>(); 7];
    for (f, t) in Field::ALL.iter().zip(ts.iter_mut()) {
        if let Some(buf) = t.take() {
            ptrs[*f as usize] = b.write(field_name(*f), buf)?;
        }
    }
    let p = SlResolveParams {
        tokens: b.read("tokens", &*tokens)?,
        order: b.read("order", &*order)?,
        decoded_step: b.read("decoded_step", &*decoded_step)?,
        list_q: b.write("q", q)?,
        list_m: b.write("m", m)?,
        list_d: b.write("d", d)?,
        patches: b.read("patches", &patches.buf)?.cast::<SlPatch>(),
        row_ids: ptrs[Field::RowId as usize],
        row_pos: ptrs[Field::RowPos as usize],
        row_slots: ptrs[Field::RowSlot as usize],
        kv_indices: ptrs[Field::KvIndex as usize],
        kv_tags: ptrs[Field::KvTag as usize],
        logits_rows: ptrs[Field::LogitsRow as usize],
        sample_pos: ptrs[Field::SamplePos as usize],
        n: to_u32(op, "n", n)?,
        n_patches: to_u32(op, "patches", patches.len)?,
        block_begin: block.0,
        block_end: block.1,
        // A target not given is null: the kernel writes nothing to it whatever the length.
        n_rows: to_u32(op, "rows", lens.rows)?,
        n_keys: to_u32(op, "keys", lens.keys)?,
        n_logits: to_u32(op, "logits", lens.logits)?,
        n_samples: to_u32(op, "samples", lens.samples)?,
        kv_indptr: null(),
        kv_summary: null_mut(),
        n_seqs: 0,
        _pad: 0,
    };
    let mut p = p;
    if let Some(t) = kv_summary {
        p.kv_indptr = b.read("kv_indptr", t.kv_indptr)?;
        p.kv_summary = b.write("kv_summary", t.summary)?;
        p.n_seqs = to_u32(op, "sequences", t.n_seqs)?;
    }
    // SAFETY: n <= MAX_PROGRAM_LEN (< 2^31) and every state buffer holds n entries (`check`);
    // the patch buffer holds n_patches 16-byte records (4 u32 each, 4-byte aligned as SlPatch
    // needs) checked by `check_patches`, so no two name the same entry; every given target
    // holds its PatchLens length (`check_targets`) and a target not given is null (the kernel
    // skips it); all are live buffers of this context borrowed for the launch, the written ones
    // mutably, so the targets, the lists and the state are distinct buffers. A summary target
    // comes from an attention plan whose kv_indptr covers n_keys keys, all held by the checked
    // kv_tags target, and whose summary buffer holds a summary per key tile (checked above).
    unsafe { raw::resolve_plan(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// Checks the arguments of [`commit`] for a response of `n`: the query, token and confidence
/// buffers (lengths `lens`) hold `n_query` entries, `rule.n_commit <= n_query` and the ranks
/// `rule.rank_base .. + n_commit` lie inside the response.
fn check_commit(n: usize, n_query: usize, lens: [usize; 3], rule: CommitRule) -> Result<()> {
    let op = "commit";
    if n_query > MAX_PROGRAM_LEN {
        return bad(
            op,
            format_args!("{n_query} query positions exceed {MAX_PROGRAM_LEN}"),
        );
    }
    for (name, len) in ["query", "token", "confidence"].into_iter().zip(lens) {
        if len < n_query {
            return bad(
                op,
                format_args!("{name} holds {len} entries for {n_query} query positions"),
            );
        }
    }
    if rule.n_commit as usize > n_query {
        return bad(
            op,
            format_args!(
                "{} positions to commit from {n_query} query positions",
                rule.n_commit
            ),
        );
    }
    let end = u64::from(rule.rank_base) + u64::from(rule.n_commit);
    if end > n as u64 {
        return bad(
            op,
            format_args!(
                "ranks {}..{end} pass the response's {n} positions",
                rule.rank_base
            ),
        );
    }
    Ok(())
}

/// The shared body of [`commit`] and [`commit_from_lists`] (`query: None` reads `state.q`).
fn commit_impl(
    dev: &CudaDevice,
    query: Option<&CudaSlice<u32>>,
    token: &CudaSlice<u32>,
    confidence: &CudaSlice<f32>,
    n_query: usize,
    rule: CommitRule,
    state: &mut DeviceStateBufs,
) -> Result<()> {
    let op = "commit";
    state.check(op)?;
    let n = state.n;
    let query_len = query.map_or(n, |q| q.len());
    check_commit(n, n_query, [query_len, token.len(), confidence.len()], rule)?;
    let DeviceStateBufs {
        tokens,
        order,
        decoded_step,
        q,
        ..
    } = state;
    let query = query.unwrap_or(&*q);
    let mut b = Bufs::new(dev, op);
    let p = SlCommitParams {
        query: b.read("query", query)?,
        token: b.read("token", token)?,
        confidence: b.read("confidence", confidence)?,
        tokens: b.write("tokens", tokens)?,
        order: b.write("order", order)?,
        decoded_step: b.write("decoded_step", decoded_step)?,
        n: to_u32(op, "n", n)?,
        n_query: to_u32(op, "n_query", n_query)?,
        n_commit: rule.n_commit,
        rank_base: rule.rank_base,
        step: rule.step,
        by_confidence: rule.by_confidence as u32,
    };
    // SAFETY: n and n_query are at most MAX_PROGRAM_LEN (< 2^31); query, token and confidence
    // hold n_query entries and the state buffers n (`check_commit`, `check`);
    // rank_base + n_commit <= n; the kernel skips query entries >= n, and the query is either a
    // caller's buffer borrowed shared (so not one of the state buffers, which are borrowed
    // mutably) or the q list, which only holds distinct indices (written by resolve_plan or
    // reset); all are live buffers of this context borrowed for the launch.
    unsafe { raw::commit(dev.kernels(), &p, dev.stream().cu_stream()) }
}

/// Queues `sl_commit` (never waits; capturable): records a step's choices in `state` exactly as
/// the host twin (`patch::commit`), for the query `query[..n_query]` (response indices) with
/// sampled `token` and `confidence`. Query entries `>= state.len()` are skipped (neither
/// committed nor counted); if fewer than `rule.n_commit` remain, fewer are committed. The
/// in-range query entries must be distinct (which token a repeated index keeps is unspecified).
/// Errors (nothing queued): buffers shorter than `n_query`, `n_commit > n_query`, ranks past
/// the response.
pub fn commit(
    dev: &CudaDevice,
    query: &CudaSlice<u32>,
    token: &CudaSlice<u32>,
    confidence: &CudaSlice<f32>,
    n_query: usize,
    rule: CommitRule,
    state: &mut DeviceStateBufs,
) -> Result<()> {
    commit_impl(dev, Some(query), token, confidence, n_query, rule, state)
}

/// [`commit`] with the state's own `q` list (the last [`resolve_plan`]'s undecoded indices of
/// the block, ascending, padded with [`UNDECODED`]) as the query: the text step's sampled rows
/// are `q[..n_query]`. `n_query` may pass the list's length (up to `state.len()`): the padding
/// is skipped.
pub fn commit_from_lists(
    dev: &CudaDevice,
    token: &CudaSlice<u32>,
    confidence: &CudaSlice<f32>,
    n_query: usize,
    rule: CommitRule,
    state: &mut DeviceStateBufs,
) -> Result<()> {
    commit_impl(dev, None, token, confidence, n_query, rule, state)
}

/// Checks the shapes of [`gather_rows`] (buffer lengths `x_len`, `rows_len`, `out_len`).
fn check_gather(
    x_len: usize,
    x_rows: usize,
    cols: usize,
    rows_len: usize,
    n: usize,
    out_len: usize,
) -> Result<()> {
    let op = "gather_rows";
    if n > MAX_PROGRAM_LEN {
        return bad(op, format_args!("{n} rows exceed {MAX_PROGRAM_LEN}"));
    }
    to_u32(op, "x_rows", x_rows)?;
    to_u32(op, "cols", cols)?;
    if cols == 0 {
        return Ok(());
    }
    check_matrix(op, "x", x_len, (x_rows, cols, cols), 1)?;
    check_matrix(op, "out", out_len, (n, cols, cols), 1)?;
    if rows_len < n {
        return bad(
            op,
            format_args!("rows holds {rows_len} entries for {n} rows"),
        );
    }
    Ok(())
}

/// Queues `out[j, :] = x[rows[j], :]` for `j < n` (`sl_gather_rows`; never waits), `x` and
/// `out` dense with `cols` columns. A row index `>= x_rows` gives a row of NaN (the sampler's
/// non-finite check then flags it).
pub fn gather_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    x_rows: usize,
    cols: usize,
    rows: &CudaSlice<u32>,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "gather_rows";
    check_gather(x.len(), x_rows, cols, rows.len(), n, out.len())?;
    let mut b = Bufs::new(dev, op);
    let p = SlGatherParams {
        x: b.read("x", x)?,
        rows: b.read("rows", rows)?,
        out: b.write("out", out)?,
        n: to_u32(op, "n", n)?,
        cols: to_u32(op, "cols", cols)?,
        x_rows: to_u32(op, "x_rows", x_rows)?,
        _pad: 0,
    };
    // SAFETY: x holds x_rows rows of cols, rows n entries (the kernel range-checks them
    // against x_rows), out n rows of cols (`check_gather`); n < 2^31; all are live buffers of
    // this context borrowed for the launch, out mutably.
    unsafe { raw::gather_rows(dev.kernels(), &p, dev.stream().cu_stream()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn matrix_checks_name_the_problem() {
        assert!(check_matrix("op", "x", 64, (4, 16, 16), VEC).is_ok());
        assert!(check_matrix("op", "x", 100, (4, 16, 24), VEC).is_ok());
        let m = msg(check_matrix("op", "x", 63, (4, 16, 16), VEC));
        assert!(m.contains("x holds 63") && m.contains("needs 64"), "{m}");
        // A view: the last row stops at its width.
        assert!(check_matrix("op", "x", 3 * 24 + 16, (4, 16, 24), VEC).is_ok());
        assert!(check_matrix("op", "x", 3 * 24 + 15, (4, 16, 24), VEC).is_err());
        assert!(check_matrix("op", "x", 0, (0, 16, 24), VEC).is_ok());
        assert_eq!(rows_in(3 * 24 + 16, 16, 24), 4);
        assert_eq!(rows_in(3 * 24 + 15, 16, 24), 3);
        assert_eq!(rows_in(15, 16, 24), 0);
        let m = msg(check_matrix("op", "x", 64, (4, 16, 12), 1));
        assert!(m.contains("below its row width 16"), "{m}");
        let m = msg(check_matrix("op", "x", 1000, (4, 16, 20), VEC));
        assert!(m.contains("not a multiple of 8"), "{m}");
        assert!(check_matrix("op", "x", 1, (usize::MAX, 2, 2), 1).is_err());
        // f32 matrices need no alignment.
        assert!(check_matrix("op", "x", 21, (3, 7, 7), 1).is_ok());
    }

    fn sp(n: usize) -> SampleParams {
        SampleParams {
            guidance: None,
            temperature: 1.0,
            banned: vec![],
            seed: 7,
            step: 0,
            request: 0,
            positions: (0..n as u32).collect(),
        }
    }

    #[test]
    fn sample_checks_follow_the_cpu_rules() {
        assert_eq!(check_sample(3 * 12, 10, 12, &sp(3)).unwrap(), (3, None));
        let cfg = SampleParams {
            guidance: Some(2.0),
            ..sp(3)
        };
        assert_eq!(check_sample(6 * 10, 10, 10, &cfg).unwrap().0, 6);
        assert!(msg(check_sample(5 * 10, 10, 10, &cfg)).contains("logits holds 50"));
        assert!(msg(check_sample(30, 10, 9, &sp(3))).contains("below its row width"));
        let t = SampleParams {
            temperature: -1.0,
            ..sp(1)
        };
        assert!(msg(check_sample(10, 10, 10, &t)).contains("temperature"));
        let g = SampleParams {
            guidance: Some(f32::NAN),
            ..sp(1)
        };
        assert!(msg(check_sample(20, 10, 10, &g)).contains("guidance"));
        let b = SampleParams {
            banned: vec![10],
            ..sp(1)
        };
        assert!(msg(check_sample(10, 10, 10, &b)).contains("banned id 10"));
        let all = SampleParams {
            banned: vec![0, 1, 1],
            ..sp(1)
        };
        assert!(msg(check_sample(2, 2, 2, &all)).contains("every id"));
        assert!(msg(check_sample(0, 0, 0, &sp(0))).contains("vocab"));
    }

    const LENS: PatchLens = PatchLens {
        rows: 4,
        keys: 6,
        logits: 4,
        samples: 2,
    };

    #[test]
    fn target_checks_need_a_target_for_every_written_field() {
        let none = [None; 7];
        // Under CFG the logits rows are twice the sampled positions: each target is checked
        // against its own length.
        let all = [
            Some(4),
            Some(4),
            Some(4),
            Some(6),
            Some(6),
            Some(4),
            Some(2),
        ];
        check_targets(LENS, [false; 7], none).unwrap();
        check_targets(LENS, [true; 7], all).unwrap();
        // Longer buffers are fine; a given target nothing writes is fine.
        let longer = [
            Some(9),
            Some(4),
            Some(4),
            Some(60),
            Some(6),
            Some(4),
            Some(3),
        ];
        check_targets(LENS, [false; 7], longer).unwrap();
        let mut writes = [false; 7];
        writes[Field::KvTag as usize] = true;
        let m = msg(check_targets(LENS, writes, none));
        assert!(
            m.contains("patches write kv_tags but no kv_tags target"),
            "{m}"
        );
        let mut short = all;
        short[Field::LogitsRow as usize] = Some(1);
        let m = msg(check_targets(LENS, [false; 7], short));
        assert!(
            m.contains("target logits_rows holds 1") && m.contains("against 4"),
            "{m}"
        );
    }

    fn rule(n_commit: u32, rank_base: u32) -> CommitRule {
        CommitRule {
            step: 1,
            n_commit,
            rank_base,
            by_confidence: true,
        }
    }

    #[test]
    fn commit_checks() {
        check_commit(10, 4, [4, 4, 4], rule(4, 6)).unwrap();
        check_commit(10, 0, [1, 1, 1], rule(0, 10)).unwrap();
        let m = msg(check_commit(10, 4, [4, 3, 4], rule(1, 0)));
        assert!(m.contains("token holds 3 entries for 4"), "{m}");
        let m = msg(check_commit(10, 4, [4, 4, 2], rule(1, 0)));
        assert!(m.contains("confidence holds 2"), "{m}");
        let m = msg(check_commit(10, 4, [4, 4, 4], rule(5, 0)));
        assert!(m.contains("5 positions to commit from 4"), "{m}");
        let m = msg(check_commit(10, 4, [4, 4, 4], rule(4, 7)));
        assert!(
            m.contains("ranks 7..11") && m.contains("10 positions"),
            "{m}"
        );
        // No overflow near u32::MAX.
        assert!(check_commit(10, 4, [4, 4, 4], rule(2, u32::MAX)).is_err());
        let big = MAX_PROGRAM_LEN + 1;
        assert!(msg(check_commit(10, big, [big; 3], rule(0, 0))).contains("exceed"));
    }

    #[test]
    fn gather_checks() {
        check_gather(12, 3, 4, 5, 5, 20).unwrap();
        check_gather(0, 0, 4, 2, 2, 8).unwrap(); // every row out of range: NaN rows
        check_gather(0, 3, 0, 0, 5, 0).unwrap(); // no columns: nothing to do
        let m = msg(check_gather(11, 3, 4, 5, 5, 20));
        assert!(m.contains("x holds 11"), "{m}");
        let m = msg(check_gather(12, 3, 4, 4, 5, 20));
        assert!(m.contains("rows holds 4 entries for 5"), "{m}");
        let m = msg(check_gather(12, 3, 4, 5, 5, 19));
        assert!(m.contains("out holds 19"), "{m}");
        assert!(check_gather(12, 3, u32::MAX as usize + 1, 5, 5, 20).is_err());
    }

    #[test]
    fn banned_masks() {
        assert_eq!(banned_bytes(4, &[1, 3, 1]).unwrap(), vec![0, 1, 0, 1]);
        assert!(msg(banned_bytes(4, &[4])).contains("banned id 4"));
        assert!(msg(banned_bytes(2, &[0, 1])).contains("every id"));
    }
}

//! The CPU backend's attention: the same gathered-token attention as [`super::attention`] (same
//! inputs, same visibility rule, same results within SPEC §6), computed for speed on the CPU.
//! [`super::attention::attention_tiled`] stays the CUDA kernel's twin for the kernel tests;
//! this is what [`super::CpuBackend`] runs.
//!
//! # Work
//! One work item is `(sequence, query head, query tile)`; items run in parallel (rayon) and each
//! walks its sequence's whole key list in key tiles of `tile_k` keys (no split of the keys, so
//! there is no merge), then writes its rows' outputs straight into `out` (each item holds its
//! own rows' head columns: no copy afterwards). A query tile is [`TILE_Q`] rows, or, where one
//! head's keys and values pass [`KV_STREAM_BYTES`] so that every query tile streams them from
//! beyond the mid-level cache again, as few balanced tiles of up to [`TILE_Q_STREAM`] rows as
//! the sequence needs ([`query_tile`]). Each worker keeps its buffers from item to item. Per
//! key tile, and within it per band of at most [`BAND_ROWS`] query rows (a larger tile's bands
//! each run steps 2–4 before the next starts, so a band's `Sᵀ` and accumulators stay in L1
//! while the tile's K and V wait in L2 for the next band):
//! 1. The tile's class for the query tile (the plan's key-tile summaries, as the kernel):
//!    Hidden tiles are skipped without reading K/V; full Visible tiles need no per-pair check;
//!    others get `visible` per pair.
//! 2. `Sᵀ = K·Qᵀ` through a register-blocked SIMD micro-kernel ([`pulp`]: AVX-512, AVX2+FMA or
//!    scalar, detected at run time): the query rows packed `[head_dim][rows]` once per item, K
//!    read in place from the pool (each key's row offset computed once per call, not per item),
//!    the K rows [`PREFETCH_KEYS`] ahead asked for while a block computes (software prefetch:
//!    the pool's rows are too far apart for the hardware prefetchers).
//! 3. Online softmax in base 2, vectorised over keys: scores come out scaled by
//!    `log2(e)/sqrt(head_dim)` (the packed queries carry the scale), hidden pairs −inf, tile
//!    max (four running maxima over interleaved keys), `p = 2^(s − m)` by a polynomial
//!    [`exp2_lanes`] 16 keys at a time with 16 partial sums, `acc` and `l` rescaled by
//!    `2^(m_old − m_new)` (`acc` only where that is not exactly 1).
//! 4. `acc += P·V`, again a register-blocked SIMD micro-kernel, over the tile's V rows copied
//!    once per key tile into one contiguous `[keys][head_dim]` block that every band and row
//!    block walks with one pointer. Read in place, one slot (`kv_dim` values) apart, the rows
//!    kept the product well below `Sᵀ`'s rate, even where a tile's slots were consecutive
//!    (`docs/CPU.md`).
//!
//! # Every row on its own
//! A row's result depends on its query, its sequence's keys (their order and tags) and `tile_k`
//! alone, not on the query tile it lands in: each score is one FMA chain over `head_dim` in
//! order, each `acc` element one FMA chain over the keys in order, a row's max, sum and rescales read only its own scores, and a
//! skipped (Hidden) tile changes nothing a computed one would not (its `p` would all be exact
//! zeros: `acc · 1 + 0`). Neither the rows around it (the query tile, other sequences of the
//! batch), nor the thread count changes a bit (SPEC §8; `tests/batch.rs`).

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::attention::{AttnInputs, AttnShape};
use super::lines::Lines;
use super::ops::{ROUND_TO_INT, times_pow2};
use crate::bail_input;
use crate::contract::attn::{QueryDesc, TileClass, TileSummary, key_tile_summaries};
use crate::contract::{Tag, visible};
use crate::error::Result;

/// Query rows per work item where one head's keys and values fit in the core's mid-level
/// cache (re-reading them for every query tile is cheap, and small tiles keep `Sᵀ` in L1).
pub const TILE_Q: usize = 64;

/// Most query rows per work item where one head's keys and values do not fit (see
/// [`query_tile`]).
pub const TILE_Q_STREAM: usize = 192;

/// One head's keys and values (`keys · head_dim · 8` bytes) past this are streamed from the
/// last-level cache or memory for every query tile, so fewer, larger tiles read them fewer times.
pub const KV_STREAM_BYTES: usize = 1 << 20;

/// Query rows per tile for a sequence of `rows` queries over `keys` keys: [`TILE_Q`] while one
/// head's keys and values take at most [`KV_STREAM_BYTES`]; past that, since every query tile
/// streams them once more, as few tiles of at most [`TILE_Q_STREAM`] rows as the sequence needs,
/// of balanced size (no thin last tile wasting the micro-kernels' lanes).
pub fn query_tile(rows: usize, keys: usize, head_dim: usize) -> usize {
    if keys.saturating_mul(head_dim).saturating_mul(8) <= KV_STREAM_BYTES {
        return TILE_Q;
    }
    let tiles = rows.div_ceil(TILE_Q_STREAM).max(1);
    rows.div_ceil(tiles).max(1)
}

/// Keys per key tile ([`attention_flash`] uses it; tests pass others).
pub const TILE_K: usize = 128;

/// Keys per chunk of the P·V product (their V rows and Pᵀ rows, 32 × head_dim and 32 × (query
/// rows, padded) values, stay in L1 while every row block reads them; 64 was 5–10 % slower).
const PV_KEYS: usize = 32;

/// Query rows per band of a query tile: 4 AVX-512 vectors, so a band's `Sᵀ` (128 keys × 64 rows,
/// 32 KiB) stays in L1 through the softmax and P·V. A multiple of [`LANES`].
const BAND_ROWS: usize = 64;

/// Lanes of the softmax's vector code (chunks of keys; 16 = one AVX-512 register, two AVX2).
const LANES: usize = 16;

/// Attention as [`super::attention::attention_tiled`] computes it: `out` `[rows, n_heads ·
/// head_dim]`, `lse` (optional) `[rows, n_heads]` natural-log, −inf (and a zero output) for a row
/// that sees no key. Key tiles of [`TILE_K`].
pub fn attention_flash(inp: &AttnInputs, out: &mut [f32], lse: Option<&mut [f32]>) -> Result<()> {
    attention_flash_with(inp, TILE_K, out, lse)
}

/// [`attention_flash`] with key tiles of `tile_k` keys (≥ 1).
pub fn attention_flash_with(
    inp: &AttnInputs,
    tile_k: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    attention_flash_strided(inp, inp.shape.q_dim(), tile_k, out, lse)
}

/// [`attention_flash_with`] on queries that are the first `n_heads·head_dim` values of rows of
/// `q_stride` values (the fused q|k|v matrix, read in place).
pub fn attention_flash_strided(
    inp: &AttnInputs,
    q_stride: usize,
    tile_k: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let arch = Arch::new();
    flash_on(inp, q_stride, tile_k, out, lse, &|item| arch.dispatch(item))
}

/// [`attention_flash_strided`] with each work item run by `run` (the widest instruction set the
/// CPU has, or in tests a given one).
fn flash_on(
    inp: &AttnInputs,
    q_stride: usize,
    tile_k: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    run: &(dyn Fn(Item<'_>) + Sync),
) -> Result<()> {
    inp.validate_q_stride(q_stride)?;
    if tile_k == 0 {
        bail_input!("attention: tile_k must be at least 1");
    }
    let AttnShape {
        n_heads, head_dim, ..
    } = inp.shape;
    let q_dim = inp.shape.q_dim();
    inp.check_outputs(out.len(), lse.as_ref().map(|l| l.len()))?;
    let (indptr, summaries) = key_tile_summaries(inp.kv_indptr, inp.kv_tags, tile_k);
    let mut items = Vec::new();
    for seq in 0..inp.n_seqs() {
        let rows = inp.seq_rows(seq);
        let tile_q = query_tile(rows.len(), inp.seq_keys(seq).len(), head_dim);
        for start in rows.clone().step_by(tile_q) {
            for head in 0..n_heads {
                items.push((seq, head, start..(start + tile_q).min(rows.end)));
            }
        }
    }
    // Where each key's pool row starts (its slot's first value), once for every item that
    // walks the key.
    let kv_dim = inp.shape.kv_dim();
    let key_offsets: Vec<usize> = inp
        .kv_indices
        .iter()
        .map(|&slot| slot as usize * kv_dim)
        .collect();
    // Where each item writes: its head's `head_dim` columns of its rows of `out`, and its head's
    // entry of those rows of `lse`. The items come tile by tile, heads inside, the tiles in row
    // order (the sequences' rows are consecutive), so the rows are handed out in order.
    let mut dests: Vec<(Vec<&mut [f32]>, Vec<&mut f32>)> = items
        .iter()
        .map(|(_, _, rows)| (Vec::with_capacity(rows.len()), Vec::new()))
        .collect();
    let mut out_rows = out.chunks_exact_mut(q_dim);
    let mut lse_rows = lse.map(|l| l.chunks_exact_mut(n_heads));
    let mut next_row = 0;
    for (tile_items, tile_dests) in items.chunks(n_heads).zip(dests.chunks_mut(n_heads)) {
        debug_assert_eq!(
            tile_items[0].2.start, next_row,
            "query tiles out of row order"
        );
        next_row = tile_items[0].2.end;
        for _ in tile_items[0].2.clone() {
            let row = out_rows.next().expect("validated: rows × q_dim outputs");
            for (dest, cols) in tile_dests.iter_mut().zip(row.chunks_exact_mut(head_dim)) {
                dest.0.push(cols);
            }
            if let Some(lse_rows) = lse_rows.as_mut() {
                let row = lse_rows.next().expect("validated: rows × n_heads LSEs");
                for (dest, x) in tile_dests.iter_mut().zip(row) {
                    dest.1.push(x);
                }
            }
        }
    }
    items.par_iter().zip(dests).for_each_init(
        Scratch::default,
        |scratch, ((seq, head, rows), (out_rows, lse_rows))| {
            let key_tiles = &summaries[indptr[*seq] as usize..indptr[*seq + 1] as usize];
            run(Item {
                inp,
                q_stride,
                tile_k,
                key_tiles,
                key_offsets: &key_offsets,
                seq: *seq,
                head: *head,
                rows: rows.clone(),
                scratch,
                out_rows,
                lse_rows,
            })
        },
    );
    Ok(())
}

/// One work item; it writes its rows' outputs for its head (`out_rows`, `head_dim` values each)
/// and, when asked, their natural-log LSE (`lse_rows`, empty when not).
struct Item<'a> {
    inp: &'a AttnInputs<'a>,
    /// Values per row of `inp.q`.
    q_stride: usize,
    tile_k: usize,
    /// The summaries of the sequence's key tiles.
    key_tiles: &'a [TileSummary],
    /// Where each key's pool row starts: `kv_indices[j] · kv_dim` (all sequences).
    key_offsets: &'a [usize],
    seq: usize,
    head: usize,
    rows: Range<usize>,
    scratch: &'a mut Scratch,
    out_rows: Vec<&'a mut [f32]>,
    lse_rows: Vec<&'a mut f32>,
}

/// Buffers an item needs while it runs, kept by each worker for the items it runs next (every
/// item sets what it reads before reading it). The running maxima must start at −inf: a stale
/// one makes a row that sees no key look as if it had. (`acc` and `l` would be wiped anyway by
/// the first computed tile, whose rescale factor `2^(−inf − m)` is 0, but start at 0 as well.)
#[derive(Default)]
struct Scratch {
    /// Packed `Qᵀ` (`[head_dim][ld]`).
    qt: Lines,
    /// `Sᵀ`, then `Pᵀ` (`[tile_k][ld]`).
    st: Lines,
    /// Running maximum and sum per query row (`[ld]`).
    m: Lines,
    l: Lines,
    /// The output rows' accumulators (`[rows][head_dim]`).
    acc: Lines,
    /// The key tile's V rows, copied out of the pool (`[tile_k][head_dim]`).
    vt: Lines,
}

impl WithSimd for Item<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        // Register blocks: Sᵀ MRK keys × up to NV vectors of query rows, P·V MR_PV rows × up to
        // NV vectors of columns. AVX-512 holds 6 × 4 accumulators in its 32 registers, AVX2 6 × 2
        // in its 16 (with 3 × 4 there, the four loaded vectors, the broadcast and 12
        // accumulators did not fit, and every FMA of a block went through the stack).
        match S::F32_LANES {
            16.. => item::<S, 6, 6, 4>(simd, self),
            8.. => item::<S, 6, 6, 2>(simd, self),
            _ => item::<S, 2, 2, 4>(simd, self),
        }
    }
}

/// `2^x` for each lane with `x ≤ 0` (or −inf): exactly 0 below −125, else `2^n · p(f)` with
/// `x = n + f`, `n` the nearest integer, `|f| ≤ 1/2` and `p` a degree-5 polynomial fitted to
/// `2^f` on that interval for relative error (1.1e-7 in exact arithmetic with these f32
/// coefficients, 1.6e-7 as f32 FMAs evaluate it, `tests` below) whose constant term is exactly 1,
/// so `2^0` is exactly 1.
#[inline(always)]
pub fn exp2_lanes(x: &mut [f32; LANES]) {
    // Fitted (minimax), not Taylor: the linear term is near ln 2 but not ln 2.
    #[allow(clippy::approx_constant)]
    const C: [f32; 6] = [
        1.0,
        0.693_147,
        0.240_222_42,
        0.055_507_336,
        0.009_671_513,
        0.001_326_472_7,
    ];
    for v in x.iter_mut() {
        let xc = v.max(-125.0);
        let t = xc + ROUND_TO_INT;
        let f = xc - (t - ROUND_TO_INT);
        let mut p = C[5];
        for &c in C[..5].iter().rev() {
            p = p.mul_add(f, c);
        }
        let y = times_pow2(p, t);
        *v = if *v < -125.0 { 0.0 } else { y };
    }
}

/// The `d` values of the keys' (or values') head columns in the pool: `pool[offset + col..][..d]`
/// for each of `offsets`, read in place.
#[derive(Clone, Copy)]
struct PoolRows<'a> {
    pool: &'a [f32],
    offsets: &'a [usize],
    col: usize,
}

impl<'a> PoolRows<'a> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.offsets.len()
    }

    /// The first `n` values of row `j`.
    #[inline(always)]
    fn row(&self, j: usize, n: usize) -> &'a [f32] {
        &self.pool[self.offsets[j] + self.col..][..n]
    }

    /// Rows `from..`.
    #[inline(always)]
    fn skip(self, from: usize) -> PoolRows<'a> {
        PoolRows {
            offsets: &self.offsets[from..],
            ..self
        }
    }
}

/// `S^T[j][rows] = Σ_c k_j[c] · q^T[c][rows]` for the first `MRK` keys of `ks` (in place in the
/// pool) and `NVQ` vectors of query rows from vector `v0` of the packed `qt` (`[d][nvec]`):
/// one FMA chain per element over `c` in order. Written to `st` rows `j0..` (stride `ld`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk_micro<S: Simd, const MRK: usize, const NVQ: usize>(
    simd: S,
    ks: PoolRows,
    qt: &[S::f32s],
    nvec: usize,
    v0: usize,
    d: usize,
    st: &mut [f32],
    ld: usize,
    j0: usize,
) {
    let zero = simd.splat_f32s(0.0);
    let mut regs = [[zero; NVQ]; MRK];
    let ks: [&[f32]; MRK] = std::array::from_fn(|i| ks.row(i, d));
    for c in 0..d {
        let q = &qt[c * nvec + v0..][..NVQ];
        for i in 0..MRK {
            let kb = simd.splat_f32s(ks[i][c]);
            for u in 0..NVQ {
                regs[i][u] = simd.mul_add_f32s(kb, q[u], regs[i][u]);
            }
        }
    }
    let lanes = S::F32_LANES;
    for (i, reg) in regs.iter().enumerate() {
        let dst: &mut [S::f32s] =
            bytemuck::cast_slice_mut(&mut st[(j0 + i) * ld + v0 * lanes..][..NVQ * lanes]);
        dst.copy_from_slice(reg);
    }
}

/// How far ahead of the key block it computes [`qk`]'s first pass asks the cache for K rows,
/// in keys (two blocks of 6 with AVX-512). Each key's row is one slot of the pool, so a head's
/// rows are `kv_dim` values apart and a tile of them spans many pages: the hardware prefetchers
/// do not follow them, and once one head's keys pass the mid-level cache every block waited on
/// its K rows (its first loads were a sparse 64×64 run's hottest instructions).
const PREFETCH_KEYS: usize = 12;

/// Asks the cache for the lines that `row`'s chunks of 16 values start in (a hint: no effect on
/// any value). That is every line of a row aligned to 64 bytes, as the pool's rows are when
/// `head_dim` is a multiple of 16 (the pool starts on a line: [`Lines`]); of one that is not,
/// the line holding its last values is left to the loads.
#[inline(always)]
fn prefetch_row(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: PREFETCHT0 reads no value into the program and never faults, whatever the
        // address; this one is inside `row` anyway. The intrinsic is `unsafe` only because it
        // takes a raw pointer.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// `S^T` for keys `ks` and the query-row vectors `vecs` (of `nvec` in `qt`): key blocks of
/// `MRK` then 4, 2, 1, row vectors in blocks of 4 and 3 (where `NV` allows), 2, 1. `ahead` is
/// the sequence's K rows from the tile's first key to the sequence's last: the pass over the
/// keys with the first vector (the first band's first) prefetches those [`PREFETCH_KEYS`]
/// ahead of each block, into the next tile too.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk<S: Simd, const MRK: usize, const NV: usize>(
    simd: S,
    ks: PoolRows,
    ahead: PoolRows,
    qt: &[S::f32s],
    nvec: usize,
    vecs: Range<usize>,
    d: usize,
    st: &mut [f32],
    ld: usize,
) {
    let mut v0 = vecs.start;
    macro_rules! keys {
        ($b:expr, $j0:ident, $nv:literal) => {{
            if v0 == 0 {
                let next = ($j0 + PREFETCH_KEYS).min(ahead.len());
                for j in next..(next + $b).min(ahead.len()) {
                    prefetch_row(ahead.row(j, d));
                }
            }
            qk_micro::<S, { $b }, $nv>(simd, ks.skip($j0), qt, nvec, v0, d, st, ld, $j0)
        }};
    }
    macro_rules! rows {
        ($nv:literal) => {
            while vecs.end - v0 >= $nv {
                let mut j0 = 0;
                in_blocks!(j0 < ks.len(), MRK, keys!($nv));
                v0 += $nv;
            }
        };
    }
    if NV >= 4 {
        rows!(4);
    }
    if NV >= 3 {
        rows!(3);
    }
    rows!(2);
    rows!(1);
}

/// `acc[r][cols] += Σ_j p^T[j][r] · v_j[cols]` for the `MR` rows from `r0`, `NV` vectors of
/// columns from `c0`: one FMA chain per element over the keys in order. `pt` is `[keys][ld]`,
/// `acc` rows have stride `d`; `vt` is the keys' value rows, `[keys][d]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_micro<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    pt: &[f32],
    ld: usize,
    r0: usize,
    vt: &[f32],
    acc: &mut [f32],
    d: usize,
    c0: usize,
) {
    let lanes = S::F32_LANES;
    let w = NV * lanes;
    // Loaded in a plain loop: `array::from_fn` built the block on the stack and `memmove`d it.
    let mut regs = [[simd.splat_f32s(0.0); NV]; MR];
    for (i, reg) in regs.iter_mut().enumerate() {
        let row: &[S::f32s] = bytemuck::cast_slice(&acc[(r0 + i) * d + c0..][..w]);
        reg.copy_from_slice(row);
    }
    for (v_row, p_row) in vt.chunks_exact(d).zip(pt.chunks(ld)) {
        let v: &[S::f32s] = bytemuck::cast_slice(&v_row[c0..c0 + w]);
        let p = &p_row[r0..r0 + MR];
        for i in 0..MR {
            let pb = simd.splat_f32s(p[i]);
            for u in 0..NV {
                regs[i][u] = simd.mul_add_f32s(pb, v[u], regs[i][u]);
            }
        }
    }
    for (i, reg) in regs.iter().enumerate() {
        let row: &mut [S::f32s] = bytemuck::cast_slice_mut(&mut acc[(r0 + i) * d + c0..][..w]);
        row.copy_from_slice(reg);
    }
}

/// `acc += P·V` for `rows`: vector columns in blocks of 4 (where `NV` allows), 2, 1 vectors,
/// rows in blocks of `MR` then 4, 2, 1, the columns past the last whole vector by scalar FMAs
/// (the same chain).
#[inline(always)]
fn pv<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    pt: &[f32],
    ld: usize,
    rows: Range<usize>,
    vt: &[f32],
    acc: &mut [f32],
    d: usize,
) {
    // Keys in chunks whose V rows (and Pᵀ rows) stay in L1 while every row block reads them;
    // each element's chain still runs over the keys in order, chunk after chunk.
    let n = vt.len() / d;
    for k0 in (0..n).step_by(PV_KEYS) {
        let vt = &vt[k0 * d..(k0 + PV_KEYS).min(n) * d];
        pv_chunk::<S, MR, NV>(simd, &pt[k0 * ld..], ld, rows.clone(), vt, acc, d);
    }
}

/// [`pv`] for one chunk of keys (`pt` starts at the chunk's first key).
#[inline(always)]
fn pv_chunk<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    pt: &[f32],
    ld: usize,
    rows: Range<usize>,
    vt: &[f32],
    acc: &mut [f32],
    d: usize,
) {
    let lanes = S::F32_LANES;
    let mut c0 = 0;
    macro_rules! block {
        ($b:expr, $r0:ident, $nv:literal) => {
            pv_micro::<S, { $b }, $nv>(simd, pt, ld, $r0, vt, acc, d, c0)
        };
    }
    macro_rules! cols {
        ($nv:literal) => {
            while c0 + $nv * lanes <= d {
                let mut r0 = rows.start;
                in_blocks!(r0 < rows.end, MR, block!($nv));
                c0 += $nv * lanes;
            }
        };
    }
    if NV >= 4 {
        cols!(4);
    }
    cols!(2);
    cols!(1);
    if c0 < d {
        for r in rows {
            let acc_row = &mut acc[r * d..][..d];
            for (j, v_row) in vt.chunks_exact(d).enumerate() {
                let p = pt[j * ld + r];
                for (a, &v) in acc_row[c0..].iter_mut().zip(&v_row[c0..d]) {
                    *a = p.mul_add(v, *a);
                }
            }
        }
    }
}

/// The maximum over a tile's keys (the rows of `st`, stride `ld`) of lanes `lane0..+LANES`: four
/// running maxima over interleaved keys, so consecutive keys do not wait on one another (a
/// maximum is exact, so the order does not change it).
#[inline(always)]
fn tile_max(st: &[f32], ld: usize, lane0: usize) -> [f32; LANES] {
    #[inline(always)]
    fn fold(m: &mut [f32; LANES], row: &[f32]) {
        for (a, &b) in m.iter_mut().zip(&row[..LANES]) {
            *a = if b > *a { b } else { *a };
        }
    }
    let mut m = [[f32::NEG_INFINITY; LANES]; 4];
    let mut quads = st.chunks_exact(4 * ld);
    for quad in &mut quads {
        for (q, m) in m.iter_mut().enumerate() {
            fold(m, &quad[q * ld + lane0..]);
        }
    }
    for row in quads.remainder().chunks_exact(ld) {
        fold(&mut m[0], &row[lane0..]);
    }
    let [mut a, b, c, e] = m;
    for other in [b, c, e] {
        fold(&mut a, &other);
    }
    a
}

#[inline(always)]
fn item<S: Simd, const MRK: usize, const MR_PV: usize, const NV: usize>(simd: S, it: Item) {
    let Item {
        inp,
        q_stride,
        tile_k,
        key_tiles,
        key_offsets,
        seq,
        head,
        rows,
        scratch,
        mut out_rows,
        mut lse_rows,
    } = it;
    let d = inp.shape.head_dim;
    let kv_col = head / inp.shape.group() * d;
    let scale_log2 = (d as f32).sqrt().recip() * std::f32::consts::LOG2_E;
    let n_rows = rows.len();
    let q_tags: &[Tag] = &inp.row_tags[rows.clone()];
    let q_desc = QueryDesc::new(&TileSummary::of(q_tags), inp.joint);
    let keys = inp.seq_keys(seq);

    let lanes = S::F32_LANES;
    // Query rows padded to whole LANES chunks (and whole vectors); padded rows are zero queries
    // whose lanes are computed and never read.
    let ld = n_rows.div_ceil(LANES.max(lanes)) * LANES.max(lanes);
    let nvec = ld / lanes;
    let Scratch {
        qt,
        st,
        m,
        l,
        acc,
        vt,
    } = scratch;
    // Qᵀ packed `[d][ld]`, scaled by `log2(e)/sqrt(d)` so scores come out in base 2; written a
    // column at a time (contiguous stores, the strided side is the loads).
    let qt = qt.refill(d * ld, 0.0);
    let q_rows = &inp.q[rows.start * q_stride + head * d..];
    for (c, qt_c) in qt.chunks_exact_mut(ld).enumerate() {
        for (i, x) in qt_c[..n_rows].iter_mut().enumerate() {
            *x = q_rows[i * q_stride + c] * scale_log2;
        }
    }
    let qt: &[S::f32s] = bytemuck::cast_slice(qt);
    // Sᵀ, then Pᵀ: `[tile_k][ld]`.
    let st = st.reuse(tile_k * ld);
    let m = m.refill(ld, f32::NEG_INFINITY);
    let l = l.refill(ld, 0.0);
    let acc = acc.refill(n_rows * d, 0.0);
    let pool_rows = |tile: Range<usize>, pool| PoolRows {
        pool,
        offsets: &key_offsets[tile],
        col: kv_col,
    };

    for (t, k0) in keys.clone().step_by(tile_k).enumerate() {
        let tile = k0..(k0 + tile_k).min(keys.end);
        let n_keys = tile.len();
        let class = q_desc.classify(&key_tiles[t]);
        if class == TileClass::Hidden {
            continue;
        }
        let k_tags = &inp.kv_tags[tile.clone()];
        let st = &mut st[..n_keys * ld];
        // The tile's V rows, copied once into one contiguous block that every band's P·V walks
        // with a single pointer.
        let v_rows = pool_rows(tile.clone(), inp.v_pool);
        let vt = vt.reuse(n_keys * d);
        for (j, dst) in vt.chunks_exact_mut(d).enumerate() {
            dst.copy_from_slice(v_rows.row(j, d));
        }
        let vt = &*vt;
        // The query rows in bands of BAND_ROWS, each taken through the whole tile before the
        // next: its part of Sᵀ and its accumulators stay in L1, while the tile's K and V wait in
        // L2 for the next band.
        for band in (0..ld).step_by(BAND_ROWS) {
            let band = band..(band + BAND_ROWS).min(ld);
            let live = band.start.min(n_rows)..band.end.min(n_rows);
            // Sᵀ = K·Qᵀ, K read in place.
            qk::<S, MRK, NV>(
                simd,
                pool_rows(tile.clone(), inp.k_pool),
                pool_rows(tile.start..keys.end, inp.k_pool),
                qt,
                nvec,
                band.start / lanes..band.end / lanes,
                d,
                st,
                ld,
            );
            // Hidden pairs −inf (a Visible tile has none).
            if class != TileClass::Visible {
                for (st_j, &kt) in st.chunks_exact_mut(ld).zip(k_tags) {
                    for (x, &qt) in st_j[live.clone()].iter_mut().zip(&q_tags[live.clone()]) {
                        if !visible(qt, kt, inp.joint) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            // Online softmax, LANES rows at a time, each lane its own row; Sᵀ becomes Pᵀ.
            for ch in band.start / LANES..band.end / LANES {
                let lane0 = ch * LANES;
                let mt = tile_max(st, ld, lane0);
                let m_old: [f32; LANES] = m[lane0..lane0 + LANES].try_into().expect("LANES");
                let mut m_new = [0.0f32; LANES];
                let mut m_use = [0.0f32; LANES];
                let mut alpha = [0.0f32; LANES];
                for i in 0..LANES {
                    m_new[i] = m_old[i].max(mt[i]);
                    // A row that has seen nothing yet: p = 2^(−inf − 0) = 0, never NaN.
                    m_use[i] = if m_new[i] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        m_new[i]
                    };
                    alpha[i] = m_old[i] - m_use[i];
                }
                // 2^0 is exactly 1: a row with nothing visible here keeps its state bit for bit.
                exp2_lanes(&mut alpha);
                let mut sum = [0.0f32; LANES];
                for st_j in st.chunks_exact_mut(ld) {
                    let p: &mut [f32; LANES] =
                        (&mut st_j[lane0..lane0 + LANES]).try_into().expect("LANES");
                    for (x, &mu) in p.iter_mut().zip(&m_use) {
                        *x -= mu;
                    }
                    exp2_lanes(p);
                    for (a, &b) in sum.iter_mut().zip(p.iter()) {
                        *a += b;
                    }
                }
                for i in 0..LANES {
                    l[lane0 + i] = l[lane0 + i] * alpha[i] + sum[i];
                    m[lane0 + i] = m_new[i];
                    // `acc · 1` is `acc`: most tiles leave a row's maximum where it was.
                    if lane0 + i < n_rows && alpha[i] != 1.0 {
                        acc[(lane0 + i) * d..][..d]
                            .iter_mut()
                            .for_each(|a| *a *= alpha[i]);
                    }
                }
            }
            // acc += P·V.
            pv::<S, MR_PV, NV>(simd, st, ld, live, vt, acc, d);
        }
    }

    // Normalise into the output. `l ≥ 1` whenever a key was visible (its own term is 2^0); a
    // row that saw no key gets zeros and an LSE of −inf.
    for (r, out_row) in out_rows.iter_mut().enumerate() {
        let lse2 = if m[r] == f32::NEG_INFINITY {
            out_row.fill(0.0);
            f32::NEG_INFINITY
        } else {
            let inv_l = l[r].recip();
            for (o, &a) in out_row.iter_mut().zip(&acc[r * d..][..d]) {
                *o = a * inv_l;
            }
            m[r] + l[r].log2()
        };
        if let Some(x) = lse_rows.get_mut(r) {
            **x = lse2 * std::f32::consts::LN_2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Branch;
    use rand::{Rng, SeedableRng};

    /// Every instruction set pulp may pick computes the same bits (one FMA chain per element,
    /// the softmax on plain arrays), the scalar and AVX2 register blocks included, which an
    /// AVX-512 host never dispatches to: three sequences of random tags (hidden pairs, rows that
    /// see nothing), GQA, key tiles of 61 (blocks of 6 keys, then 1), a sequence whose K/V pass
    /// [`KV_STREAM_BYTES`] (one query tile of 150 rows: bands of 64, 64 and 32), a head width
    /// whose last columns take the scalar tail on AVX-512.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 72,
        };
        let (rows, keys) = ([150usize, 37, 150], [300usize, 90, 1900]);
        assert_eq!(query_tile(rows[2], keys[2], shape.head_dim), rows[2]);
        let tag = |rng: &mut rand_chacha::ChaCha8Rng| {
            let branch = if rng.gen_bool(0.5) {
                Branch::Image
            } else {
                Branch::Text
            };
            Tag::new(branch, rng.gen_range(0..4), rng.gen_bool(0.3))
        };
        let n_rows: usize = rows.iter().sum();
        let n_keys: usize = keys.iter().sum();
        let slots = n_keys + 7;
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let q = values(n_rows * shape.q_dim());
        let k_pool = values(slots * shape.kv_dim());
        let v_pool = values(slots * shape.kv_dim());
        let row_tags: Vec<Tag> = (0..n_rows).map(|_| tag(&mut rng)).collect();
        // The second sequence's keys are all masked image keys of block 3: its text rows and
        // its unmasked rows see none of them.
        let kv_tags: Vec<Tag> = (0..n_keys)
            .map(|j| {
                if (keys[0]..keys[0] + keys[1]).contains(&j) {
                    Tag::new(Branch::Image, 3, true)
                } else {
                    tag(&mut rng)
                }
            })
            .collect();
        let mut kv_indices: Vec<u32> = (0..slots as u32).collect();
        for i in (1..kv_indices.len()).rev() {
            kv_indices.swap(i, rng.gen_range(0..=i));
        }
        kv_indices.truncate(n_keys);
        let indptr = |n: [usize; 3]| {
            [
                0,
                n[0] as u32,
                (n[0] + n[1]) as u32,
                n.iter().sum::<usize>() as u32,
            ]
        };
        let (seq_indptr, kv_indptr) = (indptr(rows), indptr(keys));
        let inp = AttnInputs {
            q: &q,
            row_tags: &row_tags,
            seq_indptr: &seq_indptr,
            k_pool: &k_pool,
            v_pool: &v_pool,
            kv_indptr: &kv_indptr,
            kv_indices: &kv_indices,
            kv_tags: &kv_tags,
            joint: false,
            shape,
        };
        let run = |with: &(dyn Fn(Item<'_>) + Sync)| {
            let mut out = vec![f32::NAN; n_rows * shape.q_dim()];
            let mut lse = vec![f32::NAN; n_rows * shape.n_heads];
            flash_on(&inp, shape.q_dim(), 61, &mut out, Some(&mut lse), with).unwrap();
            (out, lse)
        };
        let want = run(&|item| Arch::new().dispatch(item));
        assert!(
            want.1.contains(&f32::NEG_INFINITY),
            "no row that sees nothing"
        );
        assert!(
            want.1.iter().any(|x| x.is_finite()),
            "no row that sees a key"
        );
        assert_eq!(
            run(&|item| item.with_simd(pulp::Scalar::new())),
            want,
            "scalar"
        );
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(v3) = pulp::x86::V3::try_new() {
                assert_eq!(run(&|item| item.with_simd(v3)), want, "AVX2");
            }
            if let Some(v4) = pulp::x86::V4::try_new() {
                assert_eq!(run(&|item| item.with_simd(v4)), want, "AVX-512");
            }
        }
    }

    /// `exp2_lanes` against f64 `exp2` over a sweep of `[−125, 0]` (and each lane of a chunk
    /// alike): relative error below 2e-7; exactly 1 at 0, exactly 0 below −125 and at −inf.
    #[test]
    fn exp2_lanes_is_within_2e_7_and_exact_at_the_ends() {
        let mut worst = 0.0f64;
        let n = 1 << 20;
        for chunk in (0..=n).collect::<Vec<_>>().chunks(LANES) {
            let mut x = [0.0f32; LANES];
            for (x, &i) in x.iter_mut().zip(chunk) {
                *x = -125.0 * i as f32 / n as f32;
            }
            let want = x.map(|x| (x as f64).exp2());
            exp2_lanes(&mut x);
            for (&got, &want) in x.iter().zip(&want).take(chunk.len()) {
                worst = worst.max((got as f64 - want).abs() / want);
            }
        }
        assert!(worst < 2e-7, "relative error {worst}");
        let mut x = [0.0f32; LANES];
        x[1] = -125.5;
        x[2] = f32::NEG_INFINITY;
        x[3] = -1e30;
        x[4] = -0.5;
        exp2_lanes(&mut x);
        assert_eq!(x[0], 1.0);
        assert_eq!(&x[1..4], &[0.0; 3]);
        assert!((x[4] as f64 - 0.5f64.sqrt()).abs() < 2e-7);
    }
}

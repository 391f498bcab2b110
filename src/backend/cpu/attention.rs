//! Tiled split-KV attention over a K/V pool, the CPU twin of the CUDA kernel (SPEC §5,
//! "gathered-token attention").
//!
//! # Data
//! The queries are the rows of one branch, sorted by sequence (`seq_indptr`). Keys and values live
//! in a pool of slots (`[slots, n_kv_heads·head_dim]` each); sequence `s` attends over the slots
//! `kv_indices[kv_indptr[s]..kv_indptr[s+1]]`, whose tags are `kv_tags` at the same positions.
//! Keys are gathered through the index list, never copied into a contiguous buffer (paged
//! attention with page size 1). Visibility is [`crate::contract::visible`] (SPEC §3) on the tags.
//!
//! # Work decomposition (one CUDA block = one work item)
//! A work item is `(query tile, head, split)`:
//! - a *query tile* is up to `tile_q` consecutive rows of one sequence (tiles never cross a
//!   sequence boundary, so every row of a tile reads the same key list);
//! - the sequence's key list is cut into `n_splits` contiguous chunks of `chunk` keys, `chunk`
//!   being `ceil(n_keys / n_splits)` rounded up to a multiple of `tile_k` (so only a split's last
//!   tile is partial); splits past the end are empty;
//! - the item owns the query tile's rows for one query head, walks its chunk in key tiles of
//!   `tile_k` keys, and writes one *partial* per row: `o_i = acc / l` and `lse2_i = m + log2 l`,
//!   or "empty" (`lse2_i = −inf`) if the chunk held no key visible to the row.
//!
//! Query head `h` reads K/V head `h / (n_heads / n_kv_heads)` (GQA).
//!
//! # Per key tile
//! 1. Classify the (query tile, key tile) pair as the kernel does: the key tile's summary comes
//!    from the plan's table ([`key_tile_summaries`], entry `ktile_indptr[seq] + split start /
//!    tile_k + i` for the split's tile `i`), the query tile's from its rows' tags, once per work
//!    item ([`QueryDesc`]); [`QueryDesc::classify`] proves the rule sound. Hidden: skip the tile,
//!    reading no K/V. Visible with a full tile (`tile_k` keys): no per-pair checks. Otherwise
//!    (Mixed, or the sequence's partial last tile): evaluate `visible` per pair and set hidden
//!    scores to −inf.
//! 2. Scores in base 2 with the softmax scale folded in:
//!    `s2 = (q·k) · (1/sqrt(head_dim)) · log2(e)`.
//! 3. Online softmax per row: `m_new = max(m, max_j s2_j)`; `acc` and `l` are rescaled by
//!    `exp2(m − m_new)`, then `p_j = exp2(s2_j − m_new)`, `l += Σ p_j`, `acc += Σ p_j·v_j`.
//!    A row with no visible key in the tile leaves its state untouched.
//!
//! # Merge (a second kernel on the GPU, or the split-0 block after a grid sync)
//! Per row and head, over the non-empty splits in split order:
//! `lse2 = log2 Σ 2^{lse2_i}` (computed relative to the largest `lse2_i`) and
//! `o = Σ 2^{lse2_i − lse2} · o_i`. No non-empty split: `o = 0`, `lse = −inf` (never NaN).
//! The reported `lse` is natural-log: `lse2 · ln 2`.
//!
//! Work items run in parallel (rayon) and each computes sequentially; the merge visits splits in
//! a fixed order, so the output is bitwise independent of the thread count.

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::cpu::ops::gemm_block;
use crate::bail_input;
use crate::contract::attn::{QueryDesc, TileClass, TileSummary, check_indptr, key_tile_summaries};
use crate::contract::{Tag, visible};
use crate::error::Result;

/// The call's geometry and tiling, the kernel's formats ([`crate::contract::attn`]).
pub use crate::contract::{AttnShape, AttnTiling};

/// The inputs of one attention call: the queries of one branch and the pool.
#[derive(Debug, Clone, Copy)]
pub struct AttnInputs<'a> {
    /// Queries, `[rows, n_heads·head_dim]`, head-major within a row.
    pub q: &'a [f32],
    /// Tag of each query row.
    pub row_tags: &'a [Tag],
    /// `n_seqs + 1` offsets: rows of sequence `s` are `seq_indptr[s]..seq_indptr[s+1]`.
    pub seq_indptr: &'a [u32],
    /// Keys, `[slots, n_kv_heads·head_dim]`.
    pub k_pool: &'a [f32],
    /// Values, same shape as `k_pool`.
    pub v_pool: &'a [f32],
    /// `n_seqs + 1` offsets into `kv_indices`.
    pub kv_indptr: &'a [u32],
    /// Pool slot of each key.
    pub kv_indices: &'a [u32],
    /// Tag of each key (parallel to `kv_indices`).
    pub kv_tags: &'a [Tag],
    /// Cross-branch (joint) layer: branches see each other.
    pub joint: bool,
    /// Head geometry.
    pub shape: AttnShape,
}

impl AttnInputs<'_> {
    /// Query rows.
    pub fn rows(&self) -> usize {
        self.row_tags.len()
    }

    /// Sequences (one less than the length of `seq_indptr`).
    pub fn n_seqs(&self) -> usize {
        self.seq_indptr.len().saturating_sub(1)
    }

    /// Rows of sequence `s`.
    pub fn seq_rows(&self, s: usize) -> Range<usize> {
        self.seq_indptr[s] as usize..self.seq_indptr[s + 1] as usize
    }

    /// Positions in `kv_indices` / `kv_tags` of sequence `s`'s keys.
    pub fn seq_keys(&self, s: usize) -> Range<usize> {
        self.kv_indptr[s] as usize..self.kv_indptr[s + 1] as usize
    }

    /// Checks every length, that every index is < slots, head divisibility; Error::Input naming
    /// what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.validate_q_stride(self.shape.q_dim())
    }

    /// Refuses an `out` of other than `rows × n_heads·head_dim` values, or an `lse` of other
    /// than `rows × n_heads` (the outputs of every attention over these inputs).
    pub fn check_outputs(&self, out: usize, lse: Option<usize>) -> Result<()> {
        let (rows, n_heads, q_dim) = (self.rows(), self.shape.n_heads, self.shape.q_dim());
        if out != rows * q_dim {
            bail_input!("attention: out has {out} values, expected rows {rows} × {q_dim}");
        }
        if let Some(lse) = lse
            && lse != rows * n_heads
        {
            bail_input!(
                "attention: lse has {lse} values, expected rows {rows} × n_heads {n_heads}"
            );
        }
        Ok(())
    }

    /// [`Self::validate`] for queries that are the first `n_heads·head_dim` values of rows of
    /// `q_stride` values (`q` may be the fused q|k|v matrix).
    pub fn validate_q_stride(&self, q_stride: usize) -> Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = self.shape;
        if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 {
            bail_input!("attention: shape {:?} has a zero dimension", self.shape);
        }
        if n_heads % n_kv_heads != 0 {
            bail_input!(
                "attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
            );
        }
        let rows = self.rows();
        if q_stride < self.shape.q_dim() || Some(self.q.len()) != rows.checked_mul(q_stride) {
            bail_input!(
                "attention: q has {} values, expected rows {rows} × {q_stride} (n_heads·head_dim {} first)",
                self.q.len(),
                self.shape.q_dim()
            );
        }
        check_indptr("attention", "seq_indptr", self.seq_indptr, rows)?;
        check_indptr(
            "attention",
            "kv_indptr",
            self.kv_indptr,
            self.kv_indices.len(),
        )?;
        if self.kv_indptr.len() != self.seq_indptr.len() {
            bail_input!(
                "attention: kv_indptr has {} entries but seq_indptr has {}",
                self.kv_indptr.len(),
                self.seq_indptr.len()
            );
        }
        if self.kv_tags.len() != self.kv_indices.len() {
            bail_input!(
                "attention: kv_tags has {} entries but kv_indices has {}",
                self.kv_tags.len(),
                self.kv_indices.len()
            );
        }
        let kv_dim = self.shape.kv_dim();
        if !self.k_pool.len().is_multiple_of(kv_dim) {
            bail_input!(
                "attention: k_pool has {} values, not a multiple of n_kv_heads·head_dim {kv_dim}",
                self.k_pool.len()
            );
        }
        if self.v_pool.len() != self.k_pool.len() {
            bail_input!(
                "attention: v_pool has {} values but k_pool has {}",
                self.v_pool.len(),
                self.k_pool.len()
            );
        }
        let slots = self.k_pool.len() / kv_dim;
        if let Some((i, &slot)) = self
            .kv_indices
            .iter()
            .enumerate()
            .find(|&(_, &slot)| slot as usize >= slots)
        {
            bail_input!(
                "attention: kv_indices[{i}] = {slot} is not below the pool's {slots} slots"
            );
        }
        Ok(())
    }
}

/// Up to `tile_q` consecutive rows of one sequence.
#[derive(Debug, Clone)]
struct QueryTile {
    seq: usize,
    rows: Range<usize>,
}

/// Cuts each sequence's rows into tiles of `tile_q` (tiles never cross a sequence boundary).
fn query_tiles(inp: &AttnInputs, tile_q: usize) -> Vec<QueryTile> {
    let mut tiles = Vec::new();
    for seq in 0..inp.n_seqs() {
        let rows = inp.seq_rows(seq);
        for start in rows.clone().step_by(tile_q) {
            tiles.push(QueryTile {
                seq,
                rows: start..(start + tile_q).min(rows.end),
            });
        }
    }
    tiles
}

/// What one work item writes for its rows: `o` (`[tile rows, head_dim]`, normalised) and the
/// base-2 LSE per row, −inf for a row that saw no visible key (its `o` is then zero, unused).
struct Partial {
    o: Vec<f32>,
    lse2: Vec<f32>,
}

/// The key tiles of every sequence: `ktile_indptr` and a summary per tile (the plan's tables).
struct KeyTiles {
    indptr: Vec<u32>,
    summaries: Vec<TileSummary>,
}

/// One work item: the rows of `tile`, query head `head`, the keys of split `split`.
fn attend_split(
    inp: &AttnInputs,
    tiling: AttnTiling,
    key_tiles: &KeyTiles,
    tile: &QueryTile,
    head: usize,
    split: usize,
) -> Partial {
    let d = inp.shape.head_dim;
    let (q_dim, kv_dim) = (inp.shape.q_dim(), inp.shape.kv_dim());
    let kv_head = head / inp.shape.group();
    let scale_log2 = (d as f32).sqrt().recip() * std::f32::consts::LOG2_E;
    let n_rows = tile.rows.len();
    let q_tags = &inp.row_tags[tile.rows.clone()];
    let q_desc = QueryDesc::new(&TileSummary::of(q_tags), inp.joint);
    let q_row = |r: usize| &inp.q[(tile.rows.start + r) * q_dim + head * d..][..d];

    let seq_keys = inp.seq_keys(tile.seq);
    let split_keys = tiling.split_range(seq_keys.len(), split);
    let keys = seq_keys.start + split_keys.start..seq_keys.start + split_keys.end;
    // Split starts are multiples of tile_k, so the split's tiles are the sequence's from here.
    let first_tile = key_tiles.indptr[tile.seq] as usize + split_keys.start / tiling.tile_k;

    // Running state per row: max `m` (base 2), sum `l`, unnormalised accumulator `acc`.
    let mut m = vec![f32::NEG_INFINITY; n_rows];
    let mut l = vec![0.0f32; n_rows];
    let mut acc = vec![0.0f32; n_rows * d];
    // The query tile of this head, and per key tile the gathered K (`[n_keys, d]`), Vᵀ
    // (`[d, n_keys]`) and scores/probabilities (`[n_rows, n_keys]`): shared memory on the GPU.
    let mut q_tile = Vec::with_capacity(n_rows * d);
    for r in 0..n_rows {
        q_tile.extend_from_slice(q_row(r));
    }
    let mut k_tile = vec![0.0f32; tiling.tile_k * d];
    let mut vt_tile = vec![0.0f32; d * tiling.tile_k];
    let mut s = vec![0.0f32; n_rows * tiling.tile_k];

    for (i, k0) in keys.clone().step_by(tiling.tile_k).enumerate() {
        let tile_keys = k0..(k0 + tiling.tile_k).min(keys.end);
        let n_keys = tile_keys.len();
        let k_tags = &inp.kv_tags[tile_keys.clone()];
        let class = q_desc.classify(&key_tiles.summaries[first_tile + i]);
        if class == TileClass::Hidden {
            continue;
        }
        // The kernel's fast path needs a full tile; the partial last tile is masked per pair.
        let unmasked = class == TileClass::Visible && n_keys == tiling.tile_k;
        // Gather the tile through the index list (cp.async on the GPU; the pool is never copied
        // whole).
        let slots = &inp.kv_indices[tile_keys];
        let (k_tile, vt_tile, s) = (
            &mut k_tile[..n_keys * d],
            &mut vt_tile[..d * n_keys],
            &mut s[..n_rows * n_keys],
        );
        for (j, &slot) in slots.iter().enumerate() {
            let base = slot as usize * kv_dim + kv_head * d;
            k_tile[j * d..][..d].copy_from_slice(&inp.k_pool[base..][..d]);
            for (c, &v) in inp.v_pool[base..][..d].iter().enumerate() {
                vt_tile[c * n_keys + j] = v;
            }
        }

        // S = Q·Kᵀ, scaled to base 2; hidden pairs of a Mixed tile get −inf.
        gemm_block(&q_tile, n_rows, d, k_tile, n_keys, s, false);
        for r in 0..n_rows {
            for j in 0..n_keys {
                let shown = unmasked || visible(q_tags[r], k_tags[j], inp.joint);
                let x = &mut s[r * n_keys + j];
                *x = if shown {
                    *x * scale_log2
                } else {
                    f32::NEG_INFINITY
                };
            }
        }

        // Online softmax: S becomes P = 2^(S − m_new), `l` and `acc` are rescaled; then
        // acc += P·V. Hidden keys have p = 0 exactly and are still multiplied in, as the
        // tensor-core P·V product does.
        for r in 0..n_rows {
            let s_row = &mut s[r * n_keys..][..n_keys];
            let m_tile = s_row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_new = m[r].max(m_tile);
            if m_new == f32::NEG_INFINITY {
                // Nothing visible yet: p = 0 for the whole row (2^(−inf − −inf) would be NaN).
                s_row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let alpha = (m[r] - m_new).exp2();
            l[r] *= alpha;
            acc[r * d..][..d].iter_mut().for_each(|a| *a *= alpha);
            for x in s_row.iter_mut() {
                *x = (*x - m_new).exp2();
                l[r] += *x;
            }
            m[r] = m_new;
        }
        gemm_block(s, n_rows, n_keys, vt_tile, d, &mut acc, true);
    }

    // Epilogue: normalise. `l >= 1` whenever a visible key was seen (its own term is 2^0).
    let mut lse2 = vec![f32::NEG_INFINITY; n_rows];
    for r in 0..n_rows {
        if m[r] == f32::NEG_INFINITY {
            continue;
        }
        let inv_l = l[r].recip();
        acc[r * d..][..d].iter_mut().for_each(|a| *a *= inv_l);
        lse2[r] = m[r] + l[r].log2();
    }
    Partial { o: acc, lse2 }
}

/// Tiled split-KV attention. out: [rows, n_heads*head_dim]; lse (optional): [rows, n_heads],
/// natural-log log-sum-exp of the scaled scores over visible keys (−inf for a hidden row).
/// See the module docs for the algorithm.
pub fn attention_tiled(
    inp: &AttnInputs,
    tiling: AttnTiling,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    inp.validate()?;
    tiling.validate()?;
    let (rows, n_heads, n_splits) = (inp.rows(), inp.shape.n_heads, tiling.n_splits);
    let (d, q_dim) = (inp.shape.head_dim, inp.shape.q_dim());
    inp.check_outputs(out.len(), lse.as_ref().map(|l| l.len()))?;

    // Work item `(t, h, sp)` has index `(t·n_heads + h)·n_splits + sp`.
    let tiles = query_tiles(inp, tiling.tile_q);
    let (indptr, summaries) = key_tile_summaries(inp.kv_indptr, inp.kv_tags, tiling.tile_k);
    let key_tiles = KeyTiles { indptr, summaries };
    let partials: Vec<Partial> = (0..tiles.len() * n_heads * n_splits)
        .into_par_iter()
        .map(|item| {
            let (tile, head, split) = (
                item / (n_heads * n_splits),
                item / n_splits % n_heads,
                item % n_splits,
            );
            attend_split(inp, tiling, &key_tiles, &tiles[tile], head, split)
        })
        .collect();

    // Merge, one task per row; row `r` is row `r - tiles[t].rows.start` of tile `t`.
    let mut row_tile = vec![(0usize, 0usize); rows];
    for (t, tile) in tiles.iter().enumerate() {
        for r in tile.rows.clone() {
            row_tile[r] = (t, r - tile.rows.start);
        }
    }
    let mut lse2 = vec![f32::NEG_INFINITY; rows * n_heads];
    out.par_chunks_mut(q_dim)
        .zip(lse2.par_chunks_mut(n_heads))
        .zip(row_tile.par_iter())
        .for_each(|((out_row, lse2_row), &(t, i))| {
            for h in 0..n_heads {
                let splits = &partials[(t * n_heads + h) * n_splits..][..n_splits];
                let o = &mut out_row[h * d..][..d];
                lse2_row[h] = merge_splits(splits, i, d, o);
            }
        });
    if let Some(lse) = lse {
        for (dst, &l2) in lse.iter_mut().zip(&lse2) {
            *dst = l2 * std::f32::consts::LN_2;
        }
    }
    Ok(())
}

/// Merges row `i` of the split partials into `o` by LSE weight; returns the base-2 LSE (−inf,
/// with `o` zeroed, when no split saw a visible key).
fn merge_splits(splits: &[Partial], i: usize, d: usize, o: &mut [f32]) -> f32 {
    o.fill(0.0);
    let max = splits
        .iter()
        .map(|p| p.lse2[i])
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f32 = splits.iter().map(|p| (p.lse2[i] - max).exp2()).sum();
    let lse2 = max + sum.log2();
    for p in splits.iter().filter(|p| p.lse2[i] != f32::NEG_INFINITY) {
        let w = (p.lse2[i] - lse2).exp2();
        for (dst, &src) in o.iter_mut().zip(&p.o[i * d..][..d]) {
            *dst += w * src;
        }
    }
    lse2
}

/// Naive f64 oracle: for each row and head, scores over every visible key of its sequence,
/// softmax, weighted V sum. Returns `(out [rows, n_heads·head_dim], lse [rows, n_heads])` in
/// f64, `lse` natural-log; a row with no visible key gets zeros and −inf. Used by tests (public
/// so the crate's integration tests and, later, GPU tests can use it).
pub fn attention_naive(inp: &AttnInputs) -> Result<(Vec<f64>, Vec<f64>)> {
    inp.validate()?;
    let AttnShape {
        n_heads, head_dim, ..
    } = inp.shape;
    let (q_dim, kv_dim, group) = (inp.shape.q_dim(), inp.shape.kv_dim(), inp.shape.group());
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = vec![0.0f64; inp.rows() * q_dim];
    let mut lse = vec![f64::NEG_INFINITY; inp.rows() * n_heads];
    for seq in 0..inp.n_seqs() {
        let keys = inp.seq_keys(seq);
        for r in inp.seq_rows(seq) {
            for h in 0..n_heads {
                let q = &inp.q[r * q_dim + h * head_dim..][..head_dim];
                let col = (h / group) * head_dim;
                let mut scored = Vec::new();
                for j in keys.clone() {
                    if !visible(inp.row_tags[r], inp.kv_tags[j], inp.joint) {
                        continue;
                    }
                    let slot = inp.kv_indices[j] as usize;
                    let k = &inp.k_pool[slot * kv_dim + col..][..head_dim];
                    let score: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    scored.push((score * scale, slot));
                }
                if scored.is_empty() {
                    continue;
                }
                let max = scored.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scored.iter().map(|s| (s.0 - max).exp()).sum();
                lse[r * n_heads + h] = max + sum.ln();
                let o = &mut out[r * q_dim + h * head_dim..][..head_dim];
                for &(score, slot) in &scored {
                    let w = (score - max).exp() / sum;
                    let v = &inp.v_pool[slot * kv_dim + col..][..head_dim];
                    for (dst, &x) in o.iter_mut().zip(v) {
                        *dst += w * x as f64;
                    }
                }
            }
        }
    }
    Ok((out, lse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_cover_the_keys_once_in_order() {
        for n_keys in 0..40 {
            for tile_k in 1..7 {
                for n_splits in 1..9 {
                    let tiling = AttnTiling {
                        tile_q: 1,
                        tile_k,
                        n_splits,
                    };
                    let mut next = 0;
                    for split in 0..n_splits {
                        let r = tiling.split_range(n_keys, split);
                        assert_eq!(r.start, next, "{tiling:?} n_keys {n_keys}");
                        assert!(r.end <= n_keys);
                        if r.end < n_keys {
                            assert_eq!(r.len() % tile_k, 0, "only the last tile is partial");
                        }
                        next = r.end;
                    }
                    assert_eq!(next, n_keys, "{tiling:?}");
                }
            }
        }
    }
}

//! The attention call's formats: head geometry ([`AttnShape`]), the ragged CSR layout of rows
//! and keys ([`AttnLayout`]), the query tiling and the split-KV rule ([`AttnTiling`],
//! [`query_tiles`], [`choose_splits`], and `split_chunk` in [`super::abi`]): what the host
//! plans, both for `sl_attention_hd{64,128}` and for its CPU twin.

use std::ops::Range;

use crate::contract::tags::Tag;
use crate::error::{Error, Result};

fn bad<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("{op}: {msg}")))
}

/// `v` as a u32 kernel argument, or an error naming it.
fn to_u32(op: &str, name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).or_else(|_| bad(op, format_args!("{name} = {v} does not fit in u32")))
}

/// Head geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// K/V heads; divides `n_heads` (GQA).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of a query (and output) row: `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of a pool slot: `n_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Tile sizes and split count (parameters so tests can sweep them; the CUDA kernel has the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnTiling {
    /// Query rows per work item.
    pub tile_q: usize,
    /// Keys per inner-loop tile.
    pub tile_k: usize,
    /// Chunks each sequence's key list is cut into (split-KV).
    pub n_splits: usize,
}

impl AttnTiling {
    /// Fewest keys a split should get from [`AttnTiling::heuristic`]: below this the merge and
    /// the per-split fixed cost outweigh the extra parallelism.
    pub const MIN_KEYS_PER_SPLIT: usize = 256;
    /// Most splits [`AttnTiling::heuristic`] picks (bounds the partial-output workspace).
    pub const MAX_SPLITS: usize = 32;

    /// Host-side heuristic. Rule:
    /// - `tile_q` = 16 when `rows <= 16` (a decode-sized row set wastes less of a tile), else 64;
    ///   `tile_k` = 64;
    /// - query work items `w = ceil(rows / tile_q) · n_heads` (a lower bound: tiles also break at
    ///   sequence boundaries);
    /// - `w >= workers`: 1 split (the grid is already full); otherwise
    ///   `n_splits = min(ceil(workers / w), ceil(max_keys / MIN_KEYS_PER_SPLIT), MAX_SPLITS)`,
    ///   at least 1.
    pub fn heuristic(rows: usize, max_keys: usize, n_heads: usize, workers: usize) -> AttnTiling {
        let tile_q = if rows <= 16 { 16 } else { 64 };
        let tile_k = 64;
        let items = (rows.div_ceil(tile_q) * n_heads).max(1);
        let n_splits = if items >= workers {
            1
        } else {
            workers
                .div_ceil(items)
                .min(max_keys.div_ceil(Self::MIN_KEYS_PER_SPLIT))
                .clamp(1, Self::MAX_SPLITS)
        };
        AttnTiling {
            tile_q,
            tile_k,
            n_splits,
        }
    }

    /// Checks that every field is at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.tile_q == 0 || self.tile_k == 0 || self.n_splits == 0 {
            return Err(Error::Input(format!(
                "attention tiling {self:?}: every field must be at least 1"
            )));
        }
        Ok(())
    }

    /// The keys split `split` walks, as offsets into a sequence's key list of `n_keys` keys.
    pub fn split_range(&self, n_keys: usize, split: usize) -> Range<usize> {
        let chunk = n_keys.div_ceil(self.n_splits).div_ceil(self.tile_k) * self.tile_k;
        let start = (split * chunk).min(n_keys);
        start..(start + chunk).min(n_keys)
    }
}

/// Checks a CSR offset array: `n + 1` entries from 0, non-decreasing, ending at `total`; the
/// error names `op` and the array.
pub fn check_indptr(op: &str, name: &str, indptr: &[u32], total: usize) -> Result<()> {
    let Some(&last) = indptr.last() else {
        return bad(
            op,
            format_args!("{name} is empty (it needs n_seqs + 1 entries)"),
        );
    };
    if indptr[0] != 0 {
        return bad(op, format_args!("{name}[0] = {}, expected 0", indptr[0]));
    }
    if let Some(s) = indptr.windows(2).position(|w| w[0] > w[1]) {
        return bad(
            op,
            format_args!(
                "{name} decreases at sequence {s}: {} > {}",
                indptr[s],
                indptr[s + 1]
            ),
        );
    }
    if last as usize != total {
        return bad(op, format_args!("{name} ends at {last}, expected {total}"));
    }
    Ok(())
}

/// The host-side ragged layout of one attention call: the query rows of one branch of a step,
/// sorted by sequence, and the keys of their sequences (CSR lists of pool slots with a tag per
/// key: paged attention with pages of one token). Both the CUDA kernel and its CPU twin read
/// exactly this layout.
#[derive(Debug, Clone, Copy)]
pub struct AttnLayout<'a> {
    /// Head geometry; head_dim must be 64 or 128 (the compiled kernels).
    pub shape: AttnShape,
    /// Tag of each query row.
    pub row_tags: &'a [Tag],
    /// `n_seqs + 1` offsets: rows of sequence `s` are `seq_indptr[s]..seq_indptr[s+1]`.
    pub seq_indptr: &'a [u32],
    /// `n_seqs + 1` offsets into `kv_indices`.
    pub kv_indptr: &'a [u32],
    /// Pool slot of each key.
    pub kv_indices: &'a [u32],
    /// Tag of each key.
    pub kv_tags: &'a [Tag],
    /// Pool rows: every `kv_indices` entry must be below this, and the pools an attention
    /// call reads must hold at least this many rows.
    pub n_slots: usize,
}

impl AttnLayout<'_> {
    /// Query rows.
    pub fn rows(&self) -> usize {
        self.row_tags.len()
    }

    /// Checks the head geometry, both CSR offset arrays, the tag lengths and every key's slot.
    pub fn validate(&self) -> Result<()> {
        let op = "attention plan";
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = self.shape;
        if head_dim != 64 && head_dim != 128 {
            return bad(
                op,
                format_args!("head_dim {head_dim} has no kernel (64 and 128 are compiled)"),
            );
        }
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return bad(
                op,
                format_args!(
                    "n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}"
                ),
            );
        }
        if n_heads > 65_535 {
            return bad(op, format_args!("n_heads {n_heads} exceeds the grid limit"));
        }
        check_indptr(op, "seq_indptr", self.seq_indptr, self.rows())?;
        check_indptr(op, "kv_indptr", self.kv_indptr, self.kv_indices.len())?;
        if self.kv_indptr.len() != self.seq_indptr.len() {
            return bad(
                op,
                format_args!(
                    "kv_indptr has {} entries but seq_indptr has {}",
                    self.kv_indptr.len(),
                    self.seq_indptr.len()
                ),
            );
        }
        if self.kv_tags.len() != self.kv_indices.len() {
            return bad(
                op,
                format_args!(
                    "kv_tags has {} entries but kv_indices has {}",
                    self.kv_tags.len(),
                    self.kv_indices.len()
                ),
            );
        }
        to_u32(op, "n_slots", self.n_slots)?;
        to_u32(op, "rows", self.rows())?;
        if let Some((i, &slot)) = self
            .kv_indices
            .iter()
            .enumerate()
            .find(|&(_, &s)| s as usize >= self.n_slots)
        {
            return bad(
                op,
                format_args!(
                    "kv_indices[{i}] = {slot} is not below the pool's {} slots",
                    self.n_slots
                ),
            );
        }
        Ok(())
    }
}

/// Query tiles of a ragged row set: each tile is up to `block_m` consecutive rows of one
/// sequence; returns `(qtile_seq, qtile_row0)` (sequence and first row of each tile), tiles in
/// row order. Tiles never cross a sequence boundary and cover every row exactly once.
/// `seq_indptr` must be valid CSR offsets (see [`AttnLayout::validate`]); `block_m >= 1`.
pub fn query_tiles(seq_indptr: &[u32], block_m: u32) -> (Vec<u32>, Vec<u32>) {
    let block_m = block_m.max(1);
    let (mut seq, mut row0) = (Vec::new(), Vec::new());
    for (s, w) in seq_indptr.windows(2).enumerate() {
        let mut r = w[0];
        while r < w[1] {
            seq.push(s as u32);
            row0.push(r);
            r = r.saturating_add(block_m);
        }
    }
    (seq, row0)
}

/// Split count for `n_qtiles` query tiles of `n_heads` heads over at most `max_keys` keys per
/// sequence on `workers` SMs: the rule of [`AttnTiling::heuristic`] with the real tile count
/// (`SL_ATTN_BLOCK_M`-row tiles, broken at sequence boundaries) — 1 when the grid already has
/// `workers` blocks, else `min(ceil(workers / items), ceil(max_keys / MIN_KEYS_PER_SPLIT),
/// MAX_SPLITS)`, at least 1.
pub fn choose_splits(n_qtiles: usize, n_heads: usize, max_keys: usize, workers: usize) -> usize {
    let items = (n_qtiles * n_heads).max(1);
    if items >= workers {
        1
    } else {
        workers
            .div_ceil(items)
            .min(max_keys.div_ceil(AttnTiling::MIN_KEYS_PER_SPLIT))
            .clamp(1, AttnTiling::MAX_SPLITS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn indptr_checks() {
        assert!(check_indptr("op", "p", &[0, 2, 2, 5], 5).is_ok());
        assert!(msg(check_indptr("op", "p", &[], 0)).contains("empty"));
        assert!(msg(check_indptr("op", "p", &[1, 2], 2)).contains("expected 0"));
        assert!(msg(check_indptr("op", "p", &[0, 3, 2], 2)).contains("decreases"));
        assert!(msg(check_indptr("op", "p", &[0, 3], 4)).contains("ends at 3"));
    }

    fn layout<'a>(
        row_tags: &'a [Tag],
        seq_indptr: &'a [u32],
        kv_indptr: &'a [u32],
        kv_indices: &'a [u32],
        kv_tags: &'a [Tag],
    ) -> AttnLayout<'a> {
        AttnLayout {
            shape: AttnShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 64,
            },
            row_tags,
            seq_indptr,
            kv_indptr,
            kv_indices,
            kv_tags,
            n_slots: 8,
        }
    }

    #[test]
    fn attention_layout_checks() {
        let t = Tag(0);
        let rows = [t; 3];
        let keys = [t; 4];
        assert!(
            layout(&rows, &[0, 1, 3], &[0, 2, 4], &[0, 1, 2, 7], &keys)
                .validate()
                .is_ok()
        );
        let m = msg(layout(&rows, &[0, 1, 3], &[0, 2, 4], &[0, 1, 2, 8], &keys).validate());
        assert!(
            m.contains("kv_indices[3] = 8") && m.contains("8 slots"),
            "{m}"
        );
        let m = msg(layout(&rows, &[0, 1, 2], &[0, 2, 4], &[0, 1, 2, 3], &keys).validate());
        assert!(m.contains("seq_indptr ends at 2"), "{m}");
        let m = msg(layout(&rows, &[0, 3], &[0, 2, 4], &[0, 1, 2, 3], &keys).validate());
        assert!(m.contains("kv_indptr has 3 entries"), "{m}");
        let m = msg(layout(&rows, &[0, 1, 3], &[0, 2, 4], &[0, 1, 2, 3], &keys[..3]).validate());
        assert!(m.contains("kv_tags has 3"), "{m}");
        let mut l = layout(&rows, &[0, 1, 3], &[0, 2, 4], &[0, 1, 2, 3], &keys);
        l.shape.head_dim = 96;
        assert!(msg(l.validate()).contains("head_dim 96"));
        l.shape.head_dim = 128;
        l.shape.n_kv_heads = 3;
        assert!(msg(l.validate()).contains("multiple of n_kv_heads"));
    }

    #[test]
    fn query_tiles_stay_in_their_sequence_and_cover_rows_once() {
        let seq_indptr = [0u32, 0, 130, 131, 131, 200, 264];
        let (seq, row0) = query_tiles(&seq_indptr, 64);
        assert_eq!(seq, vec![1, 1, 1, 2, 4, 4, 5]);
        assert_eq!(row0, vec![0, 64, 128, 130, 131, 195, 200]);
        assert_eq!(query_tiles(&[0], 64), (vec![], vec![]));
    }

    #[test]
    fn split_rule_matches_the_cpu_heuristic_shape() {
        // A full grid: no split.
        assert_eq!(choose_splits(132, 1, 100_000, 132), 1);
        // One tile of 32 heads on 132 SMs: ceil(132/32) = 5, if the keys allow it.
        assert_eq!(choose_splits(1, 32, 10_000, 132), 5);
        assert_eq!(choose_splits(1, 32, 512, 132), 2);
        assert_eq!(choose_splits(1, 32, 10, 132), 1);
        // Capped at MAX_SPLITS.
        assert_eq!(choose_splits(1, 1, 1 << 20, 1000), AttnTiling::MAX_SPLITS);
        // Same answer as the CPU rule when tiles = ceil(rows / 64).
        for (rows, keys, heads, workers) in
            [(100, 5000, 4, 132), (17, 300, 2, 64), (640, 9000, 8, 132)]
        {
            let cpu = AttnTiling::heuristic(rows, keys, heads, workers);
            assert_eq!(
                choose_splits(rows.div_ceil(64), heads, keys, workers),
                cpu.n_splits
            );
        }
    }
}

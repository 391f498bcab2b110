//! The attention call's formats: head geometry ([`AttnShape`]), the ragged CSR layout of rows
//! and keys ([`AttnLayout`]), the query tiling and the split-KV rule ([`AttnTiling`],
//! [`query_tiles`], [`choose_splits`], and `split_chunk` in [`super::abi`]), and the tile
//! classes ([`TileSummary`], [`key_tile_summaries`], [`QueryDesc`], [`TileClass`]): what the host
//! plans, both for `sl_attention_hd{64,128}` and for its CPU twin.

use std::ops::Range;

use crate::contract::tags::{Branch, Tag};
use crate::error::{Error, Result};

fn bad<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("{op}: {msg}")))
}

/// `v` as a u32 kernel argument, or an error naming it.
fn to_u32(op: &str, name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).or_else(|_| bad(op, format_args!("{name} = {v} does not fit in u32")))
}

/// Which attention kernel runs: the current one (v2: 128-row query tiles, tile classes from the
/// plan's summaries, a 3-stage pipeline) or the previous one (v1: 64-row tiles, per-pair
/// visibility with barrier reductions), kept selectable for one release (`SL_ATTN=v1`) so that a
/// GPU run can compare them. Both compute the same function (SPEC §5) and write the same split
/// partials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttnVersion {
    /// `sl_attention_v1_hd*` (kernels/attention_v1.cu).
    V1 = 0,
    /// `sl_attention_hd*` (kernels/attention.cu), the default.
    V2 = 1,
}

impl AttnVersion {
    /// Both versions.
    pub const ALL: [AttnVersion; 2] = [AttnVersion::V1, AttnVersion::V2];

    /// Rows per query tile (`SL_ATTN_V1_BLOCK_M`, `SL_ATTN_BLOCK_M`).
    pub fn block_m(self) -> u32 {
        match self {
            AttnVersion::V1 => crate::contract::abi::SL_ATTN_V1_BLOCK_M,
            AttnVersion::V2 => crate::contract::abi::SL_ATTN_BLOCK_M,
        }
    }

    /// `v1` or `v2`.
    pub fn name(self) -> &'static str {
        match self {
            AttnVersion::V1 => "v1",
            AttnVersion::V2 => "v2",
        }
    }

    /// The version the environment asks for: `SL_ATTN=v1` or `v2`; unset or empty is v2.
    pub fn from_env() -> Result<AttnVersion> {
        match std::env::var("SL_ATTN") {
            Err(std::env::VarError::NotPresent) => Ok(AttnVersion::V2),
            Ok(v) => match v.as_str() {
                "" | "v2" => Ok(AttnVersion::V2),
                "v1" => Ok(AttnVersion::V1),
                other => bad(
                    "SL_ATTN",
                    format_args!("`{other}` is not an attention kernel (v1 or v2)"),
                ),
            },
            Err(e) => bad("SL_ATTN", e),
        }
    }
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
    /// - `tile_q` = 16 when `rows <= 16` (a decode-sized row set wastes less of a tile), else
    ///   128 (the CUDA kernel's `SL_ATTN_BLOCK_M`); `tile_k` = 64;
    /// - query work items `w = ceil(rows / tile_q) · n_heads` (a lower bound: tiles also break at
    ///   sequence boundaries);
    /// - `w >= workers`: 1 split (the grid is already full); otherwise
    ///   `n_splits = min(ceil(workers / w), ceil(max_keys / MIN_KEYS_PER_SPLIT), MAX_SPLITS)`,
    ///   at least 1.
    pub fn heuristic(rows: usize, max_keys: usize, n_heads: usize, workers: usize) -> AttnTiling {
        let tile_q = if rows <= 16 { 16 } else { 128 };
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
/// sequence on `workers` concurrent CTAs (the kernel's CTAs per SM times the SMs: the grid is
/// sized to occupancy, not to the SM count): the rule of [`AttnTiling::heuristic`] with the real
/// tile count (query tiles broken at sequence boundaries) — 1 when the grid already has
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

/// Most concurrent CTAs the CUDA backend's split rule counts ([`choose_splits`]'s `workers`,
/// clamped by `cuda::ops::attention_workers`): 3 CTAs per SM on 148 SMs is 444. It bounds every
/// attention plan's split workspace on any card ([`max_split_values`]).
pub const MAX_SPLIT_WORKERS: usize = 512;

/// The most f32 values (partial outputs and their log-sum-exps) the split workspace of an
/// attention plan can take under [`choose_splits`], over at most `rows` query rows in tiles of
/// at most `tile_rows` rows, `n_heads` heads of `head_dim`, on `workers` concurrent CTAs: the
/// largest over `t` query tiles of `splits(t) · min(t · tile_rows, rows) · n_heads ·
/// (head_dim + 1)`, where `splits(t) = min(ceil(workers / (t · n_heads)), MAX_SPLITS)` while
/// `t · n_heads < workers` and 1 (no workspace) after. The keys' cap on splits is left out, so
/// it holds for any key count. For the memory bound of a request
/// (`memory::add_batch`), computed in a loop of at most `workers` steps.
pub fn max_split_values(
    rows: u64,
    tile_rows: u64,
    n_heads: u64,
    head_dim: u64,
    workers: u64,
) -> u64 {
    let (tile_rows, heads) = (tile_rows.max(1), n_heads.max(1));
    let mut most = 0u64;
    let mut t = 1u64;
    while t.saturating_mul(heads) < workers && (t - 1).saturating_mul(tile_rows) < rows {
        let splits = workers
            .div_ceil(t * heads)
            .min(AttnTiling::MAX_SPLITS as u64);
        if splits > 1 {
            let r = t.saturating_mul(tile_rows).min(rows);
            let values = splits
                .saturating_mul(r)
                .saturating_mul(heads)
                .saturating_mul(head_dim.saturating_add(1));
            most = most.max(values);
        }
        t += 1;
    }
    most
}

/// Words of a [`TileSummary`] (`SL_ATTN_SUMMARY_WORDS` of `params.h`).
pub const SUMMARY_WORDS: usize = 8;

/// Blocks `lo..=hi` seen in a set of tags (empty: `lo > hi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// Smallest block (`u32::MAX` when empty).
    pub lo: u32,
    /// Largest block (0 when empty).
    pub hi: u32,
}

impl BlockRange {
    /// No block.
    pub const EMPTY: BlockRange = BlockRange {
        lo: u32::MAX,
        hi: 0,
    };

    /// Whether no block was inserted.
    pub fn is_empty(self) -> bool {
        self.lo > self.hi
    }

    /// The smallest range holding both.
    fn union(self, other: BlockRange) -> BlockRange {
        BlockRange {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }

    /// Whether the ranges (not necessarily the block sets) intersect.
    fn overlaps(self, other: BlockRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.lo <= other.hi && other.lo <= self.hi
    }

    /// Whether the range is exactly the single block `b`.
    fn is_only(self, b: u32) -> bool {
        self.lo == b && self.hi == b
    }
}

/// A tile's tags summarised for classification, as the kernel reads it (`kv_summary` in
/// `params.h`): for each class `c = 2·branch + masked`, the smallest (word `2c`) and largest
/// (word `2c + 1`) block of the tile's tags of that class; `u32::MAX` and 0 for a class with
/// no tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSummary(pub [u32; SUMMARY_WORDS]);

impl TileSummary {
    /// The summary of no tag.
    pub const EMPTY: TileSummary =
        TileSummary([u32::MAX, 0, u32::MAX, 0, u32::MAX, 0, u32::MAX, 0]);

    /// The summary of `tags`.
    pub fn of(tags: &[Tag]) -> TileSummary {
        let mut s = TileSummary::EMPTY;
        for &t in tags {
            s.insert(t);
        }
        s
    }

    /// Adds one tag.
    pub fn insert(&mut self, t: Tag) {
        let c = 2 * (2 * t.branch() as usize + t.masked() as usize);
        self.0[c] = self.0[c].min(t.block());
        self.0[c + 1] = self.0[c + 1].max(t.block());
    }

    /// The block range of the tags of `branch`, clean or masked.
    pub fn range(&self, branch: Branch, masked: bool) -> BlockRange {
        let c = 2 * (2 * branch as usize + masked as usize);
        BlockRange {
            lo: self.0[c],
            hi: self.0[c + 1],
        }
    }

    /// Whether no tag of `branch` was inserted.
    fn lacks(&self, branch: Branch) -> bool {
        self.range(branch, false).is_empty() && self.range(branch, true).is_empty()
    }
}

/// The key tiles of every sequence and their summaries (`ktile_indptr`, `kv_summary` in
/// `params.h`): the keys `kv_indptr[s]..kv_indptr[s+1]` of sequence `s` are cut into tiles of
/// `tile_k` from its first key, the last one partial; tile `t` of sequence `s` is entry
/// `ktile_indptr[s] + t`. Split boundaries are multiples of `tile_k` ([`AttnTiling::split_range`]),
/// so split `z` walks the sequence's tiles `start / tile_k ..` with the same summaries.
/// `kv_indptr` must be valid CSR offsets over `kv_tags` ([`check_indptr`]); `tile_k >= 1`.
pub fn key_tile_summaries(
    kv_indptr: &[u32],
    kv_tags: &[Tag],
    tile_k: usize,
) -> (Vec<u32>, Vec<TileSummary>) {
    let tile_k = tile_k.max(1);
    let mut indptr = vec![0u32];
    let mut summaries = Vec::new();
    for w in kv_indptr.windows(2) {
        let keys = &kv_tags[w[0] as usize..w[1] as usize];
        summaries.extend(keys.chunks(tile_k).map(TileSummary::of));
        indptr.push(summaries.len() as u32);
    }
    (indptr, summaries)
}

/// How a (query tile, key tile) pair is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileClass {
    /// No pair is visible: the key tile is neither gathered nor computed.
    Hidden,
    /// Anything else (or not provably one of the others): SPEC §3 per pair.
    Mixed,
    /// Every pair is visible: no per-pair masking (the kernel also needs a full key tile).
    Visible,
}

/// A query tile's rows as the classification sees them, once per tile (the kernel builds it
/// once per CTA): for each key branch `bk`, the union of the block ranges of the query rows
/// allowed to see that branch (all of them in a joint layer, those of `bk` otherwise), clean
/// and masked, and whether some row of the tile may not see it at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryDesc {
    /// `[key branch] = (clean, masked)` ranges of the rows allowed to see that branch.
    pub ranges: [[BlockRange; 2]; 2],
    /// `[key branch]`: a row of another branch is in the tile and the layer is not joint.
    pub blocked: [bool; 2],
}

impl QueryDesc {
    /// The description of query rows summarised by `rows`, in a `joint` layer or not.
    pub fn new(rows: &TileSummary, joint: bool) -> QueryDesc {
        let mut d = QueryDesc {
            ranges: [[BlockRange::EMPTY; 2]; 2],
            blocked: [false; 2],
        };
        for bk in Branch::ALL {
            for bq in Branch::ALL {
                if rows.lacks(bq) {
                    continue;
                }
                if joint || bq == bk {
                    for masked in [false, true] {
                        let r = &mut d.ranges[bk as usize][masked as usize];
                        *r = r.union(rows.range(bq, masked));
                    }
                } else {
                    d.blocked[bk as usize] = true;
                }
            }
        }
        d
    }

    /// Classifies the pair of this query tile and a key tile summarised by `keys`. Sound:
    /// [`TileClass::Visible`] only if every pair is visible, [`TileClass::Hidden`] only if none
    /// is. `Visible` is also complete (returned whenever every pair is visible); `Hidden` may be
    /// missed (→ `Mixed`) when masked queries' block ranges overlap the masked keys' without
    /// sharing a block.
    ///
    /// Proof. `visible = branch_ok ∧ step_ok`. Split the keys by branch `bk`. A query row of a
    /// branch that may not see `bk` (`blocked`) sees none of those keys, so the tile is then not
    /// all visible; the rows that may see `bk` (`ranges[bk]`) see a key of `bk` iff `step_ok`
    /// holds. For those rows and the keys `kc` (clean) / `km` (masked) of `bk`, from SPEC §3
    /// (`qc` / `qm`: the clean / masked rows' block range):
    /// - a masked query of block `b` sees every clean key and exactly the masked keys of block
    ///   `b`. All of `qm × k` visible ⇔ `km` empty, or the masked rows and `km` all have one
    ///   block `b`; on the union range this is exact (one block over the union is one block per
    ///   row). None visible ⇐ `kc` empty and the ranges of `qm` and `km` disjoint (then no block
    ///   is shared; the converse fails, hence "only if" above).
    /// - a clean query of block `b` sees exactly the clean keys of blocks `<= b`. All of
    ///   `qc × k` visible ⇔ `km` empty and `max(kc) <= min(qc)`. None visible ⇔ `kc` empty or
    ///   `min(kc) > max(qc)`. Both are exact on the union range (min and max of a union).
    ///
    /// The tile is all visible iff every present key branch is unblocked and all visible for
    /// both row kinds present; none visible iff every key branch is none visible.
    pub fn classify(&self, keys: &TileSummary) -> TileClass {
        let mut all = true;
        let mut none = true;
        for bk in Branch::ALL {
            if keys.lacks(bk) {
                continue;
            }
            let (kc, km) = (keys.range(bk, false), keys.range(bk, true));
            let [qc, qm] = self.ranges[bk as usize];
            if self.blocked[bk as usize] || (qc.is_empty() && qm.is_empty()) {
                all = false;
            }
            if !qm.is_empty() {
                all &= km.is_empty() || (qm.lo == qm.hi && km.is_only(qm.lo));
                none &= kc.is_empty() && !qm.overlaps(km);
            }
            if !qc.is_empty() {
                all &= km.is_empty() && kc.hi <= qc.lo;
                none &= kc.is_empty() || kc.lo > qc.hi;
            }
        }
        if all {
            TileClass::Visible
        } else if none {
            TileClass::Hidden
        } else {
            TileClass::Mixed
        }
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
        // Same answer as the CPU rule when tiles = ceil(rows / 128).
        for (rows, keys, heads, workers) in
            [(100, 5000, 4, 264), (17, 300, 2, 64), (640, 9000, 8, 396)]
        {
            let cpu = AttnTiling::heuristic(rows, keys, heads, workers);
            assert_eq!(
                choose_splits(rows.div_ceil(128), heads, keys, workers),
                cpu.n_splits
            );
        }
    }

    /// The split workspace's bound against the split rule on random layouts (sequences of
    /// 0–600 rows in tiles of 64 or 128, 1–32 heads, 1–600 CTAs, any key count): never below a
    /// plan's real workspace; and reached by one 1024-row sequence of 32 heads on 264 CTAs (2
    /// splits), the H100's hd128 shape.
    #[test]
    fn max_split_values_bounds_every_plan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..20_000 {
            let n_seqs = rng.gen_range(1..=10);
            let mut indptr = vec![0u32];
            for _ in 0..n_seqs {
                let len = rng.gen_range(0..=600u32);
                indptr.push(indptr.last().unwrap() + len);
            }
            let rows = *indptr.last().unwrap() as u64;
            let tile = [64u32, 128][rng.gen_range(0..2)];
            let heads = [1usize, 2, 4, 8, 32][rng.gen_range(0..5)];
            let (hd, workers) = (rng.gen_range(1..=256usize), rng.gen_range(1..=600usize));
            let keys = rng.gen_range(0..=100_000usize);
            let tiles = query_tiles(&indptr, tile).0.len();
            let splits = choose_splits(tiles, heads, keys, workers);
            let real = if splits > 1 {
                (splits * rows as usize * heads * (hd + 1)) as u64
            } else {
                0
            };
            let bound =
                max_split_values(rows, tile as u64, heads as u64, hd as u64, workers as u64);
            assert!(
                real <= bound,
                "rows {indptr:?} tile {tile} heads {heads} hd {hd} workers {workers} keys \
                 {keys}: {splits} splits, {real} values > bound {bound}"
            );
        }
        assert_eq!(
            max_split_values(1024, 128, 32, 128, 264),
            2 * 1024 * 32 * 129
        );
        assert_eq!(choose_splits(8, 32, 1 << 20, 264), 2);
        assert_eq!(max_split_values(0, 128, 32, 128, 264), 0);
        assert_eq!(max_split_values(100_000, 128, 32, 128, 32), 0);
    }

    fn tag_strategy() -> impl proptest::strategy::Strategy<Value = Tag> {
        use proptest::prelude::*;
        (any::<bool>(), 0u32..4, any::<bool>()).prop_map(|(image, block, masked)| {
            let branch = if image { Branch::Image } else { Branch::Text };
            Tag::new(branch, block, masked)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// The tile classification never contradicts the per-pair rule, and finds every
        /// all-visible tile.
        #[test]
        fn classification_agrees_with_per_pair_rule(
            q in proptest::collection::vec(tag_strategy(), 1..6),
            k in proptest::collection::vec(tag_strategy(), 1..6),
            joint in proptest::prelude::any::<bool>(),
        ) {
            let class = QueryDesc::new(&TileSummary::of(&q), joint).classify(&TileSummary::of(&k));
            let pairs: Vec<bool> = q
                .iter()
                .flat_map(|&qt| k.iter().map(move |&kt| crate::contract::visible(qt, kt, joint)))
                .collect();
            let all = pairs.iter().all(|&v| v);
            let none = !pairs.iter().any(|&v| v);
            match class {
                TileClass::Visible => proptest::prop_assert!(all),
                TileClass::Hidden => proptest::prop_assert!(none),
                TileClass::Mixed => proptest::prop_assert!(!all),
            }
        }
    }

    #[test]
    fn classification_finds_typical_hidden_tiles() {
        let t = |b, block, masked| Tag::new(b, block, masked);
        let (text, image) = (Branch::Text, Branch::Image);
        let class = |q: &[Tag], k: &[Tag], joint| {
            QueryDesc::new(&TileSummary::of(q), joint).classify(&TileSummary::of(k))
        };
        // Clean queries vs a tile of masked keys (this step's masks and registers).
        let clean_q = [t(image, 1, false), t(image, 2, false)];
        let masked_k = [t(image, 3, true), t(image, 3, true)];
        assert_eq!(class(&clean_q, &masked_k, true), TileClass::Hidden);
        // Clean queries vs later clean blocks.
        assert_eq!(
            class(&clean_q, &[t(image, 3, false)], true),
            TileClass::Hidden
        );
        // Non-joint layer, other branch (the prompt for image queries).
        assert_eq!(
            class(&clean_q, &[t(text, 0, false)], false),
            TileClass::Hidden
        );
        assert_eq!(
            class(&clean_q, &[t(text, 0, false)], true),
            TileClass::Visible
        );
        // Masked queries vs another masked block; vs clean keys.
        let masked_q = [t(image, 4, true)];
        assert_eq!(class(&masked_q, &masked_k, true), TileClass::Hidden);
        assert_eq!(class(&masked_q, &clean_q, true), TileClass::Visible);
        // A query tile holding both branches in a non-joint layer: never all visible.
        let both = [t(image, 1, false), t(text, 1, false)];
        assert_eq!(class(&both, &[t(image, 0, false)], false), TileClass::Mixed);
        assert_eq!(
            class(&both, &[t(image, 0, false)], true),
            TileClass::Visible
        );
    }

    #[test]
    fn key_tiles_follow_each_sequence_and_its_splits() {
        let t = |block| Tag::new(Branch::Image, block, false);
        let tags: Vec<Tag> = (0..10).map(t).collect();
        // Sequences of 5, 0 and 5 keys, tiles of 2.
        let (indptr, sums) = key_tile_summaries(&[0, 5, 5, 10], &tags, 2);
        assert_eq!(indptr, vec![0, 3, 3, 6]);
        assert_eq!(sums[2], TileSummary::of(&tags[4..5]));
        assert_eq!(sums[3], TileSummary::of(&tags[5..7]));
        assert_eq!(
            sums[3].range(Branch::Image, false),
            BlockRange { lo: 5, hi: 6 }
        );
        assert!(sums[3].range(Branch::Text, false).is_empty());
        assert_eq!(TileSummary::of(&[]), TileSummary::EMPTY);
    }
}

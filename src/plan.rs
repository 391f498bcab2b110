//! Backend-independent step plans (FlashInfer's "plan, then run").
//!
//! A [`StepPlan`] says everything one forward pass needs that depends only on the schedule: which
//! rows are fed (branch, token id, position, attention tag, sequence), where each row's K/V lands
//! in the pool, which pool slots every sequence attends over (CSR `kv_indptr` / `kv_indices` with
//! a tag per key) and which rows need logits. It is computed on the host, identical for every
//! backend, and a backend only executes it. The formats it is made of — [`Tag`], [`REGISTER`],
//! the CSR key lists — are the kernels' ([`crate::contract`]); the plan builds them.

use crate::config::Branch;
use crate::error::{Error, Result};

pub use crate::contract::{MAX_BLOCK, REGISTER, Tag, visible};

/// One row to feed: a token (or register) with its tags and the pool slot its K/V goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Which sequence of the set (0 = conditional, 1 = unconditional for a CFG pair).
    pub seq: u32,
    /// Token id in the branch's embedding table, or [`REGISTER`].
    pub id: u32,
    /// RoPE position.
    pub pos: u32,
    /// Attention tag (branch, block, masked).
    pub tag: Tag,
    /// K/V pool slot this row's keys and values are written to.
    pub slot: u32,
}

/// The rows of one branch, sorted by sequence (rows of sequence `s` are
/// `seq_indptr[s]..seq_indptr[s+1]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BranchRows {
    /// Token ids ([`REGISTER`] for registers).
    pub ids: Vec<u32>,
    /// RoPE positions.
    pub pos: Vec<u32>,
    /// Attention tags.
    pub tags: Vec<Tag>,
    /// K/V pool slots.
    pub slots: Vec<u32>,
    /// CSR offsets of each sequence's rows, `n_seqs + 1` entries.
    pub seq_indptr: Vec<u32>,
}

impl BranchRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the branch has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A forward pass, fully planned. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences in the set (1, or 2 for a CFG pair).
    pub n_seqs: usize,
    /// Fed rows per branch, indexed by `Branch as usize`.
    pub branches: [BranchRows; 2],
    /// CSR offsets into `kv_indices` per sequence, `n_seqs + 1` entries.
    pub kv_indptr: Vec<u32>,
    /// Pool slots each sequence attends over (sorted by slot within a sequence).
    pub kv_indices: Vec<u32>,
    /// Tag of each key, parallel to `kv_indices`.
    pub kv_tags: Vec<Tag>,
    /// Branch of the rows that need logits (`None`: no logits, e.g. a prefill).
    pub logits_branch: Option<Branch>,
    /// Indices into `branches[logits_branch]` of the rows needing logits, in output order.
    pub logits_rows: Vec<u32>,
    /// Rows of this branch are not computed in layers `>= n_joint_layers`: nothing that needs
    /// logits can see them there (text rows during text-to-image).
    pub skip_after_joint: Option<Branch>,
    /// Pool slots this plan needs (one past the largest slot it touches).
    pub pool_slots: usize,
}

impl StepPlan {
    /// Rows of branch `b`.
    pub fn rows(&self, b: Branch) -> &BranchRows {
        &self.branches[b as usize]
    }

    /// Rows fed in total.
    pub fn n_rows(&self) -> usize {
        self.branches.iter().map(BranchRows::len).sum()
    }

    /// Whether branch `b` is computed in `layer` (given the model's joint-layer count).
    pub fn computes(&self, b: Branch, layer: usize, n_joint_layers: usize) -> bool {
        !self.rows(b).is_empty() && (layer < n_joint_layers || self.skip_after_joint != Some(b))
    }

    /// The plan of what is left of the last layer once every row's K/V is stored, when only the
    /// rows needing logits go further (nothing reads any other row's output there): those rows
    /// of the logits branch, in logits order, as its only rows, attending over the same keys,
    /// with `logits_rows` `0..n`. `None` when nothing would be saved (no logits, or every fed
    /// row needs them), or the logits rows do not come sequence by sequence in order, or the
    /// plan is malformed (its rows' fields or sequence offsets inconsistent: plans the builders
    /// never make, left to the ops' own checks on the whole pass).
    pub fn logits_tail(&self) -> Option<StepPlan> {
        let lb = self.logits_branch?;
        if self.logits_rows.is_empty() || self.logits_rows.len() >= self.n_rows() {
            return None;
        }
        let src = self.rows(lb);
        let n = src.len();
        let fields = [src.pos.len(), src.tags.len(), src.slots.len()];
        let offsets = &src.seq_indptr;
        if fields.iter().any(|&l| l != n)
            || offsets.len() != self.n_seqs + 1
            || offsets.first() != Some(&0)
            || offsets.last().map(|&e| e as usize) != Some(n)
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return None;
        }
        let mut rows = BranchRows {
            seq_indptr: vec![0; self.n_seqs + 1],
            ..BranchRows::default()
        };
        let mut last_seq = 0;
        for &r in &self.logits_rows {
            let r = r as usize;
            if r >= src.len() {
                return None;
            }
            // The sequence whose range `seq_indptr[s]..seq_indptr[s + 1]` holds r.
            let seq = src.seq_indptr.partition_point(|&e| e as usize <= r) - 1;
            if seq < last_seq {
                return None;
            }
            last_seq = seq;
            rows.ids.push(src.ids[r]);
            rows.pos.push(src.pos[r]);
            rows.tags.push(src.tags[r]);
            rows.slots.push(src.slots[r]);
            rows.seq_indptr[seq + 1] += 1;
        }
        for s in 0..self.n_seqs {
            rows.seq_indptr[s + 1] += rows.seq_indptr[s];
        }
        let n = rows.len() as u32;
        let mut branches: [BranchRows; 2] = Default::default();
        for br in &mut branches {
            br.seq_indptr = vec![0; self.n_seqs + 1];
        }
        branches[lb as usize] = rows;
        Some(StepPlan {
            n_seqs: self.n_seqs,
            branches,
            kv_indptr: self.kv_indptr.clone(),
            kv_indices: self.kv_indices.clone(),
            kv_tags: self.kv_tags.clone(),
            logits_branch: Some(lb),
            logits_rows: (0..n).collect(),
            skip_after_joint: None,
            pool_slots: self.pool_slots,
        })
    }
}

/// One request's plan in a batch ([`StepPlan::concat`]): a plan over the request's own
/// sequences (from 0) and pool slots (from 0), placed at a region of the batch's pool.
#[derive(Debug, Clone, Copy)]
pub struct PlanPart<'a> {
    /// The request's plan, or `None` when the pass feeds nothing of it (a finished text
    /// request, or a prefill with an empty prompt): its sequences are then empty.
    pub plan: Option<&'a StepPlan>,
    /// The request's sequences (1, or 2 for a CFG pair).
    pub n_seqs: usize,
    /// The batch pool slot of the request's slot 0.
    pub slot_base: usize,
    /// Slots of the request's region: its plan's slots stay below this.
    pub slots: usize,
}

/// Where one part's entries start in a concatenated plan ([`StepPlan::concat`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartOffsets {
    /// The part's first sequence.
    pub seq: usize,
    /// Its first row per branch (indexed by `Branch as usize`).
    pub rows: [usize; 2],
    /// Its first key (into `kv_indices` / `kv_tags`).
    pub keys: usize,
    /// Its first logits row (into `logits_rows`, i.e. into the pass's logits).
    pub logits: usize,
    /// The batch pool slot of its slot 0.
    pub slot_base: usize,
    /// Rows it feeds (0 without a plan).
    pub n_rows: usize,
    /// Logits rows it asks for.
    pub n_logits: usize,
}

impl StepPlan {
    /// The plan of one pass over a batch: the parts' plans side by side, in part order. Part
    /// `i`'s sequences follow part `i − 1`'s, its rows follow within each branch (so rows stay
    /// sorted by sequence), its keys and logits rows follow, and its slots move to its region
    /// (`+ slot_base`). Nothing of one part refers to another, so each part's rows compute
    /// exactly what they compute alone (SPEC §8, batches). Returns the plan and where each
    /// part starts in it.
    ///
    /// Errors: no parts, a plan with another sequence count than its part, slots outside the
    /// part's region, regions that overlap, parts that disagree on the logits branch or the
    /// branch skipped after the joint layers, sizes past u32.
    pub fn concat(parts: &[PlanPart]) -> Result<(StepPlan, Vec<PartOffsets>)> {
        let bad = |m: String| Err(Error::Input(format!("batch plan: {m}")));
        if parts.is_empty() {
            return bad("no parts".into());
        }
        let mut n_seqs = 0usize;
        let mut branches: [BranchRows; 2] = Default::default();
        for br in &mut branches {
            br.seq_indptr.push(0);
        }
        let mut kv_indptr = vec![0u32];
        let (mut kv_indices, mut kv_tags) = (Vec::new(), Vec::new());
        let mut logits_rows = Vec::new();
        let mut logits_branch = None;
        let mut skip_after_joint = None;
        let mut skip_seen = false;
        let mut pool_slots = 0usize;
        let mut region_end = 0usize;
        let mut offsets = Vec::with_capacity(parts.len());
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| Error::Input(format!("batch plan: {what} {v} past u32")))
        };
        for (i, part) in parts.iter().enumerate() {
            if part.slot_base < region_end {
                return bad(format!(
                    "part {i}'s region starts at slot {}, inside the previous region (ends at \
                     {region_end})",
                    part.slot_base
                ));
            }
            region_end = part.slot_base.checked_add(part.slots).ok_or_else(|| {
                Error::Input(format!("batch plan: part {i}'s region passes usize"))
            })?;
            to_u32(region_end, "pool slots")?;
            let base = part.slot_base as u32;
            let mut off = PartOffsets {
                seq: n_seqs,
                rows: Branch::ALL.map(|b| branches[b as usize].ids.len()),
                keys: kv_indices.len(),
                logits: logits_rows.len(),
                slot_base: part.slot_base,
                n_rows: 0,
                n_logits: 0,
            };
            n_seqs += part.n_seqs;
            let Some(plan) = part.plan else {
                for br in &mut branches {
                    let end = *br.seq_indptr.last().expect("starts with 0");
                    br.seq_indptr.extend(std::iter::repeat_n(end, part.n_seqs));
                }
                let end = *kv_indptr.last().expect("starts with 0");
                kv_indptr.extend(std::iter::repeat_n(end, part.n_seqs));
                offsets.push(off);
                continue;
            };
            if plan.n_seqs != part.n_seqs {
                return bad(format!(
                    "part {i}'s plan has {} sequences, the part {}",
                    plan.n_seqs, part.n_seqs
                ));
            }
            if plan.pool_slots > part.slots {
                return bad(format!(
                    "part {i}'s plan touches {} slots, its region holds {}",
                    plan.pool_slots, part.slots
                ));
            }
            if skip_seen && skip_after_joint != plan.skip_after_joint {
                return bad(format!(
                    "part {i} skips another branch after the joint layers"
                ));
            }
            (skip_seen, skip_after_joint) = (true, plan.skip_after_joint);
            if let Some(b) = plan.logits_branch {
                if *logits_branch.get_or_insert(b) != b {
                    return bad(format!("part {i} asks for logits of another branch"));
                }
                let first = to_u32(off.rows[b as usize], "rows")?;
                logits_rows.extend(plan.logits_rows.iter().map(|&r| first + r));
            }
            for b in Branch::ALL {
                let (src, dst) = (plan.rows(b), &mut branches[b as usize]);
                let first = to_u32(dst.ids.len(), "rows")?;
                dst.ids.extend_from_slice(&src.ids);
                dst.pos.extend_from_slice(&src.pos);
                dst.tags.extend_from_slice(&src.tags);
                dst.slots.extend(src.slots.iter().map(|&s| base + s));
                dst.seq_indptr
                    .extend(src.seq_indptr[1..].iter().map(|&e| first + e));
            }
            let first = to_u32(kv_indices.len(), "keys")?;
            kv_indices.extend(plan.kv_indices.iter().map(|&s| base + s));
            kv_tags.extend_from_slice(&plan.kv_tags);
            kv_indptr.extend(plan.kv_indptr[1..].iter().map(|&e| first + e));
            if plan.pool_slots > 0 {
                pool_slots = part.slot_base + plan.pool_slots;
            }
            off.n_rows = plan.n_rows();
            off.n_logits = plan.logits_rows.len();
            offsets.push(off);
        }
        to_u32(kv_indices.len(), "keys")?;
        let plan = StepPlan {
            n_seqs,
            branches,
            kv_indptr,
            kv_indices,
            kv_tags,
            logits_branch,
            logits_rows,
            skip_after_joint,
            pool_slots,
        };
        Ok((plan, offsets))
    }
}

/// Collects rows, cached keys and logits requests, then checks and packs them into a [`StepPlan`].
#[derive(Debug, Clone)]
pub struct PlanBuilder {
    n_seqs: usize,
    rows: Vec<Row>,
    cached: Vec<(u32, u32, Tag)>,
    logits: Vec<usize>,
    skip_after_joint: Option<Branch>,
}

impl PlanBuilder {
    /// A plan over `n_seqs` sequences.
    pub fn new(n_seqs: usize) -> Self {
        PlanBuilder {
            n_seqs,
            rows: Vec::new(),
            cached: Vec::new(),
            logits: Vec::new(),
            skip_after_joint: None,
        }
    }

    /// Feeds a row (its own slot becomes one of its sequence's keys); returns its index in push
    /// order, for [`PlanBuilder::logits_for`].
    pub fn row(&mut self, row: Row) -> usize {
        self.rows.push(row);
        self.rows.len() - 1
    }

    /// Adds a key already in the pool (computed by an earlier pass) to sequence `seq`.
    pub fn cached_key(&mut self, seq: u32, slot: u32, tag: Tag) {
        self.cached.push((seq, slot, tag));
    }

    /// Requests logits for the row with push index `row`; outputs follow request order.
    pub fn logits_for(&mut self, row: usize) {
        self.logits.push(row);
    }

    /// See [`StepPlan::skip_after_joint`].
    pub fn skip_after_joint(&mut self, b: Option<Branch>) {
        self.skip_after_joint = b;
    }

    /// Rows pushed so far.
    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }

    /// Validates (sequence ids, unique slots, one logits branch, registers, block range) and packs.
    pub fn build(self) -> Result<StepPlan> {
        let bad = |m: String| Err(Error::Input(format!("step plan: {m}")));
        let n_seqs = self.n_seqs;
        if n_seqs == 0 {
            return bad("no sequences".into());
        }
        let mut keys: Vec<Vec<(u32, Tag)>> = vec![Vec::new(); n_seqs];
        for &(seq, slot, tag) in &self.cached {
            if seq as usize >= n_seqs {
                return bad(format!("cached key in sequence {seq} of {n_seqs}"));
            }
            keys[seq as usize].push((slot, tag));
        }
        for (i, r) in self.rows.iter().enumerate() {
            if r.seq as usize >= n_seqs {
                return bad(format!("row {i} in sequence {} of {n_seqs}", r.seq));
            }
            if r.tag.block() > MAX_BLOCK {
                return bad(format!("row {i}: block out of range"));
            }
            keys[r.seq as usize].push((r.slot, r.tag));
        }
        let mut pool_slots = 0usize;
        let mut seen = std::collections::HashSet::new();
        for (s, k) in keys.iter_mut().enumerate() {
            k.sort_by_key(|&(slot, _)| slot);
            for &(slot, _) in k.iter() {
                if !seen.insert(slot) {
                    return bad(format!("slot {slot} used twice (sequence {s})"));
                }
                pool_slots = pool_slots.max(slot as usize + 1);
            }
        }
        // Rows sorted by (branch, seq), stable: the push order survives within a sequence.
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&i| (self.rows[i].tag.branch() as u32, self.rows[i].seq));
        let mut rank = vec![0usize; self.rows.len()];
        let mut branches: [BranchRows; 2] = Default::default();
        for b in Branch::ALL {
            let br = &mut branches[b as usize];
            br.seq_indptr = vec![0; n_seqs + 1];
            for &i in order.iter().filter(|&&i| self.rows[i].tag.branch() == b) {
                let r = &self.rows[i];
                rank[i] = br.ids.len();
                br.ids.push(r.id);
                br.pos.push(r.pos);
                br.tags.push(r.tag);
                br.slots.push(r.slot);
                br.seq_indptr[r.seq as usize + 1] += 1;
            }
            for s in 0..n_seqs {
                br.seq_indptr[s + 1] += br.seq_indptr[s];
            }
        }
        let mut logits_branch = None;
        let mut logits_rows = Vec::with_capacity(self.logits.len());
        for &i in &self.logits {
            let Some(r) = self.rows.get(i) else {
                return bad(format!(
                    "logits requested for row {i} of {}",
                    self.rows.len()
                ));
            };
            let b = r.tag.branch();
            if *logits_branch.get_or_insert(b) != b {
                return bad("logits requested for rows of both branches".into());
            }
            if r.id == REGISTER {
                return bad(format!("logits requested for register row {i}"));
            }
            logits_rows.push(rank[i] as u32);
        }
        if logits_branch.is_some() && logits_branch == self.skip_after_joint {
            return bad("the logits branch cannot be skipped after the joint layers".into());
        }
        let mut kv_indptr = vec![0u32];
        let (mut kv_indices, mut kv_tags) = (Vec::new(), Vec::new());
        for k in &keys {
            kv_indices.extend(k.iter().map(|&(s, _)| s));
            kv_tags.extend(k.iter().map(|&(_, t)| t));
            kv_indptr.push(kv_indices.len() as u32);
        }
        Ok(StepPlan {
            n_seqs,
            branches,
            kv_indptr,
            kv_indices,
            kv_tags,
            logits_branch,
            logits_rows,
            skip_after_joint: self.skip_after_joint,
            pool_slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sorts_by_branch_then_seq_and_maps_logits() {
        let mut p = PlanBuilder::new(2);
        let t = Tag::new(Branch::Text, 0, false);
        let im = Tag::new(Branch::Image, 1, true);
        let a = p.row(Row {
            seq: 1,
            id: 5,
            pos: 0,
            tag: im,
            slot: 10,
        });
        p.row(Row {
            seq: 0,
            id: 1,
            pos: 0,
            tag: t,
            slot: 0,
        });
        let c = p.row(Row {
            seq: 0,
            id: 7,
            pos: 1,
            tag: im,
            slot: 3,
        });
        p.cached_key(1, 9, t);
        p.logits_for(a);
        p.logits_for(c);
        let plan = p.build().unwrap();
        let img = plan.rows(Branch::Image);
        assert_eq!(img.ids, vec![7, 5]);
        assert_eq!(img.seq_indptr, vec![0, 1, 2]);
        assert_eq!(plan.logits_rows, vec![1, 0]);
        assert_eq!(plan.kv_indptr, vec![0, 2, 4]);
        assert_eq!(plan.kv_indices, vec![0, 3, 9, 10]);
        assert_eq!(plan.pool_slots, 11);
    }

    /// The tail keeps the logits rows (every field, in logits order, per sequence) and the keys;
    /// it is refused where nothing is saved or the rows go back to an earlier sequence.
    #[test]
    fn logits_tail_keeps_the_logits_rows_and_every_key() {
        let im = |block, masked| Tag::new(Branch::Image, block, masked);
        let t = Tag::new(Branch::Text, 0, false);
        // (seq, id, tag, slot), pushed in this order; sorted, seq 0's image rows come first.
        let rows = [
            (1, 11, im(1, false), 20),
            (0, 1, im(1, false), 2),
            (0, 2, im(2, true), 3),
            (0, 3, im(2, true), 4),
            (1, 12, im(2, true), 21),
            (1, 13, im(2, true), 22),
            (0, 9, t, 0),
        ];
        let plan_with = |logits: &[usize]| {
            let mut p = PlanBuilder::new(2);
            let idx: Vec<usize> = rows
                .iter()
                .enumerate()
                .map(|(i, &(seq, id, tag, slot))| {
                    p.row(Row {
                        seq,
                        id,
                        pos: i as u32,
                        tag,
                        slot,
                    })
                })
                .collect();
            p.cached_key(1, 7, t);
            for &i in logits {
                p.logits_for(idx[i]);
            }
            p.build().unwrap()
        };
        // Seq 0's rows 3 then 2, seq 1's row 5: sorted image rows are [1, 2, 3 | 11, 12, 13].
        let plan = plan_with(&[3, 2, 5]);
        let tail = plan.logits_tail().expect("a tail");
        let img = tail.rows(Branch::Image);
        assert_eq!(img.ids, vec![3, 2, 13]);
        assert_eq!(img.pos, vec![3, 2, 5]);
        assert_eq!(img.slots, vec![4, 3, 22]);
        assert_eq!(img.tags, vec![im(2, true), im(2, true), im(2, true)]);
        assert_eq!(img.seq_indptr, vec![0, 2, 3]);
        assert!(tail.rows(Branch::Text).is_empty());
        assert_eq!(tail.rows(Branch::Text).seq_indptr, vec![0, 0, 0]);
        assert_eq!(tail.logits_rows, vec![0, 1, 2]);
        assert_eq!(tail.logits_branch, Some(Branch::Image));
        assert_eq!(
            (&tail.kv_indptr, &tail.kv_indices, &tail.kv_tags),
            (&plan.kv_indptr, &plan.kv_indices, &plan.kv_tags)
        );
        assert_eq!(tail.pool_slots, plan.pool_slots);
        // Back to sequence 0 after sequence 1: no tail.
        assert!(plan_with(&[5, 2]).logits_tail().is_none());
        // No logits: no tail.
        assert!(plan_with(&[]).logits_tail().is_none());
        // A logits branch without logits rows, and malformed rows: no tail (not a panic).
        let mut empty = plan.clone();
        empty.logits_rows.clear();
        assert!(empty.logits_tail().is_none());
        let image = Branch::Image as usize;
        let mut bad_offsets = plan.clone();
        bad_offsets.branches[image].seq_indptr = vec![1, 2, 6];
        assert!(bad_offsets.logits_tail().is_none());
        let mut extra_seq = plan.clone();
        extra_seq.branches[image].seq_indptr = vec![0, 2, 3, 6];
        assert!(extra_seq.logits_tail().is_none());
        let mut short = plan.clone();
        short.branches[image].slots.pop();
        assert!(short.logits_tail().is_none());
    }

    /// A concatenated plan equals the plan built over all the parts' rows at once, with each
    /// part's sequences and slots moved to its place.
    #[test]
    fn concat_equals_one_builder_over_every_part() {
        let t = Tag::new(Branch::Text, 0, false);
        let im = Tag::new(Branch::Image, 2, true);
        // Part 0: two sequences; part 1: absent; part 2: one sequence.
        let rows0 = [(0, 5, t, 0), (0, 6, im, 1), (1, 7, im, 2), (1, 8, t, 3)];
        let rows2 = [(0, 9, im, 1), (0, 4, t, 0)];
        let build = |rows: &[(u32, u32, Tag, u32)], n_seqs, seq0: u32, base: u32| {
            let mut p = PlanBuilder::new(n_seqs);
            let mut idx = Vec::new();
            for &(seq, id, tag, slot) in rows {
                idx.push(p.row(Row {
                    seq: seq0 + seq,
                    id,
                    pos: slot,
                    tag,
                    slot: base + slot,
                }));
            }
            (p, idx)
        };
        let (mut p0, i0) = build(&rows0, 2, 0, 0);
        p0.cached_key(0, 9, t);
        p0.logits_for(i0[1]);
        p0.logits_for(i0[2]);
        let (mut p2, i2) = build(&rows2, 1, 0, 0);
        p2.logits_for(i2[0]);
        let (a, b) = (p0.build().unwrap(), p2.build().unwrap());
        let parts = [
            PlanPart {
                plan: Some(&a),
                n_seqs: 2,
                slot_base: 0,
                slots: 10,
            },
            PlanPart {
                plan: None,
                n_seqs: 2,
                slot_base: 10,
                slots: 5,
            },
            PlanPart {
                plan: Some(&b),
                n_seqs: 1,
                slot_base: 20,
                slots: 4,
            },
        ];
        let (got, off) = StepPlan::concat(&parts).unwrap();
        // The same rows in one builder over five sequences.
        let mut all = PlanBuilder::new(5);
        let mut idx = Vec::new();
        for &(seq, id, tag, slot) in &rows0 {
            idx.push(all.row(Row {
                seq,
                id,
                pos: slot,
                tag,
                slot,
            }));
        }
        for &(seq, id, tag, slot) in &rows2 {
            idx.push(all.row(Row {
                seq: 4 + seq,
                id,
                pos: slot,
                tag,
                slot: 20 + slot,
            }));
        }
        all.cached_key(0, 9, t);
        for i in [1, 2, 4] {
            all.logits_for(idx[i]);
        }
        assert_eq!(got, all.build().unwrap());
        assert_eq!(off[2].seq, 4);
        assert_eq!(off[2].rows, [2, 2]);
        assert_eq!(off[2].logits, 2);
        assert_eq!((off[2].n_rows, off[2].n_logits), (2, 1));
        assert_eq!((off[1].n_rows, off[1].seq), (0, 2));
        // Overlapping regions and a plan past its region are refused.
        let mut bad = parts;
        bad[2].slot_base = 12;
        assert!(
            StepPlan::concat(&bad)
                .unwrap_err()
                .to_string()
                .contains("inside")
        );
        let mut bad = parts;
        bad[0].slots = 3;
        assert!(
            StepPlan::concat(&bad)
                .unwrap_err()
                .to_string()
                .contains("touches")
        );
    }

    #[test]
    fn builder_rejects_inconsistent_plans() {
        let t = Tag::new(Branch::Text, 0, false);
        let mut p = PlanBuilder::new(1);
        p.row(Row {
            seq: 0,
            id: 1,
            pos: 0,
            tag: t,
            slot: 0,
        });
        p.cached_key(0, 0, t);
        assert!(
            p.build()
                .unwrap_err()
                .to_string()
                .contains("slot 0 used twice")
        );
        let mut p = PlanBuilder::new(1);
        p.row(Row {
            seq: 1,
            id: 1,
            pos: 0,
            tag: t,
            slot: 0,
        });
        assert!(
            p.build()
                .unwrap_err()
                .to_string()
                .contains("sequence 1 of 1")
        );
        let mut p = PlanBuilder::new(1);
        let i = p.row(Row {
            seq: 0,
            id: 1,
            pos: 0,
            tag: t,
            slot: 0,
        });
        let j = p.row(Row {
            seq: 0,
            id: 1,
            pos: 1,
            tag: Tag::new(Branch::Image, 0, false),
            slot: 1,
        });
        p.logits_for(i);
        p.logits_for(j);
        assert!(p.build().unwrap_err().to_string().contains("both branches"));
    }
}

//! The register-token aggregation's formats (`SlAggregateParams` of `kernels/params.h`): the
//! decode progress as the kernel reads it ([`DecodeArrays`]), the inputs of one aggregation and
//! their validation ([`AggregateInputs`]) and the sizes it produces ([`AggregateCounts`]).

use crate::contract::tags::{Branch, MAX_BLOCK};
use crate::error::{Error, Result};

fn bad<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::Input(format!("{op}: {msg}")))
}

/// The decoding progress of a generation as the aggregation kernel reads it (params.h
/// `SlAggregateParams`), flattened from the host's view of it ([`DecodeArrays::from_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeArrays {
    /// `[N]` decoded ids (0 where not decoded).
    pub tokens: Vec<u32>,
    /// `[N]` step at which each response index was decoded, `u32::MAX` if not yet.
    pub decoded_step: Vec<u32>,
    /// `[N]` response indices in decode order (group 0 first), padded with `u32::MAX`.
    pub decoded_order: Vec<u32>,
    /// `[k + 1]` offsets of the groups in `decoded_order`.
    pub group_indptr: Vec<u32>,
}

impl DecodeArrays {
    /// Flattens a decode history: `tokens[i]` is `Some(id)` once response index `i` is decoded,
    /// and `groups[j]` lists the indices decoded at step `j` (in decode order).
    pub fn from_groups(tokens: &[Option<u32>], groups: &[Vec<u32>]) -> Result<DecodeArrays> {
        let n = tokens.len();
        let mut decoded_step = vec![u32::MAX; n];
        let mut decoded_order = Vec::new();
        let mut group_indptr = vec![0u32];
        for (j, group) in groups.iter().enumerate() {
            for &i in group {
                match tokens.get(i as usize) {
                    Some(Some(_)) if decoded_step[i as usize] == u32::MAX => {}
                    _ => {
                        return bad(
                            "decode state",
                            format_args!(
                                "group {j} lists response index {i}, which is out of range, \
                                 not decoded, or listed twice"
                            ),
                        );
                    }
                }
                decoded_step[i as usize] = j as u32;
                decoded_order.push(i);
            }
            group_indptr.push(decoded_order.len() as u32);
        }
        // params.h gives decoded_order N entries; the tail past group_indptr[k] is never read.
        decoded_order.resize(n, u32::MAX);
        Ok(DecodeArrays {
            tokens: tokens.iter().map(|t| t.unwrap_or(0)).collect(),
            decoded_step,
            decoded_order,
            group_indptr,
        })
    }
}

/// Inputs of the aggregation kernel (`sl_aggregate_sparse`): the decode arrays, the step's
/// query, and the pool's slot layout (`[prompt | response | scratch]` per sequence).
#[derive(Debug, Clone, Copy)]
pub struct AggregateInputs<'a> {
    /// `[N]` decoded ids.
    pub tokens: &'a [u32],
    /// `[N]` decode step of each response index (≥ k: not decoded).
    pub decoded_step: &'a [u32],
    /// Response indices in decode order (at least `group_indptr[k]` entries).
    pub decoded_order: &'a [u32],
    /// `[k + 1]` group offsets; the step is `k = group_indptr.len() − 1`.
    pub group_indptr: &'a [u32],
    /// Response indices of the masked block, in logits order.
    pub query: &'a [u32],
    /// Sequences (1, or 2 for a CFG pair).
    pub n_seqs: usize,
    /// Prompt length `P` (the prompt's K/V is in the pool).
    pub prompt_len: usize,
    /// Registers `R`.
    pub n_registers: usize,
    /// Pool slots per sequence (≥ P + N + n_query + R).
    pub slots_per_seq: usize,
    /// The response's `[MASK]` id.
    pub mask_id: u32,
    /// The response's branch.
    pub branch: Branch,
}

/// Sizes of one aggregation, per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateCounts {
    /// The step.
    pub k: u32,
    /// Rows fed: `|group k−1| + n_query + R`.
    pub rows_per_seq: usize,
    /// Keys: `P + (decoded so far) + n_query + R`.
    pub keys_per_seq: usize,
}

impl AggregateInputs<'_> {
    /// Checks the decode arrays' consistency (everything the kernel indexes with), the query and
    /// the slot layout; returns the sizes.
    pub fn validate(&self) -> Result<AggregateCounts> {
        let op = "aggregate";
        let n = self.tokens.len();
        if self.decoded_step.len() != n {
            return bad(
                op,
                format_args!(
                    "decoded_step has {} entries, tokens {n}",
                    self.decoded_step.len()
                ),
            );
        }
        let Some(&decoded) = self.group_indptr.last() else {
            return bad(op, "group_indptr is empty (it needs k + 1 entries)");
        };
        let k = self.group_indptr.len() - 1;
        if self.group_indptr[0] != 0 || self.group_indptr.windows(2).any(|w| w[0] > w[1]) {
            return bad(op, "group_indptr must start at 0 and never decrease");
        }
        let decoded = decoded as usize;
        if decoded > n || decoded > self.decoded_order.len() {
            return bad(
                op,
                format_args!(
                    "group_indptr ends at {decoded}, beyond the {} decode-order entries or the \
                     {n} response positions",
                    self.decoded_order.len()
                ),
            );
        }
        if k as u64 + 1 > u64::from(MAX_BLOCK) {
            return bad(op, format_args!("step {k} is beyond the block range"));
        }
        // The step each index must have, from the groups.
        let mut expected = vec![u32::MAX; n];
        for g in 0..k {
            let range = self.group_indptr[g] as usize..self.group_indptr[g + 1] as usize;
            for &i in &self.decoded_order[range] {
                match expected.get_mut(i as usize) {
                    Some(e) if *e == u32::MAX => *e = g as u32,
                    _ => {
                        return bad(
                            op,
                            format_args!(
                                "decoded_order lists {i} (group {g}) out of range or twice"
                            ),
                        );
                    }
                }
            }
        }
        for (i, (&e, &s)) in expected.iter().zip(self.decoded_step).enumerate() {
            let ok = if e == u32::MAX {
                s as usize >= k
            } else {
                s == e
            };
            if !ok {
                return bad(
                    op,
                    format_args!(
                        "decoded_step[{i}] = {s} disagrees with the groups (expected {})",
                        if e == u32::MAX {
                            format!(">= {k}")
                        } else {
                            e.to_string()
                        }
                    ),
                );
            }
        }
        let mut in_query = vec![false; n];
        for &i in self.query {
            match (expected.get(i as usize), in_query.get_mut(i as usize)) {
                (Some(&u32::MAX), Some(q)) if !*q => *q = true,
                _ => {
                    return bad(
                        op,
                        format_args!(
                            "query index {i} is out of range, already decoded, or repeated"
                        ),
                    );
                }
            }
        }
        if self.n_seqs == 0 {
            return bad(op, "no sequences");
        }
        let (p, r, nq) = (self.prompt_len, self.n_registers, self.query.len());
        let need = p + n + nq + r;
        if self.slots_per_seq < need {
            return bad(
                op,
                format_args!(
                    "slots_per_seq {} is below P + N + n_query + R = {need}",
                    self.slots_per_seq
                ),
            );
        }
        let last_group = if k > 0 {
            (self.group_indptr[k] - self.group_indptr[k - 1]) as usize
        } else {
            0
        };
        let counts = AggregateCounts {
            k: k as u32,
            rows_per_seq: last_group + nq + r,
            keys_per_seq: p + decoded + nq + r,
        };
        let total_slots = self.n_seqs.checked_mul(self.slots_per_seq);
        let total_keys = self.n_seqs.checked_mul(counts.keys_per_seq);
        match (total_slots, total_keys) {
            (Some(s), Some(kk)) if s <= u32::MAX as usize && kk <= u32::MAX as usize => {}
            _ => return bad(op, "the pool layout overflows u32 slot numbers"),
        }
        if p + n + r > u32::MAX as usize {
            return bad(op, "positions overflow u32");
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    /// A decode history: `(tokens, groups)`, token `100 + i` at every decoded index `i`.
    fn state(n: usize, groups: &[&[u32]]) -> (Vec<Option<u32>>, Vec<Vec<u32>>) {
        let mut tokens = vec![None; n];
        for g in groups {
            for &i in *g {
                tokens[i as usize] = Some(100 + i);
            }
        }
        (tokens, groups.iter().map(|g| g.to_vec()).collect())
    }

    #[test]
    fn decode_arrays_and_aggregate_checks() {
        let (tokens, groups) = state(6, &[&[2, 0], &[5]]);
        let d = DecodeArrays::from_groups(&tokens, &groups).unwrap();
        assert_eq!(d.tokens, vec![100, 0, 102, 0, 0, 105]);
        assert_eq!(d.decoded_step, vec![0, u32::MAX, 0, u32::MAX, u32::MAX, 1]);
        assert_eq!(d.decoded_order, vec![2, 0, 5, u32::MAX, u32::MAX, u32::MAX]);
        assert_eq!(d.group_indptr, vec![0, 2, 3]);
        let inp = AggregateInputs {
            tokens: &d.tokens,
            decoded_step: &d.decoded_step,
            decoded_order: &d.decoded_order,
            group_indptr: &d.group_indptr,
            query: &[1, 4],
            n_seqs: 2,
            prompt_len: 3,
            n_registers: 2,
            slots_per_seq: 3 + 12 + 2,
            mask_id: 99,
            branch: Branch::Image,
        };
        let c = inp.validate().unwrap();
        assert_eq!(
            c,
            AggregateCounts {
                k: 2,
                rows_per_seq: 1 + 2 + 2,
                keys_per_seq: 3 + 3 + 2 + 2
            }
        );
        let m = msg(AggregateInputs {
            query: &[1, 5],
            ..inp
        }
        .validate());
        assert!(m.contains("query index 5"), "{m}");
        let m = msg(AggregateInputs {
            query: &[1, 1],
            ..inp
        }
        .validate());
        assert!(m.contains("query index 1"), "{m}");
        let bad_step = [0, u32::MAX, 1, u32::MAX, u32::MAX, 1];
        let m = msg(AggregateInputs {
            decoded_step: &bad_step,
            ..inp
        }
        .validate());
        assert!(m.contains("decoded_step[2] = 1"), "{m}");
        let early = [0, 1, 0, u32::MAX, u32::MAX, 1];
        let m = msg(AggregateInputs {
            decoded_step: &early,
            ..inp
        }
        .validate());
        assert!(m.contains("decoded_step[1]"), "{m}");
        let m = msg(AggregateInputs {
            group_indptr: &[0, 3, 2],
            ..inp
        }
        .validate());
        assert!(m.contains("never decrease"), "{m}");
        let m = msg(AggregateInputs {
            slots_per_seq: 10,
            ..inp
        }
        .validate());
        assert!(m.contains("slots_per_seq 10"), "{m}");
        let m = msg(AggregateInputs {
            decoded_order: &[2, 2, 5, 0, 0, 0],
            ..inp
        }
        .validate());
        assert!(m.contains("twice"), "{m}");
        // A state whose group names an undecoded index is rejected.
        let (mut tokens, groups) = state(3, &[&[0]]);
        tokens[0] = None;
        assert!(DecodeArrays::from_groups(&tokens, &groups).is_err());
    }
}

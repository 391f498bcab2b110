//! Plans resolved on the device: the host twin of `kernels/program.cu`.
//!
//! A device-resident generation (every step queued, or captured as CUDA graphs, before any
//! token is known) cannot build step plans on the host: which response positions a text step
//! decodes depends on the confidences of earlier steps. But the *shape* of every plan — row
//! counts, tags, the attention tiling — is fixed by the request. So each step carries a template
//! [`crate::plan::StepPlan`] (a valid plan for some decode history) and a list of [`Patch`]es
//! that overwrite its data-dependent entries from the generation's [`DeviceState`] just before
//! the step runs; after sampling, [`commit`] records the step's choices in that state.
//!
//! The patch format, the decode state and the commit rule are the kernels'
//! ([`crate::contract::program`]). The functions here are the oracle of the device kernels
//! (`sl_resolve_plan`, `sl_commit`): the same inputs give the same outputs, element for element.

use crate::error::{Error, Result};

pub use crate::contract::program::{
    CommitRule, DeviceState, Field, Lists, Patch, Source, UNDECODED,
};

/// The lists of a step whose block is `[b0, b1)` (empty for t2i).
pub fn lists(state: &DeviceState, block: (u32, u32)) -> Lists {
    let mut l = Lists::default();
    for (i, &s) in state.decoded_step.iter().enumerate() {
        let i = i as u32;
        if s != UNDECODED {
            l.d.push(i);
        } else if (block.0..block.1).contains(&i) {
            l.q.push(i);
        } else {
            l.m.push(i);
        }
    }
    l
}

/// The arrays of one uploaded step plan that patches may write (host views).
#[derive(Debug)]
pub struct PlanArrays<'a> {
    /// Row ids of the program's branch.
    pub row_ids: &'a mut [u32],
    /// Row positions.
    pub row_pos: &'a mut [u32],
    /// Row slots.
    pub row_slots: &'a mut [u32],
    /// Key slots.
    pub kv_indices: &'a mut [u32],
    /// Key tags.
    pub kv_tags: &'a mut [u32],
    /// Logits rows.
    pub logits_rows: &'a mut [u32],
    /// Sampler positions.
    pub sample_pos: &'a mut [u32],
}

impl<'a> PlanArrays<'a> {
    /// Views seven arrays, one per [`Field`] in [`Field::ALL`] order.
    pub fn by_field(arrays: &'a mut [Vec<u32>; 7]) -> PlanArrays<'a> {
        let [
            row_ids,
            row_pos,
            row_slots,
            kv_indices,
            kv_tags,
            logits_rows,
            sample_pos,
        ] = arrays;
        PlanArrays {
            row_ids,
            row_pos,
            row_slots,
            kv_indices,
            kv_tags,
            logits_rows,
            sample_pos,
        }
    }
}

/// The value a patch writes, or `None` when its source reads outside the state or the lists
/// (a malformed program; the device kernel writes nothing then).
pub fn value(p: &Patch, state: &DeviceState, l: &Lists) -> Option<u32> {
    let at = |v: &[u32]| v.get(p.arg as usize).copied();
    let rank = || at(&state.order).filter(|&i| i != UNDECODED);
    Some(match p.source {
        Source::Token => at(&state.tokens)?,
        Source::RankToken => *state.tokens.get(rank()? as usize)?,
        Source::Rank => p.add.wrapping_add(rank()?),
        Source::Query => p.add.wrapping_add(at(&l.q)?),
        Source::Other => p.add.wrapping_add(at(&l.m)?),
        Source::Decoded => p.add.wrapping_add(at(&l.d)?),
        Source::DecodedTag => {
            let s = *state.decoded_step.get(at(&l.d)? as usize)?;
            p.add.wrapping_add(s.wrapping_add(1) << 2)
        }
    })
}

/// Applies `patches` in order (the twin of `sl_resolve_plan`): a patch whose entry is outside
/// its array, or whose source reads outside the state or the lists, writes nothing.
pub fn apply(patches: &[Patch], state: &DeviceState, l: &Lists, out: &mut PlanArrays) {
    for p in patches {
        let Some(v) = value(p, state, l) else {
            continue;
        };
        let dst: &mut [u32] = match p.field {
            Field::RowId => out.row_ids,
            Field::RowPos => out.row_pos,
            Field::RowSlot => out.row_slots,
            Field::KvIndex => out.kv_indices,
            Field::KvTag => out.kv_tags,
            Field::LogitsRow => out.logits_rows,
            Field::SamplePos => out.sample_pos,
        };
        if let Some(e) = dst.get_mut(p.index as usize) {
            *e = v;
        }
    }
}

/// Records a step's choices (the twin of `sl_commit`): among the query's `query[j]` (response
/// indices) with sampled `token[j]` and `confidence[j]`, picks `rule.n_commit` and for the
/// `t`-th pick sets `order[rank_base + t]`, its token and its `decoded_step`. Confidences
/// compare by [`f32::total_cmp`], as on the device.
pub fn commit(
    state: &mut DeviceState,
    query: &[u32],
    token: &[u32],
    confidence: &[f32],
    rule: CommitRule,
) -> Result<()> {
    let n = query.len();
    if token.len() != n || confidence.len() != n || rule.n_commit as usize > n {
        return Err(Error::Input(format!(
            "commit: {n} query positions, {} tokens, {} confidences, {} to commit",
            token.len(),
            confidence.len(),
            rule.n_commit
        )));
    }
    let end = rule.rank_base as usize + rule.n_commit as usize;
    if end > state.len() || query.iter().any(|&i| i as usize >= state.len()) {
        return Err(Error::Input(format!(
            "commit: ranks {}..{end} or a query position outside the response ({})",
            rule.rank_base,
            state.len()
        )));
    }
    let mut picks: Vec<usize> = (0..n).collect();
    if rule.by_confidence {
        picks.sort_by(|&a, &b| {
            confidence[b]
                .total_cmp(&confidence[a])
                .then(query[a].cmp(&query[b]))
        });
    }
    for (t, &j) in picks.iter().take(rule.n_commit as usize).enumerate() {
        let i = query[j];
        state.order[rule.rank_base as usize + t] = i;
        state.tokens[i as usize] = token[j];
        state.decoded_step[i as usize] = rule.step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_the_response() {
        let mut s = DeviceState::new(6, 9);
        s.decoded_step[1] = 0;
        s.decoded_step[4] = 1;
        let l = lists(&s, (2, 5));
        assert_eq!(l.q, vec![2, 3]);
        assert_eq!(l.m, vec![0, 5]);
        assert_eq!(l.d, vec![1, 4]);
    }

    #[test]
    fn commit_by_confidence_breaks_ties_by_position() {
        let mut s = DeviceState::new(5, 9);
        let rule = CommitRule {
            step: 3,
            n_commit: 2,
            rank_base: 1,
            by_confidence: true,
        };
        commit(&mut s, &[4, 0, 2], &[40, 10, 20], &[0.5, 0.25, 0.5], rule).unwrap();
        assert_eq!(s.order, vec![UNDECODED, 2, 4, UNDECODED, UNDECODED]);
        assert_eq!(s.tokens, vec![9, 9, 20, 9, 40]);
        assert_eq!(s.decoded_step[2], 3);
        assert_eq!(s.decoded_step[0], UNDECODED);
    }

    #[test]
    fn patches_read_the_state_and_skip_what_is_out_of_range() {
        let mut s = DeviceState::new(4, 7);
        s.order[0] = 2;
        s.tokens[2] = 11;
        s.decoded_step[2] = 0;
        let l = lists(&s, (0, 2));
        let (mut ids, mut pos, mut slots) = (vec![0; 2], vec![0; 2], vec![0; 2]);
        let (mut kv, mut tags, mut lr, mut sp) = (vec![0; 2], vec![0; 2], vec![0; 1], vec![0; 1]);
        let p = |field, index, source, arg, add| Patch {
            field,
            index,
            source,
            arg,
            add,
        };
        let patches = [
            p(Field::RowId, 0, Source::RankToken, 0, 0),
            p(Field::RowPos, 0, Source::Rank, 0, 100),
            p(Field::RowSlot, 1, Source::Query, 1, 50),
            p(Field::KvIndex, 0, Source::Decoded, 0, 5),
            p(Field::KvTag, 0, Source::DecodedTag, 0, 0),
            p(Field::LogitsRow, 0, Source::Other, 0, 1),
            p(Field::SamplePos, 0, Source::Token, 3, 0),
            // Out of range: rank 1 undecoded, entry 2 past the array.
            p(Field::RowId, 1, Source::RankToken, 1, 0),
            p(Field::KvIndex, 2, Source::Decoded, 0, 5),
        ];
        let mut out = PlanArrays {
            row_ids: &mut ids,
            row_pos: &mut pos,
            row_slots: &mut slots,
            kv_indices: &mut kv,
            kv_tags: &mut tags,
            logits_rows: &mut lr,
            sample_pos: &mut sp,
        };
        apply(&patches, &s, &l, &mut out);
        assert_eq!(ids, vec![11, 0]);
        assert_eq!(pos, vec![102, 0]);
        assert_eq!(slots, vec![0, 51]);
        assert_eq!(kv, vec![7, 0]);
        assert_eq!(tags, vec![1 << 2, 0]);
        assert_eq!(lr, vec![4]);
        assert_eq!(sp, vec![7]);
    }
}

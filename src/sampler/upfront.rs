//! Every plan of a text-to-image generation, built before sampling (groundwork for capturing
//! the whole generation as one CUDA graph).
//!
//! For t2i the schedule, the decode order and the pool slots are fixed by the request, so every
//! step's [`StepPlan`] is known up front except for the ids of rows decoded at earlier steps.
//! Those rows carry [`PLACEHOLDER`], and a [`TokenFill`] says which sampled token replaces each.
//! The plans come from the same [`prefill_plan`] / [`dense_plan`](super::dense_plan) / [`sparse_plan`](super::sparse_plan) as the
//! incremental run, fed a [`DecodeState`] whose decoded tokens are placeholders, so no plan
//! logic is duplicated.

use super::{DecodeState, Decoder, Mode, T2iRequest, prefill_plan, prefills, step_plan, t2i_setup};
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::{REGISTER, StepPlan};

/// The id an up-front plan carries for a token that is sampled at an earlier step of the same
/// generation. It is never a valid token id (vocabularies are far smaller, which
/// [`t2i_upfront_plans`] checks) and differs from [`REGISTER`].
pub const PLACEHOLDER: u32 = u32::MAX - 1;
const _: () = assert!(PLACEHOLDER != REGISTER);

/// Every plan of a t2i generation, built before sampling: the token ids that are not known yet
/// (rows of groups decoded at earlier steps) are [`PLACEHOLDER`]s, and `fills` says where each
/// sampled token must be written.
#[derive(Debug, Clone, PartialEq)]
pub struct UpfrontPlans {
    /// The prefill (sparse mode with a cached, non-empty prompt), run before step 0.
    pub prefill: Option<StepPlan>,
    /// The plan of each step, in step order.
    pub steps: Vec<StepPlan>,
    /// Every placeholder row of `steps`, one fill per row (a CFG pair's two sequences get one
    /// fill each for the same sampled token), sorted by `(to_step, row)`.
    pub fills: Vec<TokenFill>,
    /// The branch of the response: fills index `steps[to_step].rows(branch).ids`.
    pub branch: Branch,
}

/// After step `from_step` samples its i-th query position (`sample_index`, in the sampler's
/// output order for the conditional rows), its token goes to row `row` (index into
/// `plans[to_step].rows(branch).ids`) of step `to_step`. Always `to_step > from_step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenFill {
    /// The step that samples the token.
    pub from_step: u32,
    /// The token's index among that step's sampled tokens (its query order).
    pub sample_index: u32,
    /// The step whose plan reads the token.
    pub to_step: u32,
    /// Index into `steps[to_step].rows(branch).ids`.
    pub row: u32,
}

impl UpfrontPlans {
    /// Writes sampled tokens into the placeholder rows: `sampled[k][j]` is the token step `k`
    /// sampled for its `j`-th query position. Fails (changing nothing) when a fill points
    /// outside `sampled`; fills of steps not yet sampled need their entries anyway, so pass the
    /// whole generation's tokens.
    pub fn apply_fills(&mut self, sampled: &[Vec<u32>]) -> Result<()> {
        let mut writes = Vec::with_capacity(self.fills.len());
        for f in &self.fills {
            let tok = sampled
                .get(f.from_step as usize)
                .and_then(|s| s.get(f.sample_index as usize))
                .ok_or_else(|| {
                    Error::Input(format!(
                        "upfront plans: no sampled token {} of step {}",
                        f.sample_index, f.from_step
                    ))
                })?;
            let len = (self.steps.get(f.to_step as usize)).map_or(0, |p| p.rows(self.branch).len());
            if f.row as usize >= len {
                return Err(Error::Input(format!(
                    "upfront plans: fill row {} of step {} is out of range ({len} rows)",
                    f.row, f.to_step
                )));
            }
            writes.push((f.to_step as usize, f.row as usize, *tok));
        }
        for (k, row, tok) in writes {
            self.steps[k].branches[self.branch as usize].ids[row] = tok;
        }
        Ok(())
    }
}

/// Builds every plan of the t2i generation `req` would run in `mode` on a model configured by
/// `model_cfg`, before any sampling (see [`UpfrontPlans`]). Checks the request exactly as
/// generation does.
pub fn t2i_upfront_plans(model_cfg: &Config, req: &T2iRequest, mode: Mode) -> Result<UpfrontPlans> {
    let (l, dec) = t2i_setup(model_cfg, req)?;
    if model_cfg.vocab(l.branch) as u64 >= PLACEHOLDER as u64 {
        return Err(Error::Config(format!(
            "the {:?} vocabulary ({}) reaches the placeholder id {PLACEHOLDER}",
            l.branch,
            model_cfg.vocab(l.branch)
        )));
    }
    let prefilled = prefills(mode, &l);
    let prefill = if prefilled {
        Some(prefill_plan(&l)?)
    } else {
        None
    };
    let mut st = DecodeState {
        tokens: vec![None; l.n],
        groups: Vec::new(),
    };
    // (step, index in that step's query) of each decoded response index.
    let mut decoded_at: Vec<Option<(u32, u32)>> = vec![None; l.n];
    let mut steps = Vec::with_capacity(dec.steps());
    let mut fills = Vec::new();
    for k in 0..dec.steps() {
        let query = dec.query(k, &st);
        let plan = step_plan(&l, &st, &query, k, mode, prefilled)?;
        // Placeholder rows are response rows, at RoPE position P + response index.
        let rows = plan.rows(l.branch);
        for (row, (&id, &pos)) in rows.ids.iter().zip(&rows.pos).enumerate() {
            if id != PLACEHOLDER {
                continue;
            }
            let at = (pos as usize)
                .checked_sub(l.p())
                .and_then(|i| decoded_at.get(i).copied().flatten());
            let Some((from_step, sample_index)) = at else {
                return Err(Error::Input(format!(
                    "upfront plans: step {k} row {row} (position {pos}) holds a placeholder \
                     for no decoded response index"
                )));
            };
            fills.push(TokenFill {
                from_step,
                sample_index,
                to_step: k as u32,
                row: row as u32,
            });
        }
        // What the run commits for t2i: every query position, in query order.
        for (j, &i) in query.iter().enumerate() {
            st.tokens[i as usize] = Some(PLACEHOLDER);
            decoded_at[i as usize] = Some((k as u32, j as u32));
        }
        st.groups.push(query);
        steps.push(plan);
    }
    Ok(UpfrontPlans {
        prefill,
        steps,
        fills,
        branch: l.branch,
    })
}

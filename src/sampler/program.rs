//! Host programs for device-resident generation: every step of a generation, fixed before any
//! token is known.
//!
//! A [`Program`] holds, per step, a template [`StepPlan`] and the [`Patch`]es that turn it into
//! the plan the host loop ([`super::Sampling`]) would build at that step, whatever was decoded
//! before ([`patch`] is the contract with the device kernels). The templates come from the same
//! [`prefill_plan`] / [`dense_plan`](super::dense_plan) / [`sparse_plan`](super::sparse_plan)
//! as the incremental run, fed a *canonical* decode history; the patches are read off the template by asking, for each entry that names a
//! response index, which list of the state that index belongs to:
//!
//! | entry of the template                         | patch (value = source + add)             |
//! |-----------------------------------------------|------------------------------------------|
//! | t2i: the id of a row decoded at step `j < k`  | `RankToken(rank)` (the order is fixed)   |
//! | text dense: the id of response index `i`      | `Token(i)`                               |
//! | text sparse: a fed decoded row of rank `r`    | id `RankToken(r)`, pos and slot `Rank(r)` |
//! | text sparse: a masked row of the step's block | pos `Query(s)`                           |
//! | text sparse: another mask (no truncation)     | pos `Other(j)`                           |
//! | text sparse: the key of decoded index `d[j]`  | slot `Decoded(j)`, tag `DecodedTag(j)`   |
//! | text dense: logits row `s`                    | `Query(s)` + row of response index 0     |
//! | text: sampler position `s`                    | `Query(s)` + P                           |
//!
//! This works because the *shape* of every step is fixed by the request: t2i decodes a fixed
//! order, and a text step decodes in a fixed block with fixed commit counts, so which rows exist,
//! their tags and the attention's key counts do not depend on the history; only which response
//! indices fill them does. Keys are slot-sorted (prompt < response < scratch), so the decoded
//! keys appear in ascending response index: exactly the list `d`.
//!
//! The executors run programs: the device-resident one on the CUDA backend, and the host
//! interpreter (`exec::run_program`), which runs the device-resident algorithm through any
//! backend, op for op, and which tests hold equal to the host loop.

use super::batch::Region;
use super::patch::{self, CommitRule, DeviceState, Field, Lists, Patch, PlanArrays, Source};
use super::{
    DecodeState, Decoder, Layout, Mode, T2iRequest, Task, TextRequest, prefill_plan, prefills,
    step_plan, t2i_setup, t2i_upfront_plans, text_setup,
};
use crate::backend::SampleParams;
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::{PartOffsets, PlanPart, StepPlan, Tag};
use patch::UNDECODED;

/// The token a template holds where the real one is only known at run time (patched before
/// the step runs): a valid id in both vocabularies, so a template is itself a runnable plan.
pub const CANONICAL_TOKEN: u32 = 0;

/// One step of a [`Program`]: a template plan, its patches, and how the step commits.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProgram {
    /// The template: the plan the host loop builds at this step after a canonical history
    /// (text: each earlier step committed the lowest undecoded indices of its block; t2i: the
    /// real order), with [`CANONICAL_TOKEN`] for every token decoded earlier.
    pub plan: StepPlan,
    /// What to overwrite before the step runs; distinct `(field, index)` pairs, every index
    /// inside its array. Row fields index `plan.rows(program.branch)`.
    pub patches: Vec<Patch>,
    /// Text: the step's block `[b0, b1)` of response indices (its query is [`patch::Lists::q`]);
    /// t2i: `(0, 0)`.
    pub block: (u32, u32),
    /// T2i: the response indices of the logits rows, in row order (fixed); text: `None`.
    pub query: Option<Vec<u32>>,
    /// The template's sampler positions (prompt length + query index), patched through
    /// [`Field::SamplePos`].
    pub sample_positions: Vec<u32>,
    /// How the step records its choices in the [`DeviceState`].
    pub commit: CommitRule,
}

/// Every step of a generation, fixed before sampling (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The prompt prefill (sparse mode with a cached, non-empty prompt); it has no patches.
    pub prefill: Option<StepPlan>,
    /// The steps, in order.
    pub steps: Vec<StepProgram>,
    /// The response's branch: patches' row fields index `plan.rows(branch)`.
    pub branch: Branch,
    /// Response length `N`.
    pub n: usize,
    /// The response's `[MASK]` id: the state starts as `DeviceState::new(n, mask_id)`.
    pub mask_id: u32,
    /// K/V pool slots of the whole sequence set.
    pub pool_slots: usize,
    /// The sampler's parameters shared by every step; `step` and `positions` are set per step.
    pub params: SampleParams,
}

/// One step's trace as [`Program::traces`] rebuilds it: (query positions, decoded positions in
/// decode order, their tokens).
pub type ProgramTrace = (Vec<u32>, Vec<u32>, Vec<u32>);

impl StepProgram {
    /// The host twin of what the device does before this step: computes the lists of `state`
    /// for the step's block, applies the patches to a copy of the template, and returns the
    /// resolved plan, the sampler positions and the query (response indices of the logits
    /// rows, conditional sequence).
    pub fn resolve(&self, branch: Branch, state: &DeviceState) -> (StepPlan, Vec<u32>, Vec<u32>) {
        let mut plan = self.plan.clone();
        let mut tags = plain_tags(&plan);
        let (positions, query) = apply_patches(
            &mut plan,
            &mut tags,
            branch,
            state,
            (
                &self.patches,
                self.block,
                &self.sample_positions,
                &self.query,
            ),
        );
        plan.kv_tags = tags.into_iter().map(Tag).collect();
        (plan, positions, query)
    }
}

/// The device stores tags as plain u32; patches write them in that form.
fn plain_tags(plan: &StepPlan) -> Vec<u32> {
    plan.kv_tags.iter().map(|t| t.0).collect()
}

/// A step's `(patches, block, sample positions, query)`, of a [`StepProgram`] or a [`StepPart`].
type ProgramPart<'a> = (&'a [Patch], (u32, u32), &'a [u32], &'a Option<Vec<u32>>);

/// Applies one program's `(patches, block, sample positions, query)` for `state` to `plan`
/// (its tags in `tags`, as [`plain_tags`]); returns the sampler positions and the query.
fn apply_patches(
    plan: &mut StepPlan,
    tags: &mut [u32],
    branch: Branch,
    state: &DeviceState,
    (patches, block, sample_positions, query): ProgramPart,
) -> ResolvedPart {
    let lists = patch::lists(state, block);
    let mut positions = sample_positions.to_vec();
    let rows = &mut plan.branches[branch as usize];
    let mut arrays = PlanArrays {
        row_ids: &mut rows.ids,
        row_pos: &mut rows.pos,
        row_slots: &mut rows.slots,
        kv_indices: &mut plan.kv_indices,
        kv_tags: tags,
        logits_rows: &mut plan.logits_rows,
        sample_pos: &mut positions,
    };
    patch::apply(patches, state, &lists, &mut arrays);
    (positions, query.clone().unwrap_or(lists.q))
}

impl Program {
    /// The program of a generation laid out by `l` and decoded by `dec`.
    fn of(
        l: &Layout,
        dec: &dyn Decoder,
        prefill: Option<StepPlan>,
        steps: Vec<StepProgram>,
    ) -> Program {
        Program {
            prefill,
            steps,
            branch: l.branch,
            n: l.n,
            mask_id: l.mask_id,
            pool_slots: l.pool_slots(),
            params: dec.base_params().clone(),
        }
    }

    /// The per-step traces of a finished generation, from its final state: for step `k`, the
    /// query (t2i: fixed; text: [`patch::Lists::q`] of the state before step `k`, i.e. with the
    /// positions whose `decoded_step < k` decoded), the positions committed
    /// (`order[rank_base .. rank_base + n_commit]`) and their tokens. Fails when the state does
    /// not have the program's length or does not record every commit of every step.
    pub fn traces(&self, final_state: &DeviceState) -> Result<Vec<ProgramTrace>> {
        let steps = self
            .steps
            .iter()
            .map(|s| (s.query.as_deref(), s.block, s.commit));
        traces(self.n, steps, final_state)
    }

    /// The most rows per branch (indexed by `Branch as usize`) any plan of the program feeds,
    /// prefill included: the size of per-branch workspaces.
    pub fn max_rows(&self) -> [usize; 2] {
        let plans = self
            .prefill
            .iter()
            .chain(self.steps.iter().map(|s| &s.plan));
        plans.fold([0, 0], |m, p| {
            Branch::ALL.map(|b| m[b as usize].max(p.rows(b).len()))
        })
    }

    /// The most positions any step samples (the sampler's output rows, per sequence).
    pub fn max_query(&self) -> usize {
        (self.steps.iter())
            .map(|s| s.sample_positions.len())
            .max()
            .unwrap_or(0)
    }
}

/// [`Program::traces`] over the steps' (fixed query, block, commit rule) of one request.
fn traces<'a>(
    n: usize,
    steps: impl Iterator<Item = (Option<&'a [u32]>, (u32, u32), CommitRule)>,
    final_state: &DeviceState,
) -> Result<Vec<ProgramTrace>> {
    let st = final_state;
    if st.tokens.len() != n || st.order.len() != n || st.decoded_step.len() != n {
        return Err(Error::Input(format!(
            "program traces: the state has {} tokens, {} ranks and {} decode steps for a \
             response of {n}",
            st.tokens.len(),
            st.order.len(),
            st.decoded_step.len()
        )));
    }
    let mut out = Vec::new();
    for (k, (query, block, commit)) in steps.enumerate() {
        let query = match query {
            Some(q) => q.to_vec(),
            None => {
                let before = DeviceState {
                    tokens: st.tokens.clone(),
                    order: st.order.clone(),
                    decoded_step: (st.decoded_step.iter())
                        .map(|&d| if d < k as u32 { d } else { UNDECODED })
                        .collect(),
                };
                patch::lists(&before, block).q
            }
        };
        let ranks = commit.ranks();
        let Some(decoded) = st.order.get(ranks.clone()) else {
            return Err(Error::Input(format!(
                "program traces: step {k} commits ranks {ranks:?}, past the response ({n})"
            )));
        };
        let mut tokens = Vec::with_capacity(decoded.len());
        for (r, &i) in ranks.zip(decoded) {
            if st.decoded_step.get(i as usize) != Some(&(k as u32)) {
                return Err(Error::Input(format!(
                    "program traces: rank {r} of step {k} is response index {i}, which the \
                     state does not record as decoded at step {k}"
                )));
            }
            tokens.push(st.tokens[i as usize]);
        }
        out.push((query, decoded.to_vec(), tokens));
    }
    Ok(out)
}

/// The program of `task` in `mode` on a model configured by `cfg`.
pub fn program(cfg: &Config, task: &Task, mode: Mode) -> Result<Program> {
    match task {
        Task::T2i(req) => t2i_program(cfg, req, mode),
        Task::Text(req) => text_program(cfg, req, mode),
    }
}

/// The program of a text-to-image request. The decode order is fixed, so every template is the
/// real plan of its step with [`CANONICAL_TOKEN`] for the tokens decoded earlier, and the only
/// patches are those ids: a [`t2i_upfront_plans`] fill (token `sample_index` of step
/// `from_step`) reads the token of rank `rank_base(from_step) + sample_index`.
pub fn t2i_program(cfg: &Config, req: &T2iRequest, mode: Mode) -> Result<Program> {
    let (l, dec) = t2i_setup(cfg, req)?;
    let mut up = t2i_upfront_plans(cfg, req, mode)?;
    let mut rank_base = Vec::with_capacity(dec.groups.len());
    let mut ranks = 0u32;
    for g in &dec.groups {
        rank_base.push(ranks);
        ranks += g.len() as u32;
    }
    let mut patches: Vec<Vec<Patch>> = vec![Vec::new(); up.steps.len()];
    for f in &up.fills {
        patches[f.to_step as usize].push(Patch {
            field: Field::RowId,
            index: f.row,
            source: Source::RankToken,
            arg: rank_base[f.from_step as usize] + f.sample_index,
            add: 0,
        });
    }
    let canonical: Vec<Vec<u32>> = (dec.groups.iter())
        .map(|g| vec![CANONICAL_TOKEN; g.len()])
        .collect();
    up.apply_fills(&canonical)?;
    let empty = DecodeState {
        tokens: Vec::new(),
        groups: Vec::new(),
    };
    let steps = (up.steps.into_iter().zip(patches).enumerate())
        .map(|(k, (plan, patches))| {
            let query = dec.query(k, &empty);
            StepProgram {
                plan,
                patches,
                block: (0, 0),
                sample_positions: dec.params(k, &query, l.p()).positions,
                commit: CommitRule {
                    step: k as u32,
                    n_commit: query.len() as u32,
                    rank_base: rank_base[k],
                    by_confidence: false,
                },
                query: Some(query),
            }
        })
        .collect();
    Ok(Program::of(&l, &dec, up.prefill, steps))
}

/// The program of a text-answer request. Each template is the plan after a canonical history
/// in which every earlier step committed the lowest undecoded indices of its block (patch
/// [`patch::commit`] with equal confidences picks exactly those); the patches re-point every
/// entry that names a response index to the list of the state that index stands for.
pub fn text_program(cfg: &Config, req: &TextRequest, mode: Mode) -> Result<Program> {
    let (l, dec) = text_setup(cfg, req)?;
    let prefilled = prefills(mode, &l);
    let prefill = if prefilled {
        Some(prefill_plan(&l)?)
    } else {
        None
    };
    let mut canon = DeviceState::new(l.n, l.mask_id);
    let mut rank_base = 0u32;
    let mut steps = Vec::with_capacity(dec.schedule.len());
    for (k, s) in dec.schedule.iter().enumerate() {
        let range = crate::schedule::text_block_range(l.n, dec.block_len, s.block);
        let block = (range.start as u32, range.end as u32);
        let host = decode_state(&canon, k);
        let query = dec.query(k, &host);
        let plan = step_plan(&l, &host, &query, k, mode, prefilled)?;
        let sample_positions = dec.params(k, &query, l.p()).positions;
        let lists = patch::lists(&canon, block);
        debug_assert_eq!(lists.q, query, "the host query is the device's list q");
        let patches = text_patches(&l, mode, &canon, &lists, block, &plan, &sample_positions)?;
        let commit = CommitRule {
            step: k as u32,
            n_commit: s.commit as u32,
            rank_base,
            by_confidence: true,
        };
        // The canonical commit: equal confidences, so ties go to the lowest positions.
        let tokens = vec![CANONICAL_TOKEN; query.len()];
        patch::commit(&mut canon, &query, &tokens, &vec![0.0; query.len()], commit)?;
        rank_base += s.commit as u32;
        steps.push(StepProgram {
            plan,
            patches,
            block,
            query: None,
            sample_positions,
            commit,
        });
    }
    Ok(Program::of(&l, &dec, prefill, steps))
}

/// The host sampler's view of a device state after `steps` steps: tokens, and the groups in
/// decode order (rank order within a step).
fn decode_state(st: &DeviceState, steps: usize) -> DecodeState {
    let decoded = |i: usize| st.decoded_step[i] != UNDECODED;
    let mut groups = vec![Vec::new(); steps];
    for &i in st.order.iter().take_while(|&&i| i != UNDECODED) {
        groups[st.decoded_step[i as usize] as usize].push(i);
    }
    DecodeState {
        tokens: (0..st.len())
            .map(|i| decoded(i).then_some(st.tokens[i]))
            .collect(),
        groups,
    }
}

/// The patches of one text step, read off its template `plan` built from the canonical state
/// `canon` (whose lists for the step are `lists`); see the table in the module docs.
fn text_patches(
    l: &Layout,
    mode: Mode,
    canon: &DeviceState,
    lists: &Lists,
    block: (u32, u32),
    plan: &StepPlan,
    sample_positions: &[u32],
) -> Result<Vec<Patch>> {
    let (p, n) = (l.p() as u32, l.n as u32);
    // Where each response index of the canonical state sits in the lists and the ranks.
    let index_in = |list: &[u32]| {
        let mut at = vec![None; l.n];
        for (j, &i) in list.iter().enumerate() {
            at[i as usize] = Some(j as u32);
        }
        at
    };
    let (in_q, in_m, in_d) = (index_in(&lists.q), index_in(&lists.m), index_in(&lists.d));
    let decoded_order: Vec<u32> = (canon.order.iter())
        .copied()
        .take_while(|&i| i != UNDECODED)
        .collect();
    let rank = index_in(&decoded_order);
    let missing = |what: &str, i: u32| {
        Error::Input(format!(
            "text program: template entry at response index {i} is not {what} in the canonical \
             state (a plan/patch mismatch)"
        ))
    };
    let response_index = |pos: u32| pos.checked_sub(p).filter(|&i| i < n);
    // Dense rows of indices that cannot be decoded yet (past the block, or in a block no step
    // has committed in) stay masks; every other dense row reads its token.
    let block_started = decoded_order.len() as u32 > block.0;
    let may_be_decoded = |i: u32| i < block.0 || (i < block.1 && block_started);

    let mut out = Vec::new();
    let mut push = |field, index: usize, source, arg: u32, add: u32| {
        out.push(Patch {
            field,
            index: index as u32,
            source,
            arg,
            add,
        })
    };
    let rows = plan.rows(l.branch);
    for (x, (&pos, (&tag, &slot))) in (rows.pos.iter())
        .zip(rows.tags.iter().zip(&rows.slots))
        .enumerate()
    {
        // Prompt rows and registers are the same in every history.
        let Some(i) = response_index(pos) else {
            continue;
        };
        match mode {
            Mode::Dense => {
                if may_be_decoded(i) {
                    push(Field::RowId, x, Source::Token, i, 0);
                }
            }
            Mode::Sparse(_) if !tag.masked() => {
                // A decoded row fed this step: its token, position and slot follow its rank.
                let r = rank[i as usize].ok_or_else(|| missing("decoded", i))?;
                push(Field::RowId, x, Source::RankToken, r, 0);
                push(Field::RowPos, x, Source::Rank, r, pos - i);
                push(Field::RowSlot, x, Source::Rank, r, slot - i);
            }
            Mode::Sparse(_) => {
                // A mask: its scratch slot is fixed, its position is that of a list entry.
                let (source, j) = match (in_q[i as usize], in_m[i as usize]) {
                    (Some(s), _) => (Source::Query, s),
                    (None, Some(j)) => (Source::Other, j),
                    (None, None) => return Err(missing("undecoded", i)),
                };
                push(Field::RowPos, x, source, j, pos - i);
            }
        }
    }
    if let Mode::Sparse(_) = mode {
        // Undecoded rows write scratch slots, so the keys at response slots are the decoded
        // indices, ascending: key `j` of that range is `d[j]`.
        let clean = Tag::new(l.branch, 0, false).0;
        for seq in 0..plan.n_seqs {
            let first = l.base(seq) + p;
            let keys = plan.kv_indptr[seq] as usize..plan.kv_indptr[seq + 1] as usize;
            for x in keys {
                let slot = plan.kv_indices[x];
                let Some(i) = slot.checked_sub(first).filter(|&i| i < n) else {
                    continue;
                };
                let j = in_d[i as usize].ok_or_else(|| missing("decoded", i))?;
                push(Field::KvIndex, x, Source::Decoded, j, slot - i);
                push(Field::KvTag, x, Source::DecodedTag, j, clean);
            }
        }
    }
    if mode == Mode::Dense {
        // Dense logits rows are the query's own response rows, at a fixed offset (text runs
        // one sequence: one logits row per query entry).
        if plan.logits_rows.len() != lists.q.len() {
            return Err(Error::Input(format!(
                "text program: {} logits rows for a query of {}",
                plan.logits_rows.len(),
                lists.q.len()
            )));
        }
        for (s, (&row, &i)) in plan.logits_rows.iter().zip(&lists.q).enumerate() {
            push(Field::LogitsRow, s, Source::Query, s as u32, row - i);
        }
    }
    for (s, (&pos, &i)) in sample_positions.iter().zip(&lists.q).enumerate() {
        push(Field::SamplePos, s, Source::Query, s as u32, pos - i);
    }
    Ok(out)
}

/// A part of a resolved [`BatchStep`]: its sampler positions and its query (response indices
/// of its logits rows), as [`StepProgram::resolve`] gives them.
pub type ResolvedPart = (Vec<u32>, Vec<u32>);

/// One request's share of a [`BatchStep`]: what [`StepProgram`] holds, re-pointed into the
/// step's batch plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPart {
    /// The request (index into [`BatchProgram::requests`]).
    pub request: usize,
    /// Where its rows, keys and logits rows start in the step's plan, and its slot base.
    pub offsets: PartOffsets,
    /// Its [`StepProgram::patches`], moved to the batch plan: row, key and logits-row entries
    /// by the part's offsets, slot values by its region's base and logits-row values by its
    /// first row; [`Field::SamplePos`] entries index the part's own `sample_positions`.
    pub patches: Vec<Patch>,
    /// See [`StepProgram::block`].
    pub block: (u32, u32),
    /// See [`StepProgram::query`].
    pub query: Option<Vec<u32>>,
    /// See [`StepProgram::sample_positions`].
    pub sample_positions: Vec<u32>,
    /// See [`StepProgram::commit`].
    pub commit: CommitRule,
}

/// One step of a [`BatchProgram`]: the batch's template plan and each active request's part,
/// in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStep {
    /// The requests' templates side by side ([`StepPlan::concat`]).
    pub plan: StepPlan,
    /// The requests with this step, in request order.
    pub parts: Vec<StepPart>,
}

/// What a [`BatchProgram`] keeps of one request besides its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestProgram {
    /// Response length `N`.
    pub n: usize,
    /// The response's `[MASK]` id (its state starts as `DeviceState::new(n, mask_id)`).
    pub mask_id: u32,
    /// Its sampler parameters ([`Program::params`]).
    pub params: SampleParams,
    /// Its sequences and pool region.
    pub region: Region,
    /// Its steps: it takes part in batch steps `0..steps`.
    pub steps: usize,
    /// Rows it feeds in the batch's prefill (0: it has none).
    pub prefill_rows: usize,
}

/// A batch's device-resident generation: the requests' [`Program`]s side by side (see
/// [`super::batch`]). Step `k`'s plan is the concatenation of the templates of the requests
/// with a step `k`; each request's patches are re-pointed into it, so that resolving every
/// part against its own request's state gives the plan the host loop builds for the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchProgram {
    /// The prefill of every request that prefills, as one plan (no patches).
    pub prefill: Option<StepPlan>,
    /// The steps: as many as the longest request's.
    pub steps: Vec<BatchStep>,
    /// The requests, in batch order.
    pub requests: Vec<RequestProgram>,
    /// The responses' branch (one task per batch).
    pub branch: Branch,
    /// K/V pool slots of the whole batch.
    pub pool_slots: usize,
}

impl StepPart {
    /// Moves a request's patch into the batch plan (see [`StepPart::patches`]).
    fn shift(p: Patch, off: &PartOffsets, branch: Branch) -> Patch {
        let base = off.slot_base as u32;
        let rows = off.rows[branch as usize] as u32;
        let (index, add) = match p.field {
            Field::RowId | Field::RowPos => (p.index + rows, p.add),
            Field::RowSlot => (p.index + rows, p.add.wrapping_add(base)),
            Field::KvIndex => (p.index + off.keys as u32, p.add.wrapping_add(base)),
            Field::KvTag => (p.index + off.keys as u32, p.add),
            Field::LogitsRow => (p.index + off.logits as u32, p.add.wrapping_add(rows)),
            Field::SamplePos => (p.index, p.add),
        };
        Patch { index, add, ..p }
    }
}

impl BatchStep {
    /// The host twin of the device's work before this step: resolves every part against its
    /// request's state (`states[request]`) into one copy of the template. Returns the plan and,
    /// per part, its sampler positions and query (as [`StepProgram::resolve`]).
    pub fn resolve(&self, branch: Branch, states: &[DeviceState]) -> (StepPlan, Vec<ResolvedPart>) {
        let mut plan = self.plan.clone();
        let mut tags = plain_tags(&plan);
        let out = (self.parts.iter())
            .map(|part| {
                apply_patches(
                    &mut plan,
                    &mut tags,
                    branch,
                    &states[part.request],
                    (
                        &part.patches,
                        part.block,
                        &part.sample_positions,
                        &part.query,
                    ),
                )
            })
            .collect();
        plan.kv_tags = tags.into_iter().map(Tag).collect();
        (plan, out)
    }
}

impl BatchProgram {
    /// Places `programs` (each compiled alone, e.g. by [`program()`]) side by side. Errors:
    /// no programs, programs of different branches, a program without steps, a pool past
    /// 2^31 slots.
    pub fn new(programs: Vec<Program>) -> Result<BatchProgram> {
        let Some(branch) = programs.first().map(|p| p.branch) else {
            return Err(Error::Input(
                "a batch program needs at least one request".into(),
            ));
        };
        let mut sizes = Vec::with_capacity(programs.len());
        for (i, p) in programs.iter().enumerate() {
            if p.branch != branch {
                return Err(Error::Input(format!(
                    "batch program: request {i} answers in another branch than request 0"
                )));
            }
            let Some(first) = p.steps.first() else {
                return Err(Error::Input(format!(
                    "batch program: request {i} has no step"
                )));
            };
            sizes.push((first.plan.n_seqs, p.pool_slots));
        }
        let regions = super::batch::regions(sizes)?;
        let concat = |plans: &[Option<&StepPlan>]| {
            let parts: Vec<PlanPart> = (regions.iter().zip(plans))
                .map(|(r, &p)| r.part(p))
                .collect();
            StepPlan::concat(&parts)
        };
        let prefills: Vec<Option<&StepPlan>> =
            programs.iter().map(|p| p.prefill.as_ref()).collect();
        let prefill = match prefills.iter().any(Option::is_some) {
            true => Some(concat(&prefills)?.0),
            false => None,
        };
        let n_steps = programs.iter().map(|p| p.steps.len()).max().unwrap_or(0);
        let mut steps = Vec::with_capacity(n_steps);
        for k in 0..n_steps {
            let plans: Vec<Option<&StepPlan>> = programs
                .iter()
                .map(|p| p.steps.get(k).map(|s| &s.plan))
                .collect();
            let (plan, offsets) = concat(&plans)?;
            let parts = (programs.iter().enumerate())
                .filter_map(|(i, p)| p.steps.get(k).map(|s| (i, s)))
                .map(|(i, s)| StepPart {
                    request: i,
                    offsets: offsets[i],
                    patches: (s.patches.iter())
                        .map(|&p| StepPart::shift(p, &offsets[i], branch))
                        .collect(),
                    block: s.block,
                    query: s.query.clone(),
                    sample_positions: s.sample_positions.clone(),
                    commit: s.commit,
                })
                .collect();
            steps.push(BatchStep { plan, parts });
        }
        let requests = (programs.into_iter().zip(&regions))
            .map(|(p, &region)| RequestProgram {
                n: p.n,
                mask_id: p.mask_id,
                params: p.params,
                region,
                steps: p.steps.len(),
                prefill_rows: p.prefill.as_ref().map_or(0, StepPlan::n_rows),
            })
            .collect();
        Ok(BatchProgram {
            prefill,
            steps,
            requests,
            branch,
            pool_slots: regions.last().map_or(0, |r| r.slot_base + r.slots),
        })
    }

    /// Request `i`'s per-step traces from its final state, as [`Program::traces`].
    pub fn traces(&self, i: usize, final_state: &DeviceState) -> Result<Vec<ProgramTrace>> {
        let steps = (self.steps.iter())
            .filter_map(|s| s.parts.iter().find(|p| p.request == i))
            .map(|p| (p.query.as_deref(), p.block, p.commit));
        traces(self.requests[i].n, steps, final_state)
    }

    /// The most rows per branch any plan of the batch feeds, prefill included.
    pub fn max_rows(&self) -> [usize; 2] {
        let plans = (self.prefill.iter()).chain(self.steps.iter().map(|s| &s.plan));
        plans.fold([0, 0], |m, p| {
            Branch::ALL.map(|b| m[b as usize].max(p.rows(b).len()))
        })
    }

    /// The most logits rows any step computes.
    pub fn max_logits(&self) -> usize {
        (self.steps.iter())
            .map(|s| s.plan.logits_rows.len())
            .max()
            .unwrap_or(0)
    }
}

/// The program of a batch of `requests` in `mode` (checked as [`super::BatchSampling::new`]
/// checks it, naming the request at fault).
pub fn batch_program(cfg: &Config, requests: &[Task], mode: Mode) -> Result<BatchProgram> {
    super::check_batch(requests)?;
    let len = requests.len();
    let programs = (requests.iter().enumerate())
        .map(|(i, r)| program(cfg, r, mode).map_err(|e| super::batch::in_request(len, i, e)))
        .collect::<Result<Vec<_>>>()?;
    BatchProgram::new(programs)
}

#[cfg(test)]
mod tests {
    //! Model-free: `resolve` against the host sampler's own plans, queries, positions and commit
    //! rule (private to `sampler`, hence here), over random decode histories.

    use super::*;
    use crate::backend::Sampled;
    use crate::schedule::Order;
    use proptest::prelude::*;

    /// Seeded draws for confidences and tokens.
    struct Stream(rand_chacha::ChaCha8Rng);
    impl Stream {
        fn new(seed: u64) -> Stream {
            Stream(rand::SeedableRng::seed_from_u64(seed))
        }
        fn next(&mut self) -> u64 {
            rand::RngCore::next_u64(&mut self.0)
        }
        fn sampled(&mut self, len: usize, vocab: u64, levels: u64) -> Vec<Sampled> {
            (0..len)
                .map(|_| Sampled {
                    token: (self.next() % vocab) as u32,
                    confidence: (self.next() % levels) as f32 / levels as f32,
                    lse: 0.0,
                })
                .collect()
        }
    }

    fn assert_same_state(host: &DecodeState, dev: &DeviceState, steps: usize, what: &str) {
        let seen = decode_state(dev, steps);
        assert_eq!(seen.tokens, host.tokens, "{what}: tokens");
        assert_eq!(seen.groups, host.groups, "{what}: groups");
    }

    /// Runs both samplers' bookkeeping side by side on random confidences: at every step the
    /// resolved plan, query and positions equal the host's, and after every commit both
    /// states agree.
    fn check(cfg: &Config, task: &Task, seed: u64, levels: u64) {
        let (l, dec): (Layout, Box<dyn Decoder>) = match task {
            Task::T2i(req) => {
                let (l, d) = t2i_setup(cfg, req).unwrap();
                (l, Box::new(d))
            }
            Task::Text(req) => {
                let (l, d) = text_setup(cfg, req).unwrap();
                (l, Box::new(d))
            }
        };
        let vocab = cfg.vocab(l.branch) as u64;
        for mode in Mode::all() {
            let prog = program(cfg, task, mode).unwrap();
            let prefilled = prefills(mode, &l);
            let want_prefill = prefilled.then(|| prefill_plan(&l).unwrap());
            assert_eq!(prog.prefill, want_prefill, "{mode}: prefill");
            assert_eq!(prog.steps.len(), dec.steps(), "{mode}");
            assert_eq!((prog.n, prog.mask_id), (l.n, l.mask_id), "{mode}");
            assert_eq!(prog.pool_slots, l.pool_slots(), "{mode}");
            let mut host = DecodeState {
                tokens: vec![None; l.n],
                groups: Vec::new(),
            };
            let mut dev = DeviceState::new(l.n, l.mask_id);
            let mut rng = Stream::new(seed);
            for (k, step) in prog.steps.iter().enumerate() {
                let what = format!("{mode} step {k}");
                let mut fields = std::collections::HashSet::new();
                for p in &step.patches {
                    assert!(fields.insert((p.field, p.index)), "{what}: {p:?} twice");
                }
                let query = dec.query(k, &host);
                let want = step_plan(&l, &host, &query, k, mode, prefilled).unwrap();
                let (plan, positions, q) = step.resolve(prog.branch, &dev);
                assert_eq!(plan, want, "{what}: plan");
                assert_eq!(q, query, "{what}: query");
                assert_eq!(positions, dec.params(k, &query, l.p()).positions, "{what}");

                let sampled = rng.sampled(query.len(), vocab, levels);
                let committed = dec.commit(k, &query, &sampled);
                for &(i, tok) in &committed {
                    host.tokens[i as usize] = Some(tok);
                }
                host.groups
                    .push(committed.iter().map(|&(i, _)| i).collect());
                let tokens: Vec<u32> = sampled.iter().map(|s| s.token).collect();
                let conf: Vec<f32> = sampled.iter().map(|s| s.confidence).collect();
                patch::commit(&mut dev, &q, &tokens, &conf, step.commit).unwrap();
                assert_same_state(&host, &dev, k + 1, &what);
            }
            assert!(dev.decoded_step.iter().all(|&d| d != UNDECODED), "{mode}");
            // The traces rebuilt from the final state are the run's.
            let traces = prog.traces(&dev).unwrap();
            let mut replay = DecodeState {
                tokens: vec![None; l.n],
                groups: Vec::new(),
            };
            for (k, (q, decoded, tokens)) in traces.iter().enumerate() {
                assert_eq!(q, &dec.query(k, &replay), "{mode} step {k}: traced query");
                assert_eq!(decoded, &host.groups[k], "{mode} step {k}: traced group");
                for (&i, &t) in decoded.iter().zip(tokens) {
                    assert_eq!(host.tokens[i as usize], Some(t), "{mode} step {k}");
                    replay.tokens[i as usize] = Some(t);
                }
                replay.groups.push(decoded.clone());
            }
        }
    }

    fn prompt(len: usize, seed: u64) -> Vec<u32> {
        (0..len as u64)
            .map(|i| ((i * 7919 + seed * 104_729) % 299) as u32)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn text_resolve_equals_the_incremental_plan(
            seed in any::<u64>(), plen in 0usize..5, answer_len in 1usize..40,
            block_len in 1usize..12, steps_frac in 0.0f64..1.0, levels in 1u64..6,
        ) {
            let nblocks = answer_len.div_ceil(block_len);
            // Between one step per block and one per position; a short last block may not take
            // its share of steps, which the schedule rejects (tested in tests/programs.rs).
            let steps = nblocks + ((answer_len - nblocks) as f64 * steps_frac) as usize;
            prop_assume!(crate::schedule::text_schedule(answer_len, block_len, steps).is_ok());
            let cfg = Config::preset("tiny").unwrap();
            let req = TextRequest {
                prompt: prompt(plen, seed),
                answer_len,
                block_len,
                steps,
                temperature: 1.0,
                banned: vec![3],
                seed,
            };
            check(&cfg, &Task::Text(req), seed, levels);
        }

        #[test]
        fn t2i_resolve_equals_the_incremental_plan(
            seed in any::<u64>(), plen in 0usize..5, h in 1usize..5, w in 1usize..6,
            steps_frac in 0.0f64..1.0, cfg_on in any::<bool>(), order in 0usize..3,
        ) {
            let n = h * w;
            let cfg = Config::preset("tiny").unwrap();
            let req = T2iRequest {
                prompt: prompt(plen, seed),
                height: h,
                width: w,
                steps: 1 + ((n - 1) as f64 * steps_frac) as usize,
                guidance: if cfg_on { 3.0 } else { 0.0 },
                temperature: 1.0,
                order: Order::ALL[order],
                seed,
            };
            check(&cfg, &Task::T2i(req), seed, 4);
        }
    }

    #[test]
    fn templates_are_plans_of_real_histories_and_patches_stay_in_range() {
        let cfg = Config::preset("tiny").unwrap();
        let req = TextRequest {
            prompt: prompt(3, 1),
            answer_len: 11,
            block_len: 4,
            steps: 7,
            temperature: 0.0,
            banned: Vec::new(),
            seed: 5,
        };
        for mode in Mode::all() {
            let prog = text_program(&cfg, &req, mode).unwrap();
            for (k, s) in prog.steps.iter().enumerate() {
                let rows = s.plan.rows(prog.branch).len();
                for p in &s.patches {
                    let len = match p.field {
                        Field::RowId | Field::RowPos | Field::RowSlot => rows,
                        Field::KvIndex | Field::KvTag => s.plan.kv_indices.len(),
                        Field::LogitsRow => s.plan.logits_rows.len(),
                        Field::SamplePos => s.sample_positions.len(),
                    };
                    assert!((p.index as usize) < len, "{mode} step {k}: {p:?}");
                }
                // Canonical tokens are real ids: the template uploads as it is.
                let ids = &s.plan.rows(prog.branch).ids;
                assert!(
                    ids.iter()
                        .all(|&id| id == crate::plan::REGISTER || (id as usize) < cfg.text_vocab),
                    "{mode} step {k}"
                );
            }
        }
    }
}

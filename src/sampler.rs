//! The samplers (SPEC §4): text-to-image and text answers, each in `dense` mode (the LaViDa-O
//! baseline) or `sparse` mode under the three switches of SPEC §4.3, compiled into what an
//! executor runs: a [`Sampling`] (each step's plan from the decode state, for the host loop) or
//! a [`Program`] (every step's template plan and patches, fixed before sampling, for a
//! device-resident run). The executors that run them are `exec`'s; the records they produce
//! ([`Generation`], [`StepTrace`]) and the options they honour ([`RunOptions`]) are defined here.
//!
//! Every step is: decide the rows of the step (a [`StepPlan`]), run one forward pass, sample.
//! The pool layout of one sequence is fixed for the whole generation:
//!
//! ```text
//! slot:  0 .. P       P .. P+N                      P+N .. P+2N+R
//!        prompt       response positions (by index)  scratch: masked block, registers, other masks
//! ```
//!
//! A decoded token's K/V lands at its response slot the step after it is decoded and stays
//! there (no copy when it is retired into the cache); masked rows and registers write scratch
//! slots that the next step reuses.

use crate::backend::{SampleParams, Sampled};
use crate::bail_input;
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::{MAX_BLOCK, PlanBuilder, REGISTER, Row, StepPlan, Tag};
use crate::schedule::{self, Order, TextStep};
use serde::{Deserialize, Serialize};

pub mod batch;
pub mod patch;
pub mod program;
mod upfront;
pub use batch::{BatchSampling, Region, Request, check_batch};
pub use program::{
    BatchProgram, BatchStep, CANONICAL_TOKEN, Program, ProgramTrace, RequestProgram, ResolvedPart,
    StepPart, StepProgram, batch_program, program, t2i_program, text_program,
};
pub use upfront::{PLACEHOLDER, TokenFill, UpfrontPlans, t2i_upfront_plans};

/// The three independent savings of Sparse-LaViDa (SPEC §4.3, the paper's Table 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switches {
    /// Prefill the prompt once instead of recomputing it every step.
    pub cache_prompt: bool,
    /// Append each decoded group's K/V once instead of recomputing all decoded groups.
    pub cache_decoded: bool,
    /// Feed only the masks decoded this step plus registers, not every remaining mask.
    pub truncate: bool,
}

impl Switches {
    /// All three savings on (the default sparse mode).
    pub const ALL_ON: Switches = Switches {
        cache_prompt: true,
        cache_decoded: true,
        truncate: true,
    };

    /// The eight combinations, all-on first.
    pub fn all_combinations() -> Vec<Switches> {
        (0..8)
            .map(|i| Switches {
                cache_prompt: i & 4 == 0,
                cache_decoded: i & 2 == 0,
                truncate: i & 1 == 0,
            })
            .collect()
    }
}

/// How each step is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// LaViDa-O: every token (masks included) recomputed every step, full bidirectional attention,
    /// no registers.
    Dense,
    /// Sparse-LaViDa: step-causal attention, registers, and the given savings.
    Sparse(Switches),
}

impl Mode {
    /// Dense, then sparse under each of the eight switch combinations (all-on first).
    pub fn all() -> Vec<Mode> {
        let mut modes = vec![Mode::Dense];
        modes.extend(Switches::all_combinations().into_iter().map(Mode::Sparse));
        modes
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Dense => write!(f, "dense"),
            Mode::Sparse(s) => write!(
                f,
                "sparse[{}{}{}]",
                if s.cache_prompt { "P" } else { "-" },
                if s.cache_decoded { "D" } else { "-" },
                if s.truncate { "T" } else { "-" }
            ),
        }
    }
}

/// A text-to-image request (SPEC §4.1).
#[derive(Debug, Clone, PartialEq)]
pub struct T2iRequest {
    /// Prompt text ids.
    pub prompt: Vec<u32>,
    /// Grid height.
    pub height: usize,
    /// Grid width.
    pub width: usize,
    /// Steps `K` (≤ height·width).
    pub steps: usize,
    /// CFG scale; 0 runs one sequence.
    pub guidance: f32,
    /// Gumbel temperature (0 = argmax).
    pub temperature: f32,
    /// Decode order.
    pub order: Order,
    /// Philox seed (also seeds the order's shuffles).
    pub seed: u64,
}

/// A text-answer request (SPEC §4.2).
#[derive(Debug, Clone, PartialEq)]
pub struct TextRequest {
    /// Prompt text ids.
    pub prompt: Vec<u32>,
    /// Answer length `G`.
    pub answer_len: usize,
    /// Semi-autoregressive block length `S`.
    pub block_len: usize,
    /// Steps in total.
    pub steps: usize,
    /// Gumbel temperature (0 = argmax).
    pub temperature: f32,
    /// Ids that never win besides the text `[MASK]`.
    pub banned: Vec<u32>,
    /// Philox seed.
    pub seed: u64,
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Text-to-image.
    T2i(T2iRequest),
    /// Text answer.
    Text(TextRequest),
}

/// What happened at one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepTrace {
    /// Step index, from 0.
    pub step: usize,
    /// Response indices (0-based within the response) decoded this step, in decode order.
    pub decoded_positions: Vec<u32>,
    /// The ids chosen for `decoded_positions`.
    pub tokens: Vec<u32>,
    /// Rows fed to the forward pass of this step.
    pub rows_fed: usize,
    /// Time of the step (plan, forward, sampling), seconds, on the backend's
    /// [`crate::backend::StepClock`]: on the CUDA backend the stream's time between an event
    /// recorded at the step's start and one after its last op (gaps while the stream waits for
    /// the host included); wall time on the CPU.
    pub time_s: f64,
    /// Response indices whose logits were computed (the masked block), in logits row order.
    #[serde(skip)]
    pub query_positions: Vec<u32>,
    /// The step's logits `[rows, V]` (conditional rows, then unconditional for CFG), when
    /// [`RunOptions::record_logits`] is set.
    #[serde(skip)]
    pub logits: Option<Vec<f32>>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The response's token ids, by response index.
    pub tokens: Vec<u32>,
    /// One entry per step.
    pub steps: Vec<StepTrace>,
    /// Forward passes run (steps, plus the prefill in sparse mode with a cached prompt).
    pub forwards: usize,
    /// Rows fed over the whole generation (prefill included).
    pub rows_fed: usize,
    /// Wall time of the whole generation, seconds.
    pub wall_s: f64,
    /// Host seconds spent before the first step could start, included in `wall_s`: for a
    /// device-resident run, uploading every plan and capturing and instantiating the CUDA
    /// graphs; 0 for the host loop.
    pub setup_s: f64,
    /// How the generation ran.
    pub execution: Execution,
    /// CUDA graphs launched (0 unless [`Execution::Graphs`]): one for a text-to-image batch,
    /// one for the reset and prefill plus one per step for a text batch. Shared by every
    /// request of the batch.
    pub graphs: usize,
}

impl Generation {
    /// Mean rows fed per step (prefill rows included in the total).
    pub fn mean_rows(&self) -> f64 {
        self.rows_fed as f64 / self.steps.len().max(1) as f64
    }
}

/// A callback seeing each plan a run executes: `None` for the prefill, `Some(k)` for step `k`.
pub type PlanHook<'a> = dyn FnMut(Option<usize>, &StepPlan) + 'a;

/// Options of a run: recording and progress (which do not change the result) and teacher
/// forcing (which does).
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Keep each step's logits in the trace (tests).
    pub record_logits: bool,
    /// Called after each step with (steps done, steps in total).
    pub progress: Option<&'a mut dyn FnMut(usize, usize)>,
    /// Teacher forcing: step `k` commits `teacher[k]`'s `decoded_positions` / `tokens` instead
    /// of its own choice (the sampler still runs first), so that two backends see identical
    /// inputs at every step and their logits can be compared step by step. Every teacher
    /// position must be one the step computes logits for, and every token inside the
    /// response's vocabulary. A batch of one only.
    pub teacher: Option<&'a [StepTrace]>,
    /// Called with every plan the run executes, before its forward pass: `None` for the
    /// prefill, `Some(k)` for step `k` (tests compare them with [`t2i_upfront_plans`]).
    pub on_plan: Option<&'a mut PlanHook<'a>>,
}

/// The fixed facts of one generation: sequence set, lengths, branches, slot layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Prompt ids per sequence (the unconditional one is all text `[MASK]`).
    pub prompts: Vec<Vec<u32>>,
    /// Response length `N`.
    pub n: usize,
    /// Registers `R`.
    pub r: usize,
    /// The response's branch.
    pub branch: Branch,
    /// The response's `[MASK]` id.
    pub mask_id: u32,
    /// Branch skipped after the joint layers.
    pub skip: Option<Branch>,
    /// Pool slots per sequence.
    pub slots_per_seq: usize,
}

impl Layout {
    fn new(cfg: &Config, prompts: Vec<Vec<u32>>, n: usize, branch: Branch) -> Result<Layout> {
        let p = prompts[0].len();
        let r = cfg.n_registers;
        // Positions and slots are u32 in plans and tags; checked so that no size wraps.
        let too_long = p
            .checked_add(n)
            .and_then(|v| v.checked_add(r))
            .is_none_or(|v| v as u64 >= (1u64 << 31) / prompts.len() as u64);
        if too_long {
            return Err(Error::Input(format!(
                "sequence too long: prompt {p} + response {n} + {r} registers"
            )));
        }
        let skip = (branch == Branch::Image).then_some(Branch::Text);
        Ok(Layout {
            prompts,
            n,
            r,
            branch,
            mask_id: cfg.mask_id(branch),
            skip,
            slots_per_seq: p + 2 * n + r,
        })
    }

    /// Prompt length `P`.
    pub fn p(&self) -> usize {
        self.prompts[0].len()
    }

    /// Sequences in the set.
    pub fn n_seqs(&self) -> usize {
        self.prompts.len()
    }

    /// Pool slots for the whole set.
    pub fn pool_slots(&self) -> usize {
        self.n_seqs() * self.slots_per_seq
    }

    fn base(&self, seq: usize) -> u32 {
        (seq * self.slots_per_seq) as u32
    }

    fn prompt_row(&self, seq: usize, j: usize) -> Row {
        let tag = Tag::new(Branch::Text, 0, false);
        Row {
            seq: seq as u32,
            id: self.prompts[seq][j],
            pos: j as u32,
            tag,
            slot: self.base(seq) + j as u32,
        }
    }

    fn response_row(&self, seq: usize, i: usize, id: u32, tag: Tag) -> Row {
        let slot = self.base(seq) + (self.p() + i) as u32;
        Row {
            seq: seq as u32,
            id,
            pos: (self.p() + i) as u32,
            tag,
            slot,
        }
    }

    fn scratch_row(&self, seq: usize, j: usize, id: u32, pos: usize, tag: Tag) -> Row {
        let slot = self.base(seq) + (self.p() + self.n + j) as u32;
        Row {
            seq: seq as u32,
            id,
            pos: pos as u32,
            tag,
            slot,
        }
    }
}

/// Decoding progress: the token at each response index and the groups in decode order.
#[derive(Debug, Clone)]
pub struct DecodeState {
    /// `Some(id)` once decoded.
    pub tokens: Vec<Option<u32>>,
    /// `groups[j]` = response indices decoded at step `j` (0-based); clean block `j + 1`.
    pub groups: Vec<Vec<u32>>,
}

/// The plan of a sparse prefill: the prompt of every sequence, no logits.
pub fn prefill_plan(l: &Layout) -> Result<StepPlan> {
    let mut pb = PlanBuilder::new(l.n_seqs());
    pb.skip_after_joint(l.skip);
    for seq in 0..l.n_seqs() {
        for j in 0..l.p() {
            pb.row(l.prompt_row(seq, j));
        }
    }
    pb.build()
}

/// The plan of a dense step: prompt and every response position (masks included) in clean block
/// 0, no registers; logits for `query` (response indices).
pub fn dense_plan(l: &Layout, st: &DecodeState, query: &[u32]) -> Result<StepPlan> {
    let mut pb = PlanBuilder::new(l.n_seqs());
    pb.skip_after_joint(l.skip);
    // Sequences are pushed in order, so logits come out conditional rows first.
    for seq in 0..l.n_seqs() {
        for j in 0..l.p() {
            pb.row(l.prompt_row(seq, j));
        }
        let tag = Tag::new(l.branch, 0, false);
        let index_of: Vec<usize> = (st.tokens.iter().enumerate())
            .map(|(i, t)| pb.row(l.response_row(seq, i, t.unwrap_or(l.mask_id), tag)))
            .collect();
        for &i in query {
            pb.logits_for(index_of[i as usize]);
        }
    }
    pb.build()
}

/// The plan of sparse step `k` (0-based): `query` (response indices) form the masked block with
/// the registers; decoded groups and the prompt are fed or read from the cache per `sw`
/// (`prefilled`: the prompt's K/V is already in the pool).
pub fn sparse_plan(
    l: &Layout,
    st: &DecodeState,
    query: &[u32],
    k: usize,
    sw: Switches,
    prefilled: bool,
) -> Result<StepPlan> {
    let mut pb = PlanBuilder::new(l.n_seqs());
    pb.skip_after_joint(l.skip);
    let masked_block = k as u32 + 1;
    let other_block = MAX_BLOCK;
    let mut in_query = vec![false; l.n];
    for &i in query {
        in_query[i as usize] = true;
    }
    // Sequences are pushed in order, so logits come out conditional rows first.
    for seq in 0..l.n_seqs() {
        for j in 0..l.p() {
            let row = l.prompt_row(seq, j);
            if sw.cache_prompt && prefilled {
                pb.cached_key(row.seq, row.slot, row.tag);
            } else {
                pb.row(row);
            }
        }
        // Group j (decoded at step j) is clean block j + 1; with `cache_decoded` only the newest
        // group (decoded at step k − 1) is fed, the older ones are already in the pool.
        for (j, group) in st.groups.iter().enumerate() {
            let tag = Tag::new(l.branch, j as u32 + 1, false);
            for &i in group {
                let id = st.tokens[i as usize].expect("decoded");
                let row = l.response_row(seq, i as usize, id, tag);
                if sw.cache_decoded && j + 1 < st.groups.len() {
                    pb.cached_key(row.seq, row.slot, row.tag);
                } else {
                    pb.row(row);
                }
            }
        }
        let tag = Tag::new(l.branch, masked_block, true);
        let mut scratch = 0;
        for &i in query {
            let pos = l.p() + i as usize;
            let row = pb.row(l.scratch_row(seq, scratch, l.mask_id, pos, tag));
            pb.logits_for(row);
            scratch += 1;
        }
        for r in 0..l.r {
            let pos = l.p() + l.n + r;
            pb.row(l.scratch_row(seq, scratch, REGISTER, pos, tag));
            scratch += 1;
        }
        if !sw.truncate {
            let tag = Tag::new(l.branch, other_block, true);
            for (i, (t, &q)) in st.tokens.iter().zip(&in_query).enumerate() {
                if t.is_none() && !q {
                    pb.row(l.scratch_row(seq, scratch, l.mask_id, l.p() + i, tag));
                    scratch += 1;
                }
            }
        }
    }
    pb.build()
}

/// Whether a run in `mode` prefills the prompt before step 0 (sparse, prompt cached and not
/// empty).
fn prefills(mode: Mode, l: &Layout) -> bool {
    matches!(mode, Mode::Sparse(sw) if sw.cache_prompt) && l.p() > 0
}

/// The plan of step `k` in `mode` from the decode state `st` (`prefilled`: see [`prefills`]).
fn step_plan(
    l: &Layout,
    st: &DecodeState,
    query: &[u32],
    k: usize,
    mode: Mode,
    prefilled: bool,
) -> Result<StepPlan> {
    match mode {
        Mode::Dense => dense_plan(l, st, query),
        Mode::Sparse(sw) => sparse_plan(l, st, query, k, sw, prefilled),
    }
}

/// Checks prompt ids: each inside the text vocabulary and not the text \[MASK\]. A prompt is
/// clean text (block 0); a \[MASK\] id there would be embedded as a token that is not a mask to
/// attention, which no request means (the unconditional CFG prompt of \[MASK\] ids is built
/// here, not given).
pub fn check_prompt(cfg: &Config, prompt: &[u32]) -> Result<()> {
    for (i, &id) in prompt.iter().enumerate() {
        if id as usize >= cfg.text_vocab {
            return Err(Error::Input(format!(
                "prompt token {i} is {id}, outside the text vocabulary (0..{})",
                cfg.text_vocab
            )));
        }
        if id == cfg.text_mask_id {
            return Err(Error::Input(format!(
                "prompt token {i} is {id}, the text [MASK] id: a prompt holds clean text ids \
                 (the unconditional prompt of classifier-free guidance is made of [MASK] ids \
                 internally)"
            )));
        }
    }
    Ok(())
}

/// Checks the step count against the block tags: step `k` decodes masked block `k + 1`.
fn check_steps(steps: usize) -> Result<()> {
    if steps >= MAX_BLOCK as usize {
        return Err(Error::Input(format!(
            "{steps} steps: at most {} fit a block tag",
            MAX_BLOCK - 1
        )));
    }
    Ok(())
}

fn check_sampling(temperature: f32) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::Input(format!(
            "temperature must be finite and ≥ 0, got {temperature}"
        )));
    }
    Ok(())
}

/// How a generation is executed on a backend that can keep it on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    /// The host loop (`exec::host`): each step's plan built on the host, uploaded, run op by op,
    /// its tokens read back before the next step is planned.
    Eager,
    /// Device-resident without graphs: every plan uploaded before the first step, every step
    /// queued without a host round trip (plans patched, tokens sampled and committed on the
    /// device). Same work as [`Execution::Graphs`], launched op by op (to tell a capture problem
    /// from a device-program one).
    Queued,
    /// Device-resident and captured as CUDA graphs: a text-to-image generation as one graph, a
    /// text answer as one graph per step, launched back to back.
    Graphs,
}

impl std::fmt::Display for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Execution::Eager => "eager",
            Execution::Queued => "queued",
            Execution::Graphs => "graphs",
        })
    }
}

/// What a step decodes: given the step's logits for its query positions, which response
/// indices get which tokens.
trait Decoder {
    /// Steps in total.
    fn steps(&self) -> usize;
    /// Response indices whose logits step `k` needs.
    fn query(&self, k: usize, st: &DecodeState) -> Vec<u32>;
    /// The most indices any step's [`Decoder::query`] returns.
    fn max_query(&self) -> usize;
    /// Sampler parameters shared by every step (step and positions are filled per step).
    fn base_params(&self) -> &SampleParams;
    /// Sampler parameters for step `k`: the Philox step and the sampled rows' positions.
    fn params(&self, k: usize, query: &[u32], p: usize) -> SampleParams {
        let positions = query.iter().map(|&i| (p + i as usize) as u32).collect();
        SampleParams {
            step: k as u32,
            positions,
            ..self.base_params().clone()
        }
    }
    /// Picks the (index, token) pairs to commit, in decode order.
    fn commit(&self, k: usize, query: &[u32], sampled: &[Sampled]) -> Vec<(u32, u32)>;
}

struct T2iDecoder {
    groups: Vec<Vec<u32>>,
    params: SampleParams,
}

impl Decoder for T2iDecoder {
    fn steps(&self) -> usize {
        self.groups.len()
    }
    fn max_query(&self) -> usize {
        self.groups.iter().map(Vec::len).max().unwrap_or(0)
    }
    fn query(&self, k: usize, _: &DecodeState) -> Vec<u32> {
        self.groups[k].clone()
    }
    fn base_params(&self) -> &SampleParams {
        &self.params
    }
    fn commit(&self, _: usize, query: &[u32], sampled: &[Sampled]) -> Vec<(u32, u32)> {
        query
            .iter()
            .zip(sampled)
            .map(|(&i, s)| (i, s.token))
            .collect()
    }
}

struct TextDecoder {
    schedule: Vec<TextStep>,
    answer_len: usize,
    block_len: usize,
    params: SampleParams,
}

impl Decoder for TextDecoder {
    fn steps(&self) -> usize {
        self.schedule.len()
    }
    /// A step queries the still-masked positions of its block.
    fn max_query(&self) -> usize {
        let blocks = self.schedule.iter().map(|s| s.block);
        blocks
            .map(|b| schedule::text_block_range(self.answer_len, self.block_len, b).len())
            .max()
            .unwrap_or(0)
    }
    fn query(&self, k: usize, st: &DecodeState) -> Vec<u32> {
        let range =
            schedule::text_block_range(self.answer_len, self.block_len, self.schedule[k].block);
        range
            .filter(|&i| st.tokens[i].is_none())
            .map(|i| i as u32)
            .collect()
    }
    fn base_params(&self) -> &SampleParams {
        &self.params
    }
    fn commit(&self, k: usize, query: &[u32], sampled: &[Sampled]) -> Vec<(u32, u32)> {
        // Highest confidence first; ties to the lower position.
        let mut order: Vec<usize> = (0..query.len()).collect();
        order.sort_by(|&a, &b| {
            sampled[b]
                .confidence
                .total_cmp(&sampled[a].confidence)
                .then(query[a].cmp(&query[b]))
        });
        order.truncate(self.schedule[k].commit);
        order
            .into_iter()
            .map(|j| (query[j], sampled[j].token))
            .collect()
    }
}

/// Checks a t2i request and fixes everything known before sampling: the layout, and the decoder
/// with its groups (the response indices each step decodes, in decode order).
fn t2i_setup(cfg: &Config, req: &T2iRequest) -> Result<(Layout, T2iDecoder)> {
    check_prompt(cfg, &req.prompt)?;
    check_sampling(req.temperature)?;
    if !(req.guidance.is_finite() && req.guidance >= 0.0) {
        return Err(Error::Input(format!(
            "guidance must be finite and ≥ 0, got {}",
            req.guidance
        )));
    }
    check_steps(req.steps)?;
    // The grid's size and the layout first: they refuse an oversized request before the
    // order and the schedule allocate per cell.
    let n = match req.height.checked_mul(req.width) {
        Some(0) => bail_input!("image order: zero-size grid {}x{}", req.height, req.width),
        Some(n) if n <= u32::MAX as usize => n,
        _ => bail_input!(
            "grid {}x{} has more than u32::MAX cells",
            req.height,
            req.width
        ),
    };
    let mut prompts = vec![req.prompt.clone()];
    if req.guidance > 0.0 {
        prompts.push(vec![cfg.text_mask_id; req.prompt.len()]);
    }
    let layout = Layout::new(cfg, prompts, n, Branch::Image)?;
    if req.steps > n {
        bail_input!(
            "shift schedule: steps (K) must be ≤ positions (N), got K = {}, N = {n}",
            req.steps
        );
    }
    let order = schedule::image_order(req.order, req.height, req.width, req.seed)?;
    let counts = schedule::shift_counts(n, req.steps)?;
    let mut groups = Vec::with_capacity(counts.len());
    let mut next = 0;
    for c in counts {
        groups.push(order[next..next + c].to_vec());
        next += c;
    }
    let params = SampleParams {
        guidance: (req.guidance > 0.0).then_some(req.guidance),
        temperature: req.temperature,
        banned: Vec::new(),
        seed: req.seed,
        step: 0,
        request: 0,
        positions: Vec::new(),
    };
    Ok((layout, T2iDecoder { groups, params }))
}

/// Checks a text request and fixes everything known before sampling: the layout, and the decoder
/// with its schedule (block and commit count of every step).
fn text_setup(cfg: &Config, req: &TextRequest) -> Result<(Layout, TextDecoder)> {
    check_prompt(cfg, &req.prompt)?;
    check_sampling(req.temperature)?;
    check_steps(req.steps)?;
    schedule::check_text_steps(req.answer_len, req.block_len, req.steps)?;
    let mut banned = vec![cfg.text_mask_id];
    for &id in &req.banned {
        if id as usize >= cfg.text_vocab {
            return Err(Error::Input(format!(
                "banned id {id} is outside the text vocabulary (0..{})",
                cfg.text_vocab
            )));
        }
        banned.push(id);
    }
    // Every step must have an id to choose; checked before the layout and schedule allocate.
    let mut distinct = banned.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() >= cfg.text_vocab {
        return Err(Error::Input(format!(
            "every id of the text vocabulary ({}) is banned ([MASK] included): nothing to sample",
            cfg.text_vocab
        )));
    }
    let layout = Layout::new(cfg, vec![req.prompt.clone()], req.answer_len, Branch::Text)?;
    let schedule = schedule::text_schedule(req.answer_len, req.block_len, req.steps)?;
    let params = SampleParams {
        guidance: None,
        temperature: req.temperature,
        banned,
        seed: req.seed,
        step: 0,
        request: 0,
        positions: Vec::new(),
    };
    let dec = TextDecoder {
        schedule,
        answer_len: req.answer_len,
        block_len: req.block_len,
        params,
    };
    Ok((layout, dec))
}

/// A generation compiled for the host loop: its layout, its decoder (which positions each step
/// decodes, with which sampler parameters, and which of them it commits) and its mode. The host
/// executor drives it step by step from a [`DecodeState`]; [`program()`] compiles the same request
/// for a device-resident run. Building it checks the whole request (prompt ids, sampling
/// parameters, sizes, the schedule) before anything is allocated on a backend.
pub struct Sampling {
    layout: Layout,
    decoder: Box<dyn Decoder>,
    mode: Mode,
    prefilled: bool,
}

impl Sampling {
    /// Checks `task` against `cfg` and fixes everything known before sampling.
    pub fn new(cfg: &Config, task: &Task, mode: Mode) -> Result<Sampling> {
        let (layout, decoder): (Layout, Box<dyn Decoder>) = match task {
            Task::T2i(req) => {
                let (l, d) = t2i_setup(cfg, req)?;
                (l, Box::new(d))
            }
            Task::Text(req) => {
                let (l, d) = text_setup(cfg, req)?;
                (l, Box::new(d))
            }
        };
        let prefilled = prefills(mode, &layout);
        Ok(Sampling {
            layout,
            decoder,
            mode,
            prefilled,
        })
    }

    /// The generation's layout (sequences, lengths, branch, pool slots).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Steps in total.
    pub fn steps(&self) -> usize {
        self.decoder.steps()
    }

    /// The decode state before the first step: nothing decoded.
    pub fn start(&self) -> DecodeState {
        DecodeState {
            tokens: vec![None; self.layout.n],
            groups: Vec::new(),
        }
    }

    /// Whether the mode runs a prompt prefill before step 0 (sparse with the prompt cached and
    /// not empty); the steps' plans then read the prompt's K/V from the cache.
    pub fn prefills(&self) -> bool {
        self.prefilled
    }

    /// The prompt prefill's plan (see [`Sampling::prefills`]).
    pub fn prefill_plan(&self) -> Result<StepPlan> {
        prefill_plan(&self.layout)
    }

    /// The most response indices any step computes logits for, per sequence (the largest
    /// group of a t2i schedule, the longest block of a text answer).
    pub fn max_query(&self) -> usize {
        self.decoder.max_query()
    }

    /// The response indices step `k` computes logits for, given the state before it.
    pub fn query(&self, k: usize, st: &DecodeState) -> Vec<u32> {
        self.decoder.query(k, st)
    }

    /// The plan of step `k` for `query` from the state before it.
    pub fn step_plan(&self, k: usize, st: &DecodeState, query: &[u32]) -> Result<StepPlan> {
        step_plan(&self.layout, st, query, k, self.mode, self.prefilled)
    }

    /// The sampler's parameters for step `k` (its Philox step and the query's positions).
    pub fn params(&self, k: usize, query: &[u32]) -> SampleParams {
        self.decoder.params(k, query, self.layout.p())
    }

    /// The (response index, token) pairs step `k` commits from what was sampled for `query`,
    /// in decode order.
    pub fn choose(&self, k: usize, query: &[u32], sampled: &[Sampled]) -> Vec<(u32, u32)> {
        self.decoder.commit(k, query, sampled)
    }
}

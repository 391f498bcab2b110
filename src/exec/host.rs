//! The host executors: the host loop ([`generate`]), which plans each step on the host from the
//! decode state and reads the tokens back before planning the next, and the host interpreter of
//! a compiled [`Program`] ([`run_program`]), which runs the device-resident algorithm (resolve
//! each step's plan from the state with the patch twins, forward, sample, commit) through any
//! backend, op for op. Tests hold the two equal, token for token.

use std::time::Instant;

use crate::backend::{Backend, SampleParams};
use crate::error::{Error, Result};
use crate::model::{Model, Workspace};
use crate::profile;
use crate::sampler::patch::{self, DeviceState, UNDECODED};
use crate::sampler::{Execution, Generation, Mode, Program, RunOptions, Sampling, StepTrace, Task};

/// Runs a whole generation on the host loop: each step's plan built from the decode state,
/// one forward pass, the sampler, the commit, the tokens back on the host before the next step
/// is planned. Any backend; the CPU backend always runs this way.
pub fn generate<B: Backend>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    opts: RunOptions,
) -> Result<Generation> {
    let sampling = Sampling::new(model.config(), task, mode)?;
    run(model, &sampling, opts)
}

/// The loop shared by both tasks: plan, forward, sample, commit.
fn run<B: Backend>(model: &Model<B>, s: &Sampling, mut opts: RunOptions) -> Result<Generation> {
    let start = Instant::now();
    let be = model.backend();
    let l = s.layout();
    let mut cache = model.new_cache(l.pool_slots())?;
    // Activations are allocated by the first pass that needs them and reused by later ones.
    let mut ws = Workspace::new();
    let mut st = s.start();
    let (mut forwards, mut rows_fed) = (0, 0);
    if s.prefills() {
        let _r = profile::range("prefill");
        let plan = s.prefill_plan()?;
        if let Some(f) = opts.on_plan.as_mut() {
            f(None, &plan);
        }
        rows_fed += plan.n_rows();
        model.forward_in(&model.prepare(plan)?, &mut cache, &mut ws)?;
        forwards += 1;
    }
    let mut steps = Vec::with_capacity(s.steps());
    // Per-step time on the backend's clock (CUDA events on a GPU, wall time on the CPU).
    let mut clock = be.step_clock()?;
    for k in 0..s.steps() {
        let _r = profile::range(format_args!("step {k}"));
        clock.start()?;
        let query = s.query(k, &st);
        let plan = s.step_plan(k, &st, &query)?;
        if let Some(f) = opts.on_plan.as_mut() {
            f(Some(k), &plan);
        }
        let n_rows = plan.n_rows();
        let has_logits = model.forward_in(&model.prepare(plan)?, &mut cache, &mut ws)?;
        let logits = ws
            .logits()
            .filter(|_| has_logits)
            .ok_or_else(|| Error::Input(format!("step {k} has no position to decode")))?;
        let sampled = be.sample(logits, &s.params(k, &query))?;
        let committed = match opts.teacher {
            Some(teacher) => teacher_commit(teacher, k, &query, model.config().vocab(l.branch))?,
            None => s.choose(k, &query, &sampled),
        };
        for &(i, tok) in &committed {
            st.tokens[i as usize] = Some(tok);
        }
        st.groups.push(committed.iter().map(|&(i, _)| i).collect());
        forwards += 1;
        rows_fed += n_rows;
        let time_s = clock.stop()?;
        steps.push(StepTrace {
            step: k,
            decoded_positions: committed.iter().map(|&(i, _)| i).collect(),
            tokens: committed.iter().map(|&(_, t)| t).collect(),
            rows_fed: n_rows,
            time_s,
            query_positions: query,
            logits: if opts.record_logits {
                Some(be.to_host(logits)?)
            } else {
                None
            },
        });
        if let Some(p) = opts.progress.as_mut() {
            p(k + 1, s.steps());
        }
    }
    let tokens = st
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| Error::Input(format!("response index {i} never decoded"))))
        .collect::<Result<Vec<u32>>>()?;
    Ok(Generation {
        tokens,
        steps,
        forwards,
        rows_fed,
        wall_s: start.elapsed().as_secs_f64(),
        setup_s: 0.0,
        execution: Execution::Eager,
    })
}

/// The (index, token) pairs a teacher trace commits at step `k`, checked against the step:
/// every position in `query` (so in range and not yet decoded) and listed once, every token
/// below `vocab`.
fn teacher_commit(
    teacher: &[StepTrace],
    k: usize,
    query: &[u32],
    vocab: usize,
) -> Result<Vec<(u32, u32)>> {
    let bad = |m: String| Err(Error::Input(format!("teacher trace, step {k}: {m}")));
    let Some(t) = teacher.get(k) else {
        return bad(format!("the trace has only {} steps", teacher.len()));
    };
    if t.decoded_positions.len() != t.tokens.len() {
        return bad(format!(
            "{} positions but {} tokens",
            t.decoded_positions.len(),
            t.tokens.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (&i, &tok) in t.decoded_positions.iter().zip(&t.tokens) {
        if !query.contains(&i) {
            return bad(format!(
                "position {i} is not among the positions this step decodes"
            ));
        }
        if !seen.insert(i) {
            return bad(format!("position {i} is listed twice"));
        }
        if tok as usize >= vocab {
            return bad(format!(
                "token {tok} is outside the vocabulary (0..{vocab})"
            ));
        }
    }
    Ok(t.decoded_positions
        .iter()
        .copied()
        .zip(t.tokens.iter().copied())
        .collect())
}

/// The host interpreter of a device-resident generation: runs `program` through any backend
/// op for op as the device does (resolve each step's plan from the state with the patch twins,
/// forward, sample at the resolved positions, [`patch::commit`]). Gives the same
/// [`Generation`] as [`generate`] (rows fed, forwards, traces, recorded logits), and
/// calls `opts.on_plan` / `opts.progress` the same way. Teacher forcing needs the host loop:
/// `opts.teacher` is an error.
pub fn run_program<B: Backend>(
    model: &Model<B>,
    program: &Program,
    mut opts: RunOptions,
) -> Result<Generation> {
    if opts.teacher.is_some() {
        return Err(Error::Input("teacher forcing needs the host loop".into()));
    }
    let start = Instant::now();
    let be = model.backend();
    let mut cache = model.new_cache(program.pool_slots)?;
    let mut state = DeviceState::new(program.n, program.mask_id);
    let (mut forwards, mut rows_fed) = (0, 0);
    if let Some(plan) = &program.prefill {
        let _r = profile::range("prefill");
        if let Some(f) = opts.on_plan.as_mut() {
            f(None, plan);
        }
        rows_fed += plan.n_rows();
        model.forward(&model.prepare(plan.clone())?, &mut cache)?;
        forwards += 1;
    }
    let n_steps = program.steps.len();
    let mut steps = Vec::with_capacity(n_steps);
    let mut clock = be.step_clock()?;
    for (k, step) in program.steps.iter().enumerate() {
        let _r = profile::range(format_args!("step {k}"));
        clock.start()?;
        let (plan, positions, query) = step.resolve(program.branch, &state);
        if let Some(f) = opts.on_plan.as_mut() {
            f(Some(k), &plan);
        }
        let n_rows = plan.n_rows();
        let logits = model
            .forward(&model.prepare(plan)?, &mut cache)?
            .ok_or_else(|| Error::Input(format!("step {k} has no position to decode")))?;
        let params = SampleParams {
            step: k as u32,
            positions,
            ..program.params.clone()
        };
        let sampled = be.sample(&logits, &params)?;
        let tokens: Vec<u32> = sampled.iter().map(|s| s.token).collect();
        let confidence: Vec<f32> = sampled.iter().map(|s| s.confidence).collect();
        patch::commit(&mut state, &query, &tokens, &confidence, step.commit)?;
        let ranks = step.commit.ranks();
        let decoded = state.order[ranks].to_vec();
        forwards += 1;
        rows_fed += n_rows;
        let time_s = clock.stop()?;
        steps.push(StepTrace {
            step: k,
            tokens: decoded.iter().map(|&i| state.tokens[i as usize]).collect(),
            decoded_positions: decoded,
            rows_fed: n_rows,
            time_s,
            query_positions: query,
            logits: if opts.record_logits {
                Some(be.to_host(&logits)?)
            } else {
                None
            },
        });
        if let Some(p) = opts.progress.as_mut() {
            p(k + 1, n_steps);
        }
    }
    if let Some(i) = state.decoded_step.iter().position(|&d| d == UNDECODED) {
        return Err(Error::Input(format!("response index {i} never decoded")));
    }
    Ok(Generation {
        tokens: state.tokens,
        steps,
        forwards,
        rows_fed,
        wall_s: start.elapsed().as_secs_f64(),
        setup_s: 0.0,
        execution: Execution::Eager,
    })
}

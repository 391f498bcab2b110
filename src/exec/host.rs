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
use crate::sampler::batch::in_request;
use crate::sampler::patch::{self, DeviceState, UNDECODED};
use crate::sampler::{BatchProgram, BatchSampling, Execution, Generation, Mode};
use crate::sampler::{Program, Request, RunOptions, StepTrace, Task};

/// Runs a whole generation on the host loop: each step's plan built from the decode state,
/// one forward pass, the sampler, the commit, the tokens back on the host before the next step
/// is planned. Any backend; the CPU backend always runs this way. A batch of one
/// ([`generate_batch`]).
pub fn generate<B: Backend>(
    model: &Model<B>,
    task: &Task,
    mode: Mode,
    opts: RunOptions,
) -> Result<Generation> {
    let mut g = generate_batch(model, std::slice::from_ref(task), mode, opts)?;
    Ok(g.pop().expect("one generation per request"))
}

/// Runs a batch of requests of one task on the host loop (see [`crate::sampler::batch`]): one
/// plan per pass for the whole batch, one forward pass, each request's rows sampled with its
/// own parameters and committed to its own state. Returns one [`Generation`] per request, in
/// order, each as the request run alone gives it (tokens, traces, recorded logits, rows and
/// forwards of its own), but for the times: every request's `wall_s` and each step's `time_s`
/// are the batch's. The batch is checked as a whole before any work ([`BatchSampling::new`]);
/// teacher forcing takes a batch of one.
pub fn generate_batch<B: Backend>(
    model: &Model<B>,
    requests: &[Request],
    mode: Mode,
    opts: RunOptions,
) -> Result<Vec<Generation>> {
    let sampling = BatchSampling::new(model.config(), requests, mode)?;
    if opts.teacher.is_some() && sampling.len() > 1 {
        return Err(Error::Input(
            "teacher forcing takes a batch of one request".into(),
        ));
    }
    run(model, &sampling, opts)
}

/// The loop shared by both tasks: plan, forward, sample, commit.
fn run<B: Backend>(
    model: &Model<B>,
    s: &BatchSampling,
    mut opts: RunOptions,
) -> Result<Vec<Generation>> {
    let start = Instant::now();
    let be = model.backend();
    let n_req = s.len();
    let mut cache = model.new_cache(s.pool_slots())?;
    // Activations are allocated by the first pass that needs them and reused by later ones;
    // a pass that needs more rows than they hold reallocates them with room to spare.
    let (max_rows, max_logits) = s.pass_bounds();
    let mut ws = Workspace::growing_to(max_rows, max_logits);
    let mut states = s.start();
    // Per request: forwards, rows fed, step traces.
    let mut forwards = vec![0usize; n_req];
    let mut rows_fed = vec![0usize; n_req];
    let mut traces: Vec<Vec<StepTrace>> = (0..n_req)
        .map(|i| Vec::with_capacity(s.request(i).steps()))
        .collect();
    if let Some((plan, parts)) = s.prefill_plan()? {
        let _r = profile::range("prefill");
        if let Some(f) = opts.on_plan.as_mut() {
            f(None, &plan);
        }
        model.forward_in(&model.prepare(plan)?, &mut cache, &mut ws)?;
        for (i, part) in parts.iter().enumerate() {
            if s.request(i).prefills() {
                forwards[i] += 1;
                rows_fed[i] += part.n_rows;
            }
        }
    }
    let n_steps = s.steps();
    // Per-step time on the backend's clock (CUDA events on a GPU, wall time on the CPU).
    let mut clock = be.step_clock()?;
    for k in 0..n_steps {
        let _r = profile::range(format_args!("step {k}"));
        clock.start()?;
        let queries: Vec<Option<Vec<u32>>> = (0..n_req)
            .map(|i| {
                let r = s.request(i);
                (k < r.steps()).then(|| r.query(k, &states[i]))
            })
            .collect();
        let (plan, parts) = s.step_plan(k, &states, &queries)?;
        if let Some(f) = opts.on_plan.as_mut() {
            f(Some(k), &plan);
        }
        let has_logits = model.forward_in(&model.prepare(plan)?, &mut cache, &mut ws)?;
        let logits = ws
            .logits()
            .filter(|_| has_logits)
            .ok_or_else(|| Error::Input(format!("step {k} has no position to decode")))?;
        let mut committed = Vec::with_capacity(n_req);
        for (i, query) in queries.iter().enumerate() {
            let Some(query) = query else {
                committed.push(None);
                continue;
            };
            let r = s.request(i);
            let sampled = be
                .sample(logits, parts[i].logits, &r.params(k, query))
                .map_err(|e| in_request(n_req, i, e))?;
            let chosen = match opts.teacher {
                Some(teacher) => {
                    teacher_commit(teacher, k, query, model.config().vocab(r.layout().branch))?
                }
                None => r.choose(k, query, &sampled),
            };
            let st = &mut states[i];
            for &(i, tok) in &chosen {
                st.tokens[i as usize] = Some(tok);
            }
            st.groups.push(chosen.iter().map(|&(i, _)| i).collect());
            committed.push(Some(chosen));
        }
        let time_s = clock.stop()?;
        let all_logits = if opts.record_logits {
            Some(be.to_host(logits)?)
        } else {
            None
        };
        let vocab = model.config().vocab(s.request(0).layout().branch);
        for (i, (query, chosen)) in queries.into_iter().zip(committed).enumerate() {
            let (Some(query), Some(chosen)) = (query, chosen) else {
                continue;
            };
            let part = &parts[i];
            forwards[i] += 1;
            rows_fed[i] += part.n_rows;
            traces[i].push(StepTrace {
                step: k,
                decoded_positions: chosen.iter().map(|&(i, _)| i).collect(),
                tokens: chosen.iter().map(|&(_, t)| t).collect(),
                rows_fed: part.n_rows,
                time_s,
                query_positions: query,
                logits: all_logits.as_ref().map(|l| {
                    l[part.logits * vocab..(part.logits + part.n_logits) * vocab].to_vec()
                }),
            });
        }
        if let Some(p) = opts.progress.as_mut() {
            p(k + 1, n_steps);
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    (states.into_iter().zip(traces).enumerate())
        .map(|(i, (st, steps))| {
            let tokens = (st.tokens.iter().enumerate())
                .map(|(j, t)| {
                    t.ok_or_else(|| {
                        in_request(
                            n_req,
                            i,
                            Error::Input(format!("response index {j} never decoded")),
                        )
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            Ok(Generation {
                tokens,
                steps,
                forwards: forwards[i],
                rows_fed: rows_fed[i],
                wall_s,
                setup_s: 0.0,
                execution: Execution::Eager,
                graphs: 0,
            })
        })
        .collect()
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
/// `opts.teacher` is an error. A batch of one ([`run_batch_program`]).
pub fn run_program<B: Backend>(
    model: &Model<B>,
    program: &Program,
    opts: RunOptions,
) -> Result<Generation> {
    let batch = BatchProgram::new(vec![program.clone()])?;
    let mut g = run_batch_program(model, &batch, opts)?;
    Ok(g.pop().expect("one generation per request"))
}

/// [`run_program`] for a batch: every step resolves each request's part against that
/// request's state, runs one forward pass over the batch's plan, samples each part's rows with
/// its request's parameters and commits them to its state. Gives the same generations as
/// [`generate_batch`].
pub fn run_batch_program<B: Backend>(
    model: &Model<B>,
    program: &BatchProgram,
    mut opts: RunOptions,
) -> Result<Vec<Generation>> {
    if opts.teacher.is_some() {
        return Err(Error::Input("teacher forcing needs the host loop".into()));
    }
    let start = Instant::now();
    let be = model.backend();
    let n_req = program.requests.len();
    let mut cache = model.new_cache(program.pool_slots)?;
    let mut states: Vec<DeviceState> = (program.requests.iter())
        .map(|r| DeviceState::new(r.n, r.mask_id))
        .collect();
    let mut forwards: Vec<usize> = (program.requests.iter())
        .map(|r| usize::from(r.prefill_rows > 0))
        .collect();
    let mut rows_fed: Vec<usize> = program.requests.iter().map(|r| r.prefill_rows).collect();
    let mut traces: Vec<Vec<StepTrace>> = (program.requests.iter())
        .map(|r| Vec::with_capacity(r.steps))
        .collect();
    if let Some(plan) = &program.prefill {
        let _r = profile::range("prefill");
        if let Some(f) = opts.on_plan.as_mut() {
            f(None, plan);
        }
        model.forward(&model.prepare(plan.clone())?, &mut cache)?;
    }
    let n_steps = program.steps.len();
    let mut clock = be.step_clock()?;
    let vocab = model.config().vocab(program.branch);
    for (k, step) in program.steps.iter().enumerate() {
        let _r = profile::range(format_args!("step {k}"));
        clock.start()?;
        let (plan, resolved) = step.resolve(program.branch, &states);
        if let Some(f) = opts.on_plan.as_mut() {
            f(Some(k), &plan);
        }
        let logits = model
            .forward(&model.prepare(plan)?, &mut cache)?
            .ok_or_else(|| Error::Input(format!("step {k} has no position to decode")))?;
        let mut decoded = Vec::with_capacity(step.parts.len());
        for (part, (positions, query)) in step.parts.iter().zip(&resolved) {
            let i = part.request;
            let params = SampleParams {
                step: k as u32,
                positions: positions.clone(),
                ..program.requests[i].params.clone()
            };
            let sampled = be
                .sample(&logits, part.offsets.logits, &params)
                .map_err(|e| in_request(n_req, i, e))?;
            let tokens: Vec<u32> = sampled.iter().map(|s| s.token).collect();
            let confidence: Vec<f32> = sampled.iter().map(|s| s.confidence).collect();
            let state = &mut states[i];
            patch::commit(state, query, &tokens, &confidence, part.commit)?;
            decoded.push(state.order[part.commit.ranks()].to_vec());
        }
        let time_s = clock.stop()?;
        let all_logits = if opts.record_logits {
            Some(be.to_host(&logits)?)
        } else {
            None
        };
        for ((part, (_, query)), decoded) in step.parts.iter().zip(resolved).zip(decoded) {
            let i = part.request;
            let off = &part.offsets;
            forwards[i] += 1;
            rows_fed[i] += off.n_rows;
            traces[i].push(StepTrace {
                step: k,
                tokens: decoded
                    .iter()
                    .map(|&j| states[i].tokens[j as usize])
                    .collect(),
                decoded_positions: decoded,
                rows_fed: off.n_rows,
                time_s,
                query_positions: query,
                logits: all_logits
                    .as_ref()
                    .map(|l| l[off.logits * vocab..(off.logits + off.n_logits) * vocab].to_vec()),
            });
        }
        if let Some(p) = opts.progress.as_mut() {
            p(k + 1, n_steps);
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    (states.into_iter().zip(traces).enumerate())
        .map(|(i, (state, steps))| {
            if let Some(j) = state.decoded_step.iter().position(|&d| d == UNDECODED) {
                return Err(in_request(
                    n_req,
                    i,
                    Error::Input(format!("response index {j} never decoded")),
                ));
            }
            Ok(Generation {
                tokens: state.tokens,
                steps,
                forwards: forwards[i],
                rows_fed: rows_fed[i],
                wall_s,
                setup_s: 0.0,
                execution: Execution::Eager,
                graphs: 0,
            })
        })
        .collect()
}

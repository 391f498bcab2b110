//! The device-resident executor of the CUDA backend ([`Execution::Queued`],
//! [`Execution::Graphs`]).
//!
//! The host loop ([`crate::exec::generate`]) plans each step after reading the previous step's
//! tokens back: one host round trip per step, and a launch of every op by the host. Here the
//! whole generation — a batch of requests of one task, one request being a batch of one — is a
//! [`BatchProgram`] the sampler compiled before sampling (per step a template plan for the
//! whole batch and each request's patches, [`crate::sampler::patch`]), uploaded once, and every
//! step is queued without waiting:
//!
//! ```text
//! reset every request's state · prefill · for each step k:
//!     [event k] per request: resolve_plan (its patches ← its state)
//!               forward (one pass over the batch's plan)
//!               per request: sample (its logits rows, its parameters) · commit (its state ← top-k)
//! [event K]
//! ```
//!
//! Each request keeps its own decode state, lists, ban mask and sampler outputs; the per-request
//! kernels are tiny (one block each) and the forward pass, where the time goes, is shared. With
//! [`Execution::Graphs`] that work is captured: a text-to-image batch (whose orders are fixed)
//! as one graph, a text batch as one graph for the reset and prefill and one per step, launched
//! back to back. The ops are those of the host loop — the same kernels, cuBLASLt
//! algorithms and attention plans on plans equal to the host loop's (the program's tests) — so
//! the tokens are the host loop's.
//!
//! Errors the kernels find (an id outside the embedding table, a non-finite logit) set sticky
//! device flags, read once after the last step.

use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, sys};

use crate::backend::cuda::{CudaBackend, CudaCache};
use crate::config::Branch;
use crate::cuda::device::{cuda_err, record_event};
use crate::cuda::ops::{
    self, BannedMask, DeviceSampleArgs, DeviceStateBufs, PatchBuf, PatchLens, SampleOut,
};
use crate::error::{Error, Result};
use crate::model::{Model, Prepared, Workspace};
use crate::profile;
use crate::sampler::batch::in_request;
use crate::sampler::patch::{Field, UNDECODED};
use crate::sampler::{BatchProgram, Execution, Generation, StepTrace};

/// One request's share of a step on the device: its patches, its query (static for t2i; its
/// state's `q` list for text), where its logits rows start, and its sampler outputs.
struct DevPart {
    request: usize,
    patches: Option<PatchBuf>,
    query: Option<CudaSlice<u32>>,
    sample_pos: CudaSlice<u32>,
    n_query: usize,
    first_logits: usize,
    n_logits: usize,
    token: CudaSlice<u32>,
    confidence: CudaSlice<f32>,
    lse: CudaSlice<f32>,
}

/// One step's device side: the batch's plan (patched in place before the step) and its parts.
struct DevStep {
    prep: Prepared<CudaBackend>,
    parts: Vec<DevPart>,
}

/// What one request keeps on the device between steps.
struct DevRequest {
    state: DeviceStateBufs,
    banned: Option<BannedMask>,
}

/// Everything a resident run keeps on the device.
struct Resident<'m> {
    model: &'m Model<CudaBackend>,
    prog: &'m BatchProgram,
    prefill: Option<Prepared<CudaBackend>>,
    steps: Vec<DevStep>,
    cache: CudaCache,
    ws: Workspace<CudaBackend>,
    requests: Vec<DevRequest>,
    /// The sampler's sticky flag: a non-finite logit in some step (the embedding kernel's flag
    /// is the backend's, [`CudaBackend::check_embed_flag`]).
    sample_flag: CudaSlice<u32>,
    /// `events[k]` before step `k`'s work, `events[K]` after the last step's.
    events: Vec<CudaEvent>,
    /// Whether the stream is capturing (events then become graph nodes).
    capturing: bool,
}

/// Runs `prog` (compiled by [`crate::sampler::batch_program`] for `model`'s config) on `model`
/// device-resident: queued op by op ([`Execution::Queued`]) or captured as CUDA graphs
/// ([`Execution::Graphs`]; [`Execution::Eager`] is taken as queued). Returns one generation per
/// request. `progress` sees (steps done, steps in total): per step while queuing, once at the
/// end with graphs. `setup_s` is the host time of uploading and capturing.
pub fn run(
    model: &Model<CudaBackend>,
    prog: &BatchProgram,
    exec: Execution,
    mut progress: Option<&mut dyn FnMut(usize, usize)>,
) -> Result<Vec<Generation>> {
    let start = Instant::now();
    let mut r = Resident::upload(model, prog)?;
    let graphs = match exec {
        Execution::Graphs => Some(r.capture()?),
        Execution::Queued | Execution::Eager => None,
    };
    let setup_s = start.elapsed().as_secs_f64();
    match &graphs {
        Some(graphs) => {
            let _r = profile::range("generation (graphs)");
            // Launches return at once: progress is reported when the device is done.
            for g in graphs {
                g.launch().map_err(cuda_err("launching a CUDA graph"))?;
            }
        }
        None => r.queue(0..r.steps.len() + 1, &mut progress)?,
    }
    // No graph outlives the buffers and events it uses.
    model.backend().device().synchronize()?;
    let n_graphs = graphs.as_ref().map_or(0, Vec::len);
    drop(graphs);
    let n_steps = r.steps.len();
    let mut gs = r.finish(start, setup_s, exec)?;
    for g in &mut gs {
        g.graphs = n_graphs;
    }
    if let Some(p) = progress.as_mut() {
        p(n_steps, n_steps);
    }
    Ok(gs)
}

impl<'m> Resident<'m> {
    /// Uploads the program: every step's batch plan (a runnable plan, so the ops' host-side
    /// checks apply to it) with its attention plans built, every part's patches validated,
    /// sampler buffers, each request's decode state and ban mask, and a frozen workspace sized
    /// for the largest step.
    fn upload(model: &'m Model<CudaBackend>, prog: &'m BatchProgram) -> Result<Resident<'m>> {
        let be = model.backend();
        let dev = be.device();
        let n_req = prog.requests.len();
        let cache = model.new_cache(prog.pool_slots)?;
        let prepare = |plan: &crate::plan::StepPlan| -> Result<Prepared<CudaBackend>> {
            // The device patches the plan in place, so no tail derived from it on the host.
            let p = model.prepare_whole(plan.clone())?;
            be.prepare_attention(&p.dev, &cache)?;
            Ok(p)
        };
        let prefill = prog.prefill.as_ref().map(prepare).transpose()?;
        let mut steps = Vec::with_capacity(prog.steps.len());
        for (k, bs) in prog.steps.iter().enumerate() {
            let plan = &bs.plan;
            let mut prep = prepare(plan)?;
            let writes = |f: Field| {
                bs.parts
                    .iter()
                    .flat_map(|p| &p.patches)
                    .any(|p| p.field == f)
            };
            // Each attending branch holds its own copy of the keys; patches reach the response
            // branch's only.
            let other = Branch::ALL.into_iter().find(|&b| b != prog.branch);
            if (writes(Field::KvIndex) || writes(Field::KvTag))
                && other.is_some_and(|b| !plan.rows(b).is_empty())
            {
                return Err(Error::Input(format!(
                    "program step {k}: key patches with rows of both branches are not supported"
                )));
            }
            // Patched slots stay response or scratch slots of the pool: declare that bound
            // rather than the template's maximum.
            if writes(Field::RowSlot) {
                let bound = u32::try_from(prog.pool_slots.saturating_sub(1))
                    .map_err(|_| Error::Input("pool slots beyond u32".into()))?;
                prep.dev.bound_slots(dev, prog.branch, bound)?;
            }
            let mut parts = Vec::with_capacity(bs.parts.len());
            let mut logits_rows = 0;
            for sp in &bs.parts {
                let i = sp.request;
                let lens = PatchLens {
                    rows: plan.rows(prog.branch).len(),
                    keys: plan.kv_indices.len(),
                    logits: plan.logits_rows.len(),
                    samples: sp.sample_positions.len(),
                };
                let in_req = |e| in_request(n_req, i, e);
                // A text step resolves even without patches: the commit reads its query from
                // the lists the resolve kernel computes.
                let patches = if sp.patches.is_empty() && sp.query.is_some() {
                    None
                } else {
                    Some(ops::upload_patches(dev, &sp.patches, lens).map_err(in_req)?)
                };
                let n_query = sp.sample_positions.len();
                let cfg_rows = if prog.requests[i].params.guidance.is_some() {
                    2
                } else {
                    1
                };
                if sp.offsets.n_logits != n_query * cfg_rows {
                    return Err(in_req(Error::Input(format!(
                        "program step {k}: {} logits rows for {n_query} sampled positions",
                        sp.offsets.n_logits
                    ))));
                }
                logits_rows += sp.offsets.n_logits;
                let query = match &sp.query {
                    Some(q) => Some(ops::upload_padded(dev, q)?),
                    None => None,
                };
                parts.push(DevPart {
                    request: i,
                    patches,
                    query,
                    sample_pos: ops::upload_padded(dev, &sp.sample_positions)?,
                    n_query,
                    first_logits: sp.offsets.logits,
                    n_logits: sp.offsets.n_logits,
                    token: dev.alloc_zeros(n_query.max(1))?,
                    confidence: dev.alloc_zeros(n_query.max(1))?,
                    lse: dev.alloc_zeros(n_query.max(1))?,
                });
            }
            if logits_rows != plan.logits_rows.len() {
                return Err(Error::Input(format!(
                    "program step {k}: the parts sample {logits_rows} of the plan's {} logits rows",
                    plan.logits_rows.len()
                )));
            }
            steps.push(DevStep { prep, parts });
        }
        let mut ws = model.workspace(prog.max_rows(), prog.max_logits(), prog.branch)?;
        ws.freeze();
        let vocab = model.config().vocab(prog.branch);
        let requests = (prog.requests.iter())
            .map(|r| {
                Ok(DevRequest {
                    state: DeviceStateBufs::new(dev, r.n)?,
                    banned: match r.params.banned.is_empty() {
                        true => None,
                        false => Some(BannedMask::new(dev, vocab, &r.params.banned)?),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ctx = dev.context();
        let events = (0..=steps.len())
            .map(|_| {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(cuda_err("creating an event"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Resident {
            model,
            prog,
            prefill,
            steps,
            cache,
            ws,
            requests,
            sample_flag: dev.alloc_zeros(1)?,
            events,
            capturing: false,
        })
    }

    /// Captures the generation: one graph for a t2i batch; for text the reset and prefill,
    /// then one graph per step.
    fn capture(&mut self) -> Result<Vec<CudaGraph>> {
        let n = self.steps.len();
        let per_step = self.prog.branch == Branch::Text;
        // Part 0 is the reset and the prefill, part k + 1 step k.
        let parts: Vec<std::ops::Range<usize>> = if per_step {
            (0..=n).map(|k| k..k + 1).collect()
        } else {
            std::iter::once(0..n + 1).collect()
        };
        self.warm_up()?;
        let stream = self.model.backend().device().stream().clone();
        let mut graphs = Vec::with_capacity(parts.len());
        for part in parts {
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(cuda_err("beginning a graph capture"))?;
            self.capturing = true;
            let queued = self.queue(part.clone(), &mut None);
            self.capturing = false;
            // End the capture even when queuing failed, so the stream is usable again.
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            queued?;
            let graph = graph
                .map_err(cuda_err(format_args!(
                    "capturing the graph of steps {part:?}"
                )))?
                .ok_or_else(|| Error::Cuda(format!("the capture of steps {part:?} is empty")))?;
            graph.upload().map_err(cuda_err("uploading a CUDA graph"))?;
            graphs.push(graph);
        }
        Ok(graphs)
    }

    /// Runs every product of the program once (cuBLASLt chooses its algorithm and loads its
    /// kernel) so that neither happens inside a capture.
    fn warm_up(&self) -> Result<()> {
        let cfg = self.model.config();
        let products: Vec<_> = (self.prog.prefill.iter())
            .chain(self.prog.steps.iter().map(|s| &s.plan))
            .flat_map(|plan| crate::model::products(cfg, plan, false))
            .collect();
        // The model's own weights serve as the products' weight operands.
        let m = self.model;
        m.backend().warm_products(&products, &m.tensors())
    }

    /// Queues parts of the generation: part 0 is the state reset and the prefill, part `k + 1`
    /// is step `k` (with the event before it; the last part also records the final event).
    fn queue(
        &mut self,
        parts: std::ops::Range<usize>,
        progress: &mut Option<&mut dyn FnMut(usize, usize)>,
    ) -> Result<()> {
        let n = self.steps.len();
        for part in parts {
            if part == 0 {
                self.queue_prologue()?;
            } else {
                self.queue_step(part - 1)?;
                if let Some(p) = progress.as_mut() {
                    p(part, n);
                }
            }
            if part == n {
                self.record(n)?;
            }
        }
        Ok(())
    }

    fn queue_prologue(&mut self) -> Result<()> {
        let be = self.model.backend();
        let dev = be.device();
        for (r, req) in self.requests.iter_mut().zip(&self.prog.requests) {
            r.state.reset(dev, req.mask_id)?;
        }
        dev.stream()
            .memset_zeros(&mut self.sample_flag)
            .map_err(cuda_err("clearing the sampler's error flag"))?;
        be.reset_embed_flag()?;
        if let Some(p) = &self.prefill {
            let _r = profile::range("prefill");
            self.model.forward_in(p, &mut self.cache, &mut self.ws)?;
        }
        Ok(())
    }

    fn queue_step(&mut self, k: usize) -> Result<()> {
        let _r = profile::range(format_args!("step {k}"));
        self.record(k)?;
        let be = self.model.backend();
        let dev = be.device();
        let n_req = self.prog.requests.len();
        let bs = &self.prog.steps[k];
        let DevStep { prep, parts } = &mut self.steps[k];
        {
            let _r = profile::range("resolve_plan");
            // Every resolve patches its request's key tags; the key-tile summaries are rebuilt
            // from all of them once, by the last request's resolve. Each rebuild covers the
            // whole batch's keys (one block), so one per request was quadratic in the batch;
            // nothing reads the summaries before the step's attention, so the last rebuild
            // leaves what one after every resolve left.
            let last = parts.iter().rposition(|p| p.patches.is_some());
            for (i, (part, sp)) in parts.iter_mut().zip(&bs.parts).enumerate() {
                let Some(patches) = &part.patches else {
                    continue;
                };
                let mut targets = prep
                    .dev
                    .patch_targets(self.prog.branch, &mut part.sample_pos)
                    .map_err(|e| Error::Input(format!("program step {k}: {e}")))?;
                if Some(i) != last {
                    targets.kv_summary = None;
                }
                let state = &mut self.requests[part.request].state;
                ops::resolve_plan(dev, patches, state, sp.block, targets)
                    .map_err(|e| in_request(n_req, part.request, e))?;
            }
        }
        if !self.model.forward_in(prep, &mut self.cache, &mut self.ws)? {
            return Err(Error::Input(format!("step {k} has no position to decode")));
        }
        let logits = self.ws.logits().expect("forward_in computed logits");
        let cols = logits.cols;
        let all = logits.f32("logits")?;
        for (part, sp) in parts.iter_mut().zip(&bs.parts) {
            let i = part.request;
            let req = &mut self.requests[i];
            {
                let _r = profile::range("sample");
                let p = &self.prog.requests[i].params;
                let view =
                    all.slice(part.first_logits * cols..(part.first_logits + part.n_logits) * cols);
                let args = DeviceSampleArgs {
                    positions: &part.sample_pos,
                    banned: req.banned.as_ref(),
                    n: part.n_query,
                    guidance: p.guidance,
                    temperature: p.temperature,
                    seed: p.seed,
                    step: k as u32,
                    request: p.request,
                };
                let out = SampleOut {
                    token: &mut part.token,
                    confidence: &mut part.confidence,
                    lse: &mut part.lse,
                    error_flag: &mut self.sample_flag,
                };
                ops::sample_to_device(dev, &view, cols, cols, args, out)
                    .map_err(|e| in_request(n_req, i, e))?;
            }
            let _r = profile::range("commit");
            let (token, confidence) = (&part.token, &part.confidence);
            match &part.query {
                Some(q) => ops::commit(
                    dev,
                    q,
                    token,
                    confidence,
                    part.n_query,
                    sp.commit,
                    &mut req.state,
                ),
                None => ops::commit_from_lists(
                    dev,
                    token,
                    confidence,
                    part.n_query,
                    sp.commit,
                    &mut req.state,
                ),
            }
            .map_err(|e| in_request(n_req, i, e))?;
        }
        Ok(())
    }

    /// Records `events[i]` on the stream; while capturing, as an event-record node of the graph
    /// (`CU_EVENT_RECORD_EXTERNAL`, which is valid only then), so that replays time the steps.
    fn record(&self, i: usize) -> Result<()> {
        let stream = self.model.backend().device().stream();
        record_event(&self.events[i], stream, self.capturing)
    }

    /// Waits for the device, checks the flags, reads every request's state and builds its
    /// [`Generation`].
    fn finish(self, start: Instant, setup_s: f64, execution: Execution) -> Result<Vec<Generation>> {
        let be = self.model.backend();
        let dev = be.device();
        dev.synchronize()?;
        let flags = dev.download(&self.sample_flag)?;
        be.check_embed_flag()?;
        if flags[0] != 0 {
            return Err(Error::Input(
                "non-finite logit in a sampled row (NaN, ±inf, or logit / temperature \
                 overflowing); rerun with --no-graphs to find the step"
                    .into(),
            ));
        }
        let times = (0..self.steps.len())
            .map(|k| {
                let ms = self.events[k]
                    .elapsed_ms(&self.events[k + 1])
                    .map_err(cuda_err("reading a step event"))?;
                Ok(f64::from(ms) * 1e-3)
            })
            .collect::<Result<Vec<f64>>>()?;
        let wall_s = start.elapsed().as_secs_f64();
        let n_req = self.prog.requests.len();
        let mut out = Vec::with_capacity(n_req);
        for (i, (dr, req)) in self.requests.iter().zip(&self.prog.requests).enumerate() {
            let state = dr.state.download(dev)?;
            if let Some(r) = state.order.iter().position(|&i| i == UNDECODED) {
                return Err(in_request(
                    n_req,
                    i,
                    Error::Cuda(format!(
                        "device-resident run ended with rank {r} of {} undecoded",
                        state.len()
                    )),
                ));
            }
            let traces = self.prog.traces(i, &state)?;
            let parts =
                (self.prog.steps.iter()).filter_map(|s| s.parts.iter().find(|p| p.request == i));
            let mut steps = Vec::with_capacity(traces.len());
            let mut rows_fed = req.prefill_rows;
            for (k, ((query, decoded, tokens), part)) in traces.into_iter().zip(parts).enumerate() {
                rows_fed += part.offsets.n_rows;
                steps.push(StepTrace {
                    step: k,
                    decoded_positions: decoded,
                    tokens,
                    rows_fed: part.offsets.n_rows,
                    time_s: times[k],
                    query_positions: query,
                    logits: None,
                });
            }
            out.push(Generation {
                tokens: state.tokens,
                forwards: steps.len() + usize::from(req.prefill_rows > 0),
                steps,
                rows_fed,
                wall_s,
                setup_s,
                execution,
                graphs: 0,
            });
        }
        Ok(out)
    }
}

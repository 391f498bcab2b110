//! The device-resident executor of the CUDA backend ([`Execution::Queued`],
//! [`Execution::Graphs`]).
//!
//! The host loop ([`crate::exec::generate`]) plans each step after reading the previous step's
//! tokens back: one host round trip per step, and a launch of every op by the host. Here the
//! whole generation is a [`Program`] the sampler compiled before sampling (a template plan and
//! patches per step, [`crate::sampler::patch`]), uploaded once, and every step is queued
//! without waiting:
//!
//! ```text
//! reset state · prefill · for each step k:
//!     [event k] resolve_plan (patches ← state) · forward · sample (device buffers) · commit (state ← top-k)
//! [event K]
//! ```
//!
//! With [`Execution::Graphs`] that work is captured: a text-to-image generation (whose order is
//! fixed) as one graph, a text answer as one graph for the reset and prefill and one per step,
//! launched back to back. The ops are those of the host loop — the same kernels, cuBLASLt
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
use crate::sampler::patch::{Field, UNDECODED};
use crate::sampler::{Execution, Generation, Program, StepTrace};

/// One step's device side: its plan (patched in place before the step), its patches, its
/// query (static for t2i; the state's `q` list for text), and its sampler outputs.
struct DevStep {
    prep: Prepared<CudaBackend>,
    patches: Option<PatchBuf>,
    query: Option<CudaSlice<u32>>,
    sample_pos: CudaSlice<u32>,
    n_query: usize,
    token: CudaSlice<u32>,
    confidence: CudaSlice<f32>,
    lse: CudaSlice<f32>,
}

/// Everything a resident run keeps on the device.
struct Resident<'m> {
    model: &'m Model<CudaBackend>,
    prog: &'m Program,
    prefill: Option<Prepared<CudaBackend>>,
    steps: Vec<DevStep>,
    cache: CudaCache,
    ws: Workspace<CudaBackend>,
    state: DeviceStateBufs,
    banned: Option<BannedMask>,
    /// The sampler's sticky flag: a non-finite logit in some step (the embedding kernel's flag
    /// is the backend's, [`CudaBackend::check_embed_flag`]).
    sample_flag: CudaSlice<u32>,
    /// `events[k]` before step `k`'s work, `events[K]` after the last step's.
    events: Vec<CudaEvent>,
    /// Whether the stream is capturing (events then become graph nodes).
    capturing: bool,
}

/// Runs `prog` (compiled by [`crate::sampler::program()`] for `model`'s config) on `model`
/// device-resident: queued op by op ([`Execution::Queued`]) or captured as CUDA graphs
/// ([`Execution::Graphs`]; [`Execution::Eager`] is taken as queued). `progress` sees (steps
/// done, steps in total): per step while queuing, once at the end with graphs. `setup_s` is
/// the host time of uploading and capturing.
pub fn run(
    model: &Model<CudaBackend>,
    prog: &Program,
    exec: Execution,
    mut progress: Option<&mut dyn FnMut(usize, usize)>,
) -> Result<Generation> {
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
    drop(graphs);
    let g = r.finish(start, setup_s, exec)?;
    if let Some(p) = progress.as_mut() {
        p(g.steps.len(), g.steps.len());
    }
    Ok(g)
}

impl<'m> Resident<'m> {
    /// Uploads the program: every template plan (a runnable plan, so the ops' host-side checks
    /// apply to it) with its attention plans built, the patches validated, sampler buffers, the
    /// decode state, and a frozen workspace sized for the largest step.
    fn upload(model: &'m Model<CudaBackend>, prog: &'m Program) -> Result<Resident<'m>> {
        let be = model.backend();
        let dev = be.device();
        let cache = model.new_cache(prog.pool_slots)?;
        let prepare = |plan: &crate::plan::StepPlan| -> Result<Prepared<CudaBackend>> {
            let p = model.prepare(plan.clone())?;
            be.prepare_attention(&p.dev, &cache)?;
            Ok(p)
        };
        let prefill = prog.prefill.as_ref().map(prepare).transpose()?;
        let mut steps = Vec::with_capacity(prog.steps.len());
        for (k, sp) in prog.steps.iter().enumerate() {
            let plan = &sp.plan;
            let mut prep = prepare(plan)?;
            let writes = |f: Field| sp.patches.iter().any(|p| p.field == f);
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
            let lens = PatchLens {
                rows: plan.rows(prog.branch).len(),
                keys: plan.kv_indices.len(),
                logits: plan.logits_rows.len(),
                samples: sp.sample_positions.len(),
            };
            // A text step resolves even without patches: the commit reads its query from the
            // lists the resolve kernel computes.
            let patches = if sp.patches.is_empty() && sp.query.is_some() {
                None
            } else {
                Some(ops::upload_patches(dev, &sp.patches, lens)?)
            };
            let n_query = sp.sample_positions.len();
            let rows = n_query * if prog.params.guidance.is_some() { 2 } else { 1 };
            if plan.logits_rows.len() != rows {
                return Err(Error::Input(format!(
                    "program step {k}: {} logits rows for {n_query} sampled positions",
                    plan.logits_rows.len()
                )));
            }
            let query = match &sp.query {
                Some(q) => Some(ops::upload_padded(dev, q)?),
                None => None,
            };
            steps.push(DevStep {
                prep,
                patches,
                query,
                sample_pos: ops::upload_padded(dev, &sp.sample_positions)?,
                n_query,
                token: dev.alloc_zeros(n_query.max(1))?,
                confidence: dev.alloc_zeros(n_query.max(1))?,
                lse: dev.alloc_zeros(n_query.max(1))?,
            });
        }
        let [text_rows, image_rows] = prog.max_rows();
        let max_logits = prog
            .steps
            .iter()
            .map(|s| s.plan.logits_rows.len())
            .max()
            .unwrap_or(0);
        let mut ws = model.workspace([text_rows, image_rows], max_logits)?;
        ws.freeze();
        let vocab = model.config().vocab(prog.branch);
        let banned = if prog.params.banned.is_empty() {
            None
        } else {
            Some(BannedMask::new(dev, vocab, &prog.params.banned)?)
        };
        let ctx = dev.context();
        let events = (0..=steps.len())
            .map(|_| {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(cuda_err("creating an event"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Resident {
            model,
            state: DeviceStateBufs::new(dev, prog.n)?,
            prog,
            prefill,
            steps,
            cache,
            ws,
            banned,
            sample_flag: dev.alloc_zeros(1)?,
            events,
            capturing: false,
        })
    }

    /// Captures the generation: one graph for t2i; for text the reset and prefill, then one
    /// graph per step.
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
            .flat_map(|plan| crate::model::products(cfg, plan))
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
        self.state.reset(dev, self.prog.mask_id)?;
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
        let sp = &self.prog.steps[k];
        let st = &mut self.steps[k];
        if let Some(patches) = &st.patches {
            let _r = profile::range("resolve_plan");
            let targets = st
                .prep
                .dev
                .patch_targets(self.prog.branch, &mut st.sample_pos)
                .map_err(|e| Error::Input(format!("program step {k}: {e}")))?;
            ops::resolve_plan(dev, patches, &mut self.state, sp.block, targets)?;
        }
        if !self
            .model
            .forward_in(&st.prep, &mut self.cache, &mut self.ws)?
        {
            return Err(Error::Input(format!("step {k} has no position to decode")));
        }
        let logits = self.ws.logits().expect("forward_in computed logits");
        {
            let _r = profile::range("sample");
            let p = &self.prog.params;
            let args = DeviceSampleArgs {
                positions: &st.sample_pos,
                banned: self.banned.as_ref(),
                n: st.n_query,
                guidance: p.guidance,
                temperature: p.temperature,
                seed: p.seed,
                step: k as u32,
                request: p.request,
            };
            let out = SampleOut {
                token: &mut st.token,
                confidence: &mut st.confidence,
                lse: &mut st.lse,
                error_flag: &mut self.sample_flag,
            };
            ops::sample_to_device(
                dev,
                logits.f32("logits")?,
                logits.cols,
                logits.cols,
                args,
                out,
            )?;
        }
        let _r = profile::range("commit");
        let (token, confidence) = (&st.token, &st.confidence);
        match &st.query {
            Some(q) => ops::commit(
                dev,
                q,
                token,
                confidence,
                st.n_query,
                sp.commit,
                &mut self.state,
            ),
            None => ops::commit_from_lists(
                dev,
                token,
                confidence,
                st.n_query,
                sp.commit,
                &mut self.state,
            ),
        }
    }

    /// Records `events[i]` on the stream; while capturing, as an event-record node of the graph
    /// (`CU_EVENT_RECORD_EXTERNAL`, which is valid only then), so that replays time the steps.
    fn record(&self, i: usize) -> Result<()> {
        let stream = self.model.backend().device().stream();
        record_event(&self.events[i], stream, self.capturing)
    }

    /// Waits for the device, checks the flags, reads the state and builds the [`Generation`].
    fn finish(self, start: Instant, setup_s: f64, execution: Execution) -> Result<Generation> {
        let be = self.model.backend();
        let dev = be.device();
        dev.synchronize()?;
        let flags = dev.download(&self.sample_flag)?;
        be.check_embed_flag()?;
        if flags[0] != 0 {
            return Err(Error::Input(format!(
                "non-finite logit in a sampled row (NaN, ±inf, or logit / temperature {} \
                 overflowing); rerun with --no-graphs to find the step",
                self.prog.params.temperature
            )));
        }
        let state = self.state.download(dev)?;
        if let Some(r) = state.order.iter().position(|&i| i == UNDECODED) {
            return Err(Error::Cuda(format!(
                "device-resident run ended with rank {r} of {} undecoded",
                state.len()
            )));
        }
        let traces = self.prog.traces(&state)?;
        let mut steps = Vec::with_capacity(traces.len());
        let mut rows_fed = self.prefill.as_ref().map_or(0, |p| p.plan.n_rows());
        for (k, (query, decoded, tokens)) in traces.into_iter().enumerate() {
            let ms = self.events[k]
                .elapsed_ms(&self.events[k + 1])
                .map_err(cuda_err("reading a step event"))?;
            let n_rows = self.prog.steps[k].plan.n_rows();
            rows_fed += n_rows;
            steps.push(StepTrace {
                step: k,
                decoded_positions: decoded,
                tokens,
                rows_fed: n_rows,
                time_s: f64::from(ms) * 1e-3,
                query_positions: query,
                logits: None,
            });
        }
        Ok(Generation {
            tokens: state.tokens,
            forwards: steps.len() + usize::from(self.prefill.is_some()),
            steps,
            rows_fed,
            wall_s: start.elapsed().as_secs_f64(),
            setup_s,
            execution,
        })
    }
}

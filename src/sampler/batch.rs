//! Batches: many requests of one task run together, one plan per pass for the whole batch
//! (SPEC §8, "Batches").
//!
//! A batch is a list of requests of one task. Text-to-image requests share the grid, the
//! steps and the order rule; each has its own prompt (any length), seed, guidance and
//! temperature. Text requests share the block length; each has its own prompt, answer
//! length, steps, bans and seed. Every request is compiled alone, exactly as a single
//! generation ([`Sampling`], [`super::Program`]), over its own sequences and pool slots from 0;
//! the batch places them side by side:
//!
//! ```text
//! sequences:  request 0 (1 or 2) | request 1 | ...
//! pool:       region 0 = [prompt | response | scratch] per sequence of request 0 | region 1 | ...
//! ```
//!
//! and a pass's plan is the requests' plans concatenated ([`StepPlan::concat`]): rows, keys,
//! logits rows and slots of one request never refer to another's, and every random number a
//! request draws depends on its own seed alone (SPEC §4.1), so a request gives the same tokens
//! alone or in any batch.

use super::{DecodeState, Mode, Sampling, Task};
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::{PartOffsets, PlanPart, StepPlan};

/// A generation request: one element of a batch.
pub type Request = Task;

/// Where a request of a batch sits: its sequences and its region of the K/V pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The request's first sequence in the batch.
    pub seq: usize,
    /// Its sequences (2 for a CFG pair, else 1).
    pub n_seqs: usize,
    /// The pool slot of its slot 0.
    pub slot_base: usize,
    /// Slots of its region (`n_seqs · (P + 2N + R)`).
    pub slots: usize,
}

impl Region {
    /// The request's part of a pass that feeds `plan` (or nothing of it).
    pub fn part<'a>(&self, plan: Option<&'a StepPlan>) -> PlanPart<'a> {
        PlanPart {
            plan,
            n_seqs: self.n_seqs,
            slot_base: self.slot_base,
            slots: self.slots,
        }
    }
}

/// An error of request `i` of a batch of `len`: named when the batch has more than one.
pub(crate) fn in_request(len: usize, i: usize, e: Error) -> Error {
    if len > 1 {
        e.context(format_args!("request {i}"))
    } else {
        e
    }
}

/// Checks what a batch's requests share (see the module docs): at least one request, one task;
/// for text-to-image the grid, steps and order; for text answers the block length. The error
/// names the first request that differs from request 0.
pub fn check_batch(requests: &[Request]) -> Result<()> {
    let Some(first) = requests.first() else {
        return Err(Error::Input("a batch needs at least one request".into()));
    };
    for (i, r) in requests.iter().enumerate().skip(1) {
        let differ = |what: String| {
            Err(Error::Input(format!(
                "request {i}: {what} (a batch of text-to-image requests shares the grid, the \
                 steps and the order; a batch of text answers shares the block length)"
            )))
        };
        match (first, r) {
            (Task::T2i(a), Task::T2i(b)) => {
                if (a.height, a.width) != (b.height, b.width) {
                    return differ(format!(
                        "grid {}x{} differs from request 0's {}x{}",
                        b.height, b.width, a.height, a.width
                    ));
                }
                if a.steps != b.steps {
                    return differ(format!(
                        "{} steps differ from request 0's {}",
                        b.steps, a.steps
                    ));
                }
                if a.order != b.order {
                    return differ(format!(
                        "order {} differs from request 0's {}",
                        b.order, a.order
                    ));
                }
            }
            (Task::Text(a), Task::Text(b)) => {
                if a.block_len != b.block_len {
                    return differ(format!(
                        "block length {} differs from request 0's {}",
                        b.block_len, a.block_len
                    ));
                }
            }
            _ => return differ("another task than request 0's".into()),
        }
    }
    Ok(())
}

/// Lays regions out one after another for requests of `(sequences, slots)`, in checked
/// arithmetic: the batch's pool stays below 2^31 slots (slots and positions are u32 in plans
/// and tags).
pub fn regions(sizes: impl IntoIterator<Item = (usize, usize)>) -> Result<Vec<Region>> {
    let (mut seq, mut slot) = (0usize, 0usize);
    let mut out = Vec::new();
    for (i, (n_seqs, slots)) in sizes.into_iter().enumerate() {
        out.push(Region {
            seq,
            n_seqs,
            slot_base: slot,
            slots,
        });
        seq += n_seqs;
        slot = slot
            .checked_add(slots)
            .filter(|&s| (s as u64) < 1 << 31)
            .ok_or_else(|| {
                Error::Input(format!(
                    "batch too large: the K/V pool of requests 0..={i} passes 2^31 slots"
                ))
            })?;
    }
    Ok(out)
}

/// A batch compiled for the host loop: every request's [`Sampling`] and its region. The host
/// executor drives it step by step from one [`DecodeState`] per request; building it checks
/// the whole batch (each request as a single generation would, then what the requests share)
/// before anything is allocated, naming the request at fault.
pub struct BatchSampling {
    requests: Vec<Sampling>,
    regions: Vec<Region>,
}

impl BatchSampling {
    /// Checks `requests` against `cfg` and fixes everything known before sampling.
    pub fn new(cfg: &Config, requests: &[Request], mode: Mode) -> Result<BatchSampling> {
        // What the requests share first: it is cheap, and a request that differs should not
        // get as far as allocating its schedule.
        check_batch(requests)?;
        let len = requests.len();
        let samplings = (requests.iter().enumerate())
            .map(|(i, r)| Sampling::new(cfg, r, mode).map_err(|e| in_request(len, i, e)))
            .collect::<Result<Vec<_>>>()?;
        let regions =
            regions((samplings.iter()).map(|s| (s.layout().n_seqs(), s.layout().pool_slots())))?;
        Ok(BatchSampling {
            requests: samplings,
            regions,
        })
    }

    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether the batch is empty (never: [`BatchSampling::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Request `i`'s sampling (its layout, steps, queries, sampler parameters).
    pub fn request(&self, i: usize) -> &Sampling {
        &self.requests[i]
    }

    /// Every request's region.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Pool slots of the whole batch.
    pub fn pool_slots(&self) -> usize {
        self.regions.last().map_or(0, |r| r.slot_base + r.slots)
    }

    /// Bounds on one pass of the batch: rows per branch (indexed by `Branch as usize`) and
    /// logits rows. A sequence feeds at most its prompt (text rows), every response position
    /// once and the registers (rows of the response's branch), and samples at most its
    /// request's largest query ([`Sampling::max_query`]), as the memory check counts them
    /// (`memory::add_batch`, whose largest t2i group bounds the schedule's): a workspace
    /// doubling up to these bounds stays within the memory checked.
    pub fn pass_bounds(&self) -> ([usize; 2], usize) {
        let mut rows = [0usize; 2];
        let mut logits = 0usize;
        for r in &self.requests {
            let l = r.layout();
            for prompt in &l.prompts {
                rows[Branch::Text as usize] += prompt.len();
                rows[l.branch as usize] += l.n + l.r;
                logits += r.max_query();
            }
        }
        (rows, logits)
    }

    /// Passes after the prefill: the most steps of any request (text requests may differ).
    pub fn steps(&self) -> usize {
        self.requests.iter().map(Sampling::steps).max().unwrap_or(0)
    }

    /// The decode states before the first step, one per request.
    pub fn start(&self) -> Vec<DecodeState> {
        self.requests.iter().map(Sampling::start).collect()
    }

    /// The prefill of every request that prefills ([`Sampling::prefills`]), as one plan; `None`
    /// when none does.
    pub fn prefill_plan(&self) -> Result<Option<(StepPlan, Vec<PartOffsets>)>> {
        let plans = (self.requests.iter())
            .map(|s| s.prefills().then(|| s.prefill_plan()).transpose())
            .collect::<Result<Vec<_>>>()?;
        if plans.iter().all(Option::is_none) {
            return Ok(None);
        }
        self.concat(&plans).map(Some)
    }

    /// The plan of pass `k` for the requests with a step `k` (`queries[i]`: request `i`'s
    /// query, `None` once it has no step `k`), from their states before it.
    pub fn step_plan(
        &self,
        k: usize,
        states: &[DecodeState],
        queries: &[Option<Vec<u32>>],
    ) -> Result<(StepPlan, Vec<PartOffsets>)> {
        let len = self.len();
        let plans = (self.requests.iter().zip(states).zip(queries).enumerate())
            .map(|(i, ((s, st), q))| {
                q.as_ref()
                    .map(|q| s.step_plan(k, st, q).map_err(|e| in_request(len, i, e)))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        self.concat(&plans)
    }

    /// The requests' plans (one per request, `None` for one that feeds nothing) side by side.
    pub fn concat(&self, plans: &[Option<StepPlan>]) -> Result<(StepPlan, Vec<PartOffsets>)> {
        let parts: Vec<PlanPart> = (self.regions.iter().zip(plans))
            .map(|(r, p)| r.part(p.as_ref()))
            .collect();
        StepPlan::concat(&parts)
    }
}

//! The sampler pass's inputs and outputs (SPEC §4.1/§4.2, `sl_sample` in `kernels/params.h`):
//! every backend's `sample` and the device kernel take [`SampleParams`] and give [`Sampled`].

/// Parameters of one sampler pass (SPEC §4.1/§4.2): CFG combine, banned ids, temperature,
/// Philox-Gumbel argmax, confidence.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    /// CFG scale `g`: the logits hold `2n` rows (`n` conditional, then the same `n`
    /// unconditional) and `(1+g)·cond − g·uncond` is sampled. `None`: `n` rows, no CFG.
    pub guidance: Option<f32>,
    /// Gumbel temperature; 0 is plain argmax (ties to the lower id).
    pub temperature: f32,
    /// Ids that never win (e.g. the text `[MASK]`).
    pub banned: Vec<u32>,
    /// Philox key (`seed_lo`, `seed_hi`).
    pub seed: u64,
    /// Step index (Philox counter word 2).
    pub step: u32,
    /// Philox counter word 3. The samplers of this crate pass 0: a request's noise depends on
    /// its own seed, positions and steps alone, never on its place in a batch (SPEC §4.1).
    pub request: u32,
    /// Sequence position of each sampled row (Philox counter word 1), `n` entries.
    pub positions: Vec<u32>,
}

/// One sampled position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The chosen id.
    pub token: u32,
    /// `softmax(logits/τ)[token]` (τ = 1 when the temperature is 0), after CFG and bans.
    pub confidence: f32,
    /// Natural log-sum-exp of `logits/τ` over the allowed ids (τ = 1 when the temperature is 0).
    pub lse: f32,
}

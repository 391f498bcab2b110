//! A generation as the command line asks for it: flags that may be left out take defaults
//! derived from the others, flags that do not apply to the task are refused, and the sizes that
//! decide the run's memory ([`GenShape`]) are known, checked, before anything is allocated.

use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::memory::GenShape;
use crate::plan::MAX_BLOCK;
use crate::sampler::{T2iRequest, Task, TextRequest};
use crate::schedule::{self, Order};
use rand::{Rng, SeedableRng};

/// Which task a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Text-to-image.
    T2i,
    /// A text answer.
    Text,
}

/// The prompt: random ids (seeded by the workload's seed) or given ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSpec {
    /// This many random text ids, never the text \[MASK\].
    Random(usize),
    /// These ids.
    Ids(Vec<u32>),
}

/// The flags of a generation. `None` means "not given": the default depends on the task and
/// the other flags ([`Workload::shape`]), and a task-specific flag given for the other task is
/// an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The task.
    pub task: TaskKind,
    /// Steps `K`: default [`Workload::T2I_STEPS`] (at most one per grid cell) for t2i,
    /// [`schedule::default_text_steps`] for text.
    pub steps: Option<usize>,
    /// `H × W` (t2i only; default 32 × 32).
    pub grid: Option<(usize, usize)>,
    /// The prompt.
    pub prompt: PromptSpec,
    /// Answer length `G` (text only; default 128).
    pub answer_len: Option<usize>,
    /// Semi-autoregressive block length `S` (text only; default 32).
    pub block: Option<usize>,
    /// CFG scale (t2i only; default 4).
    pub guidance: Option<f32>,
    /// Gumbel temperature (0 = argmax).
    pub temperature: f32,
    /// Decode order (t2i only; default stratified).
    pub order: Option<Order>,
    /// Sampling seed (also seeds the random prompt and the order's shuffles).
    pub seed: u64,
}

impl Workload {
    /// Default grid of a text-to-image generation.
    pub const GRID: (usize, usize) = (32, 32);
    /// Default steps of a text-to-image generation (fewer on grids of fewer cells).
    pub const T2I_STEPS: usize = 64;
    /// Default answer length of a text answer.
    pub const ANSWER_LEN: usize = 128;
    /// Default semi-autoregressive block length.
    pub const BLOCK: usize = 32;
    /// Default CFG scale.
    pub const GUIDANCE: f32 = 4.0;
    /// Default random prompt length.
    pub const PROMPT_LEN: usize = 64;

    /// A workload of `task` with every optional flag left out, a random prompt of
    /// [`Workload::PROMPT_LEN`] ids, temperature 1 and seed 0.
    pub fn new(task: TaskKind) -> Workload {
        Workload {
            task,
            steps: None,
            grid: None,
            prompt: PromptSpec::Random(Self::PROMPT_LEN),
            answer_len: None,
            block: None,
            guidance: None,
            temperature: 1.0,
            order: None,
            seed: 0,
        }
    }

    /// Refuses a flag that the task ignores: `--grid`, `--guidance`, `--order` on a text
    /// answer; `--answer-len`, `--block` on text-to-image.
    pub fn check_flags(&self) -> Result<()> {
        let refuse = |flag: &str, task: &str, what: &str| {
            Err(Error::Input(format!(
                "{flag} applies to --task {task} only ({what}); this is a --task {} run",
                match self.task {
                    TaskKind::T2i => "t2i",
                    TaskKind::Text => "text",
                }
            )))
        };
        match self.task {
            TaskKind::Text => {
                if self.grid.is_some() {
                    return refuse("--grid", "t2i", "the image grid");
                }
                if self.guidance.is_some() {
                    return refuse("--guidance", "t2i", "classifier-free guidance of an image");
                }
                if self.order.is_some() {
                    return refuse("--order", "t2i", "the order image positions are decoded in");
                }
            }
            TaskKind::T2i => {
                if self.answer_len.is_some() {
                    return refuse("--answer-len", "text", "the length of a text answer");
                }
                if self.block.is_some() {
                    return refuse(
                        "--block",
                        "text",
                        "a text answer's semi-autoregressive block",
                    );
                }
            }
        }
        Ok(())
    }

    /// The prompt's length.
    pub fn prompt_len(&self) -> usize {
        match &self.prompt {
            PromptSpec::Random(n) => *n,
            PromptSpec::Ids(ids) => ids.len(),
        }
    }

    /// Checks the flags against `cfg` and returns the sizes of the run, with every default
    /// resolved. O(prompt ids given), allocates nothing: call it before building a model or
    /// a prompt, and bound the run's memory with [`crate::memory::add_generation`].
    pub fn shape(&self, cfg: &Config) -> Result<GenShape> {
        self.check_flags()?;
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            )));
        }
        let p = self.prompt_len();
        match &self.prompt {
            PromptSpec::Ids(ids) => crate::sampler::check_prompt(cfg, ids)?,
            PromptSpec::Random(n) if *n > 0 && cfg.text_vocab < 2 => {
                return Err(Error::Input(format!(
                    "a random prompt needs a text id other than [MASK] ({}), and text_vocab is \
                     {}: give --prompt ids or --prompt-len 0",
                    cfg.text_mask_id, cfg.text_vocab
                )));
            }
            PromptSpec::Random(_) => {}
        }
        let shape = match self.task {
            TaskKind::T2i => {
                let (h, w) = self.grid.unwrap_or(Self::GRID);
                let n = match h.checked_mul(w) {
                    Some(n) if n > 0 && n <= u32::MAX as usize => n,
                    Some(0) => return Err(Error::Input(format!("zero-size grid {h}x{w}"))),
                    _ => {
                        return Err(Error::Input(format!(
                            "grid {h}x{w} has more than u32::MAX cells"
                        )));
                    }
                };
                let k = self.steps.unwrap_or(Self::T2I_STEPS.min(n));
                if k == 0 || k > n {
                    return Err(Error::Input(format!(
                        "steps (K) must be in 1..=positions (N): got K = {k}, N = {n} ({h}x{w})"
                    )));
                }
                let guidance = self.guidance.unwrap_or(Self::GUIDANCE);
                if !(guidance.is_finite() && guidance >= 0.0) {
                    return Err(Error::Input(format!(
                        "guidance must be finite and ≥ 0, got {guidance}"
                    )));
                }
                GenShape {
                    response: Branch::Image,
                    prompt: p as u64,
                    response_len: n as u64,
                    n_seqs: if guidance > 0.0 { 2 } else { 1 },
                    steps: k as u64,
                    // The schedule's largest group (bounded without building it).
                    max_query: schedule::max_shift_count(n, k) as u64,
                    grid: Some((h as u64, w as u64)),
                }
            }
            TaskKind::Text => {
                let g = self.answer_len.unwrap_or(Self::ANSWER_LEN);
                let s = self.block.unwrap_or(Self::BLOCK);
                if g == 0 || s == 0 {
                    return Err(Error::Input(format!(
                        "answer length ({g}) and block length ({s}) must be > 0"
                    )));
                }
                let k = self
                    .steps
                    .unwrap_or_else(|| schedule::default_text_steps(g, s));
                schedule::check_text_steps(g, s, k)?;
                GenShape {
                    response: Branch::Text,
                    prompt: p as u64,
                    response_len: g as u64,
                    n_seqs: 1,
                    steps: k as u64,
                    max_query: s.min(g) as u64,
                    grid: None,
                }
            }
        };
        // Positions (prompt, response, registers) fit the plan's 31-bit fields, and every
        // step's block number fits a tag.
        let seq = shape
            .prompt
            .checked_add(shape.response_len)
            .and_then(|v| v.checked_add(cfg.n_registers as u64))
            .and_then(|v| v.checked_mul(shape.n_seqs));
        if seq.is_none_or(|v| v >= 1 << 31) {
            return Err(Error::Input(format!(
                "sequence too long: prompt {} + response {} + {} registers (× {} sequences) \
                 must stay below 2^31 positions",
                shape.prompt, shape.response_len, cfg.n_registers, shape.n_seqs
            )));
        }
        if shape.steps >= u64::from(MAX_BLOCK) {
            return Err(Error::Input(format!(
                "{} steps: at most {} fit a block tag",
                shape.steps,
                MAX_BLOCK - 1
            )));
        }
        Ok(shape)
    }

    /// The workloads of a batch of `n` requests (`generate --batch`): request `i` takes the
    /// seed `seed + i` (wrapping; so its random prompt and its noise differ from the others')
    /// and, with `prompts` (one per request), the `i`-th prompt. Errors: `prompts` of another
    /// length than `n`, `n = 0`.
    pub fn batch(&self, n: usize, prompts: Option<&[Vec<u32>]>) -> Result<Vec<Workload>> {
        if n == 0 {
            return Err(Error::Input("a batch needs at least one request".into()));
        }
        if let Some(p) = prompts
            && p.len() != n
        {
            return Err(Error::Input(format!(
                "{} prompts for a batch of {n}",
                p.len()
            )));
        }
        Ok((0..n)
            .map(|i| Workload {
                seed: self.seed.wrapping_add(i as u64),
                prompt: match prompts {
                    Some(p) => PromptSpec::Ids(p[i].clone()),
                    None => self.prompt.clone(),
                },
                ..self.clone()
            })
            .collect())
    }

    /// The request to run: checks as [`Workload::shape`] does, then draws the random prompt
    /// (ids uniform over the text vocabulary without \[MASK\], from ChaCha8 seeded by
    /// `seed ^ 0x5EED_9A0B`).
    pub fn task(&self, cfg: &Config) -> Result<Task> {
        let shape = self.shape(cfg)?;
        let prompt = match &self.prompt {
            PromptSpec::Ids(ids) => ids.clone(),
            PromptSpec::Random(len) => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x5EED_9A0B);
                // Terminates: `shape` checked that an id other than [MASK] exists, so each
                // draw hits [MASK] with probability at most 1/2.
                (0..*len)
                    .map(|_| {
                        loop {
                            let id = rng.gen_range(0..cfg.text_vocab as u32);
                            if id != cfg.text_mask_id {
                                break id;
                            }
                        }
                    })
                    .collect()
            }
        };
        Ok(match self.task {
            TaskKind::T2i => {
                let (h, w) = shape.grid.expect("t2i has a grid");
                Task::T2i(T2iRequest {
                    prompt,
                    height: h as usize,
                    width: w as usize,
                    steps: shape.steps as usize,
                    guidance: self.guidance.unwrap_or(Self::GUIDANCE),
                    temperature: self.temperature,
                    order: self.order.unwrap_or(Order::Stratified),
                    seed: self.seed,
                })
            }
            TaskKind::Text => Task::Text(TextRequest {
                prompt,
                answer_len: shape.response_len as usize,
                block_len: self.block.unwrap_or(Self::BLOCK),
                steps: shape.steps as usize,
                temperature: self.temperature,
                banned: Vec::new(),
                seed: self.seed,
            }),
        })
    }
}

/// Reads a batch's prompts (`generate --prompts FILE`): one prompt per line, text ids separated
/// by commas and/or spaces, optionally in brackets (`[]` is an empty prompt); blank lines and
/// lines starting with `#` are skipped. The ids are checked against the config later, per
/// request. Errors name the line.
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let inner = line
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .unwrap_or(line);
        let ids = inner
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<u32>().map_err(|_| {
                    Error::Input(format!(
                        "{} line {}: `{t}` is not a token id (a non-negative 32-bit integer)",
                        path.display(),
                        n + 1
                    ))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        prompts.push(ids);
    }
    if prompts.is_empty() {
        return Err(Error::Input(format!(
            "{}: no prompt (one line of ids per request)",
            path.display()
        )));
    }
    Ok(prompts)
}

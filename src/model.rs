//! The SPEC §2.3 graph, written once against [`Backend`].
//!
//! Elastic Mixture-of-Transformers: each branch has its own weights and residual stream; both
//! share one attention space. Layers `< n_joint_layers` attend across branches, later layers
//! within a branch, and rows of a branch that nothing needing logits can see there are skipped
//! (text rows during text-to-image). Where the backend allows it
//! ([`Backend::prunes_last_layer`]), the last layer goes past the K/V only for the rows that
//! need logits: no other row's output is read after it.

use crate::backend::Backend;
use crate::backend::MatrixKind::{Activation, Logits, Residual};
pub use crate::backend::Product;
use crate::config::{Branch, Config};
use crate::error::Result;
use crate::plan::StepPlan;
use crate::profile;
use crate::weights::HostWeights;
use std::collections::HashMap;

/// Every matrix product [`Model::forward_in`] runs for `plan`, in its order (so a backend can
/// prepare each distinct one — cuBLASLt algorithm choice, kernel loading — before the pass is
/// captured in a graph). `prune` says whether the pass has the plan's tail
/// ([`Prepared::tail`], [`Backend::prunes_last_layer`]).
pub fn products(cfg: &Config, plan: &StepPlan, prune: bool) -> Vec<Product> {
    let mut out = Vec::new();
    let mut push = |m: usize, n: usize, k: usize, kind, accumulate| {
        out.push(Product {
            m,
            n,
            k,
            out: kind,
            accumulate,
        })
    };
    let tail = match prune {
        true => plan.logits_tail(),
        false => None,
    };
    for layer in 0..cfg.n_layers {
        let active: Vec<Branch> = Branch::ALL
            .into_iter()
            .filter(|&b| plan.computes(b, layer, cfg.n_joint_layers))
            .collect();
        let (a, kv) = (cfg.attn_dim(), cfg.kv_dim());
        // Per branch: q|k|v in one product, the output projection, gate|up in one, down.
        for &b in &active {
            let (m, d) = (plan.rows(b).len(), cfg.d_model(b));
            push(m, a + 2 * kv, d, Activation, false);
        }
        // The last layer of a pruned pass goes on with the tail's rows alone.
        let (plan, active) = match (&tail, plan.logits_branch) {
            (Some(t), Some(lb)) if layer + 1 == cfg.n_layers => (t, vec![lb]),
            _ => (plan, active),
        };
        for &b in &active {
            let (m, d, f) = (plan.rows(b).len(), cfg.d_model(b), cfg.d_mlp(b));
            push(m, d, a, Residual, true);
            push(m, 2 * f, d, Activation, false);
            push(m, d, f, Residual, true);
        }
    }
    if let Some(lb) = plan.logits_branch {
        push(
            plan.logits_rows.len(),
            cfg.vocab(lb),
            cfg.d_model(lb),
            Logits,
            false,
        );
    }
    out
}

/// Per-branch weights outside the layers.
pub struct BranchWeights<W> {
    /// `[rows_b, d_b]` token embeddings.
    pub embed: W,
    /// `[d_b]` the register embedding.
    pub register: W,
    /// `[d_b]` final RMSNorm gain.
    pub final_norm: W,
    /// `[V_b, d_b]` output head.
    pub head: W,
}

/// One branch's weights in one layer. The projections that share an input are concatenated at
/// load time ([`Backend::concat_weights`]; the weights file keeps them apart), so a layer runs
/// two products where it would run five: q|k|v and gate|up.
pub struct LayerWeights<W> {
    /// `[d_b]` pre-attention RMSNorm gain.
    pub attn_norm: W,
    /// `[A + 2·kv_dim, d_b]`: the query, key and value projections, rows in that order.
    pub qkv: W,
    /// `[d_b, A]` output projection.
    pub o: W,
    /// `[d_b]` pre-MLP RMSNorm gain.
    pub ffn_norm: W,
    /// `[2·F_b, d_b]`: the SwiGLU gate and up projections, rows in that order.
    pub gate_up: W,
    /// `[d_b, F_b]` SwiGLU down.
    pub down: W,
}

/// A plan uploaded to a backend, together with its host copy (shapes live there).
pub struct Prepared<B: Backend> {
    /// The host plan.
    pub plan: StepPlan,
    /// The backend's copy.
    pub dev: B::Plan,
    /// The plan's [`StepPlan::logits_tail`], uploaded, where the backend
    /// [prunes](Backend::prunes_last_layer) the last layer: that layer then goes past the K/V
    /// only for the rows that need logits.
    pub tail: Option<Box<Prepared<B>>>,
}

/// The model: config, backend and the weights resident on it.
pub struct Model<B: Backend> {
    cfg: Config,
    backend: B,
    branches: [BranchWeights<B::Weight>; 2],
    layers: Vec<[LayerWeights<B::Weight>; 2]>,
}

/// Per-branch activation buffers.
struct Scratch<M> {
    x: M,
    h: M,
    /// `[rows, A + 2·kv_dim]`: q | k | v.
    qkv: M,
    att: M,
    /// `[rows, 2·F]`: gate | up.
    gate_up: M,
    act: M,
}

/// The matrices after the last layer: the gathered logits rows, their final norm, the logits.
/// (With a [`Prepared::tail`], the tail's `x` holds the logits rows and `rows` is unused.)
struct Head<M> {
    rows: M,
    normed: M,
    logits: M,
}

/// The activation matrices of forward passes, allocated for up to a number of rows per branch
/// (and of logits rows) and reused by every pass that fits.
///
/// A growable workspace reallocates when a plan needs more rows: for exactly those rows
/// ([`Workspace::new`]), or for twice what it held up to known bounds
/// ([`Workspace::growing_to`]). A [`Workspace::freeze`]d one refuses instead, so that work
/// queued for later replay (a captured CUDA graph) never allocates.
pub struct Workspace<B: Backend> {
    scratch: [Option<Scratch<B::Matrix>>; 2],
    /// What a growable workspace grows towards: rows per branch, logits rows.
    bounds: Option<([usize; 2], usize)>,
    /// The last layer's logits rows ([`Prepared::tail`]), sized for the wider branch.
    tail: Option<Scratch<B::Matrix>>,
    head: Option<Head<B::Matrix>>,
    rows: [usize; 2],
    tail_rows: usize,
    logits_rows: usize,
    /// The head's model width and vocabulary as allocated (those of the logits branches seen).
    head_cols: (usize, usize),
    frozen: bool,
}

impl<B: Backend> Workspace<B> {
    /// An empty, growable workspace: the first pass allocates what it needs.
    pub fn new() -> Self {
        Workspace {
            scratch: [None, None],
            bounds: None,
            tail: None,
            head: None,
            rows: [0, 0],
            tail_rows: 0,
            logits_rows: 0,
            head_cols: (0, 0),
            frozen: false,
        }
    }

    /// An empty, growable workspace for passes of at most `rows[b]` rows of branch `b` and
    /// `logits_rows` logits rows (a pass past them still gets what it needs). When a pass needs
    /// more rows than it holds, it takes at least twice what it held, up to those bounds: the
    /// host loop's sparse passes grow by a few rows a step, and reallocating (and zeroing) at
    /// each was 3 % of a sparse `small` 64×64 generation on the CPU.
    pub fn growing_to(rows: [usize; 2], logits_rows: usize) -> Self {
        Workspace {
            bounds: Some((rows, logits_rows)),
            ..Self::new()
        }
    }

    /// Rows to allocate for a pass that needs `need` rows where `cap` are held and growth
    /// stops at `bound` (if any): `need`, or up to twice `cap` where a bound allows it.
    fn grown(need: usize, cap: usize, bound: Option<usize>) -> usize {
        bound.map_or(need, |b| need.max(cap.saturating_mul(2).min(b)))
    }

    /// Refuses to grow from now on: a pass needing more rows than allocated is an error.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Rows allocated per branch (text, image) and logits rows.
    pub fn capacity(&self) -> ([usize; 2], usize) {
        (self.rows, self.logits_rows)
    }

    /// The vocabulary the head holds logits rows for: the widest logits branch of the passes
    /// so far (0 before any).
    pub fn logits_width(&self) -> usize {
        self.head_cols.1
    }

    /// Rows allocated for the last layer's pass over the logits rows alone (where the backend
    /// [prunes](Backend::prunes_last_layer) the last layer; 0 until a pass needs it).
    pub fn tail_capacity(&self) -> usize {
        self.tail_rows
    }

    /// The logits of the last pass that computed any (`[logits rows, V]`).
    pub fn logits(&self) -> Option<&B::Matrix> {
        self.head.as_ref().map(|h| &h.logits)
    }
}

fn grow_error(what: &str, need: usize, have: usize) -> crate::Error {
    crate::Error::Input(format!(
        "forward pass: {need} {what} but the frozen workspace holds {have}"
    ))
}

impl<B: Backend> Default for Workspace<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Model<B> {
    /// Uploads `weights` (validated against `cfg`) to `backend`.
    pub fn new(backend: B, cfg: Config, weights: HostWeights) -> Result<Self> {
        cfg.validate()?;
        weights.validate(&cfg)?;
        let mut tensors = weights.tensors;
        Self::from_uploaded(backend, cfg, |be, _, name, _| {
            let t = tensors
                .remove(name)
                .ok_or_else(|| crate::Error::Weights(format!("missing tensor `{name}`")))?;
            be.upload_weight(t)
        })
    }

    /// Builds a model whose weights `tensor` puts on `backend`, one call per tensor of
    /// [`Config::tensor_shapes`]: `tensor(backend, index, name, shape)`, `index` being the
    /// tensor's position in that list. [`Model::new`] uploads host tensors this way; a backend
    /// can also generate them in place (`CudaBackend`'s device-side random weights).
    pub fn from_uploaded(
        backend: B,
        cfg: Config,
        mut tensor: impl FnMut(&B, usize, &str, &[usize]) -> Result<B::Weight>,
    ) -> Result<Self> {
        cfg.validate()?;
        let shapes = cfg.tensor_shapes();
        let index: HashMap<&str, usize> = shapes
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.as_str(), i))
            .collect();
        let mut take = |name: String| -> Result<B::Weight> {
            let &i = index.get(name.as_str()).ok_or_else(|| {
                crate::Error::Weights(format!("`{name}` is not a tensor of the config"))
            })?;
            tensor(&backend, i, &name, &shapes[i].1)
        };
        let mut branch = |b: Branch| -> Result<BranchWeights<B::Weight>> {
            let n = b.name();
            Ok(BranchWeights {
                embed: take(format!("{n}.embed"))?,
                register: take(format!("{n}.register"))?,
                final_norm: take(format!("{n}.final_norm"))?,
                head: take(format!("{n}.head"))?,
            })
        };
        let branches = [branch(Branch::Text)?, branch(Branch::Image)?];
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut layer = |b: Branch| -> Result<LayerWeights<B::Weight>> {
                let p = format!("layers.{i}.{}", b.name());
                // In Config::tensor_shapes order; q|k|v and gate|up concatenated as they come.
                let attn_norm = take(format!("{p}.attn_norm"))?;
                let qkv = ["q", "k", "v"]
                    .iter()
                    .map(|n| take(format!("{p}.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                let qkv = backend.concat_weights(qkv)?;
                let o = take(format!("{p}.o"))?;
                let ffn_norm = take(format!("{p}.ffn_norm"))?;
                let gate_up = ["gate", "up"]
                    .iter()
                    .map(|n| take(format!("{p}.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                let gate_up = backend.concat_weights(gate_up)?;
                Ok(LayerWeights {
                    attn_norm,
                    qkv,
                    o,
                    ffn_norm,
                    gate_up,
                    down: take(format!("{p}.down"))?,
                })
            };
            layers.push([layer(Branch::Text)?, layer(Branch::Image)?]);
        }
        Ok(Model {
            cfg,
            backend,
            branches,
            layers,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The per-branch weights outside the layers, text then image.
    pub fn branch_weights(&self) -> &[BranchWeights<B::Weight>; 2] {
        &self.branches
    }

    /// The weights of every layer, per branch (text then image).
    pub fn layer_weights(&self) -> &[[LayerWeights<B::Weight>; 2]] {
        &self.layers
    }

    /// Every weight as the backend holds it, in [`Config::tensor_shapes`] order with q|k|v and
    /// gate|up concatenated ([`LayerWeights`]).
    pub fn tensors(&self) -> Vec<&B::Weight> {
        let mut out = Vec::new();
        for bw in &self.branches {
            out.extend([&bw.embed, &bw.register, &bw.final_norm, &bw.head]);
        }
        for lw in self.layers.iter().flatten() {
            out.extend([
                &lw.attn_norm,
                &lw.qkv,
                &lw.o,
                &lw.ffn_norm,
                &lw.gate_up,
                &lw.down,
            ]);
        }
        out
    }

    /// Uploads a plan for [`Model::forward`], with its [`StepPlan::logits_tail`] where the
    /// backend [prunes](Backend::prunes_last_layer) the last layer.
    pub fn prepare(&self, plan: StepPlan) -> Result<Prepared<B>> {
        let tail = match self.backend.prunes_last_layer() {
            true => plan.logits_tail(),
            false => None,
        };
        let tail = tail
            .map(|t| self.prepare_whole(t).map(Box::new))
            .transpose()?;
        let mut p = self.prepare_whole(plan)?;
        p.tail = tail;
        Ok(p)
    }

    /// Uploads a plan whose passes take every row through every layer (no tail).
    pub fn prepare_whole(&self, plan: StepPlan) -> Result<Prepared<B>> {
        let dev = self.backend.upload_plan(&plan)?;
        Ok(Prepared {
            plan,
            dev,
            tail: None,
        })
    }

    /// A zeroed K/V pool with `slots` slots.
    pub fn new_cache(&self, slots: usize) -> Result<B::Cache> {
        self.backend.new_cache(&self.cfg, slots)
    }

    /// A workspace allocated for up to `rows[b]` rows of branch `b` and `logits_rows` logits
    /// rows of branch `logits` (its vocabulary: a text-to-image run's logits are 8192 wide
    /// where a text answer's are 127,378 at `lavida-o`).
    pub fn workspace(
        &self,
        rows: [usize; 2],
        logits_rows: usize,
        logits: Branch,
    ) -> Result<Workspace<B>> {
        let mut ws = Workspace::new();
        for b in Branch::ALL {
            self.fit_branch(&mut ws, b, rows[b as usize])?;
        }
        if self.backend.prunes_last_layer() {
            self.fit_tail(&mut ws, Branch::Text, logits_rows)?;
        }
        self.fit_head(&mut ws, logits, logits_rows)?;
        Ok(ws)
    }

    fn fit_branch(&self, ws: &mut Workspace<B>, b: Branch, n: usize) -> Result<()> {
        let i = b as usize;
        let what = format!("{} rows", b.name());
        let (slot, cap) = (&mut ws.scratch[i], &mut ws.rows[i]);
        let bound = ws.bounds.map(|(rows, _)| rows[i]);
        self.fit_scratch(slot, cap, ws.frozen, bound, &what, [b], b, n)
    }

    /// The tail's scratch ([`Prepared::tail`]): sized for the wider of the two branches, shaped
    /// for `b`.
    fn fit_tail(&self, ws: &mut Workspace<B>, b: Branch, n: usize) -> Result<()> {
        let (slot, cap) = (&mut ws.tail, &mut ws.tail_rows);
        let bound = ws.bounds.map(|(_, logits)| logits);
        self.fit_scratch(
            slot,
            cap,
            ws.frozen,
            bound,
            "logits rows",
            Branch::ALL,
            b,
            n,
        )
    }

    /// Makes `slot` hold `n` rows shaped for branch `b`, reallocating (for the widest of
    /// `sized_for`, and rows as [`Workspace::grown`] says) when its capacity `cap` is short and
    /// the workspace is not frozen.
    #[allow(clippy::too_many_arguments)]
    fn fit_scratch<const N: usize>(
        &self,
        slot: &mut Option<Scratch<B::Matrix>>,
        cap: &mut usize,
        frozen: bool,
        bound: Option<usize>,
        what: &str,
        sized_for: [Branch; N],
        b: Branch,
        n: usize,
    ) -> Result<()> {
        let (cfg, be) = (&self.cfg, &self.backend);
        let (a, kv) = (cfg.attn_dim(), cfg.kv_dim());
        if n > *cap || slot.is_none() && n > 0 {
            if frozen {
                return Err(grow_error(what, n, *cap));
            }
            let widest = |f: fn(&Config, Branch) -> usize| {
                sized_for.iter().map(|&b| f(cfg, b)).max().unwrap_or(0)
            };
            let (d, f) = (widest(Config::d_model), widest(Config::d_mlp));
            let rows = Workspace::<B>::grown(n, *cap, bound);
            // The old buffers go first: their contents are never kept, and holding both would
            // need twice the memory the bound counts.
            *slot = None;
            *slot = Some(Scratch {
                x: be.matrix(rows, d, Residual)?,
                h: be.matrix(rows, d, Activation)?,
                qkv: be.matrix(rows, a + 2 * kv, Activation)?,
                att: be.matrix(rows, a, Activation)?,
                gate_up: be.matrix(rows, 2 * f, Activation)?,
                act: be.matrix(rows, f, Activation)?,
            });
            *cap = rows;
        }
        if let Some(s) = slot.as_mut() {
            let (d, f) = (cfg.d_model(b), cfg.d_mlp(b));
            be.reshape(&mut s.x, n, d)?;
            be.reshape(&mut s.h, n, d)?;
            be.reshape(&mut s.qkv, n, a + 2 * kv)?;
            be.reshape(&mut s.att, n, a)?;
            be.reshape(&mut s.gate_up, n, 2 * f)?;
            be.reshape(&mut s.act, n, f)?;
        }
        Ok(())
    }

    /// Makes the head hold `n` logits rows of branch `b`: sized for that branch's width and
    /// vocabulary (a run's logits all come from its response's branch), or for the wider of
    /// those and what it held when passes of both branches share a workspace.
    fn fit_head(&self, ws: &mut Workspace<B>, b: Branch, n: usize) -> Result<()> {
        let (cfg, be) = (&self.cfg, &self.backend);
        let (d, v) = (cfg.d_model(b), cfg.vocab(b));
        let (held_d, held_v) = ws.head_cols;
        let fits = ws.head.is_some() && n <= ws.logits_rows && d <= held_d && v <= held_v;
        if n > 0 && !fits {
            if ws.frozen {
                return Err(match n > ws.logits_rows {
                    true => grow_error("logits rows", n, ws.logits_rows),
                    false => crate::Error::Input(format!(
                        "forward pass: logits of the {} branch ({v} wide) but the frozen \
                         workspace's head holds {held_v}",
                        b.name()
                    )),
                });
            }
            // Never narrower or shorter than what it held ((0, 0) and 0 when nothing); rows
            // grow (doubling up to a bound) only when the rows are short, not the width.
            let rows = match n > ws.logits_rows {
                true => Workspace::<B>::grown(n, ws.logits_rows, ws.bounds.map(|(_, l)| l)),
                false => ws.logits_rows,
            };
            let (d, v) = (d.max(held_d), v.max(held_v));
            ws.head = None;
            ws.head = Some(Head {
                rows: be.matrix(rows, d, Residual)?,
                normed: be.matrix(rows, d, Activation)?,
                logits: be.matrix(rows, v, Logits)?,
            });
            ws.logits_rows = rows;
            ws.head_cols = (d, v);
        }
        Ok(())
    }

    /// The rest of a layer for branch `b` once every K/V is stored: attention of `s.qkv`'s
    /// queries (the rows of `dev`), the output projection and the MLP, added into `s.x`.
    #[allow(clippy::too_many_arguments)]
    fn attend_and_mlp(
        &self,
        dev: &B::Plan,
        b: Branch,
        layer: usize,
        joint: bool,
        w: &LayerWeights<B::Weight>,
        s: &mut Scratch<B::Matrix>,
        cache: &B::Cache,
    ) -> Result<()> {
        let be = &self.backend;
        let eps = self.cfg.norm_eps as f32;
        be.attention(dev, b, layer, joint, &s.qkv, cache, &mut s.att)?;
        be.matmul(&s.att, &w.o, &mut s.x, true)?;
        be.rmsnorm(&s.x, &w.ffn_norm, eps, &mut s.h)?;
        be.matmul(&s.h, &w.gate_up, &mut s.gate_up, false)?;
        be.swiglu(&s.gate_up, &mut s.act)?;
        be.matmul(&s.act, &w.down, &mut s.x, true)
    }

    /// One forward pass with fresh buffers: writes the K/V of every fed row into `cache` and
    /// returns the logits `[plan.logits_rows.len(), V]` of the logits branch (`None` when no
    /// logits are asked for). A loop over passes should reuse a [`Workspace`] with
    /// [`Model::forward_in`].
    pub fn forward(&self, p: &Prepared<B>, cache: &mut B::Cache) -> Result<Option<B::Matrix>> {
        let mut ws = Workspace::new();
        if !self.forward_in(p, cache, &mut ws)? {
            return Ok(None);
        }
        Ok(ws.head.map(|h| h.logits))
    }

    /// [`Model::forward`] in `ws`: returns whether logits were computed; they are then
    /// [`Workspace::logits`].
    pub fn forward_in(
        &self,
        p: &Prepared<B>,
        cache: &mut B::Cache,
        ws: &mut Workspace<B>,
    ) -> Result<bool> {
        let (cfg, be, plan) = (&self.cfg, &self.backend, &p.plan);
        let eps = cfg.norm_eps as f32;
        for b in Branch::ALL {
            let n = plan.rows(b).len();
            if n == 0 {
                continue;
            }
            self.fit_branch(ws, b, n)?;
            let s = ws.scratch[b as usize].as_mut().expect("fitted");
            let bw = &self.branches[b as usize];
            be.embed(&p.dev, b, &bw.embed, &bw.register, &mut s.x)?;
        }
        // The last layer past the K/V for the logits rows alone, in the tail's scratch.
        let tail = match (&p.tail, plan.logits_branch) {
            (Some(t), Some(lb)) => {
                self.fit_tail(ws, lb, t.plan.rows(lb).len())?;
                Some((t.as_ref(), lb))
            }
            _ => None,
        };
        let (scratch, tail_s) = (&mut ws.scratch, &mut ws.tail);
        let mut tail_done = false;
        for (layer, weights) in self.layers.iter().enumerate() {
            let _r = profile::range(format_args!("layer {layer}"));
            let joint = layer < cfg.n_joint_layers;
            let active: Vec<Branch> = Branch::ALL
                .into_iter()
                .filter(|&b| plan.computes(b, layer, cfg.n_joint_layers))
                .collect();
            // Every active branch stores its K/V before any branch attends: in joint layers each
            // branch's queries read the other's keys.
            for &b in &active {
                let (w, s) = (
                    &weights[b as usize],
                    scratch[b as usize].as_mut().expect("rows"),
                );
                be.rmsnorm(&s.x, &w.attn_norm, eps, &mut s.h)?;
                be.matmul(&s.h, &w.qkv, &mut s.qkv, false)?;
                be.rope_store_kv(&p.dev, b, layer, &mut s.qkv, cache)?;
            }
            if let Some((t, lb)) = tail.filter(|_| layer + 1 == self.layers.len()) {
                // Nothing reads another row's output past here: its K/V is stored. The logits
                // rows' q|k|v and x are gathered (rows as in the tail plan) and go on alone.
                let (w, s) = (&weights[lb as usize], scratch[lb as usize].as_ref());
                let (s, ts) = (s.expect("rows"), tail_s.as_mut().expect("fitted"));
                be.gather_logit_rows(&p.dev, &s.qkv, &mut ts.qkv)?;
                be.gather_logit_rows(&p.dev, &s.x, &mut ts.x)?;
                self.attend_and_mlp(&t.dev, lb, layer, joint, w, ts, cache)?;
                tail_done = true;
                break;
            }
            for &b in &active {
                let (w, s) = (
                    &weights[b as usize],
                    scratch[b as usize].as_mut().expect("rows"),
                );
                self.attend_and_mlp(&p.dev, b, layer, joint, w, s, cache)?;
            }
        }
        let Some(lb) = plan.logits_branch else {
            return Ok(false);
        };
        let n = plan.logits_rows.len();
        self.fit_head(ws, lb, n)?;
        let (d, v) = (cfg.d_model(lb), cfg.vocab(lb));
        let h = ws.head.as_mut().expect("fitted");
        be.reshape(&mut h.rows, n, d)?;
        be.reshape(&mut h.normed, n, d)?;
        be.reshape(&mut h.logits, n, v)?;
        let bw = &self.branches[lb as usize];
        if tail_done {
            let ts = ws.tail.as_ref().expect("fitted");
            be.rmsnorm(&ts.x, &bw.final_norm, eps, &mut h.normed)?;
        } else {
            let s = ws.scratch[lb as usize].as_ref().expect("logits rows exist");
            be.gather_logit_rows(&p.dev, &s.x, &mut h.rows)?;
            be.rmsnorm(&h.rows, &bw.final_norm, eps, &mut h.normed)?;
        }
        be.matmul(&h.normed, &bw.head, &mut h.logits, false)?;
        Ok(true)
    }
}

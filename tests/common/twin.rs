//! The naive bf16 twin of the CUDA backend (SPEC §6's "naive bf16 implementation of the same
//! op" for a whole forward pass): the CPU backend's f32 arithmetic with every value the CUDA
//! backend stores in bf16 rounded to bf16. A device result is within SPEC §6 when its error
//! against the f32 CPU oracle is at most `max(1e-2, 2 × the twin's error)`.

use half::bf16;
use sparse_lavida::backend::cpu::attention::{self, AttnInputs, AttnShape, AttnTiling};
use sparse_lavida::backend::cpu::ops as cpu;
use sparse_lavida::backend::cpu::{CpuBackend, CpuMatrix, CpuWeight};
use sparse_lavida::backend::{Backend, MatrixKind, SampleParams, Sampled};
use sparse_lavida::config::{Branch, Config};
use sparse_lavida::plan::StepPlan;
use sparse_lavida::weights::HostTensor;

/// SPEC §6's bound for one comparison: 1e-2, or twice the naive bf16 implementation's error.
pub fn bound(twin_err: f64) -> f64 {
    1e-2f64.max(2.0 * twin_err)
}

/// The naive bf16 implementation of the graph (see the module docs): f32 CPU arithmetic, with
/// each value the CUDA backend stores in bf16 rounded to bf16.
pub struct Bf16Twin(pub CpuBackend);

/// A CPU matrix that remembers whether the CUDA backend would store it in bf16.
pub struct TwinMatrix(CpuMatrix, MatrixKind);

/// The twin's K/V pool (bf16-rounded values in f32).
pub struct TwinCache {
    shape: AttnShape,
    rope_theta: f64,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn round_bf16(x: &mut [f32]) {
    for v in x {
        *v = bf16::from_f32(*v).to_f32();
    }
}

/// Columns `lo..hi` of every row of `m`, dense.
fn columns(m: &CpuMatrix, lo: usize, hi: usize) -> Vec<f32> {
    m.data
        .chunks_exact(m.cols.max(1))
        .flat_map(|row| &row[lo..hi])
        .copied()
        .collect()
}

fn stored(m: &mut TwinMatrix) {
    if m.1 == MatrixKind::Activation {
        round_bf16(&mut m.0.data);
    }
}

impl Backend for Bf16Twin {
    type Matrix = TwinMatrix;
    type Weight = CpuWeight;
    type Plan = StepPlan;
    type Cache = TwinCache;

    fn name(&self) -> String {
        "naive bf16 twin".into()
    }
    fn upload_weight(&self, mut t: HostTensor) -> sparse_lavida::Result<CpuWeight> {
        round_bf16(&mut t.data);
        Ok(CpuWeight::new(t))
    }
    fn concat_weights(&self, parts: Vec<CpuWeight>) -> sparse_lavida::Result<CpuWeight> {
        self.0.concat_weights(parts)
    }
    fn upload_plan(&self, plan: &StepPlan) -> sparse_lavida::Result<StepPlan> {
        Ok(plan.clone())
    }
    fn new_cache(&self, cfg: &Config, slots: usize) -> sparse_lavida::Result<TwinCache> {
        let len = slots * cfg.kv_dim();
        Ok(TwinCache {
            shape: AttnShape {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
            },
            rope_theta: cfg.rope_theta,
            k: vec![vec![0.0; len]; cfg.n_layers],
            v: vec![vec![0.0; len]; cfg.n_layers],
        })
    }
    fn matrix(
        &self,
        rows: usize,
        cols: usize,
        kind: MatrixKind,
    ) -> sparse_lavida::Result<TwinMatrix> {
        Ok(TwinMatrix(self.0.matrix(rows, cols, kind)?, kind))
    }
    fn reshape(&self, m: &mut TwinMatrix, rows: usize, cols: usize) -> sparse_lavida::Result<()> {
        self.0.reshape(&mut m.0, rows, cols)
    }
    fn to_host(&self, m: &TwinMatrix) -> sparse_lavida::Result<Vec<f32>> {
        self.0.to_host(&m.0)
    }
    fn embed(
        &self,
        plan: &StepPlan,
        b: Branch,
        table: &CpuWeight,
        register: &CpuWeight,
        out: &mut TwinMatrix,
    ) -> sparse_lavida::Result<()> {
        self.0.embed(plan, b, table, register, &mut out.0)
    }
    fn rmsnorm(
        &self,
        x: &TwinMatrix,
        w: &CpuWeight,
        eps: f32,
        out: &mut TwinMatrix,
    ) -> sparse_lavida::Result<()> {
        self.0.rmsnorm(&x.0, w, eps, &mut out.0)?;
        stored(out);
        Ok(())
    }
    fn matmul(
        &self,
        x: &TwinMatrix,
        w: &CpuWeight,
        out: &mut TwinMatrix,
        accumulate: bool,
    ) -> sparse_lavida::Result<()> {
        self.0.matmul(&x.0, w, &mut out.0, accumulate)?;
        stored(out);
        Ok(())
    }
    fn rope_store_kv(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        qkv: &mut TwinMatrix,
        cache: &mut TwinCache,
    ) -> sparse_lavida::Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = cache.shape;
        let rows = plan.rows(b);
        let (q_dim, d) = (n_heads * head_dim, cache.shape.kv_dim());
        let width = q_dim + 2 * d;
        let mut q = columns(&qkv.0, 0, q_dim);
        cpu::rope(&mut q, n_heads, head_dim, &rows.pos, cache.rope_theta)?;
        round_bf16(&mut q);
        for (row, q_row) in qkv
            .0
            .data
            .chunks_exact_mut(width)
            .zip(q.chunks_exact(q_dim))
        {
            row[..q_dim].copy_from_slice(q_row);
        }
        let mut k_rot = columns(&qkv.0, q_dim, q_dim + d);
        let v = columns(&qkv.0, q_dim + d, width);
        cpu::rope(
            &mut k_rot,
            n_kv_heads,
            head_dim,
            &rows.pos,
            cache.rope_theta,
        )?;
        round_bf16(&mut k_rot);
        for (i, &slot) in rows.slots.iter().enumerate() {
            let s = slot as usize;
            cache.k[layer][s * d..(s + 1) * d].copy_from_slice(&k_rot[i * d..(i + 1) * d]);
            cache.v[layer][s * d..(s + 1) * d].copy_from_slice(&v[i * d..(i + 1) * d]);
        }
        Ok(())
    }
    fn attention(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        joint: bool,
        q: &TwinMatrix,
        cache: &TwinCache,
        out: &mut TwinMatrix,
    ) -> sparse_lavida::Result<()> {
        let rows = plan.rows(b);
        // The queries: the first n_heads·head_dim columns of the fused q|k|v.
        let q = columns(&q.0, 0, cache.shape.q_dim());
        let inp = AttnInputs {
            q: &q,
            row_tags: &rows.tags,
            seq_indptr: &rows.seq_indptr,
            k_pool: &cache.k[layer],
            v_pool: &cache.v[layer],
            kv_indptr: &plan.kv_indptr,
            kv_indices: &plan.kv_indices,
            kv_tags: &plan.kv_tags,
            joint,
            shape: cache.shape,
        };
        let tiling =
            AttnTiling::heuristic(rows.len(), plan.kv_indices.len(), cache.shape.n_heads, 1);
        attention::attention_tiled(&inp, tiling, &mut out.0.data, None)?;
        stored(out);
        Ok(())
    }
    fn swiglu(&self, gate_up: &TwinMatrix, out: &mut TwinMatrix) -> sparse_lavida::Result<()> {
        self.0.swiglu(&gate_up.0, &mut out.0)?;
        stored(out);
        Ok(())
    }
    fn gather_logit_rows(
        &self,
        plan: &StepPlan,
        x: &TwinMatrix,
        out: &mut TwinMatrix,
    ) -> sparse_lavida::Result<()> {
        self.0.gather_logit_rows(plan, &x.0, &mut out.0)
    }
    fn sample(
        &self,
        logits: &TwinMatrix,
        first: usize,
        p: &SampleParams,
    ) -> sparse_lavida::Result<Vec<Sampled>> {
        self.0.sample(&logits.0, first, p)
    }
}

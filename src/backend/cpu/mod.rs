//! The f32 CPU backend: the oracle every CUDA kernel is tested against, and the fallback.
//!
//! Thin glue: shapes are checked here, the arithmetic lives in [`ops`], [`flash`] (the
//! attention it runs) and [`attention`] (the CUDA kernel's twin, run when a tiling is forced).

/// Walks `$pos` up to `$len` in register blocks: `$mr` at a time, then one block of 4 and one
/// of 2 where they fit (when `$mr` is larger), then single steps, invoking `$step!(B, $pos, ARGS)`
/// for a block of `B` starting at `$pos`. The micro-kernels of [`flash`] and [`packed`] cover
/// rows and keys this way; every element is the same chain whichever block it falls in.
macro_rules! in_blocks {
    ($pos:ident < $len:expr, $mr:expr, $step:ident!($($arg:tt)*)) => {
        while $pos + $mr <= $len {
            $step!($mr, $pos, $($arg)*);
            $pos += $mr;
        }
        if $mr > 4 && $pos + 4 <= $len {
            $step!(4, $pos, $($arg)*);
            $pos += 4;
        }
        if $mr > 2 && $pos + 2 <= $len {
            $step!(2, $pos, $($arg)*);
            $pos += 2;
        }
        while $pos < $len {
            $step!(1, $pos, $($arg)*);
            $pos += 1;
        }
    };
}

pub mod attention;
pub mod flash;
pub mod lines;
pub mod ops;
pub mod packed;
pub mod workers;

use crate::backend::{Backend, MatrixKind, ProductTime, SampleParams, Sampled};
use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use crate::plan::StepPlan;
use crate::weights::HostTensor;
use attention::{AttnInputs, AttnShape, AttnTiling};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuMatrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

/// A weight on the CPU backend: the host tensor and, from the first [`CpuWeight::packed`] call
/// on (`runtime::cpu_model` makes it for every projection at load; otherwise the first product
/// does), its [`packed::PackedWeight`] copy, kept for every later product: a weight is packed
/// once per model, never per call. Reads as the [`HostTensor`] it holds; a clone copies both.
#[derive(Debug, Clone)]
pub struct CpuWeight {
    tensor: HostTensor,
    packed: std::sync::OnceLock<packed::PackedWeight>,
}

impl CpuWeight {
    /// A weight holding `tensor`, not packed yet.
    pub fn new(tensor: HostTensor) -> Self {
        CpuWeight {
            tensor,
            packed: std::sync::OnceLock::new(),
        }
    }

    /// The host tensor.
    pub fn tensor(&self) -> &HostTensor {
        &self.tensor
    }

    /// The packed copy of the matrix `[n, k]`, made on the first call.
    pub fn packed(&self) -> Result<&packed::PackedWeight> {
        if let Some(p) = self.packed.get() {
            return Ok(p);
        }
        let (n, k) = match self.tensor.shape[..] {
            [n, k] => (n, k),
            _ => {
                return Err(Error::Input(format!(
                    "matmul weight: shape {:?} is not a matrix",
                    self.tensor.shape
                )));
            }
        };
        let p = packed::PackedWeight::pack(&self.tensor.data, n, k)?;
        Ok(self.packed.get_or_init(|| p))
    }
}

impl std::ops::Deref for CpuWeight {
    type Target = HostTensor;
    fn deref(&self) -> &HostTensor {
        &self.tensor
    }
}

/// The K/V pool: per layer, `[slots, kv_dim]` keys and values, plus the head geometry and RoPE
/// base of the model it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuCache {
    slots: usize,
    kv_dim: usize,
    shape: AttnShape,
    rope_theta: f64,
    /// RoPE's `(cos, sin)` for positions `0..slots`, `[slots][head_dim / 2]`, computed once for
    /// every layer and step (a position past it is computed where it is used, the same way).
    rope: Vec<(f32, f32)>,
    pool: Pool,
}

impl CpuCache {
    /// Slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// The K/V pool of every layer: K of every layer, then V of every layer (`[2][layers][slots]
/// [kv_dim]`), in one allocation.
///
/// One allocation because a large one is zeroed by nobody: glibc serves a zeroed allocation at
/// or past its mmap threshold (128 KiB to 32 MiB; the CLI sets 32 MiB) with fresh pages, which
/// the kernel zeroes as each is first written. A step writes only its own rows' slots, so a
/// generation pays for none it leaves unused, and none at the start. (One allocation per layer
/// and per K or V, 17 MB each for a sparse `small` 64×64 generation, came from glibc's heap and
/// was zeroed or copied there: 80–90 ms of that generation, about 5 %, for its 203 MB pool.)
/// It starts on a cache line ([`lines::Lines`]), and so does every head's row when `head_dim`
/// is a multiple of 16 (as at every preset): the attention's vector loads of V never straddle
/// two lines.
#[derive(Debug, Clone, PartialEq)]
struct Pool {
    layers: usize,
    /// Values of one layer's K (or V): slots · kv_dim.
    per_layer: usize,
    kv: lines::Lines,
}

impl Pool {
    /// `layers` layers of `per_layer` values each for K and for V, all zero; an error naming
    /// `what` if the size overflows.
    fn zeroed(layers: usize, per_layer: usize, what: &str) -> Result<Pool> {
        let len = elements(layers.saturating_mul(2), per_layer, what)?;
        Ok(Pool {
            layers,
            per_layer,
            kv: lines::Lines::filled(len, 0.0),
        })
    }

    /// Values of one layer's K (or V), once `layer` is known to be one of the pool's.
    fn check(&self, layer: usize) -> Result<usize> {
        if layer >= self.layers {
            return Err(Error::Input(format!(
                "layer {layer} beyond the pool's {}",
                self.layers
            )));
        }
        Ok(self.per_layer)
    }

    /// Layer `layer`'s K and V (`[slots][kv_dim]` each).
    fn layer(&self, layer: usize) -> Result<(&[f32], &[f32])> {
        let n = self.check(layer)?;
        let (k, v) = self.kv.split_at(self.layers * n);
        Ok((&k[layer * n..][..n], &v[layer * n..][..n]))
    }

    /// [`Pool::layer`], writable.
    fn layer_mut(&mut self, layer: usize) -> Result<(&mut [f32], &mut [f32])> {
        let n = self.check(layer)?;
        let (k, v) = self.kv.split_at_mut(self.layers * n);
        Ok((&mut k[layer * n..][..n], &mut v[layer * n..][..n]))
    }
}

/// The f32 CPU backend (rayon threads).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    tiling: Option<AttnTiling>,
    /// Nanoseconds inside `matmul` and the FLOPs done there ([`Backend::product_time`]).
    products: std::sync::Arc<[AtomicU64; 2]>,
}

impl CpuBackend {
    /// A CPU backend on the global rayon pool, attention tiling chosen per call.
    pub fn new() -> Self {
        CpuBackend {
            tiling: None,
            products: Default::default(),
        }
    }

    /// Forces one attention tiling (tests sweep tile sizes and split counts with it).
    pub fn with_tiling(mut self, tiling: AttnTiling) -> Self {
        self.tiling = Some(tiling);
        self
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// `rows · cols` elements of f32, or [`Error::OutOfMemory`] when their bytes overflow.
fn elements(rows: usize, cols: usize, what: &str) -> Result<usize> {
    rows.checked_mul(cols)
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| Error::OutOfMemory(format!("{what}: its size overflows 64 bits")))
}

fn check_shape(what: &str, m: &CpuMatrix, rows: usize, cols: usize) -> Result<()> {
    if m.rows != rows || m.cols != cols || m.data.len() != rows * cols {
        return Err(Error::Input(format!(
            "{what}: expected [{rows}, {cols}], got [{}, {}]",
            m.rows, m.cols
        )));
    }
    Ok(())
}

/// Columns `lo..hi` of every row of `m`, as a dense `[m.rows, hi − lo]` buffer.
fn columns(m: &CpuMatrix, lo: usize, hi: usize) -> Vec<f32> {
    m.data
        .chunks_exact(m.cols.max(1))
        .flat_map(|row| &row[lo..hi])
        .copied()
        .collect()
}

/// Concatenates 2-D host tensors `[n_i, k]` of one `k` along their rows (the CPU's and the
/// bf16 twin's [`Backend::concat_weights`]).
pub fn concat_rows(parts: Vec<HostTensor>) -> Result<HostTensor> {
    let Some(k) = parts.first().and_then(|t| t.shape.get(1).copied()) else {
        return Err(Error::Input(
            "concat_weights: no parts, or a part is not a matrix".into(),
        ));
    };
    let mut rows = 0;
    for t in &parts {
        if t.shape.len() != 2 || t.shape[1] != k || t.data.len() != t.shape[0] * k {
            return Err(Error::Input(format!(
                "concat_weights: part of shape {:?} does not have {k} columns",
                t.shape
            )));
        }
        rows += t.shape[0];
    }
    let mut data = Vec::with_capacity(rows * k);
    for t in parts {
        data.extend_from_slice(&t.data);
    }
    Ok(HostTensor {
        shape: vec![rows, k],
        data,
    })
}

fn check_weight(what: &str, w: &HostTensor, shape: &[usize]) -> Result<()> {
    if w.shape != shape {
        return Err(Error::Input(format!(
            "{what}: weight shape {:?}, expected {shape:?}",
            w.shape
        )));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Weight = CpuWeight;
    type Plan = StepPlan;
    type Cache = CpuCache;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", self.threads())
    }

    fn upload_weight(&self, t: HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight::new(t))
    }

    fn concat_weights(&self, parts: Vec<CpuWeight>) -> Result<CpuWeight> {
        concat_rows(parts.into_iter().map(|w| w.tensor).collect()).map(CpuWeight::new)
    }

    fn upload_plan(&self, plan: &StepPlan) -> Result<StepPlan> {
        Ok(plan.clone())
    }

    fn new_cache(&self, cfg: &Config, slots: usize) -> Result<CpuCache> {
        let kv_dim = cfg.kv_dim();
        let what = format!("the K/V pool of {slots} slots");
        // Sizes in checked arithmetic: a wrapped product would allocate a wrong, small pool.
        let per_layer = elements(slots, kv_dim, &what)?;
        let bytes = [cfg.n_layers as u64, per_layer as u64, 8]
            .into_iter()
            .try_fold(1u64, u64::checked_mul)
            .zip(crate::memory::rope_table_bytes(cfg, slots as u64).ok())
            .and_then(|(pool, rope)| pool.checked_add(rope))
            .unwrap_or(u64::MAX);
        crate::memory::ensure_fits(&what, bytes)?;
        // An invalid RoPE base gets no table: `rope_store_kv` refuses it.
        let theta_ok = cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0;
        let rope = match theta_ok && cfg.head_dim > 0 && cfg.head_dim.is_multiple_of(2) {
            true => crate::contract::rope::table(cfg.head_dim, cfg.rope_theta, slots)
                .chunks_exact(2)
                .map(|cs| (cs[0], cs[1]))
                .collect(),
            false => Vec::new(),
        };
        Ok(CpuCache {
            slots,
            kv_dim,
            shape: AttnShape {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
            },
            rope_theta: cfg.rope_theta,
            rope,
            pool: Pool::zeroed(cfg.n_layers, per_layer, &what)?,
        })
    }

    fn matrix(&self, rows: usize, cols: usize, _kind: MatrixKind) -> Result<CpuMatrix> {
        let len = elements(rows, cols, &format!("a [{rows}, {cols}] matrix"))?;
        Ok(CpuMatrix {
            rows,
            cols,
            data: vec![0.0; len],
        })
    }

    fn reshape(&self, m: &mut CpuMatrix, rows: usize, cols: usize) -> Result<()> {
        let len = rows.checked_mul(cols).filter(|&l| l <= m.data.capacity());
        let Some(len) = len else {
            return Err(crate::Error::Input(format!(
                "matrix of {} values viewed as [{rows}, {cols}]",
                m.data.capacity()
            )));
        };
        // Never reallocates: the length stays within the capacity.
        m.data.resize(len, 0.0);
        m.rows = rows;
        m.cols = cols;
        Ok(())
    }

    fn to_host(&self, m: &CpuMatrix) -> Result<Vec<f32>> {
        Ok(m.data.clone())
    }

    fn embed(
        &self,
        plan: &StepPlan,
        b: Branch,
        table: &CpuWeight,
        register: &CpuWeight,
        out: &mut CpuMatrix,
    ) -> Result<()> {
        let ids = &plan.rows(b).ids;
        check_shape("embed output", out, ids.len(), register.data.len())?;
        ops::embed(&table.data, out.cols, &register.data, ids, &mut out.data)
    }

    fn rmsnorm(&self, x: &CpuMatrix, w: &CpuWeight, eps: f32, out: &mut CpuMatrix) -> Result<()> {
        check_weight("rmsnorm gain", w, &[x.cols])?;
        check_shape("rmsnorm output", out, x.rows, x.cols)?;
        ops::rmsnorm(&x.data, &w.data, eps, &mut out.data)
    }

    fn matmul(
        &self,
        x: &CpuMatrix,
        w: &CpuWeight,
        out: &mut CpuMatrix,
        accumulate: bool,
    ) -> Result<()> {
        let n = w.shape.first().copied().unwrap_or(0);
        check_weight("matmul weight", w, &[n, x.cols])?;
        check_shape("matmul output", out, x.rows, n)?;
        let w = w.packed()?;
        let start = Instant::now();
        packed::matmul_packed(&x.data, x.rows, w, &mut out.data, accumulate)?;
        let [nanos, flops] = &*self.products;
        nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        flops.fetch_add(2 * (x.rows * n * x.cols) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn product_time(&self) -> Option<ProductTime> {
        let [nanos, flops] = &*self.products;
        Some(ProductTime {
            seconds: nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            flops: flops.load(Ordering::Relaxed) as f64,
        })
    }

    fn rope_store_kv(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        qkv: &mut CpuMatrix,
        cache: &mut CpuCache,
    ) -> Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads: _,
            head_dim,
        } = cache.shape;
        let theta = cache.rope_theta;
        let rows = plan.rows(b);
        let n = rows.len();
        let (q_dim, d) = (n_heads * head_dim, cache.kv_dim);
        check_shape("rope q|k|v", qkv, n, q_dim + 2 * d)?;
        cache.pool.check(layer)?;
        // The arithmetic of `ops::rope` on q and k, in place in each row (q) and in the pool
        // (k), without copying the column blocks out.
        if !(theta.is_finite() && theta > 0.0) || head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Input(format!(
                "rope: theta {theta} and head_dim {head_dim} (even, > 0) needed"
            )));
        }
        if let Some((i, &slot)) = rows
            .slots
            .iter()
            .enumerate()
            .find(|&(_, &slot)| slot as usize >= cache.slots)
        {
            return Err(Error::Input(format!(
                "row {i}: slot {slot} beyond the pool's {}",
                cache.slots
            )));
        }
        if rows.pos.len() != n || rows.slots.len() != n {
            return Err(Error::Input(format!(
                "rope: {} positions and {} slots for {n} rows",
                rows.pos.len(),
                rows.slots.len()
            )));
        }
        let inv_freq = crate::contract::rope::inv_freq(head_dim, theta);
        let half = head_dim / 2;
        let CpuCache { rope, pool, .. } = cache;
        // The pool's table where it holds the position, else the same angles computed here.
        let angles = |pos: u32| -> std::borrow::Cow<'_, [(f32, f32)]> {
            let at = pos as usize * half;
            match rope.get(at..at + half) {
                Some(cs) => cs.into(),
                None => ops::rope_angles(&inv_freq, pos).into(),
            }
        };
        // Each row's k and v slots of the pool, carved out in slot order (a plan's slots are
        // distinct), so that every row is rotated and stored in parallel.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| rows.slots[i]);
        let mut dst: Vec<Option<(&mut [f32], &mut [f32])>> = (0..n).map(|_| None).collect();
        let (mut k_rest, mut v_rest) = pool.layer_mut(layer)?;
        let mut next = 0;
        for &i in &order {
            let slot = rows.slots[i] as usize;
            if slot < next {
                return Err(Error::Input(format!("row {i}: slot {slot} written twice")));
            }
            let skip = (slot - next) * d;
            let (k_row, k_after) = std::mem::take(&mut k_rest)[skip..].split_at_mut(d);
            let (v_row, v_after) = std::mem::take(&mut v_rest)[skip..].split_at_mut(d);
            (k_rest, v_rest, next) = (k_after, v_after, slot + 1);
            dst[i] = Some((k_row, v_row));
        }
        use rayon::prelude::*;
        let width = q_dim + 2 * d;
        qkv.data
            .par_chunks_mut(width)
            .zip(rows.pos.par_iter())
            .zip(dst.par_iter_mut())
            .with_min_len(ops::rows_per_task(width))
            .for_each(|((row, &pos), dst)| {
                let cs = angles(pos);
                let (q, kv) = row.split_at_mut(q_dim);
                ops::rope_heads(q, head_dim, &cs);
                let (k_row, v_row) = dst.take().expect("every row has its slots");
                k_row.copy_from_slice(&kv[..d]);
                ops::rope_heads(k_row, head_dim, &cs);
                v_row.copy_from_slice(&kv[d..]);
            });
        Ok(())
    }

    fn attention(
        &self,
        plan: &StepPlan,
        b: Branch,
        layer: usize,
        joint: bool,
        q: &CpuMatrix,
        cache: &CpuCache,
        out: &mut CpuMatrix,
    ) -> Result<()> {
        let shape = cache.shape;
        let rows = plan.rows(b);
        check_shape(
            "attention output",
            out,
            rows.len(),
            shape.n_heads * shape.head_dim,
        )?;
        let (k_pool, v_pool) = cache.pool.layer(layer)?;
        // The queries are q's first n_heads·head_dim columns (q may be the fused q|k|v).
        let q_dim = shape.n_heads * shape.head_dim;
        if q.rows != rows.len() || q.cols < q_dim {
            return Err(Error::Input(format!(
                "attention q: expected [{}, >= {q_dim}], got [{}, {}]",
                rows.len(),
                q.rows,
                q.cols
            )));
        }
        let inp = AttnInputs {
            q: &q.data,
            row_tags: &rows.tags,
            seq_indptr: &rows.seq_indptr,
            k_pool,
            v_pool,
            kv_indptr: &plan.kv_indptr,
            kv_indices: &plan.kv_indices,
            kv_tags: &plan.kv_tags,
            joint,
            shape,
        };
        if let Some(tiling) = self.tiling {
            // The kernel's twin takes dense queries.
            let dense = columns(q, 0, q_dim);
            let inp = AttnInputs { q: &dense, ..inp };
            return attention::attention_tiled(&inp, tiling, &mut out.data, None);
        }
        // Every row's result depends on its own query and its sequence's keys alone (see
        // `flash`), so a batch computes each sequence's bits as alone. q is read in place.
        flash::attention_flash_strided(&inp, q.cols, flash::TILE_K, &mut out.data, None)
    }

    fn swiglu(&self, gate_up: &CpuMatrix, out: &mut CpuMatrix) -> Result<()> {
        let f = out.cols;
        check_shape("swiglu gate|up", gate_up, out.rows, 2 * f)?;
        check_shape("swiglu output", out, gate_up.rows, f)?;
        ops::swiglu_fused(&gate_up.data, f, &mut out.data)
    }

    /// Every op here computes a row from that row alone (SPEC §8), and the gather copies any
    /// matrix.
    fn prunes_last_layer(&self) -> bool {
        true
    }

    fn gather_logit_rows(&self, plan: &StepPlan, x: &CpuMatrix, out: &mut CpuMatrix) -> Result<()> {
        check_shape("logit rows", out, plan.logits_rows.len(), x.cols)?;
        let d = x.cols;
        for (j, &r) in plan.logits_rows.iter().enumerate() {
            let r = r as usize;
            if r >= x.rows {
                return Err(Error::Input(format!(
                    "logits row {r} beyond {} rows",
                    x.rows
                )));
            }
            out.data[j * d..(j + 1) * d].copy_from_slice(&x.data[r * d..(r + 1) * d]);
        }
        Ok(())
    }

    fn sample(
        &self,
        logits: &CpuMatrix,
        first_row: usize,
        params: &SampleParams,
    ) -> Result<Vec<Sampled>> {
        let n = params.positions.len();
        let rows = if params.guidance.is_some() { 2 * n } else { n };
        let Some(end) = first_row.checked_add(rows).filter(|&e| e <= logits.rows) else {
            return Err(Error::Input(format!(
                "sample: rows {first_row}.. ({rows} rows for {n} positions) of logits with {} rows",
                logits.rows
            )));
        };
        let cols = logits.cols;
        ops::sample_rows(&logits.data[first_row * cols..end * cols], cols, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool's layers are disjoint, each K and V of its own `per_layer` values: writing a
    /// distinct value through every layer's K and V and reading them all back finds each where
    /// it was written, and every value of the allocation written once. A layer past the last is
    /// an error naming it.
    #[test]
    fn pool_layers_are_disjoint() {
        let (layers, per_layer) = (3, 10);
        let mut pool = Pool::zeroed(layers, per_layer, "test pool").unwrap();
        assert_eq!(pool.kv.len(), 2 * layers * per_layer);
        assert!(pool.kv.iter().all(|&x| x == 0.0));
        let mark = |l: usize, v: bool, i: usize| (1 + 100 * l + 50 * usize::from(v) + i) as f32;
        for l in 0..layers {
            let (k, v) = pool.layer_mut(l).unwrap();
            assert_eq!((k.len(), v.len()), (per_layer, per_layer));
            for i in 0..per_layer {
                k[i] = mark(l, false, i);
                v[i] = mark(l, true, i);
            }
        }
        for l in 0..layers {
            let (k, v) = pool.layer(l).unwrap();
            for i in 0..per_layer {
                assert_eq!(
                    (k[i], v[i]),
                    (mark(l, false, i), mark(l, true, i)),
                    "{l} {i}"
                );
            }
        }
        let mut all = pool.kv.to_vec();
        all.sort_by(f32::total_cmp);
        all.dedup();
        assert_eq!(all.len(), 2 * layers * per_layer, "a value written twice");
        for e in [
            pool.layer(layers).unwrap_err(),
            pool.layer_mut(7).unwrap_err(),
        ] {
            assert!(e.to_string().contains("beyond the pool's 3"), "{e}");
        }
        assert!(Pool::zeroed(usize::MAX / 2, 4, "huge pool").is_err());
    }

    /// `rope_store_kv` rotates q in place and stores the rotated k and the v at each row's slot
    /// as `ops::rope` (angles computed on the spot) does: positions inside the pool's RoPE table
    /// and past it alike.
    #[test]
    fn rope_store_kv_is_ops_rope_inside_and_past_the_table() {
        let cfg = Config::preset("tiny").unwrap();
        let be = CpuBackend::new();
        let slots = 6;
        let mut cache = be.new_cache(&cfg, slots).unwrap();
        // Positions inside the table (< slots) and past it; slots in another order.
        let positions = [0u32, 5, 3, 6, 1000];
        let mut pb = crate::plan::PlanBuilder::new(1);
        for (i, &pos) in positions.iter().enumerate() {
            pb.row(crate::plan::Row {
                seq: 0,
                id: i as u32,
                pos,
                tag: crate::plan::Tag::new(Branch::Image, 0, false),
                slot: (slots - 1 - i) as u32,
            });
        }
        let plan = pb.build().unwrap();
        let (q_dim, kv) = (cfg.attn_dim(), cfg.kv_dim());
        let width = q_dim + 2 * kv;
        let n = positions.len();
        let data: Vec<f32> = (0..n * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut qkv = CpuMatrix {
            rows: n,
            cols: width,
            data: data.clone(),
        };
        let layer = 1;
        be.rope_store_kv(&plan, Branch::Image, layer, &mut qkv, &mut cache)
            .unwrap();
        let column = |from: usize, w: usize| -> Vec<f32> {
            data.chunks_exact(width)
                .flat_map(|r| r[from..from + w].to_vec())
                .collect()
        };
        let (mut q, mut k) = (column(0, q_dim), column(q_dim, kv));
        let (heads, kv_heads, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        ops::rope(&mut q, heads, hd, &positions, cfg.rope_theta).unwrap();
        ops::rope(&mut k, kv_heads, hd, &positions, cfg.rope_theta).unwrap();
        let v = column(q_dim + kv, kv);
        for i in 0..n {
            let slot = slots - 1 - i;
            assert_eq!(
                qkv.data[i * width..][..q_dim],
                q[i * q_dim..][..q_dim],
                "q row {i}"
            );
            let (k_pool, v_pool) = cache.pool.layer(layer).unwrap();
            assert_eq!(k_pool[slot * kv..][..kv], k[i * kv..][..kv], "k row {i}");
            assert_eq!(v_pool[slot * kv..][..kv], v[i * kv..][..kv], "v row {i}");
        }
        // Two rows for one slot: an error naming the row, not a race.
        let mut twice = plan.clone();
        let img = &mut twice.branches[Branch::Image as usize].slots;
        img[3] = img[1];
        let e = be
            .rope_store_kv(&twice, Branch::Image, layer, &mut qkv, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("written twice"), "{e}");
    }

    /// `product_time` counts `2·m·n·k` per product and time spent in them, and the packed copy
    /// is made once and reused.
    #[test]
    fn products_are_counted_and_packed_once() {
        let be = CpuBackend::new();
        let w = be
            .upload_weight(HostTensor {
                shape: vec![5, 3],
                data: (0..15).map(|i| i as f32).collect(),
            })
            .unwrap();
        let x = CpuMatrix {
            rows: 2,
            cols: 3,
            data: vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        };
        let mut out = be.matrix(2, 5, MatrixKind::Activation).unwrap();
        let t0 = be.product_time().unwrap();
        be.matmul(&x, &w, &mut out, false).unwrap();
        let first = w.packed().unwrap() as *const _;
        be.matmul(&x, &w, &mut out, true).unwrap();
        assert_eq!(w.packed().unwrap() as *const _, first, "packed once");
        let t1 = be.product_time().unwrap();
        assert_eq!(t1.flops - t0.flops, 2.0 * 2.0 * (2 * 5 * 3) as f64);
        assert!(t1.seconds > t0.seconds);
        // Rows 0 and 2 of w, twice (the second product accumulated).
        let want: Vec<f32> = [0.0, 3.0, 6.0, 9.0, 12.0, 2.0, 5.0, 8.0, 11.0, 14.0]
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        assert_eq!(out.data, want);
        // A vector is not a matrix.
        let v = be
            .upload_weight(HostTensor {
                shape: vec![3],
                data: vec![1.0; 3],
            })
            .unwrap();
        assert!(v.packed().is_err());
    }
}

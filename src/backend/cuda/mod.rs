//! The CUDA bf16 backend: the backend ops on one GPU, on one stream. The host loop drives it op
//! by op; the device-resident executor (`exec::resident`, above the model and the sampler)
//! queues or captures a whole compiled generation on it, patching its uploaded plans in place
//! ([`CudaPlan::patch_targets`]).
//!
//! Storage follows [`MatrixKind`]: the residual stream and the logits are f32, every other
//! activation, the weights and the K/V pool are bf16; all arithmetic accumulates in f32. The ops
//! are the validated kernels of [`crate::cuda::ops`] and the cuBLASLt products of
//! [`crate::cuda::blas`]:
//!
//! | trait op | device op | in → out |
//! |---|---|---|
//! | `embed` | `ops::embed_flagged` | ids → f32 |
//! | `rmsnorm` | `ops::rmsnorm_ro` | f32 → bf16 |
//! | `matmul` | `Gemm::matmul` | bf16 → bf16, or f32 (`accumulate`: the residual add, beta = 1) |
//! | `concat_weights` | device-to-device copies (load time) | q\|k\|v and gate\|up weights |
//! | `rope_store_kv` | `ops::rope_kv` (fused q\|k\|v, the pool's RoPE table) | bf16 q (in place), k, v → pool |
//! | `attention` | `ops::attention` | bf16 → bf16 |
//! | `swiglu` | `ops::swiglu` (the halves of gate\|up) | bf16 → bf16 |
//! | `gather_logit_rows` | `ops::gather_rows` | f32 → f32 |
//! | `sample` | `ops::sample` | f32 → host [`Sampled`] |
//!
//! Each op runs inside an NVTX range named after its kernel family: the trait op's name, `gemm`
//! for `matmul`, `rope_kv` for `rope_store_kv` ([`crate::profile`]). No op but `sample` waits
//! for the device: `embed` checks the host plan's ids itself and leaves the kernel's flag (which
//! can only catch an id patched in on the device) to [`CudaBackend::check_embed_flag`].
//!
//! Every op checks the shapes and element types it is given and returns [`Error::Input`] naming
//! the problem before anything is queued. An uploaded plan keeps its host [`StepPlan`] (shapes
//! live there) and its index arrays on the device; its attention plan ([`AttnPlan`], the
//! FlashInfer-style plan of one branch's rows over their keys) is built by the first attention
//! call of the step (or by [`CudaBackend::prepare_attention`] before a graph capture), where the
//! pool's head geometry is known, and reused by every later layer.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use half::bf16;
use rayon::prelude::*;

use crate::backend::{Backend, DeviceStats, MatrixKind, Product, SampleParams, Sampled, StepClock};
use crate::config::{Branch, Config};
use crate::contract::AttnShape;
use crate::cuda::blas::{Gemm, GemmOut, GemmShape};
use crate::cuda::device::{CudaDevice, EventClock, cuda_err};
use crate::cuda::ops::{
    self, AttnArgs, AttnLayout, AttnOut, AttnPlan, IndexBuf, KvPool, PatchTargets, RopeKv,
};
use crate::error::{Error, Result};
use crate::plan::StepPlan;
use crate::profile;
use crate::weights::HostTensor;

/// Head widths the compiled attention kernels support.
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// Checks that `cfg` can run on the CUDA backend (its head_dim has an attention kernel);
/// [`Error::Unavailable`] saying why not.
pub fn check_config(cfg: &Config) -> Result<()> {
    if !SUPPORTED_HEAD_DIMS.contains(&cfg.head_dim) {
        return Err(Error::Unavailable(format!(
            "the CUDA backend's attention kernels are compiled for head_dim 64 and 128; this \
             model has head_dim {}",
            cfg.head_dim
        )));
    }
    Ok(())
}

/// Device storage of a [`CudaMatrix`].
#[derive(Debug)]
pub enum DeviceBuf {
    /// f32 values (the residual stream, logits).
    F32(CudaSlice<f32>),
    /// bf16 values (every other activation).
    Bf16(CudaSlice<bf16>),
}

/// A row-major `[rows, cols]` matrix on the device. The buffer holds at least one value (a
/// zero-byte allocation is not portable), so its length may exceed `rows · cols`.
#[derive(Debug)]
pub struct CudaMatrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The values.
    pub buf: DeviceBuf,
}

impl CudaMatrix {
    fn dtype(&self) -> &'static str {
        match self.buf {
            DeviceBuf::F32(_) => "f32",
            DeviceBuf::Bf16(_) => "bf16",
        }
    }

    /// The f32 buffer (the residual stream, logits); [`Error::Input`] naming `what` for bf16.
    pub fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            DeviceBuf::F32(b) => Ok(b),
            DeviceBuf::Bf16(_) => Err(dtype_err(what, "f32", "bf16")),
        }
    }

    fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.buf {
            DeviceBuf::F32(b) => Ok(b),
            DeviceBuf::Bf16(_) => Err(dtype_err(what, "f32", "bf16")),
        }
    }

    fn bf16(&self, what: &str) -> Result<&CudaSlice<bf16>> {
        match &self.buf {
            DeviceBuf::Bf16(b) => Ok(b),
            DeviceBuf::F32(_) => Err(dtype_err(what, "bf16", "f32")),
        }
    }

    /// The matrix as a cuBLASLt product's output, in its storage type.
    fn gemm_out(&mut self) -> GemmOut<'_> {
        match &mut self.buf {
            DeviceBuf::F32(o) => GemmOut::F32(o),
            DeviceBuf::Bf16(o) => GemmOut::Bf16(o),
        }
    }

    fn bf16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<bf16>> {
        match &mut self.buf {
            DeviceBuf::Bf16(b) => Ok(b),
            DeviceBuf::F32(_) => Err(dtype_err(what, "bf16", "f32")),
        }
    }
}

fn dtype_err(what: &str, want: &str, got: &str) -> Error {
    Error::Input(format!("{what}: the matrix holds {got}, expected {want}"))
}

/// A bf16 weight tensor on the device with its shape.
#[derive(Debug)]
pub struct CudaWeight {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub buf: CudaSlice<bf16>,
}

/// The device side of one branch's rows.
#[derive(Debug)]
struct BranchPlan {
    ids: CudaSlice<u32>,
    pos: CudaSlice<u32>,
    slots: IndexBuf,
    /// Built by the first attention call (it needs the pool's head geometry).
    attn: Mutex<Option<AttnPlan>>,
}

/// A [`StepPlan`] uploaded: per branch with rows, its ids, positions and pool slots on the
/// device and its attention plan; the logits rows; the host plan for shapes.
#[derive(Debug)]
pub struct CudaPlan {
    host: StepPlan,
    branches: [Option<BranchPlan>; 2],
    /// `logits_rows` (one zero when there are none).
    logits_rows: CudaSlice<u32>,
}

impl CudaPlan {
    /// The host plan.
    pub fn host(&self) -> &StepPlan {
        &self.host
    }

    fn branch(&self, b: Branch) -> Result<&BranchPlan> {
        self.branches[b as usize]
            .as_ref()
            .ok_or_else(|| Error::Input(format!("the plan has no {} rows", b.name())))
    }

    /// Re-uploads the pool slots of branch `b`'s rows declaring `bound` as their largest value
    /// ([`IndexBuf::with_bound`]), so that patches may later write any slot up to it.
    pub fn bound_slots(&mut self, dev: &CudaDevice, b: Branch, bound: u32) -> Result<()> {
        let slots = &self.host.rows(b).slots;
        if let Some(bp) = self.branches[b as usize].as_mut() {
            bp.slots = IndexBuf::with_bound(dev, slots, bound)?;
        }
        Ok(())
    }

    /// The device arrays of this plan that a device-resident step patches before it runs
    /// (`ops::resolve_plan`): branch `b`'s row ids, positions and slots, the keys of its
    /// attention plan (built beforehand by [`CudaBackend::prepare_attention`]) and their tile
    /// summaries (rebuilt after the patches), the logits rows, and the caller's sampler
    /// positions. The caller keeps what the plan's checks established:
    /// every slot patched in stays at or below the declared bound ([`CudaPlan::bound_slots`]),
    /// every key below the pool's slots, every row distinct.
    pub fn patch_targets<'a>(
        &'a mut self,
        b: Branch,
        sample_pos: &'a mut CudaSlice<u32>,
    ) -> Result<PatchTargets<'a>> {
        let CudaPlan {
            branches,
            logits_rows,
            ..
        } = self;
        let bp = branches[b as usize]
            .as_mut()
            .ok_or_else(|| Error::Input(format!("the plan has no {} rows", b.name())))?;
        let attn = bp.attn.get_mut().unwrap_or_else(|e| e.into_inner());
        let attn = attn
            .as_mut()
            .ok_or_else(|| Error::Cuda("attention plan not prepared".into()))?;
        let (kv_indices, kv_tags, kv_summary) = attn.patch_targets();
        Ok(PatchTargets {
            row_ids: Some(&mut bp.ids),
            row_pos: Some(&mut bp.pos),
            row_slots: Some(bp.slots.patch_target()),
            kv_indices: Some(kv_indices),
            kv_tags: Some(kv_tags),
            logits_rows: Some(logits_rows),
            sample_pos: Some(sample_pos),
            kv_summary: Some(kv_summary),
        })
    }
}

/// The K/V pool: per layer, bf16 `[slots, kv_dim]` keys and values (zero-initialised, so a slot
/// never written holds no NaN), plus the head geometry and RoPE base of the model it serves.
#[derive(Debug)]
pub struct CudaCache {
    slots: usize,
    kv_dim: usize,
    shape: AttnShape,
    rope_theta: f64,
    /// RoPE's (cos, sin) of the positions below the pool's slots, computed once for the
    /// generation the pool serves (its positions are below its slots); `sl_rope_kv` computes
    /// any other position itself.
    rope_table: Option<ops::RopeTable>,
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
}

impl CudaCache {
    /// Slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.k.len() {
            return Err(Error::Input(format!(
                "layer {layer} beyond the pool's {}",
                self.k.len()
            )));
        }
        Ok(())
    }
}

/// The CUDA bf16 backend on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    // Field order is drop order: the cuBLASLt handle and the buffers go before the device's
    // context.
    gemm: Gemm,
    /// Sticky flag of the embedding kernel (an id outside the table), read by
    /// [`CudaBackend::check_embed_flag`].
    embed_flag: Mutex<CudaSlice<u32>>,
    dev: CudaDevice,
}

impl CudaBackend {
    /// Opens device 0. [`Error::Unavailable`] (never a panic) when there is no driver, no
    /// device, no compiled kernels, or no cuBLASLt library, saying which.
    pub fn new() -> Result<CudaBackend> {
        Self::on_device(0)
    }

    /// Opens device `ordinal`.
    pub fn on_device(ordinal: usize) -> Result<CudaBackend> {
        let dev = CudaDevice::new(ordinal)?;
        let gemm = Gemm::new(&dev)?;
        let embed_flag = Mutex::new(dev.alloc_zeros::<u32>(1)?);
        Ok(CudaBackend {
            gemm,
            embed_flag,
            dev,
        })
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// How each matrix product's cuBLASLt algorithm was chosen so far (among the heuristic's
    /// best few: the fastest when timed on a GPU, the first on the emulated device).
    pub fn gemm_choices(&self) -> Vec<crate::cuda::blas::GemmChoice> {
        self.gemm.choices()
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Result<usize> {
        self.dev
            .context()
            .mem_get_info()
            .map(|(free, _)| free)
            .map_err(cuda_err("reading the free device memory"))
    }

    /// The concurrent attention CTAs its plans' split rule fills for `head_dim` (the kernel
    /// version `SL_ATTN` selects): what bounds their split workspaces
    /// (`memory::Target::Cuda`).
    pub fn attention_workers(&self, head_dim: usize) -> Result<usize> {
        let version = crate::contract::AttnVersion::from_env()?;
        Ok(crate::cuda::ops::attention_workers(
            &self.dev, version, head_dim,
        ))
    }

    /// Refuses an allocation of `bytes` for `what` when the device has less memory free.
    pub fn ensure_fits(&self, what: &str, bytes: u64) -> Result<()> {
        let free = self.free_memory()? as u64;
        if bytes > free {
            return Err(Error::OutOfMemory(format!(
                "{what} needs {:.2} GB of GPU memory but only {:.2} GB is free on {} ({:.1} GB \
                 in total)",
                bytes as f64 / 1e9,
                free as f64 / 1e9,
                self.dev.info().name,
                self.dev.info().total_mem as f64 / 1e9
            )));
        }
        Ok(())
    }

    /// A bf16 weight of `shape` generated on the device (no host copy): element `i` is
    /// `bf16(offset + scale·u_i)` with `u_i` the Philox uniform of `ops::init_uniform` for
    /// `(seed, tensor_index, i)` (its definition: [`crate::contract::rng::init_uniform`]).
    pub fn random_weight(
        &self,
        shape: &[usize],
        seed: u64,
        tensor_index: u32,
        (offset, scale): (f32, f32),
    ) -> Result<CudaWeight> {
        let len = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Input(format!("weight shape {shape:?} overflows")))?;
        if len == 0 {
            return Err(Error::Input(format!("weight of shape {shape:?} is empty")));
        }
        let mut buf = self.dev.alloc_zeros::<bf16>(len)?;
        ops::init_uniform(&self.dev, seed, tensor_index, offset, scale, &mut buf)?;
        Ok(CudaWeight {
            shape: shape.to_vec(),
            buf,
        })
    }

    /// Builds the attention plans of `plan` for `cache`'s head geometry now instead of at the
    /// first attention call (which must not upload anything while a graph is being captured).
    pub fn prepare_attention(&self, plan: &CudaPlan, cache: &CudaCache) -> Result<()> {
        for b in Branch::ALL {
            if let Some(bp) = &plan.branches[b as usize] {
                drop(self.attn_plan(plan, b, bp, cache.shape)?);
            }
        }
        Ok(())
    }

    /// The attention plan of branch `b`'s rows, built on first use for `shape`.
    fn attn_plan<'p>(
        &self,
        plan: &'p CudaPlan,
        b: Branch,
        bp: &'p BranchPlan,
        shape: AttnShape,
    ) -> Result<std::sync::MutexGuard<'p, Option<AttnPlan>>> {
        // The plan's contents are scratch (the split workspace) plus tables derived from the
        // host plan, so a panic elsewhere cannot leave them inconsistent: ignore poisoning.
        let mut attn = bp.attn.lock().unwrap_or_else(|e| e.into_inner());
        if attn.as_ref().is_none_or(|a| a.shape() != shape) {
            let rows = plan.host.rows(b);
            let layout = AttnLayout {
                shape,
                row_tags: &rows.tags,
                seq_indptr: &rows.seq_indptr,
                kv_indptr: &plan.host.kv_indptr,
                kv_indices: &plan.host.kv_indices,
                kv_tags: &plan.host.kv_tags,
                n_slots: plan.host.pool_slots,
            };
            *attn = Some(AttnPlan::new(&self.dev, &layout, None)?);
        }
        Ok(attn)
    }

    /// Runs each distinct product of `products` once and waits: cuBLASLt chooses (and caches)
    /// its algorithm for the shape and loads its kernel, so that neither happens while a graph
    /// is being captured (cuBLASLt loads kernels lazily, on first launch). The weight operand is
    /// one of `weights` of the product's shape `[n, k]` when there is one (no copy of a large
    /// head), else zeroed scratch; the activation and output are zeroed scratch.
    pub fn warm_products(&self, products: &[Product], weights: &[&CudaWeight]) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for p in products {
            let f32_out = p.out != MatrixKind::Activation;
            if p.m == 0 || !seen.insert((p.m, p.n, p.k, f32_out, p.accumulate)) {
                continue;
            }
            let x = self.dev.alloc_zeros::<bf16>(p.m * p.k)?;
            let scratch;
            let w = match weights.iter().find(|w| w.shape == [p.n, p.k]) {
                Some(w) => &w.buf,
                None => {
                    scratch = self.dev.alloc_zeros::<bf16>(p.n * p.k)?;
                    &scratch
                }
            };
            let shape = GemmShape {
                m: p.m,
                n: p.n,
                k: p.k,
            };
            let mut out = self.matrix(p.m, p.n, p.out)?;
            self.gemm
                .matmul(&x, w, shape, out.gemm_out(), p.accumulate)?;
        }
        self.dev.synchronize()
    }

    /// Queues the clearing of the embedding kernel's sticky flag (capturable: a device-resident
    /// generation starts with it).
    pub fn reset_embed_flag(&self) -> Result<()> {
        let mut flag = self.embed_flag.lock().unwrap_or_else(|e| e.into_inner());
        self.dev
            .stream()
            .memset_zeros(&mut *flag)
            .map_err(cuda_err("clearing the embedding's error flag"))
    }

    /// Fails when the embedding kernel has met an id outside its table since the last check
    /// (and clears the flag). Waits for the device.
    pub fn check_embed_flag(&self) -> Result<()> {
        let mut flag = self.embed_flag.lock().unwrap_or_else(|e| e.into_inner());
        if self.dev.download(&flag)?[0] == 0 {
            return Ok(());
        }
        self.dev
            .stream()
            .memset_zeros(&mut *flag)
            .map_err(cuda_err("clearing the embedding flag"))?;
        Err(Error::Cuda(
            "embed: the kernel met a token id outside the embedding table (a device-side plan \
             patch gave a bad id)"
                .into(),
        ))
    }

    fn check_shape(what: &str, m: &CudaMatrix, rows: usize, cols: usize) -> Result<()> {
        if m.rows != rows || m.cols != cols {
            return Err(Error::Input(format!(
                "{what}: expected [{rows}, {cols}], got [{}, {}] ({})",
                m.rows,
                m.cols,
                m.dtype()
            )));
        }
        Ok(())
    }

    fn check_weight(what: &str, w: &CudaWeight, shape: &[usize]) -> Result<()> {
        if w.shape != shape {
            return Err(Error::Input(format!(
                "{what}: weight shape {:?}, expected {shape:?}",
                w.shape
            )));
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Weight = CudaWeight;
    type Plan = CudaPlan;
    type Cache = CudaCache;

    fn name(&self) -> String {
        let info = self.dev.info();
        format!("cuda (bf16, {}, sm_{}{})", info.name, info.cc.0, info.cc.1)
    }

    fn upload_weight(&self, t: HostTensor) -> Result<CudaWeight> {
        let len = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Input(format!("weight shape {:?} overflows", t.shape)))?;
        if len != t.data.len() {
            return Err(Error::Input(format!(
                "weight of shape {:?} has {} values, expected {len}",
                t.shape,
                t.data.len()
            )));
        }
        if len == 0 {
            return Err(Error::Input(format!(
                "weight of shape {:?} is empty",
                t.shape
            )));
        }
        // Round to nearest even, as the safetensors writer does.
        let host: Vec<bf16> = t.data.par_iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(CudaWeight {
            shape: t.shape,
            buf: self.dev.upload(&host)?,
        })
    }

    fn concat_weights(&self, parts: Vec<CudaWeight>) -> Result<CudaWeight> {
        let Some(k) = parts.first().and_then(|w| w.shape.get(1).copied()) else {
            return Err(Error::Input(
                "concat_weights: no parts, or a part is not a matrix".into(),
            ));
        };
        let mut rows = 0usize;
        for w in &parts {
            if w.shape.len() != 2 || w.shape[1] != k || w.buf.len() != w.shape[0] * k {
                return Err(Error::Input(format!(
                    "concat_weights: part of shape {:?} does not have {k} columns",
                    w.shape
                )));
            }
            rows += w.shape[0];
        }
        // Device-to-device copies at load time; the parts are freed as the result is made.
        let mut buf = self.dev.alloc_zeros::<bf16>(rows * k)?;
        let mut at = 0;
        for w in parts {
            let len = w.buf.len();
            self.dev
                .stream()
                .memcpy_dtod(&w.buf, &mut buf.slice_mut(at..at + len))
                .map_err(cuda_err("concatenating weights"))?;
            at += len;
        }
        Ok(CudaWeight {
            shape: vec![rows, k],
            buf,
        })
    }

    fn upload_plan(&self, plan: &StepPlan) -> Result<CudaPlan> {
        let mut branches: [Option<BranchPlan>; 2] = [None, None];
        for b in Branch::ALL {
            let rows = plan.rows(b);
            if rows.is_empty() {
                continue;
            }
            branches[b as usize] = Some(BranchPlan {
                ids: self.dev.upload(&rows.ids)?,
                pos: self.dev.upload(&rows.pos)?,
                slots: IndexBuf::upload(&self.dev, &rows.slots)?,
                attn: Mutex::new(None),
            });
        }
        let logits_rows = ops::upload_padded(&self.dev, &plan.logits_rows)?;
        Ok(CudaPlan {
            host: plan.clone(),
            branches,
            logits_rows,
        })
    }

    fn new_cache(&self, cfg: &Config, slots: usize) -> Result<CudaCache> {
        check_config(cfg)?;
        let kv_dim = cfg.kv_dim();
        let per_layer = slots
            .checked_mul(kv_dim)
            .ok_or_else(|| Error::Input(format!("a pool of {slots} slots overflows")))?;
        let bytes = 2 * cfg.n_layers as u64 * per_layer as u64 * 2;
        self.ensure_fits(
            &format!(
                "the bf16 K/V pool ({slots} slots × {} layers × {kv_dim} × K and V)",
                cfg.n_layers
            ),
            bytes,
        )?;
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            k.push(self.dev.alloc_zeros::<bf16>(per_layer.max(1))?);
            v.push(self.dev.alloc_zeros::<bf16>(per_layer.max(1))?);
        }
        // A generation's positions lie below its pool's slots (prompt, response, registers);
        // the table covers those (slots · head_dim / 2 · 8 bytes).
        let rope_table = if slots > 0 {
            Some(ops::RopeTable::new(
                &self.dev,
                cfg.head_dim,
                cfg.rope_theta,
                slots,
            )?)
        } else {
            None
        };
        Ok(CudaCache {
            slots,
            kv_dim,
            shape: AttnShape {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
            },
            rope_theta: cfg.rope_theta,
            rope_table,
            k,
            v,
        })
    }

    fn matrix(&self, rows: usize, cols: usize, kind: MatrixKind) -> Result<CudaMatrix> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::Input(format!("matrix [{rows}, {cols}] overflows")))?
            .max(1);
        let buf = match kind {
            MatrixKind::Residual | MatrixKind::Logits => {
                DeviceBuf::F32(self.dev.alloc_zeros::<f32>(len)?)
            }
            MatrixKind::Activation => DeviceBuf::Bf16(self.dev.alloc_zeros::<bf16>(len)?),
        };
        Ok(CudaMatrix { rows, cols, buf })
    }

    fn reshape(&self, m: &mut CudaMatrix, rows: usize, cols: usize) -> Result<()> {
        let have = match &m.buf {
            DeviceBuf::F32(b) => b.len(),
            DeviceBuf::Bf16(b) => b.len(),
        };
        match rows.checked_mul(cols) {
            Some(len) if len <= have => {
                m.rows = rows;
                m.cols = cols;
                Ok(())
            }
            _ => Err(Error::Input(format!(
                "matrix of {have} values viewed as [{rows}, {cols}]"
            ))),
        }
    }

    fn to_host(&self, m: &CudaMatrix) -> Result<Vec<f32>> {
        let len = m.rows * m.cols;
        let mut out = match &m.buf {
            DeviceBuf::F32(b) => self.dev.download(b)?,
            DeviceBuf::Bf16(b) => self
                .dev
                .download(b)?
                .into_iter()
                .map(bf16::to_f32)
                .collect(),
        };
        out.truncate(len);
        Ok(out)
    }

    fn embed(
        &self,
        plan: &CudaPlan,
        b: Branch,
        table: &CudaWeight,
        register: &CudaWeight,
        out: &mut CudaMatrix,
    ) -> Result<()> {
        let _r = profile::range("embed");
        let n = plan.host.rows(b).len();
        let d = register.buf.len();
        Self::check_weight("register embedding", register, &[d])?;
        let table_rows = table.shape.first().copied().unwrap_or(0);
        Self::check_weight("embedding table", table, &[table_rows, d])?;
        Self::check_shape("embed output", out, n, d)?;
        if n == 0 {
            return Ok(());
        }
        // The host plan's ids are checked here, so the kernel's flag can only catch an id
        // patched in on the device (read by `check_embed_flag`): no wait per pass.
        let rows = plan.host.rows(b);
        if let Some((i, &id)) = (rows.ids.iter().enumerate())
            .find(|&(_, &id)| id != crate::plan::REGISTER && id as usize >= table_rows)
        {
            return Err(Error::Input(format!(
                "embed: row {i} has id {id}, outside the {} table of {table_rows} rows",
                b.name()
            )));
        }
        let bp = plan.branch(b)?;
        let x = out.f32_mut("embed output")?;
        let mut flag = self.embed_flag.lock().unwrap_or_else(|e| e.into_inner());
        ops::embed_flagged(
            &self.dev,
            &table.buf,
            &register.buf,
            &bp.ids,
            n,
            x,
            None,
            &mut flag,
        )
    }

    fn rmsnorm(
        &self,
        x: &CudaMatrix,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaMatrix,
    ) -> Result<()> {
        let _r = profile::range("rmsnorm");
        Self::check_weight("rmsnorm gain", w, &[x.cols])?;
        Self::check_shape("rmsnorm output", out, x.rows, x.cols)?;
        if x.rows == 0 {
            return Ok(());
        }
        let xb = x.f32("rmsnorm input")?;
        let ob = out.bf16_mut("rmsnorm output")?;
        ops::rmsnorm_ro(&self.dev, xb, &w.buf, eps, x.rows, ob)
    }

    fn matmul(
        &self,
        x: &CudaMatrix,
        w: &CudaWeight,
        out: &mut CudaMatrix,
        accumulate: bool,
    ) -> Result<()> {
        let _r = profile::range("gemm");
        let n = w.shape.first().copied().unwrap_or(0);
        Self::check_weight("matmul weight", w, &[n, x.cols])?;
        Self::check_shape("matmul output", out, x.rows, n)?;
        let xb = x.bf16("matmul input")?;
        let shape = GemmShape {
            m: x.rows,
            n,
            k: x.cols,
        };
        self.gemm
            .matmul(xb, &w.buf, shape, out.gemm_out(), accumulate)
    }

    fn rope_store_kv(
        &self,
        plan: &CudaPlan,
        b: Branch,
        layer: usize,
        qkv: &mut CudaMatrix,
        cache: &mut CudaCache,
    ) -> Result<()> {
        let _r = profile::range("rope_kv");
        let shape = cache.shape;
        let n = plan.host.rows(b).len();
        let width = shape.q_dim() + 2 * cache.kv_dim;
        Self::check_shape("rope q|k|v", qkv, n, width)?;
        cache.check_layer(layer)?;
        if n == 0 {
            return Ok(());
        }
        let bp = plan.branch(b)?;
        let args = RopeKv {
            shape,
            n_rows: n,
            positions: &bp.pos,
            slots: &bp.slots,
            rope_theta: cache.rope_theta,
            qkv: ops::RopeQkv::Fused {
                qkv: qkv.bf16_mut("rope q|k|v")?,
                stride: width,
            },
            table: cache.rope_table.as_ref(),
        };
        let pool = KvPool {
            k: &mut cache.k[layer],
            v: &mut cache.v[layer],
            stride: cache.kv_dim,
        };
        ops::rope_kv(&self.dev, args, pool)
    }

    fn attention(
        &self,
        plan: &CudaPlan,
        b: Branch,
        layer: usize,
        joint: bool,
        q: &CudaMatrix,
        cache: &CudaCache,
        out: &mut CudaMatrix,
    ) -> Result<()> {
        let _r = profile::range("attention");
        let shape = cache.shape;
        let rows = plan.host.rows(b);
        let n = rows.len();
        // The queries are q's first q_dim columns (q may be the fused q|k|v: its row stride).
        if q.rows != n || q.cols < shape.q_dim() {
            return Err(Error::Input(format!(
                "attention q: expected [{n}, >= {}], got [{}, {}]",
                shape.q_dim(),
                q.rows,
                q.cols
            )));
        }
        Self::check_shape("attention output", out, n, shape.q_dim())?;
        cache.check_layer(layer)?;
        if n == 0 {
            return Ok(());
        }
        let bp = plan.branch(b)?;
        let mut attn = self.attn_plan(plan, b, bp, shape)?;
        let Some(attn) = attn.as_mut() else {
            return Err(Error::Cuda(
                "attention plan missing after it was built".into(),
            ));
        };
        let args = AttnArgs {
            q: q.bf16("attention q")?,
            q_stride: q.cols,
            k_pool: &cache.k[layer],
            v_pool: &cache.v[layer],
            kv_stride: cache.kv_dim,
            joint,
        };
        let o = AttnOut {
            o: out.bf16_mut("attention output")?,
            o_stride: shape.q_dim(),
            lse: None,
        };
        ops::attention(&self.dev, attn, &args, o)
    }

    fn swiglu(&self, gate_up: &CudaMatrix, out: &mut CudaMatrix) -> Result<()> {
        let _r = profile::range("swiglu");
        let f = out.cols;
        Self::check_shape("swiglu gate|up", gate_up, out.rows, 2 * f)?;
        Self::check_shape("swiglu output", out, gate_up.rows, f)?;
        if out.rows == 0 || f == 0 {
            return Ok(());
        }
        // gate and up are the two halves of each row of the fused product.
        let shape = ops::SwigluShape {
            n_rows: out.rows,
            width: f,
            gate_stride: 2 * f,
            up_stride: 2 * f,
        };
        let both = gate_up.bf16("swiglu gate|up")?;
        ops::swiglu(
            &self.dev,
            &both.slice(..),
            &both.slice(f..),
            shape,
            out.bf16_mut("swiglu output")?,
        )
    }

    fn gather_logit_rows(
        &self,
        plan: &CudaPlan,
        x: &CudaMatrix,
        out: &mut CudaMatrix,
    ) -> Result<()> {
        let wanted = &plan.host.logits_rows;
        Self::check_shape("logit rows", out, wanted.len(), x.cols)?;
        if let Some(&r) = wanted.iter().find(|&&r| r as usize >= x.rows) {
            return Err(Error::Input(format!(
                "logits row {r} beyond {} rows",
                x.rows
            )));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // A kernel over the plan's device copy of the rows (not copies planned on the host), so
        // that rows patched on the device are honoured.
        ops::gather_rows(
            &self.dev,
            x.f32("logit rows input")?,
            x.rows,
            x.cols,
            &plan.logits_rows,
            wanted.len(),
            out.f32_mut("logit rows output")?,
        )
    }

    fn sample(
        &self,
        logits: &CudaMatrix,
        first_row: usize,
        params: &SampleParams,
    ) -> Result<Vec<Sampled>> {
        let _r = profile::range("sample");
        let n = params.positions.len();
        let rows = if params.guidance.is_some() { 2 * n } else { n };
        let Some(end) = first_row.checked_add(rows).filter(|&e| e <= logits.rows) else {
            return Err(Error::Input(format!(
                "sample: rows {first_row}.. ({rows} rows for {n} positions{}) of logits with {} \
                 rows",
                if params.guidance.is_some() {
                    " × 2 for CFG"
                } else {
                    ""
                },
                logits.rows
            )));
        };
        let cols = logits.cols;
        let buf = logits.f32("sample logits")?;
        let view = buf.slice(first_row * cols..end * cols);
        // No embedding-flag read here: `embed` checked the host plan's ids, so only an id
        // patched in on the device (a resident run, which reads the flag itself) can set it.
        ops::sample(&self.dev, &view, cols, cols, params)
    }

    /// CUDA events on the backend's stream (every op runs there).
    fn step_clock(&self) -> Result<Box<dyn StepClock + '_>> {
        Ok(Box::new(EventClock::new(&self.dev)?))
    }

    fn device_stats(&self) -> Option<&dyn DeviceStats> {
        Some(self)
    }
}

impl StepClock for EventClock {
    fn kind(&self) -> &'static str {
        "cuda events"
    }

    fn start(&mut self) -> Result<()> {
        EventClock::start(self)
    }

    fn stop(&mut self) -> Result<f64> {
        EventClock::stop(self)
    }
}

impl DeviceStats for CudaBackend {
    fn device_name(&self) -> String {
        self.dev.info().name.clone()
    }

    fn emulated(&self) -> bool {
        self.dev.info().emulated
    }

    fn driver_version(&self) -> Option<String> {
        self.dev.driver_version().ok()
    }

    fn weight_bytes_per_param(&self) -> usize {
        std::mem::size_of::<bf16>()
    }

    fn memory_source(&self) -> String {
        if self.dev.context().has_async_alloc() {
            "high watermark of the stream-ordered memory pool every device buffer of this \
             process comes from (weights, K/V pool, activations, plans, workspaces; not the \
             context or the loaded modules)"
                .into()
        } else {
            "unavailable: the device has no stream-ordered memory pools".into()
        }
    }

    fn reset_peak_memory(&self) -> Result<Option<u64>> {
        self.dev.reset_peak_memory()
    }

    fn peak_memory(&self) -> Result<Option<u64>> {
        self.dev.peak_memory()
    }

    fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        self.dev.copy_bandwidth(bytes)
    }

    fn free_memory(&self) -> Result<usize> {
        CudaBackend::free_memory(self)
    }

    fn gemm_seconds(&self, p: &Product, reps: usize) -> Result<f64> {
        let _r = profile::range("gemm timing");
        let len = |a: usize, b: usize| {
            a.checked_mul(b).filter(|&l| l > 0).ok_or_else(|| {
                Error::Input(format!("gemm timing: [{a}, {b}] is empty or overflows"))
            })
        };
        let (x, w) = (
            self.random_weight(&[len(p.m, p.k)?], 1, 0, (0.0, 1.0))?,
            self.random_weight(&[len(p.n, p.k)?], 1, 1, (0.0, 1.0))?,
        );
        let mut out = self.matrix(p.m, p.n, p.out)?;
        let shape = GemmShape {
            m: p.m,
            n: p.n,
            k: p.k,
        };
        let mut run = || {
            self.gemm
                .matmul(&x.buf, &w.buf, shape, out.gemm_out(), p.accumulate)
        };
        for _ in 0..2 {
            run()?;
        }
        let reps = reps.max(1);
        let mut clock = EventClock::new(&self.dev)?;
        let total = clock.time(|| (0..reps).try_for_each(|_| run()))?;
        Ok(total / reps as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_names_the_head_dim() {
        let mut cfg = Config::preset("small").unwrap();
        assert!(check_config(&cfg).is_ok());
        cfg.head_dim = 128;
        assert!(check_config(&cfg).is_ok());
        let tiny = Config::preset("tiny").unwrap();
        let e = check_config(&tiny).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)));
        assert!(e.to_string().contains("head_dim 16"), "{e}");
    }

    #[test]
    fn new_is_an_error_not_a_panic_without_a_gpu() {
        match CudaBackend::new() {
            Ok(be) => assert!(be.name().starts_with("cuda (bf16, ")),
            Err(e) => assert!(matches!(e, Error::Unavailable(_)), "{e}"),
        }
    }
}

//! Model weights on the host: safetensors load/save (SPEC §2.2 names) and seeded random init.
//!
//! [`Config::tensor_shapes`] is the single source of tensor names and shapes; loading and
//! [`HostWeights::validate`] check a model against it in two passes so that the cheap structural
//! problems (missing, extra, mis-shaped tensors) are reported before any large conversion:
//! 1. layout: every expected tensor present with its shape (config order), then no extras;
//! 2. values: every value finite (config order).

use crate::config::Config;
use crate::contract::rng::init_uniform;
use crate::error::{Error, Result};
use crate::memory::{FIXED_OVERHEAD, Need, TENSOR_OVERHEAD, ensure_fits, human_bytes, human_count};
use half::{bf16, f16};
use rand::SeedableRng;
use rand::distributions::{Distribution, Uniform};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

/// A dense f32 tensor on the host (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// On-disk element type for [`HostWeights::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

/// Every tensor of a model, by SPEC §2.2 name.
#[derive(Debug, Clone, PartialEq)]
pub struct HostWeights {
    /// Tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl SaveDtype {
    /// Bytes per element on disk.
    pub fn bytes(self) -> u64 {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 => 2,
        }
    }

    /// The safetensors dtype name (`F32`, `BF16`).
    fn name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::Bf16 => "BF16",
        }
    }
}

impl std::fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SaveDtype::F32 => "f32",
            SaveDtype::Bf16 => "bf16",
        })
    }
}

/// Which generator [`write_random`] draws values from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomKind {
    /// [`HostWeights::random`]'s (ChaCha8 on the host).
    Host,
    /// [`HostWeights::random_like_device`]'s (the CUDA backend's device init, bf16 values).
    LikeDevice,
}

/// Bytes the weights of `cfg` occupy as f32 on the host (`param_count * 4`, saturating); compare
/// with [`crate::memory::ensure_fits`] before materialising a model.
pub fn f32_bytes(cfg: &Config) -> u64 {
    cfg.param_count().saturating_mul(4)
}

/// Tensors are encoded in parallel in batches of at most this many bytes (f32 values plus their
/// encoding) before being written; a larger tensor forms a batch of its own. Bounds the memory
/// of [`write_random`] (and of [`HostWeights::save`]'s bf16 copies) whatever the model's size.
pub const WRITE_BATCH_BYTES: u64 = 256 << 20;

/// Peak bytes of one batch when writing `cfg`'s weights in `dtype`: [`WRITE_BATCH_BYTES`] or the
/// largest tensor's f32 values plus its encoding (saturating).
pub fn write_batch_bytes(cfg: &Config, dtype: SaveDtype) -> u64 {
    cfg.largest_tensor()
        .saturating_mul(4 + dtype.bytes())
        .max(WRITE_BATCH_BYTES)
}

impl HostWeights {
    /// Loads a safetensors file and checks it against `cfg`, converting bf16/f16/f32 to f32.
    ///
    /// Refuses (before reading) a file whose bytes plus the f32 copy would not fit in memory.
    /// Errors name the file and the first problem, in this order: unparsable file; per tensor in
    /// config order, missing or mis-shaped; an extra tensor; per tensor in config order, a dtype
    /// other than BF16/F16/F32; per tensor in config order, a non-finite value (with its index).
    pub fn load(path: &Path, cfg: &Config) -> Result<HostWeights> {
        let file_len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        ensure_fits(
            &format!(
                "loading weights from {} ({}) as f32",
                path.display(),
                human_bytes(file_len)
            ),
            file_len.saturating_add(f32_bytes(cfg)),
        )?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        HostWeights::from_safetensors(&bytes, cfg).map_err(|e| match e {
            Error::Weights(m) => Error::Weights(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and checks an in-memory safetensors file (see [`HostWeights::load`]).
    fn from_safetensors(bytes: &[u8], cfg: &Config) -> Result<HostWeights> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights(format!("not a valid safetensors file: {e}")))?;
        let views: HashMap<&str, TensorView> = file.iter().collect();
        let expected = cfg.tensor_shapes();
        let shapes = views.iter().map(|(&name, v)| (name, v.shape())).collect();
        check_layout(&expected, &shapes)?;

        let mut sources = Vec::with_capacity(expected.len());
        for (name, shape) in &expected {
            let view = &views[name.as_str()];
            sources.push((name, shape, source_dtype(name, view.dtype())?, view.data()));
        }
        // One task per tensor; collecting the per-tensor results in order keeps the reported
        // error the first in config order whatever the scheduling.
        let converted: Vec<Result<(String, HostTensor)>> = sources
            .into_par_iter()
            .map(|(name, shape, dtype, bytes)| {
                let data = dtype.to_f32(bytes);
                check_finite(name, shape, &data)?;
                let shape = shape.clone();
                Ok((name.clone(), HostTensor { shape, data }))
            })
            .collect();
        let tensors = converted.into_iter().collect::<Result<_>>()?;
        Ok(HostWeights { tensors })
    }

    /// Seeded random weights for `cfg`, identical for the same `(cfg, seed)` on every run.
    ///
    /// Tensor `i` (in [`Config::tensor_shapes`] order) draws from its own ChaCha8 stream: key
    /// from `seed`, stream number `i`. Tensors are therefore independent of one another and of
    /// the thread that generates them. Distributions (`U(-a, a)` is uniform on `[-a, a)`):
    /// - linear weights `[out, in]` (`q k v o gate up down`) and `*.head`: `U(-a, a)` with
    ///   `a = sqrt(3 / in)`, so unit-variance inputs give unit-variance outputs;
    /// - `*.embed` and `*.register`: `U(-1, 1)`;
    /// - norm scales (`attn_norm`, `ffn_norm`, `final_norm`): `1 + U(-0.1, 0.1)`, near identity
    ///   but not exactly 1 so that a kernel ignoring the scale is caught.
    ///
    /// The result takes [`f32_bytes`] of memory; check it with `ensure_fits` first.
    pub fn random(cfg: &Config, seed: u64) -> HostWeights {
        let tensors = cfg
            .tensor_shapes()
            .into_par_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let data = random_values(seed, i, &name, &shape);
                (name, HostTensor { shape, data })
            })
            .collect();
        HostWeights { tensors }
    }

    /// The host twin of the weights the CUDA backend generates on the device for `(cfg, seed)`
    /// (`Model::random_on_device`), bit for bit, with no GPU.
    ///
    /// Tensor `i` of [`Config::tensor_shapes`] is filled by
    /// [`crate::contract::rng::init_uniform`] with key `seed`, tensor index `i` and the
    /// `(offset, scale)` of [`init_range`], then every value is rounded to bf16 (nearest even)
    /// as the `sl_init_uniform` kernel stores it, and kept as f32. Other numbers than
    /// [`HostWeights::random`] (Philox on the device's counter layout, not ChaCha8); a file of
    /// these weights lets a peer (benches/peer/model.py `--weights-device-seed`) check that it
    /// reproduces the device's weights.
    ///
    /// The result takes [`f32_bytes`] of memory; check it with `ensure_fits` first. Errors: a
    /// config with more tensors than a u32 tensor index can number (as the device refuses).
    pub fn random_like_device(cfg: &Config, seed: u64) -> Result<HostWeights> {
        check_device_tensor_count(cfg)?;
        let tensors = cfg
            .tensor_shapes()
            .into_par_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                // In range: checked above.
                let data = device_values(seed, i as u32, &name, &shape);
                (name, HostTensor { shape, data })
            })
            .collect();
        Ok(HostWeights { tensors })
    }

    /// Writes a safetensors file (bf16 rounds to nearest even), atomically
    /// ([`crate::io::write_atomic`]): a failure half way leaves an existing file untouched.
    ///
    /// Refuses, naming tensor and index, a tensor whose data length does not match its shape or
    /// a value that is not finite after conversion (NaN, ±inf, or an f32 beyond the bf16 range):
    /// `load` would reject such a file.
    pub fn save(&self, path: &Path, dtype: SaveDtype) -> Result<()> {
        let tensors: Vec<(&String, &HostTensor)> = self.tensors.iter().collect();
        let entries: Vec<(&str, &[usize])> = tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice()))
            .collect();
        let encode = |j: usize| encode(tensors[j].0, tensors[j].1, dtype);
        crate::io::write_atomic(path, |w| {
            write_safetensors(w, path, &entries, dtype, &encode, &mut |_, _| {})
        })
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Weights(format!("no tensor named `{name}`")))
    }

    /// Checks the in-memory tensors against `cfg` like [`HostWeights::load`] does: names,
    /// shapes, data lengths, then finiteness; the error names the first offending tensor.
    pub fn validate(&self, cfg: &Config) -> Result<()> {
        let expected = cfg.tensor_shapes();
        let shapes = self
            .tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice()))
            .collect();
        check_layout(&expected, &shapes)?;
        for (name, shape) in &expected {
            let t = &self.tensors[name];
            let len: usize = shape.iter().product();
            if t.data.len() != len {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has {} values but its shape {shape:?} holds {len}",
                    t.data.len()
                )));
            }
        }
        for (name, shape) in &expected {
            check_finite(name, shape, &self.tensors[name].data)?;
        }
        Ok(())
    }
}

/// Refuses a config with more tensors than the device init's u32 tensor index can number.
fn check_device_tensor_count(cfg: &Config) -> Result<()> {
    if u32::try_from(cfg.tensor_count()).is_err() {
        return Err(Error::Input(format!(
            "the config has {} tensors; the device init numbers them with a u32",
            cfg.tensor_count()
        )));
    }
    Ok(())
}

/// Tensor `i` of [`HostWeights::random`]: its own ChaCha8 stream `i` under key `seed`.
fn random_values(seed: u64, i: usize, name: &str, shape: &[usize]) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(i as u64);
    let len = shape.iter().product();
    init_for(name, shape).sample(&mut rng, len)
}

/// Tensor `i` of [`HostWeights::random_like_device`]: `init_uniform`, rounded to bf16.
fn device_values(seed: u64, i: u32, name: &str, shape: &[usize]) -> Vec<f32> {
    let (offset, scale) = init_range(name, shape);
    let mut data = vec![0f32; shape.iter().product()];
    init_uniform(seed, i, offset, scale, &mut data);
    for v in &mut data {
        *v = bf16::from_f32(*v).to_f32();
    }
    data
}

/// Writes seeded random weights for `cfg` (the values of [`HostWeights::random`] or, with
/// [`RandomKind::LikeDevice`], of [`HostWeights::random_like_device`]) straight to a
/// safetensors file in `dtype`, atomically, one batch of tensors at a time: memory stays at
/// [`write_batch_bytes`] however large the model. The file equals `save` of the in-memory
/// weights. `progress` sees (bytes written, bytes in total).
pub fn write_random(
    cfg: &Config,
    seed: u64,
    kind: RandomKind,
    dtype: SaveDtype,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    cfg.validate()?;
    if kind == RandomKind::LikeDevice {
        check_device_tensor_count(cfg)?;
    }
    let mut shapes: Vec<(usize, String, Vec<usize>)> = (cfg.tensor_shapes().into_iter())
        .enumerate()
        .map(|(i, (name, shape))| (i, name, shape))
        .collect();
    // File order is name order, as `save` writes a name-sorted map; values follow the config
    // index, as in memory.
    shapes.sort_by(|a, b| a.1.cmp(&b.1));
    let entries: Vec<(&str, &[usize])> = shapes
        .iter()
        .map(|(_, name, shape)| (name.as_str(), shape.as_slice()))
        .collect();
    let encode = |j: usize| -> Result<Cow<'static, [u8]>> {
        let (i, name, shape) = &shapes[j];
        let data = match kind {
            RandomKind::Host => random_values(seed, *i, name, shape),
            // In range: checked above.
            RandomKind::LikeDevice => device_values(seed, *i as u32, name, shape),
        };
        let t = HostTensor {
            shape: shape.clone(),
            data,
        };
        Ok(Cow::Owned(encode(name, &t, dtype)?.into_owned()))
    };
    crate::io::write_atomic(path, |w| {
        write_safetensors(w, path, &entries, dtype, &encode, progress)
    })
}

/// Writes a safetensors file to `w`: the header for `entries` (name, shape, in file order;
/// format metadata `pt`, padded with spaces to 8 bytes as the reference writer does), then each
/// tensor's bytes from `encode(j)`. Consecutive tensors are encoded in parallel in batches of
/// at most [`WRITE_BATCH_BYTES`] (f32 plus encoded bytes) and written in order; the first error
/// in file order is returned. `path` names the file in I/O errors.
fn write_safetensors<'a>(
    w: &mut dyn Write,
    path: &Path,
    entries: &[(&str, &[usize])],
    dtype: SaveDtype,
    encode: &(dyn Fn(usize) -> Result<Cow<'a, [u8]>> + Sync),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let too_big = || Error::Weights("the tensors' byte sizes overflow 64 bits".into());
    let elements = |shape: &[usize]| {
        shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(too_big)
    };
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for (name, shape) in entries {
        let len = elements(shape)?
            .checked_mul(dtype.bytes())
            .ok_or_else(too_big)?;
        let end = offset.checked_add(len).ok_or_else(too_big)?;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let name = serde_json::to_string(name).map_err(|e| Error::Json {
            context: "tensor name".into(),
            source: e,
        })?;
        header.push_str(&format!(
            r#",{name}:{{"dtype":"{}","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
            dtype.name(),
            dims.join(",")
        ));
        offset = end;
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let total = (8 + header.len() as u64).saturating_add(offset);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut written = 8 + header.len() as u64;
    progress(written, total);

    let cost = |shape: &[usize]| elements(shape).map(|n| n.saturating_mul(4 + dtype.bytes()));
    let mut start = 0;
    while start < entries.len() {
        let mut end = start + 1;
        let mut batch = cost(entries[start].1)?;
        while end < entries.len() {
            let next = batch.saturating_add(cost(entries[end].1)?);
            if next > WRITE_BATCH_BYTES {
                break;
            }
            batch = next;
            end += 1;
        }
        let encoded: Vec<Result<Cow<[u8]>>> = (start..end).into_par_iter().map(encode).collect();
        for bytes in encoded {
            let bytes = bytes?;
            w.write_all(&bytes).map_err(io)?;
            written += bytes.len() as u64;
            progress(written, total);
        }
        start = end;
    }
    Ok(())
}

/// Every expected tensor present with its shape (first problem in config order), then no tensor
/// outside `expected`.
fn check_layout(expected: &[(String, Vec<usize>)], found: &BTreeMap<&str, &[usize]>) -> Result<()> {
    for (name, shape) in expected {
        let Some(&got) = found.get(name.as_str()) else {
            return Err(Error::Weights(format!("tensor `{name}` is missing")));
        };
        if got != shape.as_slice() {
            return Err(Error::Weights(format!(
                "tensor `{name}` has shape {got:?}, expected {shape:?}"
            )));
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    // `found` is sorted, so the reported extra does not depend on hashing.
    if let Some(extra) = found.keys().find(|n| !known.contains(*n)) {
        return Err(Error::Weights(format!(
            "unexpected tensor `{extra}` (not a SPEC §2.2 name for this config)"
        )));
    }
    Ok(())
}

/// The first non-finite value, by flat index and per-dimension index.
fn check_finite(name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Weights(format!(
            "tensor `{name}` has non-finite value {} at flat index {i} (index {:?})",
            data[i],
            unravel(i, shape)
        ))),
    }
}

/// Row-major multi-index of flat index `i`, which lies inside `shape` (so no dim is 0).
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        *slot = i % dim;
        i /= dim;
    }
    index
}

/// The on-disk element types `load` accepts.
#[derive(Debug, Clone, Copy)]
enum SourceDtype {
    F32,
    Bf16,
    F16,
}

fn source_dtype(name: &str, dtype: Dtype) -> Result<SourceDtype> {
    match dtype {
        Dtype::F32 => Ok(SourceDtype::F32),
        Dtype::BF16 => Ok(SourceDtype::Bf16),
        Dtype::F16 => Ok(SourceDtype::F16),
        other => Err(Error::Weights(format!(
            "tensor `{name}` has dtype {other:?}; expected BF16, F16 or F32"
        ))),
    }
}

impl SourceDtype {
    /// Decodes little-endian elements. Byte chunks rather than a cast: tensor data inside a
    /// safetensors buffer need not be aligned for its element type.
    fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            SourceDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            SourceDtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            SourceDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

/// Little-endian bytes of `t` in `dtype`; f32 on a little-endian host is borrowed, not copied
/// (a full model is tens of GB).
fn encode<'a>(name: &str, t: &'a HostTensor, dtype: SaveDtype) -> Result<Cow<'a, [u8]>> {
    let len: usize = t.shape.iter().product();
    if t.data.len() != len {
        return Err(Error::Weights(format!(
            "tensor `{name}` has {} values but its shape {:?} holds {len}",
            t.data.len(),
            t.shape
        )));
    }
    let bad = |i: usize, v: f32| {
        Error::Weights(format!(
            "tensor `{name}`: value {} at flat index {i} is {v} in {dtype:?}; refusing to save",
            t.data[i]
        ))
    };
    match dtype {
        SaveDtype::F32 => {
            if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                return Err(bad(i, t.data[i]));
            }
            if cfg!(target_endian = "little") {
                Ok(Cow::Borrowed(bytemuck::cast_slice(&t.data)))
            } else {
                Ok(Cow::Owned(
                    t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ))
            }
        }
        SaveDtype::Bf16 => {
            let mut out = Vec::with_capacity(2 * len);
            for (i, &x) in t.data.iter().enumerate() {
                let b = bf16::from_f32(x);
                if !b.is_finite() {
                    return Err(bad(i, b.to_f32()));
                }
                out.extend_from_slice(&b.to_le_bytes());
            }
            Ok(Cow::Owned(out))
        }
    }
}

/// How [`HostWeights::random`] fills one tensor.
enum Init {
    /// `U(-a, a)`.
    Uniform(f32),
    /// `1 + U(-0.1, 0.1)`.
    NearOne,
}

/// The init distribution of tensor `name` (shape `shape`, a [`Config::tensor_shapes`] entry) as
/// `(offset, scale)`: values are `offset + U(-scale, scale)`, the distributions documented at
/// [`HostWeights::random`] (`(0, sqrt(3/in))` for linear maps and heads, `(0, 1)` for
/// embeddings and registers, `(1, 0.1)` for norm gains). Device-side generators (the CUDA
/// backend's random weights) draw from these too.
pub fn init_range(name: &str, shape: &[usize]) -> (f32, f32) {
    match init_for(name, shape) {
        Init::Uniform(a) => (0.0, a),
        Init::NearOne => (1.0, 0.1),
    }
}

fn init_for(name: &str, shape: &[usize]) -> Init {
    if name.ends_with("_norm") {
        Init::NearOne
    } else if name.ends_with(".embed") || name.ends_with(".register") {
        Init::Uniform(1.0)
    } else {
        // Every other SPEC §2.2 tensor is a linear map `[out, in]`.
        assert_eq!(shape.len(), 2, "`{name}` should be a linear weight");
        Init::Uniform((3.0 / shape[1] as f64).sqrt() as f32)
    }
}

impl Init {
    fn sample(&self, rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        match *self {
            Init::Uniform(a) => Uniform::new(-a, a).sample_iter(rng).take(len).collect(),
            Init::NearOne => Uniform::new(-0.1f32, 0.1)
                .sample_iter(rng)
                .take(len)
                .map(|u| 1.0 + u)
                .collect(),
        }
    }
}

/// Adds writing `cfg`'s random weights to a file in `dtype` ([`write_random`]) to `need`
/// ([`crate::memory`]): one batch of tensors at a time, plus the tensor list and the file header.
pub fn add_weight_writer(need: &mut Need, cfg: &Config, dtype: SaveDtype) -> Result<()> {
    cfg.try_param_count()?;
    need.host("fixed overhead", FIXED_OVERHEAD);
    need.host(
        format!(
            "the list and file header of {} tensors",
            human_count(cfg.tensor_count())
        ),
        crate::memory::mul(cfg.tensor_count(), TENSOR_OVERHEAD)?,
    );
    need.host(
        format!("one batch of tensors (f32 values and their {dtype} encoding)"),
        write_batch_bytes(cfg, dtype),
    );
    Ok(())
}

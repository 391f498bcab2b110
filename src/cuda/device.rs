//! The CUDA device: probe, context and stream, compute capability, and the kernel modules.
//!
//! [`CudaDevice::new`] never panics: on a machine without the driver library, without a device,
//! or in a build without compiled kernels it returns [`Error::Unavailable`] saying which. It then
//! creates the primary context and one non-blocking stream, picks the best embedded image of each
//! kernel file for the device's compute capability ([`choose_image`]) and loads it
//! ([`Kernels::load`]).
//!
//! Image choice, per kernel file: a cubin of the device's major version with the highest minor
//! version not above the device's (an arch-specific `sm_XYa` cubin only on exactly `X.Y`, and
//! preferred there); otherwise the newest PTX whose version is not above the device's (JIT
//! compiled by the driver); otherwise the device is unsupported.

use std::sync::Arc;

use cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUmemPool_attribute,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits,
    result, sys,
};

use crate::contract::abi;
use crate::contract::attn::AttnVersion;
use crate::cuda::images::{KERNEL_IMAGES, KERNELS_MISSING, KernelImage};
use crate::error::{Error, Result};

/// The kernel files (stem of `KernelImage::file`) and the functions each must define.
const KERNEL_FILES: [(&str, &[&str]); 7] = [
    (
        "attention",
        &[
            "sl_attention_hd64",
            "sl_attention_hd128",
            "sl_attention_merge",
        ],
    ),
    (
        "attention_v1",
        &["sl_attention_v1_hd64", "sl_attention_v1_hd128"],
    ),
    ("softmax", &["sl_sample", "sl_masked_softmax"]),
    (
        "support",
        &["sl_embed", "sl_rmsnorm", "sl_rope_kv", "sl_swiglu"],
    ),
    ("aggregate", &["sl_aggregate_sparse"]),
    ("init", &["sl_init_uniform"]),
    (
        "program",
        &[
            "sl_resolve_plan",
            "sl_commit",
            "sl_gather_rows",
            "sl_fill_u32",
        ],
    ),
];

/// Message of the probe when the driver library cannot be loaded.
pub const NO_DRIVER: &str = "no CUDA driver (libcuda) on this machine";
/// Message of the probe when the driver reports no device.
pub const NO_DEVICE: &str = "no CUDA device";

/// Number of CUDA devices, or [`Error::Unavailable`] when there is no driver or no device.
/// Never panics (the driver library is looked up before any call into it).
pub fn device_count() -> Result<usize> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names
    // (running the library's initialisers, which is what loading the CUDA driver means) and
    // closes it again; it has no other precondition.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Unavailable(NO_DRIVER.into()));
    }
    match guarded(CudaContext::device_count) {
        Ok(Ok(0)) => Err(Error::Unavailable(NO_DEVICE.into())),
        Ok(Ok(n)) => Ok(n as usize),
        Ok(Err(e)) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            Err(Error::Unavailable(NO_DEVICE.into()))
        }
        Ok(Err(e)) => Err(Error::Unavailable(format!(
            "the CUDA driver failed to initialise: {e}"
        ))),
        Err(e) => Err(e),
    }
}

/// Whether the loaded driver library is the emulated device (`kernels/emu`): it exports
/// `slEmuLastError`, which no NVIDIA driver does.
pub fn is_emulated() -> bool {
    // SAFETY: only called once a device was opened through cudarc, so the driver library is
    // loaded; looking a symbol up runs no code of the library.
    unsafe {
        sys::culib()
            .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"slEmuLastError\0")
            .is_ok()
    }
}

/// Runs `f`, turning a panic inside cudarc (a driver library lacking a symbol it loads lazily)
/// into [`Error::Unavailable`]: the probe must answer, not abort.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown reason");
        Error::Unavailable(format!("the CUDA driver library is unusable: {why}"))
    })
}

/// Wraps a driver error with what was being done.
pub(crate) fn cuda_err(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// What a target string of a [`KernelImage`] denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTarget {
    /// A cubin for `sm_{major}{minor}` (`arch_specific`: the `a` suffix, runs on exactly that
    /// compute capability).
    Cubin {
        /// Compute capability, major.
        major: u32,
        /// Compute capability, minor.
        minor: u32,
        /// `sm_XYa`: uses arch-specific features (wgmma, ...), runs only on `X.Y`.
        arch_specific: bool,
    },
    /// PTX for `compute_{major}{minor}`, JIT-compiled by the driver for any device at least
    /// that new.
    Ptx {
        /// Virtual architecture, major.
        major: u32,
        /// Virtual architecture, minor.
        minor: u32,
    },
}

impl ImageTarget {
    /// Parses `sm_80`, `sm_90a`, `sm_100`, `compute_90`, ...; `None` for anything else.
    pub fn parse(target: &str) -> Option<ImageTarget> {
        let (ptx, rest) = if let Some(r) = target.strip_prefix("sm_") {
            (false, r)
        } else if let Some(r) = target.strip_prefix("compute_") {
            (true, r)
        } else {
            return None;
        };
        let (digits, arch_specific) = match rest.strip_suffix('a') {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
        match (ptx, arch_specific) {
            (false, _) => Some(ImageTarget::Cubin {
                major,
                minor,
                arch_specific,
            }),
            // `compute_90a` PTX only JITs for exactly 9.0; not produced by the build, not used.
            (true, true) => None,
            (true, false) => Some(ImageTarget::Ptx { major, minor }),
        }
    }
}

/// The file stem of a `KernelImage::file` (`kernels/attention.cu` → `attention`).
fn file_stem(file: &str) -> &str {
    let name = file.rsplit('/').next().unwrap_or(file);
    name.strip_suffix(".cu").unwrap_or(name)
}

/// Picks the image of kernel file `file` (a stem: `attention`) to load on a device of compute
/// capability `cc` (see the module docs for the rule), or [`Error::Unavailable`] naming the
/// capability and the images there are.
pub fn choose_image<'a>(
    images: &'a [KernelImage],
    file: &str,
    cc: (u32, u32),
) -> Result<&'a KernelImage> {
    let mut cubin: Option<(&KernelImage, (u32, bool))> = None;
    let mut ptx: Option<(&KernelImage, (u32, u32))> = None;
    let candidates = images.iter().filter(|i| file_stem(i.file) == file);
    for img in candidates.clone() {
        match ImageTarget::parse(img.target) {
            Some(ImageTarget::Cubin {
                major,
                minor,
                arch_specific,
            }) if major == cc.0 && minor <= cc.1 && (!arch_specific || minor == cc.1) => {
                let key = (minor, arch_specific);
                if cubin.is_none_or(|(_, k)| key > k) {
                    cubin = Some((img, key));
                }
            }
            Some(ImageTarget::Ptx { major, minor })
                if (major, minor) <= cc && ptx.is_none_or(|(_, k)| (major, minor) > k) =>
            {
                ptx = Some((img, (major, minor)));
            }
            _ => {}
        }
    }
    if let Some((img, _)) = cubin.or(ptx.map(|(i, _)| (i, (0, false)))) {
        return Ok(img);
    }
    let have: Vec<&str> = candidates.map(|i| i.target).collect();
    let have = if have.is_empty() {
        "none embedded".to_string()
    } else {
        format!("embedded: {}", have.join(", "))
    };
    Err(Error::Unavailable(format!(
        "no image of kernels/{file}.cu runs on compute capability {}.{} ({have})",
        cc.0, cc.1
    )))
}

/// A loaded module; unloaded on drop.
#[derive(Debug)]
struct Module {
    cu: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle is a context-wide object that the driver lets any thread use once the
// context is current; every use here binds the context first.
unsafe impl Send for Module {}
// SAFETY: as for Send; the handle is never mutated after loading.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: `cu` came from cuModuleLoadData in `ctx` and is unloaded exactly once, here.
        // The functions taken from it live in the same `Kernels`, which owns this module, so no
        // handle outlives it through the public API.
        self.ctx
            .record_err(unsafe { result::module::unload(self.cu) });
    }
}

/// Dynamic shared memory of the attention kernel of `version` for `head_dim` (params.h).
fn attn_smem(version: AttnVersion, head_dim: u32) -> u32 {
    match version {
        AttnVersion::V2 => abi::attn_smem_bytes(head_dim),
        AttnVersion::V1 => abi::attn_v1_smem_bytes(head_dim),
    }
    .unwrap_or(u32::MAX)
}

/// A kernel function handle, valid while the [`Kernels`] it came from lives.
#[derive(Debug)]
pub struct Kernel {
    func: sys::CUfunction,
    name: &'static str,
}

// SAFETY: a CUfunction is an immutable handle into its module, usable from any thread with the
// module's context current (raw launches bind it).
unsafe impl Send for Kernel {}
// SAFETY: as for Send.
unsafe impl Sync for Kernel {}

impl Kernel {
    /// The kernel's `extern "C"` name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The raw driver handle (valid while the owning [`Kernels`] lives).
    pub fn cu_function(&self) -> sys::CUfunction {
        self.func
    }
}

/// Every kernel of `kernels/*.cu`, loaded into one context.
#[derive(Debug)]
pub struct Kernels {
    attention_hd64: Kernel,
    attention_hd128: Kernel,
    attention_v1_hd64: Kernel,
    attention_v1_hd128: Kernel,
    attention_merge: Kernel,
    /// Attention CTAs that fit one SM at once, `[version][head_dim 64, 128]` (the driver's
    /// occupancy calculator: registers, shared memory, threads).
    attention_ctas_per_sm: [[u32; 2]; 2],
    sample: Kernel,
    masked_softmax: Kernel,
    embed: Kernel,
    rmsnorm: Kernel,
    rope_kv: Kernel,
    swiglu: Kernel,
    aggregate_sparse: Kernel,
    init_uniform: Kernel,
    resolve_plan: Kernel,
    commit: Kernel,
    gather_rows: Kernel,
    fill_u32: Kernel,
    /// (file, target) of each loaded image.
    images: Vec<(&'static str, &'static str)>,
    /// Owns the modules the handles above point into.
    _modules: Vec<Module>,
    /// The context the modules were loaded into (launches bind it).
    ctx: Arc<CudaContext>,
}

impl Kernels {
    /// Loads the embedded kernels ([`KERNEL_IMAGES`]) into `ctx`, choosing images for its
    /// device's compute capability, and sets the attention kernels' dynamic shared-memory limit.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        if let Some(why) = KERNELS_MISSING {
            return Err(Error::Unavailable(why.to_string()));
        }
        Self::load_from(ctx, KERNEL_IMAGES)
    }

    /// [`Kernels::load`] from a given image list.
    pub fn load_from(ctx: &Arc<CudaContext>, images: &'static [KernelImage]) -> Result<Kernels> {
        ctx.bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("reading the compute capability"))?;
        let cc = (major as u32, minor as u32);
        let mut modules = Vec::new();
        let mut used = Vec::new();
        let mut funcs = std::collections::HashMap::new();
        for (file, names) in KERNEL_FILES {
            let img = choose_image(images, file, cc)?;
            let module = load_module(ctx, img)?;
            for &name in names {
                let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
                // SAFETY: `module.cu` is a module loaded just above and still alive.
                let func =
                    unsafe { result::module::get_function(module.cu, cname) }.map_err(cuda_err(
                        format_args!("kernel {name} in {} ({})", img.file, img.target),
                    ))?;
                funcs.insert(name, Kernel { func, name });
            }
            used.push((img.file, img.target));
            modules.push(module);
        }
        let mut take = |name: &str| funcs.remove(name).expect("every listed kernel was loaded");
        let mut kernels = Kernels {
            attention_hd64: take("sl_attention_hd64"),
            attention_hd128: take("sl_attention_hd128"),
            attention_v1_hd64: take("sl_attention_v1_hd64"),
            attention_v1_hd128: take("sl_attention_v1_hd128"),
            attention_merge: take("sl_attention_merge"),
            attention_ctas_per_sm: [[1; 2]; 2],
            sample: take("sl_sample"),
            masked_softmax: take("sl_masked_softmax"),
            embed: take("sl_embed"),
            rmsnorm: take("sl_rmsnorm"),
            rope_kv: take("sl_rope_kv"),
            swiglu: take("sl_swiglu"),
            aggregate_sparse: take("sl_aggregate_sparse"),
            init_uniform: take("sl_init_uniform"),
            resolve_plan: take("sl_resolve_plan"),
            commit: take("sl_commit"),
            gather_rows: take("sl_gather_rows"),
            fill_u32: take("sl_fill_u32"),
            images: used,
            _modules: modules,
            ctx: ctx.clone(),
        };
        kernels.set_attention_smem(ctx)?;
        for version in AttnVersion::ALL {
            for (i, head_dim) in [64u32, 128].into_iter().enumerate() {
                let kernel = kernels
                    .attention_of(version, head_dim)
                    .expect("64 and 128 exist");
                let smem = attn_smem(version, head_dim);
                let mut n = 0i32;
                // SAFETY: the function handle is live in this context (bound above) and the
                // call only writes `n`. A driver without the calculator leaves 1 (the split
                // rule then sizes the grid to the SM count, as before occupancy was known).
                let ok = unsafe {
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut n,
                        kernel.func,
                        abi::SL_ATTN_THREADS as i32,
                        smem as usize,
                    )
                }
                .result()
                .is_ok();
                kernels.attention_ctas_per_sm[version as usize][i] =
                    if ok && n > 0 { n as u32 } else { 1 };
            }
        }
        Ok(kernels)
    }

    /// Opts the attention kernels into the dynamic shared memory params.h fixes
    /// (`SL_ATTN_SMEM_BYTES(head_dim)`, `SL_ATTN_V1_SMEM_BYTES`, above the default 48 KiB).
    fn set_attention_smem(&self, ctx: &CudaContext) -> Result<()> {
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda_err("reading the shared-memory opt-in limit"))?;
        let all = [
            (&self.attention_hd64, AttnVersion::V2, 64),
            (&self.attention_hd128, AttnVersion::V2, 128),
            (&self.attention_v1_hd64, AttnVersion::V1, 64),
            (&self.attention_v1_hd128, AttnVersion::V1, 128),
        ];
        for (kernel, version, head_dim) in all {
            let bytes = attn_smem(version, head_dim);
            if i64::from(bytes) > i64::from(optin) {
                return Err(Error::Unavailable(format!(
                    "attention with head_dim {head_dim} needs {bytes} bytes of shared memory per \
                     block; this device allows {optin}"
                )));
            }
            // SAFETY: `kernel.func` is a live handle of this context (bound by the caller).
            unsafe {
                result::function::set_function_attribute(
                    kernel.func,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(cuda_err(format_args!(
                "allowing {bytes} bytes of dynamic shared memory for {}",
                kernel.name
            )))?;
        }
        Ok(())
    }

    /// `sl_attention_hd64` or `sl_attention_hd128`; `None` for another head_dim.
    pub fn attention(&self, head_dim: u32) -> Option<&Kernel> {
        self.attention_of(AttnVersion::V2, head_dim)
    }

    /// The attention kernel of `version` for `head_dim` (64 or 128; `None` otherwise).
    pub fn attention_of(&self, version: AttnVersion, head_dim: u32) -> Option<&Kernel> {
        match (version, head_dim) {
            (AttnVersion::V2, 64) => Some(&self.attention_hd64),
            (AttnVersion::V2, 128) => Some(&self.attention_hd128),
            (AttnVersion::V1, 64) => Some(&self.attention_v1_hd64),
            (AttnVersion::V1, 128) => Some(&self.attention_v1_hd128),
            _ => None,
        }
    }

    /// How many CTAs of the attention kernel of `version` for `head_dim` fit one SM at once
    /// (the driver's occupancy calculator at load; 1 where it is not available, or for a
    /// head_dim without a kernel). Times the SM count, the `workers` of the split rule.
    pub fn attention_ctas_per_sm(&self, version: AttnVersion, head_dim: u32) -> u32 {
        match head_dim {
            64 => self.attention_ctas_per_sm[version as usize][0],
            128 => self.attention_ctas_per_sm[version as usize][1],
            _ => 1,
        }
    }

    /// `sl_attention_merge`.
    pub fn attention_merge(&self) -> &Kernel {
        &self.attention_merge
    }

    /// `sl_sample`.
    pub fn sample(&self) -> &Kernel {
        &self.sample
    }

    /// `sl_masked_softmax`.
    pub fn masked_softmax(&self) -> &Kernel {
        &self.masked_softmax
    }

    /// `sl_embed`.
    pub fn embed(&self) -> &Kernel {
        &self.embed
    }

    /// `sl_rmsnorm`.
    pub fn rmsnorm(&self) -> &Kernel {
        &self.rmsnorm
    }

    /// `sl_rope_kv`.
    pub fn rope_kv(&self) -> &Kernel {
        &self.rope_kv
    }

    /// `sl_swiglu`.
    pub fn swiglu(&self) -> &Kernel {
        &self.swiglu
    }

    /// `sl_aggregate_sparse`.
    pub fn aggregate_sparse(&self) -> &Kernel {
        &self.aggregate_sparse
    }

    /// `sl_init_uniform`.
    pub fn init_uniform(&self) -> &Kernel {
        &self.init_uniform
    }

    /// `sl_resolve_plan`.
    pub fn resolve_plan(&self) -> &Kernel {
        &self.resolve_plan
    }

    /// `sl_commit`.
    pub fn commit(&self) -> &Kernel {
        &self.commit
    }

    /// `sl_gather_rows`.
    pub fn gather_rows(&self) -> &Kernel {
        &self.gather_rows
    }

    /// `sl_fill_u32`.
    pub fn fill_u32(&self) -> &Kernel {
        &self.fill_u32
    }

    /// The context the kernels were loaded into: a launch must use one of its streams.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// `(file, target)` of every loaded image, e.g. `("attention.cu", "sm_90a")`.
    pub fn images(&self) -> &[(&'static str, &'static str)] {
        &self.images
    }
}

/// Loads one image into `ctx` (bound by the caller).
fn load_module(ctx: &Arc<CudaContext>, img: &KernelImage) -> Result<Module> {
    // An 8-byte aligned copy with at least one NUL after the image: PTX must be a C string, and
    // a cubin embedded with include_bytes! has no alignment guarantee.
    let mut buf = vec![0u64; img.bytes.len() / 8 + 1];
    bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..img.bytes.len()].copy_from_slice(img.bytes);
    // SAFETY: `buf` holds the whole image followed by a NUL byte and outlives the call; the
    // driver copies (or JIT-compiles) the image during cuModuleLoadData and keeps no pointer
    // into it.
    let cu = unsafe { result::module::load_data(buf.as_ptr().cast()) }.map_err(cuda_err(
        format_args!("loading {} ({})", img.file, img.target),
    ))?;
    Ok(Module {
        cu,
        ctx: ctx.clone(),
    })
}

/// Facts about the device, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (u32, u32),
    /// Streaming multiprocessors (the `workers` of the attention split heuristic).
    pub sm_count: u32,
    /// Global memory, bytes.
    pub total_mem: usize,
    /// The emulated device (`kernels/emu`, a CPU model of the GPU for correctness tests): its
    /// timings say nothing about a GPU's.
    pub emulated: bool,
}

/// One GPU: context, the stream every op runs on, and the loaded kernels.
#[derive(Debug)]
pub struct CudaDevice {
    kernels: Kernels,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

impl Drop for CudaDevice {
    /// Waits for the stream before the kernels' modules unload (the fields drop after this):
    /// an error path can leave launches queued, and unloading a module under a running kernel
    /// is not something the driver defines. An error here (a context already failed) is moot.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl CudaDevice {
    /// Probes and opens device `ordinal`. [`Error::Unavailable`] (never a panic) when there is no
    /// driver library, no device, no compiled kernels, or no kernel image for this device.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let count = device_count()?;
        if let Some(why) = KERNELS_MISSING {
            return Err(Error::Unavailable(why.to_string()));
        }
        if ordinal >= count {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} requested, but there are {count}"
            )));
        }
        guarded(|| Self::open(ordinal))?
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let ctx = CudaContext::new(ordinal).map_err(cuda_err(format_args!(
            "creating a context on device {ordinal}"
        )))?;
        // SAFETY: every buffer, kernel, copy and cuBLASLt call of this crate goes to the one
        // stream made below (one stream per device), so stream order alone orders all uses of
        // every buffer and cudarc's per-buffer events would only add host work (and waits on
        // events recorded outside a graph capture, which a capture rejects). Called before any
        // allocation, so no buffer of this context tracks events; and before the stream is
        // made, so making it does not synchronize the whole (shared, primary) context, which
        // would break a graph capture running on another thread's device handle.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
        Self::on(stream)
    }

    /// A device on an engine's own stream (and so its context): loads the kernels into that
    /// context; every launch given this device (the safe ops above this module) is then queued
    /// on `stream`, on buffers the engine allocated in the same context — nothing is copied and
    /// no other stream is made.
    ///
    /// The context's settings are left as the engine made them. cudarc's event tracking (on by
    /// default once a context has several streams) records events around every launch, which a
    /// CUDA graph capture of those launches rejects: an engine that captures them turns it off
    /// (`CudaContext::disable_event_tracking`, as [`CudaDevice::new`] does) or uses one stream.
    /// [`Error::Unavailable`] when the build has no kernels or none runs on this device.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<CudaDevice> {
        if let Some(why) = KERNELS_MISSING {
            return Err(Error::Unavailable(why.to_string()));
        }
        guarded(|| Self::on(stream))?
    }

    /// Reads the device's facts and loads the kernels for `stream`'s context.
    fn on(stream: Arc<CudaStream>) -> Result<CudaDevice> {
        let ctx = stream.context().clone();
        let ordinal = ctx.ordinal();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the SM count"))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(cuda_err("reading the device name"))?,
            cc: (major as u32, minor as u32),
            sm_count: sm_count.max(1) as u32,
            total_mem: ctx
                .total_mem()
                .map_err(cuda_err("reading the memory size"))?,
            emulated: is_emulated(),
        };
        let kernels = Kernels::load(&ctx)?;
        Ok(CudaDevice {
            kernels,
            stream,
            ctx,
            info,
        })
    }

    /// The device's facts.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch through this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The loaded kernels.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Copies `host` into a new device buffer of the same length (on [`CudaDevice::stream`]).
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(cuda_err(format_args!("uploading {} values", host.len())))
    }

    /// A zeroed device buffer of `len` values.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(cuda_err(format_args!("allocating {len} values")))
    }

    /// Copies a device buffer to the host, after the work queued before it has finished.
    pub fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        let out = self
            .stream
            .clone_dtoh(buf)
            .map_err(cuda_err(format_args!("downloading {} values", buf.len())))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Overwrites a device buffer with `host` (lengths must be equal).
    pub fn write<T: DeviceRepr>(&self, host: &[T], buf: &mut CudaSlice<T>) -> Result<()> {
        if host.len() != buf.len() {
            return Err(Error::Input(format!(
                "copy to device: {} host values for a buffer of {}",
                host.len(),
                buf.len()
            )));
        }
        self.stream
            .memcpy_htod(host, buf)
            .map_err(cuda_err(format_args!("uploading {} values", host.len())))
    }

    /// Waits for all work queued on the stream; reports a kernel fault as [`Error::Cuda`].
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("waiting for the stream"))
    }

    /// The driver: the kernel module's version from `/proc/driver/nvidia/version` when it is
    /// there (as `nvidia-smi` shows it) and the CUDA version the driver supports, e.g.
    /// `570.133.20 (CUDA 12.8)`.
    pub fn driver_version(&self) -> Result<String> {
        let mut v = 0i32;
        // SAFETY: the driver library is loaded (this device was opened through it) and the call
        // only writes the version into `v`.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(cuda_err("reading the driver version"))?;
        let cuda = format!("CUDA {}.{}", v / 1000, (v % 1000) / 10);
        let module = std::fs::read_to_string("/proc/driver/nvidia/version")
            .ok()
            .and_then(|text| kernel_module_version(&text));
        Ok(match module {
            Some(m) => format!("{m} ({cuda})"),
            None => cuda,
        })
    }

    /// The stream-ordered memory pool the allocations of this device come from (cudarc
    /// allocates with `cuMemAllocAsync` from the device's current pool when the device supports
    /// memory pools), or `None` when it does not.
    fn mem_pool(&self) -> Result<Option<sys::CUmemoryPool>> {
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))?;
        // SAFETY: `cu_device` is the device this context was created on.
        let pool = unsafe { result::device::get_mem_pool(self.ctx.cu_device()) }
            .map_err(cuda_err("reading the device's memory pool"))?;
        Ok(Some(pool))
    }

    fn pool_attribute(pool: sys::CUmemoryPool, attr: CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: `pool` is the device's live pool and the usage attributes are `cuuint64_t`,
        // which `value` is.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()) }
            .map_err(cuda_err(format_args!("reading the memory pool's {attr:?}")))?;
        Ok(value)
    }

    /// Restarts the memory pool's high watermark (after the queued work, so queued frees
    /// count) and returns the bytes in use now; `None` without memory-pool support.
    pub fn reset_peak_memory(&self) -> Result<Option<u64>> {
        let Some(pool) = self.mem_pool()? else {
            return Ok(None);
        };
        self.synchronize()?;
        let mut zero: u64 = 0;
        // SAFETY: `pool` is the device's live pool; USED_MEM_HIGH takes a `cuuint64_t` and may
        // only be set to zero, which `zero` is.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .map_err(cuda_err("resetting the memory pool's high watermark"))?;
        Self::pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT).map(Some)
    }

    /// The most bytes of the memory pool in use at once since [`CudaDevice::reset_peak_memory`]
    /// (after the queued work), never below what is in use now; `None` without memory-pool
    /// support.
    pub fn peak_memory(&self) -> Result<Option<u64>> {
        let Some(pool) = self.mem_pool()? else {
            return Ok(None);
        };
        self.synchronize()?;
        let high = Self::pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        let now =
            Self::pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Ok(Some(high.max(now)))
    }

    /// Device-to-device copy bandwidth, bytes read plus bytes written per second: a copy of
    /// `bytes` between two fresh buffers, 3 untimed, then the median of 10 timed with events
    /// (as `benches/kernels.rs` measures its copy ceiling, there with 1 GiB). Refuses, naming
    /// the sizes, when the two buffers do not fit in the free memory.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        if bytes == 0 {
            return Err(Error::Input("copy bandwidth: a copy of 0 bytes".into()));
        }
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(cuda_err("reading the free device memory"))?;
        if bytes.saturating_mul(2) > free {
            return Err(Error::OutOfMemory(format!(
                "measuring the copy bandwidth needs 2 × {:.2} GB but only {:.2} GB is free",
                bytes as f64 / 1e9,
                free as f64 / 1e9
            )));
        }
        let src = self.alloc_zeros::<u8>(bytes)?;
        let mut dst = self.alloc_zeros::<u8>(bytes)?;
        let mut copy = || {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(cuda_err(format_args!(
                    "copying {bytes} bytes on the device"
                )))
        };
        for _ in 0..3 {
            copy()?;
        }
        let mut clock = EventClock::new(self)?;
        let mut times = Vec::with_capacity(10);
        for _ in 0..10 {
            times.push(clock.time(&mut copy)?);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        if median.is_nan() || median <= 0.0 {
            return Err(Error::Cuda(format!(
                "copy bandwidth: a copy of {bytes} bytes timed at {median} s"
            )));
        }
        Ok(2.0 * bytes as f64 / median)
    }
}

/// The version in the first line of `/proc/driver/nvidia/version` (`NVRM version: NVIDIA UNIX
/// x86_64 Kernel Module  570.133.20  Tue ...`): the first word after `Kernel Module` that starts
/// with a digit.
fn kernel_module_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let (_, rest) = line.split_once("Kernel Module")?;
    rest.split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
}

/// Records `event` on `stream`; with `graph_node` (only while `stream` is capturing a graph), as
/// an event-record node of the graph (`CU_EVENT_RECORD_EXTERNAL`), so that every replay records
/// it and the time between two such events can be read after the replay.
pub fn record_event(event: &CudaEvent, stream: &CudaStream, graph_node: bool) -> Result<()> {
    if !graph_node {
        return event.record(stream).map_err(cuda_err("recording an event"));
    }
    // SAFETY: the event and the stream are live handles (borrowed for the call); the flag is a
    // valid `CUevent_record_flags` value, which the caller uses only while capturing, as the
    // driver requires.
    unsafe {
        sys::cuEventRecordWithFlags(
            event.cu_event(),
            stream.cu_stream(),
            sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
        )
    }
    .result()
    .map_err(cuda_err("recording an event node in a graph"))
}

/// Two timing events on a device's stream: the GPU time between two points of its queue.
#[derive(Debug)]
pub struct EventClock {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
    started: bool,
}

impl EventClock {
    /// Two timing events in `dev`'s context, timing `dev`'s stream.
    pub fn new(dev: &CudaDevice) -> Result<EventClock> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = dev.context();
        Ok(EventClock {
            start: ctx
                .new_event(timing)
                .map_err(cuda_err("creating an event"))?,
            end: ctx
                .new_event(timing)
                .map_err(cuda_err("creating an event"))?,
            stream: dev.stream().clone(),
            started: false,
        })
    }

    /// Records the start event after the work queued so far.
    pub fn start(&mut self) -> Result<()> {
        self.start
            .record(&self.stream)
            .map_err(cuda_err("recording the start event"))?;
        self.started = true;
        Ok(())
    }

    /// Records the end event after the work queued so far, waits for it, and returns the GPU
    /// seconds since the start event; [`Error::Input`] when [`EventClock::start`] was not
    /// called since the last stop.
    pub fn stop(&mut self) -> Result<f64> {
        if !std::mem::take(&mut self.started) {
            return Err(Error::Input("event clock stopped before it started".into()));
        }
        self.end
            .record(&self.stream)
            .map_err(cuda_err("recording the end event"))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(cuda_err("reading the event timer"))?;
        Ok(f64::from(ms) * 1e-3)
    }

    /// GPU seconds of the work `queue` queues (waits for it).
    pub fn time(&mut self, queue: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.start()?;
        if let Err(e) = queue() {
            self.started = false;
            return Err(e);
        }
        self.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(file: &'static str, target: &'static str) -> KernelImage {
        KernelImage {
            file,
            target,
            bytes: b"",
        }
    }

    const ALL: &[(&str, &str)] = &[
        ("attention.cu", "sm_80"),
        ("attention.cu", "sm_90"),
        ("attention.cu", "sm_90a"),
        ("attention.cu", "compute_90"),
        ("support.cu", "sm_80"),
    ];

    fn images() -> Vec<KernelImage> {
        ALL.iter().map(|&(f, t)| img(f, t)).collect()
    }

    fn pick(cc: (u32, u32)) -> Result<&'static str> {
        let imgs = images();
        choose_image(&imgs, "attention", cc).map(|i| i.target)
    }

    #[test]
    fn targets_parse() {
        use ImageTarget::*;
        let cubin = |major, minor, arch_specific| {
            Some(Cubin {
                major,
                minor,
                arch_specific,
            })
        };
        assert_eq!(ImageTarget::parse("sm_80"), cubin(8, 0, false));
        assert_eq!(ImageTarget::parse("sm_86"), cubin(8, 6, false));
        assert_eq!(ImageTarget::parse("sm_90a"), cubin(9, 0, true));
        assert_eq!(ImageTarget::parse("sm_100"), cubin(10, 0, false));
        assert_eq!(
            ImageTarget::parse("compute_90"),
            Some(Ptx { major: 9, minor: 0 })
        );
        for bad in ["sm_", "sm_8", "sm_9x", "compute_90a", "ptx", "sm_90f", ""] {
            assert_eq!(ImageTarget::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn chooser_prefers_matching_cubin_then_ptx() {
        // Exactly 9.0: the arch-specific cubin wins.
        assert_eq!(pick((9, 0)).unwrap(), "sm_90a");
        // 8.x: the sm_80 cubin runs on 8.0, 8.6 and 8.9.
        assert_eq!(pick((8, 0)).unwrap(), "sm_80");
        assert_eq!(pick((8, 6)).unwrap(), "sm_80");
        assert_eq!(pick((8, 9)).unwrap(), "sm_80");
        // A newer major: no cubin of that major, the PTX is JIT-compiled.
        assert_eq!(pick((10, 0)).unwrap(), "compute_90");
        assert_eq!(pick((12, 0)).unwrap(), "compute_90");
        // 9.x above 9.0: sm_90 (not the arch-specific one).
        let imgs = vec![img("attention.cu", "sm_90a"), img("attention.cu", "sm_90")];
        assert_eq!(
            choose_image(&imgs, "attention", (9, 1)).unwrap().target,
            "sm_90"
        );
        // Only sm_90a, on 9.1: nothing runs.
        assert!(choose_image(&imgs[..1], "attention", (9, 1)).is_err());
    }

    #[test]
    fn chooser_names_the_capability_when_nothing_runs() {
        let e = pick((7, 5)).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)));
        let msg = e.to_string();
        assert!(msg.contains("7.5") && msg.contains("attention"), "{msg}");
        assert!(msg.contains("sm_80") && msg.contains("compute_90"), "{msg}");
        // A file with no image at all.
        let imgs = images();
        let e = choose_image(&imgs, "softmax", (9, 0)).unwrap_err();
        assert!(e.to_string().contains("none embedded"), "{e}");
        // File names with or without a directory and extension match.
        let imgs = vec![img("kernels/support.cu", "sm_80"), img("support", "sm_86")];
        assert_eq!(
            choose_image(&imgs, "support", (8, 9)).unwrap().target,
            "sm_86"
        );
    }

    #[test]
    fn kernel_module_version_is_read_from_the_proc_line() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.133.20  Fri Mar 14 \
                    02:13:16 UTC 2025\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(kernel_module_version(text).as_deref(), Some("570.133.20"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  575.51.03  Release \
                    Build\n";
        assert_eq!(kernel_module_version(open).as_deref(), Some("575.51.03"));
        assert_eq!(kernel_module_version(""), None);
        assert_eq!(kernel_module_version("something else\n"), None);
    }

    /// On a device (a GPU, or the emulated one): events time a copy, and the pool's high
    /// watermark sees a buffer allocated and freed after a reset. Without one: nothing to check
    /// (the probe test covers the error).
    #[test]
    fn clock_and_peak_memory_on_a_device() {
        let Ok(dev) = CudaDevice::new(0) else {
            return;
        };
        assert!(dev.driver_version().unwrap().contains("CUDA "));
        let mut clock = EventClock::new(&dev).unwrap();
        assert!(clock.stop().is_err());
        let buf = dev.alloc_zeros::<u8>(16 << 20).unwrap();
        let mut other = dev.alloc_zeros::<u8>(16 << 20).unwrap();
        let t = clock
            .time(|| {
                dev.stream()
                    .memcpy_dtod(&buf, &mut other)
                    .map_err(cuda_err("copy"))
            })
            .unwrap();
        assert!(t > 0.0 && t < 10.0, "{t}");
        drop((buf, other));
        if let Some(before) = dev.reset_peak_memory().unwrap() {
            let extra = dev.alloc_zeros::<u8>(256 << 20).unwrap();
            drop(extra);
            let peak = dev.peak_memory().unwrap().unwrap();
            assert!(peak >= before + (256 << 20), "{before} → {peak}");
        }
    }

    /// The copy bandwidth of a real card is plausible (the emulated device's is host memcpy).
    #[test]
    #[ignore = "needs a CUDA GPU: the bandwidth of a real card"]
    fn copy_bandwidth_is_plausible_on_a_gpu() {
        let dev = CudaDevice::new(0).expect("a CUDA GPU");
        assert!(
            !dev.info().emulated,
            "run on a GPU, not the emulated device"
        );
        let bw = dev.copy_bandwidth(64 << 20).unwrap();
        // Any card this crate runs on copies between 50 GB/s and 50 TB/s.
        assert!((5e10..5e13).contains(&bw), "{bw}");
    }

    #[test]
    fn probe_is_an_error_not_a_panic_without_a_gpu() {
        match CudaDevice::new(0) {
            Ok(dev) => assert!(dev.info().sm_count > 0),
            Err(Error::Unavailable(msg)) => {
                // SAFETY: see `device_count`.
                if !unsafe { sys::is_culib_present() } {
                    assert_eq!(msg, NO_DRIVER);
                }
            }
            Err(e) => panic!("expected Unavailable, got {e}"),
        }
    }
}

//! Memory bounds: what a request needs, computed from the config and the request's sizes alone
//! in checked integer arithmetic before anything is allocated, and the limit it must fit in.
//!
//! Every size here is an upper bound of what the run allocates on the heap (weights, K/V pool,
//! activations, plans, schedule and trace, outputs), so a request that passes the check never
//! aborts for memory and one that fails is refused in microseconds with both numbers. A size
//! that overflows 64 bits is refused the same way: no request is ever that small.
//!
//! The host limit is the smallest of what this process may still take: the machine's available
//! memory (`MemAvailable` in `/proc/meminfo`), the cgroup's `memory.max` less its usage, and the
//! address-space limit (`ulimit -v`) less what the process already maps. `--max-memory`
//! ([`set_max_memory`]) replaces the first two; the address-space limit still applies, as the
//! kernel enforces it whatever the user says.

use crate::config::{Branch, Config};
use crate::error::{Error, Result};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Heap bytes of fixed overhead every run may use besides its sized parts: the argument
/// parser, thread pools, per-thread attention tiles, matrix-product packing buffers, output
/// buffers, error and progress strings.
pub const FIXED_OVERHEAD: u64 = 32 << 20;
/// Host bytes of bookkeeping per weight tensor (its name and shape in the tensor list, the
/// weight map and the model's index of it, each built a few times during a load).
pub const TENSOR_OVERHEAD: u64 = 1024;
/// Host bytes per fed row of one pass: the plan builder's rows, sort order and ranks, the
/// packed plan and the backend's copy of it.
pub const PLAN_BYTES_PER_ROW: u64 = 160;
/// Host bytes per key of one pass: the builder's per-sequence key lists and slot set, the
/// packed index and tag lists and the backend's copy.
pub const PLAN_BYTES_PER_KEY: u64 = 112;
/// Host bytes of scratch per worker thread on the CPU backend: matrix-product packing buffers
/// (about 1.1 MB per product in flight) and attention tiles.
pub const THREAD_SCRATCH: u64 = 4 << 20;
/// Device bytes of fixed overhead on a GPU (cuBLASLt workspaces, module images, pool slack).
pub const DEVICE_OVERHEAD: u64 = 512 << 20;

/// The process's peak resident set since a reset: Linux's `VmHWM` (`/proc/self/status`),
/// restarted by writing `5` to `/proc/self/clear_refs`. Used by `bench --batch` on the host.
#[derive(Debug)]
pub struct PeakRss {
    reset: bool,
}

impl PeakRss {
    /// How [`PeakRss::peak`] is measured, for reports.
    pub const SOURCE: &'static str = "peak resident set of the process (VmHWM in \
        /proc/self/status, restarted through /proc/self/clear_refs before each run; weights \
        included)";

    /// Restarts the high watermark at the current resident set.
    pub fn reset() -> PeakRss {
        PeakRss {
            reset: std::fs::write("/proc/self/clear_refs", "5").is_ok(),
        }
    }

    /// The highest resident set since [`PeakRss::reset`], bytes; `None` when the watermark
    /// could not be restarted or read.
    pub fn peak(&self) -> Option<u64> {
        if !self.reset {
            return None;
        }
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    }
}

/// `--max-memory`, in bytes; 0 when unset.
static MAX_MEMORY: AtomicU64 = AtomicU64::new(0);

/// Sets (or with `None` clears) the host memory limit that replaces the machine's available
/// memory in every check of this process (`--max-memory`).
pub fn set_max_memory(bytes: Option<u64>) {
    MAX_MEMORY.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

/// The host memory limit a check compares with, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// What sets it, for messages: `--max-memory`, available memory, cgroup or `ulimit -v`.
    pub source: &'static str,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", human_bytes(self.bytes), self.source)
    }
}

/// The host memory this process may still allocate (see the module docs), or `None` when no
/// source can be read (then nothing is refused).
pub fn host_limit() -> Option<Limit> {
    let user = MAX_MEMORY.load(Ordering::Relaxed);
    let mut candidates = Vec::new();
    if user > 0 {
        candidates.push(Limit {
            bytes: user,
            source: "--max-memory",
        });
    } else {
        if let Some(bytes) = available_memory_bytes() {
            candidates.push(Limit {
                bytes,
                source: "available memory, MemAvailable in /proc/meminfo; --max-memory sets another limit",
            });
        }
        if let Some(bytes) = cgroup_headroom() {
            candidates.push(Limit {
                bytes,
                source: "the cgroup's memory.max less its usage",
            });
        }
    }
    if let Some(bytes) = address_space_headroom() {
        candidates.push(Limit {
            bytes,
            source: "the address-space limit (ulimit -v) less what this process maps",
        });
    }
    candidates.into_iter().min_by_key(|l| l.bytes)
}

/// Bytes of memory this machine can still give (Linux `MemAvailable`), if known.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&info, "MemAvailable:")
}

/// The `N kB` value of the line starting with `key`, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft `RLIMIT_AS` (from `/proc/self/limits`) less the process's mapped size (`VmSize`).
fn address_space_headroom() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let mapped = kib_field(&status, "VmSize:")?;
    Some(soft.saturating_sub(mapped))
}

/// cgroup v2 `memory.max − memory.current` of this process's cgroup, when it has a limit.
fn cgroup_headroom() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max: u64 = std::fs::read_to_string(dir.join("memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses `what` needing `needed` host bytes when [`host_limit`] is lower.
pub fn ensure_fits(what: &str, needed: u64) -> Result<()> {
    match host_limit() {
        Some(limit) if needed > limit.bytes => Err(Error::OutOfMemory(format!(
            "{what} needs {} but the limit is {limit}",
            human_bytes(needed)
        ))),
        _ => Ok(()),
    }
}

/// Parses a byte count: an integer or decimal number with an optional unit, case-insensitive:
/// `B`; `K`, `M`, `G`, `T`, `P` or `KiB` … `PiB` (powers of 1024); `kB`, `MB`, `GB`, `TB`, `PB`
/// (powers of 1000). `8G` is 8 GiB, `1.5GB` is 1.5·10⁹ bytes.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let bad =
        || format!("`{text}` is not a byte count (e.g. 8G = 8 GiB, 1.5GB = 1.5·10⁹ bytes, 4096)");
    let scale: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return Err(bad()),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(bad());
    }
    let digits = |d: &str| -> std::result::Result<u128, String> {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u128>().map_err(|_| bad())
        }
    };
    let too_big = || format!("`{text}` is more than 2^64 bytes");
    let whole = digits(int)?.checked_mul(scale).ok_or_else(too_big)?;
    let part = digits(frac)?
        .checked_mul(scale)
        .ok_or_else(too_big)?
        .checked_div(10u128.pow(frac.len() as u32))
        .unwrap_or(0);
    let bytes = whole.checked_add(part).ok_or_else(too_big)?;
    u64::try_from(bytes).map_err(|_| too_big())
}

/// Bytes with a decimal unit and three significant digits: `512 B`, `36.9 MB`, `43.0 GB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if v >= 99.95 => format!("{v:.0} {}", UNITS[unit]),
        _ if v >= 9.995 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.2} {}", UNITS[unit]),
    }
}

/// An integer with thousands separators: `10,757,193,216`.
pub fn human_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Where a request runs: what it stores per element and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The f32 CPU backend: everything on the host, 4 bytes per weight and cached key/value.
    Cpu,
    /// The CUDA backend: bf16 weights and K/V pool on the device (2 bytes), f32 residual and
    /// logits; the host keeps plans, schedule and trace. `attn_workers`: the concurrent
    /// attention CTAs its split rule fills (`cuda::ops::attention_workers`), which bound each
    /// step plan's split workspace.
    Cuda {
        /// Concurrent attention CTAs (at most [`crate::contract::attn::MAX_SPLIT_WORKERS`]).
        attn_workers: u64,
    },
}

/// Where a model's weights come from, for their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFrom {
    /// Seeded random weights (made on the host for the CPU, on the device for CUDA).
    Random,
    /// A safetensors file of this many bytes, read whole on the host then converted to f32.
    File(u64),
}

/// One part of a request's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// What it is: `weights`, `K/V pool`, ...
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// The memory a request needs on the host and (on a GPU) on the device, by part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Need {
    /// Host parts.
    pub host: Vec<Part>,
    /// Device parts (empty on the CPU).
    pub device: Vec<Part>,
}

impl Need {
    fn add(parts: &mut Vec<Part>, what: impl Into<String>, bytes: u64) {
        if bytes > 0 {
            parts.push(Part {
                what: what.into(),
                bytes,
            });
        }
    }

    /// Adds a host part.
    pub fn host(&mut self, what: impl Into<String>, bytes: u64) {
        Self::add(&mut self.host, what, bytes);
    }

    /// Adds a device part.
    pub fn device(&mut self, what: impl Into<String>, bytes: u64) {
        Self::add(&mut self.device, what, bytes);
    }

    /// Host bytes in total; [`Error::OutOfMemory`] when they overflow 64 bits.
    pub fn host_total(&self) -> Result<u64> {
        total(&self.host)
    }

    /// Device bytes in total; [`Error::OutOfMemory`] when they overflow 64 bits.
    pub fn device_total(&self) -> Result<u64> {
        total(&self.device)
    }

    /// Refuses `what` when its host total exceeds [`host_limit`], with the total, the parts
    /// and the limit.
    pub fn check_host(&self, what: &str) -> Result<()> {
        self.check_host_against(what, host_limit())
    }

    /// [`Need::check_host`] against a given limit (`None`: no limit known).
    pub fn check_host_against(&self, what: &str, limit: Option<Limit>) -> Result<()> {
        let total = self.host_total()?;
        match limit {
            Some(limit) if total > limit.bytes => Err(Error::OutOfMemory(format!(
                "{what} needs {} of host memory ({}) but the limit is {limit}",
                human_bytes(total),
                describe(&self.host)
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses `what` when its device total exceeds `free` device bytes.
    pub fn check_device(&self, what: &str, free: u64) -> Result<()> {
        let total = self.device_total()?;
        if total > free {
            return Err(Error::OutOfMemory(format!(
                "{what} needs {} of device memory ({}) but {} is free on the device",
                human_bytes(total),
                describe(&self.device),
                human_bytes(free)
            )));
        }
        Ok(())
    }
}

fn total(parts: &[Part]) -> Result<u64> {
    parts
        .iter()
        .try_fold(0u64, |acc, p| acc.checked_add(p.bytes))
        .ok_or_else(overflow)
}

/// `weights 43.0 GB (10,757,193,216 parameters in f32), K/V pool 1.20 GB (...)`: the bytes
/// right after a part's name, its details after them.
fn describe(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match p.what.split_once(" (") {
            Some((name, detail)) => format!("{name} {} ({detail}", human_bytes(p.bytes)),
            None => format!("{} {}", p.what, human_bytes(p.bytes)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn overflow() -> Error {
    Error::OutOfMemory(
        "the request's memory overflows 64-bit arithmetic (more than 18.4 EB)".into(),
    )
}

/// `Σ aᵢ·bᵢ·…` in checked arithmetic: each term a product of factors.
fn sum_of_products(terms: &[&[u64]]) -> Result<u64> {
    terms.iter().try_fold(0u64, |acc, factors| {
        let product = factors
            .iter()
            .try_fold(1u64, |p, &f| p.checked_mul(f))
            .ok_or_else(overflow)?;
        acc.checked_add(product).ok_or_else(overflow)
    })
}

/// `a · b` checked.
pub(crate) fn mul(a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b).ok_or_else(overflow)
}

/// `a + b` checked.
fn add(a: u64, b: u64) -> Result<u64> {
    a.checked_add(b).ok_or_else(overflow)
}

/// Output columns per panel of the CPU backend's packed projection weights (its `packed::PANEL`
/// is this constant): a packed `[n, k]` matrix holds `ceil(n / 64) · 64 · k` values.
pub const CPU_PACK_PANEL: usize = 64;

/// Bytes of the CPU backend's packed copies of the projection weights (q|k|v, o, gate|up and
/// down of every layer and branch, and each branch's logits head): the runtime's CPU model packs
/// them all at load, beside the f32 tensors they copy.
pub fn cpu_packed_weight_bytes(cfg: &Config) -> Result<u64> {
    let panel = CPU_PACK_PANEL as u64;
    let matrix =
        |n: usize, k: usize| mul(mul((n as u64).div_ceil(panel), panel)?, mul(k as u64, 4)?);
    let q_dim = cfg.n_heads as u64 * cfg.head_dim as u64;
    let mut total = 0u64;
    for b in [Branch::Text, Branch::Image] {
        let (d, f) = (cfg.d_model(b), cfg.d_mlp(b));
        let qkv =
            usize::try_from(add(q_dim, mul(cfg.kv_dim() as u64, 2)?)?).map_err(|_| overflow())?;
        let layer = [
            matrix(qkv, d)?,
            matrix(d, q_dim as usize)?,
            matrix(2 * f, d)?,
            matrix(d, f)?,
        ]
        .into_iter()
        .try_fold(0u64, add)?;
        total = add(total, mul(layer, cfg.n_layers as u64)?)?;
        total = add(total, matrix(cfg.vocab(b), d)?)?;
    }
    Ok(total)
}

/// Adds the weights of `cfg` to `need`: on the CPU f32 values (and a weight file read whole
/// first) and the packed copies of the projections, on CUDA bf16 on the device (a file also
/// passes through an f32 host copy).
pub fn add_weights(need: &mut Need, cfg: &Config, target: Target, from: WeightsFrom) -> Result<()> {
    let params = cfg.try_param_count()?;
    let book = mul(cfg.tensor_count(), TENSOR_OVERHEAD)?;
    let f32_bytes = mul(params, 4)?;
    let label = |dtype: &str| format!("weights ({} parameters in {dtype})", human_count(params));
    need.host(
        format!(
            "tensor bookkeeping ({} tensors)",
            human_count(cfg.tensor_count())
        ),
        book,
    );
    match (target, from) {
        (Target::Cpu, from) => {
            need.host(label("f32"), f32_bytes);
            need.host(
                "packed copies of the projection weights",
                cpu_packed_weight_bytes(cfg)?,
            );
            if let WeightsFrom::File(len) = from {
                need.host("the weight file, read whole", len);
            }
        }
        (Target::Cuda { .. }, from) => {
            need.device(label("bf16"), mul(params, 2)?);
            if let WeightsFrom::File(len) = from {
                need.host(
                    "the weight file and its f32 copy before the upload",
                    add(len, f32_bytes)?,
                );
            }
        }
    }
    Ok(())
}

/// The sizes of one generation that decide its memory (the CLI's request derives them from a
/// config and the flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenShape {
    /// The response's branch (image for text-to-image, text for a text answer).
    pub response: Branch,
    /// Prompt length `P`.
    pub prompt: u64,
    /// Response length `N`.
    pub response_len: u64,
    /// Sequences: 2 for a CFG pair, else 1.
    pub n_seqs: u64,
    /// Steps `K`.
    pub steps: u64,
    /// Most positions one step decodes per sequence (the largest t2i group, or a text block).
    pub max_query: u64,
    /// `H × W` of a text-to-image grid.
    pub grid: Option<(u64, u64)>,
}

/// Activation bytes of one pass over `rows[b]` rows of each branch `b` (indexed by `Branch as
/// usize`) on the CPU backend (the CUDA backend stores less: [`cuda_activation_bytes`]), with
/// the backend's transient copies: RoPE's rotated keys and the attention's split partials
/// (`splits` per query tile and head).
fn activation_bytes(cfg: &Config, rows: [u64; 2], splits: u64) -> Result<u64> {
    Branch::ALL.into_iter().try_fold(0, |sum, b| {
        let (d, f) = (cfg.d_model(b) as u64, cfg.d_mlp(b) as u64);
        add(
            sum,
            activation_bytes_of(cfg, d, f, rows[b as usize], splits)?,
        )
    })
}

/// [`activation_bytes`] for a model width `d` and MLP width `f`.
fn activation_bytes_of(cfg: &Config, d: u64, f: u64, rows: u64, splits: u64) -> Result<u64> {
    let (a, kv) = (cfg.attn_dim() as u64, cfg.kv_dim() as u64);
    let heads = cfg.n_heads as u64;
    let per_row = sum_of_products(&[
        &[2, d],
        &[2, a],
        &[3, kv],
        &[3, f],
        &[splits, heads, cfg.head_dim as u64 + 1],
        &[heads],
        &[4],
    ])?;
    mul(mul(rows, per_row)?, 4)
}

/// Activation bytes of one pass over `rows[b]` rows of each branch `b` on the CUDA backend, as
/// its workspace holds them (`Model::workspace`): the residual in f32; its norm, the fused
/// q|k|v, the attention output, gate|up and the SwiGLU output in bf16.
fn cuda_activation_bytes(cfg: &Config, rows: [u64; 2]) -> Result<u64> {
    let (a, kv) = (cfg.attn_dim() as u64, cfg.kv_dim() as u64);
    Branch::ALL.into_iter().try_fold(0, |sum, b| {
        let (d, f) = (cfg.d_model(b) as u64, cfg.d_mlp(b) as u64);
        let per_row = sum_of_products(&[&[4, d], &[2, d], &[2, a], &[4, kv], &[2, a], &[6, f]])?;
        add(sum, mul(rows[b as usize], per_row)?)
    })
}

/// The largest transient of the CUDA backend's matrix-product warm-up for passes of `rows[b]`
/// rows of each branch `b`: `warm_products` holds an input and an output of the product's
/// shape while cuBLASLt's algorithm choice times candidates on another pair (on a GPU), for
/// the widest of the layers' products (q|k|v and gate|up in bf16, the output projections'
/// f32); the head's is [`cuda_head_warmup_bytes`].
fn cuda_warmup_bytes(cfg: &Config, rows: [u64; 2]) -> Result<u64> {
    let (a, kv) = (cfg.attn_dim() as u64, cfg.kv_dim() as u64);
    Branch::ALL.into_iter().try_fold(0, |most, b| {
        let (d, f) = (cfg.d_model(b) as u64, cfg.d_mlp(b) as u64);
        let out = sum_of_products(&[&[2, a], &[4, kv]])?
            .max(mul(4, d)?)
            .max(mul(4, f)?);
        let widest_in = mul(2, d.max(f).max(a))?;
        Ok(most.max(mul(2, mul(rows[b as usize], add(widest_in, out)?)?)?))
    })
}

/// [`cuda_warmup_bytes`] of the head's product: `logits_rows` rows of width `d` in bf16 into
/// f32 logits `vocab` wide (at `lavida-o`'s text vocabulary the widest product per row).
fn cuda_head_warmup_bytes(logits_rows: u64, d: u64, vocab: u64) -> Result<u64> {
    mul(
        2,
        sum_of_products(&[&[logits_rows, d, 2], &[logits_rows, vocab, 4]])?,
    )
}

/// The most bytes every step plan's attention split workspaces can take together on the CUDA
/// backend ([`crate::contract::attn::max_split_values`] per branch over its most rows, for
/// `plans` plans kept at once).
fn cuda_split_bytes(cfg: &Config, rows: [u64; 2], plans: u64, workers: u64) -> Result<u64> {
    let tile = crate::contract::abi::SL_ATTN_BLOCK_M.max(crate::contract::abi::SL_ATTN_V1_BLOCK_M);
    let per_plan = rows.iter().try_fold(0u64, |acc, &r| {
        let values = crate::contract::attn::max_split_values(
            r,
            tile as u64,
            cfg.n_heads as u64,
            cfg.head_dim as u64,
            workers,
        );
        add(acc, mul(values, 4)?)
    })?;
    mul(plans, per_plan)
}

/// The CPU backend's worker threads and the attention splits it may use per query tile (one
/// per thread, at most `AttnTiling::MAX_SPLITS`).
fn cpu_threads_and_splits() -> (u64, u64) {
    let threads = rayon::current_num_threads() as u64;
    let splits = threads.clamp(1, crate::contract::AttnTiling::MAX_SPLITS as u64);
    (threads, splits)
}

/// Bytes of a RoPE (cos, sin) table over `slots` positions, the CPU pool's and a CUDA
/// generation's alike: a pair of f32 per position and head pair.
pub fn rope_table_bytes(cfg: &Config, slots: u64) -> Result<u64> {
    mul(slots, mul(cfg.head_dim as u64, 4)?)
}

/// The CPU backend's last layer past the K/V for `logits_rows` rows on their own (the model's
/// tail pass, `Backend::prunes_last_layer`): their activations (shaped for the wider branch) and the tail plan
/// (those rows and the pass's `keys` keys again).
fn tail_bytes(cfg: &Config, logits_rows: u64, keys: u64, splits: u64) -> Result<u64> {
    // The scratch takes the wider model width and the wider MLP width, whichever branch each
    // comes from.
    let d = cfg.d_text.max(cfg.d_image) as u64;
    let f = cfg.mlp_text.max(cfg.mlp_image) as u64;
    let act = activation_bytes_of(cfg, d, f, logits_rows, splits)?;
    let plan = sum_of_products(&[
        &[logits_rows, PLAN_BYTES_PER_ROW],
        &[keys, PLAN_BYTES_PER_KEY],
    ])?;
    add(act, plan)
}

/// Adds the run of `shape` (everything but the weights) to `need`. `resident`: the target keeps
/// every step's plan (a device-resident CUDA run) rather than one at a time; `image_px`: the
/// pixels of a `--image` picture, if one is drawn. A batch of one ([`add_batch`]).
pub fn add_generation(
    need: &mut Need,
    cfg: &Config,
    shape: &GenShape,
    target: Target,
    image_px: u64,
) -> Result<()> {
    add_batch(need, cfg, std::slice::from_ref(shape), target, image_px)
}

/// The sized parts of one request's run (see [`add_batch`]).
#[derive(Debug, Clone, Copy, Default)]
struct RunParts {
    slots: u64,
    text_rows: u64,
    image_rows: u64,
    keys: u64,
    logits_rows: u64,
    bookkeeping: u64,
    /// Every step's plan and the prefill's: what a device-resident run keeps.
    programs: u64,
}

impl RunParts {
    fn of(cfg: &Config, shape: &GenShape) -> Result<RunParts> {
        let GenShape {
            prompt: p,
            response_len: n,
            n_seqs,
            steps: k,
            max_query,
            ..
        } = *shape;
        let r = cfg.n_registers as u64;
        // Pool: [prompt | response | scratch of N + R] per sequence (sampler::Layout).
        let slots = mul(n_seqs, sum_of_products(&[&[p], &[2, n], &[r]])?)?;
        // Rows and keys of the largest pass of any mode: sparse without truncation feeds at
        // most the prompt, every response position once (decoded, queried or another mask) and
        // the registers; dense feeds prompt and response.
        let seq_rows = sum_of_products(&[&[p], &[n], &[r]])?;
        let (text_rows, image_rows) = match shape.response {
            Branch::Image => (mul(n_seqs, p)?, mul(n_seqs, add(n, r)?)?),
            Branch::Text => (mul(n_seqs, seq_rows)?, 0),
        };
        let keys = mul(n_seqs, seq_rows)?;
        let rows = add(text_rows, image_rows)?;
        let plan_pass =
            sum_of_products(&[&[rows, PLAN_BYTES_PER_ROW], &[keys, PLAN_BYTES_PER_KEY]])?;
        // Schedule (order, stratified keys and quadtree shuffles, groups), decode state, trace
        // (decoded positions and tokens, each step's query), the prompts and the output tokens.
        let (h, w) = shape.grid.unwrap_or((0, 0));
        let queries = match shape.response {
            Branch::Image => n,
            Branch::Text => mul(k, max_query)?,
        };
        let bookkeeping = sum_of_products(&[
            &[n, 64],
            &[33, add(h, w)?, 4],
            &[k, 256],
            &[queries, 4],
            &[add(n_seqs, 2)?, p, 4],
        ])?;
        Ok(RunParts {
            slots,
            text_rows,
            image_rows,
            keys,
            logits_rows: mul(n_seqs, max_query)?,
            bookkeeping,
            programs: mul(add(k, 1)?, plan_pass)?,
        })
    }

    fn plus(self, o: RunParts) -> Result<RunParts> {
        Ok(RunParts {
            slots: add(self.slots, o.slots)?,
            text_rows: add(self.text_rows, o.text_rows)?,
            image_rows: add(self.image_rows, o.image_rows)?,
            keys: add(self.keys, o.keys)?,
            logits_rows: add(self.logits_rows, o.logits_rows)?,
            bookkeeping: add(self.bookkeeping, o.bookkeeping)?,
            programs: add(self.programs, o.programs)?,
        })
    }
}

/// Adds the run of a batch of requests of `shapes` (everything but the weights) to `need`: one
/// K/V pool with a region per request, passes over every request's rows at once, each
/// request's schedule, state, trace and (device-resident) plans, and a `--image` picture of
/// `image_px` pixels drawn one at a time. Every sized part is the sum of the requests' (a
/// batch's pass is its requests' passes side by side, SPEC §8); the fixed
/// overheads are counted once.
pub fn add_batch(
    need: &mut Need,
    cfg: &Config,
    shapes: &[GenShape],
    target: Target,
    image_px: u64,
) -> Result<()> {
    let mut t = RunParts::default();
    for shape in shapes {
        t = t.plus(RunParts::of(cfg, shape)?)?;
    }
    let (layers, kv) = (cfg.n_layers as u64, cfg.kv_dim() as u64);
    let branch_rows = [t.text_rows, t.image_rows];
    // Head: gathered rows, their norm, the logits, in the response branch's width and
    // vocabulary (the workspace's head is sized for the logits branch); each request's ban
    // mask and results.
    let head = shapes.iter().try_fold(0u64, |acc, shape| {
        let (d, v) = (
            cfg.d_model(shape.response) as u64,
            cfg.vocab(shape.response) as u64,
        );
        let rows = mul(shape.n_seqs, shape.max_query)?;
        add(
            acc,
            sum_of_products(&[&[rows, 2, d, 4], &[rows, v, 4], &[1, v], &[rows, 16]])?,
        )
    })?;
    let rows = add(t.text_rows, t.image_rows)?;
    let plan_pass = sum_of_products(&[&[rows, PLAN_BYTES_PER_ROW], &[t.keys, PLAN_BYTES_PER_KEY]])?;
    let bookkeeping = add(t.bookkeeping, mul(image_px, 8)?)?;
    let slots = t.slots;
    need.host("fixed overhead", FIXED_OVERHEAD);
    need.host("schedule, decode state, trace and outputs", bookkeeping);
    match target {
        Target::Cpu => {
            let (threads, splits) = cpu_threads_and_splits();
            need.host(
                format!("K/V pool ({} slots)", human_count(slots)),
                sum_of_products(&[&[2, layers, slots, kv, 4]])?,
            );
            need.host("RoPE table", rope_table_bytes(cfg, slots)?);
            need.host(
                "activations",
                add(activation_bytes(cfg, branch_rows, splits)?, head)?,
            );
            need.host("plans", plan_pass);
            need.host(
                "the last layer's logits rows",
                tail_bytes(cfg, t.logits_rows, t.keys, splits)?,
            );
            need.host("per-thread scratch", mul(threads, THREAD_SCRATCH)?);
        }
        Target::Cuda { attn_workers } => {
            need.device(
                format!("K/V pool ({} slots)", human_count(slots)),
                sum_of_products(&[&[2, layers, slots, kv, 2]])?,
            );
            need.device("RoPE table", rope_table_bytes(cfg, slots)?);
            need.device(
                "activations",
                add(cuda_activation_bytes(cfg, branch_rows)?, head)?,
            );
            // A device-resident run uploads every step's plan up front, and keeps their host
            // copies (its program) while it runs; while the batch's program is built from the
            // requests' programs, both are alive. Each plan keeps its attention split
            // workspace; the batch runs as many steps as its longest request.
            need.device("step plans", t.programs);
            need.host("step plans", mul(2, t.programs)?);
            let plans =
                (shapes.iter()).try_fold(0u64, |most, s| add(s.steps, 1).map(|p| most.max(p)))?;
            need.device(
                "attention split workspaces",
                cuda_split_bytes(cfg, branch_rows, plans, attn_workers)?,
            );
            // The head's product: every request's logits rows (one branch per batch).
            let head_warmup = shapes.iter().try_fold(0u64, |most, s| {
                let b = s.response;
                let w = cuda_head_warmup_bytes(
                    t.logits_rows,
                    cfg.d_model(b) as u64,
                    cfg.vocab(b) as u64,
                )?;
                Ok::<u64, Error>(most.max(w))
            })?;
            need.device(
                "matrix-product warm-up (transient)",
                cuda_warmup_bytes(cfg, branch_rows)?.max(head_warmup),
            );
            need.device("device overhead", DEVICE_OVERHEAD);
        }
    }
    Ok(())
}

/// Adds one `forward` pass over `rows` rows (`[text, image]`, one sequence, every row a key of
/// every other) with `logits_rows` logits rows of vocabulary `vocab` to `need`.
pub fn add_forward(
    need: &mut Need,
    cfg: &Config,
    rows: [u64; 2],
    logits_rows: u64,
    vocab: u64,
    target: Target,
) -> Result<()> {
    let all = add(rows[0], rows[1])?;
    let (layers, kv) = (cfg.n_layers as u64, cfg.kv_dim() as u64);
    let d_max = cfg.d_text.max(cfg.d_image) as u64;
    // Head and the output tensor, its host copy and its file bytes.
    let head = sum_of_products(&[
        &[logits_rows, 2 * d_max + vocab, 4],
        &[logits_rows, vocab, 12],
    ])?;
    let plan = sum_of_products(&[&[all, PLAN_BYTES_PER_ROW], &[all, PLAN_BYTES_PER_KEY]])?;
    need.host("fixed overhead", FIXED_OVERHEAD);
    need.host("plan and logits output", add(plan, head)?);
    let pool = |bytes: u64| sum_of_products(&[&[2, layers, all, kv, bytes]]);
    match target {
        Target::Cpu => {
            let (threads, splits) = cpu_threads_and_splits();
            need.host(format!("K/V pool ({} slots)", human_count(all)), pool(4)?);
            need.host("RoPE table", rope_table_bytes(cfg, all)?);
            need.host("activations", activation_bytes(cfg, rows, splits)?);
            need.host(
                "the last layer's logits rows",
                tail_bytes(cfg, logits_rows, all, splits)?,
            );
            need.host("per-thread scratch", mul(threads, THREAD_SCRATCH)?);
        }
        Target::Cuda { attn_workers } => {
            need.device(format!("K/V pool ({} slots)", human_count(all)), pool(2)?);
            need.device("RoPE table", rope_table_bytes(cfg, all)?);
            need.device("activations", add(cuda_activation_bytes(cfg, rows)?, head)?);
            need.device(
                "attention split workspaces",
                cuda_split_bytes(cfg, rows, 1, attn_workers)?,
            );
            need.device(
                "matrix-product warm-up (transient)",
                cuda_warmup_bytes(cfg, rows)?.max(cuda_head_warmup_bytes(
                    logits_rows,
                    d_max,
                    vocab,
                )?),
            );
            need.device("device overhead", DEVICE_OVERHEAD);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("8gib"), Ok(8 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("0.5k"), Ok(512));
        assert_eq!(parse_bytes(" 2 kB "), Ok(2000));
        for bad in [
            "",
            "G",
            "1.2.3",
            "-1",
            "8X",
            "1e9",
            "99999999999999999999999P",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_bytes("16385P").unwrap_err().contains("2^64"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(43_028_772_864), "43.0 GB");
        assert_eq!(human_bytes(1_999_000), "2.00 MB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
        assert_eq!(human_count(10_757_193_216), "10,757,193,216");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(1000), "1,000");
    }

    #[test]
    fn overflowing_requests_are_out_of_memory_not_panics() {
        let cfg = Config::preset("tiny").unwrap();
        let shape = GenShape {
            response: Branch::Image,
            prompt: u64::MAX / 3,
            response_len: u64::MAX / 3,
            n_seqs: 2,
            steps: u64::MAX,
            max_query: u64::MAX,
            grid: Some((u64::MAX, 3)),
        };
        for target in [Target::Cpu, Target::Cuda { attn_workers: 264 }] {
            let mut need = Need::default();
            let e = add_generation(&mut need, &cfg, &shape, target, 0).unwrap_err();
            assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        }
    }

    /// `lavida-o` text-to-image (the default 32×32 grid, 64 steps, prompt 64, CFG) on an
    /// 80 GB H100 (264 concurrent attention CTAs at head_dim 128): `scripts/gpu-check`'s
    /// batch sweep runs 1, 2, 4, 8 and 16 requests, which must fit beside the weights, while 32
    /// (whose K/V pool alone is 73 GB) must not. Each part against its own arithmetic: the
    /// pool `2 · 32 layers · 4352 slots · 4096 · 2 B` per request, bf16 activations per row,
    /// f32 logits 8192 wide (the image vocabulary, not the text one's 127,378).
    #[test]
    fn lavida_o_batches_up_to_16_fit_an_h100() {
        let cfg = Config::preset("lavida-o").unwrap();
        // `request::Workload`'s t2i defaults (its shape; not imported: request sits above).
        let shape = GenShape {
            response: Branch::Image,
            prompt: 64,
            response_len: 1024,
            n_seqs: 2,
            steps: 64,
            max_query: crate::schedule::max_shift_count(1024, 64) as u64,
            grid: Some((32, 32)),
        };
        assert_eq!(shape.max_query, 76);
        let h100 = 80_000_000_000u64 - 1_000_000_000;
        let total = |b: usize| {
            let mut need = Need::default();
            let target = Target::Cuda { attn_workers: 264 };
            add_weights(&mut need, &cfg, target, WeightsFrom::Random).unwrap();
            add_batch(&mut need, &cfg, &vec![shape; b], target, 0).unwrap();
            let part = |what: &str| {
                (need.device.iter())
                    .filter(|p| p.what.starts_with(what))
                    .map(|p| p.bytes)
                    .sum::<u64>()
            };
            assert_eq!(part("K/V pool"), b as u64 * 2 * 32 * 4352 * 4096 * 2);
            let image_rows = b as u64 * 2 * (1024 + 64);
            let text_rows = b as u64 * 2 * 64;
            let per_image_row = 4 * 2048 + 2 * 2048 + 2 * 4096 + 4 * 4096 + 2 * 4096 + 6 * 8192;
            let per_text_row = 4 * 4096 + 2 * 4096 + 2 * 4096 + 4 * 4096 + 2 * 4096 + 6 * 12288;
            let logits_rows = b as u64 * 2 * 76;
            let head = logits_rows * (2 * 2048 + 8192) * 4 + b as u64 * 8192 + logits_rows * 16;
            assert_eq!(
                part("activations"),
                image_rows * per_image_row + text_rows * per_text_row + head
            );
            need.device_total().unwrap()
        };
        for b in [1, 2, 4, 8, 16] {
            let t = total(b);
            assert!(t <= h100, "batch {b} needs {} of 79 GB", human_bytes(t));
        }
        assert!(total(32) > h100);
    }
}

//! f32 CPU kernels on slices (row-major), each the oracle for its CUDA twin.
//!
//! Every function validates its slice lengths against the shape it is given and returns
//! [`Error::Input`] naming the argument and both sizes, so a glue-layer bug is a message, not a
//! panic or a silent out-of-bounds read. Work is split over rayon by rows, and every output row
//! is computed from its own inputs in a fixed order: results depend neither on the thread count
//! nor on the other rows of the call (which is what lets a request of a batch compute the same
//! bits as alone, SPEC §8; `matmul_t` below says why that holds for `sgemm`).

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use crate::bail_input;
use crate::contract::rng::{gumbel_of_word, seed_key};
use crate::contract::{REGISTER, SampleParams, Sampled, Tag, visible};
use crate::error::{Error, Result};

/// Multiply-adds below which one chunk of `matmul_t` is not worth a rayon task.
const MATMUL_MIN_CHUNK_MACS: usize = 1 << 16;

/// The random numbers of the kernels ([`crate::contract::rng`]), here beside their users.
pub use crate::contract::rng::{INIT_COUNTER_TAG, gumbel, init_uniform, philox4x32_10};

/// Elements per rayon task for the row-wise elementwise kernels (amortises task overhead).
const MIN_TASK_ELEMS: usize = 1 << 14;

/// `out[rows, n] = x[rows, k] · w[n, k]ᵀ` (or `+=` when `accumulate`). Multithreaded: the
/// output columns, i.e. the rows of `w` (contiguous), are cut into one block per thread, and the
/// rows of `x` too when there are more threads than column blocks; each task is one
/// `matrixmultiply::sgemm` call on its block. So each thread packs only the part of `w` it
/// multiplies, and a weight is packed once per call whatever the thread count (a row split had
/// every thread pack all of `w`, which dominated the few-row products of sparse steps). `w` is
/// read transposed through its strides, never copied. With `accumulate == false` the old
/// contents of `out` are never read (NaN there is harmless).
///
/// Every output element is the same bits whatever the rows around it and however the call is
/// split: `sgemm` (matrixmultiply 0.3) cuts `k` into fixed blocks of 256, sums each block in one
/// accumulator per element in `k` order with the same micro-kernel whether the element sits in
/// a full tile or an edge tile (which the masked path only copies out), and adds the blocks to
/// the output in order. So a row computes alone exactly what it computes in a batch
/// (`tests/batch.rs` checks it against 1 to 8 threads and single rows); batches cost nothing
/// here.
pub fn matmul_t(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    if matmul_trivial(x, rows, k, w, n, out, accumulate)? {
        return Ok(());
    }

    let tasks = product_tasks(rows, n, k);
    if tasks == 1 {
        gemm_block(x, rows, k, w, n, out, accumulate);
        return Ok(());
    }
    // Column blocks of whole 16-column groups (matrixmultiply's widest micro-tile), then row
    // blocks when more threads than column blocks remain.
    let col_groups = tasks.min(n.div_ceil(16));
    let cols_per = n.div_ceil(16).div_ceil(col_groups) * 16;
    let row_groups = tasks.div_ceil(col_groups).min(rows);
    let rows_per = rows.div_ceil(row_groups);
    let blocks: Vec<(usize, usize)> = (0..rows)
        .step_by(rows_per)
        .flat_map(|r0| (0..n).step_by(cols_per).map(move |c0| (r0, c0)))
        .collect();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    blocks.par_iter().for_each(|&(r0, c0)| {
        let (m, nc) = (rows_per.min(rows - r0), cols_per.min(n - c0));
        let x_b = &x[r0 * k..(r0 + m) * k];
        let w_b = &w[c0 * k..(c0 + nc) * k];
        // SAFETY: the blocks `(r0..r0+m) × (c0..c0+nc)` tile the `rows × n` output without
        // overlap, so the tasks write disjoint elements of `out`, which `out_ptr` points to and
        // which outlives the `for_each` (a unique borrow held across it). The view below covers
        // exactly the block: element (i, j) of it is out[(r0 + i)·n + c0 + j], all < rows·n.
        unsafe {
            let c = out_ptr.get().add(r0 * n + c0);
            matrixmultiply::sgemm(
                m,
                k,
                nc,
                1.0,
                x_b.as_ptr(),
                k as isize,
                1,
                w_b.as_ptr(),
                1,
                k as isize,
                if accumulate { 1.0 } else { 0.0 },
                c,
                n as isize,
                1,
            );
        }
    });
    Ok(())
}

/// Rayon tasks for a product of `rows × n × k` multiply-adds: one per thread, none of fewer
/// than [`MATMUL_MIN_CHUNK_MACS`] (every CPU product splits by this rule).
pub(crate) fn product_tasks(rows: usize, n: usize, k: usize) -> usize {
    let macs = rows.saturating_mul(n).saturating_mul(k);
    rayon::current_num_threads()
        .min(macs.div_ceil(MATMUL_MIN_CHUNK_MACS))
        .max(1)
}

/// The checks and the empty cases both matmul variants share: errors on sizes that do not
/// match; `Ok(true)` when nothing is left to compute (no rows or columns, or `k == 0`, an empty
/// sum: `out` zeroed unless accumulating), which also keeps the variants' chunk sizes non-zero.
fn matmul_trivial(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) -> Result<bool> {
    check_len("matmul_t", "x", x.len(), &[("rows", rows), ("k", k)])?;
    check_len("matmul_t", "w", w.len(), &[("n", n), ("k", k)])?;
    check_len("matmul_t", "out", out.len(), &[("rows", rows), ("n", n)])?;
    if rows == 0 || n == 0 {
        return Ok(true);
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return Ok(true);
    }
    Ok(false)
}

/// A raw pointer the tasks of one call share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used inside `matmul_t`, whose tasks write disjoint elements through it while the
// buffer is uniquely borrowed by the call.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The previous `matmul_t`, kept as the reference the column split is measured against
/// (`benches/cpu.rs`, `docs/CPU.md`): `matrixmultiply::sgemm` per chunk, rows split over the
/// threads (each thread packs all of `w`), or the columns of each row when there are fewer rows
/// than threads. Same contract as [`matmul_t`].
#[doc(hidden)]
pub fn matmul_t_row_split(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    if matmul_trivial(x, rows, k, w, n, out, accumulate)? {
        return Ok(());
    }
    let chunks = product_tasks(rows, n, k);
    if chunks == 1 {
        gemm_block(x, rows, k, w, n, out, accumulate);
    } else if rows >= chunks {
        let rows_per = rows.div_ceil(chunks);
        out.par_chunks_mut(rows_per * n)
            .zip(x.par_chunks(rows_per * k))
            .for_each(|(out_b, x_b)| gemm_block(x_b, x_b.len() / k, k, w, n, out_b, accumulate));
    } else {
        let cols_per = n.div_ceil(chunks.div_ceil(rows));
        out.par_chunks_mut(n)
            .zip(x.par_chunks(k))
            .for_each(|(out_row, x_row)| {
                out_row
                    .par_chunks_mut(cols_per)
                    .zip(w.par_chunks(cols_per * k))
                    .for_each(|(out_b, w_b)| {
                        gemm_block(x_row, 1, k, w_b, out_b.len(), out_b, accumulate)
                    });
            });
    }
    Ok(())
}

/// One contiguous block on the calling thread through `matrixmultiply::sgemm`: `out[m, nc] (+)=
/// x[m, k] · w[nc, k]ᵀ` (the tiled attention, the CUDA kernel's twin, calls it inside its own
/// parallel work items).
pub(crate) fn gemm_block(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    nc: usize,
    out: &mut [f32],
    acc: bool,
) {
    assert!(x.len() == m * k && w.len() == nc * k && out.len() == m * nc);
    let beta = if acc { 1.0 } else { 0.0 };
    // Slice lengths are at most isize::MAX elements, so these strides fit.
    let (k_s, nc_s) = (k as isize, nc as isize);
    // SAFETY: the assert above makes every element sgemm touches in bounds: A = x is m×k with
    // strides (k, 1), B = wᵀ is k×nc with strides (1, k) (element (p, j) is w[j·k + p]), and
    // C = out is m×nc with strides (nc, 1). `out` is a unique borrow, so C aliases neither A nor
    // B, and C's strides address distinct elements. matrixmultiply with beta = 0 writes C
    // without reading it.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            nc,
            1.0,
            x.as_ptr(),
            k_s,
            1,
            w.as_ptr(),
            1,
            k_s,
            beta,
            out.as_mut_ptr(),
            nc_s,
            1,
        );
    }
}

/// `out = x / sqrt(mean(x²) + eps) · w`, per row of width `d = w.len()`. The sum of squares is
/// accumulated in f64 (the oracle should be more accurate than the f32 kernel it checks); the
/// scaling is f32: `(x · inv_rms) · w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let d = w.len();
    if d == 0 {
        bail_input!("rmsnorm: w is empty (row width 0)");
    }
    if !x.len().is_multiple_of(d) {
        bail_input!(
            "rmsnorm: x has {} elements, not a multiple of the width d = {d}",
            x.len()
        );
    }
    if out.len() != x.len() {
        bail_input!("rmsnorm: out has {} elements, x has {}", out.len(), x.len());
    }
    if !(eps.is_finite() && eps > 0.0) {
        bail_input!("rmsnorm: eps ({eps}) must be finite and > 0");
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(rows_per_task(d))
        .for_each(|(o, xr)| {
            let ss: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let inv = (1.0 / (ss / d as f64 + f64::from(eps)).sqrt()) as f32;
            for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        });
    Ok(())
}

/// RoPE in place on `x [rows, n_heads·head_dim]` (head-major), `rows = positions.len()`.
/// For `i < head_dim/2`, `θ_i = pos · theta^(-2i/head_dim)`, computed in f64 (in f32 the angle
/// at positions in the thousands would be off by ~1e-4 rad), then the pair
/// `(a, b) = (x_i, x_{i+head_dim/2})` → `(a·cos θ − b·sin θ, a·sin θ + b·cos θ)` in f32.
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    theta: f64,
) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail_input!("rope: head_dim ({head_dim}) must be even and > 0");
    }
    if !(theta.is_finite() && theta > 0.0) {
        bail_input!("rope: theta ({theta}) must be finite and > 0");
    }
    let rows = positions.len();
    check_len(
        "rope",
        "x",
        x.len(),
        &[("rows", rows), ("n_heads", n_heads), ("head_dim", head_dim)],
    )?;
    let width = n_heads * head_dim;
    if width == 0 {
        return Ok(());
    }
    let inv_freq = crate::contract::rope::inv_freq(head_dim, theta);
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .with_min_len(rows_per_task(width))
        .for_each(|(row, &pos)| {
            let cos_sin = rope_angles(&inv_freq, pos);
            rope_heads(row, head_dim, &cos_sin);
        });
    Ok(())
}

/// `(cos θ_i, sin θ_i)` at `pos` for the frequencies of [`crate::contract::rope::inv_freq`].
pub(crate) fn rope_angles(inv_freq: &[f64], pos: u32) -> Vec<(f32, f32)> {
    inv_freq
        .iter()
        .map(|&f| crate::contract::rope::cos_sin(pos, f))
        .collect()
}

/// RoPE of one row's heads (`row` is whole heads of `head_dim`), the arithmetic of [`rope`].
pub(crate) fn rope_heads(row: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &(c, s)) in lo.iter_mut().zip(hi).zip(cos_sin) {
            let (va, vb) = (*a, *b);
            *a = va * c - vb * s;
            *b = va * s + vb * c;
        }
    }
}

/// `out = silu(gate) ⊙ up`, `silu(g) = g / (1 + exp(-g))`, in f32 (for very negative `g`,
/// `exp(-g)` overflows to inf and silu is −0, the right limit).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    if up.len() != gate.len() {
        bail_input!(
            "swiglu: up has {} elements, gate has {}",
            up.len(),
            gate.len()
        );
    }
    if out.len() != gate.len() {
        bail_input!(
            "swiglu: out has {} elements, gate has {}",
            out.len(),
            gate.len()
        );
    }
    let arch = Arch::new();
    out.par_chunks_mut(MIN_TASK_ELEMS)
        .zip(
            gate.par_chunks(MIN_TASK_ELEMS)
                .zip(up.par_chunks(MIN_TASK_ELEMS)),
        )
        .for_each(|(o, (g, u))| arch.dispatch(Silu { g, u, o }));
    Ok(())
}

/// Lanes of [`silu_mul_lanes`] (one AVX-512 register, two AVX2).
const SILU_LANES: usize = 16;

/// `o = silu(g) · u` over slices of one length, [`SILU_LANES`] at a time (the last chunk
/// padded), vectorised for the CPU's widest instructions.
struct Silu<'a> {
    g: &'a [f32],
    u: &'a [f32],
    o: &'a mut [f32],
}

impl WithSimd for Silu<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let mut g = self.g.chunks_exact(SILU_LANES);
        let mut u = self.u.chunks_exact(SILU_LANES);
        let mut o = self.o.chunks_exact_mut(SILU_LANES);
        for ((g, u), o) in (&mut g).zip(&mut u).zip(&mut o) {
            let o: &mut [f32; SILU_LANES] = o.try_into().expect("lanes");
            silu_mul_lanes(
                g.try_into().expect("lanes"),
                u.try_into().expect("lanes"),
                o,
            );
        }
        let (g, u, o) = (g.remainder(), u.remainder(), o.into_remainder());
        if !o.is_empty() {
            let (mut gl, mut ul, mut ol) =
                ([0.0; SILU_LANES], [0.0; SILU_LANES], [0.0; SILU_LANES]);
            gl[..g.len()].copy_from_slice(g);
            ul[..u.len()].copy_from_slice(u);
            silu_mul_lanes(&gl, &ul, &mut ol);
            o.copy_from_slice(&ol[..o.len()]);
        }
    }
}

/// `silu(g) · u = g / (1 + exp(−g)) · u` per lane, the arithmetic of [`swiglu`]: `exp` by
/// [`exp_lanes`], then one add, one division, one product in f32.
#[inline(always)]
fn silu_mul_lanes(g: &[f32; SILU_LANES], u: &[f32; SILU_LANES], o: &mut [f32; SILU_LANES]) {
    let mut e = g.map(|g| -g);
    exp_lanes(&mut e);
    for i in 0..SILU_LANES {
        o[i] = g[i] / (1.0 + e[i]) * u[i];
    }
}

/// `1.5 · 2^23`: `t = x + ROUND_TO_INT` rounds `x` (|x| < 2^22) to the nearest integer `n`,
/// which `t`'s low mantissa bits then hold as `n + 2^22` (see [`times_pow2`]).
pub(crate) const ROUND_TO_INT: f32 = 12_582_912.0;

/// `p · 2^n` for the `n` that `t = x + ROUND_TO_INT` holds: `n << 23` added to `p`'s exponent
/// bits (exact while the result stays a normal number; the callers clamp `x` for that).
#[inline(always)]
pub(crate) fn times_pow2(p: f32, t: f32) -> f32 {
    let n_bits = t.to_bits().wrapping_sub(ROUND_TO_INT.to_bits()) << 23;
    f32::from_bits(p.to_bits().wrapping_add(n_bits))
}

/// `exp(x)` per lane, within 1 ulp: `x = n·ln 2 + r` (`n` the nearest integer to
/// `x·log2 e`, `r` by two FMAs with ln 2 split in a high and a low part, `|r| ≤ ln 2 / 2`), then
/// `2^n · p(r)` with `p` the degree-7 Taylor polynomial of `exp` (truncation below 6e-9). Past
/// 88 it is +inf, below −86 zero (the true value is below 2^−124), NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_lanes(x: &mut [f32; SILU_LANES]) {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 to 16 significant bits: n · LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    const C: [f32; 8] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    for v in x.iter_mut() {
        let xc = v.clamp(-86.0, 88.0);
        let t = xc.mul_add(std::f32::consts::LOG2_E, ROUND_TO_INT);
        let n = t - ROUND_TO_INT;
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
        let mut p = C[7];
        for &c in C[..7].iter().rev() {
            p = p.mul_add(r, c);
        }
        let y = times_pow2(p, t);
        *v = if *v > 88.0 {
            f32::INFINITY
        } else if *v < -86.0 {
            0.0
        } else if v.is_nan() {
            *v
        } else {
            y
        };
    }
}

/// [`swiglu`] on a fused `[rows, 2f]` gate|up matrix (gate columns first) into `out [rows, f]`,
/// row by row without copying the halves out.
pub fn swiglu_fused(gate_up: &[f32], f: usize, out: &mut [f32]) -> Result<()> {
    if f == 0 || gate_up.len() != 2 * out.len() || !out.len().is_multiple_of(f) {
        bail_input!(
            "swiglu: gate|up has {} elements, out {} (width {f})",
            gate_up.len(),
            out.len()
        );
    }
    let arch = Arch::new();
    out.par_chunks_mut(f)
        .zip(gate_up.par_chunks(2 * f))
        .with_min_len(rows_per_task(2 * f))
        .for_each(|(o, gu)| {
            let (g, u) = gu.split_at(f);
            arch.dispatch(Silu { g, u, o });
        });
    Ok(())
}

/// `out[i] = table[ids[i]]` (`table` is `[rows_table, d]`), or `register` (length `d`) where
/// `ids[i] == REGISTER`. An id ≥ `rows_table` is an error naming the row index and the id.
pub fn embed(
    table: &[f32],
    d: usize,
    register: &[f32],
    ids: &[u32],
    out: &mut [f32],
) -> Result<()> {
    if d == 0 {
        bail_input!("embed: width d is 0");
    }
    if !table.len().is_multiple_of(d) {
        bail_input!(
            "embed: table has {} elements, not a multiple of d = {d}",
            table.len()
        );
    }
    if register.len() != d {
        bail_input!(
            "embed: register has {} elements, expected d = {d}",
            register.len()
        );
    }
    check_len("embed", "out", out.len(), &[("ids", ids.len()), ("d", d)])?;
    let rows_table = table.len() / d;
    // Validate first so that `out` is untouched on error.
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id != REGISTER && id as usize >= rows_table)
    {
        bail_input!("embed: ids[{i}] = {id} is out of range for a table of {rows_table} rows");
    }
    out.par_chunks_mut(d)
        .zip(ids.par_iter())
        .with_min_len(rows_per_task(d))
        .for_each(|(o, &id)| {
            let src = if id == REGISTER {
                register
            } else {
                let r = id as usize;
                &table[r * d..(r + 1) * d]
            };
            o.copy_from_slice(src);
        });
    Ok(())
}

/// The sampler pass (SPEC §4, mask-aware softmax form (b)) over `logits [r, vocab]`.
///
/// `n = p.positions.len()`; `r` is `2n` with guidance `g` (rows `0..n` conditional, `n..2n`
/// unconditional, row `i` paired with row `n+i`) and `n` without. For each sampled row `i`:
/// `l_v = (1+g)·cond_v − g·uncond_v` (or the row itself); banned ids are skipped; with `τ > 0`
/// the score is `l_v/τ + gumbel(seed, v, positions[i], step, request)`, with `τ = 0` it is `l_v`;
/// the token is the argmax of the score, ties to the lower id. With `τ' = τ` (or 1 when `τ = 0`):
/// `lse = ln Σ_allowed exp(l_v/τ')`, `confidence = exp(l_token/τ' − lse)`.
///
/// Like the CUDA kernel, each row's logits are read once: the CFG combine, ban test, finiteness
/// check, running argmax and an online log-sum-exp (running max, sum rescaled when the max grows)
/// all happen in one loop over the vocabulary, which walks ids in groups of four so that one
/// Philox call serves four ids. `l_v/τ'` is f32; the exp-sum and the final `ln`/`exp` are f64.
/// Rows are processed in parallel.
///
/// Errors: wrong row count, non-finite guidance or a negative/non-finite temperature, a banned id
/// ≥ `vocab`, every id banned, and a non-finite `l_v` of any id, banned or not (NaN, ±inf, or
/// `l_v/τ` overflowing).
pub fn sample_rows(logits: &[f32], vocab: usize, p: &SampleParams) -> Result<Vec<Sampled>> {
    let n = p.positions.len();
    if vocab == 0 || vocab > u32::MAX as usize {
        bail_input!("sample_rows: vocab ({vocab}) must be in 1..=u32::MAX (ids are u32)");
    }
    let rows = match p.guidance {
        Some(g) if !g.is_finite() => bail_input!("sample_rows: guidance ({g}) is not finite"),
        Some(_) => 2 * n,
        None => n,
    };
    if !logits.len().is_multiple_of(vocab) || logits.len() / vocab != rows {
        let cfg = if p.guidance.is_some() {
            " × 2 for CFG"
        } else {
            ""
        };
        bail_input!(
            "sample_rows: logits has {} elements, expected {rows} rows ({n} positions{cfg}) \
             × vocab {vocab} = {}",
            logits.len(),
            rows.saturating_mul(vocab)
        );
    }
    let tau = p.temperature;
    if !(tau.is_finite() && tau >= 0.0) {
        bail_input!("sample_rows: temperature ({tau}) must be finite and >= 0");
    }
    let mut banned = vec![false; vocab];
    for &id in &p.banned {
        match banned.get_mut(id as usize) {
            Some(b) => *b = true,
            None => bail_input!("sample_rows: banned id {id} is out of range for vocab {vocab}"),
        }
    }
    if banned.iter().all(|&b| b) {
        bail_input!("sample_rows: every id of the vocabulary ({vocab}) is banned");
    }

    let row_params = RowParams {
        vocab,
        banned: &banned,
        tau,
        guidance: p.guidance,
        key: seed_key(p.seed),
        step: p.step,
        request: p.request,
    };
    (0..n)
        .into_par_iter()
        .map(|i| {
            let cond = &logits[i * vocab..(i + 1) * vocab];
            let uncond = p
                .guidance
                .map(|_| &logits[(n + i) * vocab..(n + i + 1) * vocab]);
            sample_row(&row_params, i, cond, uncond, p.positions[i])
        })
        .collect()
}

/// What [`sample_row`] needs besides the row itself.
struct RowParams<'a> {
    vocab: usize,
    banned: &'a [bool],
    tau: f32,
    guidance: Option<f32>,
    key: [u32; 2],
    step: u32,
    request: u32,
}

/// One row of [`sample_rows`]; `i` is only for error messages.
fn sample_row(
    p: &RowParams,
    i: usize,
    cond: &[f32],
    uncond: Option<&[f32]>,
    position: u32,
) -> Result<Sampled> {
    let noisy = p.tau > 0.0;
    let mut best: Option<(u32, f32, f32)> = None; // (id, score, l/τ')
    let mut max = f32::NEG_INFINITY; // running max of l/τ' over allowed ids
    let mut sum = 0f64; // Σ exp(l/τ' − max) over allowed ids

    for base in (0..p.vocab).step_by(4) {
        let words = if noisy {
            philox4x32_10([(base / 4) as u32, position, p.step, p.request], p.key)
        } else {
            [0; 4]
        };
        for (j, &word) in words.iter().enumerate().take(p.vocab - base) {
            let v = base + j;
            let l = match (p.guidance, uncond) {
                (Some(g), Some(u)) => (1.0 + g) * cond[v] - g * u[v],
                _ => cond[v],
            };
            // `l / τ` rather than `l · (1/τ)`: the documented score, bit for bit.
            let s = if noisy { l / p.tau } else { l };
            if !s.is_finite() {
                return Err(non_finite(i, v, l, p));
            }
            if p.banned[v] {
                continue;
            }
            let score = if noisy { s + gumbel_of_word(word) } else { s };
            if best.is_none_or(|(_, b, _)| score > b) {
                best = Some((v as u32, score, s));
            }
            if s > max {
                sum = sum * (f64::from(max) - f64::from(s)).exp() + 1.0;
                max = s;
            } else {
                sum += (f64::from(s) - f64::from(max)).exp();
            }
        }
    }
    // An allowed id exists (checked by the caller) and every `s` is finite, so `best` is set
    // and `sum >= 1`.
    let (token, _, s_token) = best.expect("sample_rows checked that some id is allowed");
    let lse = f64::from(max) + sum.ln();
    Ok(Sampled {
        token,
        confidence: (f64::from(s_token) - lse).exp() as f32,
        lse: lse as f32,
    })
}

/// The error for a non-finite `l/τ'` at row `i`, id `v`.
fn non_finite(i: usize, v: usize, l: f32, p: &RowParams) -> Error {
    let from = if p.guidance.is_some() {
        " (after the CFG combine)"
    } else {
        ""
    };
    if l.is_finite() {
        Error::Input(format!(
            "sample_rows: logit {l} / temperature {} overflows at row {i}, id {v}",
            p.tau
        ))
    } else {
        Error::Input(format!(
            "sample_rows: non-finite logit at row {i}, id {v}{from}: {l}"
        ))
    }
}

/// Which columns of a score row [`masked_softmax`] may use.
#[derive(Debug, Clone, Copy)]
pub enum SoftmaxMask<'a> {
    /// SPEC §3: column `c` of row `r` is visible iff `visible(row_tags[r], col_tags[c], joint)`.
    Rule {
        /// Tag of each row (`n_rows` entries).
        row_tags: &'a [Tag],
        /// Tag of each column (`n_cols` entries).
        col_tags: &'a [Tag],
        /// Cross-branch (joint) layer: branches see each other.
        joint: bool,
    },
    /// Row `r` sees the columns `0..prefix[r]` (`n_rows` entries, each at most `n_cols`).
    Prefix(&'a [u32]),
}

/// Mask-aware row softmax (SPEC §5, form (a)); the CPU twin of `sl_masked_softmax`.
///
/// `scores` and `out` are `[n_rows, n_cols]`. For each row, with `x_c = scale · scores[r, c]`
/// (f32) over the visible columns (`mask`): `out[r, c] = exp(x_c − max x) / Σ exp(x − max x)`;
/// hidden columns get 0 and their scores are never read. A row with no visible column, or whose
/// visible `x` are all −inf, is all zeros (never NaN). The terms are f32 `exp`, their sum is
/// f64. NaN or +inf scores are not errors: they propagate as NaN into their row, as on the GPU.
/// Rows are processed in parallel; the result does not depend on the thread count.
///
/// Errors: wrong `scores`/`out`/tag/prefix lengths, a prefix longer than `n_cols` (naming the
/// row), a non-finite `scale`.
pub fn masked_softmax(
    scores: &[f32],
    n_rows: usize,
    n_cols: usize,
    mask: SoftmaxMask,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let shape = [("n_rows", n_rows), ("n_cols", n_cols)];
    check_len("masked_softmax", "scores", scores.len(), &shape)?;
    check_len("masked_softmax", "out", out.len(), &shape)?;
    if !scale.is_finite() {
        bail_input!("masked_softmax: scale ({scale}) is not finite");
    }
    match mask {
        SoftmaxMask::Rule {
            row_tags, col_tags, ..
        } => {
            check_len("masked_softmax", "row_tags", row_tags.len(), &shape[..1])?;
            check_len("masked_softmax", "col_tags", col_tags.len(), &shape[1..])?;
        }
        SoftmaxMask::Prefix(prefix) => {
            check_len("masked_softmax", "prefix", prefix.len(), &shape[..1])?;
            if let Some((r, &len)) = prefix
                .iter()
                .enumerate()
                .find(|&(_, &len)| len as usize > n_cols)
            {
                bail_input!("masked_softmax: prefix[{r}] = {len} exceeds n_cols = {n_cols}");
            }
        }
    }
    if n_rows == 0 || n_cols == 0 {
        return Ok(());
    }

    out.par_chunks_mut(n_cols)
        .zip(scores.par_chunks(n_cols))
        .enumerate()
        .with_min_len(rows_per_task(n_cols))
        .for_each(|(r, (o, row))| {
            let vis = |c: usize| match mask {
                SoftmaxMask::Rule {
                    row_tags,
                    col_tags,
                    joint,
                } => visible(row_tags[r], col_tags[c], joint),
                SoftmaxMask::Prefix(prefix) => c < prefix[r] as usize,
            };
            let max = (0..n_cols)
                .filter(|&c| vis(c))
                .map(|c| scale * row[c])
                .fold(f32::NEG_INFINITY, f32::max);
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                return; // nothing visible (or only −inf): zeros
            }
            let mut sum = 0f64;
            for c in (0..n_cols).filter(|&c| vis(c)) {
                let e = (scale * row[c] - max).exp();
                o[c] = e;
                sum += f64::from(e);
            }
            // `sum >= 1` unless a NaN reached it (the max's own term is exp(0)).
            for c in (0..n_cols).filter(|&c| vis(c)) {
                o[c] = (f64::from(o[c]) / sum) as f32;
            }
        });
    Ok(())
}

/// Checks `got == Π dims`, naming the op, the argument and the shape.
fn check_len(op: &str, arg: &str, got: usize, dims: &[(&str, usize)]) -> Result<()> {
    let shape = dims
        .iter()
        .map(|(name, v)| format!("{name}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &(_, v)| acc.checked_mul(v));
    match expected {
        Some(e) if e == got => Ok(()),
        Some(e) => bail_input!("{op}: {arg} has {got} elements, expected [{shape}] = {e}"),
        None => bail_input!("{op}: {arg} shape [{shape}] overflows usize"),
    }
}

/// Rows per rayon task so that a task covers at least [`MIN_TASK_ELEMS`] elements.
pub(crate) fn rows_per_task(width: usize) -> usize {
    (MIN_TASK_ELEMS / width.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_len_names_argument_and_sizes() {
        let e = check_len("op", "x", 5, &[("rows", 2), ("k", 3)]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("x has 5") && msg.contains("rows=2, k=3") && msg.contains("= 6"));
        assert!(check_len("op", "x", 0, &[("a", usize::MAX), ("b", 2)]).is_err());
    }

    /// `exp_lanes` against f64 `exp` on a dense sweep of its range (every lane position), within
    /// 1 ulp of the true value (0.90 at worst on this sweep when written); its edges and special
    /// values as documented.
    #[test]
    fn exp_lanes_is_within_1_ulp_of_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -86.0f32;
        while x <= 88.0 {
            let mut lanes = [0.0f32; SILU_LANES];
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = x + i as f32 * 1e-3;
            }
            let xs = lanes;
            exp_lanes(&mut lanes);
            for (&xi, &got) in xs.iter().zip(&lanes) {
                if xi > 88.0 {
                    continue;
                }
                let want = f64::from(xi).exp();
                // An f32 ulp in the true value's binade: 2^(exponent − 23).
                let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
                worst = worst.max((f64::from(got) - want).abs() / ulp);
            }
            x += 0.0371;
        }
        assert!(worst <= 1.0, "worst error {worst} ulp");
        let mut special = [0.0f32; SILU_LANES];
        let cases = [
            f32::NEG_INFINITY,
            -87.0,
            88.5,
            f32::INFINITY,
            f32::NAN,
            0.0,
            -0.0,
        ];
        special[..cases.len()].copy_from_slice(&cases);
        exp_lanes(&mut special);
        assert_eq!(special[..4], [0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        assert!(special[4].is_nan());
        assert_eq!(special[5..7], [1.0, 1.0]);
    }

    /// The padded last chunk computes what a whole chunk does: `swiglu` of one slice equals
    /// `swiglu` of each of its elements alone, bit for bit.
    #[test]
    fn swiglu_values_do_not_depend_on_their_place() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.77).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut all = vec![0.0; 37];
        swiglu(&gate, &up, &mut all).unwrap();
        for i in 0..37 {
            let mut one = [0.0];
            swiglu(&gate[i..=i], &up[i..=i], &mut one).unwrap();
            assert_eq!(one[0].to_bits(), all[i].to_bits(), "element {i}");
        }
    }
}

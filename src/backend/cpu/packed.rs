//! `x · wᵀ` against a weight packed once, at load, into column panels: the CPU backend's
//! projections.
//!
//! [`PackedWeight::pack`] lays `w [n, k]` out as panels of [`PANEL`] output columns, each
//! `[k][PANEL]` (the `PANEL` values of one `k` index side by side, the columns past `n` zero), so
//! the micro-kernel reads a panel front to back. [`matmul_packed`] splits the rows of `x` over
//! the threads in whole blocks of [`MR`] rows (every thread reads the whole packed weight, which
//! nothing re-packs), and the panels too when there are fewer rows than that leaves threads a
//! block each. Per thread it walks panel by panel, each block of rows running the panel front to
//! back (`k·64` values: in L1 at the `small` preset's `k`, from L2 beyond): one FMA per (row,
//! column vector) per `k` index, the `x` value broadcast from its row in place.
//!
//! # Every element on its own
//! Each output element is one FMA chain over `k` in order from zero (then added to `out` when
//! accumulating), whatever the rows around it, the row block it falls in and the thread count,
//! so a request computes the same bits alone and in a batch (SPEC §8).

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::lines::Lines;
use super::ops::product_tasks;
use crate::bail_input;
use crate::error::Result;

/// Output columns per panel (four AVX-512 vectors; the memory bound counts with it).
pub const PANEL: usize = crate::memory::CPU_PACK_PANEL;

/// Rows per register block (six rows × four vectors of accumulators on AVX-512).
pub const MR: usize = 6;

/// A weight `w [n, k]` packed for [`matmul_packed`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `ceil(n / PANEL)` panels of `[k][PANEL]` values, each `k` index's on a cache line.
    data: Lines,
}

impl PackedWeight {
    /// Packs the row-major `w [n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<PackedWeight> {
        if Some(w.len()) != n.checked_mul(k) {
            bail_input!("pack: w has {} values, expected n {n} × k {k}", w.len());
        }
        let panels = n.div_ceil(PANEL);
        let mut data = Lines::filled(panels * k * PANEL, 0.0);
        if data.is_empty() {
            return Ok(PackedWeight { n, k, data });
        }
        data.par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for (j, w_row) in w.chunks_exact(k).skip(p * PANEL).take(PANEL).enumerate() {
                    for (kk, &v) in w_row.iter().enumerate() {
                        panel[kk * PANEL + j] = v;
                    }
                }
            });
        Ok(PackedWeight { n, k, data })
    }

    /// Output columns (rows of the unpacked `w`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the packed copy holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// `out[rows, n] = x[rows, k] · wᵀ` (or `+=` when `accumulate`) with `w` packed. With
/// `accumulate == false` the old contents of `out` are never read.
pub fn matmul_packed(
    x: &[f32],
    rows: usize,
    w: &PackedWeight,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let (n, k) = (w.n, w.k);
    if Some(x.len()) != rows.checked_mul(k) {
        bail_input!(
            "matmul: x has {} values, expected rows {rows} × k {k}",
            x.len()
        );
    }
    if Some(out.len()) != rows.checked_mul(n) {
        bail_input!(
            "matmul: out has {} values, expected rows {rows} × n {n}",
            out.len()
        );
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // Empty sums.
        if !accumulate {
            out.fill(0.0);
        }
        return Ok(());
    }
    let tasks = product_tasks(rows, n, k);
    // Rows in whole register blocks per task (the last may be short); when that leaves threads
    // idle (few rows), the panels are split too.
    let row_tasks = tasks.min(rows.div_ceil(MR));
    let rows_per = rows.div_ceil(row_tasks).div_ceil(MR) * MR;
    let n_panels = n.div_ceil(PANEL);
    let panel_tasks = (tasks / row_tasks).min(n_panels).max(1);
    let arch = Arch::new();
    if panel_tasks == 1 {
        out.par_chunks_mut(rows_per * n)
            .zip(x.par_chunks(rows_per * k))
            .for_each(|(out, x)| {
                arch.dispatch(Block {
                    x,
                    w,
                    panels: 0..n_panels,
                    out,
                    out_cols: n,
                    accumulate,
                })
            });
        return Ok(());
    }
    // Each (rows, panels) task fills a block of its own, copied into `out` after: `out` is
    // row-major, so column blocks are not slices of it. Only few rows get here (fewer than
    // `MR` per thread), so the blocks are small.
    let per = n_panels.div_ceil(panel_tasks);
    let blocks: Vec<(Range<usize>, Range<usize>)> = (0..rows)
        .step_by(rows_per)
        .flat_map(|r0| {
            (0..n_panels)
                .step_by(per)
                .map(move |p0| (r0..(r0 + rows_per).min(rows), p0..(p0 + per).min(n_panels)))
        })
        .collect();
    let filled: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|(rs, ps)| {
            let cols = n.min(ps.end * PANEL) - ps.start * PANEL;
            let mut block = vec![0.0f32; rs.len() * cols];
            arch.dispatch(Block {
                x: &x[rs.start * k..rs.end * k],
                w,
                panels: ps.clone(),
                out: &mut block,
                out_cols: cols,
                accumulate: false,
            });
            block
        })
        .collect();
    for ((rs, ps), block) in blocks.iter().zip(&filled) {
        let cols = block.len() / rs.len();
        for (src, r) in block.chunks_exact(cols).zip(rs.clone()) {
            let dst = &mut out[r * n + ps.start * PANEL..][..cols];
            // The same one addition to `out` as the direct path's write-back.
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
    Ok(())
}

/// One task: `out [m, out_cols] (+)= x [m, k] · wᵀ` over the columns of `panels` (`out`'s
/// column 0 is the first panel's first column; `out_cols` are the valid ones, below `n`).
struct Block<'a> {
    x: &'a [f32],
    w: &'a PackedWeight,
    panels: Range<usize>,
    out: &'a mut [f32],
    out_cols: usize,
    accumulate: bool,
}

impl WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Column chunks of NV vectors within a panel: chunks of 2 on AVX2 (6 × 2 accumulators
        // of its 16 registers; 6 × 4 there spilled accumulators to the stack on every FMA), of
        // 4 otherwise (one chunk on AVX-512: 6 × 4 of its 32 registers).
        match S::F32_LANES {
            8..16 => block::<S, 2>(simd, self),
            _ => block::<S, 4>(simd, self),
        }
    }
}

/// [`Block`]'s work with column chunks of `NV` vectors.
#[inline(always)]
fn block<S: Simd, const NV: usize>(simd: S, task: Block) {
    let Block {
        x,
        w,
        panels,
        out,
        out_cols,
        accumulate,
    } = task;
    let k = w.k;
    let col_base = panels.start * PANEL;
    let lanes = S::F32_LANES;
    let chunk = NV * lanes;
    let m = x.len() / k.max(1);
    for p in panels {
        let panel: &[S::f32s] = bytemuck::cast_slice(&w.data[p * k * PANEL..][..k * PANEL]);
        let vecs_per_k = PANEL / lanes;
        for c in (0..PANEL).step_by(chunk) {
            let col0 = p * PANEL + c - col_base;
            if col0 >= out_cols {
                break;
            }
            let v0 = c / lanes;
            let mut r0 = 0;
            macro_rules! block {
                ($b:expr, $r0:ident,) => {
                    micro::<S, { $b }, NV>(
                        simd,
                        &x[$r0 * k..],
                        k,
                        panel,
                        vecs_per_k,
                        v0,
                        &mut out[$r0 * out_cols..],
                        out_cols,
                        col0,
                        accumulate,
                    )
                };
            }
            in_blocks!(r0 < m, MR, block!());
        }
    }
}

/// `MR_ × NV` vectors of `Σ_kk x[r][kk] · panel[kk][v0 + v]` (rows `r` of `x`, stride `k`): one
/// FMA chain per element over `kk` in order; written (or added) to `out` columns `col0..`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<S: Simd, const MR_: usize, const NV: usize>(
    simd: S,
    x: &[f32],
    k: usize,
    panel: &[S::f32s],
    vecs_per_k: usize,
    v0: usize,
    out: &mut [f32],
    n: usize,
    col0: usize,
    accumulate: bool,
) {
    let mut regs = [[simd.splat_f32s(0.0); NV]; MR_];
    let xs: [&[f32]; MR_] = std::array::from_fn(|i| &x[i * k..][..k]);
    for kk in 0..k {
        let b = &panel[kk * vecs_per_k + v0..][..NV];
        for i in 0..MR_ {
            let a = simd.splat_f32s(xs[i][kk]);
            for u in 0..NV {
                regs[i][u] = simd.mul_add_f32s(a, b[u], regs[i][u]);
            }
        }
    }
    write(simd, &regs, out, n, col0, accumulate);
}

/// Writes (or adds) the block's columns `col0..` that lie below `n` into rows of `out` (stride
/// `n`). Whole vectors move as values (a slice view of the registers would keep them in memory
/// through the whole `k` loop).
#[inline(always)]
fn write<S: Simd, const NV: usize, const MR_: usize>(
    simd: S,
    regs: &[[S::f32s; NV]; MR_],
    out: &mut [f32],
    n: usize,
    col0: usize,
    accumulate: bool,
) {
    let width = NV * S::F32_LANES;
    if col0 + width <= n {
        for (i, reg) in regs.iter().enumerate() {
            let dst: &mut [S::f32s] = bytemuck::cast_slice_mut(&mut out[i * n + col0..][..width]);
            for u in 0..NV {
                dst[u] = if accumulate {
                    simd.add_f32s(dst[u], reg[u])
                } else {
                    reg[u]
                };
            }
        }
        return;
    }
    let cols = n - col0;
    for (i, reg) in regs.iter().enumerate() {
        let vals: [S::f32s; NV] = *reg;
        let vals: &[f32] = bytemuck::cast_slice(&vals[..]);
        let dst = &mut out[i * n + col0..][..cols];
        for (d, &v) in dst.iter_mut().zip(vals) {
            *d = if accumulate { *d + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// Runs `f` on a rayon pool of `threads` threads.
    fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// The f64 product, the oracle.
    fn naive(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|kk| f64::from(x[r * k + kk]) * f64::from(w[j * k + kk]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_the_f64_product_on_edge_shapes_and_accumulates() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(rows, k, n) in &[
            (1, 1, 1),
            (5, 3, 63),
            (7, 17, 64),
            (13, 64, 65),
            (96, 128, 200),
            (40, 256, 130),
        ] {
            let (x, w) = (random(rows * k, &mut rng), random(n * k, &mut rng));
            let p = PackedWeight::pack(&w, n, k).unwrap();
            assert!(p.bytes() as u64 <= (n.div_ceil(64) * 64 * k * 4) as u64);
            let want = naive(&x, rows, k, &w, n);
            // NaN in `out` must not leak into an overwrite.
            let mut out = vec![f32::NAN; rows * n];
            matmul_packed(&x, rows, &p, &mut out, false).unwrap();
            for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(g) - e).abs() <= 1e-5 * (k as f64).sqrt(),
                    "{rows}x{k}x{n} element {i}: {g} vs {e}"
                );
            }
            let base = random(rows * n, &mut rng);
            let mut acc = base.clone();
            matmul_packed(&x, rows, &p, &mut acc, true).unwrap();
            for i in 0..rows * n {
                assert_eq!(acc[i], base[i] + out[i], "{rows}x{k}x{n} accumulate {i}");
            }
        }
    }

    #[test]
    fn each_row_computes_the_same_bits_alone_and_on_any_thread_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let (rows, k, n) = (29, 96, 150);
        let (x, w) = (random(rows * k, &mut rng), random(n * k, &mut rng));
        let p = PackedWeight::pack(&w, n, k).unwrap();
        let mut all = vec![0.0; rows * n];
        matmul_packed(&x, rows, &p, &mut all, false).unwrap();
        for r in 0..rows {
            let mut one = vec![0.0; n];
            matmul_packed(&x[r * k..][..k], 1, &p, &mut one, false).unwrap();
            assert_eq!(one, all[r * n..][..n], "row {r} alone");
        }
        for threads in [1, 3] {
            let mut out = vec![0.0; rows * n];
            on_threads(threads, || {
                matmul_packed(&x, rows, &p, &mut out, false).unwrap()
            });
            assert_eq!(out, all, "{threads} threads");
        }
    }

    #[test]
    fn few_rows_split_the_panels_with_the_same_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // 5 rows over 3 panels (the last partial) on 4 threads: one row block, panels split.
        let (rows, k, n) = (5, 512, 150);
        let (x, w) = (random(rows * k, &mut rng), random(n * k, &mut rng));
        let p = PackedWeight::pack(&w, n, k).unwrap();
        let base = random(rows * n, &mut rng);
        let run = |threads: usize, accumulate: bool| {
            let mut out = if accumulate {
                base.clone()
            } else {
                vec![f32::NAN; rows * n]
            };
            on_threads(threads, || {
                matmul_packed(&x, rows, &p, &mut out, accumulate).unwrap()
            });
            out
        };
        for accumulate in [false, true] {
            let one = run(1, accumulate);
            assert_eq!(run(4, accumulate), one, "accumulate {accumulate}");
            assert_eq!(run(16, accumulate), one, "accumulate {accumulate}");
        }
        let want = naive(&x, rows, k, &w, n);
        for (i, (&g, &e)) in run(4, false).iter().zip(&want).enumerate() {
            assert!((f64::from(g) - e).abs() <= 1e-5 * (k as f64).sqrt(), "{i}");
        }
    }

    /// Every instruction set pulp may pick computes the same bits (one FMA chain per element),
    /// the scalar and AVX2 paths included, which an AVX-512 host never dispatches to.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for &(rows, k, n) in &[(7, 33, 63), (13, 64, 65), (6, 40, 100), (9, 17, 130)] {
            let (x, w) = (random(rows * k, &mut rng), random(n * k, &mut rng));
            let p = PackedWeight::pack(&w, n, k).unwrap();
            let mut want = vec![0.0; rows * n];
            matmul_packed(&x, rows, &p, &mut want, false).unwrap();
            fn whole_weight<'a>(
                x: &'a [f32],
                w: &'a PackedWeight,
                out: &'a mut [f32],
            ) -> Block<'a> {
                Block {
                    x,
                    w,
                    panels: 0..w.n.div_ceil(PANEL),
                    out_cols: w.n,
                    out,
                    accumulate: false,
                }
            }
            let mut got = vec![f32::NAN; rows * n];
            whole_weight(&x, &p, &mut got).with_simd(pulp::Scalar::new());
            assert_eq!(got, want, "scalar {rows}x{k}x{n}");
            #[cfg(target_arch = "x86_64")]
            if let Some(v3) = pulp::x86::V3::try_new() {
                let mut got = vec![f32::NAN; rows * n];
                whole_weight(&x, &p, &mut got).with_simd(v3);
                assert_eq!(got, want, "AVX2 {rows}x{k}x{n}");
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(v4) = pulp::x86::V4::try_new() {
                let mut got = vec![f32::NAN; rows * n];
                whole_weight(&x, &p, &mut got).with_simd(v4);
                assert_eq!(got, want, "AVX-512 {rows}x{k}x{n}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(PackedWeight::pack(&[0.0; 5], 2, 3).is_err());
        let p = PackedWeight::pack(&[0.0; 6], 2, 3).unwrap();
        let mut out = vec![0.0; 4];
        assert!(matmul_packed(&[0.0; 5], 2, &p, &mut out, false).is_err());
        assert!(matmul_packed(&[0.0; 6], 2, &p, &mut out[..3], false).is_err());
        assert!(matmul_packed(&[0.0; 6], 2, &p, &mut out, false).is_ok());
        // k = 0: empty sums, zeros (or `out` unchanged when accumulating).
        let p = PackedWeight::pack(&[], 3, 0).unwrap();
        let mut out = vec![f32::NAN; 6];
        matmul_packed(&[], 2, &p, &mut out, false).unwrap();
        assert_eq!(out, vec![0.0; 6]);
        out.fill(2.0);
        matmul_packed(&[], 2, &p, &mut out, true).unwrap();
        assert_eq!(out, vec![2.0; 6]);
    }
}

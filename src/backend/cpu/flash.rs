//! The CPU backend's attention: the same gathered-token attention as [`super::attention`] (same
//! inputs, same visibility rule, same results within SPEC §6), computed for speed on the CPU.
//! [`super::attention::attention_tiled`] stays the CUDA kernel's twin for the kernel tests;
//! this is what [`super::CpuBackend`] runs.
//!
//! # Work
//! One work item is `(sequence, query head, query tile of up to [`TILE_Q`] rows)`; items run in
//! parallel (rayon) and each walks its sequence's whole key list in key tiles of `tile_k` keys
//! (no split of the keys, so there is no merge). Per key tile:
//! 1. The tile's class for the query tile (the plan's key-tile summaries, as the kernel):
//!    Hidden tiles are skipped without reading K/V; full Visible tiles need no per-pair check;
//!    others get `visible` per pair.
//! 2. `S = Q·Kᵀ` through a register-blocked SIMD micro-kernel ([`pulp`]: AVX-512, AVX2+FMA or
//!    scalar, detected at run time): the query rows packed `[head_dim][MR]` once per item, the
//!    key tile gathered through the index list and packed `[head_dim][NR]` per panel of `NR` keys.
//! 3. Online softmax in base 2, vectorised over keys: scores scaled by
//!    `log2(e)/sqrt(head_dim)`, hidden pairs −inf, tile max, `p = 2^(s − m)` by a polynomial
//!    [`exp2_lanes`] 16 keys at a time with 16 partial sums, `acc` and `l` rescaled by
//!    `2^(m_old − m_new)`.
//! 4. `acc += P·V` with `V` read in place from the pool (one row of `head_dim` values per key,
//!    no copy), again a register-blocked SIMD micro-kernel.
//!
//! # Every row on its own
//! A row's result depends on its query, its sequence's keys (their order and tags) and `tile_k`
//! alone: each score is one FMA chain over `head_dim` in order, each `acc` element one FMA chain
//! over the keys in order, a row's max, sum and rescales read only its own scores, and a
//! skipped (Hidden) tile changes nothing a computed one would not (its `p` would all be exact
//! zeros: `acc · 1 + 0`). Neither the rows around it (the query tile, other sequences of the
//! batch), nor the thread count changes a bit (SPEC §8; `tests/batch.rs`).

use std::ops::Range;

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::attention::{AttnInputs, AttnShape};
use crate::bail_input;
use crate::contract::attn::{QueryDesc, TileClass, TileSummary, key_tile_summaries};
use crate::contract::{Tag, visible};
use crate::error::Result;

/// Query rows per work item.
pub const TILE_Q: usize = 64;

/// Keys per key tile ([`attention_flash`] uses it; tests pass others).
pub const TILE_K: usize = 128;

/// Lanes of the softmax's vector code (chunks of keys; 16 = one AVX-512 register, two AVX2).
const LANES: usize = 16;

/// Attention as [`super::attention::attention_tiled`] computes it: `out` `[rows, n_heads ·
/// head_dim]`, `lse` (optional) `[rows, n_heads]` natural-log, −inf (and a zero output) for a row
/// that sees no key. Key tiles of [`TILE_K`].
pub fn attention_flash(inp: &AttnInputs, out: &mut [f32], lse: Option<&mut [f32]>) -> Result<()> {
    attention_flash_with(inp, TILE_K, out, lse)
}

/// [`attention_flash`] with key tiles of `tile_k` keys (≥ 1).
pub fn attention_flash_with(
    inp: &AttnInputs,
    tile_k: usize,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    inp.validate()?;
    if tile_k == 0 {
        bail_input!("attention: tile_k must be at least 1");
    }
    let AttnShape {
        n_heads, head_dim, ..
    } = inp.shape;
    let (rows, q_dim) = (inp.rows(), inp.shape.q_dim());
    if out.len() != rows * q_dim {
        bail_input!(
            "attention: out has {} values, expected rows {rows} × {q_dim}",
            out.len()
        );
    }
    if let Some(lse) = &lse
        && lse.len() != rows * n_heads
    {
        bail_input!(
            "attention: lse has {} values, expected rows {rows} × n_heads {n_heads}",
            lse.len()
        );
    }
    let (indptr, summaries) = key_tile_summaries(inp.kv_indptr, inp.kv_tags, tile_k);
    let mut items = Vec::new();
    for seq in 0..inp.n_seqs() {
        let rows = inp.seq_rows(seq);
        for start in rows.clone().step_by(TILE_Q) {
            for head in 0..n_heads {
                items.push((seq, head, start..(start + TILE_Q).min(rows.end)));
            }
        }
    }
    let arch = Arch::new();
    let results: Vec<(Vec<f32>, Vec<f32>)> = items
        .par_iter()
        .map(|(seq, head, rows)| {
            let key_tiles = &summaries[indptr[*seq] as usize..indptr[*seq + 1] as usize];
            arch.dispatch(Item {
                inp,
                tile_k,
                key_tiles,
                seq: *seq,
                head: *head,
                rows: rows.clone(),
            })
        })
        .collect();
    let mut lse2 = vec![f32::NEG_INFINITY; rows * n_heads];
    for ((_, head, rows), (o, l2)) in items.iter().zip(&results) {
        for (i, r) in rows.clone().enumerate() {
            out[r * q_dim + head * head_dim..][..head_dim]
                .copy_from_slice(&o[i * head_dim..][..head_dim]);
            lse2[r * n_heads + head] = l2[i];
        }
    }
    if let Some(lse) = lse {
        for (dst, &l2) in lse.iter_mut().zip(&lse2) {
            *dst = l2 * std::f32::consts::LN_2;
        }
    }
    Ok(())
}

/// One work item; its output is `(o [rows, head_dim], lse2 [rows])`.
struct Item<'a> {
    inp: &'a AttnInputs<'a>,
    tile_k: usize,
    /// The summaries of the sequence's key tiles.
    key_tiles: &'a [TileSummary],
    seq: usize,
    head: usize,
    rows: Range<usize>,
}

impl WithSimd for Item<'_> {
    type Output = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        // Register blocks: Q·Kᵀ MR rows × 2 vectors, P·V MR_PV rows × up to 4 vectors.
        match S::F32_LANES {
            16.. => item::<S, 12, 6>(simd, self),
            8.. => item::<S, 6, 3>(simd, self),
            _ => item::<S, 4, 2>(simd, self),
        }
    }
}

/// `2^x` for each lane with `x ≤ 0` (or −inf): exactly 0 below −125, else `2^n · p(f)` with
/// `x = n + f`, `n` the nearest integer, `|f| ≤ 1/2` and `p` the degree-6 Taylor polynomial of
/// `2^f` (relative error below 2e-7).
#[inline(always)]
pub fn exp2_lanes(x: &mut [f32; LANES]) {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: x + ROUND rounds x to an integer
    const C: [f32; 7] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
    ];
    for v in x.iter_mut() {
        let xc = v.max(-125.0);
        let t = xc + ROUND;
        let f = xc - (t - ROUND);
        let mut p = C[6];
        for &c in C[..6].iter().rev() {
            p = p.mul_add(f, c);
        }
        // t's low mantissa bits hold n + 2^22; n << 23 added to p's exponent scales it by 2^n.
        let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()) << 23;
        let y = f32::from_bits(p.to_bits().wrapping_add(n_bits));
        *v = if *v < -125.0 { 0.0 } else { y };
    }
}

/// `acc[i] = Σ_c a[c][i] · panel[c]` for the `MR` rows packed in `a` (`[d][MR]`), one FMA chain
/// per element over `c` in order.
#[inline(always)]
fn qk_micro<S: Simd, const MR: usize>(
    simd: S,
    a: &[f32],
    panel: &[S::f32s],
    d: usize,
) -> [[S::f32s; 2]; MR] {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; MR];
    for (a_c, b) in a[..d * MR]
        .chunks_exact(MR)
        .zip(panel[..2 * d].chunks_exact(2))
    {
        let (b0, b1) = (b[0], b[1]);
        for i in 0..MR {
            let x = simd.splat_f32s(a_c[i]);
            acc[i][0] = simd.mul_add_f32s(x, b0, acc[i][0]);
            acc[i][1] = simd.mul_add_f32s(x, b1, acc[i][1]);
        }
    }
    acc
}

/// `acc[r][cols] += Σ_j p[r][j] · v_j[cols]` for `MR` rows, `NV` vectors of columns from `c0`:
/// one FMA chain per element over the keys in order. `p` rows have stride `ld_p`, `acc` rows
/// `d`; `vs` are the keys' value rows (`d` values each, in the pool).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_micro<S: Simd, const MR: usize, const NV: usize>(
    simd: S,
    p: &[f32],
    ld_p: usize,
    r0: usize,
    vs: &[&[f32]],
    acc: &mut [f32],
    d: usize,
    c0: usize,
) {
    let lanes = S::F32_LANES;
    let w = NV * lanes;
    let mut regs: [[S::f32s; NV]; MR] = std::array::from_fn(|i| {
        let row: &[S::f32s] = bytemuck::cast_slice(&acc[(r0 + i) * d + c0..][..w]);
        std::array::from_fn(|v| row[v])
    });
    let p_rows: [&[f32]; MR] = std::array::from_fn(|i| &p[(r0 + i) * ld_p..][..vs.len()]);
    for (j, v_row) in vs.iter().enumerate() {
        let v: &[S::f32s] = bytemuck::cast_slice(&v_row[c0..c0 + w]);
        for i in 0..MR {
            let pb = simd.splat_f32s(p_rows[i][j]);
            for u in 0..NV {
                regs[i][u] = simd.mul_add_f32s(pb, v[u], regs[i][u]);
            }
        }
    }
    for (i, reg) in regs.iter().enumerate() {
        let row: &mut [S::f32s] = bytemuck::cast_slice_mut(&mut acc[(r0 + i) * d + c0..][..w]);
        row.copy_from_slice(reg);
    }
}

/// `acc += P·V` for rows `0..n_rows`: vector columns in blocks of 4, 2, 1 vectors, rows in
/// blocks of `MR` then 1, the columns past the last whole vector by scalar FMAs (the same chain).
#[inline(always)]
fn pv<S: Simd, const MR: usize>(
    simd: S,
    p: &[f32],
    ld_p: usize,
    n_rows: usize,
    vs: &[&[f32]],
    acc: &mut [f32],
    d: usize,
) {
    let lanes = S::F32_LANES;
    let mut c0 = 0;
    macro_rules! cols {
        ($nv:literal) => {
            while c0 + $nv * lanes <= d {
                let mut r0 = 0;
                while r0 + MR <= n_rows {
                    pv_micro::<S, MR, $nv>(simd, p, ld_p, r0, vs, acc, d, c0);
                    r0 += MR;
                }
                while r0 < n_rows {
                    pv_micro::<S, 1, $nv>(simd, p, ld_p, r0, vs, acc, d, c0);
                    r0 += 1;
                }
                c0 += $nv * lanes;
            }
        };
    }
    cols!(4);
    cols!(2);
    cols!(1);
    if c0 < d {
        for r in 0..n_rows {
            let p_row = &p[r * ld_p..][..vs.len()];
            let acc_row = &mut acc[r * d..][..d];
            for (j, v_row) in vs.iter().enumerate() {
                for c in c0..d {
                    acc_row[c] = p_row[j].mul_add(v_row[c], acc_row[c]);
                }
            }
        }
    }
}

#[inline(always)]
fn item<S: Simd, const MR: usize, const MR_PV: usize>(simd: S, it: Item) -> (Vec<f32>, Vec<f32>) {
    let Item {
        inp,
        tile_k,
        key_tiles,
        seq,
        head,
        rows,
    } = it;
    let d = inp.shape.head_dim;
    let (q_dim, kv_dim) = (inp.shape.q_dim(), inp.shape.kv_dim());
    let kv_col = head / inp.shape.group() * d;
    let scale_log2 = (d as f32).sqrt().recip() * std::f32::consts::LOG2_E;
    let n_rows = rows.len();
    let q_tags: &[Tag] = &inp.row_tags[rows.clone()];
    let q_desc = QueryDesc::new(&TileSummary::of(q_tags), inp.joint);
    let keys = inp.seq_keys(seq);

    let nr = 2 * S::F32_LANES;
    // Scores/probabilities `[n_rows][ld_s]`, a whole number of LANES chunks per row.
    let ld_s = tile_k.div_ceil(LANES).max(1) * LANES;
    let ld_s = ld_s.max(tile_k.div_ceil(nr) * nr);
    // The query rows packed `[row block][d][MR]` (zero rows past the end).
    let blocks = n_rows.div_ceil(MR);
    let mut qp = vec![0.0f32; blocks * d * MR];
    for (i, r) in rows.clone().enumerate() {
        let q = &inp.q[r * q_dim + head * d..][..d];
        let blk = &mut qp[i / MR * d * MR..][..d * MR];
        for (c, &v) in q.iter().enumerate() {
            blk[c * MR + i % MR] = v;
        }
    }
    let panels_max = tile_k.div_ceil(nr);
    let mut kt = vec![simd.splat_f32s(0.0); panels_max * d * 2];
    let mut s = vec![0.0f32; n_rows * ld_s];
    let mut m = vec![f32::NEG_INFINITY; n_rows];
    let mut l = vec![0.0f32; n_rows];
    let mut acc = vec![0.0f32; n_rows * d];
    let mut vs: Vec<&[f32]> = Vec::with_capacity(tile_k);

    for (t, k0) in keys.clone().step_by(tile_k).enumerate() {
        let tile = k0..(k0 + tile_k).min(keys.end);
        let n_keys = tile.len();
        let class = q_desc.classify(&key_tiles[t]);
        if class == TileClass::Hidden {
            continue;
        }
        let unmasked = class == TileClass::Visible && n_keys == tile_k;
        let k_tags = &inp.kv_tags[tile.clone()];
        let slots = &inp.kv_indices[tile];
        // Gather and pack the key tile: panel `t` holds keys t·NR.. as `[d][NR]`.
        let panels = n_keys.div_ceil(nr);
        {
            let kt: &mut [f32] = bytemuck::cast_slice_mut(&mut kt[..panels * d * 2]);
            for (j, &slot) in slots.iter().enumerate() {
                let k_row = &inp.k_pool[slot as usize * kv_dim + kv_col..][..d];
                let panel = &mut kt[j / nr * d * nr..][..d * nr];
                for (c, &v) in k_row.iter().enumerate() {
                    panel[c * nr + j % nr] = v;
                }
            }
            for j in n_keys..panels * nr {
                let panel = &mut kt[j / nr * d * nr..][..d * nr];
                for c in 0..d {
                    panel[c * nr + j % nr] = 0.0;
                }
            }
        }
        // S = Q·Kᵀ.
        for b in 0..blocks {
            let a = &qp[b * d * MR..][..d * MR];
            let mr = MR.min(n_rows - b * MR);
            for pn in 0..panels {
                let sc = qk_micro::<S, MR>(simd, a, &kt[pn * d * 2..][..d * 2], d);
                for (i, sc_i) in sc.iter().enumerate().take(mr) {
                    let dst = &mut s[(b * MR + i) * ld_s + pn * nr..][..nr];
                    dst.copy_from_slice(bytemuck::cast_slice(sc_i.as_slice()));
                }
            }
        }
        // Mask, scale, online softmax; S becomes P.
        for r in 0..n_rows {
            let row = &mut s[r * ld_s..][..ld_s];
            if unmasked {
                row[..n_keys].iter_mut().for_each(|x| *x *= scale_log2);
            } else {
                for (x, &kt) in row[..n_keys].iter_mut().zip(k_tags) {
                    *x = if visible(q_tags[r], kt, inp.joint) {
                        *x * scale_log2
                    } else {
                        f32::NEG_INFINITY
                    };
                }
            }
            row[n_keys..].fill(f32::NEG_INFINITY);
            let mut mx = [f32::NEG_INFINITY; LANES];
            for ch in row.chunks_exact(LANES) {
                for (a, &b) in mx.iter_mut().zip(ch) {
                    *a = a.max(b);
                }
            }
            let m_tile = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m_tile == f32::NEG_INFINITY {
                // Nothing visible to this row here: p = 0 throughout, its state untouched.
                row.fill(0.0);
                continue;
            }
            let m_new = m[r].max(m_tile);
            let alpha = (m[r] - m_new).exp2();
            let mut sum = [0.0f32; LANES];
            for ch in row.chunks_exact_mut(LANES) {
                let ch: &mut [f32; LANES] = ch.try_into().expect("LANES chunk");
                for x in ch.iter_mut() {
                    *x -= m_new;
                }
                exp2_lanes(ch);
                for (a, &b) in sum.iter_mut().zip(ch.iter()) {
                    *a += b;
                }
            }
            // The 16 partial sums in a fixed tree.
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for i in 0..width {
                    sum[i] += sum[i + width];
                }
            }
            l[r] = l[r] * alpha + sum[0];
            acc[r * d..][..d].iter_mut().for_each(|a| *a *= alpha);
            m[r] = m_new;
        }
        // acc += P·V, V read in place.
        vs.clear();
        vs.extend(
            slots
                .iter()
                .map(|&slot| &inp.v_pool[slot as usize * kv_dim + kv_col..][..d]),
        );
        pv::<S, MR_PV>(simd, &s, ld_s, n_rows, &vs, &mut acc, d);
    }

    // Normalise. `l ≥ 1` whenever a key was visible (its own term is 2^0).
    let mut lse2 = vec![f32::NEG_INFINITY; n_rows];
    for r in 0..n_rows {
        if m[r] == f32::NEG_INFINITY {
            acc[r * d..][..d].fill(0.0);
            continue;
        }
        let inv_l = l[r].recip();
        acc[r * d..][..d].iter_mut().for_each(|a| *a *= inv_l);
        lse2[r] = m[r] + l[r].log2();
    }
    (acc, lse2)
}

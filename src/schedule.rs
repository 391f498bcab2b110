//! Sampling schedules (SPEC §4): shift counts, image orders, the text block schedule.
//!
//! Everything here depends only on shapes, step counts and a seed, never on logits, so a whole
//! run's schedule is fixed before sampling starts and is identical for every backend.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::bail_input;
use crate::error::{Error, Result};

/// Shift parameter `s` of LaViDa-O's schedule `σ(t) = s·t / (1 + (s−1)·t)`.
const SHIFT: f64 = 5.0;

/// `c_j = ⌊σ(j/K)·N⌋`: the positions the shift schedule has decoded after `j` of its `K` steps
/// (before its counts are reversed and evened out), the one float expression both
/// [`shift_counts`] and its bound [`max_shift_count`] use.
fn shifted(n: usize, k: usize, j: usize) -> usize {
    let t = j as f64 / k as f64;
    let sigma = SHIFT * t / (1.0 + (SHIFT - 1.0) * t);
    (sigma * n as f64).floor() as usize
}

/// LaViDa-O shift schedule (SPEC §4.1, s = 5): how many positions each of the K steps decodes.
///
/// Returns `k` counts, each at least 1, summing to `n`; few positions early, many late.
/// Fails if `n == 0`, `k == 0` or `k > n`.
pub fn shift_counts(n: usize, k: usize) -> Result<Vec<usize>> {
    if n == 0 {
        bail_input!("shift schedule: positions (N) must be > 0");
    }
    if k == 0 {
        bail_input!("shift schedule: steps (K) must be > 0");
    }
    if k > n {
        bail_input!("shift schedule: steps (K) must be ≤ positions (N), got K = {k}, N = {n}");
    }
    // c_j for j = 0..=K; σ(0) = 0 and σ(1) = 1 exactly, so c_0 = 0, c_K = N.
    let cumulative: Vec<usize> = (0..=k).map(|j| shifted(n, k, j)).collect();
    let mut counts: Vec<usize> = cumulative
        .windows(2)
        .map(|c| c[1].saturating_sub(c[0]).max(1))
        .collect();
    // Raising empty steps to 1 overshoots N by at most K − 1; take the excess back one at a time
    // from steps that can spare it. Terminates because K ≤ N: while Σd > N ≥ K some d_j > 1.
    let mut excess = counts.iter().sum::<usize>() - n;
    let mut j = 0;
    while excess > 0 {
        if counts[j] > 1 {
            counts[j] -= 1;
            excess -= 1;
        }
        j = (j + 1) % k;
    }
    counts.reverse();
    Ok(counts)
}

/// The most positions one step of [`shift_counts`]`(n, k)` decodes, bounded in O(1) (no
/// schedule is built, so a huge `k` costs nothing): `⌊σ(1/K)·N⌋ + 1`, at most `N − K + 1`.
///
/// Why it holds: σ is concave, so the exact increments `σ((j+1)/K)·N − σ(j/K)·N` shrink with
/// `j` and the first, `σ(1/K)·N`, is the largest; a difference of floors exceeds the exact
/// increment by less than 1, raising an empty step to 1 stays within the bound, and taking the
/// excess back only lowers counts. Every count is at most `N − K + 1` as the others are ≥ 1.
/// The memory bound of a request uses it for its logits rows. `k` in `1..=n`, as
/// [`shift_counts`] requires.
pub fn max_shift_count(n: usize, k: usize) -> usize {
    if k == 0 || k > n {
        return n;
    }
    shifted(n, k, 1).saturating_add(1).min(n - k + 1)
}

/// Image decoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Recursive quadtree interleave with seeded shuffles: the first `4^j` picks cover each
    /// cell of the `2^j × 2^j` tiling once (the default, SPEC §4.1).
    Stratified,
    /// Row-major.
    Raster,
    /// A seeded uniform shuffle.
    Random,
}

impl Order {
    /// Every order, in the order the CLI lists them.
    pub const ALL: [Order; 3] = [Order::Stratified, Order::Raster, Order::Random];

    /// The order's name as written in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Order::Stratified => "stratified",
            Order::Raster => "raster",
            Order::Random => "random",
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Order {
    type Err = Error;

    fn from_str(s: &str) -> Result<Order> {
        match Order::ALL.into_iter().find(|o| o.name() == s) {
            Some(order) => Ok(order),
            None => {
                let names: Vec<&str> = Order::ALL.iter().map(|o| o.name()).collect();
                bail_input!(
                    "unknown image order {s:?}; expected one of {}",
                    names.join(", ")
                )
            }
        }
    }
}

/// A permutation of `0..h*w` (row-major grid indices) in decode order.
///
/// Fails on a zero-size grid or one with more than `u32::MAX` cells.
pub fn image_order(order: Order, h: usize, w: usize, seed: u64) -> Result<Vec<u32>> {
    if h == 0 || w == 0 {
        bail_input!("image order: zero-size grid {h}x{w}");
    }
    let cells = match h.checked_mul(w) {
        Some(cells) if cells <= u32::MAX as usize => cells as u32,
        _ => bail_input!("image order: grid {h}x{w} has more than u32::MAX cells"),
    };
    Ok(match order {
        Order::Raster => (0..cells).collect(),
        Order::Random => {
            let mut perm: Vec<u32> = (0..cells).collect();
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            perm
        }
        Order::Stratified => stratified(h, w, seed),
    })
}

/// The stratified order of an `h × w` grid (`h·w ≤ u32::MAX`, both > 0).
///
/// The grid sits in the top-left corner of the smallest power-of-two square of side `2^m`
/// covering it. A cell's quadrant digits, top level first, are `q_0 .. q_{m-1}`
/// (`q_i = 2·(row bit) + (col bit)` at bit `m−1−i`). Each quadtree node gets its own seeded
/// permutation `π` of the four quadrants, and the cell's key is the digit-reversed number
/// `Σ π_node_i(q_i)·4^i`, i.e. the top-level digit is the *least* significant. Sorting by key:
/// the keys below `4^j` are exactly those whose permuted digits at levels `≥ j` are all 0, and
/// their levels `< j` take every value once, so (the `π` being bijections) the first `4^j` cells
/// of a full square have distinct top-`j` prefixes: one per tile of the `2^j × 2^j` tiling.
/// Cells outside the grid are simply absent, which keeps any subtree's cells spread evenly
/// through the order (their keys share the low digits, so they are interleaved with all others).
fn stratified(h: usize, w: usize, seed: u64) -> Vec<u32> {
    let side = h.max(w).next_power_of_two();
    let m = side.trailing_zeros() as usize;
    // perms[i] holds one permutation per level-i node that intersects the grid, row-major over
    // the ceil(h/2^(m−i)) × ceil(w/2^(m−i)) such nodes, so memory stays O(h·w) for any aspect
    // ratio (the full square may be far larger than the grid). Drawn level by level, row-major,
    // from one stream, so the order is a pure function of (h, w, seed).
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let perms: Vec<(usize, Vec<[u8; 4]>)> = (0..m)
        .map(|i| {
            let shift = m - i;
            let rows = h.div_ceil(1 << shift);
            let cols = w.div_ceil(1 << shift);
            let level = (0..rows * cols)
                .map(|_| {
                    let mut p = [0u8, 1, 2, 3];
                    p.shuffle(&mut rng);
                    p
                })
                .collect();
            (cols, level)
        })
        .collect();

    let mut keyed: Vec<(u64, u32)> = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let mut key = 0u64;
            for (i, (cols, level)) in perms.iter().enumerate() {
                let shift = m - i;
                let node = (y >> shift) * cols + (x >> shift);
                let bit = shift - 1;
                let digit = 2 * ((y >> bit) & 1) + ((x >> bit) & 1);
                // m ≤ 32 (h·w ≤ u32::MAX), so 2·i + 2 ≤ 64 bits.
                key |= u64::from(level[node][digit]) << (2 * i);
            }
            keyed.push((key, (y * w + x) as u32));
        }
    }
    // Keys are distinct (the digit map is a bijection per node), so an unstable sort is exact.
    keyed.sort_unstable_by_key(|&(key, _)| key);
    keyed.into_iter().map(|(_, cell)| cell).collect()
}

/// One step of the text answer schedule (SPEC §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextStep {
    /// The semi-AR block this step decodes in (see [`text_block_range`]).
    pub block: usize,
    /// How many of the block's still-masked positions this step commits.
    pub commit: usize,
}

/// The text answer schedule (SPEC §4.2): for each step, (semi-AR block index, number to commit).
///
/// The answer is cut into `ceil(answer_len / block_len)` blocks decoded left to right; `steps` is
/// split evenly over blocks (remainder to the first blocks) and, within a block, its positions
/// evenly over its steps (remainder to the first steps). Only the last block can be shorter than
/// `block_len`; when its even share of steps exceeds its positions it gets one step per position
/// and the other blocks split the rest evenly (remainder first), so every step count from the
/// number of blocks to `answer_len` is valid. Fails outside that range.
pub fn text_schedule(answer_len: usize, block_len: usize, steps: usize) -> Result<Vec<TextStep>> {
    let per_block = text_block_steps(answer_len, block_len, steps)?;
    let mut schedule = Vec::with_capacity(steps);
    for (block, &block_steps) in per_block.iter().enumerate() {
        let size = text_block_range(answer_len, block_len, block).len();
        schedule.extend((0..block_steps).map(|t| TextStep {
            block,
            commit: size / block_steps + usize::from(t < size % block_steps),
        }));
    }
    Ok(schedule)
}

/// Steps per semi-AR block under the rule of [`text_schedule`] (one entry per block), with its
/// errors. Allocates one entry per block: callers bound `answer_len` first.
pub fn text_block_steps(answer_len: usize, block_len: usize, steps: usize) -> Result<Vec<usize>> {
    check_text_steps(answer_len, block_len, steps)?;
    let nblocks = answer_len.div_ceil(block_len);
    let even =
        |total: usize, blocks: usize, b: usize| total / blocks + usize::from(b < total % blocks);
    let last = text_block_range(answer_len, block_len, nblocks - 1).len();
    // The last block is the only one that can be short; blocks before it hold `block_len`
    // positions, and `steps − last ≤ (nblocks − 1)·block_len` keeps their shares within that.
    let capped = nblocks > 1 && even(steps, nblocks, nblocks - 1) > last;
    Ok((0..nblocks)
        .map(|b| match (capped, b + 1 == nblocks) {
            (false, _) => even(steps, nblocks, b),
            (true, true) => last,
            (true, false) => even(steps - last, nblocks - 1, b),
        })
        .collect())
}

/// The range rule of [`text_schedule`] without building it: positive sizes, and at least one
/// step per block and at most one per position. O(1), no allocation.
pub fn check_text_steps(answer_len: usize, block_len: usize, steps: usize) -> Result<()> {
    if answer_len == 0 {
        bail_input!("text schedule: answer length must be > 0");
    }
    if block_len == 0 {
        bail_input!("text schedule: block length must be > 0");
    }
    if steps == 0 {
        bail_input!("text schedule: steps must be > 0");
    }
    if steps > answer_len {
        bail_input!(
            "text schedule: steps ({steps}) must be ≤ answer length ({answer_len}): \
             every step commits at least one position"
        );
    }
    let nblocks = answer_len.div_ceil(block_len);
    if steps < nblocks {
        bail_input!(
            "text schedule: {steps} steps for {nblocks} blocks of {block_len} \
             (answer length {answer_len}); at least one step per block is needed"
        );
    }
    Ok(())
}

/// The step count a text answer gets when none is asked for: about two positions per step
/// (`ceil(answer_len / 2)`), raised to one step per block when blocks are shorter than two
/// positions. Always valid for [`text_schedule`] when `answer_len` and `block_len` are > 0.
pub fn default_text_steps(answer_len: usize, block_len: usize) -> usize {
    answer_len
        .div_ceil(2)
        .max(answer_len.div_ceil(block_len.max(1)))
        .min(answer_len)
}

/// Positions (0-based within the answer) of semi-AR block `b`:
/// `b*block_len .. min((b+1)*block_len, answer_len)`; empty (at `answer_len`) past the last block.
pub fn text_block_range(answer_len: usize, block_len: usize, b: usize) -> Range<usize> {
    let start = b.saturating_mul(block_len).min(answer_len);
    let end = (b.saturating_add(1))
        .saturating_mul(block_len)
        .min(answer_len);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The O(1) bound against the largest count of the schedule itself: never below it, at
    /// most one above where `K ≤ N/8` (where the excess taken back is small) and four above
    /// otherwise (every `K` for `N` ≤ 300, a sweep of `K` at the grid sizes people run).
    #[test]
    fn max_shift_count_bounds_the_schedule_tightly() {
        let check = |n: usize, k: usize| {
            let real = *shift_counts(n, k).unwrap().iter().max().unwrap();
            let bound = max_shift_count(n, k);
            let slack = if 8 * k <= n { 1 } else { 4 };
            assert!(
                real <= bound && bound <= real + slack,
                "N {n} K {k}: largest count {real}, bound {bound}"
            );
        };
        for n in 1..=300 {
            for k in 1..=n {
                check(n, k);
            }
        }
        for n in [1024, 1089, 4096, 16384, 65536] {
            for k in (1..=n).step_by(n / 97 + 1).chain([2, 3, 64, 128, n - 1, n]) {
                check(n, k);
            }
        }
        assert_eq!(max_shift_count(1024, 64), 76);
    }

    #[test]
    fn shift_counts_match_spec_check() {
        let counts = shift_counts(4096, 64).unwrap();
        assert_eq!(counts.len(), 64);
        assert_eq!(counts.iter().sum::<usize>(), 4096);
        assert_eq!(&counts[..4], &[13, 14, 13, 14]);
        assert_eq!(&counts[61..], &[240, 267, 301]);
        assert!(counts[0] < counts[63], "few positions early, many late");
    }

    #[test]
    fn shift_counts_take_excess_back_from_the_front() {
        // N = 12, K = 7: c = 0 5 8 9 10 11 11 12, d = 5 3 1 1 1 1 1 (Σ 13): the one excess comes
        // off d_0 (walking from j = 0), then reversed. Walking from the end would give ... 2, 5.
        assert_eq!(shift_counts(12, 7).unwrap(), vec![1, 1, 1, 1, 1, 3, 4]);
    }

    #[test]
    fn shift_counts_follow_f64_rounding() {
        // N = 11, K = 7: σ(1/7)·11 is exactly 5 in rationals but 4.999… in f64, so c_1 = 4 and
        // the schedule differs from an exact-arithmetic one ([1, 1, 1, 1, 1, 2, 4]). The spec
        // computes in f64; ports must evaluate `s·t / (1 + (s−1)·t) · N` in this order.
        assert_eq!(shift_counts(11, 7).unwrap(), vec![1, 1, 1, 1, 1, 3, 3]);
    }

    #[test]
    fn shift_counts_spread_excess_when_steps_are_many() {
        // K = N: every step decodes exactly one position.
        assert_eq!(shift_counts(7, 7).unwrap(), vec![1; 7]);
        assert_eq!(shift_counts(1, 1).unwrap(), vec![1]);
    }

    #[test]
    fn order_names_round_trip() {
        for order in Order::ALL {
            assert_eq!(order.to_string().parse::<Order>().unwrap(), order);
            let json = serde_json::to_string(&order).unwrap();
            assert_eq!(json, format!("\"{order}\""));
        }
        let err = "zigzag".parse::<Order>().unwrap_err().to_string();
        assert!(
            err.contains("zigzag") && err.contains("stratified, raster, random"),
            "{err}"
        );
    }

    #[test]
    fn stratified_first_picks_cover_quadrants_of_4x4() {
        let order = image_order(Order::Stratified, 4, 4, 3).unwrap();
        let quadrant = |c: u32| (c / 4 / 2) * 2 + (c % 4) / 2;
        let mut first: Vec<u32> = order[..4].iter().map(|&c| quadrant(c)).collect();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3]);
    }

    #[test]
    fn text_block_range_clamps() {
        assert_eq!(text_block_range(70, 32, 0), 0..32);
        assert_eq!(text_block_range(70, 32, 2), 64..70);
        assert_eq!(text_block_range(70, 32, 3), 70..70);
        assert_eq!(text_block_range(70, 32, usize::MAX), 70..70);
    }

    #[test]
    fn text_schedule_small_example() {
        // 70 = 32 + 32 + 6; 7 steps -> 3, 2, 2; 32 over 3 -> 11, 11, 10.
        let s = text_schedule(70, 32, 7).unwrap();
        let got: Vec<(usize, usize)> = s.iter().map(|t| (t.block, t.commit)).collect();
        assert_eq!(
            got,
            vec![(0, 11), (0, 11), (0, 10), (1, 16), (1, 16), (2, 3), (2, 3)]
        );
    }

    #[test]
    fn a_short_last_block_gets_one_step_per_position_at_most() {
        // 33 = 32 + 1, 17 steps: the even split 9 + 8 would give the 1-position block 8 steps.
        assert_eq!(text_block_steps(33, 32, 17).unwrap(), vec![16, 1]);
        // 100 = 3·32 + 4, 50 steps: 13 13 12 12 → the last block 4, the rest 46 = 16 15 15.
        assert_eq!(text_block_steps(100, 32, 50).unwrap(), vec![16, 15, 15, 4]);
        // A share the short block can take is left alone: 70 = 32 + 32 + 6 with 7 steps.
        assert_eq!(text_block_steps(70, 32, 7).unwrap(), vec![3, 2, 2]);
    }

    #[test]
    fn default_text_steps_are_always_valid() {
        for answer_len in 1..200 {
            for block_len in 1..70 {
                let steps = default_text_steps(answer_len, block_len);
                let s = text_schedule(answer_len, block_len, steps).unwrap();
                assert_eq!(s.len(), steps);
            }
        }
        assert_eq!(default_text_steps(128, 32), 64);
        assert_eq!(default_text_steps(33, 32), 17);
        assert_eq!(default_text_steps(130, 1), 130);
    }
}

//! Property tests for the sampling schedules (SPEC §4.1, §4.2).

use proptest::prelude::*;
use sparse_lavida::Error;
use sparse_lavida::schedule::{
    Order, TextStep, image_order, shift_counts, text_block_range, text_schedule,
};

/// The `Error::Input` message, or a panic naming what came back instead.
fn input_message<T: std::fmt::Debug>(r: sparse_lavida::Result<T>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

/// Asserts `order` is a permutation of `0..n`.
fn assert_permutation(order: &[u32], n: usize) {
    assert_eq!(order.len(), n);
    let mut seen = vec![false; n];
    for &c in order {
        let c = c as usize;
        assert!(c < n, "cell {c} out of range 0..{n}");
        assert!(!seen[c], "cell {c} picked twice");
        seen[c] = true;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn shift_counts_partition_n(
        (n, k) in (1usize..5000).prop_flat_map(|n| (Just(n), 1..=n.min(256)))
    ) {
        let counts = shift_counts(n, k).unwrap();
        prop_assert_eq!(counts.len(), k);
        prop_assert_eq!(counts.iter().sum::<usize>(), n);
        prop_assert!(counts.iter().all(|&c| c >= 1), "{:?}", counts);
        prop_assert!(counts[0] <= counts[k - 1], "{:?}", counts);
    }

    #[test]
    fn image_orders_are_seeded_permutations(h in 1usize..40, w in 1usize..40, seed: u64) {
        let n = h * w;
        for order in [Order::Stratified, Order::Raster, Order::Random] {
            let a = image_order(order, h, w, seed).unwrap();
            assert_permutation(&a, n);
            prop_assert_eq!(&a, &image_order(order, h, w, seed).unwrap(), "deterministic");
            let b = image_order(order, h, w, seed ^ 0x9e37_79b9_7f4a_7c15).unwrap();
            match order {
                Order::Raster => {
                    prop_assert!(a.iter().copied().eq(0..n as u32));
                    prop_assert_eq!(&a, &b);
                }
                _ if n >= 16 => prop_assert_ne!(&a, &b, "{} ignores the seed", order),
                _ => {}
            }
        }
    }

    /// On a square of side 2^m, the first 4^j picks hit each tile of the 2^j × 2^j tiling once.
    #[test]
    fn stratified_covers_each_tiling_once(m in 0u32..=6, seed: u64) {
        let side = 1usize << m;
        let order = image_order(Order::Stratified, side, side, seed).unwrap();
        assert_permutation(&order, side * side);
        for j in 0..=m {
            let tiles = 1usize << j;
            let tile_side = side >> j;
            let mut hit = vec![false; tiles * tiles];
            for &c in &order[..tiles * tiles] {
                let (y, x) = (c as usize / side, c as usize % side);
                let tile = (y / tile_side) * tiles + x / tile_side;
                prop_assert!(!hit[tile], "level {}: tile {} hit twice", j, tile);
                hit[tile] = true;
            }
        }
    }

    /// Any grid, square or not: at every prefix of the order and every tiling level j of the
    /// embedding power-of-two square, the tiles lying wholly inside the grid have been picked
    /// equally often up to one, and no tile (partial ones included) is ahead of them by more
    /// than one. This is what "spread out" means for grids the quadtree does not fit exactly.
    #[test]
    fn stratified_is_balanced_on_any_grid(h in 1usize..40, w in 1usize..40, seed: u64) {
        let order = image_order(Order::Stratified, h, w, seed).unwrap();
        let side = h.max(w).next_power_of_two();
        let m = side.trailing_zeros();
        for j in 1..=m {
            let tiles = 1usize << j;
            let tile_side = side >> j;
            let full =
                |t: usize| (t / tiles + 1) * tile_side <= h && (t % tiles + 1) * tile_side <= w;
            let full_tiles: Vec<usize> = (0..tiles * tiles).filter(|&t| full(t)).collect();
            let mut count = vec![0usize; tiles * tiles];
            for &c in &order {
                let (y, x) = (c as usize / w, c as usize % w);
                count[(y / tile_side) * tiles + x / tile_side] += 1;
                if let Some(min) = full_tiles.iter().map(|&t| count[t]).min() {
                    let max = count.iter().max().unwrap();
                    prop_assert!(*max <= min + 1, "level {}: counts {:?}", j, count);
                }
            }
        }
    }

    #[test]
    fn text_schedule_commits_every_position(
        (answer_len, block_len, steps) in (1usize..300, 1usize..64)
            .prop_flat_map(|(g, s)| {
                let nblocks = g.div_ceil(s);
                (Just(g), Just(s), nblocks..=g)
            })
    ) {
        // Every step count from one per block to one per position is valid.
        let schedule = text_schedule(answer_len, block_len, steps).unwrap();
        prop_assert_eq!(schedule.len(), steps);
        prop_assert_eq!(schedule.iter().map(|s| s.commit).sum::<usize>(), answer_len);
        prop_assert!(schedule.iter().all(|s| s.commit >= 1));
        // Blocks appear as 0, 1, 2, ... with no gap and no going back.
        prop_assert_eq!(schedule[0].block, 0);
        for pair in schedule.windows(2) {
            prop_assert!(pair[1].block == pair[0].block || pair[1].block == pair[0].block + 1);
        }
        let nblocks = answer_len.div_ceil(block_len);
        prop_assert_eq!(schedule.last().unwrap().block, nblocks - 1);
        for b in 0..nblocks {
            let steps_b: Vec<&TextStep> = schedule.iter().filter(|s| s.block == b).collect();
            let size = text_block_range(answer_len, block_len, b).len();
            prop_assert_eq!(steps_b.iter().map(|s| s.commit).sum::<usize>(), size);
            // Even split: commits differ by at most one, larger ones first.
            prop_assert!(steps_b.windows(2).all(|p| p[0].commit >= p[1].commit));
            prop_assert!(steps_b[0].commit - steps_b.last().unwrap().commit <= 1);
        }
        // Steps split evenly over blocks, remainder first; a short last block whose share
        // exceeds its positions takes one step per position and the others split the rest.
        let per_block: Vec<usize> =
            (0..nblocks).map(|b| schedule.iter().filter(|s| s.block == b).count()).collect();
        prop_assert!(per_block.windows(2).all(|p| p[0] >= p[1]));
        let last = text_block_range(answer_len, block_len, nblocks - 1).len();
        let even_last = steps / nblocks;
        if nblocks > 1 && even_last > last {
            prop_assert_eq!(per_block[nblocks - 1], last);
            prop_assert!(per_block[0] - per_block[nblocks - 2] <= 1);
        } else {
            prop_assert!(per_block[0] - per_block[nblocks - 1] <= 1);
        }
    }

    #[test]
    fn text_block_ranges_tile_the_answer(answer_len in 1usize..300, block_len in 1usize..64) {
        let nblocks = answer_len.div_ceil(block_len);
        let mut next = 0;
        for b in 0..nblocks {
            let r = text_block_range(answer_len, block_len, b);
            prop_assert_eq!(r.start, next);
            prop_assert!(!r.is_empty() && r.len() <= block_len);
            next = r.end;
        }
        prop_assert_eq!(next, answer_len);
        prop_assert!(text_block_range(answer_len, block_len, nblocks).is_empty());
    }
}

#[test]
fn shift_counts_errors() {
    let m = input_message(shift_counts(10, 11));
    assert!(
        m.contains("steps (K) must be ≤ positions (N)") && m.contains("11"),
        "{m}"
    );
    assert!(m.contains("10"), "{m}");
    assert!(input_message(shift_counts(0, 0)).contains("positions (N)"));
    assert!(input_message(shift_counts(10, 0)).contains("steps (K)"));
}

#[test]
fn image_order_errors() {
    for order in [Order::Stratified, Order::Raster, Order::Random] {
        for (h, w) in [(0, 5), (5, 0), (0, 0)] {
            let m = input_message(image_order(order, h, w, 1));
            assert!(m.contains("zero-size grid"), "{m}");
        }
        let m = input_message(image_order(order, 1 << 16, (1 << 16) + 1, 1));
        assert!(m.contains("u32::MAX"), "{m}");
    }
}

#[test]
fn stratified_handles_extreme_aspect_ratios() {
    // The embedding square is 2^20 × 2^20 here; memory must follow the grid, not the square.
    let order = image_order(Order::Stratified, 1, 1 << 20, 7).unwrap();
    assert_permutation(&order, 1 << 20);
    let order = image_order(Order::Stratified, 1000, 3, 7).unwrap();
    assert_permutation(&order, 3000);
}

#[test]
fn text_schedule_errors() {
    assert!(input_message(text_schedule(0, 32, 1)).contains("answer length"));
    assert!(input_message(text_schedule(10, 0, 1)).contains("block length"));
    assert!(input_message(text_schedule(10, 32, 0)).contains("steps"));
    let m = input_message(text_schedule(10, 32, 11));
    assert!(
        m.contains("steps (11)") && m.contains("answer length (10)"),
        "{m}"
    );
    // 100 positions in blocks of 32 -> 4 blocks; 3 steps cannot cover them.
    let m = input_message(text_schedule(100, 32, 3));
    assert!(
        m.contains("at least one step per block") && m.contains("4 blocks"),
        "{m}"
    );
    // 33 = 32 + 1: the even split of 4 steps would give the 1-position last block 2; it gets
    // one and the first block three.
    let s = text_schedule(33, 32, 4).unwrap();
    let got: Vec<(usize, usize)> = s.iter().map(|t| (t.block, t.commit)).collect();
    assert_eq!(got, vec![(0, 11), (0, 11), (0, 10), (1, 1)]);
}

/// The default t2i request's shape at `lavida-o` (32×32, 64 steps, prompt 64, CFG): its logits
/// rows are bounded by the schedule's largest group (76 by the O(1) bound, 75 in the schedule),
/// not by N − K + 1 = 961. `memory`'s H100 batch test and `scripts/gpu-check`'s sweep assume
/// this shape.
#[test]
fn default_t2i_shape_bounds_logits_by_the_largest_group() {
    use sparse_lavida::config::{Branch, Config};
    use sparse_lavida::memory::GenShape;
    use sparse_lavida::request::{TaskKind, Workload};
    let cfg = Config::preset("lavida-o").unwrap();
    let shape = Workload::new(TaskKind::T2i).shape(&cfg).unwrap();
    let largest = *shift_counts(1024, 64).unwrap().iter().max().unwrap();
    assert_eq!(largest, 75);
    assert_eq!(
        shape,
        GenShape {
            response: Branch::Image,
            prompt: 64,
            response_len: 1024,
            n_seqs: 2,
            steps: 64,
            max_query: 76,
            grid: Some((32, 32)),
        }
    );
}

//! Tiled split-KV attention (`backend::cpu::attention`) and the CPU backend's attention
//! (`backend::cpu::flash`) against the naive f64 oracle, and the oracle against a hand-computed
//! example.

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::backend::cpu::attention::{
    AttnInputs, AttnShape, AttnTiling, attention_naive, attention_tiled,
};
use sparse_lavida::backend::cpu::flash::{
    KV_STREAM_BYTES, TILE_K, TILE_Q, TILE_Q_STREAM, attention_flash, attention_flash_strided,
    attention_flash_with, query_tile,
};
use sparse_lavida::config::Branch;
use sparse_lavida::plan::Tag;

/// Owned buffers behind an [`AttnInputs`].
#[derive(Debug, Clone)]
struct Case {
    q: Vec<f32>,
    row_tags: Vec<Tag>,
    seq_indptr: Vec<u32>,
    k_pool: Vec<f32>,
    v_pool: Vec<f32>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<u32>,
    kv_tags: Vec<Tag>,
    joint: bool,
    shape: AttnShape,
}

impl Case {
    fn inputs(&self) -> AttnInputs<'_> {
        AttnInputs {
            q: &self.q,
            row_tags: &self.row_tags,
            seq_indptr: &self.seq_indptr,
            k_pool: &self.k_pool,
            v_pool: &self.v_pool,
            kv_indptr: &self.kv_indptr,
            kv_indices: &self.kv_indices,
            kv_tags: &self.kv_tags,
            joint: self.joint,
            shape: self.shape,
        }
    }
}

/// Structure of a random case; the values come from `seed`.
#[derive(Debug, Clone)]
struct CaseParams {
    /// Per sequence: (fed rows, cached keys).
    seqs: Vec<(usize, usize)>,
    extra_slots: usize,
    shape: AttnShape,
    joint: bool,
    /// All query rows in this branch (as in a real call), or `None`: each row picks one.
    query_branch: Option<Branch>,
    seed: u64,
}

fn params_strategy() -> impl Strategy<Value = CaseParams> {
    (
        prop::collection::vec((0usize..10, 0usize..20), 1..=3),
        0usize..5,
        (
            1usize..=3,
            1usize..=3,
            prop::sample::select(vec![2usize, 8, 16, 64]),
        ),
        any::<bool>(),
        prop::sample::select(vec![None, Some(Branch::Text), Some(Branch::Image)]),
        any::<u64>(),
    )
        .prop_map(
            |(seqs, extra_slots, (n_kv_heads, group, head_dim), joint, query_branch, seed)| {
                CaseParams {
                    seqs,
                    extra_slots,
                    shape: AttnShape {
                        n_heads: n_kv_heads * group,
                        n_kv_heads,
                        head_dim,
                    },
                    joint,
                    query_branch,
                    seed,
                }
            },
        )
}

fn tiling_strategy() -> impl Strategy<Value = AttnTiling> {
    (1usize..9, 1usize..17, 1usize..5).prop_map(|(tile_q, tile_k, n_splits)| AttnTiling {
        tile_q,
        tile_k,
        n_splits,
    })
}

fn random_tag(rng: &mut ChaCha8Rng, branch: Option<Branch>) -> Tag {
    let branch = branch.unwrap_or(if rng.gen_bool(0.5) {
        Branch::Image
    } else {
        Branch::Text
    });
    Tag::new(branch, rng.gen_range(0..4), rng.gen_bool(0.4))
}

/// Each sequence's keys are its rows' own slots plus cached ones, in shuffled order, over a
/// shuffled pool; slots no key uses hold NaN, so a wrong gather cannot go unnoticed.
fn build_case(p: &CaseParams) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let n_keys: usize = p.seqs.iter().map(|&(rows, cached)| rows + cached).sum();
    let slots = n_keys + p.extra_slots;
    let mut free: Vec<u32> = (0..slots as u32).collect();
    free.shuffle(&mut rng);
    let kv_dim = p.shape.kv_dim();
    let mut case = Case {
        q: Vec::new(),
        row_tags: Vec::new(),
        seq_indptr: vec![0],
        k_pool: vec![f32::NAN; slots * kv_dim],
        v_pool: vec![f32::NAN; slots * kv_dim],
        kv_indptr: vec![0],
        kv_indices: Vec::new(),
        kv_tags: Vec::new(),
        joint: p.joint,
        shape: p.shape,
    };
    for &(rows, cached) in &p.seqs {
        let mut keys = Vec::new();
        for _ in 0..rows {
            let tag = random_tag(&mut rng, p.query_branch);
            case.row_tags.push(tag);
            keys.push((free.pop().unwrap(), tag));
        }
        for _ in 0..cached {
            keys.push((free.pop().unwrap(), random_tag(&mut rng, None)));
        }
        keys.shuffle(&mut rng);
        for (slot, tag) in keys {
            case.kv_indices.push(slot);
            case.kv_tags.push(tag);
            for x in &mut case.k_pool[slot as usize * kv_dim..][..kv_dim] {
                *x = rng.gen_range(-1.0..1.0);
            }
            for x in &mut case.v_pool[slot as usize * kv_dim..][..kv_dim] {
                *x = rng.gen_range(-1.0..1.0);
            }
        }
        case.seq_indptr.push(case.row_tags.len() as u32);
        case.kv_indptr.push(case.kv_indices.len() as u32);
    }
    // Queries larger than keys so the softmax is far from uniform.
    case.q = (0..case.row_tags.len() * p.shape.q_dim())
        .map(|_| rng.gen_range(-3.0..3.0))
        .collect();
    case
}

fn run_tiled(case: &Case, tiling: AttnTiling) -> (Vec<f32>, Vec<f32>) {
    let inp = case.inputs();
    // Poisoned so an unwritten element shows.
    let mut out = vec![f32::NAN; inp.rows() * case.shape.q_dim()];
    let mut lse = vec![f32::NAN; inp.rows() * case.shape.n_heads];
    attention_tiled(&inp, tiling, &mut out, Some(&mut lse)).unwrap();
    (out, lse)
}

/// `max |a − b|` over `max |b|` (max-abs norm), 0 when both are all zero.
fn max_rel_diff(a: &[f32], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if diff == 0.0 { 0.0 } else { diff / scale }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Tiled matches the f64 oracle: outputs within 1e-5 of max |naive| (max-abs norm), LSE
    /// within 1e-5 (relative to max(1, |lse|)), hidden rows exactly zero with LSE −inf, no NaN.
    /// The same case split in 2..5 matches the unsplit run within 1e-6 (same norm).
    #[test]
    fn tiled_matches_naive(p in params_strategy(), tiling in tiling_strategy()) {
        let case = build_case(&p);
        let (out, lse) = run_tiled(&case, tiling);
        check_against_naive(&case, &out, &lse)?;

        let unsplit = AttnTiling { n_splits: 1, ..tiling };
        let split = AttnTiling { n_splits: tiling.n_splits.max(2), ..tiling };
        let (out1, lse1) = run_tiled(&case, unsplit);
        let (out2, lse2) = run_tiled(&case, split);
        let out1_f64: Vec<f64> = out1.iter().map(|&x| x as f64).collect();
        let err = max_rel_diff(&out2, &out1_f64);
        prop_assert!(err <= 1e-6, "split vs unsplit relative error {err}");
        for (&a, &b) in lse1.iter().zip(&lse2) {
            prop_assert!(a == b || (a - b).abs() <= 1e-6 * a.abs().max(1.0), "lse {a} vs {b}");
        }
    }
}

/// A hand-written case for the named-row tests: one sequence, 1 head, head_dim 4.
fn small_case(row_tags: Vec<Tag>, kv_tags: Vec<Tag>, kv_indices: Vec<u32>, slots: usize) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let d = 4;
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    Case {
        q: values(row_tags.len() * d),
        seq_indptr: vec![0, row_tags.len() as u32],
        row_tags,
        k_pool: values(slots * d),
        v_pool: values(slots * d),
        kv_indptr: vec![0, kv_indices.len() as u32],
        kv_indices,
        kv_tags,
        joint: true,
        shape: AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: d,
        },
    }
}

const SOME_TILINGS: [AttnTiling; 3] = [
    AttnTiling {
        tile_q: 1,
        tile_k: 1,
        n_splits: 1,
    },
    AttnTiling {
        tile_q: 2,
        tile_k: 2,
        n_splits: 3,
    },
    AttnTiling {
        tile_q: 8,
        tile_k: 16,
        n_splits: 4,
    },
];

#[test]
fn rows_that_see_nothing_get_zeros_and_neg_inf() {
    let text = Branch::Text;
    // Every key is masked (blocks 1 and 3). Row 0: masked block 2, whose own slot is not among
    // the keys. Rows 1 and 2: clean (blocks 0 and 1), which never see masked keys. Row 3:
    // masked block 3 sees exactly key 1 (slot 0, its own block).
    let rows = vec![
        Tag::new(text, 2, true),
        Tag::new(text, 0, false),
        Tag::new(text, 1, false),
        Tag::new(text, 3, true),
    ];
    let keys = vec![Tag::new(text, 1, true), Tag::new(text, 3, true)];
    let case = small_case(rows, keys, vec![2, 0], 3);
    let (want, want_lse) = attention_naive(&case.inputs()).unwrap();
    assert_eq!(&want_lse[..3], &[f64::NEG_INFINITY; 3]);
    assert!(want_lse[3].is_finite());
    for tiling in SOME_TILINGS {
        let (out, lse) = run_tiled(&case, tiling);
        assert_eq!(&lse[..3], &[f32::NEG_INFINITY; 3], "{tiling:?}");
        assert!(out[..12].iter().all(|&x| x == 0.0), "{tiling:?}: {out:?}");
        // Row 3 attends to a single key: its output is that key's value.
        let v = &case.v_pool[0..4];
        assert_eq!(&out[12..16], v, "{tiling:?}");
        assert!((lse[3] as f64 - want_lse[3]).abs() < 1e-6);
        assert_eq!(
            &want[12..16],
            &v.iter().map(|&x| x as f64).collect::<Vec<_>>()[..]
        );
    }
}

/// 1 head, head_dim 4 (scale 1/2); keys in slots 2, 0, 1 (slot 1's key is masked of another
/// block, so hidden). Scores: q·k0/2 = ln 3 and q·k1/2 = 0, so the weights are 3/4 and 1/4:
/// o = 0.75·v0 + 0.25·v1 = [3, 1, 6, −2], lse = ln(3 + 1) = ln 4.
#[test]
fn naive_oracle_matches_hand_computed_example() {
    let text = Branch::Text;
    let ln3 = 3.0f32.ln();
    let case = Case {
        q: vec![2.0 * ln3, 0.0, 1.0, 0.0],
        row_tags: vec![Tag::new(text, 1, false)],
        seq_indptr: vec![0, 1],
        // Slot 0: k1 (score 0), slot 1: hidden key, slot 2: k0 (score ln 3).
        k_pool: vec![0.0, 5.0, 0.0, 1.0, 9.0, 9.0, 9.0, 9.0, 1.0, -1.0, 0.0, 0.0],
        v_pool: vec![
            0.0, 4.0, 0.0, 4.0, 100.0, 100.0, 100.0, 100.0, 4.0, 0.0, 8.0, -4.0,
        ],
        kv_indptr: vec![0, 3],
        kv_indices: vec![2, 0, 1],
        kv_tags: vec![
            Tag::new(text, 0, false),
            Tag::new(text, 1, false),
            Tag::new(text, 2, true),
        ],
        joint: false,
        shape: AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
        },
    };
    let (out, lse) = attention_naive(&case.inputs()).unwrap();
    let expect = [3.0, 1.0, 6.0, -2.0];
    for (o, e) in out.iter().zip(expect) {
        assert!((o - e).abs() < 1e-6, "{out:?}");
    }
    assert!((lse[0] - 4.0f64.ln()).abs() < 1e-6, "{lse:?}");
    for tiling in SOME_TILINGS {
        let (out, lse) = run_tiled(&case, tiling);
        for (o, e) in out.iter().zip(expect) {
            assert!((*o as f64 - e).abs() < 1e-5, "{tiling:?}: {out:?}");
        }
        assert!((lse[0] - 4.0f32.ln()).abs() < 1e-5, "{tiling:?}: {lse:?}");
    }
}

/// A key tile that is hidden from every query of the tile is skipped without reading K/V: its
/// keys hold NaN, and the output is still finite and equal to the oracle's.
#[test]
fn all_hidden_tiles_read_no_kv() {
    let image = Branch::Image;
    // Queries: clean blocks 1 and 2. Keys 0..4: masked block 3 (hidden, NaN K/V); keys 4..8:
    // clean blocks 0..=1 (visible to all).
    let rows = vec![Tag::new(image, 1, false), Tag::new(image, 2, false)];
    let mut keys = vec![Tag::new(image, 3, true); 4];
    keys.extend((0..4).map(|i| Tag::new(image, i % 2, false)));
    let mut case = small_case(rows, keys, vec![7, 1, 5, 3, 0, 6, 2, 4], 8);
    let hidden = || [7usize, 1, 5, 3].into_iter().flat_map(|s| s * 4..s * 4 + 4);
    let (want, _) = attention_naive(&case.inputs()).unwrap();
    for i in hidden() {
        case.k_pool[i] = f32::NAN;
        case.v_pool[i] = f32::NAN;
    }
    let tiling = AttnTiling {
        tile_q: 2,
        tile_k: 4,
        n_splits: 1,
    };
    let (out, _) = run_tiled(&case, tiling);
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    let max_diff = out
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(max_diff < 1e-5, "{out:?} vs {want:?}");
}

#[test]
fn output_is_independent_of_thread_count() {
    let p = CaseParams {
        seqs: vec![(9, 19), (0, 5), (7, 11)],
        extra_slots: 3,
        shape: AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        },
        joint: true,
        query_branch: Some(Branch::Image),
        seed: 11,
    };
    let case = build_case(&p);
    let tiling = AttnTiling {
        tile_q: 3,
        tile_k: 5,
        n_splits: 3,
    };
    let run_on = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run_tiled(&case, tiling))
    };
    let (out1, lse1) = run_on(1);
    let (out4, lse4) = run_on(4);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out1), bits(&out4));
    assert_eq!(bits(&lse1), bits(&lse4));
}

#[test]
fn validate_names_the_problem() {
    let t = Tag::new(Branch::Text, 0, false);
    let case = small_case(vec![t, t], vec![t, t], vec![0, 1], 2);
    assert!(case.inputs().validate().is_ok());
    let err = |c: &Case| c.inputs().validate().unwrap_err().to_string();

    let mut bad = case.clone();
    bad.kv_indices[1] = 2;
    assert!(err(&bad).contains("kv_indices[1] = 2"), "{}", err(&bad));

    let mut bad = case.clone();
    bad.q.pop();
    assert!(err(&bad).contains("q has 7 values"), "{}", err(&bad));

    let mut bad = case.clone();
    bad.shape = AttnShape {
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 2,
    };
    assert!(
        err(&bad).contains("not a multiple of n_kv_heads"),
        "{}",
        err(&bad)
    );

    let mut bad = case.clone();
    bad.kv_tags.pop();
    assert!(err(&bad).contains("kv_tags"), "{}", err(&bad));

    let mut bad = case.clone();
    bad.seq_indptr = vec![0, 1];
    assert!(err(&bad).contains("seq_indptr ends at 1"), "{}", err(&bad));

    let mut bad = case.clone();
    bad.v_pool.pop();
    assert!(err(&bad).contains("v_pool"), "{}", err(&bad));

    // attention_tiled checks its own buffers and tiling too.
    let inp = case.inputs();
    let tiling = SOME_TILINGS[1];
    let mut out = vec![0.0; 7];
    let e = attention_tiled(&inp, tiling, &mut out, None).unwrap_err();
    assert!(e.to_string().contains("out has 7 values"), "{e}");
    let mut out = vec![0.0; 8];
    let mut lse = vec![0.0; 1];
    let e = attention_tiled(&inp, tiling, &mut out, Some(&mut lse)).unwrap_err();
    assert!(e.to_string().contains("lse has 1 values"), "{e}");
    let zero = AttnTiling {
        tile_k: 0,
        ..tiling
    };
    assert!(attention_tiled(&inp, zero, &mut out, None).is_err());
}

#[test]
fn heuristic_splits_only_when_query_work_is_scarce() {
    // Many query tiles: the grid is full without splitting.
    let t = AttnTiling::heuristic(4096, 8192, 32, 132);
    assert_eq!(t.n_splits, 1);
    // One 16-row tile per head, 4 heads, 132 workers, long keys: split up to the cap.
    let t = AttnTiling::heuristic(10, 100_000, 4, 132);
    assert_eq!((t.tile_q, t.n_splits), (16, AttnTiling::MAX_SPLITS));
    // Few keys: no split shorter than MIN_KEYS_PER_SPLIT.
    let t = AttnTiling::heuristic(10, 600, 4, 132);
    assert_eq!(t.n_splits, 3);
    // Sparse step at lavida-o size: 91 rows × 32 heads = 32 items of 128 rows on 264
    // concurrent CTAs (2 per SM × 132 SMs): ceil(264 / 32) = 9 splits.
    let t = AttnTiling::heuristic(91, 4096, 32, 264);
    assert_eq!((t.tile_q, t.n_splits), (128, 9));
    for (rows, keys) in [(0, 0), (1, 0), (0, 1000)] {
        let t = AttnTiling::heuristic(rows, keys, 1, 8);
        assert!(t.tile_q >= 1 && t.tile_k >= 1 && t.n_splits >= 1, "{t:?}");
    }
}

/// An attention's `out` and `lse` for `case` against the naive f64 oracle: no NaN, outputs
/// within 1e-5 of max |naive|, LSE within 1e-5 relative to max(1, |lse|), a hidden row·head
/// exactly zero with LSE −inf.
fn check_against_naive(case: &Case, out: &[f32], lse: &[f32]) -> Result<(), TestCaseError> {
    let (want, want_lse) = attention_naive(&case.inputs()).unwrap();
    prop_assert!(out.iter().chain(lse).all(|x| !x.is_nan()), "NaN in output");
    let err = max_rel_diff(out, &want);
    prop_assert!(err <= 1e-5, "relative error {err}");
    let d = case.shape.head_dim;
    for (i, (&got, &expect)) in lse.iter().zip(&want_lse).enumerate() {
        if expect == f64::NEG_INFINITY {
            prop_assert_eq!(got, f32::NEG_INFINITY, "lse of hidden row·head {}", i);
            prop_assert!(
                out[i * d..][..d].iter().all(|&x| x == 0.0),
                "hidden row·head {}",
                i
            );
        } else {
            let tol = 1e-5 * expect.abs().max(1.0);
            prop_assert!(
                (got as f64 - expect).abs() <= tol,
                "lse {}: {} vs {}",
                i,
                got,
                expect
            );
        }
    }
    Ok(())
}

fn run_flash(case: &Case, tile_k: usize) -> (Vec<f32>, Vec<f32>) {
    let inp = case.inputs();
    // Poisoned so an unwritten element shows.
    let mut out = vec![f32::NAN; inp.rows() * case.shape.q_dim()];
    let mut lse = vec![f32::NAN; inp.rows() * case.shape.n_heads];
    attention_flash_with(&inp, tile_k, &mut out, Some(&mut lse)).unwrap();
    (out, lse)
}

/// Queries read in place from wider rows (the fused q|k|v matrix): the first `q_dim` values of
/// each row of `q_stride`, the rest never read (NaN there would show), the same bits as dense
/// queries; a stride below `q_dim` or a length that is not `rows × q_stride` is refused.
#[test]
fn flash_reads_strided_queries_in_place() {
    let case = build_case(&CaseParams {
        seqs: vec![(7, 9), (5, 30)],
        extra_slots: 3,
        shape: AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        },
        joint: false,
        query_branch: None,
        seed: 11,
    });
    let (want, want_lse) = run_flash(&case, TILE_K);
    let q_dim = case.shape.q_dim();
    let stride = q_dim + 2 * case.shape.kv_dim();
    let wide: Vec<f32> = case
        .q
        .chunks_exact(q_dim)
        .flat_map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(f32::NAN, stride - q_dim))
        })
        .collect();
    let inp = AttnInputs {
        q: &wide,
        ..case.inputs()
    };
    let mut out = vec![f32::NAN; want.len()];
    let mut lse = vec![f32::NAN; want_lse.len()];
    attention_flash_strided(&inp, stride, TILE_K, &mut out, Some(&mut lse)).unwrap();
    assert_eq!(bits(&out), bits(&want));
    assert_eq!(bits(&lse), bits(&want_lse));
    for bad in [q_dim - 1, stride + 1] {
        let err = attention_flash_strided(&inp, bad, TILE_K, &mut out, None).unwrap_err();
        assert!(err.to_string().contains("q has"), "stride {bad}: {err}");
    }
}

/// Sequence `s` of `case` as a case of its own (its rows, its keys, the same pool).
fn one_sequence(case: &Case, s: usize) -> Case {
    let (r0, r1) = (case.seq_indptr[s] as usize, case.seq_indptr[s + 1] as usize);
    let (k0, k1) = (case.kv_indptr[s] as usize, case.kv_indptr[s + 1] as usize);
    let q_dim = case.shape.q_dim();
    Case {
        q: case.q[r0 * q_dim..r1 * q_dim].to_vec(),
        row_tags: case.row_tags[r0..r1].to_vec(),
        seq_indptr: vec![0, (r1 - r0) as u32],
        kv_indptr: vec![0, (k1 - k0) as u32],
        kv_indices: case.kv_indices[k0..k1].to_vec(),
        kv_tags: case.kv_tags[k0..k1].to_vec(),
        ..case.clone()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each sequence of `case` alone, and the rows `pick(sequence, its rows, row)` of it alone (one
/// row is one query tile), give the bits `out` and `lse` have in the whole call.
fn assert_alone_bits(
    case: &Case,
    (out, lse): (&[f32], &[f32]),
    tile_k: usize,
    pick: impl Fn(usize, usize, usize) -> bool,
) {
    let (q_dim, nh) = (case.shape.q_dim(), case.shape.n_heads);
    for s in 0..case.seq_indptr.len() - 1 {
        let alone = one_sequence(case, s);
        let (o, l) = run_flash(&alone, tile_k);
        let r0 = case.seq_indptr[s] as usize;
        let n = alone.row_tags.len();
        assert_eq!(
            bits(&o),
            bits(&out[r0 * q_dim..(r0 + n) * q_dim]),
            "seq {s}"
        );
        assert_eq!(
            bits(&l),
            bits(&lse[r0 * nh..(r0 + n) * nh]),
            "seq {s} (lse)"
        );
        for i in (0..n).filter(|&i| pick(s, n, i)) {
            let mut row = alone.clone();
            row.q = alone.q[i * q_dim..(i + 1) * q_dim].to_vec();
            row.row_tags = vec![alone.row_tags[i]];
            row.seq_indptr = vec![0, 1];
            let (o1, l1) = run_flash(&row, tile_k);
            assert_eq!(
                bits(&o1),
                bits(&o[i * q_dim..(i + 1) * q_dim]),
                "seq {s} row {i}"
            );
            assert_eq!(bits(&l1), bits(&l[i * nh..(i + 1) * nh]), "seq {s} row {i}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The CPU backend's attention matches the f64 oracle as the tiled one must (outputs within
    /// 1e-5 of max |naive|, LSE within 1e-5 relative to max(1, |lse|), hidden rows exactly zero
    /// with LSE −inf, no NaN, every element written), with key tiles of 1..17 keys (partial
    /// tiles, Mixed and Hidden tiles at these sizes) and its default; GQA, empty key lists and
    /// registers come from the case strategy. Each sequence computed alone gives the same bits
    /// as in the batch, and so does every single row alone.
    #[test]
    fn flash_matches_naive(p in params_strategy(), tile_k in prop::sample::select(vec![1usize, 2, 3, 5, 8, 16, 17, TILE_K])) {
        let case = build_case(&p);
        let (out, lse) = run_flash(&case, tile_k);
        check_against_naive(&case, &out, &lse)?;
        let q_dim = case.shape.q_dim();
        let n_heads = case.shape.n_heads;
        for s in 0..case.seq_indptr.len() - 1 {
            let alone = one_sequence(&case, s);
            let (o, l) = run_flash(&alone, tile_k);
            let r0 = case.seq_indptr[s] as usize;
            let n = alone.row_tags.len();
            prop_assert_eq!(bits(&o), bits(&out[r0 * q_dim..(r0 + n) * q_dim]), "sequence {} alone", s);
            prop_assert_eq!(bits(&l), bits(&lse[r0 * n_heads..(r0 + n) * n_heads]), "sequence {} alone (lse)", s);
            for i in 0..n {
                let mut row = alone.clone();
                row.q = alone.q[i * q_dim..(i + 1) * q_dim].to_vec();
                row.row_tags = vec![alone.row_tags[i]];
                row.seq_indptr = vec![0, 1];
                let (o1, _) = run_flash(&row, tile_k);
                prop_assert_eq!(bits(&o1), bits(&o[i * q_dim..(i + 1) * q_dim]), "sequence {} row {} alone", s, i);
            }
        }
    }
}

/// Many rows and keys (several query tiles and key tiles of the default size, GQA, head_dim 64
/// and 72 for the vector-column tail), each sequence alone, and 1 vs 3 threads: the same bits.
#[test]
fn flash_large_cases_match_naive_and_are_batch_and_thread_invariant() {
    for (head_dim, seed) in [(64usize, 1u64), (72, 2), (16, 3)] {
        let p = CaseParams {
            seqs: vec![(150, 300), (70, 0), (0, 40), (33, 500)],
            extra_slots: 7,
            shape: AttnShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim,
            },
            joint: seed % 2 == 0,
            query_branch: Some(Branch::Image),
            seed,
        };
        let case = build_case(&p);
        let run_on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run_flash(&case, TILE_K))
        };
        let (out, lse) = run_on(1);
        let (out3, lse3) = run_on(3);
        assert_eq!(bits(&out), bits(&out3));
        assert_eq!(bits(&lse), bits(&lse3));
        let (want, _) = attention_naive(&case.inputs()).unwrap();
        let err = max_rel_diff(&out, &want);
        assert!(err <= 1e-5, "head_dim {head_dim}: relative error {err}");
        let q_dim = case.shape.q_dim();
        for s in 0..case.seq_indptr.len() - 1 {
            let alone = one_sequence(&case, s);
            let (o, _) = run_flash(&alone, TILE_K);
            let r0 = case.seq_indptr[s] as usize;
            assert_eq!(
                bits(&o),
                bits(&out[r0 * q_dim..r0 * q_dim + o.len()]),
                "head_dim {head_dim}: sequence {s} alone"
            );
        }
        // The default entry point is the same computation.
        let inp = case.inputs();
        let mut o = vec![f32::NAN; out.len()];
        attention_flash(&inp, &mut o, None).unwrap();
        assert_eq!(bits(&o), bits(&out));
    }
}

/// Sequences whose keys and values per head pass [`KV_STREAM_BYTES`] get fewer, larger query
/// tiles (of balanced size, up to [`TILE_Q_STREAM`] rows) and the others [`TILE_Q`]; a row's
/// result does not depend on the tile it lands in: against the oracle, each sequence alone, and
/// rows taken alone (one row is one tile) give the same bits.
#[test]
fn flash_streaming_tiles_match_naive_and_rows_alone() {
    let shape = AttnShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 128,
    };
    // One head's K/V: 1076 keys · 128 · 8 bytes > 1 MiB; 700 keys stay below.
    let big = KV_STREAM_BYTES / (shape.head_dim * 8) + 52;
    let p = CaseParams {
        seqs: vec![
            (400 - 1, big + 1 - 400),
            (150, 700 - 150),
            (TILE_Q_STREAM + 3, big),
        ],
        extra_slots: 5,
        shape,
        joint: true,
        query_branch: Some(Branch::Image),
        seed: 11,
    };
    let case = build_case(&p);
    let keys = |s: usize| (case.kv_indptr[s + 1] - case.kv_indptr[s]) as usize;
    let rows = |s: usize| (case.seq_indptr[s + 1] - case.seq_indptr[s]) as usize;
    assert_eq!(
        query_tile(rows(0), keys(0), 128),
        133,
        "399 rows: three tiles of 133"
    );
    assert_eq!(query_tile(rows(1), keys(1), 128), TILE_Q);
    assert_eq!(
        query_tile(rows(2), keys(2), 128),
        TILE_Q_STREAM.div_ceil(2) + 2
    );
    let (out, lse) = run_flash(&case, TILE_K);
    check_against_naive(&case, &out, &lse).unwrap();
    // The first and last rows of each tile, and some inside.
    assert_alone_bits(&case, (&out, &lse), TILE_K, |s, n, i| {
        let tile = query_tile(n, keys(s), 128);
        i % tile <= 1 || i % tile == tile - 1 || i % 61 == 7
    });
}

/// `case` with sequence `s`'s keys removed (its rows then see nothing).
fn drop_keys_of(case: &Case, s: usize) -> Case {
    let (k0, k1) = (case.kv_indptr[s] as usize, case.kv_indptr[s + 1] as usize);
    let mut c = case.clone();
    c.kv_indices.drain(k0..k1);
    c.kv_tags.drain(k0..k1);
    for p in &mut c.kv_indptr[s + 1..] {
        *p -= (k1 - k0) as u32;
    }
    c
}

/// Streaming tiles at the edges: one head, GQA groups of 3, head_dim 8, 24 and 40 (no whole
/// 16-lane vector of columns, or a tail), rows of either branch in non-joint layers (rows that
/// see no key), sequences with no rows or no keys beside streaming ones, key tiles of 17 and 128,
/// 1 vs 3 threads: against the oracle, each sequence and sampled rows alone, the same bits.
#[test]
fn flash_streaming_tiles_edge_cases() {
    let mut hidden = 0;
    for (n_heads, n_kv_heads, head_dim, joint, seed) in [
        (1, 1, 24, false, 5),
        (3, 1, 40, true, 6),
        (2, 2, 8, false, 7),
    ] {
        let big = KV_STREAM_BYTES / (head_dim * 8);
        let p = CaseParams {
            seqs: vec![
                (250, big + 100 - 250),
                (3, 0),
                (0, 10),
                (70, big + 1 - 70),
                (5, 7),
                (193, big),
            ],
            extra_slots: 3,
            shape: AttnShape {
                n_heads,
                n_kv_heads,
                head_dim,
            },
            joint,
            query_branch: None,
            seed,
        };
        let full = build_case(&p);
        for case in [full.clone(), drop_keys_of(&full, 1), drop_keys_of(&full, 4)] {
            for tile_k in [17, TILE_K] {
                let run_on = |threads, c: &Case| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| run_flash(c, tile_k))
                };
                let (out, lse) = run_on(1, &case);
                let (out3, lse3) = run_on(3, &case);
                assert_eq!(
                    bits(&out),
                    bits(&out3),
                    "d{head_dim} tile_k {tile_k}: 1 vs 3"
                );
                assert_eq!(
                    bits(&lse),
                    bits(&lse3),
                    "d{head_dim} tile_k {tile_k}: 1 vs 3"
                );
                check_against_naive(&case, &out, &lse).unwrap();
                hidden += lse.iter().filter(|x| **x == f32::NEG_INFINITY).count();
                assert_alone_bits(&case, (&out, &lse), tile_k, |_, n, i| {
                    i % 37 == 0 || i + 1 == n || i % 125 <= 1
                });
            }
        }
    }
    assert!(
        hidden > 0,
        "no row saw nothing: the zero/−inf path went untested"
    );
}

/// The tile rule: [`TILE_Q`] while one head's K/V fit [`KV_STREAM_BYTES`]; past it, as few
/// tiles of at most [`TILE_Q_STREAM`] rows as the rows need, balanced, covering every row.
#[test]
fn query_tiles_cover_the_rows_in_as_few_balanced_tiles_as_needed() {
    let d = 64;
    let fits = KV_STREAM_BYTES / (d * 8);
    for rows in [0, 1, 63, 64, 65, 1000] {
        assert_eq!(query_tile(rows, fits, d), TILE_Q, "{rows} rows, K/V fit");
    }
    for rows in [
        0usize,
        1,
        47,
        140,
        TILE_Q_STREAM,
        TILE_Q_STREAM + 1,
        1000,
        4161,
    ] {
        let tile = query_tile(rows, fits + 1, d);
        assert!(
            (1..=TILE_Q_STREAM).contains(&tile),
            "{rows} rows: tile {tile}"
        );
        let tiles = rows.div_ceil(tile);
        assert_eq!(
            tiles,
            rows.div_ceil(TILE_Q_STREAM),
            "{rows} rows: tile {tile}"
        );
        // Balanced: the last tile is short of the others by fewer rows than there are tiles.
        if tiles > 1 {
            assert!(
                rows - (tiles - 1) * tile + tiles > tile,
                "{rows} rows: tile {tile}"
            );
        }
    }
    // Sizes that would overflow the byte count stream (never wrap to "fits").
    assert!(query_tile(10, usize::MAX / 2, d) <= TILE_Q_STREAM);
}

/// As for the tiled kernel: a key tile hidden from every query of the tile is skipped without
/// reading K/V (its keys hold NaN).
#[test]
fn flash_skips_hidden_tiles_without_reading_kv() {
    let image = Branch::Image;
    let rows = vec![Tag::new(image, 1, false), Tag::new(image, 2, false)];
    let mut keys = vec![Tag::new(image, 3, true); 4];
    keys.extend((0..4).map(|i| Tag::new(image, i % 2, false)));
    let mut case = small_case(rows, keys, vec![7, 1, 5, 3, 0, 6, 2, 4], 8);
    let (want, _) = attention_naive(&case.inputs()).unwrap();
    for s in [7usize, 1, 5, 3] {
        for i in s * 4..s * 4 + 4 {
            case.k_pool[i] = f32::NAN;
            case.v_pool[i] = f32::NAN;
        }
    }
    let (out, _) = run_flash(&case, 4);
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    let err = max_rel_diff(&out, &want);
    assert!(err < 1e-5, "{out:?} vs {want:?}");
}

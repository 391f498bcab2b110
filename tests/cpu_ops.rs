//! The CPU kernels (`backend::cpu::ops`) against naive f64 oracles written here, plus invariants
//! (RoPE relative positions, Gumbel-max frequencies), Random123 known answers for Philox, and the
//! tie between `masked_softmax` and the attention oracle.

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_lavida::Error;
use sparse_lavida::backend::cpu::attention::{AttnInputs, AttnShape, attention_naive};
use sparse_lavida::backend::cpu::ops::{
    SoftmaxMask, embed, gumbel, masked_softmax, matmul_t, philox4x32_10, rmsnorm, rope,
    sample_rows, swiglu,
};
use sparse_lavida::backend::{SampleParams, Sampled};
use sparse_lavida::config::Branch;
use sparse_lavida::plan::{REGISTER, Tag, visible};

/// f32 unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random_vec(r: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| r.gen_range(-scale..scale)).collect()
}

/// A pool with more threads than the machine has cores, so that "fewer rows than threads"
/// (the column split of `matmul_t`) is exercised.
fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn input_message<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// matmul_t

/// Checks `matmul_t` on one shape against an f64 triple loop. The bound is the classical one for
/// a length-k dot product in f32 in any summation order (Higham, γ_{k+1} = (k+1)u / (1 − (k+1)u)
/// times Σ|x·w|, plus |old| when accumulating), so it holds for any blocking sgemm chooses while
/// an indexing or transposition bug gives errors of the size of the values themselves.
fn check_matmul(seed: u64, rows: usize, k: usize, n: usize, accumulate: bool) {
    let mut r = rng(seed);
    let x = random_vec(&mut r, rows * k, 2.0);
    let w = random_vec(&mut r, n * k, 2.0);
    let old = if accumulate {
        random_vec(&mut r, rows * n, 3.0)
    } else {
        vec![f32::NAN; rows * n] // must never be read
    };
    let mut out = old.clone();
    matmul_t(&x, rows, k, &w, n, &mut out, accumulate).unwrap();

    let gamma = (k + 1) as f64 * U / (1.0 - (k + 1) as f64 * U);
    for i in 0..rows {
        for j in 0..n {
            let (mut dot, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let t = f64::from(x[i * k + p]) * f64::from(w[j * k + p]);
                dot += t;
                mag += t.abs();
            }
            if accumulate {
                dot += f64::from(old[i * n + j]);
                mag += f64::from(old[i * n + j]).abs();
            }
            let got = f64::from(out[i * n + j]);
            assert!(
                (got - dot).abs() <= gamma * mag + f64::from(f32::MIN_POSITIVE),
                "rows {rows} k {k} n {n} acc {accumulate}: out[{i},{j}] = {got}, want {dot}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn matmul_matches_f64_oracle(
        rows in 1usize..48, k in 1usize..96, n in 1usize..80, acc: bool, seed: u64,
    ) {
        pool(8).install(|| check_matmul(seed, rows, k, n, acc));
    }
}

#[test]
fn matmul_edge_shapes_and_thread_splits() {
    // (rows, k, n): 1×1×1, k = 1, rows = 1 (GEMV, column split), rows < threads with enough
    // work to split, rows ≥ threads (row split), uneven chunk tails.
    let shapes = [
        (1, 1, 1),
        (1, 1, 37),
        (5, 1, 3),
        (1, 300, 1001),
        (3, 257, 509),
        (7, 129, 300),
        (203, 64, 97),
        (1000, 3, 41),
    ];
    for (s, &(rows, k, n)) in shapes.iter().enumerate() {
        for acc in [false, true] {
            for threads in [1, 3, 8] {
                pool(threads)
                    .install(|| check_matmul(s as u64 * 31 + threads as u64, rows, k, n, acc));
            }
        }
    }
}

#[test]
fn matmul_k_zero_and_empty_shapes() {
    let mut out = vec![f32::NAN; 6];
    matmul_t(&[], 2, 0, &[], 3, &mut out, false).unwrap();
    assert_eq!(out, vec![0.0; 6]);
    let mut out = vec![1.5; 6];
    matmul_t(&[], 2, 0, &[], 3, &mut out, true).unwrap();
    assert_eq!(out, vec![1.5; 6]);
    matmul_t(&[], 0, 4, &[1.0; 8], 2, &mut [], false).unwrap();
}

#[test]
fn matmul_shape_errors_name_argument_and_sizes() {
    let x = vec![1.0; 6];
    let w = vec![1.0; 12];
    let mut out = vec![0.0; 8];
    let m = input_message(matmul_t(&x[..5], 2, 3, &w, 4, &mut out, false));
    assert!(m.contains("x has 5") && m.contains("= 6"), "{m}");
    let m = input_message(matmul_t(&x, 2, 3, &w[..11], 4, &mut out, false));
    assert!(m.contains("w has 11") && m.contains("= 12"), "{m}");
    let m = input_message(matmul_t(&x, 2, 3, &w, 4, &mut out[..7], false));
    assert!(m.contains("out has 7") && m.contains("= 8"), "{m}");
}

// ---------------------------------------------------------------------------------------------
// rmsnorm, swiglu, embed

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Per element the kernel rounds inv_rms to f32 and does two f32 products: ≤ 3u ≈ 1.8e-7
    /// relative (the f64 sum of squares adds nothing measurable), so 1e-6 is safe.
    #[test]
    fn rmsnorm_matches_f64_oracle(
        rows in 1usize..9, d in 1usize..200, log_scale in -3.0f32..3.0, seed: u64,
    ) {
        let mut r = rng(seed);
        let x = random_vec(&mut r, rows * d, 10f32.powf(log_scale));
        let w = random_vec(&mut r, d, 2.0);
        let eps = r.gen_range(1e-6f32..1e-2);
        let mut out = vec![f32::NAN; rows * d];
        rmsnorm(&x, &w, eps, &mut out).unwrap();
        for i in 0..rows {
            let row = &x[i * d..(i + 1) * d];
            let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            for j in 0..d {
                let want = f64::from(row[j]) * inv * f64::from(w[j]);
                let got = f64::from(out[i * d + j]);
                prop_assert!((got - want).abs() <= 1e-6 * want.abs() + 1e-37,
                    "out[{},{}] = {}, want {}", i, j, got, want);
            }
        }
    }

    /// silu(g)·u in f32: exp, one add, one division, one product, each ≤ ~1 ulp: 1e-5 relative
    /// is loose but still catches a wrong formula or a pairing bug.
    #[test]
    fn swiglu_matches_f64_oracle(len in 0usize..3000, seed: u64) {
        let mut r = rng(seed);
        let gate = random_vec(&mut r, len, 20.0);
        let up = random_vec(&mut r, len, 3.0);
        let mut out = vec![f32::NAN; len];
        swiglu(&gate, &up, &mut out).unwrap();
        for i in 0..len {
            let g = f64::from(gate[i]);
            let want = g / (1.0 + (-g).exp()) * f64::from(up[i]);
            let got = f64::from(out[i]);
            prop_assert!((got - want).abs() <= 1e-5 * want.abs() + 1e-37,
                "out[{}] = {}, want {} (g {}, u {})", i, got, want, gate[i], up[i]);
        }
    }

    #[test]
    fn embed_gathers_rows_and_registers(
        rows_table in 1usize..20, d in 1usize..17, n in 0usize..30, seed: u64,
    ) {
        let mut r = rng(seed);
        let table = random_vec(&mut r, rows_table * d, 5.0);
        let register = random_vec(&mut r, d, 5.0);
        let ids: Vec<u32> = (0..n)
            .map(|_| if r.gen_bool(0.2) { REGISTER } else { r.gen_range(0..rows_table as u32) })
            .collect();
        let mut out = vec![f32::NAN; n * d];
        embed(&table, d, &register, &ids, &mut out).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let want = if id == REGISTER {
                &register[..]
            } else {
                &table[id as usize * d..(id as usize + 1) * d]
            };
            prop_assert_eq!(&out[i * d..(i + 1) * d], want, "row {} id {}", i, id);
        }
    }
}

#[test]
fn rmsnorm_errors() {
    let mut out = vec![0.0; 6];
    let m = input_message(rmsnorm(&[1.0; 6], &[], 1e-5, &mut out));
    assert!(m.contains("w is empty"), "{m}");
    let m = input_message(rmsnorm(&[1.0; 6], &[1.0; 4], 1e-5, &mut out));
    assert!(m.contains("6") && m.contains("d = 4"), "{m}");
    let m = input_message(rmsnorm(&[1.0; 6], &[1.0; 3], 1e-5, &mut out[..5]));
    assert!(m.contains("out has 5") && m.contains("x has 6"), "{m}");
    input_message(rmsnorm(&[1.0; 6], &[1.0; 3], -1.0, &mut out));
}

#[test]
fn swiglu_extremes_and_errors() {
    let gate = [-100.0f32, -88.0, 88.0, 100.0];
    let up = [1.5f32; 4];
    let mut out = [f32::NAN; 4];
    swiglu(&gate, &up, &mut out).unwrap();
    assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
    assert_eq!(out[3], 150.0);
    assert!(out[0].abs() < 1e-30);
    let m = input_message(swiglu(&gate, &up[..3], &mut out));
    assert!(m.contains("up has 3") && m.contains("gate has 4"), "{m}");
    let m = input_message(swiglu(&gate, &up, &mut out[..2]));
    assert!(m.contains("out has 2"), "{m}");
}

#[test]
fn embed_out_of_range_id_is_an_error_naming_row_and_id() {
    let table: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 + 1.0).collect(); // 4 rows of d = 3
    let register = [9.0, 8.0, 7.0];
    let mut out = vec![-1.0; 9];
    let m = input_message(embed(&table, 3, &register, &[1, REGISTER, 4], &mut out));
    assert!(
        m.contains("ids[2]") && m.contains("4") && m.contains("4 rows"),
        "{m}"
    );
    assert_eq!(out, vec![-1.0; 9], "out must be untouched on error");
    let m = input_message(embed(&table, 3, &register[..2], &[1], &mut out[..3]));
    assert!(m.contains("register has 2"), "{m}");
    let m = input_message(embed(&table, 3, &register, &[1, 2], &mut out[..3]));
    assert!(m.contains("out has 3") && m.contains("= 6"), "{m}");
}

// ---------------------------------------------------------------------------------------------
// rope

fn rope_oracle(x: &[f32], heads: usize, hd: usize, pos: &[u32], theta: f64) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let half = hd / 2;
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = r * heads * hd + h * hd;
            for i in 0..half {
                let ang = f64::from(p) * theta.powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = (out[base + i], out[base + i + half]);
                out[base + i] = a * ang.cos() - b * ang.sin();
                out[base + i + half] = a * ang.sin() + b * ang.cos();
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// cos/sin rounded to f32 plus two products and a sum in f32: ≤ ~4u·(|a|+|b|) ≈ 2.4e-7.
    #[test]
    fn rope_matches_f64_oracle(
        rows in 1usize..6, heads in 1usize..4, half in 1usize..33, big_theta: bool, seed: u64,
    ) {
        let hd = 2 * half;
        let theta = if big_theta { 500_000.0 } else { 10_000.0 };
        let mut r = rng(seed);
        let x = random_vec(&mut r, rows * heads * hd, 3.0);
        let pos: Vec<u32> = (0..rows).map(|_| r.gen_range(0..5000)).collect();
        let mut got = x.clone();
        rope(&mut got, heads, hd, &pos, theta).unwrap();
        let want = rope_oracle(&x, heads, hd, &pos, theta);
        for row in 0..rows {
            for h in 0..heads {
                for i in 0..hd {
                    let e = row * heads * hd + h * hd + i;
                    let partner = if i < half { e + half } else { e - half };
                    let tol = 1e-6 * (f64::from(x[e].abs()) + f64::from(x[partner].abs()));
                    prop_assert!((f64::from(got[e]) - want[e]).abs() <= tol,
                        "row {} head {} i {}: {} vs {}", row, h, i, got[e], want[e]);
                }
            }
        }
    }

    /// ⟨R(p)a, R(p')b⟩ depends only on p' − p, and equals ⟨a, R(p'−p)b⟩.
    #[test]
    fn rope_dot_depends_only_on_relative_position(
        heads in 1usize..4, half in 1usize..33, p in 0u32..4000, p2 in 0u32..4000,
        shift in 0u32..4000, seed: u64,
    ) {
        let hd = 2 * half;
        let mut r = rng(seed);
        let a = random_vec(&mut r, heads * hd, 1.0);
        let b = random_vec(&mut r, heads * hd, 1.0);
        let rot = |v: &[f32], pos: u32| {
            let mut v = v.to_vec();
            rope(&mut v, heads, hd, &[pos], 10_000.0).unwrap();
            v
        };
        let tol = 1e-4 * norm(&a) * norm(&b);
        let d0 = dot(&rot(&a, p), &rot(&b, p2));
        let d1 = dot(&rot(&a, p + shift), &rot(&b, p2 + shift));
        prop_assert!((d0 - d1).abs() <= tol, "{} vs {}", d0, d1);
        if p2 >= p {
            let d2 = dot(&a, &rot(&b, p2 - p));
            prop_assert!((d0 - d2).abs() <= tol, "{} vs {}", d0, d2);
        }
    }
}

#[test]
fn rope_position_zero_is_identity_and_errors() {
    let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
    let mut y = x.clone();
    rope(&mut y, 2, 8, &[0], 10_000.0).unwrap();
    assert_eq!(x, y);
    let m = input_message(rope(&mut y, 2, 7, &[0], 10_000.0));
    assert!(m.contains("head_dim (7)"), "{m}");
    let m = input_message(rope(&mut y, 2, 8, &[0, 1], 10_000.0));
    assert!(m.contains("x has 16") && m.contains("= 32"), "{m}");
    input_message(rope(&mut y, 2, 8, &[0], f64::NAN));
}

// ---------------------------------------------------------------------------------------------
// Philox and Gumbel

/// Random123 `tests/kat_vectors` (github.com/DEShawResearch/random123), the three
/// `philox4x32 10` lines: counter[4] key[2] → output[4].
#[test]
fn philox_known_answers() {
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in kat {
        assert_eq!(
            philox4x32_10(ctr, key),
            want,
            "ctr {ctr:08x?} key {key:08x?}"
        );
    }
}

#[test]
fn gumbel_is_finite_and_in_range() {
    let mut r = rng(7);
    for _ in 0..20_000 {
        let g = gumbel(r.r#gen(), r.r#gen(), r.r#gen(), r.r#gen(), r.r#gen());
        // u ∈ [2^-25, 1 − 2^-25]: g ∈ [−ln(25 ln 2), −ln(2^-25)] ≈ [−2.85, 17.33].
        assert!(g.is_finite() && (-2.9..17.4).contains(&g), "{g}");
    }
}

#[test]
fn gumbel_moments_match_the_standard_gumbel() {
    // Standard Gumbel: mean γ ≈ 0.5772, variance π²/6 ≈ 1.645. 40000 draws: the mean's std
    // error is ≈ 0.0064, the variance's ≈ 0.02.
    let n = 40_000u32;
    let draws: Vec<f64> = (0..n)
        .map(|i| f64::from(gumbel(99, i, i / 7, 3, 1)))
        .collect();
    let mean = draws.iter().sum::<f64>() / f64::from(n);
    let var = draws.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / f64::from(n);
    assert!((mean - 0.577_215_66).abs() < 0.03, "mean {mean}");
    assert!(
        (var - std::f64::consts::PI.powi(2) / 6.0).abs() < 0.1,
        "var {var}"
    );
}

// ---------------------------------------------------------------------------------------------
// sample_rows

fn params(positions: Vec<u32>, guidance: Option<f32>, temperature: f32) -> SampleParams {
    SampleParams {
        guidance,
        temperature,
        banned: vec![],
        seed: 0x5eed_0000_1234_abcd,
        step: 3,
        request: 1,
        positions,
    }
}

/// The combined logits `l` of sampled row `i`, in f32 exactly as SPEC §4.1 writes it.
fn combined(logits: &[f32], vocab: usize, p: &SampleParams, i: usize) -> Vec<f32> {
    let n = p.positions.len();
    let cond = &logits[i * vocab..(i + 1) * vocab];
    match p.guidance {
        None => cond.to_vec(),
        Some(g) => {
            let uncond = &logits[(n + i) * vocab..(n + i + 1) * vocab];
            cond.iter()
                .zip(uncond)
                .map(|(&c, &u)| (1.0 + g) * c - g * u)
                .collect()
        }
    }
}

/// Independent reference of one sampled row: argmax over allowed ids of the score, computed in a
/// separate pass with the public `gumbel`, and lse/confidence in f64 (two-pass, max-shifted).
fn reference_row(l: &[f32], p: &SampleParams, i: usize) -> (u32, f64, f64) {
    let tau = p.temperature;
    let allowed = |v: usize| !p.banned.contains(&(v as u32));
    let mut token = None;
    let mut best = f32::NEG_INFINITY;
    for (v, &lv) in l.iter().enumerate().filter(|&(v, _)| allowed(v)) {
        let score = if tau > 0.0 {
            lv / tau + gumbel(p.seed, v as u32, p.positions[i], p.step, p.request)
        } else {
            lv
        };
        if token.is_none() || score > best {
            token = Some(v);
            best = score;
        }
    }
    let t = if tau > 0.0 { f64::from(tau) } else { 1.0 };
    let s: Vec<f64> = l.iter().map(|&lv| f64::from(lv) / t).collect();
    let m = (0..l.len())
        .filter(|&v| allowed(v))
        .map(|v| s[v])
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = (0..l.len())
        .filter(|&v| allowed(v))
        .map(|v| (s[v] - m).exp())
        .sum();
    let lse = m + sum.ln();
    let token = token.expect("some id allowed");
    (token as u32, (s[token] - lse).exp(), lse)
}

fn check_against_reference(logits: &[f32], vocab: usize, p: &SampleParams) -> Vec<Sampled> {
    let got = sample_rows(logits, vocab, p).unwrap();
    assert_eq!(got.len(), p.positions.len());
    for (i, s) in got.iter().enumerate() {
        let l = combined(logits, vocab, p, i);
        let (token, conf, lse) = reference_row(&l, p, i);
        assert_eq!(s.token, token, "row {i}");
        // l/τ is rounded to f32 in the kernel: ≤ u·|l/τ| per term, so ≤ u·max|l/τ| in the lse.
        let scale = l.iter().map(|v| f64::from(v.abs())).fold(1.0, f64::max)
            / f64::from(if p.temperature > 0.0 {
                p.temperature
            } else {
                1.0
            });
        let tol = 4.0 * U * scale + 1e-6;
        assert!(
            (f64::from(s.lse) - lse).abs() <= tol * (1.0 + lse.abs()),
            "row {i}: lse {} vs {lse}",
            s.lse
        );
        assert!(
            (f64::from(s.confidence) - conf).abs() <= 2.0 * tol * conf + 1e-30,
            "row {i}: confidence {} vs {conf}",
            s.confidence
        );
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// (d), (e): token, lse and confidence against the independent reference, with and without
    /// CFG, τ = 0 and τ > 0, with banned ids; vocab sizes not a multiple of 4.
    #[test]
    fn sample_rows_matches_reference(
        n in 1usize..7, vocab in 1usize..300, cfg: bool, tau_i in 0usize..4, n_banned in 0usize..4,
        seed: u64,
    ) {
        let mut r = rng(seed);
        let guidance = cfg.then(|| r.gen_range(0.0f32..5.0));
        let rows = if cfg { 2 * n } else { n };
        let logits = random_vec(&mut r, rows * vocab, 8.0);
        let tau = [0.0f32, 0.5, 1.0, 1.7][tau_i];
        let mut p = params((0..n).map(|_| r.gen_range(0..5000)).collect(), guidance, tau);
        p.seed = r.r#gen();
        p.step = r.gen_range(0..64);
        p.request = r.gen_range(0..8);
        if vocab > n_banned {
            p.banned = (0..n_banned).map(|_| r.gen_range(0..vocab as u32)).collect();
        }
        check_against_reference(&logits, vocab, &p);
    }
}

#[test]
fn sample_rows_zero_temperature_is_argmax_ties_to_lower_id() {
    // (a) vocab 7: the tail group of the 4-id walk is partial.
    let vocab = 7;
    let logits = [
        0.1, 0.9, -0.3, 0.2, 0.5, 0.0, -1.0, // row 0: max at 1
        0.3, 0.2, 1.5, -0.1, 0.4, 1.5, 0.7, // row 1: tie at 2 and 5
        2.0, 0.1, -0.2, 0.3, 0.4, 0.6, 2.0, // row 2: tie at 0 and 6
        -0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.25, // row 3: max at the last id
    ];
    let p = params(vec![10, 11, 12, 13], None, 0.0);
    let got = check_against_reference(&logits, vocab, &p);
    let tokens: Vec<u32> = got.iter().map(|s| s.token).collect();
    assert_eq!(tokens, vec![1, 2, 0, 6]);
}

#[test]
fn sample_rows_banned_id_never_wins() {
    // (b) id 5 has by far the largest logit in every row; with τ = 1 over many positions (and
    // τ = 0) it must never be chosen, and its mass is excluded from the lse.
    let vocab = 9;
    let n = 500;
    let mut r = rng(3);
    let mut logits = random_vec(&mut r, n * vocab, 1.0);
    for i in 0..n {
        logits[i * vocab + 5] = 50.0;
    }
    for tau in [0.0, 1.0] {
        let mut p = params((0..n as u32).collect(), None, tau);
        p.banned = vec![5, 5];
        let got = check_against_reference(&logits, vocab, &p);
        assert!(got.iter().all(|s| s.token != 5));
        assert!(
            got.iter().all(|s| s.lse < 10.0),
            "banned logit leaked into the lse"
        );
    }
}

#[test]
fn sample_rows_cfg_equals_manual_combine() {
    // (c) rows i and n+i pair up; the noise is added after the combine, so sampling the
    // hand-combined rows without guidance gives bit-identical results.
    let (n, vocab) = (5, 37);
    let mut r = rng(11);
    let logits = random_vec(&mut r, 2 * n * vocab, 4.0);
    for tau in [0.0, 0.8] {
        let p = params(vec![3, 9, 4, 100, 7], Some(4.0), tau);
        let manual: Vec<f32> = (0..n)
            .flat_map(|i| combined(&logits, vocab, &p, i))
            .collect();
        let with_cfg = sample_rows(&logits, vocab, &p).unwrap();
        let by_hand = sample_rows(
            &manual,
            vocab,
            &SampleParams {
                guidance: None,
                ..p.clone()
            },
        );
        assert_eq!(with_cfg, by_hand.unwrap());
        // And not merely the conditional rows sampled alone.
        let cond_only = sample_rows(
            &logits[..n * vocab],
            vocab,
            &SampleParams {
                guidance: None,
                ..p
            },
        );
        assert_ne!(with_cfg, cond_only.unwrap());
    }
}

#[test]
fn sample_rows_is_deterministic_and_keyed_by_seed_step_position_request() {
    // (f) flat logits: the token is decided by the noise alone.
    let (n, vocab) = (64, 50);
    let logits = vec![0.3f32; n * vocab];
    let base = params((100..100 + n as u32).collect(), None, 1.0);
    let tokens = |p: &SampleParams| -> Vec<u32> {
        sample_rows(&logits, vocab, p)
            .unwrap()
            .iter()
            .map(|s| s.token)
            .collect()
    };
    let t0 = tokens(&base);
    assert_eq!(t0, tokens(&base));
    assert_eq!(
        t0,
        pool(8).install(|| tokens(&base)),
        "thread count must not matter"
    );
    assert!(
        t0.iter().any(|&t| t != t0[0]),
        "flat logits should give varied tokens"
    );
    let variants = [
        SampleParams {
            seed: base.seed + 1,
            ..base.clone()
        },
        SampleParams {
            seed: base.seed + (1 << 32),
            ..base.clone()
        },
        SampleParams {
            step: base.step + 1,
            ..base.clone()
        },
        SampleParams {
            request: base.request + 1,
            ..base.clone()
        },
        SampleParams {
            positions: (101..101 + n as u32).collect(),
            ..base.clone()
        },
    ];
    for (k, v) in variants.iter().enumerate() {
        assert_ne!(t0, tokens(v), "variant {k} did not change the noise");
    }
    // The noise depends on the position, not on the row index.
    let same_pos = SampleParams {
        positions: vec![555; n],
        ..base.clone()
    };
    let t = tokens(&same_pos);
    assert!(t.iter().all(|&x| x == t[0]));
}

/// Gumbel-max draws over `n` positions of one distribution; returns the frequencies.
fn gumbel_max_frequencies(logits_row: &[f32], tau: f32, n: usize) -> Vec<f64> {
    let vocab = logits_row.len();
    let logits: Vec<f32> = (0..n).flat_map(|_| logits_row.iter().copied()).collect();
    let p = params((0..n as u32).collect(), None, tau);
    let mut counts = vec![0usize; vocab];
    for s in sample_rows(&logits, vocab, &p).unwrap() {
        counts[s.token as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

#[test]
fn gumbel_max_frequencies_match_softmax() {
    // (g) 20000 draws: the std error of each frequency is ≤ 0.0036, so 0.015 is ~4 sigma.
    let n = 20_000;
    for (probs, tau) in [
        (vec![0.1f64, 0.2, 0.3, 0.4], 1.0f32),
        (vec![0.05, 0.15, 0.3, 0.1, 0.25, 0.15], 1.0), // ids 4, 5 use Philox counter word 0 = 1
        (vec![0.1, 0.2, 0.3, 0.4], 2.0),
    ] {
        let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let freq = gumbel_max_frequencies(&row, tau, n);
        let z: f64 = probs.iter().map(|p| p.powf(1.0 / f64::from(tau))).sum();
        for (v, (&f, &p)) in freq.iter().zip(&probs).enumerate() {
            let want = p.powf(1.0 / f64::from(tau)) / z;
            assert!(
                (f - want).abs() < 0.015,
                "tau {tau} id {v}: freq {f}, softmax {want}"
            );
        }
    }
}

#[test]
fn sample_rows_errors() {
    // (i)
    let vocab = 4;
    let logits: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect(); // 2 rows
    let m = input_message(sample_rows(&logits, vocab, &params(vec![0], None, 1.0)));
    assert!(m.contains("8 elements") && m.contains("1 rows"), "{m}");
    let m = input_message(sample_rows(
        &logits,
        vocab,
        &params(vec![0, 1], Some(2.0), 1.0),
    ));
    assert!(m.contains("4 rows") && m.contains("CFG"), "{m}");
    sample_rows(&logits, vocab, &params(vec![0], Some(2.0), 1.0)).unwrap();

    let mut nan = logits.clone();
    nan[7] = f32::NAN;
    let m = input_message(sample_rows(&nan, vocab, &params(vec![0, 1], None, 0.0)));
    assert!(m.contains("non-finite logit at row 1, id 3"), "{m}");
    let mut inf = logits.clone();
    inf[2] = f32::INFINITY;
    let m = input_message(sample_rows(&inf, vocab, &params(vec![0, 1], None, 1.0)));
    assert!(m.contains("row 0, id 2"), "{m}");

    let mut p = params(vec![0, 1], None, 1.0);
    p.banned = vec![3, 0, 2, 1];
    let m = input_message(sample_rows(&logits, vocab, &p));
    assert!(m.contains("banned"), "{m}");
    p.banned = vec![4];
    let m = input_message(sample_rows(&logits, vocab, &p));
    assert!(m.contains("banned id 4"), "{m}");

    for tau in [-0.5, f32::NAN, f32::INFINITY] {
        let m = input_message(sample_rows(&logits, vocab, &params(vec![0, 1], None, tau)));
        assert!(m.contains("temperature"), "{m}");
    }
    let m = input_message(sample_rows(
        &logits,
        vocab,
        &params(vec![0], Some(f32::NAN), 1.0),
    ));
    assert!(m.contains("guidance"), "{m}");
    let m = input_message(sample_rows(&logits, 0, &params(vec![], None, 1.0)));
    assert!(m.contains("vocab"), "{m}");
    assert!(
        sample_rows(&[], vocab, &params(vec![], None, 1.0))
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// masked_softmax

fn random_tag(r: &mut ChaCha8Rng) -> Tag {
    let branch = if r.gen_bool(0.5) {
        Branch::Image
    } else {
        Branch::Text
    };
    Tag::new(branch, r.gen_range(0..4), r.gen_bool(0.4))
}

/// f64 oracle of one row: `exp(x − max)/Σ` over the visible columns with `x = scale·score` in
/// f64, 0 elsewhere (all zeros when nothing is visible).
fn softmax_oracle(row: &[f32], vis: &[bool], scale: f32) -> Vec<f64> {
    let x: Vec<f64> = row
        .iter()
        .map(|&v| f64::from(scale) * f64::from(v))
        .collect();
    let m = (0..row.len())
        .filter(|&c| vis[c])
        .map(|c| x[c])
        .fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return vec![0.0; row.len()];
    }
    let sum: f64 = (0..row.len())
        .filter(|&c| vis[c])
        .map(|c| (x[c] - m).exp())
        .sum();
    (0..row.len())
        .map(|c| if vis[c] { (x[c] - m).exp() / sum } else { 0.0 })
        .collect()
}

/// Runs `masked_softmax` and checks it against the oracle: hidden columns exactly 0, visible
/// ones within the f32 rounding of `x` (u·|x| each for `x` and the max, plus the f32 `exp`),
/// no NaN, each row with a visible column summing to 1. Returns the output.
fn check_masked_softmax(
    scores: &[f32],
    n_rows: usize,
    n_cols: usize,
    mask: SoftmaxMask,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_rows * n_cols];
    masked_softmax(scores, n_rows, n_cols, mask, scale, &mut out).unwrap();
    let xmax = scores
        .iter()
        .map(|&v| f64::from(scale * v).abs())
        .fold(1.0, f64::max);
    let rel = 8.0 * U * (xmax + 1.0);
    for r in 0..n_rows {
        let vis: Vec<bool> = (0..n_cols)
            .map(|c| match mask {
                SoftmaxMask::Rule {
                    row_tags,
                    col_tags,
                    joint,
                } => visible(row_tags[r], col_tags[c], joint),
                SoftmaxMask::Prefix(p) => c < p[r] as usize,
            })
            .collect();
        let row = &scores[r * n_cols..][..n_cols];
        let want = softmax_oracle(row, &vis, scale);
        let got = &out[r * n_cols..][..n_cols];
        for c in 0..n_cols {
            let (g, w) = (f64::from(got[c]), want[c]);
            if !vis[c] {
                assert_eq!(got[c].to_bits(), 0, "row {r} col {c}: hidden but {g}");
            } else {
                assert!(
                    (g - w).abs() <= rel * w + 1e-30,
                    "row {r} col {c}: {g} vs {w} (rel tol {rel})"
                );
            }
        }
        if vis.iter().any(|&v| v) {
            let total: f64 = got.iter().map(|&v| f64::from(v)).sum();
            assert!((total - 1.0).abs() <= rel * 2.0, "row {r} sums to {total}");
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Rule mode: random tags (fully hidden rows happen often with few columns), joint or not.
    #[test]
    fn masked_softmax_rule_matches_f64_oracle(
        n_rows in 0usize..12, n_cols in 0usize..40, joint: bool, seed: u64,
    ) {
        let mut r = rng(seed);
        let scores = random_vec(&mut r, n_rows * n_cols, 8.0);
        let row_tags: Vec<Tag> = (0..n_rows).map(|_| random_tag(&mut r)).collect();
        let col_tags: Vec<Tag> = (0..n_cols).map(|_| random_tag(&mut r)).collect();
        let scale = r.gen_range(0.05f32..2.0);
        let mask = SoftmaxMask::Rule { row_tags: &row_tags, col_tags: &col_tags, joint };
        check_masked_softmax(&scores, n_rows, n_cols, mask, scale);
    }

    /// Prefix mode, prefixes anywhere in 0..=n_cols (0: a zero row).
    #[test]
    fn masked_softmax_prefix_matches_f64_oracle(
        n_rows in 0usize..12, n_cols in 0usize..70, seed: u64,
    ) {
        let mut r = rng(seed);
        let scores = random_vec(&mut r, n_rows * n_cols, 8.0);
        let prefix: Vec<u32> = (0..n_rows).map(|_| r.gen_range(0..=n_cols as u32)).collect();
        let scale = r.gen_range(0.05f32..2.0);
        check_masked_softmax(&scores, n_rows, n_cols, SoftmaxMask::Prefix(&prefix), scale);
    }
}

#[test]
fn masked_softmax_hidden_rows_are_zeros_and_hidden_scores_unread() {
    // Clean queries of blocks 0 and 1 against masked keys and a later clean block: nothing is
    // visible. Hidden columns hold NaN, which must never reach the output.
    let t = |b, block, masked| Tag::new(b, block, masked);
    let (text, image) = (Branch::Text, Branch::Image);
    let row_tags = [
        t(image, 0, false), // sees nothing
        t(image, 1, false), // sees only column 3
        t(image, 2, true),  // sees its own masked block (column 1) and the clean columns 0, 3
        t(text, 5, false),  // non-joint: other branch hidden; sees only column 4
    ];
    let col_tags = [
        t(image, 2, false),
        t(image, 2, true),
        t(image, 3, true),
        t(image, 1, false),
        t(text, 4, false),
    ];
    let n_cols = col_tags.len();
    let mut scores = vec![f32::NAN; row_tags.len() * n_cols];
    let visible_cells = [(1, 3), (2, 0), (2, 1), (2, 3), (3, 4)];
    for (k, &(r, c)) in visible_cells.iter().enumerate() {
        scores[r * n_cols + c] = 0.25 * k as f32 - 0.3;
    }
    // Row 0's first column is clean block 2 > 0: hidden, even with a real score there.
    scores[0] = 1.0;
    let mask = SoftmaxMask::Rule {
        row_tags: &row_tags,
        col_tags: &col_tags,
        joint: false,
    };
    let out = check_masked_softmax(&scores, row_tags.len(), n_cols, mask, 0.7);
    assert!(out[..n_cols].iter().all(|&v| v.to_bits() == 0));
    assert_eq!(out[n_cols + 3], 1.0);
    assert_eq!(out[3 * n_cols + 4], 1.0);

    // Visible scores all −inf: zeros, not NaN. A −inf next to finite scores: probability 0.
    let scores = [f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
    let mut out = [f32::NAN; 4];
    masked_softmax(&scores, 2, 2, SoftmaxMask::Prefix(&[2, 2]), 1.0, &mut out).unwrap();
    assert_eq!(out, [0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn masked_softmax_errors() {
    let mut out = vec![0.0; 6];
    let s = [0.5f32; 6];
    let m = input_message(masked_softmax(
        &s[..5],
        2,
        3,
        SoftmaxMask::Prefix(&[1, 1]),
        1.0,
        &mut out,
    ));
    assert!(m.contains("scores has 5"), "{m}");
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Prefix(&[1, 1]),
        1.0,
        &mut out[..4],
    ));
    assert!(m.contains("out has 4"), "{m}");
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Prefix(&[3, 4]),
        1.0,
        &mut out,
    ));
    assert!(
        m.contains("prefix[1] = 4") && m.contains("n_cols = 3"),
        "{m}"
    );
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Prefix(&[3]),
        1.0,
        &mut out,
    ));
    assert!(m.contains("prefix has 1"), "{m}");
    let tag = Tag::new(Branch::Text, 0, false);
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Rule {
            row_tags: &[tag, tag],
            col_tags: &[tag, tag],
            joint: true,
        },
        1.0,
        &mut out,
    ));
    assert!(m.contains("col_tags has 2"), "{m}");
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Rule {
            row_tags: &[tag],
            col_tags: &[tag, tag, tag],
            joint: true,
        },
        1.0,
        &mut out,
    ));
    assert!(m.contains("row_tags has 1"), "{m}");
    let m = input_message(masked_softmax(
        &s,
        2,
        3,
        SoftmaxMask::Prefix(&[1, 1]),
        f32::NAN,
        &mut out,
    ));
    assert!(m.contains("scale"), "{m}");
}

/// The two CPU attention paths agree: `attention_naive` (f64) equals softmax(Q·Kᵀ/√d)·V built
/// from `masked_softmax` with the same tags, per sequence and head, GQA included, over a
/// shuffled pool whose unused slots hold NaN.
#[test]
fn attention_oracle_equals_masked_softmax_times_v() {
    for (case, &(n_heads, n_kv_heads, head_dim, joint)) in [
        (2usize, 1usize, 16usize, true),
        (4, 2, 8, false),
        (3, 3, 32, true),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(1000 + case as u64);
        let shape = AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let (q_dim, kv_dim, group) = (shape.q_dim(), shape.kv_dim(), shape.group());
        let seqs = [(5usize, 9usize), (0, 3), (7, 0), (3, 14)]; // (rows, keys)
        let n_keys: usize = seqs.iter().map(|s| s.1).sum();
        let slots = n_keys + 4;
        let mut free: Vec<u32> = (0..slots as u32).collect();
        free.shuffle(&mut r);
        let mut k_pool = vec![f32::NAN; slots * kv_dim];
        let mut v_pool = vec![f32::NAN; slots * kv_dim];
        let (mut seq_indptr, mut kv_indptr) = (vec![0u32], vec![0u32]);
        let (mut row_tags, mut kv_indices, mut kv_tags) = (vec![], vec![], vec![]);
        for &(rows, keys) in &seqs {
            row_tags.extend((0..rows).map(|_| random_tag(&mut r)));
            for _ in 0..keys {
                let slot = free.pop().unwrap() as usize;
                k_pool[slot * kv_dim..][..kv_dim].copy_from_slice(&random_vec(&mut r, kv_dim, 1.5));
                v_pool[slot * kv_dim..][..kv_dim].copy_from_slice(&random_vec(&mut r, kv_dim, 2.0));
                kv_indices.push(slot as u32);
                kv_tags.push(random_tag(&mut r));
            }
            seq_indptr.push(row_tags.len() as u32);
            kv_indptr.push(kv_indices.len() as u32);
        }
        let q = random_vec(&mut r, row_tags.len() * q_dim, 1.5);
        let inputs = AttnInputs {
            q: &q,
            row_tags: &row_tags,
            seq_indptr: &seq_indptr,
            k_pool: &k_pool,
            v_pool: &v_pool,
            kv_indptr: &kv_indptr,
            kv_indices: &kv_indices,
            kv_tags: &kv_tags,
            joint,
            shape,
        };
        let (want, _) = attention_naive(&inputs).unwrap();

        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut got = vec![0f64; want.len()];
        let mut hidden_rows = 0;
        for s in 0..seqs.len() {
            let rows = seq_indptr[s] as usize..seq_indptr[s + 1] as usize;
            let keys = kv_indptr[s] as usize..kv_indptr[s + 1] as usize;
            let (nr, nk) = (rows.len(), keys.len());
            for h in 0..n_heads {
                let col = (h / group) * head_dim;
                let kv = |j: usize, pool: &[f32]| -> Vec<f32> {
                    let slot = kv_indices[j] as usize;
                    pool[slot * kv_dim + col..][..head_dim].to_vec()
                };
                // S = Q_h·K_gᵀ (unscaled; masked_softmax applies the scale).
                let mut scores = vec![0f32; nr * nk];
                for (i, row) in rows.clone().enumerate() {
                    let qh = &q[row * q_dim + h * head_dim..][..head_dim];
                    for (jj, j) in keys.clone().enumerate() {
                        scores[i * nk + jj] = dot(qh, &kv(j, &k_pool)) as f32;
                    }
                }
                let mut probs = vec![f32::NAN; nr * nk];
                let mask = SoftmaxMask::Rule {
                    row_tags: &row_tags[rows.clone()],
                    col_tags: &kv_tags[keys.clone()],
                    joint,
                };
                masked_softmax(&scores, nr, nk, mask, scale, &mut probs).unwrap();
                for (i, row) in rows.clone().enumerate() {
                    let o = &mut got[row * q_dim + h * head_dim..][..head_dim];
                    if probs[i * nk..][..nk].iter().all(|&p| p == 0.0) {
                        hidden_rows += 1;
                    }
                    for (jj, j) in keys.clone().enumerate() {
                        let p = f64::from(probs[i * nk + jj]);
                        if p != 0.0 {
                            for (dst, &v) in o.iter_mut().zip(&kv(j, &v_pool)) {
                                *dst += p * f64::from(v);
                            }
                        }
                    }
                }
            }
        }
        assert!(
            hidden_rows > 0,
            "case {case}: no fully hidden row exercised"
        );
        for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(!g.is_nan(), "case {case}: NaN at {idx}");
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "case {case}: out[{idx}] = {g}, oracle {w}"
            );
        }
    }
}

/// The model concatenates q|k|v and gate|up at load time (`Backend::concat_weights`): the CPU
/// oracle's product by the concatenated weights equals the separate products bit for bit, on
/// every path of `matmul_t` (one block, row blocks over threads, the few-rows column split) and
/// with the residual accumulation, so fusing changed none of its results.
#[test]
fn concatenated_products_equal_the_separate_ones_bit_for_bit() {
    use sparse_lavida::backend::cpu::concat_rows;
    use sparse_lavida::weights::HostTensor;
    let mut r = rng(4242);
    for &(rows, k, ref parts) in &[
        (1usize, 64usize, vec![64usize, 32, 32]),
        (3, 256, vec![256, 64, 64]),
        (64, 128, vec![384, 384]),
        (300, 96, vec![40, 8, 8]),
        (2, 4096, vec![4096, 1024, 1024]),
    ] {
        let x: Vec<f32> = (0..rows * k).map(|_| r.gen_range(-1.0..1.0)).collect();
        let ws: Vec<HostTensor> = parts
            .iter()
            .map(|&n| HostTensor {
                shape: vec![n, k],
                data: (0..n * k).map(|_| r.gen_range(-1.0..1.0)).collect(),
            })
            .collect();
        let total: usize = parts.iter().sum();
        let fused = concat_rows(ws.clone()).unwrap();
        assert_eq!(fused.shape, vec![total, k]);
        for acc in [false, true] {
            let init: Vec<f32> = (0..rows * total).map(|_| r.gen_range(-1.0..1.0)).collect();
            let mut got = init.clone();
            matmul_t(&x, rows, k, &fused.data, total, &mut got, acc).unwrap();
            let mut col = 0;
            for w in &ws {
                let n = w.shape[0];
                let mut want: Vec<f32> = (0..rows)
                    .flat_map(|i| init[i * total + col..][..n].to_vec())
                    .collect();
                matmul_t(&x, rows, k, &w.data, n, &mut want, acc).unwrap();
                for i in 0..rows {
                    let g = &got[i * total + col..][..n];
                    let wv = &want[i * n..][..n];
                    assert!(
                        g.iter().zip(wv).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "rows {rows} k {k} parts {parts:?} acc {acc}: part at column {col}, row {i}"
                    );
                }
                col += n;
            }
        }
    }
    assert!(concat_rows(vec![]).is_err());
    let bad = vec![
        HostTensor {
            shape: vec![2, 3],
            data: vec![0.0; 6],
        },
        HostTensor {
            shape: vec![2, 4],
            data: vec![0.0; 8],
        },
    ];
    assert!(
        concat_rows(bad)
            .unwrap_err()
            .to_string()
            .contains("columns")
    );
}

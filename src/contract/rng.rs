//! The random numbers the kernels draw, defined once: Philox4x32-10, the sampler's Gumbel noise
//! (SPEC §4.1, `sl_sample`) and the seeded uniform weights of `sl_init_uniform`. The CPU twins
//! and the host's weight writer compute exactly these values.

use rayon::prelude::*;

/// Philox4x32-10 (Salmon et al. 2011, Random123): 10 rounds, multipliers 0xD2511F53,
/// 0xCD9E8D57, Weyl key increments 0x9E3779B9, 0xBB67AE85. Matches Random123's
/// `philox4x32(ctr, key)` word for word (see the known-answer tests).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// SPEC §4.1 Gumbel noise for one vocabulary id: Philox4x32-10 with key `(seed_lo, seed_hi)` and
/// counter `(vocab_id/4, position, step, request)`; word `vocab_id % 4` is `w`;
/// `u = ((w >> 8) + 0.5)·2^-24`, `g = −ln(−ln u)`. `u` and both logarithms are evaluated in f64
/// and `g` rounded once to f32: `u` has 25 significant bits, so in f32 the largest `w` would give
/// `u = 1` and infinite noise. `g` lies in about [−2.8, 17.3].
pub fn gumbel(seed: u64, vocab_id: u32, position: u32, step: u32, request: u32) -> f32 {
    let words = philox4x32_10([vocab_id / 4, position, step, request], seed_key(seed));
    gumbel_of_word(words[(vocab_id % 4) as usize])
}

pub(crate) fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The Gumbel transform of one Philox output word (see [`gumbel`]).
pub(crate) fn gumbel_of_word(w: u32) -> f32 {
    let u = (f64::from(w >> 8) + 0.5) * (-24f64).exp2();
    (-(-u.ln()).ln()) as f32
}

/// Third Philox counter word of [`init_uniform`] (`SL_INIT_COUNTER_TAG` in params.h): keeps
/// its streams apart from the sampler's Gumbel noise.
pub const INIT_COUNTER_TAG: u32 = 0x1A17;

/// Seeded uniform init, the definition the `sl_init_uniform` kernel implements: `out[i] = offset +
/// scale·u_i` with `u_i` uniform on (−1, 1). Philox4x32-10 with key `(seed_lo, seed_hi)` and
/// counter `(i/4 low 32 bits, i/4 high 32 bits, tensor_index, 0x1A17)`; word `i % 4` is `w`;
/// `u = ((w >> 8) + 0.5)·2^-23 − 1`, exact in f32 (an odd multiple of 2^-24 strictly inside
/// (−1, 1), symmetric about 0); the value is `offset + scale·u` in f32 with two roundings (no
/// FMA). The kernel stores `bf16(value)` (round to nearest even) of exactly these values.
/// Groups of four elements are computed in parallel.
pub fn init_uniform(seed: u64, tensor_index: u32, offset: f32, scale: f32, out: &mut [f32]) {
    let key = seed_key(seed);
    out.par_chunks_mut(4 * 1024)
        .enumerate()
        .for_each(|(chunk, vals)| {
            for (j, group) in vals.chunks_mut(4).enumerate() {
                let g = (chunk * 1024 + j) as u64;
                let counter = [g as u32, (g >> 32) as u32, tensor_index, INIT_COUNTER_TAG];
                let words = philox4x32_10(counter, key);
                for (v, &w) in group.iter_mut().zip(&words) {
                    *v = offset + scale * uniform_of_word(w);
                }
            }
        });
}

/// `u = ((w >> 8) + 0.5)·2^-23 − 1` of one Philox word (see [`init_uniform`]), computed
/// exactly as `(2·(w >> 8) + 1 − 2^24)·2^-24`.
fn uniform_of_word(w: u32) -> f32 {
    let k = (((w >> 8) << 1) | 1) as i32 - (1 << 24);
    k as f32 * (-24f32).exp2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gumbel_extreme_words_are_finite() {
        // u = 0.5·2^-24 and u = (2^24 − 0.5)·2^-24: both strictly inside (0, 1).
        let lo = gumbel_of_word(0);
        let hi = gumbel_of_word(u32::MAX);
        assert!(lo.is_finite() && hi.is_finite(), "lo {lo}, hi {hi}");
        let u_lo = 0.5f64 * (-24f64).exp2();
        let u_hi = 1.0 - 0.5f64 * (-24f64).exp2();
        assert_eq!(lo, (-(-u_lo.ln()).ln()) as f32);
        assert_eq!(hi, (-(-u_hi.ln()).ln()) as f32);
        assert!(lo < -2.7 && lo > -2.9, "{lo}");
        assert!(hi > 17.3 && hi < 17.4, "{hi}");
        // The low 8 bits of w are discarded.
        assert_eq!(gumbel_of_word(0x1234_5600), gumbel_of_word(0x1234_56ff));
    }

    #[test]
    fn gumbel_uses_the_documented_counter_and_word() {
        let seed = 0x0123_4567_89ab_cdef_u64;
        for v in [0u32, 1, 2, 3, 4, 7, 1001] {
            let words = philox4x32_10([v / 4, 17, 3, 2], [0x89ab_cdef, 0x0123_4567]);
            assert_eq!(
                gumbel(seed, v, 17, 3, 2),
                gumbel_of_word(words[(v % 4) as usize])
            );
        }
    }

    #[test]
    fn uniform_of_word_is_exact_and_symmetric() {
        // Extremes: (2^24 − 1)·2^-24 away from 0 on both sides, never ±1.
        let lo = uniform_of_word(0);
        let hi = uniform_of_word(u32::MAX);
        assert_eq!(f64::from(lo), -1.0 + (-24f64).exp2());
        assert_eq!(f64::from(hi), 1.0 - (-24f64).exp2());
        // The documented formula, in f64 (exact there), equals the f32 value for many words.
        for w in (0..=u32::MAX)
            .step_by(9_973_211)
            .chain([0x7fff_ff00, 0x8000_0000])
        {
            let want = (f64::from(w >> 8) + 0.5) * (-23f64).exp2() - 1.0;
            assert_eq!(f64::from(uniform_of_word(w)), want, "w {w:#x}");
        }
        // Symmetry: the complementary word gives the negated value.
        assert_eq!(uniform_of_word(0x1234_5678), -uniform_of_word(!0x1234_5678));
        // The low 8 bits are discarded.
        assert_eq!(uniform_of_word(0xabcd_ef00), uniform_of_word(0xabcd_efff));
    }

    #[test]
    fn init_uniform_range_mean_and_determinism() {
        let n = 100_003;
        let (offset, scale) = (1.0f32, 0.1f32);
        let mut a = vec![0f32; n];
        init_uniform(42, 7, offset, scale, &mut a);
        assert!(a.iter().all(|&v| v > offset - scale && v < offset + scale));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        // Standard error of the mean: scale / sqrt(3n) ≈ 1.8e-4.
        assert!((mean - 1.0).abs() < 1e-3, "mean {mean}");
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let want = f64::from(scale).powi(2) / 3.0;
        assert!(
            (var / want - 1.0).abs() < 0.02,
            "variance {var}, want {want}"
        );
        let mut b = vec![0f32; n];
        init_uniform(42, 7, offset, scale, &mut b);
        assert_eq!(a, b, "same seed and tensor index, same values");
        init_uniform(42, 8, offset, scale, &mut b);
        assert_ne!(a, b, "another tensor index, another stream");
        init_uniform(43, 7, offset, scale, &mut b);
        assert_ne!(a, b, "another seed, another stream");
        // A prefix is a prefix: element i depends only on (seed, tensor_index, i).
        let mut short = vec![0f32; 4097];
        init_uniform(42, 7, offset, scale, &mut short);
        assert_eq!(short[..], a[..4097]);
    }

    #[test]
    fn init_uniform_uses_the_documented_counter_and_word() {
        let seed = 0x0123_4567_89ab_cdef_u64;
        let key = [0x89ab_cdef, 0x0123_4567];
        let (offset, scale) = (-0.25f32, 0.75f32);
        let mut out = vec![0f32; 4103];
        init_uniform(seed, 5, offset, scale, &mut out);
        for i in [0usize, 1, 2, 3, 4, 7, 4095, 4096, 4097, 4102] {
            let words = philox4x32_10([(i / 4) as u32, 0, 5, 0x1A17], key);
            let u = (f64::from(words[i % 4] >> 8) + 0.5) * (-23f64).exp2() - 1.0;
            let want = offset + scale * (u as f32);
            assert_eq!(out[i].to_bits(), want.to_bits(), "element {i}");
        }
    }
}

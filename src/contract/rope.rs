//! RoPE's angles (SPEC §2.3) as every implementation computes them: the inverse frequencies and
//! the (cos, sin) of a position in f64, rounded to f32. The CPU backend rotates with them row by
//! row; the CUDA backend uploads them once per generation as a table (`SlRopeKvParams::
//! rope_table`, [`table`]), so that the kernel reads what the CPU computes, bit for bit.

/// `rope_theta^(−2i / head_dim)` in f64 for `i < head_dim / 2`.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
        .collect()
}

/// `(cos, sin)` of the angle `pos · inv_freq`, computed in f64 and rounded to f32.
#[inline]
pub fn cos_sin(pos: u32, inv_freq: f64) -> (f32, f32) {
    let (s, c) = (f64::from(pos) * inv_freq).sin_cos();
    (c as f32, s as f32)
}

/// The table of positions `0..positions`: `[positions][head_dim / 2][cos, sin]` f32, the layout
/// of `SlRopeKvParams::rope_table`.
pub fn table(head_dim: usize, theta: f64, positions: usize) -> Vec<f32> {
    let freqs = inv_freq(head_dim, theta);
    let mut out = Vec::with_capacity(positions * freqs.len() * 2);
    for pos in 0..positions {
        for &f in &freqs {
            let (c, s) = cos_sin(pos as u32, f);
            out.push(c);
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_the_positions_angles() {
        let t = table(8, 10_000.0, 5);
        assert_eq!(t.len(), 5 * 4 * 2);
        let f = inv_freq(8, 10_000.0);
        assert_eq!(f[0], 1.0);
        let (c, s) = cos_sin(3, f[2]);
        assert_eq!((t[(3 * 4 + 2) * 2], t[(3 * 4 + 2) * 2 + 1]), (c, s));
        assert_eq!((t[0], t[1]), (1.0, 0.0));
    }
}

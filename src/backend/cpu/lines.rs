//! f32 buffers that start on a cache line.
//!
//! The CPU kernels load and store whole vectors of 16 values (64 bytes on AVX-512): the K/V
//! pool's V rows, the packed weights' panels, an attention item's packed queries, scores and
//! accumulators. glibc's `malloc` aligns to 16 bytes only (a chunk it maps starts 16 bytes into
//! its first page), so the rows of a plain `Vec<f32>` usually straddle two cache lines and every
//! vector load or store of them touches both. [`Lines`] allocates [`SPARE`] values more than it
//! holds and starts at the first 64-byte boundary inside its allocation (found with
//! `align_offset`, no `unsafe`). Rows whose length is a multiple of 16 values then all start on
//! a line.

use std::ops::{Deref, DerefMut};

/// The alignment [`Lines`] gives its first value, in bytes: a cache line.
pub const LINE: usize = 64;

/// Values allocated beyond the length, so that a 64-byte boundary falls within reach of any
/// 4-byte-aligned start.
pub const SPARE: usize = LINE / std::mem::size_of::<f32>() - 1;

/// `len` f32 values starting on a [`LINE`] boundary; reads and writes as a `[f32]`.
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<f32>,
    len: usize,
}

impl Lines {
    /// `len` values, all `value`. `len` is a checked size (its bytes fit in memory), so adding
    /// [`SPARE`] cannot overflow. Zeros come from `calloc`: a large buffer is mapped fresh and
    /// its pages zeroed by the kernel as they are first written.
    pub fn filled(len: usize, value: f32) -> Lines {
        Lines {
            buf: if len == 0 {
                Vec::new()
            } else {
                vec![value; len + SPARE]
            },
            len,
        }
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[f32]) -> Lines {
        let mut lines = Lines::filled(values.len(), 0.0);
        lines.copy_from_slice(values);
        lines
    }

    /// Where the values start in `buf`: the first line boundary (0 while empty, or if the
    /// allocator ever returned a start that is not 4-byte aligned: then the values are correct,
    /// only not aligned).
    fn start(&self) -> usize {
        let off = self.buf.as_ptr().align_offset(LINE);
        if off <= self.buf.len() - self.len {
            off
        } else {
            0
        }
    }

    /// Makes this hold `len` values and returns them, keeping the allocation when it is large
    /// enough: scratch space whose contents the caller writes before reading (they are whatever
    /// was there, shifted if the buffer had to grow).
    pub fn reuse(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len + SPARE {
            self.buf.resize(len + SPARE, 0.0);
        }
        self.len = len;
        self
    }

    /// [`Lines::reuse`], every value set to `value`.
    pub fn refill(&mut self, len: usize, value: f32) -> &mut [f32] {
        let values = self.reuse(len);
        values.fill(value);
        values
    }
}

impl Deref for Lines {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        let start = self.start();
        &self.buf[start..start + self.len]
    }
}

impl DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [f32] {
        let start = self.start();
        &mut self.buf[start..start + self.len]
    }
}

/// A clone is aligned in its own allocation (a `Vec`'s clone could start elsewhere on a line).
impl Clone for Lines {
    fn clone(&self) -> Lines {
        Lines::from_slice(self)
    }
}

/// Equal values, wherever each starts in its allocation.
impl PartialEq for Lines {
    fn eq(&self, other: &Lines) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(values: &[f32]) -> bool {
        (values.as_ptr() as usize).is_multiple_of(LINE)
    }

    /// Every length starts on a line and holds its values; a clone is aligned in its own
    /// allocation and equal; growing scratch keeps the start aligned; the empty buffer works.
    #[test]
    fn starts_on_a_line_and_holds_its_values() {
        for len in [1, 2, 15, 16, 17, 100, 1000, 1 << 20] {
            let mut lines = Lines::filled(len, 3.0);
            assert!(aligned(&lines), "len {len}");
            assert_eq!(lines.len(), len);
            assert!(lines.iter().all(|&x| x == 3.0));
            for (i, x) in lines.iter_mut().enumerate() {
                *x = i as f32;
            }
            let copy = lines.clone();
            assert!(aligned(&copy));
            assert_eq!(copy, lines);
            assert!(copy.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        let mut scratch = Lines::default();
        assert!(scratch.is_empty());
        assert_eq!(scratch, Lines::filled(0, 1.0));
        for len in [5, 3, 64, 4096, 7] {
            let values = scratch.refill(len, -1.0);
            assert_eq!(values.len(), len);
            assert!(aligned(values), "len {len}");
            assert!(values.iter().all(|&x| x == -1.0));
            assert_eq!(scratch.reuse(len).len(), len);
        }
        assert_ne!(Lines::filled(4, 0.0), Lines::filled(4, 1.0));
        assert_ne!(Lines::filled(4, 0.0), Lines::filled(5, 0.0));
    }
}

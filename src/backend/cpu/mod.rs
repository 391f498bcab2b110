//! The f32 CPU backend: the oracle and the fallback.

pub mod attention;
pub mod ops;

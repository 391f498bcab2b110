//! The kernel contract: every data format the kernels of `kernels/*.cu` consume, defined once,
//! next to the ABI that mirrors `kernels/params.h` ([`abi`]). It needs no CUDA (no cudarc, no
//! driver) and imports nothing of the crate but [`crate::error`], so it is the floor both sides
//! stand on: the CUDA kernel layer (`cuda`, feature `cuda`) launches kernels on these
//! formats, and the planner, the samplers and the CPU twins of the kernels build them.
//!
//! | module | formats |
//! |---|---|
//! | [`abi`] | the parameter structs and constants of `params.h` (bindgen), its macro twins |
//! | [`tags`] | [`Branch`], the packed row/key [`Tag`], [`REGISTER`], [`MAX_BLOCK`], the SPEC §3 rule [`visible`] |
//! | [`attn`] | head geometry, the CSR row/key layout of an attention call, the query tiling and the split-KV rule |
//! | [`sample`] | the sampler's parameters and outputs |
//! | [`rng`] | Philox4x32-10, the Gumbel noise and the seeded uniform weights the kernels draw |
//! | [`rope`] | RoPE's angles in f64 rounded to f32, and the per-generation table the RoPE kernel reads |
//! | [`program`] | the device-resident program: patches, decode state, lists, commit rule |
//! | [`aggregate`] | the register-token aggregation's inputs and sizes |

pub mod abi;
pub mod aggregate;
pub mod attn;
pub mod program;
pub mod rng;
pub mod rope;
pub mod sample;
pub mod tags;

pub use attn::{AttnLayout, AttnShape, AttnTiling, AttnVersion, choose_splits, query_tiles};
pub use sample::{SampleParams, Sampled};
pub use tags::{Branch, MAX_BLOCK, REGISTER, Tag, visible};

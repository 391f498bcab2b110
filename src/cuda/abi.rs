//! STAND-IN (runtime helper): the kernel ABI as Rust sees it. The build helper's version of this
//! file replaces it at merge; only the names below are relied on.
#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    missing_docs,
    clippy::all
)]

mod bindings {
    include!("bindings.rs");
}

pub use bindings::*;

/// `SL_ATTN_SMEM_BYTES(head_dim)` from params.h.
pub fn attn_smem_bytes(head_dim: u32) -> u32 {
    (SL_ATTN_BLOCK_M + 4 * SL_ATTN_BLOCK_N) * head_dim * 2 + 2 * SL_ATTN_BLOCK_N * 4
}

/// `SL_SPLIT_CHUNK(n_keys, n_splits)` from params.h.
pub fn split_chunk(n_keys: u32, n_splits: u32) -> u32 {
    n_keys.div_ceil(n_splits).div_ceil(SL_ATTN_BLOCK_N) * SL_ATTN_BLOCK_N
}

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

/// `SL_ATTN_SMEM_BYTES(head_dim)` from params.h; `None` when it overflows `u32`. (Same
/// signature as the build helper's version.)
pub const fn attn_smem_bytes(head_dim: u32) -> Option<u32> {
    match (SL_ATTN_BLOCK_M + 4 * SL_ATTN_BLOCK_N).checked_mul(head_dim) {
        Some(elems) => match elems.checked_mul(2) {
            Some(bytes) => bytes.checked_add(2 * SL_ATTN_BLOCK_N * 4),
            None => None,
        },
        None => None,
    }
}

/// `SL_SPLIT_CHUNK(n_keys, n_splits)` from params.h; `None` for 0 splits or on overflow.
pub const fn split_chunk(n_keys: u32, n_splits: u32) -> Option<u32> {
    if n_splits == 0 {
        return None;
    }
    let Some(sum) = n_keys.checked_add(n_splits - 1) else {
        return None;
    };
    let Some(rounded) = (sum / n_splits).checked_add(SL_ATTN_BLOCK_N - 1) else {
        return None;
    };
    Some(rounded / SL_ATTN_BLOCK_N * SL_ATTN_BLOCK_N)
}

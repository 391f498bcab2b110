// Device helpers shared by every kernel: attention tags (SPEC §3), Philox4x32-10 and the
// Gumbel transform (SPEC §4.1), bf16 conversions. Each mirrors a CPU function named below, and
// the two must agree bit for bit where the comment says so.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "params.h"

// The block's dynamic shared memory as `type *name` (launch argument sharedMemBytes), 16-byte
// aligned. On the emulated device (kernels/emu, SL_EMULATE) it is the block's buffer, which the
// runtime hands out, since host C++ has no `extern __shared__`.
// SL_DYNAMIC_SHARED_ALIGNED: the same, with its shared-window address a multiple of `align`
// (the emulator's window starts at 0 for every block).
#ifdef SL_EMULATE
#define SL_DYNAMIC_SHARED(type, name) SL_EMU_DYNAMIC_SHARED(type, name)
#define SL_DYNAMIC_SHARED_ALIGNED(type, name, align) SL_EMU_DYNAMIC_SHARED(type, name)
#else
#define SL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define SL_DYNAMIC_SHARED_ALIGNED(type, name, align) extern __shared__ __align__(align) type name[]
#endif

namespace sl {

// --- Tags (src/contract/tags.rs `Tag`, `visible`) -------------------------------------------

__device__ __forceinline__ bool tag_masked(uint32_t t) { return t & 1u; }
__device__ __forceinline__ uint32_t tag_branch(uint32_t t) { return (t >> 1) & 1u; }
__device__ __forceinline__ uint32_t tag_block(uint32_t t) { return t >> 2; }
__device__ __forceinline__ uint32_t make_tag(uint32_t branch, uint32_t block, bool masked) {
    return (block << 2) | (branch << 1) | (masked ? 1u : 0u);
}

// SPEC §3: may a query tagged q attend to a key tagged k?
__device__ __forceinline__ bool visible(uint32_t q, uint32_t k, bool joint) {
    const bool branch_ok = joint || tag_branch(q) == tag_branch(k);
    const bool step_ok = tag_masked(q) ? (!tag_masked(k) || tag_block(k) == tag_block(q))
                                       : (!tag_masked(k) && tag_block(k) <= tag_block(q));
    return branch_ok && step_ok;
}

// --- Attention tile summaries (src/contract/attn.rs `TileSummary`, `QueryDesc`) -------------
// A summary is SL_ATTN_SUMMARY_WORDS words: for class c = 2·branch + masked, the smallest block
// (word 2c) and the largest (word 2c + 1) of the tags of that class; SL_SUMMARY_EMPTY_MIN and 0
// for a class with none. Arrays are indexed by compile-time constants only (unrolled loops), so
// they stay in registers.

constexpr int SUMMARY_WORDS = SL_ATTN_SUMMARY_WORDS;

__device__ __forceinline__ void summary_clear(uint32_t (&s)[SUMMARY_WORDS]) {
#pragma unroll
    for (int c = 0; c < SUMMARY_WORDS / 2; ++c) {
        s[2 * c] = SL_SUMMARY_EMPTY_MIN;
        s[2 * c + 1] = 0u;
    }
}

// Adds one tag (TileSummary::insert).
__device__ __forceinline__ void summary_insert(uint32_t (&s)[SUMMARY_WORDS], uint32_t tag) {
    const int cls = static_cast<int>(tag_branch(tag) * 2u + (tag & 1u));
    const uint32_t block = tag_block(tag);
#pragma unroll
    for (int c = 0; c < SUMMARY_WORDS / 2; ++c) {
        if (c == cls) {
            s[2 * c] = min(s[2 * c], block);
            s[2 * c + 1] = max(s[2 * c + 1], block);
        }
    }
}

// Every lane of the (full) warp ends with the union of the warp's summaries.
__device__ __forceinline__ void summary_warp_reduce(uint32_t (&s)[SUMMARY_WORDS]) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int c = 0; c < SUMMARY_WORDS / 2; ++c) {
            s[2 * c] = min(s[2 * c], __shfl_xor_sync(0xffffffffu, s[2 * c], off));
            s[2 * c + 1] = max(s[2 * c + 1], __shfl_xor_sync(0xffffffffu, s[2 * c + 1], off));
        }
    }
}

// Tile classes (src/contract/attn.rs `TileClass`).
constexpr int TILE_HIDDEN = 0;
constexpr int TILE_MIXED = 1;
constexpr int TILE_VISIBLE = 2;

// QueryDesc: per key branch bk, the union of the block ranges (clean: c_lo..c_hi, masked:
// m_lo..m_hi; empty: lo > hi) of the query rows allowed to see bk, and whether a row of the
// tile may not see bk at all (a non-joint layer with both branches among the rows).
struct QueryDesc {
    uint32_t c_lo[2], c_hi[2], m_lo[2], m_hi[2];
    bool blocked[2];
};

// QueryDesc::new from the summary of the tile's rows.
__device__ __forceinline__ QueryDesc query_desc(const uint32_t (&rows)[SUMMARY_WORDS],
                                                bool joint) {
    QueryDesc d;
#pragma unroll
    for (int bk = 0; bk < 2; ++bk) {
        d.c_lo[bk] = d.m_lo[bk] = SL_SUMMARY_EMPTY_MIN;
        d.c_hi[bk] = d.m_hi[bk] = 0u;
        d.blocked[bk] = false;
#pragma unroll
        for (int bq = 0; bq < 2; ++bq) {
            const int c = 4 * bq, m = 4 * bq + 2;  // words of (bq, clean) and (bq, masked)
            const bool present = rows[c] <= rows[c + 1] || rows[m] <= rows[m + 1];
            if (!present) continue;
            if (joint || bq == bk) {
                d.c_lo[bk] = min(d.c_lo[bk], rows[c]);
                d.c_hi[bk] = max(d.c_hi[bk], rows[c + 1]);
                d.m_lo[bk] = min(d.m_lo[bk], rows[m]);
                d.m_hi[bk] = max(d.m_hi[bk], rows[m + 1]);
            } else {
                d.blocked[bk] = true;
            }
        }
    }
    return d;
}

// QueryDesc::classify: TILE_VISIBLE only if every (row, key) pair is visible (and whenever it
// is), TILE_HIDDEN only if none is, else TILE_MIXED. The proof is the Rust function's.
__device__ __forceinline__ int classify(const QueryDesc &d, const uint32_t (&k)[SUMMARY_WORDS]) {
    bool all = true, none = true;
#pragma unroll
    for (int bk = 0; bk < 2; ++bk) {
        const uint32_t kc_lo = k[4 * bk], kc_hi = k[4 * bk + 1];
        const uint32_t km_lo = k[4 * bk + 2], km_hi = k[4 * bk + 3];
        const bool kc_empty = kc_lo > kc_hi, km_empty = km_lo > km_hi;
        if (kc_empty && km_empty) continue;
        const bool qc_empty = d.c_lo[bk] > d.c_hi[bk], qm_empty = d.m_lo[bk] > d.m_hi[bk];
        if (d.blocked[bk] || (qc_empty && qm_empty)) all = false;
        if (!qm_empty) {
            all = all && (km_empty || (d.m_lo[bk] == d.m_hi[bk] && km_lo == d.m_lo[bk] &&
                                       km_hi == d.m_lo[bk]));
            const bool overlap = !km_empty && d.m_lo[bk] <= km_hi && km_lo <= d.m_hi[bk];
            none = none && kc_empty && !overlap;
        }
        if (!qc_empty) {
            all = all && km_empty && kc_hi <= d.c_lo[bk];
            none = none && (kc_empty || kc_lo > d.c_hi[bk]);
        }
    }
    return all ? TILE_VISIBLE : (none ? TILE_HIDDEN : TILE_MIXED);
}

// --- Philox4x32-10 (src/backend/cpu/ops.rs `philox4x32_10`, bit-exact) -------------------

struct U4 {
    uint32_t x, y, z, w;
};

__device__ __forceinline__ U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    }
    return c;
}

// Gumbel noise of one Philox word (src/backend/cpu/ops.rs `gumbel_of_word`, bit-exact up to
// the f64 log's last ulp): u = ((w >> 8) + 0.5) * 2^-24 and both logs in f64, one rounding to f32.
__device__ __forceinline__ float gumbel_of_word(uint32_t w) {
    const double u = ((double)(w >> 8) + 0.5) * 0x1p-24;
    return (float)(-log(-log(u)));
}

// --- bf16 ------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(sl_bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ sl_bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

}  // namespace sl

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
#ifdef SL_EMULATE
#define SL_DYNAMIC_SHARED(type, name) SL_EMU_DYNAMIC_SHARED(type, name)
#else
#define SL_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
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

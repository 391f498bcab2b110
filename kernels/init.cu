// Seeded random weight init on the device (issue 4): fills a bf16 tensor with
// offset + scale * u, u uniform on (-1, 1) from Philox4x32-10. Contract and launch geometry:
// kernels/params.h (`SlInitParams`). CPU twin (the oracle, bit-exact before the bf16
// rounding): src/backend/cpu/ops.rs `init_uniform`.
//
// Memory-bound: one Philox call makes the 4 values of a group, written with one 8-byte store
// when the output is 8-byte aligned (every group starts at a multiple of 4 elements = 8 bytes
// from `out`), element by element otherwise and for the last, partial group.

#include "common.cuh"

namespace {

// u = ((w >> 8) + 0.5) * 2^-23 - 1, computed exactly: 2*(w >> 8) + 1 - 2^24 is an odd integer
// in [1 - 2^24, 2^24 - 1] (exact in f32), and the scaling by 2^-24 is exact.
__device__ __forceinline__ float uniform_of_word(uint32_t w) {
    const int32_t k = static_cast<int32_t>(((w >> 8) << 1) | 1u) - (1 << 24);
    return static_cast<float>(k) * 0x1p-24f;
}

// v = offset + scale * u with two roundings, as the CPU twin (no FMA contraction).
__device__ __forceinline__ float init_value(uint32_t w, float offset, float scale) {
    return __fadd_rn(offset, __fmul_rn(scale, uniform_of_word(w)));
}

}  // namespace

// Thread (blockIdx.x, threadIdx.x) owns the groups g, g + stride, ... (g its global index,
// stride the grid's thread count); group g covers elements 4g .. min(4g + 4, n).
extern "C" __global__ void __launch_bounds__(SL_ELEM_THREADS) sl_init_uniform(SlInitParams p) {
    const uint64_t groups = p.n / 4 + (p.n % 4 != 0 ? 1 : 0);
    const bool vec = (reinterpret_cast<uintptr_t>(p.out) & 7u) == 0;
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        const sl::U4 c{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), p.tensor_index,
                       SL_INIT_COUNTER_TAG};
        const sl::U4 r = sl::philox4x32_10(c, p.seed_lo, p.seed_hi);
        const float v[4] = {init_value(r.x, p.offset, p.scale), init_value(r.y, p.offset, p.scale),
                            init_value(r.z, p.offset, p.scale), init_value(r.w, p.offset, p.scale)};
        const uint64_t i0 = 4 * g;  // < n: g < ceil(n / 4)
        if (vec && p.n - i0 >= 4) {
            // Lower address first: .x of a bf16x2 is the lower half, as on the host.
            uint2 raw;
            __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
            h[0] = __floats2bfloat162_rn(v[0], v[1]);
            h[1] = __floats2bfloat162_rn(v[2], v[3]);
            *reinterpret_cast<uint2 *>(p.out + i0) = raw;
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (i0 + j < p.n) p.out[i0 + j] = sl::to_bf16(v[j]);
            }
        }
    }
}

// The emulated device's <cuda_bf16.h>: the bf16 types and conversions the kernels use, with
// the rounding CUDA documents (round to nearest even; a NaN stays a NaN). Found before any
// other cuda_bf16.h because the emulator compiles the kernels with `-I kernels/emu` first. It
// also brings in the rest of the emulated device (device.h), which every kernel file reaches
// through this include.
#pragma once

#include "device.h"

struct __nv_bfloat16 {
    unsigned short __x;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

static inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest, ties to even; NaN -> the canonical 0x7FFF (sign dropped), as CUDA's host
// conversion does.
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    const uint32_t lsb = (bits >> 16) & 1u;
    bits += 0x7fffu + lsb;
    return __nv_bfloat16{static_cast<unsigned short>(bits >> 16)};
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) {
    return __floats2bfloat162_rn(f.x, f.y);
}
static inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return float2{__bfloat162float(h.x), __bfloat162float(h.y)};
}
static inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
static inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }

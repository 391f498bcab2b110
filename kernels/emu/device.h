// The CUDA device as the kernels see it, for host compilation (SL_EMULATE): what nvcc's
// headers and the hardware provide to `kernels/*.cu`, implemented on the CPU by the emulator's
// runtime (runtime.cpp). A kernel file compiles unchanged against this header, except for two
// things it spells behind `#ifdef SL_EMULATE`: its inline PTX, and dynamic shared memory, which
// it takes through SL_DYNAMIC_SHARED (common.cuh) instead of `extern __shared__`.
//
// Execution model (runtime.cpp): each CUDA thread of a block is a fiber; a block runs on one
// OS thread; blocks of a grid run in parallel on the emulator's worker threads. A thread runs
// uninterrupted from one synchronisation point to the next: __syncthreads*, a warp collective
// (shuffle, vote, ldmatrix, mma) or its end. A warp collective is a rendezvous of the lanes its
// mask names; a barrier one of every thread of the block. Anything that can never complete (a
// lane of the mask has exited or waits at a barrier, lanes reach different collectives, part of
// a block waits at a barrier) is an error naming the kernel, block and thread, never a hang.
//
// Semantics chosen to expose bugs rather than hide them:
// - `__shared__` memory (static and dynamic) holds garbage (0xFF bytes) when a block starts;
// - cp.async writes garbage to its destination when issued and the data only at the
//   `cp.async.wait_group` that completes its group;
// - SL_EMU_SCHEDULE=random:SEED runs the threads between synchronisation points in a seeded
//   random order (default: in thread order), so a missing barrier shows up as a race.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifndef SL_EMULATE
#error "kernels/emu/device.h is the emulated device: compile with -DSL_EMULATE"
#endif

// --- Qualifiers -------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Static shared memory is per block: every block of a worker thread runs on that thread, and
// the runtime fills the emulator's thread-local storage with garbage when a block starts. So the
// library holds no other thread_local variable (runtime.cpp keeps its per-thread state in
// pthread keys).
#define __shared__ static thread_local

// --- Vector types -----------------------------------------------------------------------------

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3() = default;
    constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) {
    return float4{x, y, z, w};
}

// --- The runtime's side (runtime.cpp) ---------------------------------------------------------

namespace sl_emu {

// What the executing CUDA thread knows about itself.
struct ThreadInfo {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

// The calling CUDA thread (only valid inside a kernel).
const ThreadInfo &self();

// Block-wide barrier; the predicate forms combine the values of every thread.
enum class Barrier : uint8_t { Sync, Or, And, Count };
int barrier(Barrier kind, int predicate);

// Warp collectives: lanes named by `mask` rendezvous; `arg` and `width` as in CUDA.
enum class Shuffle : uint8_t { Idx, Up, Down, Xor };
uint64_t shuffle(Shuffle kind, uint32_t mask, uint64_t value, int arg, int width);
enum class Vote : uint8_t { Ballot, Any, All };
uint32_t vote(Vote kind, uint32_t mask, int predicate);
void syncwarp(uint32_t mask);

// Dynamic shared memory of the block (size: the launch's sharedMemBytes).
unsigned char *dynamic_shared();
// The shared-memory window address of a generic pointer into dynamic shared memory (an error
// for any other pointer).
uint32_t shared_address(const void *p);

// sm_80 instructions of attention.cu's inline PTX.
void cp_async_16(uint32_t shared_dst, const void *global_src);  // cp.async.cg.shared.global 16
void cp_async_4(uint32_t shared_dst, const void *global_src);   // cp.async.ca.shared.global 4
void cp_async_commit();                                           // cp.async.commit_group
void cp_async_wait(int n);                                        // cp.async.wait_group n
void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_addr, bool trans);
void mma_m16n8k16_bf16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// Stops the kernel with an error naming the kernel, block and thread (never returns).
[[noreturn]] void fail(const char *what);

}  // namespace sl_emu

#define threadIdx (::sl_emu::self().thread_idx)
#define blockIdx (::sl_emu::self().block_idx)
#define blockDim (::sl_emu::self().block_dim)
#define gridDim (::sl_emu::self().grid_dim)
#define warpSize 32

// SL_DYNAMIC_SHARED(type, name): `type *name`, the block's dynamic shared memory (common.cuh
// spells it `extern __shared__ __align__(16) type name[]` on the device).
#define SL_EMU_DYNAMIC_SHARED(type, name) type *name = reinterpret_cast<type *>(::sl_emu::dynamic_shared())

// --- Synchronisation --------------------------------------------------------------------------

static inline void __syncthreads() { sl_emu::barrier(sl_emu::Barrier::Sync, 0); }
static inline int __syncthreads_or(int p) { return sl_emu::barrier(sl_emu::Barrier::Or, p); }
static inline int __syncthreads_and(int p) { return sl_emu::barrier(sl_emu::Barrier::And, p); }
static inline int __syncthreads_count(int p) { return sl_emu::barrier(sl_emu::Barrier::Count, p); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { sl_emu::syncwarp(mask); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --- Warp collectives -------------------------------------------------------------------------

namespace sl_emu {
template <class T>
inline T shuffle_as(Shuffle kind, uint32_t mask, T var, int arg, int width) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "CUDA shuffles move 32- and 64-bit values");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = shuffle(kind, mask, bits, arg, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace sl_emu

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return sl_emu::shuffle_as(sl_emu::Shuffle::Idx, mask, var, src_lane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return sl_emu::shuffle_as(sl_emu::Shuffle::Up, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return sl_emu::shuffle_as(sl_emu::Shuffle::Down, mask, var, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return sl_emu::shuffle_as(sl_emu::Shuffle::Xor, mask, var, lane_mask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int p) {
    return sl_emu::vote(sl_emu::Vote::Ballot, mask, p);
}
static inline int __any_sync(unsigned mask, int p) {
    return static_cast<int>(sl_emu::vote(sl_emu::Vote::Any, mask, p));
}
static inline int __all_sync(unsigned mask, int p) {
    return static_cast<int>(sl_emu::vote(sl_emu::Vote::All, mask, p));
}

// --- Integer and bit intrinsics ---------------------------------------------------------------

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
static inline int __float_as_int(float x) {
    int i;
    memcpy(&i, &x, 4);
    return i;
}
static inline unsigned __float_as_uint(float x) {
    unsigned i;
    memcpy(&i, &x, 4);
    return i;
}
static inline float __int_as_float(int i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}
static inline float __uint_as_float(unsigned i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}

// CUDA's min/max overloads: mixed signed/unsigned arguments compare in the unsigned type, as
// the usual arithmetic conversions (std::common_type) give.
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using T = typename std::common_type<A, B>::type;
    return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(a) : static_cast<T>(b);
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using T = typename std::common_type<A, B>::type;
    return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(b) : static_cast<T>(a);
}

// --- Loads with cache hints: plain loads here ---------------------------------------------------

template <class T>
inline T __ldg(const T *p) {
    return *p;
}
template <class T>
inline T __ldcs(const T *p) {
    return *p;
}
template <class T>
inline T __ldcg(const T *p) {
    return *p;
}
template <class T>
inline void __stcs(T *p, T v) {
    *p = v;
}

// --- Atomics (device-wide: blocks run on several OS threads) ------------------------------------

template <class T>
inline T atomicAdd(T *p, T v) {
    if constexpr (std::is_floating_point<T>::value) {
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (!__atomic_compare_exchange_n(p, &old, old + v, true, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED)) {
        }
        return old;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <class T>
inline T atomicSub(T *p, T v) {
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicOr(T *p, T v) {
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicAnd(T *p, T v) {
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicXor(T *p, T v) {
    return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicExch(T *p, T v) {
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicCAS(T *p, T expected, T desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return expected;
}
template <class T>
inline T atomicMax(T *p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T>
inline T atomicMin(T *p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}

// --- f32 arithmetic with explicit rounding ------------------------------------------------------
// The emulator is compiled with -ffp-contract=off, so every f32 operation is one IEEE
// round-to-nearest-even operation, which is what the _rn intrinsics ask for.

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
// (__expf and the other fast-math intrinsics are not provided: glibc's math.h declares
// functions of those names, and the kernels use the accurate functions.)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// --- Address spaces -----------------------------------------------------------------------------

static inline size_t __cvta_generic_to_shared(const void *p) { return sl_emu::shared_address(p); }
static inline size_t __cvta_generic_to_global(const void *p) {
    return reinterpret_cast<size_t>(p);
}

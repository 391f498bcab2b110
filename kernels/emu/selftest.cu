// Kernels that exist only in the emulated device, for its own tests (tests/emulator.rs): some
// break a CUDA rule on purpose, so the test can check that the emulator reports the break
// (naming the kernel, block and thread) instead of hanging or computing something; the others
// record what the emulator's instructions do, for comparison with the CUDA documentation.
// build.rs (build/emulator.rs) compiles this file into the emulator only; nvcc never sees it.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

// Thread 5 exits; the others wait at a barrier it can never reach.
extern "C" __global__ void sl_emu_selftest_partial_barrier(uint32_t *out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Half a warp calls a full-warp shuffle; the other half goes on to a barrier.
extern "C" __global__ void sl_emu_selftest_divergent_shuffle(uint32_t *out) {
    uint32_t v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// Odd lanes vote while even lanes shuffle, both with the full mask.
extern "C" __global__ void sl_emu_selftest_mismatched_collectives(uint32_t *out) {
    const uint32_t v = (threadIdx.x & 1) ? __ballot_sync(0xffffffffu, 1)
                                         : __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
    out[threadIdx.x] = v;
}

// What static shared memory holds before anything writes it. (The array escapes through an
// empty asm, so the compiler cannot fold its never-written contents to their zero initialiser.)
extern "C" __global__ void sl_emu_selftest_shared_before_write(uint32_t *out) {
    __shared__ uint32_t s[64];
    asm volatile("" : : "r"(s) : "memory");
    out[threadIdx.x] = s[threadIdx.x % 64];
}

// cp.async: thread t copies 16 bytes of src[t] into dynamic shared memory and records the
// destination's first word right after the issue (out[3t]), after the commit (out[3t + 1]) and
// after wait_group 0 (out[3t + 2]).
extern "C" __global__ void sl_emu_selftest_cp_async(uint32_t *out, const uint4 *src) {
    SL_DYNAMIC_SHARED(unsigned char, smem);
    uint32_t *dst = reinterpret_cast<uint32_t *>(smem) + 4 * threadIdx.x;
    sl_emu::cp_async_16(sl_emu::shared_address(dst), src + threadIdx.x);
    out[3 * threadIdx.x] = dst[0];
    sl_emu::cp_async_commit();
    out[3 * threadIdx.x + 1] = dst[0];
    sl_emu::cp_async_wait(0);
    out[3 * threadIdx.x + 2] = dst[0];
}

// cp.async to a shared address outside the block's dynamic shared memory.
extern "C" __global__ void sl_emu_selftest_cp_async_out_of_window(uint32_t *out, const uint4 *src) {
    SL_DYNAMIC_SHARED(unsigned char, smem);
    (void)smem;
    sl_emu::cp_async_16(1u << 20, src);
    sl_emu::cp_async_wait(0);
    out[threadIdx.x] = 0;
}

// Every shuffle kind and width, and the votes: out[lane * 8 + i] for lane = threadIdx.x (one
// warp), compared by the test with the CUDA programming guide's definitions.
extern "C" __global__ void sl_emu_selftest_warp_ops(uint32_t *out) {
    const uint32_t lane = threadIdx.x, full = 0xffffffffu;
    const uint32_t v = 100 + lane;
    uint32_t *o = out + 8 * lane;
    o[0] = __shfl_sync(full, v, (lane * 7) % 32);
    o[1] = __shfl_sync(full, v, lane + 3, 8);
    o[2] = __shfl_up_sync(full, v, 3);
    o[3] = __shfl_up_sync(full, v, 3, 8);
    o[4] = __shfl_down_sync(full, v, 5, 16);
    o[5] = __shfl_xor_sync(full, v, 6, 4);
    o[6] = __ballot_sync(full, lane % 3 == 0);
    o[7] = static_cast<uint32_t>(__shfl_xor_sync(full, static_cast<uint64_t>(v) << 32 | lane, 17) >> 32) ^
           (static_cast<uint32_t>(__any_sync(full, lane == 31)) << 20) ^
           (static_cast<uint32_t>(__all_sync(full, lane < 31)) << 21);
}

// A __syncthreads_count / _or / _and with predicate "thread index is a multiple of 3".
extern "C" __global__ void sl_emu_selftest_barrier_reductions(uint32_t *out) {
    const int p = threadIdx.x % 3 == 0;
    const int count = __syncthreads_count(p);
    const int any = __syncthreads_or(p);
    const int all = __syncthreads_and(p);
    if (threadIdx.x == 0) {
        out[0] = static_cast<uint32_t>(count);
        out[1] = static_cast<uint32_t>(any);
        out[2] = static_cast<uint32_t>(all);
    }
}

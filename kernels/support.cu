// Support kernels of the forward pass (SPEC §2.3, §5): embedding gather (optionally fused with
// the first RMSNorm), RMSNorm (optionally fused with the residual add), RoPE + K/V store into
// pool slots, and SwiGLU. Contracts and launch geometry: kernels/params.h. CPU twins (the
// oracles): src/backend/cpu/ops.rs `embed`, `rmsnorm`, `rope`, `swiglu`.
//
// All four are memory-bound. Each comes in two instantiations of one template: VEC = 8 moves
// 8 bf16 (16 bytes) per load/store when every row start is 16-byte aligned (widths and strides
// multiples of 8, base pointers 16-byte aligned), VEC = 1 is the scalar fallback. The choice is
// made once per launch from the parameters, so it is uniform over the grid.
//
// Arithmetic: bf16 is storage only, math in f32, and the expressions keep the CPU twin's order
// (no FMA contraction where the twin has two roundings: the RoPE rotation uses __fmul_rn /
// __fadd_rn). The kernels assume the default nvcc math (no --use_fast_math): expf, sqrtf, the
// f32 division and the f64 pow/sincos are the accurate versions.

#include "common.cuh"

namespace {

constexpr uint32_t kFull = 0xffffffffu;

__device__ __forceinline__ bool aligned16(const void *p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// --- V-wide loads and stores (V = 1 or 8) ----------------------------------------------------
// The pointer must be 16-byte aligned when V = 8 (the callers check this once per launch).

template <int V>
__device__ __forceinline__ void load_bf16(const sl_bf16 *src, float (&v)[V]) {
    if constexpr (V == 8) {
        const uint4 raw = *reinterpret_cast<const uint4 *>(src);
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(h[j]);
            v[2 * j] = f.x;
            v[2 * j + 1] = f.y;
        }
    } else {
        static_assert(V == 1, "V is 1 or 8");
        v[0] = sl::to_f32(src[0]);
    }
}

template <int V>
__device__ __forceinline__ void store_bf16(sl_bf16 *dst, const float (&v)[V]) {
    if constexpr (V == 8) {
        uint4 raw;
        __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        *reinterpret_cast<uint4 *>(dst) = raw;
    } else {
        static_assert(V == 1, "V is 1 or 8");
        dst[0] = sl::to_bf16(v[0]);
    }
}

// A raw 16-byte (or 2-byte) copy: no conversion, bit-exact.
template <int V>
__device__ __forceinline__ void copy_bf16(sl_bf16 *dst, const sl_bf16 *src) {
    if constexpr (V == 8) {
        *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
    } else {
        static_assert(V == 1, "V is 1 or 8");
        dst[0] = src[0];
    }
}

template <int V>
__device__ __forceinline__ void load_f32(const float *src, float (&v)[V]) {
    if constexpr (V == 8) {
        const float4 a = reinterpret_cast<const float4 *>(src)[0];
        const float4 b = reinterpret_cast<const float4 *>(src)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        static_assert(V == 1, "V is 1 or 8");
        v[0] = src[0];
    }
}

template <int V>
__device__ __forceinline__ void store_f32(float *dst, const float (&v)[V]) {
    if constexpr (V == 8) {
        reinterpret_cast<float4 *>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4 *>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        static_assert(V == 1, "V is 1 or 8");
        dst[0] = v[0];
    }
}

// Sum of `v` over the block, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024). Fixed reduction order, so the result is deterministic and identical in every
// thread. `warp_sums` is a 32-entry shared array; it may be reused as soon as this returns.
__device__ __forceinline__ float block_sum(float v, float *warp_sums) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    float t = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(kFull, t, o);
    __syncthreads();  // every warp has read warp_sums before anyone reuses it
    return t;
}

// 1 / sqrt(mean + eps), f32 (the CPU twin computes it in f64; the difference is far below the
// bf16 rounding of the output).
__device__ __forceinline__ float inv_rms(float sum_sq, uint32_t d, float eps) {
    return 1.0f / sqrtf(sum_sq / static_cast<float>(d) + eps);
}

// --- sl_embed --------------------------------------------------------------------------------
// Block `row` owns row `row` of x (and of normed); thread t owns the V-wide chunks t, t +
// blockDim.x, ... of that row, in both passes, so a thread only re-reads what it wrote itself.
// Pass 1 copies the table (or register) row into x as f32 and sums its squares; pass 2 (only
// when norm_w is set) re-reads the bf16 source row, which gives exactly the values written to x,
// and writes normed = bf16((x · inv_rms) · w). An out-of-range id sets *error_flag and the row
// is written as zeros (x and normed), so no output is left unwritten.

// warp_sums: a 32-entry shared array for block_sum.
template <int V>
__device__ void embed_row(const SlEmbedParams &p, uint32_t row, float *warp_sums) {
    const uint32_t id = p.ids[row];
    const bool ok = id == SL_REGISTER || id < p.table_rows;
    if (!ok && threadIdx.x == 0) atomicOr(p.error_flag, 1u);
    const sl_bf16 *src =
        id == SL_REGISTER ? p.reg : (ok ? p.table + static_cast<size_t>(id) * p.d : nullptr);
    float *x = p.x + static_cast<size_t>(row) * p.d;
    const uint32_t n_chunks = p.d / V;

    float sum_sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        float v[V];
        if (ok) {
            load_bf16<V>(src + c * V, v);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = 0.0f;
        }
        store_f32<V>(x + c * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) sum_sq += v[j] * v[j];
    }
    if (p.norm_w == nullptr) return;  // uniform over the block: no barrier is skipped unevenly

    const float inv = inv_rms(block_sum(sum_sq, warp_sums), p.d, p.eps);
    sl_bf16 *normed = p.normed + static_cast<size_t>(row) * p.d;
    for (uint32_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        float v[V], w[V];
        if (ok) {
            load_bf16<V>(src + c * V, v);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = 0.0f;
        }
        load_bf16<V>(p.norm_w + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = v[j] * inv * w[j];
        store_bf16<V>(normed + c * V, v);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ROW_THREADS) sl_embed(SlEmbedParams p) {
    __shared__ float warp_sums[32];
    const uint32_t row = blockIdx.x;
    if (row >= p.n_rows) return;
    const bool vec = p.d % 8 == 0 && aligned16(p.table) && aligned16(p.reg) && aligned16(p.x) &&
                     (p.norm_w == nullptr || (aligned16(p.norm_w) && aligned16(p.normed)));
    if (vec) {
        embed_row<8>(p, row, warp_sums);
    } else {
        embed_row<1>(p, row, warp_sums);
    }
}

// --- sl_rmsnorm ------------------------------------------------------------------------------
// Block `row` owns row `row` of x and out; thread t owns the V-wide chunks t, t + blockDim.x,
// ... in both passes. Pass 1 reads x (adding `add` and writing the sum back when add is set)
// and sums the squares; a block reduction gives inv_rms; pass 2 re-reads the thread's own
// chunks of x and writes out = bf16((x · inv_rms) · w).

namespace {

// warp_sums: a 32-entry shared array for block_sum.
template <int V>
__device__ void rmsnorm_row(const SlRmsNormParams &p, uint32_t row, float *warp_sums) {
    float *x = p.x + static_cast<size_t>(row) * p.d;
    const sl_bf16 *add = p.add == nullptr ? nullptr : p.add + static_cast<size_t>(row) * p.d;
    const uint32_t n_chunks = p.d / V;

    float sum_sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        float v[V];
        load_f32<V>(x + c * V, v);
        if (add != nullptr) {
            float a[V];
            load_bf16<V>(add + c * V, a);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] += a[j];
            store_f32<V>(x + c * V, v);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) sum_sq += v[j] * v[j];
    }

    const float inv = inv_rms(block_sum(sum_sq, warp_sums), p.d, p.eps);
    sl_bf16 *out = p.out + static_cast<size_t>(row) * p.d;
    for (uint32_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        float v[V], w[V];
        load_f32<V>(x + c * V, v);
        load_bf16<V>(p.w + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = v[j] * inv * w[j];
        store_bf16<V>(out + c * V, v);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ROW_THREADS) sl_rmsnorm(SlRmsNormParams p) {
    __shared__ float warp_sums[32];
    const uint32_t row = blockIdx.x;
    if (row >= p.n_rows) return;
    const bool vec = p.d % 8 == 0 && aligned16(p.x) && aligned16(p.w) && aligned16(p.out) &&
                     (p.add == nullptr || aligned16(p.add));
    if (vec) {
        rmsnorm_row<8>(p, row, warp_sums);
    } else {
        rmsnorm_row<1>(p, row, warp_sums);
    }
}

// --- sl_rope_kv ------------------------------------------------------------------------------
// Block `row` owns row `row`: its q row (rotated in place), its k and v rows (read only) and
// the pool rows at slots[row] of k_pool and v_pool (written). The pairs i < head_dim/2 are taken
// in chunks of kRopeChunk: first the block tabulates cos/sin of the chunk's angles in shared
// memory (thread t computes pair i0 + t), then a "unit" is V consecutive pairs (i .. i+V) of
// one head: thread t owns units t, t + blockDim.x, ... of q (n_heads heads) and then of k
// (n_kv_heads heads). A thread reads both halves of its unit (x_i.., x_{i+hd/2}..) before
// writing either, and no other thread touches them, so the in-place q update has no race.
// Finally v is copied to the pool, V elements per thread step.
//
// Angle, exactly as the CPU twin: inv_freq = pow(theta, (-2.0 * i) / head_dim) and
// angle = pos * inv_freq in f64, sin/cos in f64 rounded to f32; rotation in f32 with two
// roundings per product sum (no FMA): (a, b) -> (a·c − b·s, a·s + b·c). With the generation's
// table (rope_table, positions below table_positions) the cos/sin come from there: the same
// values, computed once on the host by the CPU twin's own expression, instead of two f64
// transcendentals per pair and row.

namespace {

constexpr uint32_t kRopeChunk = 256;  // pairs tabulated at once (head_dim <= 512: one chunk)

template <int V>
__device__ __forceinline__ void rotate_unit(const sl_bf16 *lo_src, const sl_bf16 *hi_src,
                                            sl_bf16 *lo_dst, sl_bf16 *hi_dst, const float *cos_t,
                                            const float *sin_t) {
    float a[V], b[V];
    load_bf16<V>(lo_src, a);
    load_bf16<V>(hi_src, b);
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const float c = cos_t[j], s = sin_t[j];
        const float ra = __fsub_rn(__fmul_rn(a[j], c), __fmul_rn(b[j], s));
        const float rb = __fadd_rn(__fmul_rn(a[j], s), __fmul_rn(b[j], c));
        a[j] = ra;
        b[j] = rb;
    }
    store_bf16<V>(lo_dst, a);
    store_bf16<V>(hi_dst, b);
}

// cos_t / sin_t: shared tables of kRopeChunk entries.
template <int V>
__device__ void rope_kv_row(const SlRopeKvParams &p, uint32_t row, float *cos_t, float *sin_t) {
    const uint32_t hd = p.head_dim, half = hd / 2;
    const double pos = static_cast<double>(p.positions[row]);
    const size_t slot = p.slots[row];
    sl_bf16 *q = p.q + static_cast<size_t>(row) * p.q_stride;
    const sl_bf16 *k = p.k + static_cast<size_t>(row) * p.kv_stride;
    const sl_bf16 *v = p.v + static_cast<size_t>(row) * p.kv_stride;
    sl_bf16 *k_dst = p.k_pool + slot * p.pool_stride;
    sl_bf16 *v_dst = p.v_pool + slot * p.pool_stride;
    // This position's (cos, sin) pairs in the generation's table, when it has them.
    const float2 *table = (p.rope_table != nullptr && p.positions[row] < p.table_positions)
                              ? reinterpret_cast<const float2 *>(p.rope_table) +
                                    static_cast<size_t>(p.positions[row]) * half
                              : nullptr;

    for (uint32_t i0 = 0; i0 < half; i0 += kRopeChunk) {
        const uint32_t n_pairs = min(kRopeChunk, half - i0);  // a multiple of V
        for (uint32_t t = threadIdx.x; t < n_pairs; t += blockDim.x) {
            const uint32_t i = i0 + t;
            if (table != nullptr) {  // computed once per generation (block-uniform)
                const float2 cs = table[i];
                cos_t[t] = cs.x;
                sin_t[t] = cs.y;
                continue;
            }
            const double inv_freq =
                pow(p.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
            double s, c;
            sincos(pos * inv_freq, &s, &c);
            cos_t[t] = static_cast<float>(c);
            sin_t[t] = static_cast<float>(s);
        }
        __syncthreads();

        const uint32_t units = n_pairs / V;  // units per head in this chunk
        for (uint32_t u = threadIdx.x; u < p.n_heads * units; u += blockDim.x) {
            const uint32_t head = u / units, t = (u % units) * V;
            sl_bf16 *lo = q + head * hd + i0 + t;
            rotate_unit<V>(lo, lo + half, lo, lo + half, cos_t + t, sin_t + t);
        }
        for (uint32_t u = threadIdx.x; u < p.n_kv_heads * units; u += blockDim.x) {
            const uint32_t head = u / units, t = (u % units) * V;
            const uint32_t off = head * hd + i0 + t;
            rotate_unit<V>(k + off, k + off + half, k_dst + off, k_dst + off + half, cos_t + t,
                           sin_t + t);
        }
        __syncthreads();  // the table is rewritten by the next chunk
    }

    const uint32_t kv_chunks = p.n_kv_heads * hd / V;
    for (uint32_t c = threadIdx.x; c < kv_chunks; c += blockDim.x) {
        copy_bf16<V>(v_dst + c * V, v + c * V);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ROW_THREADS) sl_rope_kv(SlRopeKvParams p) {
    __shared__ float cos_t[kRopeChunk];
    __shared__ float sin_t[kRopeChunk];
    const uint32_t row = blockIdx.x;
    if (row >= p.n_rows) return;
    // V = 8 needs head_dim/2 to be a multiple of 8 (units never straddle the two halves or a
    // table chunk) and every row start 16-byte aligned.
    const bool vec = p.head_dim % 16 == 0 && p.q_stride % 8 == 0 && p.kv_stride % 8 == 0 &&
                     p.pool_stride % 8 == 0 && aligned16(p.q) && aligned16(p.k) &&
                     aligned16(p.v) && aligned16(p.k_pool) && aligned16(p.v_pool);
    if (vec) {
        rope_kv_row<8>(p, row, cos_t, sin_t);
    } else {
        rope_kv_row<1>(p, row, cos_t, sin_t);
    }
}

// --- sl_swiglu -------------------------------------------------------------------------------
// Grid-stride over V-wide units of the [n_rows, width] output: unit u is row u / (width/V),
// columns (u % (width/V))·V .. +V; thread (blockIdx.x, threadIdx.x) owns units g, g + stride,
// ... with g its global index. out = bf16((g / (1 + exp(-g))) · up) in f32; for very negative
// g, expf(-g) is inf and silu is -0, as on the CPU.

namespace {

template <int V>
__device__ void swiglu_all(const SlSwigluParams &p) {
    const size_t per_row = p.width / V;
    const size_t total = per_row * p.n_rows;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t u = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total;
         u += stride) {
        const size_t row = u / per_row, col = (u % per_row) * V;
        float g[V], up[V];
        load_bf16<V>(p.gate + row * p.gate_stride + col, g);
        load_bf16<V>(p.up + row * p.up_stride + col, up);
#pragma unroll
        for (int j = 0; j < V; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * up[j];
        store_bf16<V>(p.out + row * p.width + col, g);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ELEM_THREADS) sl_swiglu(SlSwigluParams p) {
    const bool vec = p.width % 8 == 0 && p.gate_stride % 8 == 0 && p.up_stride % 8 == 0 &&
                     aligned16(p.gate) && aligned16(p.up) && aligned16(p.out);
    if (vec) {
        swiglu_all<8>(p);
    } else {
        swiglu_all<1>(p);
    }
}

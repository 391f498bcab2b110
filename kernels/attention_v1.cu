// The previous gathered-token attention kernel (v1), kept selectable for one release
// (`SL_ATTN=v1`, src/cuda/ops.rs `AttnVersion`) so that a GPU run can compare it with the current
// one (kernels/attention.cu). Nothing here changed but the names: the kernels are
// sl_attention_v1_hd64 / _hd128, the tile and shared-memory sizes SL_ATTN_V1_BLOCK_M and
// SL_ATTN_V1_SMEM_BYTES, and split partials are merged by attention.cu's sl_attention_merge.
//
// Gathered-token attention (SPEC §5): flash-style fused attention over a K/V pool addressed
// through per-sequence index lists, with the SPEC §3 visibility rule evaluated on the fly.
// Contract: SlAttnParams in kernels/params.h (grid, block, shared memory, split ranges,
// outputs). CPU twin and oracle: src/backend/cpu/attention.rs `attention_tiled` (same work
// decomposition, same split boundaries, same online softmax in base 2, same merge).
//
// Kernels
//   sl_attention_v1_hd64 / _hd128: grid (n_qtiles, n_heads, n_splits), 128 threads,
//     SL_ATTN_V1_SMEM_BYTES(head_dim) bytes of dynamic shared memory.
//   sl_attention_merge (attention.cu): only when n_splits > 1.
//
// Ownership
//   CTA (tile, head, split): up to 64 consecutive query rows of ONE sequence (row0 =
//     qtile_row0[tile]; rows at or past the sequence end or n_rows are padding: their Q is
//     zero, their scores are finite, and nothing of them is ever written), one query head
//     (K/V head = head / (n_heads / n_kv_heads), GQA), and the keys of one split: offsets
//     [start, end) of the sequence's key list, start = min(split·chunk, n_keys), end =
//     min(start + chunk, n_keys), chunk = SL_SPLIT_CHUNK (a multiple of 64, so only a split's
//     last key tile is partial).
//   Warp w (0..3): query rows 16w .. 16w+15 of the tile, for every key and every column.
//   Lane (g = lane / 4, t = lane % 4), the m16n8k16 fragment owner: rows 16w+g and 16w+g+8;
//     in S (16 x 64 per warp, 8 n-tiles of 8 keys) keys 8·nt + 2t + {0,1}; in O (16 x D,
//     D/8 n-tiles) columns 8·nt + 2t + {0,1}. The 4 lanes of a quad (same g) share a row:
//     row max and row sum are reduced across them with __shfl_xor_sync(1, 2).
//
// Shared memory (bf16 unless noted; SL_ATTN_V1_SMEM_BYTES(D), no padding)
//   Q  [64][D]                 at 0
//   K  [2][64][D]              at 64·D·2      (double buffer)
//   V  [2][64][D]              at 192·D·2     (double buffer)
//   key tags [2][64] u32       at 320·D·2     (double buffer, plain loads/stores)
//   Every [rows][D] tile is stored as rows of D/8 16-byte chunks; chunk c of row r lives at
//   chunk position c ^ (r % 8) (XOR swizzle). ldmatrix reads 8 consecutive rows (8-aligned) of
//   one logical chunk: their physical chunks c ^ 0..7 hit 8 distinct 4-bank groups, so every
//   ldmatrix phase is conflict-free without padding (a row is 128 or 256 bytes, a multiple of
//   the 32 banks).
//
// Pipeline (per CTA; barrier (A)/(B) are __syncthreads)
//   prologue: cp.async Q (zero rows for padding) and key tile 0 into buffer 0; commit.
//   for key tile i:
//     issue the gather of tile i+1 into buffer (i+1)%2 (cp.async through kv_indices, zero
//       rows past the split end; tags by plain loads/stores), commit; wait until tile i's
//       group has landed (wait_group 1, or 0 on the last tile);
//     (A) tile i's Q/K/V/tags are visible to every thread;
//     visibility: each thread evaluates sl::visible on exactly the 32 (row, key) pairs it
//       holds in S -> 32 bits; the CTA reduces them with __syncthreads_or (any visible) and
//       __syncthreads_and (every valid row sees every key, all 64 keys valid);
//     none visible: skip the math; otherwise S = Q·Kᵀ (mma.sync), scale to base 2 and set
//       hidden/invalid pairs to -inf (skipped when all are visible), online softmax, O += P·V
//       with P kept in registers as bf16 A fragments;
//     (B) every warp is done with buffer i%2 before iteration i+1 refills it with tile i+2.
//   epilogue: l == 0 -> o = 0, lse2 = -inf; else o /= l, lse2 = m + log2(l). n_splits == 1:
//     bf16 o and natural-log lse; else f32 partial_o and base-2 partial_lse (empty splits
//     included), combined by sl_attention_merge.
//
// Host-side requirements beyond params.h (checked by the wrapper): q, k_pool, v_pool 16-byte
// aligned and q_stride, kv_stride multiples of 8 elements (16-byte cp.async); o 4-byte aligned
// and o_stride even (bf16x2 stores); partial_o 8-byte aligned; n_heads a multiple of
// n_kv_heads; every kv_indices entry < n_slots; qtile_seq entries < n_seqs; the hd128 kernel
// needs cudaFuncAttributeMaxDynamicSharedMemorySize >= SL_ATTN_V1_SMEM_BYTES(128).

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.cuh"
#include "params.h"

namespace {

constexpr int BLOCK_M = SL_ATTN_V1_BLOCK_M;  // query rows per CTA
constexpr int BLOCK_N = SL_ATTN_BLOCK_N;  // keys per key tile
constexpr int THREADS = SL_ATTN_THREADS;  // 4 warps
constexpr int S_TILES = BLOCK_N / 8;      // n-tiles of 8 keys in a warp's S
constexpr float LN_2 = 0.693147180559945309f;

static_assert(BLOCK_M == 64 && BLOCK_N == 64 && THREADS == 128,
              "the warp layout below assumes 4 warps x 16 rows and 64-key tiles");

// Byte offsets of the shared-memory regions of the head_dim-D kernel.
template <int D>
struct SmemLayout {
    static constexpr uint32_t TILE_BYTES = BLOCK_N * D * 2;  // one K or V tile
    static constexpr uint32_t Q = 0;
    static constexpr uint32_t K = BLOCK_M * D * 2;
    static constexpr uint32_t V = K + 2 * TILE_BYTES;
    static constexpr uint32_t TAGS = V + 2 * TILE_BYTES;
    static constexpr uint32_t BYTES = TAGS + 2 * BLOCK_N * 4;
    static_assert(BYTES == SL_ATTN_V1_SMEM_BYTES(D), "layout disagrees with params.h");
};

// --- PTX wrappers ------------------------------------------------------------------------------
// On the emulated device (SL_EMULATE, kernels/emu) each one is the emulator's model of the same
// instruction, with the semantics its comment states.

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifndef SL_EMULATE

// 16 bytes global -> shared, bypassing L1 (the data is used once per CTA).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst),
                 "l"(__cvta_generic_to_global(src))
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, which lands in r[m].
// Lane l receives row l/4, elements 2(l%4), 2(l%4)+1 (low half first) of each matrix.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// Same, transposed: lane l receives elements (rows 2(l%4), 2(l%4)+1; column l/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d += A (16x16, row-major fragments a[0..3]) · B (16x8, column fragments b0, b1), f32 accumulate.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#else  // SL_EMULATE: the emulator's instructions (kernels/emu/device.h)

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src) {
    sl_emu::cp_async_16(dst, src);
}
__device__ __forceinline__ void cp_async_commit() { sl_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    sl_emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    sl_emu::ldmatrix_x4(r, addr, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    sl_emu::ldmatrix_x4(r, addr, true);
}
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
    sl_emu::mma_m16n8k16_bf16_f32(d, a, b0, b1);
}

#endif  // SL_EMULATE

// Two floats as one bf16x2 register: `lo` (the lower column) in bits 0..15.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
}

// --- Layout helpers ----------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` (elements 8·chunk .. 8·chunk+7) of row `row` in a
// swizzled [rows][D] bf16 tile. chunk < D/8, so chunk ^ (row & 7) < D/8 too.
template <int D>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
    return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// What one CTA works on (all CTA-uniform).
struct Work {
    uint32_t row0;     // first query row of the tile
    int n_valid;       // valid rows of the tile, 1..64
    uint32_t head;     // query head
    uint32_t kv_head;  // K/V head
    uint32_t key0;     // position in kv_indices / kv_tags of the split's first key
    uint32_t n_keys;   // keys of the split
};

// Fills `w` for this CTA; false when the CTA has nothing to do (no valid row, or a parameter
// outside the contract, which the host wrapper rejects before launching).
__device__ __forceinline__ bool plan_work(const SlAttnParams &p, Work &w) {
    const uint32_t tile = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
    if (tile >= p.n_qtiles || head >= p.n_heads || split >= p.n_splits || p.n_kv_heads == 0 ||
        p.n_heads % p.n_kv_heads != 0) {
        return false;
    }
    const uint32_t seq = p.qtile_seq[tile];
    if (seq >= p.n_seqs) return false;
    const uint32_t row0 = p.qtile_row0[tile];
    const uint32_t row_end = min(p.seq_indptr[seq + 1], p.n_rows);
    if (row0 >= row_end) return false;

    // The split's key range (params.h SL_SPLIT_CHUNK), the twin of AttnTiling::split_range
    // with tile_k = 64.
    const uint32_t key_begin = p.kv_indptr[seq];
    const uint32_t seq_keys = p.kv_indptr[seq + 1] - key_begin;
    const uint32_t chunk = SL_SPLIT_CHUNK(seq_keys, p.n_splits);
    const uint32_t start = static_cast<uint32_t>(
        min(static_cast<uint64_t>(split) * chunk, static_cast<uint64_t>(seq_keys)));
    const uint32_t end = static_cast<uint32_t>(
        min(static_cast<uint64_t>(start) + chunk, static_cast<uint64_t>(seq_keys)));

    w.row0 = row0;
    w.n_valid = static_cast<int>(min(row_end - row0, static_cast<uint32_t>(BLOCK_M)));
    w.head = head;
    w.kv_head = head / (p.n_heads / p.n_kv_heads);
    w.key0 = key_begin + start;
    w.n_keys = end - start;
    return true;
}

// --- Loads -------------------------------------------------------------------------------------

// Q rows of the tile for this head into sQ (swizzled); padding rows are zero.
template <int D>
__device__ __forceinline__ void load_q_tile(const SlAttnParams &p, const Work &w,
                                            unsigned char *sQ) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < BLOCK_M * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const uint32_t off = swizzled<D>(r, c);
        if (r < w.n_valid) {
            const sl_bf16 *src =
                p.q + static_cast<size_t>(w.row0 + r) * p.q_stride + w.head * D + c * 8;
            cp_async_16(smem_addr(sQ + off), src);
        } else {
            *reinterpret_cast<uint4 *>(sQ + off) = make_uint4(0, 0, 0, 0);
        }
    }
}

// Key tile `tile` of the split (split keys 64·tile .. 64·tile+63): K and V rows gathered from
// the pools through kv_indices into sK / sV (swizzled), key tags into sTags. Keys past the
// split end get zero K/V rows (so 0·V stays 0 in P·V) and tag 0; they are masked by index.
template <int D>
__device__ __forceinline__ void gather_kv_tile(const SlAttnParams &p, const Work &w, int tile,
                                               unsigned char *sK, unsigned char *sV,
                                               uint32_t *sTags) {
    constexpr int CHUNKS = D / 8;
    const uint32_t first = w.key0 + static_cast<uint32_t>(tile) * BLOCK_N;
    const int n = min(static_cast<int>(w.n_keys) - tile * BLOCK_N, BLOCK_N);  // 1..64
    for (int i = threadIdx.x; i < BLOCK_N * CHUNKS; i += THREADS) {
        const int j = i / CHUNKS, c = i % CHUNKS;
        const uint32_t off = swizzled<D>(j, c);
        if (j < n) {
            const uint32_t slot = p.kv_indices[first + j];
            const size_t src = static_cast<size_t>(slot) * p.kv_stride + w.kv_head * D + c * 8;
            cp_async_16(smem_addr(sK + off), p.k_pool + src);
            cp_async_16(smem_addr(sV + off), p.v_pool + src);
        } else {
            *reinterpret_cast<uint4 *>(sK + off) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(sV + off) = make_uint4(0, 0, 0, 0);
        }
    }
    for (int j = threadIdx.x; j < BLOCK_N; j += THREADS) {
        sTags[j] = j < n ? p.kv_tags[first + j] : 0u;
    }
}

// --- Per key tile ------------------------------------------------------------------------------

// Bit 4·nt + i is set iff the pair held in S element s[nt][i] by this lane is visible: its row
// (16w + g, + 8 for i >= 2) is valid, its key (8·nt + 2t + (i & 1)) is below n, and
// sl::visible(row tag, key tag) holds. The 128 threads together cover the 64 x 64 pairs once.
__device__ __forceinline__ uint32_t tile_visibility(const uint32_t *sTags, int n, int t,
                                                    const uint32_t (&row_tag)[2],
                                                    const bool (&row_ok)[2], bool joint) {
    uint32_t bits = 0;
#pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = nt * 8 + 2 * t + e;
            const uint32_t key_tag = sTags[key];
            const bool key_ok = key < n;
            if (row_ok[0] && key_ok && sl::visible(row_tag[0], key_tag, joint)) {
                bits |= 1u << (nt * 4 + e);
            }
            if (row_ok[1] && key_ok && sl::visible(row_tag[1], key_tag, joint)) {
                bits |= 1u << (nt * 4 + 2 + e);
            }
        }
    }
    return bits;
}

// s = Q_w · K_tileᵀ for this warp's 16 rows and the tile's 64 keys (raw dot products).
// A (Q, 16 rows x 16 dims): matrix m of ldmatrix_x4 = rows 8·(m%2).., dims 8·(m/2).. -> a[m].
// B (Kᵀ, 16 dims x 8 keys) is K row-major = "col" layout: matrix m = keys 8·(m/2).., dims
// 8·(m%2).. -> b[0], b[1] for keys 16q..16q+7 and b[2], b[3] for keys 16q+8..16q+15.
template <int D>
__device__ __forceinline__ void qk_tile(uint32_t sQ, uint32_t sK, int warp, int lane,
                                        float (&s)[S_TILES][4]) {
#pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    }
    const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int a_chunk = lane >> 4;
    const int b_row = (lane & 7) + (lane >> 4) * 8;
    const int b_chunk = (lane >> 3) & 1;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, sQ + swizzled<D>(a_row, 2 * kk + a_chunk));
#pragma unroll
        for (int q = 0; q < S_TILES / 2; ++q) {
            uint32_t b[4];
            ldmatrix_x4(b, sK + swizzled<D>(16 * q + b_row, 2 * kk + b_chunk));
            mma_bf16_16816(s[2 * q], a, b[0], b[1]);
            mma_bf16_16816(s[2 * q + 1], a, b[2], b[3]);
        }
    }
}

// Online softmax over one key tile, in base 2 (the CPU twin's loop, per fragment).
// In: s = raw scores. Out: s = p = 2^(s·scale_log2 - m_new) (0 for hidden pairs); m, the lane's
// partial l and o are updated (o and l rescaled by 2^(m_old - m_new)). `all_visible`: no pair is
// hidden (skip the bit tests); otherwise pairs whose bit is clear get -inf.
// While a row has seen no visible key, m stays -inf and p = 0: the exponent base is then 0
// instead of m (never 2^(-inf - -inf)).
template <int D>
__device__ __forceinline__ void softmax_update(float (&s)[S_TILES][4], uint32_t bits,
                                               bool all_visible, float scale_log2,
                                               float (&m)[2], float (&l)[2],
                                               float (&o)[D / 8][4]) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool shown = all_visible || ((bits >> (nt * 4 + i)) & 1u);
            s[nt][i] = shown ? s[nt][i] * scale_log2 : -INFINITY;
            tile_max[i / 2] = fmaxf(tile_max[i / 2], s[nt][i]);
        }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // The 4 lanes of a quad hold the 64 keys of the same row.
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m[r], tile_max[r]);
        const bool none_yet = m_new == -INFINITY;
        alpha[r] = none_yet ? 1.f : exp2f(m[r] - m_new);  // m = -inf -> 0: nothing to rescale
        base[r] = none_yet ? 0.f : m_new;
        m[r] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[nt][i] = exp2f(s[nt][i] - base[i / 2]);  // -inf -> 0
            row_sum[i / 2] += s[nt][i];
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + row_sum[r];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][0] *= alpha[0];
        o[nt][1] *= alpha[0];
        o[nt][2] *= alpha[1];
        o[nt][3] *= alpha[1];
    }
}

// o += P · V_tile. P's A fragment for keys 16j..16j+15 is the S (C-layout) fragments of n-tiles
// 2j and 2j+1 converted to bf16 in registers (C rows g / g+8, cols 2t.. map onto A's a[0..3]).
// B (V, 16 keys x 8 dims) needs key pairs per register: ldmatrix .trans on V row-major; matrix m
// = keys 16j + 8·(m%2).., dims 8·(m/2).. -> b[0], b[1] for dim tile 2pp, b[2], b[3] for 2pp+1.
template <int D>
__device__ __forceinline__ void pv_tile(uint32_t sV, int lane, const float (&s)[S_TILES][4],
                                        float (&o)[D / 8][4]) {
    const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int v_chunk = lane >> 4;
#pragma unroll
    for (int j = 0; j < BLOCK_N / 16; ++j) {
        const uint32_t a[4] = {
            pack_bf16x2(s[2 * j][0], s[2 * j][1]),          // row g,   keys 16j + 2t..
            pack_bf16x2(s[2 * j][2], s[2 * j][3]),          // row g+8, keys 16j + 2t..
            pack_bf16x2(s[2 * j + 1][0], s[2 * j + 1][1]),  // row g,   keys 16j + 8 + 2t..
            pack_bf16x2(s[2 * j + 1][2], s[2 * j + 1][3]),  // row g+8, keys 16j + 8 + 2t..
        };
#pragma unroll
        for (int pp = 0; pp < D / 16; ++pp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sV + swizzled<D>(16 * j + v_row, 2 * pp + v_chunk));
            mma_bf16_16816(o[2 * pp], a, b[0], b[1]);
            mma_bf16_16816(o[2 * pp + 1], a, b[2], b[3]);
        }
    }
}

// Normalises and writes this lane's rows: o (bf16) and lse (natural log) when n_splits == 1,
// else partial_o and partial_lse (base 2) of this split. Padding rows are not written.
template <int D>
__device__ __forceinline__ void epilogue(const SlAttnParams &p, const Work &w, int warp, int lane,
                                         const float (&m)[2], float (&l)[2],
                                         const float (&o)[D / 8][4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // Each lane summed its own 16 keys per tile; all were rescaled alike, so add them up.
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int local = warp * 16 + g + 8 * r;
        if (local >= w.n_valid) continue;
        const uint32_t row = w.row0 + static_cast<uint32_t>(local);
        // l >= 1 once a visible key was seen (the row max contributes 2^0), else exactly 0.
        const bool seen = l[r] > 0.f;
        const float inv_l = seen ? 1.f / l[r] : 0.f;
        const float lse2 = seen ? m[r] + log2f(l[r]) : -INFINITY;
        if (p.n_splits == 1) {
            sl_bf16 *dst = p.o + static_cast<size_t>(row) * p.o_stride + w.head * D + 2 * t;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const float x0 = seen ? o[nt][2 * r] * inv_l : 0.f;
                const float x1 = seen ? o[nt][2 * r + 1] * inv_l : 0.f;
                *reinterpret_cast<__nv_bfloat162 *>(dst + nt * 8) = __floats2bfloat162_rn(x0, x1);
            }
            if (p.lse != nullptr && t == 0) {
                p.lse[static_cast<size_t>(row) * p.n_heads + w.head] =
                    seen ? lse2 * LN_2 : -INFINITY;
            }
        } else {
            const size_t row_head =
                (static_cast<size_t>(blockIdx.z) * p.n_rows + row) * p.n_heads + w.head;
            float *dst = p.partial_o + row_head * D + 2 * t;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const float x0 = seen ? o[nt][2 * r] * inv_l : 0.f;
                const float x1 = seen ? o[nt][2 * r + 1] * inv_l : 0.f;
                *reinterpret_cast<float2 *>(dst + nt * 8) = make_float2(x0, x1);
            }
            if (t == 0) p.partial_lse[row_head] = lse2;
        }
    }
}

// --- The CTA -----------------------------------------------------------------------------------

template <int D>
__device__ __forceinline__ void attention_cta(const SlAttnParams &p) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    if (p.head_dim != D) return;  // the wrapper picks the kernel by head_dim
    Work w;
    if (!plan_work(p, w)) return;  // CTA-uniform, before any barrier

    SL_DYNAMIC_SHARED(unsigned char, smem);
    using L = SmemLayout<D>;
    // Buffer b of K / V / tags (computed, not table-indexed: a pointer array indexed by a
    // runtime value would live in local memory).
    unsigned char *sQ = smem + L::Q;
    auto sK = [&](int b) { return smem + L::K + b * L::TILE_BYTES; };
    auto sV = [&](int b) { return smem + L::V + b * L::TILE_BYTES; };
    auto sTags = [&](int b) { return reinterpret_cast<uint32_t *>(smem + L::TAGS) + b * BLOCK_N; };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int n_tiles = static_cast<int>((w.n_keys + BLOCK_N - 1) / BLOCK_N);

    // This lane's two rows: validity and tags (a padding row gets no visible bit: row_ok).
    bool row_ok[2];
    uint32_t row_tag[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int local = warp * 16 + g + 8 * r;
        row_ok[r] = local < w.n_valid;
        row_tag[r] = row_ok[r] ? p.row_tags[w.row0 + local] : 0u;
    }
    // Bits of the pairs whose row is valid (bits 0,1 of each nibble: row g; bits 2,3: g+8).
    const uint32_t valid_row_bits = (row_ok[0] ? 0x33333333u : 0u) | (row_ok[1] ? 0xCCCCCCCCu : 0u);
    const bool joint = p.joint != 0;

    load_q_tile<D>(p, w, sQ);
    if (n_tiles > 0) gather_kv_tile<D>(p, w, 0, sK(0), sV(0), sTags(0));
    cp_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};

    // `[sass:...]`: the regions scripts/sass-figures.py attributes the loop's SASS to.
    for (int tile = 0; tile < n_tiles; ++tile) {  // [sass:loop-begin]
        const int buf = tile & 1;  // [sass:control]
        if (tile + 1 < n_tiles) {  // [sass:control]
            gather_kv_tile<D>(p, w, tile + 1, sK(buf ^ 1), sV(buf ^ 1), sTags(buf ^ 1));  // [sass:gather]
            cp_async_commit();  // [sass:sync]
            cp_async_wait<1>();  // everything but tile+1's group has landed
        } else {
            cp_async_wait<0>();  // [sass:sync]
        }
        __syncthreads();  // (A)

        const int n = min(static_cast<int>(w.n_keys) - tile * BLOCK_N, BLOCK_N);  // [sass:visibility]
        const uint32_t bits = tile_visibility(sTags(buf), n, t, row_tag, row_ok, joint);  // [sass:visibility]
        // Skip: no valid row sees any valid key of the tile. Fast path: every valid row sees
        // every key and all 64 keys are valid (row 0 is valid and lanes 0..3 of warp 0 hold it
        // for all 64 keys, so the AND sees every key's validity); padding rows then score
        // 0·K = 0, finite, and are never written.
        const bool any_visible = __syncthreads_or(bits != 0u) != 0;  // [sass:visibility]
        const bool all_visible = __syncthreads_and(bits == valid_row_bits) != 0;  // [sass:visibility]
        if (any_visible) {  // [sass:control]
            float s[S_TILES][4];
            qk_tile<D>(smem_addr(sQ), smem_addr(sK(buf)), warp, lane, s);  // [sass:qk]
            softmax_update<D>(s, bits, all_visible, p.scale_log2, m, l, o);  // [sass:softmax]
            pv_tile<D>(smem_addr(sV(buf)), lane, s, o);  // [sass:pv]
        }
        __syncthreads();  // (B)
    }  // [sass:loop-end]
    cp_async_wait<0>();  // no tile: the Q copies may still be in flight

    epilogue<D>(p, w, warp, lane, m, l, o);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ATTN_THREADS)
    sl_attention_v1_hd64(SlAttnParams p) {
    attention_cta<64>(p);
}

extern "C" __global__ void __launch_bounds__(SL_ATTN_THREADS)
    sl_attention_v1_hd128(SlAttnParams p) {
    attention_cta<128>(p);
}

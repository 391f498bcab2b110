// Gathered-token attention (SPEC §5), version 2: flash-style fused attention over a K/V pool
// addressed through per-sequence index lists, with the SPEC §3 visibility rule decided per
// (query tile, key tile) from the plan's tile summaries. Contract: SlAttnParams in
// kernels/params.h (grid, block, shared memory, key tiles and summaries, split ranges, outputs).
// CPU twin and oracle: src/backend/cpu/attention.rs `attention_tiled` (same work decomposition,
// same tile classes, same split boundaries, same online softmax in base 2, same merge). The
// previous kernel (v1) is attention_v1.cu; both write the same split partials, merged here.
//
// Kernels
//   sl_attention_hd64 / sl_attention_hd128: grid (n_qtiles, n_heads, n_splits), 128 threads,
//     SL_ATTN_SMEM_BYTES(head_dim) bytes of dynamic shared memory.
//   sl_attention_merge: grid (n_rows, ceil(n_heads / SL_MERGE_HEADS)), SL_MERGE_THREADS threads;
//     only when n_splits > 1.
//
// Ownership
//   CTA (tile, head, split): up to 128 consecutive query rows of ONE sequence (row0 =
//     qtile_row0[tile], n_valid rows; rows at or past the sequence end or n_rows are padding:
//     their Q is zero, their scores finite, and nothing of them is ever written), one query
//     head (K/V head = head / (n_heads / n_kv_heads), GQA), and the keys of one split: offsets
//     [start, end) of the sequence's key list, start = min(split·chunk, n_keys), end =
//     min(start + chunk, n_keys), chunk = SL_SPLIT_CHUNK (a multiple of 64, so the split's key
//     tile i is the sequence's key tile start/64 + i, summary ktile_indptr[seq] + start/64 + i,
//     and only the sequence's last tile is partial).
//   MB = 2 m-blocks of 16 rows per warp when n_valid > 64, else MB = 1 (a tile of at most 64
//     rows): warp w owns rows 16·MB·w .. 16·MB·w + 16·MB - 1; m-block mb of it is rows
//     16·MB·w + 16·mb + (0..15). Each K / V fragment loaded from shared memory feeds MB
//     m-blocks' mma (128 bytes of ldmatrix per HMMA with MB = 2, half of v1's).
//   Lane (g = lane / 4, t = lane % 4), the m16n8k16 fragment owner: in m-block mb, rows g and
//     g + 8; in S (16 x 64, 8 n-tiles of 8 keys) keys 8·nt + 2t + {0,1}; in O (16 x D, D/8
//     n-tiles) columns 8·nt + 2t + {0,1}. The 4 lanes of a quad share a row: row max and row
//     sum are reduced across them with __shfl_xor_sync(1, 2).
//
// Tile classes (once per CTA, then once per key tile; all CTA-uniform)
//   The CTA's rows are summarised (thread r holds row r; warp shuffles, then shared memory) into
//   a QueryDesc (common.cuh). Key tile i's class is classify(QueryDesc, kv_summary[...]):
//   HIDDEN tiles are skipped by the pipeline's cursor (no index fetch, no gather, no math),
//   VISIBLE full tiles (64 keys) need no masking and no key tags, the rest (MIXED, or the
//   sequence's partial last tile) evaluate sl::visible per (row, key) pair on the fragments each
//   lane holds. No barrier reduction is involved.
//
// Shared memory (bf16 unless noted; SL_ATTN_SMEM_BYTES(D); S = SL_ATTN_KV_STAGES(D), R = S + 1)
//   Q    [128][D]                    at 0
//   K    [S][64][D]                  at 128·D·2
//   V    [S][64][D]                  after K
//   idx  [R][64] u32 (pool slots)    after V
//   tags [R][64] u32 (key tags)      after idx
//   meta: the CTA's QueryDesc (read per key tile by the cursor; kept out of the registers the
//         accumulators need) and the scratch of its reduction       after tags
//   Every [rows][D] tile is stored as rows of D/8 16-byte chunks; chunk c of row r lives at
//   chunk position c ^ (r % 8) (XOR swizzle): every ldmatrix phase reads 8 rows of one logical
//   chunk from 8 distinct 4-bank groups, conflict-free without padding. After the key loop the
//   K/V region is reused to stage the output rows (see the epilogue).
//
// Pipeline (per CTA). a_0, a_1, ... are the split's non-hidden key tiles in order (the cursor
// walks the summaries, skipping hidden ones). Tile a_j uses K/V stage j % S and idx/tag slot
// j % R. Every thread commits the same sequence of cp.async groups (empty ones included):
//   prologue: Q and the indices (+ tags when MIXED) of a_0 .. a_{S-1}, commit; wait_group 0;
//     __syncthreads; then the K/V gather of a_0 .. a_{S-2}, one commit each.
//   iteration i (computes a_i):
//     wait_group S-2: the K/V of a_i and the indices of a_{i+S-1} have landed (with S = 3 the
//       gather of a_{i+1} may still be in flight; the groups are [idx a_{i+S}], [K/V a_{i+S-1}]
//       per iteration, in that order);
//     __syncthreads (A): those copies are visible to every thread, and every warp is done with
//       iteration i-1, whose K/V stage ((i-1) % S = (i+S-1) % S) and idx/tag slot ((i-1) % R =
//       (i+S) % R) are refilled below;
//     fetch the indices (+ tags) of a_{i+S} (cp.async 4 B), commit; gather the K/V of a_{i+S-1}
//       through its landed indices (cp.async 16 B; rows past the tile's keys are zeroed), commit;
//     compute a_i: S = Q·Kᵀ (mma.sync), mask (MIXED / partial tiles only), online softmax in
//       base 2, O += P·V with P kept in registers as bf16 A fragments.
//   One barrier per key tile: (A) orders both the reads after the copies and the refills after
//   the reads.
//   epilogue: wait_group 0; __syncthreads (the K/V region becomes the output staging area);
//     l == 0 -> o = 0, lse2 = -inf; else o /= l, lse2 = m + log2(l). Each warp writes its rows
//     (bf16 o, or f32 partial_o when n_splits > 1) into its own swizzled staging rows,
//     __syncwarp, then stores them with 16-byte stores (whole rows: coalesced); lse by one lane
//     per row. n_splits == 1: bf16 o and natural-log lse; else partial_o and base-2
//     partial_lse (empty splits included), combined by sl_attention_merge.
//
// Host-side requirements beyond params.h (checked by the wrapper): q, k_pool, v_pool, o,
// partial_o 16-byte aligned; q_stride, kv_stride, o_stride multiples of 8 elements (16-byte
// cp.async and 16-byte stores); kv_indices, kv_tags 4-byte aligned (cp.async 4); kv_summary
// 16-byte aligned; n_heads a multiple of n_kv_heads; every kv_indices entry < n_slots;
// qtile_seq entries < n_seqs; ktile_indptr / kv_summary as params.h builds them; the kernels
// need cudaFuncAttributeMaxDynamicSharedMemorySize >= SL_ATTN_SMEM_BYTES(head_dim).

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.cuh"
#include "params.h"

namespace {

constexpr int BLOCK_M = SL_ATTN_BLOCK_M;  // query rows per CTA (at most)
constexpr int BLOCK_N = SL_ATTN_BLOCK_N;  // keys per key tile
constexpr int THREADS = SL_ATTN_THREADS;  // 4 warps
constexpr int WARPS = THREADS / 32;
constexpr int S_TILES = BLOCK_N / 8;  // n-tiles of 8 keys in an m-block's S
constexpr float LN_2 = 0.693147180559945309f;

static_assert(BLOCK_M == 128 && BLOCK_N == 64 && THREADS == 128,
              "the layout below assumes 4 warps x 32 rows and 64-key tiles");
static_assert(THREADS == BLOCK_M, "thread r summarises row r of the tile");

// Byte offsets of the shared-memory regions of the head_dim-D kernel.
template <int D>
struct SmemLayout {
    static constexpr int STAGES = SL_ATTN_KV_STAGES(D);  // K/V buffers
    static constexpr int RING = STAGES + 1;              // index / tag slots
    static constexpr uint32_t TILE_BYTES = BLOCK_N * D * 2;  // one K or V tile
    static constexpr uint32_t Q = 0;
    static constexpr uint32_t K = BLOCK_M * D * 2;
    static constexpr uint32_t V = K + STAGES * TILE_BYTES;
    static constexpr uint32_t IDX = V + STAGES * TILE_BYTES;
    static constexpr uint32_t TAGS = IDX + RING * BLOCK_N * 4;
    static constexpr uint32_t META = TAGS + RING * BLOCK_N * 4;  // QueryDesc + its scratch
    static constexpr uint32_t BYTES = META + SL_ATTN_META_BYTES;
    // Output staging (epilogue): per warp 32 rows of D f32 (the widest case), in the K/V region.
    static constexpr uint32_t STAGE_WARP_BYTES = 32 * D * 4;
    static_assert(BYTES == SL_ATTN_SMEM_BYTES(D), "layout disagrees with params.h");
    static_assert(STAGES == 2 || STAGES == 3, "the wait_group count S - 2 assumes 2 or 3 stages");
    static_assert(WARPS * STAGE_WARP_BYTES <= 2 * STAGES * TILE_BYTES,
                  "the output staging must fit the K/V region");
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

// 4 bytes global -> shared (one key index or tag; lists are only 4-byte aligned).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst),
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

// 2^x, one MUFU.EX2 (max 2 ulp; -inf -> +0, results below 2^-126 flushed to 0). exp2f under
// default nvcc math wraps the same instruction in denormal scaling the softmax never needs.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#else  // SL_EMULATE: the emulator's instructions (kernels/emu/device.h)

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src) {
    sl_emu::cp_async_16(dst, src);
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void *src) {
    sl_emu::cp_async_4(dst, src);
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
// The host's exp2f (the device's is within 2 ulp of it).
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

#endif  // SL_EMULATE

// Two floats as one bf16x2 register: `lo` (the lower column) in bits 0..15.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
}

// --- Layout helpers ----------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `row_bytes`-byte rows
// (a multiple of 128: 8 chunks or more), e.g. a [rows][D] bf16 tile with row_bytes = 2·D.
template <int ROW_BYTES>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
    static_assert(ROW_BYTES % 128 == 0, "rows of at least 8 chunks");
    return static_cast<uint32_t>(row * ROW_BYTES + ((chunk ^ (row & 7)) << 4));
}

// What one CTA works on (all CTA-uniform).
struct Work {
    uint32_t row0;     // first query row of the tile
    int n_valid;       // valid rows of the tile, 1..128
    uint32_t head;     // query head
    uint32_t kv_head;  // K/V head
    uint32_t key0;     // position in kv_indices / kv_tags of the split's first key
    int n_keys;        // keys of the split
    uint32_t ktile0;   // kv_summary entry of the split's first key tile
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
    w.n_keys = static_cast<int>(end - start);
    w.ktile0 = p.ktile_indptr[seq] + start / BLOCK_N;
    return true;
}

// The Work in shared memory (the meta region, after the QueryDesc and its scratch): the key
// loop reloads it where it needs it rather than holding 7 registers beside the accumulators.
constexpr int WORK_AT = 9 + 8 * WARPS;  // words into the meta region
constexpr int WORK_WORDS = 7;
static_assert((WORK_AT + WORK_WORDS) * 4 <= SL_ATTN_META_BYTES, "meta region too small");

__device__ __forceinline__ void store_work(const Work &w, uint32_t *m) {
    m[0] = w.row0;
    m[1] = static_cast<uint32_t>(w.n_valid);
    m[2] = w.head;
    m[3] = w.kv_head;
    m[4] = w.key0;
    m[5] = static_cast<uint32_t>(w.n_keys);
    m[6] = w.ktile0;
}

__device__ __forceinline__ Work load_work(const uint32_t *m) {
    Work w;
    w.row0 = m[0];
    w.n_valid = static_cast<int>(m[1]);
    w.head = m[2];
    w.kv_head = m[3];
    w.key0 = m[4];
    w.n_keys = static_cast<int>(m[5]);
    w.ktile0 = m[6];
    return w;
}

// Keys of the split's key tile `tile` (1..64 for a tile of the split).
__device__ __forceinline__ int keys_in_tile(const Work &w, int tile) {
    return min(w.n_keys - tile * BLOCK_N, BLOCK_N);
}

// --- Tile classes ------------------------------------------------------------------------------

// The CTA's QueryDesc in shared memory (the meta region): per key branch bk, words bk·4 + 0..3
// = c_lo, c_hi, m_lo, m_hi, and word 8 = blocked[0] | blocked[1] << 1.
constexpr int QD_WORDS = 9;

// Builds the QueryDesc of the CTA's rows (thread r holds row r) into `qd_out` (QD_WORDS words)
// through `scratch` (8·WARPS words). Contains two __syncthreads: call it from every thread; on
// return `qd_out` is visible to all of them.
__device__ __forceinline__ void describe_rows(const SlAttnParams &p, const Work &w,
                                              uint32_t *scratch, uint32_t *qd_out) {
    uint32_t s[sl::SUMMARY_WORDS];
    sl::summary_clear(s);
    const int r = threadIdx.x;
    if (r < w.n_valid) sl::summary_insert(s, p.row_tags[w.row0 + r]);
    sl::summary_warp_reduce(s);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane < sl::SUMMARY_WORDS) {
        uint32_t mine = s[0];
#pragma unroll
        for (int k = 1; k < sl::SUMMARY_WORDS; ++k) mine = lane == k ? s[k] : mine;
        scratch[warp * sl::SUMMARY_WORDS + lane] = mine;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < sl::SUMMARY_WORDS; ++k) {
#pragma unroll
        for (int v = 0; v < WARPS; ++v) {
            const uint32_t x = scratch[v * sl::SUMMARY_WORDS + k];
            s[k] = (k % 2 == 0) ? min(s[k], x) : max(s[k], x);
        }
    }
    if (threadIdx.x == 0) {
        const sl::QueryDesc d = sl::query_desc(s, p.joint != 0);
#pragma unroll
        for (int bk = 0; bk < 2; ++bk) {
            qd_out[4 * bk] = d.c_lo[bk];
            qd_out[4 * bk + 1] = d.c_hi[bk];
            qd_out[4 * bk + 2] = d.m_lo[bk];
            qd_out[4 * bk + 3] = d.m_hi[bk];
        }
        qd_out[8] = (d.blocked[0] ? 1u : 0u) | (d.blocked[1] ? 2u : 0u);
    }
    __syncthreads();
}

// The QueryDesc back from shared memory (a broadcast read per key tile).
__device__ __forceinline__ sl::QueryDesc load_desc(const uint32_t *qd) {
    sl::QueryDesc d;
#pragma unroll
    for (int bk = 0; bk < 2; ++bk) {
        d.c_lo[bk] = qd[4 * bk];
        d.c_hi[bk] = qd[4 * bk + 1];
        d.m_lo[bk] = qd[4 * bk + 2];
        d.m_hi[bk] = qd[4 * bk + 3];
        d.blocked[bk] = (qd[8] >> bk) & 1u;
    }
    return d;
}

// Class of the split's key tile `tile`: TILE_HIDDEN, TILE_MIXED or TILE_VISIBLE (VISIBLE only
// for a full tile: a partial one is masked per pair).
__device__ __forceinline__ int tile_class(const SlAttnParams &p, const Work &w,
                                          const uint32_t *qd, int tile) {
    const uint4 *src = reinterpret_cast<const uint4 *>(
        p.kv_summary + static_cast<size_t>(w.ktile0 + tile) * sl::SUMMARY_WORDS);
    const uint4 lo = __ldg(src), hi = __ldg(src + 1);
    const uint32_t k[sl::SUMMARY_WORDS] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const int c = sl::classify(load_desc(qd), k);
    return (c == sl::TILE_VISIBLE && keys_in_tile(w, tile) < BLOCK_N) ? sl::TILE_MIXED : c;
}

// The pipeline's cursor: the next non-hidden key tile at or after `next` (which it advances),
// as tile·4 + class, or -1 when there is none. `next` in, the tile after it out.
__device__ __forceinline__ int next_active(const SlAttnParams &p, const Work &w,
                                           const uint32_t *qd, int n_tiles, int &next) {
    while (next < n_tiles) {
        const int tile = next++;
        const int c = tile_class(p, w, qd, tile);
        if (c != sl::TILE_HIDDEN) return tile * 4 + c;
    }
    return -1;
}

// --- Loads -------------------------------------------------------------------------------------

// The first `rows` (64 or 128) Q rows of the tile for this head into sQ (swizzled); rows past
// n_valid are zero.
template <int D>
__device__ __forceinline__ void load_q_tile(const SlAttnParams &p, const Work &w, int rows,
                                            unsigned char *sQ) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < rows * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const uint32_t off = swizzled<2 * D>(r, c);
        if (r < w.n_valid) {
            const sl_bf16 *src =
                p.q + static_cast<size_t>(w.row0 + r) * p.q_stride + w.head * D + c * 8;
            cp_async_16(smem_addr(sQ + off), src);
        } else {
            *reinterpret_cast<uint4 *>(sQ + off) = make_uint4(0, 0, 0, 0);
        }
    }
}

// The pool slots (and, for a MIXED tile, the tags) of the split's key tile `tile` into slot
// sIdx / sTags, one cp.async of 4 bytes per key: threads 0..63 (warps 0, 1) the indices,
// 64..127 (warps 2, 3) the tags. Entries past the tile's keys are not written (never read: the
// gather zeroes those rows and the mask tests the key index first).
__device__ __forceinline__ void fetch_keys(const SlAttnParams &p, const Work &w, int tile,
                                           int cls, uint32_t *sIdx, uint32_t *sTags) {
    const int n = keys_in_tile(w, tile);
    const uint32_t first = w.key0 + static_cast<uint32_t>(tile) * BLOCK_N;
    const int j = threadIdx.x % BLOCK_N;
    if (threadIdx.x < BLOCK_N) {  // warp-uniform
        if (j < n) cp_async_4(smem_addr(sIdx + j), p.kv_indices + first + j);  // [sass:fetch-idx]
    } else if (cls == sl::TILE_MIXED) {
        if (j < n) cp_async_4(smem_addr(sTags + j), p.kv_tags + first + j);  // [sass:fetch-tags]
    }
}

// The K and V rows of the split's key tile `tile` gathered from the pools through its landed
// indices sIdx into sK / sV (swizzled). Thread t copies chunk t % (D/8) of rows t / (D/8) +
// k·(THREADS / (D/8)); the swizzle's row % 8 is the same for all of its rows. FULL (64 keys):
// no per-row test. Otherwise rows past the tile's n keys are zeroed (so 0·V stays 0 in P·V;
// they are masked by index).
template <int D, bool FULL>
__device__ __forceinline__ void gather_rows(const SlAttnParams &p, const Work &w, int n,
                                            const uint32_t *sIdx, unsigned char *sK,
                                            unsigned char *sV) {
    constexpr int CHUNKS = D / 8;
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // 8 (D = 128) or 16 (D = 64)
    static_assert(ROWS_PER_PASS % 8 == 0, "one swizzle per thread");
    const int c = threadIdx.x % CHUNKS, j0 = threadIdx.x / CHUNKS;
    const size_t col = static_cast<size_t>(w.kv_head) * D + c * 8;
    const uint32_t off0 = swizzled<2 * D>(j0, c);
#pragma unroll
    for (int k = 0; k < BLOCK_N / ROWS_PER_PASS; ++k) {
        const int j = j0 + k * ROWS_PER_PASS;
        const uint32_t off = off0 + static_cast<uint32_t>(k * ROWS_PER_PASS * 2 * D);
        if (FULL || j < n) {
            const size_t src = static_cast<size_t>(sIdx[j]) * p.kv_stride + col;
            cp_async_16(smem_addr(sK + off), p.k_pool + src);
            cp_async_16(smem_addr(sV + off), p.v_pool + src);
        } else {
            *reinterpret_cast<uint4 *>(sK + off) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(sV + off) = make_uint4(0, 0, 0, 0);
        }
    }
}

template <int D>
__device__ __forceinline__ void gather_kv_tile(const SlAttnParams &p, const Work &w, int tile,
                                               const uint32_t *sIdx, unsigned char *sK,
                                               unsigned char *sV) {
    const int n = keys_in_tile(w, tile);
    if (n == BLOCK_N) {  // CTA-uniform: every tile but the sequence's last
        gather_rows<D, true>(p, w, n, sIdx, sK, sV);  // [sass:gather-full]
    } else {
        gather_rows<D, false>(p, w, n, sIdx, sK, sV);  // [sass:gather-partial]
    }
}

// --- Per key tile ------------------------------------------------------------------------------

// Shared addresses of the ldmatrix rows a lane gives, as one base register per operand. The
// swizzled address of (row, chunk) with row % 8 = lane % 8 (every row below is 8-aligned plus
// lane % 8) and chunk = 2k + h (h = 0, 1 the lane's half) is row·RB + ((2k ^ h ^ row%8) << 4)
// = (row·RB + ((h ^ lane%8) << 4)) ^ (k << 5) + (rows above the 8-aligned part)·RB: bits 4..7
// of a row start are zero (RB, the region offsets and the tile strides are multiples of 256, or
// of 128 with k < 4 for D = 64, and the dynamic shared memory is 1024-byte aligned), so each
// ldmatrix costs one XOR with an immediate (k << 5) instead of a register per (k, row block).
struct FragBases {
    uint32_t q;  // Q, A operand: row 16·MB·warp + (lane & 7) + 8·((lane >> 3) & 1), h = lane >> 4
    uint32_t k;  // K, B operand: row (lane & 7) + 8·(lane >> 4), h = (lane >> 3) & 1 (stage 0)
    uint32_t v;  // V, B operand (.trans): row (lane & 7) + 8·((lane >> 3) & 1), h = lane >> 4
};

template <int D, int MB>
__device__ __forceinline__ FragBases frag_bases(uint32_t sQ, uint32_t sK0, uint32_t sV0,
                                                int warp, int lane) {
    constexpr int RB = 2 * D;  // bytes per row
    const uint32_t r8 = lane & 7;
    const uint32_t a_row = warp * 16 * MB + r8 + ((lane >> 3) & 1) * 8;
    const uint32_t b_row = r8 + (lane >> 4) * 8;
    FragBases f;
    f.q = sQ + a_row * RB + ((((lane >> 4) & 1) ^ r8) << 4);
    f.k = sK0 + b_row * RB + ((((lane >> 3) & 1) ^ r8) << 4);
    f.v = sV0 + a_row % 16 * RB + ((((lane >> 4) & 1) ^ r8) << 4);
    return f;
}

// s[mb] = Q_mb · K_tileᵀ for this warp's MB m-blocks and the tile's 64 keys (raw dot products).
// A (Q, 16 rows x 16 dims): matrix m of ldmatrix_x4 = rows 8·(m%2).., dims 8·(m/2).. -> a[m].
// B (Kᵀ, 16 dims x 8 keys) is K row-major = "col" layout: matrix m = keys 8·(m/2).., dims
// 8·(m%2).. -> b[0], b[1] for keys 16q..16q+7 and b[2], b[3] for keys 16q+8..16q+15; each B
// fragment feeds the MB m-blocks. `k_base` = FragBases::k plus the stage's offset.
template <int D, int MB, int NT>
__device__ __forceinline__ void qk_tile(uint32_t q_base, uint32_t k_base, float (&s)[MB][NT][4]) {
    constexpr uint32_t RB = 2 * D;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[mb][nt][0] = s[mb][nt][1] = s[mb][nt][2] = s[mb][nt][3] = 0.f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t qa = q_base ^ (kk << 5), ka = k_base ^ (kk << 5);
        uint32_t a[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) ldmatrix_x4(a[mb], qa + mb * 16 * RB);
#pragma unroll
        for (int q = 0; q < NT / 2; ++q) {
            uint32_t b[4];
            ldmatrix_x4(b, ka + q * 16 * RB);
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                mma_bf16_16816(s[mb][2 * q], a[mb], b[0], b[1]);
                mma_bf16_16816(s[mb][2 * q + 1], a[mb], b[2], b[3]);
            }
        }
    }
}

// MIXED (or partial) tile: which of the pairs this lane holds in S are visible, as one bit
// mask per m-block (bit 4·nt + 2r + e: row g + 8r, key key0 + 8·nt + 2t + e of the sub-tile;
// 4·NT <= 32 bits), computed before S = Q·Kᵀ so its registers are free again when the scores
// are. Row (mb, r) of this lane is tile row 16·MB·warp + 16·mb + g + 8r (its tag read here, an
// L1 hit after the first mixed tile); padding rows get tag 0: whatever they see, they are never
// written. Keys past the tile's n keys are hidden.
// sl::visible, factored: a clean row of block b sees clean keys of blocks <= b; a masked row of
// block b every clean key and the keys of block b. With kclean = a key's block if clean, else
// ~0 (above every block): visible ⇔ (kclean <= lim ∨ kblock == same) ∧ kbranch == branch,
// lim = b, same = ~1 (no key has it) for a clean row, lim = ~1 (above every clean block),
// same = b for a masked row; the branches are compared only outside joint layers. A key past n
// gets kclean = kblock = ~0: above every lim, unlike every same.
template <int MB, int NT>
__device__ __forceinline__ void mask_bits(const SlAttnParams &p, const Work &w,
                                          const uint32_t *sTags, int n, int key0, int warp,
                                          int lane, uint32_t (&bits)[MB]) {
    static_assert(4 * NT <= 32, "one 32-bit mask per m-block");
    const int g = lane >> 2, t = lane & 3;
    const bool joint = p.joint != 0;
    uint32_t lim[MB][2], same[MB][2], branch[MB][2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
        bits[mb] = 0u;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int local = warp * 16 * MB + 16 * mb + g + 8 * r;
            const uint32_t q = local < w.n_valid ? __ldg(p.row_tags + w.row0 + local) : 0u;
            lim[mb][r] = sl::tag_masked(q) ? ~1u : sl::tag_block(q);
            same[mb][r] = sl::tag_masked(q) ? sl::tag_block(q) : ~1u;
            branch[mb][r] = joint ? 0u : (q & 2u);
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = key0 + nt * 8 + 2 * t + e;
            const bool key_ok = key < n;
            const uint32_t tag = key_ok ? sTags[key] : 1u;
            const uint32_t kclean = (key_ok && !sl::tag_masked(tag)) ? sl::tag_block(tag) : ~0u;
            const uint32_t kblock = key_ok ? sl::tag_block(tag) : ~0u;
            const uint32_t kbranch = joint ? 0u : (tag & 2u);
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const bool ok = ((kclean <= lim[mb][r]) | (kblock == same[mb][r])) &
                                    (kbranch == branch[mb][r]);
                    bits[mb] |= ok ? 1u << (4 * nt + 2 * r + e) : 0u;
                }
            }
        }
    }
}

// Sets the pairs whose bit is clear to -inf (MIXED and partial tiles; see mask_bits).
template <int MB, int NT>
__device__ __forceinline__ void apply_mask(float (&s)[MB][NT][4], const uint32_t (&bits)[MB]) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // C fragment element i: row g + 8·(i / 2), key 2t + (i % 2) of n-tile nt.
                const bool shown = (bits[mb] >> (4 * nt + i)) & 1u;
                s[mb][nt][i] = shown ? s[mb][nt][i] : -INFINITY;
            }
        }
    }
}

// Online softmax over one key (sub-)tile, in base 2 (the CPU twin's loop, per fragment).
// In: s = raw scores (-inf where masked). Out: s = p = 2^(s·scale_log2 - m_new) (0 where
// masked); m, the lane's partial l and o are updated (o and l rescaled by 2^(m_old - m_new)).
// The row max is taken on raw scores and scaled once (scale_log2 > 0, and rounding is
// monotone, so this is the max of the scaled scores); p = 2^fma(s, scale_log2, -m_new).
// While a row has seen no visible key, m stays -inf and p = 0: the exponent base is then 0
// instead of m (never 2^(-inf - -inf)).
// o is rescaled only when some row of the warp has a new max (alpha != 1; alpha is exactly 1
// when m is unchanged, 2^0): after the first tiles the running max rarely moves, and the warp
// skips D/4·MB multiplies per lane (a warp-uniform branch: __any_sync).
template <int D, int MB, int NT>
__device__ __forceinline__ void softmax_update(float (&s)[MB][NT][4], float scale_log2,
                                               float (&m)[MB][2], float (&l)[MB][2],
                                               float (&o)[MB][D / 8][4]) {
    float alpha[MB][2];
    bool moved = false;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                tile_max = fmaxf(tile_max, fmaxf(s[mb][nt][2 * r], s[mb][nt][2 * r + 1]));
            }
            // The 4 lanes of a quad hold the keys of the same row.
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m[mb][r], tile_max * scale_log2);
            const bool none_yet = m_new == -INFINITY;
            // m = -inf -> alpha = 0: nothing to rescale yet.
            alpha[mb][r] = none_yet ? 1.f : fast_exp2(m[mb][r] - m_new);
            moved = moved || alpha[mb][r] != 1.f;
            const float neg_base = none_yet ? 0.f : -m_new;
            m[mb][r] = m_new;
            float row_sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float x = fast_exp2(fmaf(s[mb][nt][2 * r + e], scale_log2, neg_base));
                    s[mb][nt][2 * r + e] = x;  // -inf -> 0
                    row_sum += x;
                }
            }
            l[mb][r] = l[mb][r] * alpha[mb][r] + row_sum;
        }
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[mb][nt][0] *= alpha[mb][0];  // [sass:rescale]
                o[mb][nt][1] *= alpha[mb][0];  // [sass:rescale]
                o[mb][nt][2] *= alpha[mb][1];  // [sass:rescale]
                o[mb][nt][3] *= alpha[mb][1];  // [sass:rescale]
            }
        }
    }
}

// o[mb] += P_mb · V_tile. P's A fragment for keys 16j..16j+15 is the S (C-layout) fragments of
// n-tiles 2j and 2j+1 converted to bf16 in registers (C rows g / g+8, cols 2t.. map onto A's
// a[0..3]). B (V, 16 keys x 8 dims) needs key pairs per register: ldmatrix .trans on V
// row-major; matrix m = keys 16j + 8·(m%2).., dims 8·(m/2).. -> b[0], b[1] for dim tile 2pp,
// b[2], b[3] for 2pp+1; each B fragment feeds the MB m-blocks. `v_base` = FragBases::v plus
// the stage's offset.
template <int D, int MB, int NT>
__device__ __forceinline__ void pv_tile(uint32_t v_base, const float (&s)[MB][NT][4],
                                        float (&o)[MB][D / 8][4]) {
    constexpr uint32_t RB = 2 * D;
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
        uint32_t a[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
            a[mb][0] = pack_bf16x2(s[mb][2 * j][0], s[mb][2 * j][1]);  // row g,   keys 16j + 2t..
            a[mb][1] = pack_bf16x2(s[mb][2 * j][2], s[mb][2 * j][3]);  // row g+8, keys 16j + 2t..
            a[mb][2] = pack_bf16x2(s[mb][2 * j + 1][0], s[mb][2 * j + 1][1]);  // row g, +8 keys
            a[mb][3] = pack_bf16x2(s[mb][2 * j + 1][2], s[mb][2 * j + 1][3]);  // row g+8, +8 keys
        }
#pragma unroll
        for (int pp = 0; pp < D / 16; ++pp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, (v_base ^ (pp << 5)) + j * 16 * RB);
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                mma_bf16_16816(o[mb][2 * pp], a[mb], b[0], b[1]);
                mma_bf16_16816(o[mb][2 * pp + 1], a[mb], b[2], b[3]);
            }
        }
    }
}

// Normalises this warp's rows and writes them: bf16 o and natural-log lse when n_splits == 1,
// else f32 partial_o and base-2 partial_lse of this split. The rows go through the warp's own
// staging rows (`stage`, swizzled; row lr = 16·mb + g + 8r) and leave in 16-byte stores, whole
// rows at a time. Padding rows are not written. Call after every warp is done with the K/V
// region (which holds `stage`).
template <int D, int MB, typename T>
__device__ __forceinline__ void write_rows(const SlAttnParams &p, const Work &w, int warp,
                                           int lane, const float (&m)[MB][2],
                                           const float (&l)[MB][2], const float (&o)[MB][D / 8][4],
                                           unsigned char *stage) {
    constexpr int ROW_BYTES = D * static_cast<int>(sizeof(T));
    constexpr int CHUNKS = ROW_BYTES / 16;   // 16-byte chunks per row
    constexpr int PER_CHUNK = 16 / sizeof(T);  // elements per chunk
    const int g = lane >> 2, t = lane & 3;
    const bool split = p.n_splits > 1;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int lr = 16 * mb + g + 8 * r;  // row in the warp's staging area
            // l >= 1 once a visible key was seen (the row max contributes 2^0), else exactly 0.
            const bool seen = l[mb][r] > 0.f;
            const float inv_l = seen ? 1.f / l[mb][r] : 0.f;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const float x0 = seen ? o[mb][nt][2 * r] * inv_l : 0.f;
                const float x1 = seen ? o[mb][nt][2 * r + 1] * inv_l : 0.f;
                const int col = nt * 8 + 2 * t;  // element column
                const int byte = col * static_cast<int>(sizeof(T));
                unsigned char *dst = stage + swizzled<ROW_BYTES>(lr, byte / 16) + byte % 16;
                if constexpr (sizeof(T) == 2) {
                    *reinterpret_cast<__nv_bfloat162 *>(dst) = __floats2bfloat162_rn(x0, x1);
                } else {
                    *reinterpret_cast<float2 *>(dst) = make_float2(x0, x1);
                }
            }
            const int local = warp * 16 * MB + lr;
            if (t == 0 && local < w.n_valid) {
                const uint32_t row = w.row0 + static_cast<uint32_t>(local);
                const float lse2 = seen ? m[mb][r] + log2f(l[mb][r]) : -INFINITY;
                if (!split) {
                    if (p.lse != nullptr) {
                        p.lse[static_cast<size_t>(row) * p.n_heads + w.head] =
                            seen ? lse2 * LN_2 : -INFINITY;
                    }
                } else {
                    p.partial_lse[(static_cast<size_t>(blockIdx.z) * p.n_rows + row) * p.n_heads +
                                  w.head] = lse2;
                }
            }
        }
    }
    __syncwarp();
    for (int k = lane; k < 16 * MB * CHUNKS; k += 32) {
        const int lr = k / CHUNKS, c = k % CHUNKS;
        const int local = warp * 16 * MB + lr;
        if (local >= w.n_valid) continue;
        const uint32_t row = w.row0 + static_cast<uint32_t>(local);
        const uint4 v = *reinterpret_cast<const uint4 *>(stage + swizzled<ROW_BYTES>(lr, c));
        T *dst;
        if (!split) {
            dst = reinterpret_cast<T *>(p.o + static_cast<size_t>(row) * p.o_stride + w.head * D);
        } else {
            const size_t row_head =
                (static_cast<size_t>(blockIdx.z) * p.n_rows + row) * p.n_heads + w.head;
            dst = reinterpret_cast<T *>(p.partial_o + row_head * D);
        }
        *reinterpret_cast<uint4 *>(dst + c * PER_CHUNK) = v;
    }
}

// --- The CTA -----------------------------------------------------------------------------------

// The key loop and epilogue of a CTA whose warps own MB m-blocks each (Q already issued in the
// prologue's group; the QueryDesc and the Work in the meta region).
template <int D, int MB>
__device__ __forceinline__ void attention_tiles(const SlAttnParams &p, unsigned char *smem) {
    using L = SmemLayout<D>;
    constexpr int S = L::STAGES, R = L::RING;
    // n-tiles of 8 keys per softmax step: 64 keys, or 32 for head_dim 128 with 2 m-blocks per
    // warp (128 f32 of O accumulators leave too few registers for 64 more of S).
    constexpr int NT = (D == 128 && MB == 2) ? S_TILES / 2 : S_TILES;
    // Stage / slot b of K, V, indices, tags (computed, not table-indexed: a pointer array
    // indexed by a runtime value would live in local memory).
    unsigned char *sQ = smem + L::Q;
    auto sK = [&](int b) { return smem + L::K + b * L::TILE_BYTES; };
    auto sV = [&](int b) { return smem + L::V + b * L::TILE_BYTES; };
    auto sIdx = [&](int b) { return reinterpret_cast<uint32_t *>(smem + L::IDX) + b * BLOCK_N; };
    auto sTags = [&](int b) { return reinterpret_cast<uint32_t *>(smem + L::TAGS) + b * BLOCK_N; };

    const uint32_t *qd = reinterpret_cast<const uint32_t *>(smem + L::META);
    const uint32_t *work = qd + WORK_AT;
    auto W = [&]() { return load_work(work); };
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto n_tiles = [&]() { return (W().n_keys + BLOCK_N - 1) / BLOCK_N; };

    // ring[k] = a_{i+k} (tile·4 + class, or -1), k = 0..S: the tiles of iteration i's window.
    int ring[R];
    int cursor = 0;
#pragma unroll
    for (int k = 0; k < S; ++k) {
        ring[k] = next_active(p, W(), qd, n_tiles(), cursor);
        if (ring[k] >= 0) fetch_keys(p, W(), ring[k] >> 2, ring[k] & 3, sIdx(k), sTags(k));
    }
    ring[S] = -1;
    cp_async_commit();  // Q and the indices of a_0 .. a_{S-1}
    cp_async_wait<0>();
    __syncthreads();  // the indices are visible to every thread
#pragma unroll
    for (int k = 0; k < S - 1; ++k) {
        if (ring[k] >= 0) gather_kv_tile<D>(p, W(), ring[k] >> 2, sIdx(k), sK(k), sV(k));
        cp_async_commit();  // K/V of a_k
    }

    float o[MB][D / 8][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) o[mb][nt][0] = o[mb][nt][1] = o[mb][nt][2] = o[mb][nt][3] = 0.f;
    }
    float m[MB][2], l[MB][2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) m[mb][0] = m[mb][1] = -INFINITY, l[mb][0] = l[mb][1] = 0.f;

    // The key loop. The `[sass:...]` tags name the regions scripts/sass-figures.py attributes
    // the loop's SASS to (by line, through the inlining chain) for its per-tile figures.
    for (int i = 0; ring[0] >= 0; ++i) {  // [sass:loop-begin]
        cp_async_wait<S - 2>();  // [sass:sync] K/V of a_i, indices of a_{i+S-1} have landed
        __syncthreads();         // [sass:sync] (A)
        ring[S] = next_active(p, W(), qd, n_tiles(), cursor);  // [sass:cursor]
        const int slot_next = (i + S) % R, slot_gather = (i + S - 1) % R;  // [sass:control]
        if (ring[S] >= 0) {  // [sass:control]
            fetch_keys(p, W(), ring[S] >> 2, ring[S] & 3, sIdx(slot_next), sTags(slot_next));  // [sass:fetch]
        }
        cp_async_commit();       // [sass:sync] indices of a_{i+S}
        const int b_gather = (i + S - 1) % S;  // [sass:control]
        if (ring[S - 1] >= 0) {  // [sass:control]
            gather_kv_tile<D>(p, W(), ring[S - 1] >> 2, sIdx(slot_gather), sK(b_gather), sV(b_gather));  // [sass:gather]
        }
        cp_async_commit();       // [sass:sync] K/V of a_{i+S-1}

        // A warp whose rows are all padding (the tail of a tile of 65..127 rows) skips the math
        // (tested here, from the meta region, rather than held across the loop).
        if (warp * 16 * MB < W().n_valid) {  // [sass:control]
            const int tile = ring[0] >> 2, cls = ring[0] & 3;  // [sass:control]
            const int b = i % S;  // [sass:control]
            // Recomputed per tile (a few integer ops) rather than held across the loop.
            const FragBases fb = frag_bases<D, MB>(smem_addr(sQ), smem_addr(sK(b)), smem_addr(sV(b)), warp, lane);  // [sass:frag]
            // Keys in sub-tiles of 8·NT (the whole tile, or two halves where the accumulators
            // leave too few registers for a 64-key S). Not unrolled: ptxas would hoist the
            // second half's fragment loads above the first half's softmax and run out of
            // registers.
#pragma unroll 1
            for (int h = 0; h < S_TILES / NT; ++h) {  // [sass:sub]
                constexpr uint32_t SUB = 8 * NT * 2 * D;  // bytes of a sub-tile's K or V rows
                uint32_t bits[MB] = {};
                const bool masked = cls != sl::TILE_VISIBLE;  // [sass:sub]
                if (masked) {  // [sass:sub]
                    const Work w = W();  // [sass:mask]
                    mask_bits<MB, NT>(p, w, sTags(i % R), keys_in_tile(w, tile), 8 * NT * h, warp, lane, bits);  // [sass:mask]
                }
                float s[MB][NT][4];
                qk_tile<D, MB, NT>(fb.q, fb.k + h * SUB, s);  // [sass:qk]
                if (masked) apply_mask<MB, NT>(s, bits);  // [sass:mask]
                softmax_update<D, MB, NT>(s, p.scale_log2, m, l, o);  // [sass:softmax]
                pv_tile<D, MB, NT>(fb.v + h * SUB, s, o);  // [sass:pv]
            }
        }
#pragma unroll
        for (int k = 0; k < S; ++k) ring[k] = ring[k + 1];  // [sass:control]
    }  // [sass:loop-end]
    cp_async_wait<0>();  // only empty groups can be pending; none may outlive the CTA
    __syncthreads();     // every warp is done with the K/V region: it becomes the staging area

#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // Each lane summed its own 16 keys per tile; all were rescaled alike, so add them.
            l[mb][r] += __shfl_xor_sync(0xffffffffu, l[mb][r], 1);
            l[mb][r] += __shfl_xor_sync(0xffffffffu, l[mb][r], 2);
        }
    }
    unsigned char *stage = smem + L::K + warp * L::STAGE_WARP_BYTES;
    const Work w = W();
    if (p.n_splits == 1) {
        write_rows<D, MB, sl_bf16>(p, w, warp, lane, m, l, o, stage);
    } else {
        write_rows<D, MB, float>(p, w, warp, lane, m, l, o, stage);
    }
}

template <int D>
__device__ __forceinline__ void attention_cta(const SlAttnParams &p) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    if (p.head_dim != D) return;  // the wrapper picks the kernel by head_dim
    Work w;
    if (!plan_work(p, w)) return;  // CTA-uniform, before any barrier

    // 1024-byte aligned: the ldmatrix addressing XORs bits 4..7 of shared addresses (FragBases).
    SL_DYNAMIC_SHARED_ALIGNED(unsigned char, smem, 1024);
    using L = SmemLayout<D>;
    const int mb = w.n_valid > BLOCK_M / 2 ? 2 : 1;
    load_q_tile<D>(p, w, 16 * WARPS * mb, smem + L::Q);  // committed with the prologue's group
    uint32_t *meta = reinterpret_cast<uint32_t *>(smem + L::META);
    if (threadIdx.x == 0) store_work(w, meta + WORK_AT);  // published by describe_rows' barriers
    describe_rows(p, w, meta + QD_WORDS, meta);
    if (mb == 2) {
        attention_tiles<D, 2>(p, smem);  // [sass:mb2]
    } else {
        attention_tiles<D, 1>(p, smem);  // [sass:mb1]
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_ATTN_THREADS, 2) sl_attention_hd64(SlAttnParams p) {
    attention_cta<64>(p);
}

extern "C" __global__ void __launch_bounds__(SL_ATTN_THREADS, 2) sl_attention_hd128(SlAttnParams p) {
    attention_cta<128>(p);
}

// One warp per (row, head): lanes read the split LSEs z = lane, lane + 32, ... and reduce them
// (max, then Σ 2^(lse2_z - max)) to the row's base-2 LSE once; then lane l owns columns
// l·V .. l·V + V - 1 (V = head_dim / 32) and sums 2^(lse2_z - lse2)·o_z over the non-empty
// splits in split order (o = 0 and lse = -inf when every split is empty). Lane 0 writes lse.
// Grid (n_rows, ceil(n_heads / SL_MERGE_HEADS)); warp w of block (row, y) takes head
// y·SL_MERGE_HEADS + w.
template <int V>
__device__ __forceinline__ void merge_row_head(const SlAttnParams &p, uint32_t row,
                                               uint32_t head, int lane) {
    const size_t split_stride = static_cast<size_t>(p.n_rows) * p.n_heads;  // in partial_lse
    const size_t row_head = static_cast<size_t>(row) * p.n_heads + head;      // split 0
    float mx = -INFINITY;
    for (uint32_t z = lane; z < p.n_splits; z += 32) mx = fmaxf(mx, p.partial_lse[z * split_stride + row_head]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float lse2 = -INFINITY;
    if (mx != -INFINITY) {
        float sum = 0.f;
        for (uint32_t z = lane; z < p.n_splits; z += 32) {
            sum += exp2f(p.partial_lse[z * split_stride + row_head] - mx);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        lse2 = mx + log2f(sum);  // sum >= 1
    }
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    if (lse2 != -INFINITY) {
        for (uint32_t z = 0; z < p.n_splits; ++z) {
            const size_t at = z * split_stride + row_head;
            const float lse2_z = p.partial_lse[at];
            if (lse2_z == -INFINITY) continue;
            const float wz = exp2f(lse2_z - lse2);
            const float *src = p.partial_o + at * (V * 32) + lane * V;
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += wz * src[v];
        }
    }
    sl_bf16 *dst = p.o + static_cast<size_t>(row) * p.o_stride + head * (V * 32) + lane * V;
#pragma unroll
    for (int v = 0; v < V; v += 2) {
        *reinterpret_cast<__nv_bfloat162 *>(dst + v) = __floats2bfloat162_rn(acc[v], acc[v + 1]);
    }
    if (p.lse != nullptr && lane == 0) {
        p.lse[row_head] = lse2 == -INFINITY ? -INFINITY : lse2 * LN_2;
    }
}

extern "C" __global__ void __launch_bounds__(SL_MERGE_THREADS)
    sl_attention_merge(SlAttnParams p) {
    const uint32_t row = blockIdx.x;
    const uint32_t head = blockIdx.y * SL_MERGE_HEADS + threadIdx.x / 32;
    if (row >= p.n_rows || head >= p.n_heads) return;  // warp-uniform
    const int lane = threadIdx.x % 32;
    if (p.head_dim == 64) {
        merge_row_head<2>(p, row, head, lane);
    } else if (p.head_dim == 128) {
        merge_row_head<4>(p, row, head, lane);
    }
}

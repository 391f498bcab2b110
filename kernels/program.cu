// Device-resident generation (issue 4): the kernels that let every step of a generation be
// queued, or captured as CUDA graphs, before any token is known. Contract: kernels/params.h
// (`SlResolveParams`, `SlCommitParams`, `SlGatherParams`, `SlFillParams`, `SlPatch`). Oracle:
// src/sampler/patch.rs — `lists` + `apply` for sl_resolve_plan, `commit` for sl_commit; the
// same state and inputs give the same outputs, element for element.
//
// These kernels are tiny (one block, a few thousand indices) and run once per step, so they are
// written to be obviously correct rather than fast: one warp compacts the lists with ballots, the
// commit ranks by a quadratic count (the text query is one block of at most a few dozen
// positions; the t2i commit takes the linear query-order path).
//
// Bounds: every index read from the decode state or a list is checked before it is used as an
// address (a corrupt state writes nothing rather than out of bounds), and every write is checked
// against its array's length from the params, so the kernels stay in bounds whatever the
// contents of the state; only the lengths are the host's to get right (src/cuda/ops.rs checks
// them against the buffers). The host keeps n below 2^31, so `c0 + 32` never wraps.

#include "common.cuh"

namespace {

constexpr uint32_t kFull = 0xffffffffu;

// Bit mask of the lanes below `lane` (lane < 32).
__device__ __forceinline__ uint32_t lanes_below(uint32_t lane) { return (1u << lane) - 1u; }

// Lengths of the lists q (undecoded in the block), m (undecoded outside), d (decoded).
struct ListLens {
    uint32_t q, m, d;
};

// patch::value: the value patch (source, arg, add) writes, or false when its source reads
// outside the state or a list (then nothing is written). The lists are complete (written and
// synchronised) when this runs.
__device__ __forceinline__ bool patch_value(const SlResolveParams &p, ListLens lens,
                                            uint32_t source, uint32_t arg, uint32_t add,
                                            uint32_t &v) {
    switch (source) {
        case SL_SOURCE_TOKEN:  // tokens[arg]
            if (arg >= p.n) return false;
            v = p.tokens[arg];
            return true;
        case SL_SOURCE_RANK_TOKEN: {  // tokens[order[arg]], rank arg decoded
            if (arg >= p.n) return false;
            const uint32_t i = p.order[arg];
            if (i >= p.n) return false;  // SL_UNDECODED included (n < 2^31)
            v = p.tokens[i];
            return true;
        }
        case SL_SOURCE_RANK: {  // add + order[arg], rank arg decoded (not range-checked: a value)
            if (arg >= p.n) return false;
            const uint32_t i = p.order[arg];
            if (i == SL_UNDECODED) return false;
            v = add + i;
            return true;
        }
        case SL_SOURCE_QUERY:
            if (arg >= lens.q) return false;
            v = add + p.list_q[arg];
            return true;
        case SL_SOURCE_OTHER:
            if (arg >= lens.m) return false;
            v = add + p.list_m[arg];
            return true;
        case SL_SOURCE_DECODED:
            if (arg >= lens.d) return false;
            v = add + p.list_d[arg];
            return true;
        case SL_SOURCE_DECODED_TAG: {  // add + ((decoded_step[d[arg]] + 1) << 2), wrapping
            if (arg >= lens.d) return false;
            const uint32_t i = p.list_d[arg];  // < n: phase 1 only lists indices below n
            v = add + ((p.decoded_step[i] + 1u) << 2);
            return true;
        }
        default:  // an unknown source (the host only uploads valid ones)
            return false;
    }
}

// f32::total_cmp as a signed integer order: negative values get every bit but the sign
// flipped, so -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN.
__device__ __forceinline__ int32_t total_order_key(float x) {
    const int32_t b = __float_as_int(x);
    return b ^ static_cast<int32_t>(static_cast<uint32_t>(b >> 31) >> 1);
}

// Records the pick of rank `rank` (< n_commit): query entry j, response index i (< n).
__device__ __forceinline__ void commit_pick(const SlCommitParams &p, uint32_t j, uint32_t i,
                                            uint32_t rank) {
    const uint32_t r = p.rank_base + rank;  // the host keeps rank_base + n_commit <= n
    if (r < p.n) p.order[r] = i;
    p.tokens[i] = p.token[j];
    p.decoded_step[i] = p.step;
}

}  // namespace

// sl_resolve_plan: one block of SL_PROGRAM_THREADS (a multiple of 32).
//
// Phase 1 (warp 0 only): the lists of patch::lists. The warp walks the response 32 indices per
// iteration (lane l holds index c0 + l), classifies each as q / m / d, and appends the set lanes
// of each class in lane order (the position of lane l = the list's length so far + popc of the
// class ballot below l), so each list comes out ascending. Warp 0 alone writes every list entry
// below the lengths, and publishes the lengths in shared memory.
// __syncthreads: the lists and lengths are complete and visible to the whole block.
// Phase 2 (all threads): thread t pads list entries k = t, t + T, ... at or past their list's
// length with SL_UNDECODED (entries phase 1 did not write), and applies patches t, t + T, ...
// Each patch writes one entry of one plan array, and the host guarantees no two patches name
// the same (field, index), so no two threads write the same element. Patches read the state and
// the lists below their lengths, which nothing writes in this phase; the plan arrays alias
// neither (the host passes them as distinct buffers).
// Phase 3 (when kv_summary is set): after a __syncthreads, the attention key-tile summaries of
// the patched kv_tags (below).
extern "C" __global__ void __launch_bounds__(SL_PROGRAM_THREADS)
    sl_resolve_plan(const SlResolveParams p) {
    __shared__ uint32_t list_len[3];
    const uint32_t tid = threadIdx.x, nt = blockDim.x;

    if (tid < 32) {
        const uint32_t lane = tid, below = lanes_below(lane);
        uint32_t nq = 0, nm = 0, nd = 0;  // uniform over the warp
        for (uint32_t c0 = 0; c0 < p.n; c0 += 32) {
            const uint32_t i = c0 + lane;
            const bool in = i < p.n;
            const bool dec = in && p.decoded_step[i] != SL_UNDECODED;
            const bool inq = in && !dec && i >= p.block_begin && i < p.block_end;
            const bool inm = in && !dec && !inq;
            const uint32_t bq = __ballot_sync(kFull, inq);
            const uint32_t bm = __ballot_sync(kFull, inm);
            const uint32_t bd = __ballot_sync(kFull, dec);
            if (inq) p.list_q[nq + __popc(bq & below)] = i;
            if (inm) p.list_m[nm + __popc(bm & below)] = i;
            if (dec) p.list_d[nd + __popc(bd & below)] = i;
            nq += __popc(bq);
            nm += __popc(bm);
            nd += __popc(bd);
        }
        if (lane == 0) {
            list_len[0] = nq;
            list_len[1] = nm;
            list_len[2] = nd;
        }
    }
    __syncthreads();
    const ListLens lens{list_len[0], list_len[1], list_len[2]};

    for (uint32_t k = tid; k < p.n; k += nt) {
        if (k >= lens.q) p.list_q[k] = SL_UNDECODED;
        if (k >= lens.m) p.list_m[k] = SL_UNDECODED;
        if (k >= lens.d) p.list_d[k] = SL_UNDECODED;
    }

    for (uint32_t t = tid; t < p.n_patches; t += nt) {
        const SlPatch patch = p.patches[t];
        uint32_t *dst;
        uint32_t len;
        switch (patch.kind >> 8) {
            case SL_FIELD_ROW_ID: dst = p.row_ids; len = p.n_rows; break;
            case SL_FIELD_ROW_POS: dst = p.row_pos; len = p.n_rows; break;
            case SL_FIELD_ROW_SLOT: dst = p.row_slots; len = p.n_rows; break;
            case SL_FIELD_KV_INDEX: dst = p.kv_indices; len = p.n_keys; break;
            case SL_FIELD_KV_TAG: dst = p.kv_tags; len = p.n_keys; break;
            case SL_FIELD_LOGITS_ROW: dst = p.logits_rows; len = p.n_logits; break;
            case SL_FIELD_SAMPLE_POS: dst = p.sample_pos; len = p.n_samples; break;
            default: continue;  // an unknown field (the host only uploads valid ones)
        }
        if (dst == nullptr || patch.index >= len) continue;
        uint32_t v;
        if (patch_value(p, lens, patch.kind & 0xffu, patch.arg, patch.add, v)) {
            dst[patch.index] = v;
        }
    }

    if (p.kv_summary == nullptr || p.kv_tags == nullptr) return;  // uniform
    // Phase 3: the attention key-tile summaries of the patched tags. __syncthreads: every
    // patch has been written and is visible to the block. Sequences are walked in order by the
    // whole block (a uniform loop); warp w summarises tiles w, w + W, ... of each, lane l the
    // keys l and l + 32 of its tile (a tile is SL_ATTN_BLOCK_N = 64 keys, the sequence's last
    // one partial), then the warp merges the lanes' summaries and lanes 0..7 write one word
    // each. Each tile has one writer.
    static_assert(SL_ATTN_BLOCK_N == 64, "a warp summarises 64 keys, two per lane");
    __syncthreads();
    const uint32_t warp = tid / 32, lane = tid % 32, n_warps = nt / 32;
    uint32_t tile_base = 0;  // key tiles of the sequences before s
    for (uint32_t seq = 0; seq < p.n_seqs; ++seq) {
        const uint32_t k0 = p.kv_indptr[seq], k1 = p.kv_indptr[seq + 1];
        const uint32_t n_tiles = (k1 - k0 + SL_ATTN_BLOCK_N - 1) / SL_ATTN_BLOCK_N;
        for (uint32_t t = warp; t < n_tiles; t += n_warps) {
            uint32_t sum[sl::SUMMARY_WORDS];
            sl::summary_clear(sum);
            const uint32_t first = k0 + t * SL_ATTN_BLOCK_N;
            for (uint32_t j = lane; j < SL_ATTN_BLOCK_N; j += 32) {
                if (first + j < k1) sl::summary_insert(sum, p.kv_tags[first + j]);
            }
            sl::summary_warp_reduce(sum);
            uint32_t mine = sum[0];
#pragma unroll
            for (int k = 1; k < sl::SUMMARY_WORDS; ++k) mine = lane == static_cast<uint32_t>(k) ? sum[k] : mine;
            if (lane < sl::SUMMARY_WORDS) {
                p.kv_summary[(tile_base + t) * sl::SUMMARY_WORDS + lane] = mine;
            }
        }
        tile_base += n_tiles;
    }
}

// sl_commit: one block of SL_PROGRAM_THREADS (a multiple of 32).
//
// Query order (t2i; by_confidence == 0): warp 0 alone walks the query 32 entries per iteration
// (lane l holds entry c0 + l); a candidate's rank is the candidates so far plus popc of the
// candidate ballot below its lane. The walk stops once n_commit candidates are seen (a
// warp-uniform test). The other warps have nothing to do.
// By confidence (text): thread t owns query entries j = t, t + T, ... and computes j's rank by
// counting the candidates that precede it (params.h), stopping early once the rank reaches
// n_commit (then j is not picked). O(n_query²) reads, served from L1: the text query is one
// block of the response.
// Ownership: the precedence is a strict total order over the candidates, so ranks are distinct
// and each order[rank_base + rank] has one writer; query entries are distinct (host contract),
// so each tokens[i] / decoded_step[i] has one writer. The kernel reads only query, token and
// confidence, which it does not write.
extern "C" __global__ void __launch_bounds__(SL_PROGRAM_THREADS) sl_commit(const SlCommitParams p) {
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    if (!p.by_confidence) {
        if (tid >= 32) return;  // no barrier follows
        const uint32_t lane = tid, below = lanes_below(lane);
        uint32_t seen = 0;  // candidates before this chunk (uniform over the warp)
        for (uint32_t c0 = 0; c0 < p.n_query && seen < p.n_commit; c0 += 32) {
            const uint32_t j = c0 + lane;
            const uint32_t i = j < p.n_query ? p.query[j] : SL_UNDECODED;
            const bool cand = i < p.n;
            const uint32_t b = __ballot_sync(kFull, cand);
            const uint32_t rank = seen + __popc(b & below);
            if (cand && rank < p.n_commit) commit_pick(p, j, i, rank);
            seen += __popc(b);
        }
        return;
    }
    for (uint32_t j = tid; j < p.n_query; j += nt) {
        const uint32_t i = p.query[j];
        if (i >= p.n) continue;
        const int32_t key = total_order_key(p.confidence[j]);
        uint32_t rank = 0;
        for (uint32_t j2 = 0; j2 < p.n_query && rank < p.n_commit; ++j2) {
            const uint32_t i2 = p.query[j2];
            if (i2 >= p.n) continue;
            const int32_t key2 = total_order_key(p.confidence[j2]);
            const bool before = key2 > key || (key2 == key && (i2 < i || (i2 == i && j2 < j)));
            rank += before ? 1u : 0u;
        }
        if (rank < p.n_commit) commit_pick(p, j, i, rank);
    }
}

// sl_gather_rows: block b owns output rows j = b, b + gridDim.x, ...; thread t copies columns
// c = t, t + T, ... of the row (coalesced reads of one source row, writes of one output row).
// A source row outside x (rows[j] >= x_rows) gives a row of NaN, which the sampler's
// non-finite check reports. Offsets are 64-bit: n · cols may pass 2^32.
extern "C" __global__ void __launch_bounds__(SL_GATHER_THREADS)
    sl_gather_rows(const SlGatherParams p) {
    const float nan = __int_as_float(0x7fc00000);
    for (uint32_t j = blockIdx.x; j < p.n; j += gridDim.x) {
        const uint32_t r = p.rows[j];
        float *out = p.out + static_cast<size_t>(j) * p.cols;
        if (r < p.x_rows) {
            const float *src = p.x + static_cast<size_t>(r) * p.cols;
            for (uint64_t c = threadIdx.x; c < p.cols; c += blockDim.x) out[c] = src[c];
        } else {
            for (uint64_t c = threadIdx.x; c < p.cols; c += blockDim.x) out[c] = nan;
        }
    }
}

// sl_fill_u32: thread (blockIdx.x, threadIdx.x) owns elements g, g + stride, ... (g its global
// index, stride the grid's thread count).
extern "C" __global__ void __launch_bounds__(SL_ELEM_THREADS) sl_fill_u32(const SlFillParams p) {
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
         i += stride) {
        p.buf[i] = p.value;
    }
}

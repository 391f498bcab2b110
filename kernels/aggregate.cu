// Register-token aggregation (SPEC §5): the device-side plan of sparse step k with all three
// savings on. Contract: kernels/params.h `SlAggregateParams`. Oracle: src/sampler.rs
// `sparse_plan(layout, state, query, k, Switches::ALL_ON, prefilled = P > 0)` packed by
// src/plan.rs `PlanBuilder::build` — its response-branch rows, `kv_indices` / `kv_tags` and
// `logits_rows` are exactly what this kernel writes (the prompt is cached, so it has no rows).
//
// Layout of the outputs, per sequence s (base_s = s · slots_per_seq, G = group k−1 =
// decoded_order[group_indptr[k−1] .. group_indptr[k]], empty when k = 0):
//
//   rows s·rows_per_seq + ...  0 .. |G|             the newest group, in decode order:
//                                                   id tokens[i], pos P+i, block k clean,
//                                                   slot base_s+P+i
//                              |G| .. |G|+n_query   the query: id mask_id, pos P+query[j],
//                                                   block k+1 masked, slot base_s+P+N+j
//                              .. + R               registers: id SL_REGISTER, pos P+N+r,
//                                                   block k+1 masked, slot base_s+P+N+n_query+r
//   keys s·keys_per_seq + ...  0 .. P               prompt slots base_s+t, tag (text, 0, clean)
//                              P .. P+D             every i with decoded_step[i] < k, ascending
//                                                   i: slot base_s+P+i, block decoded_step[i]+1
//                              P+D .. +n_query+R    scratch slots base_s+P+N+j, block k+1 masked
//   logits_rows s·n_query + j = s·rows_per_seq + |G| + j
//
// Ascending slot order of the keys is the order above (prompt < response < scratch slots, and
// response slots grow with i), which is the order `PlanBuilder::build` sorts keys into.
//
// Ownership: block s owns sequence s's rows, keys and logits entries; no two blocks write the
// same element. Within the block, thread t writes the rows / prompt keys / scratch keys / logits
// entries with local index t, t + blockDim.x, ...; the decoded keys are compacted in index order
// by a block-wide exclusive scan over the flags (decoded_step[i] < k), N taken in chunks of
// blockDim.x (thread t holds index c0 + t), each chunk's total carried into the next.
//
// Bounds: the host sizes the outputs from rows_per_seq / keys_per_seq and derives those from the
// same inputs (rows = |G| + n_query + R, keys = P + group_indptr[k] + n_query + R). There is no
// error flag, so the kernel trusts that agreement, but it never writes outside its sequence's
// slice: a local row index >= rows_per_seq or key index >= keys_per_seq is dropped. Reads are
// kept in bounds too: group_indptr is clamped to [0, N] and a decoded index >= N reads no token.

#include "common.cuh"

namespace {

constexpr uint32_t kFull = 0xffffffffu;

// Exclusive prefix sum of `v` over the block (thread order), with the block's total in `total`
// (the same in every thread). blockDim.x must be a multiple of 32 (at most 1024); every thread
// of the block must call it (it has barriers). `warp_sums` is a 32-entry shared array.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t &total,
                                                         uint32_t *warp_sums) {
    const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    // Inclusive scan within the warp (Hillis-Steele on shuffles).
    uint32_t inc = v;
#pragma unroll
    for (uint32_t o = 1; o < 32; o <<= 1) {
        const uint32_t up = __shfl_up_sync(kFull, inc, o);
        if (lane >= o) inc += up;
    }
    if (lane == 31) warp_sums[warp] = inc;
    __syncthreads();
    // Warp 0 turns the warp totals into their inclusive scan.
    if (warp == 0) {
        uint32_t w = lane < n_warps ? warp_sums[lane] : 0u;
#pragma unroll
        for (uint32_t o = 1; o < 32; o <<= 1) {
            const uint32_t up = __shfl_up_sync(kFull, w, o);
            if (lane >= o) w += up;
        }
        if (lane < n_warps) warp_sums[lane] = w;
    }
    __syncthreads();
    const uint32_t before_warp = warp == 0 ? 0u : warp_sums[warp - 1];
    total = warp_sums[n_warps - 1];
    __syncthreads();  // everyone has read warp_sums before the next call overwrites it
    return before_warp + inc - v;
}

// The outputs of one sequence, with the bounds checks of the header in one place. Holds
// copies of the pointers (not a reference to the kernel parameter, which would force it into
// local memory).
struct SeqOut {
    uint32_t *row_ids, *row_pos, *row_tags, *row_slots, *kv_indices, *kv_tags;
    uint32_t rows_per_seq, keys_per_seq;
    size_t row0;  // first row of the sequence
    size_t key0;  // first key of the sequence

    __device__ SeqOut(const SlAggregateParams &p, uint32_t s)
        : row_ids(p.row_ids), row_pos(p.row_pos), row_tags(p.row_tags), row_slots(p.row_slots),
          kv_indices(p.kv_indices), kv_tags(p.kv_tags), rows_per_seq(p.rows_per_seq),
          keys_per_seq(p.keys_per_seq), row0(static_cast<size_t>(s) * p.rows_per_seq),
          key0(static_cast<size_t>(s) * p.keys_per_seq) {}

    __device__ void row(uint32_t r, uint32_t id, uint32_t pos, uint32_t tag, uint32_t slot) const {
        if (r >= rows_per_seq) return;
        row_ids[row0 + r] = id;
        row_pos[row0 + r] = pos;
        row_tags[row0 + r] = tag;
        row_slots[row0 + r] = slot;
    }

    __device__ void key(uint32_t c, uint32_t slot, uint32_t tag) const {
        if (c >= keys_per_seq) return;
        kv_indices[key0 + c] = slot;
        kv_tags[key0 + c] = tag;
    }
};

}  // namespace

extern "C" __global__ void __launch_bounds__(SL_AGG_THREADS)
    sl_aggregate_sparse(SlAggregateParams p) {
    __shared__ uint32_t warp_sums[32];

    const uint32_t s = blockIdx.x;
    if (s >= p.n_seqs) return;
    const uint32_t tid = threadIdx.x, nt = blockDim.x;
    const uint32_t P = p.prompt_len, N = p.n_response, R = p.n_registers, nq = p.n_query;
    const uint32_t base = s * p.slots_per_seq;
    const uint32_t resp_slot0 = base + P;        // slot of response index 0
    const uint32_t scratch_slot0 = base + P + N;  // first scratch slot
    const uint32_t new_tag = sl::make_tag(p.branch, p.k, false);     // group k-1: clean block k
    const uint32_t masked_tag = sl::make_tag(p.branch, p.k + 1, true);  // query + registers
    const SeqOut out(p, s);

    // --- Rows: the newest group, the query, the registers --------------------------------------
    uint32_t g0 = 0, g1 = 0;
    if (p.k > 0) {
        g0 = min(p.group_indptr[p.k - 1], N);
        g1 = min(max(p.group_indptr[p.k], g0), N);
    }
    const uint32_t n_new = g1 - g0;
    for (uint32_t t = tid; t < n_new; t += nt) {
        const uint32_t i = p.decoded_order[g0 + t];
        const uint32_t id = i < N ? p.tokens[i] : p.mask_id;
        out.row(t, id, P + i, new_tag, resp_slot0 + i);
    }
    for (uint32_t j = tid; j < nq; j += nt) {
        const uint32_t r = n_new + j;
        out.row(r, p.mask_id, P + p.query[j], masked_tag, scratch_slot0 + j);
        if (r < p.rows_per_seq) {
            p.logits_rows[static_cast<size_t>(s) * nq + j] = static_cast<uint32_t>(out.row0 + r);
        }
    }
    for (uint32_t r = tid; r < R; r += nt) {
        out.row(n_new + nq + r, SL_REGISTER, P + N + r, masked_tag, scratch_slot0 + nq + r);
    }

    // --- Keys: prompt, decoded (compacted by slot), scratch ------------------------------------
    const uint32_t prompt_tag = sl::make_tag(0u, 0u, false);
    for (uint32_t t = tid; t < P; t += nt) out.key(t, base + t, prompt_tag);

    uint32_t n_decoded = 0;  // decoded indices emitted by earlier chunks (uniform over the block)
    for (uint32_t c0 = 0; c0 < N; c0 += nt) {  // uniform trip count: the scan's barriers are safe
        const uint32_t i = c0 + tid;
        const uint32_t step = i < N ? p.decoded_step[i] : UINT32_MAX;
        const uint32_t flag = step < p.k ? 1u : 0u;
        uint32_t chunk_total;
        const uint32_t before = block_exclusive_scan(flag, chunk_total, warp_sums);
        if (flag) {
            const uint32_t tag = sl::make_tag(p.branch, step + 1, false);  // group step: block +1
            out.key(P + n_decoded + before, resp_slot0 + i, tag);
        }
        n_decoded += chunk_total;
    }

    for (uint32_t j = tid; j < nq + R; j += nt) {
        out.key(P + n_decoded + j, scratch_slot0 + j, masked_tag);
    }
}

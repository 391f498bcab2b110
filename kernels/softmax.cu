// Mask-aware softmax (SPEC §5, kernels/params.h "Mask-aware softmax"):
//   (a) sl_masked_softmax — row softmax of a score matrix under the SPEC §3 visibility rule or
//       a per-row visible prefix; CPU twin: src/backend/cpu/ops.rs `masked_softmax`.
//   (b) sl_sample — the sampler's fused pass over the vocabulary (CFG combine, banned ids,
//       temperature, Philox-Gumbel argmax, confidence, log-sum-exp) in one read of the logits;
//       CPU twin: src/backend/cpu/ops.rs `sample_rows`, whose token choice it reproduces bit
//       for bit.
#include <math.h>
#include <stdint.h>

#include "common.cuh"

static_assert(SL_SOFTMAX_THREADS % 32 == 0 && SL_SOFTMAX_THREADS <= 1024, "whole warps");
static_assert(SL_SAMPLE_THREADS % 32 == 0 && SL_SAMPLE_THREADS <= 1024, "whole warps");

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ============================================================================================
// (a) sl_masked_softmax
// ============================================================================================

// Online softmax state over f32 values x: m = max x, sum = Σ exp(x − m). Empty: (−inf, 0).
struct SoftmaxAcc {
    float m;
    float sum;
};

// Adds one value. x = −inf contributes exp(−inf) = 0 and is skipped (so an all −inf row stays
// empty instead of computing −inf − (−inf) = NaN).
__device__ __forceinline__ void softmax_push(SoftmaxAcc& a, float x) {
    if (x > a.m) {
        a.sum = a.sum * expf(a.m - x) + 1.0f;  // a.m = −inf: 0 · 0 + 1
        a.m = x;
    } else if (x != -INFINITY) {
        a.sum += expf(x - a.m);
    }
}

__device__ __forceinline__ SoftmaxAcc softmax_merge(SoftmaxAcc a, SoftmaxAcc b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return SoftmaxAcc{-INFINITY, 0.0f};  // both empty
    // One side may be empty (m = −inf, sum = 0): exp(−inf) = 0 keeps it out.
    return SoftmaxAcc{m, a.sum * expf(a.m - m) + b.sum * expf(b.m - m)};
}

}  // namespace

// Block: one row. Thread t owns columns t, t + T, t + 2T, ... (T = SL_SOFTMAX_THREADS), so
// each warp reads 32 consecutive floats per step (coalesced). Two passes over the row:
//   1. every thread folds its visible columns x = scale · score into an online (max, sum);
//      warp shuffles, then warp 0 over the per-warp partials in shared memory, give the row's
//      (M, S), broadcast through shared memory;
//   2. every thread writes its columns: exp(x − M) / S where visible, 0 elsewhere.
// Rule mode (row_tags set): column c is visible iff visible(row_tags[r], col_tags[c], joint).
// Prefix mode: c < prefix_len[r] (clamped to n_cols, so no read past the row). A row with no
// visible column, or whose visible scores are all −inf, is all zeros.
// Scores of hidden columns are never read. x is computed with __fmul_rn in both passes so the
// two passes see the same x (no FMA contraction of scale·score − M in pass 2).
extern "C" __global__ void __launch_bounds__(SL_SOFTMAX_THREADS)
    sl_masked_softmax(const SlMaskedSoftmaxParams p) {
    constexpr uint32_t T = SL_SOFTMAX_THREADS;
    constexpr uint32_t kWarps = T / 32;
    __shared__ SoftmaxAcc warp_acc[kWarps];
    __shared__ SoftmaxAcc row_acc;

    const uint32_t r = blockIdx.x;
    if (r >= p.n_rows || blockDim.x != T) return;  // uniform over the block
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const float* in = p.scores + (size_t)r * p.stride;
    float* out = p.probs + (size_t)r * p.stride;

    const bool rule = p.row_tags != nullptr;
    const bool joint = p.joint != 0;
    const uint32_t qtag = rule ? p.row_tags[r] : 0u;
    // Columns >= end are hidden in prefix mode; in rule mode every column is tested.
    const uint32_t end = rule ? p.n_cols : min(p.prefix_len[r], p.n_cols);
    auto is_visible = [&](uint32_t c) {
        return rule ? sl::visible(qtag, __ldg(p.col_tags + c), joint) : c < end;
    };

    // Pass 1: per-thread online (max, sum).
    SoftmaxAcc acc{-INFINITY, 0.0f};
    for (uint32_t c = tid; c < end; c += T) {
        if (is_visible(c)) softmax_push(acc, __fmul_rn(p.scale, in[c]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const SoftmaxAcc o{__shfl_xor_sync(kFullMask, acc.m, off),
                           __shfl_xor_sync(kFullMask, acc.sum, off)};
        acc = softmax_merge(acc, o);
    }
    if (lane == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < kWarps ? warp_acc[lane] : SoftmaxAcc{-INFINITY, 0.0f};
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const SoftmaxAcc o{__shfl_xor_sync(kFullMask, acc.m, off),
                               __shfl_xor_sync(kFullMask, acc.sum, off)};
            acc = softmax_merge(acc, o);
        }
        if (lane == 0) row_acc = acc;
    }
    __syncthreads();
    const float m = row_acc.m;
    // m > −inf implies sum >= 1 (the max's own term is exp(0)).
    const bool any = m != -INFINITY;
    const float inv_sum = any ? 1.0f / row_acc.sum : 0.0f;

    // Pass 2: write every column of the row.
    for (uint32_t c = tid; c < p.n_cols; c += T) {
        float prob = 0.0f;
        if (any && c < end && is_visible(c)) prob = expf(__fmul_rn(p.scale, in[c]) - m) * inv_sum;
        out[c] = prob;
    }
}

// ============================================================================================
// (b) sl_sample
// ============================================================================================

namespace {

// Strict upper bound of every Gumbel value gumbel_of_word can return: the largest word gives
// u = 1 − 2^-25 and g = −ln(−ln u) ≈ 17.33.
constexpr float kGumbelBound = 17.5f;

// (score, id) order of the argmax: higher score wins, equal scores go to the lower id.
__device__ __forceinline__ bool beats(float score, uint32_t id, float best, uint32_t best_id) {
    return score > best || (score == best && id < best_id);
}

// What one thread (then warp, then block) knows about its ids of the row.
struct SampleAcc {
    float best;      // best score so far (−inf: none)
    uint32_t id;     // its id (UINT32_MAX: none)
    float best_s;    // s' of that id (for the confidence)
    float m;         // max s' over allowed ids (−inf: none)
    double sum;      // Σ exp(s' − m) over allowed ids
};

__device__ __forceinline__ void sample_merge(SampleAcc& a, const SampleAcc& b) {
    if (beats(b.best, b.id, a.best, a.id)) {
        a.best = b.best;
        a.id = b.id;
        a.best_s = b.best_s;
    }
    const float m = fmaxf(a.m, b.m);
    if (m != -INFINITY) {  // else both are empty and stay (−inf, 0)
        a.sum = a.sum * (double)expf(a.m - m) + b.sum * (double)expf(b.m - m);
        a.m = m;
    }
}

__device__ __forceinline__ SampleAcc shfl_xor(const SampleAcc& a, int off) {
    return SampleAcc{__shfl_xor_sync(kFullMask, a.best, off),
                     __shfl_xor_sync(kFullMask, a.id, off),
                     __shfl_xor_sync(kFullMask, a.best_s, off),
                     __shfl_xor_sync(kFullMask, a.m, off),
                     __shfl_xor_sync(kFullMask, a.sum, off)};
}

// The raw inputs of 4 consecutive ids base .. base+n-1 (n <= 4; entries >= n are unused).
struct IdGroup {
    float c[4];     // conditional logits
    float u[4];     // unconditional logits (CFG only)
    uint32_t ban;   // bit j: id base+j is banned
    uint32_t n;     // valid ids in the group (0: no group)
};

// Loads group q (ids 4q .. 4q+3, clipped to vocab) of one row. `vec`: rows are 16-byte
// aligned, so a full group is one float4 per row; otherwise (and for the tail) scalar loads.
__device__ __forceinline__ IdGroup load_group(const float* cond, const float* uncond,
                                              const uint8_t* banned, bool vec, bool ban_vec,
                                              uint32_t vocab, uint32_t q) {
    IdGroup g;
    const uint32_t base = 4 * q;  // < vocab (q < ceil(vocab / 4)), so no overflow
    g.n = min(vocab - base, 4u);
#pragma unroll
    for (int j = 0; j < 4; ++j) g.c[j] = g.u[j] = 0.0f;
    if (vec && g.n == 4) {
        const float4 c4 = __ldcs(reinterpret_cast<const float4*>(cond + base));
        g.c[0] = c4.x, g.c[1] = c4.y, g.c[2] = c4.z, g.c[3] = c4.w;
        if (uncond) {
            const float4 u4 = __ldcs(reinterpret_cast<const float4*>(uncond + base));
            g.u[0] = u4.x, g.u[1] = u4.y, g.u[2] = u4.z, g.u[3] = u4.w;
        }
    } else {
#pragma unroll
        for (uint32_t j = 0; j < 4; ++j) {
            if (j < g.n) {
                g.c[j] = __ldcs(cond + base + j);
                if (uncond) g.u[j] = __ldcs(uncond + base + j);
            }
        }
    }
    g.ban = 0;
    if (banned) {
        if (ban_vec && g.n == 4) {
            const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(banned + base));
#pragma unroll
            for (uint32_t j = 0; j < 4; ++j) g.ban |= (((w >> (8 * j)) & 0xffu) != 0) << j;
        } else {
#pragma unroll
            for (uint32_t j = 0; j < 4; ++j) {
                if (j < g.n) g.ban |= (__ldg(banned + base + j) != 0) << j;
            }
        }
    }
    return g;
}

// Folds group q into the thread's accumulator (ids increase along a thread's walk, so `beats`
// keeps the lower id on a tie, like the CPU's strict `>`). Sets *bad on a non-finite s'.
// `p` stays in the constant bank; position = positions[i] and one_plus_g = rn(1 + g) (rounded
// as the CPU rounds it) are the only row values the walk keeps in registers.
__device__ __forceinline__ void sample_group(SampleAcc& a, bool& bad, const IdGroup& grp,
                                             const SlSampleParams& p, uint32_t position,
                                             float one_plus_g, uint32_t q) {
    const bool noisy = p.temperature > 0.0f;
    // l / 1 == l exactly in IEEE arithmetic (±0, ±inf and NaN included): skip the division at
    // the default temperature.
    const bool divide = noisy && p.temperature != 1.0f;
    const uint32_t base = 4 * q;
    // s'_j: l = (1+g)·c − g·u rounded as the CPU does (no FMA), then l / τ (IEEE) when noisy.
    float s[4];
    uint32_t ok = 0;  // bit j: id base+j is valid, not banned and s'_j is finite
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) {
        const float l = p.cfg ? __fsub_rn(__fmul_rn(one_plus_g, grp.c[j]),
                                          __fmul_rn(p.guidance, grp.u[j]))
                              : grp.c[j];
        s[j] = divide ? __fdiv_rn(l, p.temperature) : l;
        if (j < grp.n) {
            // Like the CPU: a non-finite s' is an error even for a banned id.
            if (!isfinite(s[j])) bad = true;
            else if (!((grp.ban >> j) & 1u)) ok |= 1u << j;
        }
    }
    if (ok == 0) return;

    // Argmax of the score.
    if (noisy) {
        // score = rn(s' + gumbel) <= rn(s' + kGumbelBound) (rounding is monotone), so an id with
        // rn(s' + kGumbelBound) < best can neither win nor tie anywhere in the row: skip its
        // logs. This never changes the result; it only saves the f64 work.
        uint32_t need = 0;
#pragma unroll
        for (uint32_t j = 0; j < 4; ++j) {
            if (((ok >> j) & 1u) && !(__fadd_rn(s[j], kGumbelBound) < a.best)) need |= 1u << j;
        }
        if (need) {
            // One Philox call serves the 4 ids of the group: counter (v/4, position, step,
            // request), word v % 4.
            const sl::U4 w =
                sl::philox4x32_10(sl::U4{q, position, p.step, p.request}, p.seed_lo, p.seed_hi);
            // Not unrolled: one copy of the f64 log code; needed ids in increasing order.
            while (need) {
                const uint32_t j = __ffs(need) - 1;
                need &= need - 1;
                const uint32_t word = j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
                const float sj = j == 0 ? s[0] : j == 1 ? s[1] : j == 2 ? s[2] : s[3];
                const float score = __fadd_rn(sj, sl::gumbel_of_word(word));
                if (beats(score, base + j, a.best, a.id)) {
                    a.best = score;
                    a.id = base + j;
                    a.best_s = sj;
                }
            }
        }
    } else {
#pragma unroll
        for (uint32_t j = 0; j < 4; ++j) {
            if (((ok >> j) & 1u) && beats(s[j], base + j, a.best, a.id)) {
                a.best = s[j];
                a.id = base + j;
                a.best_s = s[j];
            }
        }
    }

    // Online log-sum-exp of s': raise the max once per group, then add the group's terms. Each
    // term is an f32 expf of an argument <= 0 and the (<= 4) terms of a group are added in f32
    // (relative error ~1e-7 either way); the running sum is f64.
    float m4 = -INFINITY;
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) {
        if ((ok >> j) & 1u) m4 = fmaxf(m4, s[j]);
    }
    if (m4 > a.m) {
        a.sum *= (double)expf(a.m - m4);  // a.m = −inf: 0
        a.m = m4;
    }
    float terms = 0.0f;
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) {
        if ((ok >> j) & 1u) terms += expf(s[j] - a.m);
    }
    a.sum += (double)terms;
}

}  // namespace

// Block: one sampled row i (blockIdx.x). Thread t owns the id groups q = t, t + T, t + 2T, ...
// (T = SL_SAMPLE_THREADS; group q = ids 4q .. 4q+3), so a warp reads 32 consecutive float4 of
// each row per step. The walk is software-pipelined: the loads of a thread's next group are in
// flight while it processes the current one (64 registers, 2 blocks per SM). Per group: the CFG
// combine, banned and finiteness tests, one Philox call (τ > 0, and only if some id of the
// group can still win), the running argmax (score, id) and the online (max, sum) of s'. Then
// the block merges the per-thread accumulators: warp shuffles, per-warp partials in shared
// memory, warp 0 merges those and thread 0 writes token, confidence = exp(s'_token − lse) and
// lse. Each logit is read exactly once.
// Errors: a non-finite s' (any id, banned or not) sets *error_flag; such ids are left out of
// the argmax and the lse so the outputs stay finite. A row with no usable id (every id banned
// or non-finite — the host rules the first out) also sets the flag and writes token 0,
// confidence 0, lse −inf.
extern "C" __global__ void __launch_bounds__(SL_SAMPLE_THREADS, 2)
    sl_sample(const SlSampleParams p) {
    constexpr uint32_t T = SL_SAMPLE_THREADS;
    constexpr uint32_t kWarps = T / 32;
    __shared__ SampleAcc warp_acc[kWarps];

    const uint32_t i = blockIdx.x;
    if (blockDim.x != T) {  // a launch that breaks the ABI: report it rather than sample wrong
        if (threadIdx.x == 0) atomicOr(p.error_flag, 1u);
        return;
    }
    if (i >= p.n) return;  // uniform over the block
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    const float* cond = p.logits + (size_t)i * p.stride;
    const float* uncond = p.cfg ? p.logits + ((size_t)p.n + i) * p.stride : nullptr;
    // Row starts are 16-byte aligned iff the base is and the stride is a multiple of 4 floats.
    const bool vec = ((reinterpret_cast<uintptr_t>(p.logits) & 15) == 0) && (p.stride % 4 == 0);
    const bool ban_vec = (reinterpret_cast<uintptr_t>(p.banned) & 3) == 0;

    const uint32_t position = p.positions[i];
    const float one_plus_g = __fadd_rn(1.0f, p.guidance);

    const uint32_t n_groups = p.vocab / 4 + (p.vocab % 4 != 0);  // no overflow near 2^32
    SampleAcc acc{-INFINITY, UINT32_MAX, 0.0f, -INFINITY, 0.0};
    bool bad = false;
    // Software pipeline: the loads of the thread's next group are in flight while the current
    // one is processed.
    IdGroup next;
    next.n = 0;
    if (tid < n_groups) next = load_group(cond, uncond, p.banned, vec, ban_vec, p.vocab, tid);
    for (uint32_t q = tid; q < n_groups; q += T) {
        const IdGroup cur = next;
        next.n = 0;
        if (q + T < n_groups) {
            next = load_group(cond, uncond, p.banned, vec, ban_vec, p.vocab, q + T);
        }
        sample_group(acc, bad, cur, p, position, one_plus_g, q);
    }
    if (bad) atomicOr(p.error_flag, 1u);

    // Block reduction.
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sample_merge(acc, shfl_xor(acc, off));
    if (lane == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (warp != 0) return;
    acc = lane < kWarps ? warp_acc[lane] : SampleAcc{-INFINITY, UINT32_MAX, 0.0f, -INFINITY, 0.0};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sample_merge(acc, shfl_xor(acc, off));
    if (lane != 0) return;

    if (acc.id == UINT32_MAX) {  // no usable id at all
        atomicOr(p.error_flag, 1u);
        p.out_token[i] = 0;
        p.out_confidence[i] = 0.0f;
        p.out_lse[i] = -INFINITY;
        return;
    }
    // sum >= 1: the max's own term is expf(0) = 1.
    const double lse = (double)acc.m + log(acc.sum);
    p.out_token[i] = acc.id;
    p.out_confidence[i] = (float)exp((double)acc.best_s - lse);
    p.out_lse[i] = (float)lse;
}

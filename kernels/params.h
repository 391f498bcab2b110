/*
 * sparse-lavida kernel ABI: the one definition of every kernel's parameter struct and launch
 * constants. Rust sees this file through bindgen (src/contract/bindings.rs, committed; regenerate
 * with scripts/gen-bindings and never edit by hand). Kernels take one struct by value.
 *
 * Conventions
 * - Matrices are row-major; `*_stride` is the distance between rows in elements.
 * - bf16 is storage only; all arithmetic accumulates in f32.
 * - Attention tags are one u32: bit 0 masked, bit 1 branch (1 = image), bits 2..31 block
 *   (SPEC §3; src/contract/tags.rs `Tag`).
 * - Index arrays are u32. Pointers marked "nullable" may be 0.
 * - Every kernel is `extern "C"` and named here; launch geometry is fixed here too, so the
 *   host wrappers and the kernels cannot disagree.
 */
#ifndef SPARSE_LAVIDA_PARAMS_H
#define SPARSE_LAVIDA_PARAMS_H

#include <stdint.h>

#if defined(__CUDACC__) || defined(SL_EMULATE) /* nvcc, or the emulated device (kernels/emu) */
#include <cuda_bf16.h>
typedef __nv_bfloat16 sl_bf16;
#else
/* Host side (bindgen): a bf16 is its 16 raw bits. */
typedef uint16_t sl_bf16;
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * Gathered-token attention (kernels/attention.cu; the previous kernel in attention_v1.cu)
 *
 * Kernels: sl_attention_hd64, sl_attention_hd128 (one per head_dim), sl_attention_merge; the
 * previous version, kept selectable for one release: sl_attention_v1_hd64 / _hd128.
 * Grid (attention): (n_qtiles, n_heads, n_splits); block: SL_ATTN_THREADS threads; dynamic
 * shared memory: SL_ATTN_SMEM_BYTES(head_dim) (v1: SL_ATTN_V1_SMEM_BYTES), which needs the
 * opt-in attribute above 48 KiB.
 * A query tile is up to SL_ATTN_BLOCK_M (v1: SL_ATTN_V1_BLOCK_M) consecutive rows of ONE
 * sequence; the host plan lists the tiles (qtile_seq, qtile_row0), each sequence cut into tiles
 * of exactly that many rows but its last. Keys of sequence s are kv_indices[kv_indptr[s] ..
 * kv_indptr[s+1]] (pool slots), with kv_tags in parallel; split `z` of n_splits covers the keys
 * [z*chunk, min((z+1)*chunk, n_keys)) of that list, chunk = SL_SPLIT_CHUNK (below).
 * Key tiles (v2): the keys of sequence s are cut into tiles of SL_ATTN_BLOCK_N from its first
 * key; tile t of sequence s is entry ktile_indptr[s] + t of kv_summary, whose
 * SL_ATTN_SUMMARY_WORDS words are, for class c = 2*branch + masked (branch 1 = image), the
 * smallest (word 2c) and largest (word 2c+1) block of the tile's keys of that class; a class
 * with no key has 0xFFFFFFFF and 0 (min > max). The host plan builds them, and sl_resolve_plan
 * rebuilds them on the device after patching kv_tags (src/contract/attn.rs `key_tile_summaries`).
 * The kernel classifies each (query tile, key tile) pair from them: hidden tiles are neither
 * gathered nor computed, fully visible ones are not masked, mixed ones evaluate SPEC §3 per pair.
 * With n_splits == 1 the kernel writes `o` (and `lse`) directly. With n_splits > 1 it writes
 * partial_o / partial_lse, and sl_attention_merge (grid: (n_rows, ceil(n_heads /
 * SL_MERGE_HEADS)), block: SL_MERGE_THREADS, one warp per (row, head)) combines them into `o` /
 * `lse` by log-sum-exp weights.
 * A row that sees no key gets o = 0 and lse = -inf.
 * ------------------------------------------------------------------------------------- */
#define SL_ATTN_BLOCK_M 128
#define SL_ATTN_BLOCK_N 64
#define SL_ATTN_THREADS 128
/* K/V buffers of the cp.async pipeline: 3 for head_dim 64, 2 for 128 (a third would take
 * head_dim 128 to 1 CTA per SM); the key indices and tags run one stage ahead of them. */
#define SL_ATTN_KV_STAGES(head_dim) ((head_dim) <= 64 ? 3 : 2)
/* Q tile + SL_ATTN_KV_STAGES K and V tiles (bf16) + (stages + 1) rows of key indices and of
 * key tags (u32) + the CTA's row description (SL_ATTN_META_BYTES). */
#define SL_ATTN_META_BYTES 256
#define SL_ATTN_SMEM_BYTES(head_dim) \
    ((SL_ATTN_BLOCK_M + 2 * SL_ATTN_KV_STAGES(head_dim) * SL_ATTN_BLOCK_N) * (head_dim) * 2 + \
     2 * (SL_ATTN_KV_STAGES(head_dim) + 1) * SL_ATTN_BLOCK_N * 4 + SL_ATTN_META_BYTES)
#define SL_ATTN_SUMMARY_WORDS 8
#define SL_SUMMARY_EMPTY_MIN 0xFFFFFFFFu
/* The previous kernel (attention_v1.cu): 64-row query tiles, double-buffered K/V. */
#define SL_ATTN_V1_BLOCK_M 64
#define SL_ATTN_V1_SMEM_BYTES(head_dim) \
    ((SL_ATTN_V1_BLOCK_M + 4 * SL_ATTN_BLOCK_N) * (head_dim) * 2 + 2 * SL_ATTN_BLOCK_N * 4)
#define SL_MERGE_THREADS 128
#define SL_MERGE_HEADS (SL_MERGE_THREADS / 32)
/* Keys per split: ceil(n_keys / n_splits) rounded up to a multiple of SL_ATTN_BLOCK_N. */
#define SL_SPLIT_CHUNK(n_keys, n_splits) \
    (((((n_keys) + (n_splits) - 1) / (n_splits)) + SL_ATTN_BLOCK_N - 1) / SL_ATTN_BLOCK_N * SL_ATTN_BLOCK_N)

typedef struct SlAttnParams {
    const sl_bf16 *q;          /* [n_rows, q_stride]; head h at columns h*head_dim.. */
    const sl_bf16 *k_pool;     /* [slots, kv_stride]; kv head g at columns g*head_dim.. */
    const sl_bf16 *v_pool;     /* same layout as k_pool */
    sl_bf16 *o;                /* [n_rows, o_stride]; written when n_splits == 1 */
    float *lse;                /* nullable [n_rows, n_heads], natural log */
    float *partial_o;          /* [n_splits, n_rows, n_heads, head_dim] when n_splits > 1 */
    float *partial_lse;        /* [n_splits, n_rows, n_heads], base 2, when n_splits > 1 */
    const uint32_t *row_tags;  /* [n_rows] */
    const uint32_t *qtile_seq; /* [n_qtiles] sequence of each query tile */
    const uint32_t *qtile_row0;/* [n_qtiles] first row of each tile */
    const uint32_t *seq_indptr;/* [n_seqs + 1] rows of sequence s */
    const uint32_t *kv_indptr; /* [n_seqs + 1] */
    const uint32_t *kv_indices;/* [n_keys_total] pool slots */
    const uint32_t *kv_tags;   /* [n_keys_total] */
    const uint32_t *ktile_indptr; /* [n_seqs + 1] key tiles of sequence s (v2; v1 ignores it) */
    const uint32_t *kv_summary;   /* [n_ktiles, SL_ATTN_SUMMARY_WORDS] (v2; v1 ignores it) */
    uint32_t n_rows;
    uint32_t n_qtiles;
    uint32_t n_seqs;
    uint32_t n_slots;          /* pool rows (bounds are the host's job; kept for asserts) */
    uint32_t q_stride;
    uint32_t kv_stride;
    uint32_t o_stride;
    uint32_t n_heads;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t n_splits;
    uint32_t joint;            /* 1: cross-branch layer */
    float scale_log2;          /* log2(e) / sqrt(head_dim) */
    uint32_t _pad;
} SlAttnParams;

/* ---------------------------------------------------------------------------------------
 * Mask-aware softmax (kernels/softmax.cu)
 *
 * (a) sl_masked_softmax: probabilities of a score matrix under the SPEC §3 rule (row_tags /
 *     col_tags, `joint`) or, when row_tags is null, a per-row visible-prefix length
 *     (prefix_len[r]: columns < prefix_len[r] are visible). Scores are multiplied by `scale`
 *     first. Fully hidden rows give zeros. Grid: n_rows; block: SL_SOFTMAX_THREADS.
 * (b) sl_sample: the sampler pass over f32 logits: CFG combine, banned ids, temperature,
 *     Philox-Gumbel argmax, confidence and LSE, reading each logit once. One block per sampled
 *     row (grid: n), block: SL_SAMPLE_THREADS. Bit-exact rules (match src/backend/cpu/ops.rs):
 *     l = (1+g)*cond - g*uncond in f32 without FMA contraction; s = l / tau (IEEE division)
 *     when tau > 0 else l; score = s + gumbel (f32 add); argmax ties -> lower id;
 *     gumbel: Philox4x32-10, key (seed_lo, seed_hi), counter (v/4, position, step, request),
 *     word v%4 = w, u = ((w >> 8) + 0.5) * 2^-24 in f64, g = (float)(-log(-log(u))) in f64;
 *     lse = ln sum exp(s') over allowed ids with s' = s (tau > 0) or l (tau = 0), accumulated
 *     in f64 (per-thread online max/sum, merged); confidence = exp(s'_token - lse).
 *     A non-finite s' anywhere sets *error_flag = 1 (the host reports it).
 * ------------------------------------------------------------------------------------- */
#define SL_SOFTMAX_THREADS 256
#define SL_SAMPLE_THREADS 512

typedef struct SlMaskedSoftmaxParams {
    const float *scores;       /* [n_rows, stride] */
    float *probs;              /* [n_rows, stride] */
    const uint32_t *row_tags;  /* nullable [n_rows]: rule mode when set */
    const uint32_t *col_tags;  /* [n_cols] in rule mode */
    const uint32_t *prefix_len;/* [n_rows] in prefix mode */
    uint32_t n_rows;
    uint32_t n_cols;
    uint32_t stride;
    uint32_t joint;
    float scale;
    uint32_t _pad;
} SlMaskedSoftmaxParams;

typedef struct SlSampleParams {
    const float *logits;       /* [n or 2n, stride] (cond rows 0..n, uncond rows n..2n) */
    const uint32_t *positions; /* [n] Philox counter word 1 */
    const uint8_t *banned;     /* nullable [vocab] 1 = banned */
    uint32_t *out_token;       /* [n] */
    float *out_confidence;     /* [n] */
    float *out_lse;            /* [n] */
    uint32_t *error_flag;      /* [1], set to 1 on a non-finite logit */
    uint32_t n;
    uint32_t vocab;
    uint32_t stride;
    uint32_t cfg;              /* 1: rows n..2n are the unconditional pair */
    float guidance;
    float temperature;
    uint32_t seed_lo;
    uint32_t seed_hi;
    uint32_t step;
    uint32_t request;
} SlSampleParams;

/* ---------------------------------------------------------------------------------------
 * Support kernels (kernels/support.cu)
 *
 * sl_embed: x[i] = (float) table[ids[i]] or register (ids[i] == SL_REGISTER); optionally fused
 *   with the first RMSNorm: when norm_w is set, normed[i] = bf16(rmsnorm(x[i]) * norm_w).
 *   Grid: n_rows; block: SL_ROW_THREADS. An id >= table_rows sets *error_flag.
 * sl_rmsnorm: x += add (when add is set, in f32, written back), then
 *   out = bf16(x / sqrt(mean(x^2) + eps) * w). Grid: n_rows; block: SL_ROW_THREADS.
 * sl_rope_kv: RoPE on q in place (n_heads heads) and on k (n_kv_heads), then stores the rotated
 *   k and v rows into k_pool / v_pool at slots[i]. theta_i = pos * rope_theta^(-2i/head_dim)
 *   computed in f64, sin/cos in f64, rotation in f32: (a, b) = (x_i, x_{i+hd/2}) ->
 *   (a cos - b sin, a sin + b cos). With rope_table set, a position below table_positions reads
 *   its (cos, sin) there instead: [table_positions][head_dim/2][2] f32, the same values
 *   computed once per generation on the host (src/contract/rope.rs). q may be columns of the
 *   same allocation as k and v (the fused q|k|v projection): the columns are disjoint.
 *   Grid: n_rows; block: SL_ROW_THREADS.
 * sl_swiglu: out = bf16(silu(gate) * up), silu(g) = g / (1 + exp(-g)), f32 math. Grid-stride
 *   loop; block: SL_ELEM_THREADS.
 * ------------------------------------------------------------------------------------- */
#define SL_ROW_THREADS 256
#define SL_ELEM_THREADS 256
#define SL_REGISTER 0xFFFFFFFFu

typedef struct SlEmbedParams {
    const sl_bf16 *table;      /* [table_rows, d] */
    const sl_bf16 *reg;        /* [d] the register embedding */
    const uint32_t *ids;       /* [n_rows] */
    float *x;                  /* [n_rows, d] residual stream */
    const sl_bf16 *norm_w;     /* nullable [d]: fuse the first RMSNorm */
    sl_bf16 *normed;           /* [n_rows, d] when norm_w is set */
    uint32_t *error_flag;      /* [1] */
    uint32_t n_rows;
    uint32_t d;
    uint32_t table_rows;
    float eps;
} SlEmbedParams;

typedef struct SlRmsNormParams {
    float *x;                  /* [n_rows, d] residual stream (updated when add is set) */
    const sl_bf16 *add;        /* nullable [n_rows, d] */
    const sl_bf16 *w;          /* [d] */
    sl_bf16 *out;              /* [n_rows, d] */
    uint32_t n_rows;
    uint32_t d;
    float eps;
    uint32_t _pad;
} SlRmsNormParams;

typedef struct SlRopeKvParams {
    sl_bf16 *q;                /* [n_rows, q_stride] rotated in place */
    const sl_bf16 *k;          /* [n_rows, kv_stride] */
    const sl_bf16 *v;          /* [n_rows, kv_stride] */
    sl_bf16 *k_pool;           /* [slots, pool_stride] */
    sl_bf16 *v_pool;           /* [slots, pool_stride] */
    const uint32_t *positions; /* [n_rows] */
    const uint32_t *slots;     /* [n_rows] */
    uint32_t n_rows;
    uint32_t n_heads;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t q_stride;
    uint32_t kv_stride;
    uint32_t pool_stride;
    uint32_t table_positions;  /* positions rope_table holds (0 without a table) */
    double rope_theta;
    const float *rope_table;   /* nullable [table_positions, head_dim / 2, 2] cos, sin */
} SlRopeKvParams;

typedef struct SlSwigluParams {
    const sl_bf16 *gate;       /* [n_rows, gate_stride] */
    const sl_bf16 *up;         /* [n_rows, up_stride] */
    sl_bf16 *out;              /* [n_rows, width] */
    uint32_t n_rows;
    uint32_t width;
    uint32_t gate_stride;
    uint32_t up_stride;
} SlSwigluParams;

/* ---------------------------------------------------------------------------------------
 * Register-token aggregation (kernels/aggregate.cu)
 *
 * sl_aggregate_sparse builds, on the device, the plan of sparse step k with all three savings
 * on, exactly as src/sampler.rs `sparse_plan(.., Switches::ALL_ON, prefilled = P > 0)` does for
 * the response branch: per sequence s (rows sorted by sequence), in this order,
 *   - the group decoded at step k-1 (response indices decoded_order[group_indptr[k-1] ..
 *     group_indptr[k]], k > 0), id tokens[i], pos P+i, tag (branch, block k, clean), slot
 *     base_s + P + i;
 *   - the query (query[0..n_query]), id mask_id, pos P+i, tag (branch, block k+1, masked),
 *     slot base_s + P + N + j (j = index in the query);
 *   - R registers, id SL_REGISTER, pos P+N+r, same tag, slot base_s + P + N + n_query + r;
 * with base_s = s * slots_per_seq. Keys of sequence s, sorted by slot: the prompt slots
 * base_s + 0..P (tag text, block 0, clean), every decoded response slot (tag branch, block
 * j+1 for the group j it was decoded in, clean), then the fed masked-block slots. Logit rows:
 * the query rows of every sequence, sequence-major. One block per sequence
 * (grid: n_seqs, block: SL_AGG_THREADS); outputs are laid out for all sequences at once, so
 * the row and key counts of a sequence are known from the inputs:
 *   rows_per_seq = |group k-1| + n_query + R, keys_per_seq = P + (decoded so far) + n_query + R.
 * decoded_step[i] is the step at which response index i was decoded (UINT32_MAX: not yet).
 * ------------------------------------------------------------------------------------- */
#define SL_AGG_THREADS 256

typedef struct SlAggregateParams {
    const uint32_t *tokens;        /* [N] decoded ids (valid where decoded_step[i] < k) */
    const uint32_t *decoded_step;  /* [N] */
    const uint32_t *decoded_order; /* [N] response indices in decode order */
    const uint32_t *group_indptr;  /* [k + 1] groups 0..k-1 in decoded_order */
    const uint32_t *query;         /* [n_query] response indices of the masked block */
    uint32_t *row_ids;             /* [n_seqs * rows_per_seq] */
    uint32_t *row_pos;
    uint32_t *row_tags;
    uint32_t *row_slots;
    uint32_t *kv_indices;          /* [n_seqs * keys_per_seq] */
    uint32_t *kv_tags;
    uint32_t *logits_rows;         /* [n_seqs * n_query] */
    uint32_t k;                    /* the step */
    uint32_t n_seqs;
    uint32_t prompt_len;           /* P */
    uint32_t n_response;           /* N */
    uint32_t n_registers;          /* R */
    uint32_t n_query;
    uint32_t slots_per_seq;
    uint32_t mask_id;
    uint32_t branch;               /* 0 text, 1 image */
    uint32_t rows_per_seq;
    uint32_t keys_per_seq;
    uint32_t _pad;
} SlAggregateParams;

/* ---------------------------------------------------------------------------------------
 * Random weight init (kernels/init.cu)
 *
 * sl_init_uniform: out[i] = bf16(offset + scale * u_i) for i < n, u_i uniform on (-1, 1), so
 *   seeded random weights are generated on the device (no host copy). Bit-exact rule (CPU twin:
 *   src/backend/cpu/ops.rs `init_uniform`, which computes the f32 value v below):
 *     Philox4x32-10 with key (seed_lo, seed_hi) and counter (i/4 low 32 bits, i/4 high 32 bits,
 *     tensor_index, SL_INIT_COUNTER_TAG) gives four words (x, y, z, w); word i%4 of them = w;
 *     u = ((w >> 8) + 0.5) * 2^-23 - 1, exact in f32 (it is (2*(w >> 8) + 1 - 2^24) * 2^-24,
 *     an odd integer of magnitude < 2^24 times a power of two), so u lies in [1 - 2^24, 2^24 - 1]
 *     * 2^-24, strictly inside (-1, 1) and symmetric;
 *     v = offset + scale * u in f32 with two roundings (no FMA contraction);
 *     out[i] = bf16(v), round to nearest even.
 *   Grid-stride loop over groups of 4 consecutive elements (one Philox call each; group g is
 *   elements 4g .. min(4g + 4, n)); block: SL_ELEM_THREADS. A full group is one 8-byte store
 *   when `out` is 8-byte aligned.
 * ------------------------------------------------------------------------------------- */
#define SL_INIT_COUNTER_TAG 0x1A17u

typedef struct SlInitParams {
    sl_bf16 *out;              /* [n] */
    uint64_t n;                /* elements */
    float offset;
    float scale;
    uint32_t seed_lo;          /* Philox key word 0 */
    uint32_t seed_hi;          /* Philox key word 1 */
    uint32_t tensor_index;     /* Philox counter word 2 */
    uint32_t _pad;
} SlInitParams;

/* ---------------------------------------------------------------------------------------
 * Device-resident generation (kernels/program.cu)
 *
 * A generation queued (or captured as CUDA graphs) before any token is known keeps its decode
 * state on the device, per response index i < n and rank r < n (src/sampler/patch.rs
 * `DeviceState`): tokens[i] (the mask id while undecoded), order[r] (the index decoded with
 * rank r, or SL_UNDECODED), decoded_step[i] (the step that decoded i, or SL_UNDECODED). Each
 * step carries a template plan plus patches (`SlPatch`) resolved from that state before the
 * step runs; after sampling, a commit records the step's choices. Oracle of every kernel here:
 * src/sampler/patch.rs (`lists`, `value`, `apply`, `commit`).
 *
 * sl_resolve_plan (grid 1, block SL_PROGRAM_THREADS): writes the lists of patch::lists for
 *   the block [block_begin, block_end) — q = undecoded indices inside it, m = undecoded
 *   outside, d = decoded, each ascending — into list_q / list_m / list_d ([n] each; entries
 *   past a list's length are SL_UNDECODED), then applies the n_patches patches. A patch is
 *   (kind = field << 8 | source, index, arg, add) with the field and source numbering below
 *   (patch.rs `Field`, `Source`); it writes field[index] = value exactly as patch::value, and
 *   nothing when its source reads outside the state or a list, when index is not below its
 *   field's length (n_rows for the row fields, n_keys for kv_*, n_logits for logits_rows and
 *   sample_pos), or when the field's pointer is null. No two patches may write the same entry
 *   (the host checks), so they run in parallel. Then, when kv_summary is set, it rebuilds the
 *   attention key-tile summaries of the patched kv_tags (one warp per key tile).
 * sl_commit (grid 1, block SL_PROGRAM_THREADS): patch::commit. A query entry j < n_query is a
 *   candidate when query[j] < n (others are skipped: they neither commit nor count). Rank of a
 *   candidate j = number of candidates before it: with by_confidence, those with a greater
 *   confidence in f32 total order (as f32::total_cmp), equal confidence and a lower query[j'],
 *   or both equal and j' < j; otherwise those with j' < j. Candidates of rank < n_commit set
 *   order[rank_base + rank] = query[j] (when below n), tokens[query[j]] = token[j] and
 *   decoded_step[query[j]] = step. Query entries must be distinct.
 * sl_gather_rows (grid min(n, 65535), block SL_GATHER_THREADS): out[j, c] = x[rows[j], c] for
 *   j < n, c < cols (both dense, row stride cols); rows[j] >= x_rows gives a row of NaN.
 * sl_fill_u32 (grid-stride, block SL_ELEM_THREADS): buf[i] = value for i < n.
 * ------------------------------------------------------------------------------------- */
#define SL_PROGRAM_THREADS 256
#define SL_GATHER_THREADS 256
#define SL_UNDECODED 0xFFFFFFFFu

#define SL_FIELD_ROW_ID 0u
#define SL_FIELD_ROW_POS 1u
#define SL_FIELD_ROW_SLOT 2u
#define SL_FIELD_KV_INDEX 3u
#define SL_FIELD_KV_TAG 4u
#define SL_FIELD_LOGITS_ROW 5u
#define SL_FIELD_SAMPLE_POS 6u

#define SL_SOURCE_TOKEN 0u
#define SL_SOURCE_RANK_TOKEN 1u
#define SL_SOURCE_RANK 2u
#define SL_SOURCE_QUERY 3u
#define SL_SOURCE_OTHER 4u
#define SL_SOURCE_DECODED 5u
#define SL_SOURCE_DECODED_TAG 6u

typedef struct SlPatch {
    uint32_t kind;             /* field << 8 | source */
    uint32_t index;            /* entry of the field written */
    uint32_t arg;              /* the source's argument */
    uint32_t add;              /* added to the source's value (not for token sources) */
} SlPatch;

typedef struct SlResolveParams {
    const uint32_t *tokens;       /* [n] */
    const uint32_t *order;        /* [n] */
    const uint32_t *decoded_step; /* [n] */
    uint32_t *list_q;             /* [n] */
    uint32_t *list_m;             /* [n] */
    uint32_t *list_d;             /* [n] */
    const SlPatch *patches;       /* [n_patches] */
    uint32_t *row_ids;            /* nullable [n_rows] */
    uint32_t *row_pos;            /* nullable [n_rows] */
    uint32_t *row_slots;          /* nullable [n_rows] */
    uint32_t *kv_indices;         /* nullable [n_keys] */
    uint32_t *kv_tags;            /* nullable [n_keys] */
    uint32_t *logits_rows;        /* nullable [n_logits] */
    uint32_t *sample_pos;         /* nullable [n_samples] */
    uint32_t n;                   /* response length */
    uint32_t n_patches;
    uint32_t block_begin;         /* the step's block [block_begin, block_end) */
    uint32_t block_end;
    uint32_t n_rows;
    uint32_t n_keys;
    uint32_t n_logits;
    uint32_t n_samples;           /* sampled positions (logits rows / 2 under CFG) */
    /* Attention key-tile summaries rebuilt after the patches (see "Gathered-token attention"):
     * when kv_summary is set, the summaries of every key tile of the n_seqs sequences of
     * kv_indptr over kv_tags (which must then be set and hold kv_indptr[n_seqs] entries). */
    const uint32_t *kv_indptr;    /* nullable [n_seqs + 1] */
    uint32_t *kv_summary;         /* nullable [n_ktiles, SL_ATTN_SUMMARY_WORDS] */
    uint32_t n_seqs;
    uint32_t _pad;
} SlResolveParams;

typedef struct SlCommitParams {
    const uint32_t *query;        /* [n_query] response indices */
    const uint32_t *token;        /* [n_query] sampled ids */
    const float *confidence;      /* [n_query] */
    uint32_t *tokens;             /* [n] */
    uint32_t *order;              /* [n] */
    uint32_t *decoded_step;       /* [n] */
    uint32_t n;                   /* response length */
    uint32_t n_query;
    uint32_t n_commit;
    uint32_t rank_base;
    uint32_t step;
    uint32_t by_confidence;       /* 1: text (top n_commit by confidence); 0: query order */
} SlCommitParams;

typedef struct SlGatherParams {
    const float *x;               /* [x_rows, cols] */
    const uint32_t *rows;         /* [n] */
    float *out;                   /* [n, cols] */
    uint32_t n;
    uint32_t cols;
    uint32_t x_rows;
    uint32_t _pad;
} SlGatherParams;

typedef struct SlFillParams {
    uint32_t *buf;                /* [n] */
    uint64_t n;
    uint32_t value;
    uint32_t _pad;
} SlFillParams;

#ifdef __cplusplus
}
#endif

#endif /* SPARSE_LAVIDA_PARAMS_H */

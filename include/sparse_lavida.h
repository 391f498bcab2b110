/*
 * sparse-lavida: the C ABI of the CUDA kernel layer (libsparse_lavida_capi.so, built by
 * `cargo build --release -p sparse-lavida-capi`), for C, C++ and Python engines.
 *
 * Hand-written; `capi/tests/c_abi.rs` checks in CI that every function declared here is
 * exported by the library with the same number of parameters, that the error codes agree, and
 * compiles and runs examples/c/attention.c against it.
 *
 * Compile with  -I include -I kernels  (the parameter structs are kernels/params.h's) and link
 * with  -L target/release -lsparse_lavida_capi.
 *
 * Model: the engine owns every device buffer and stream. Load the kernels once per device
 * (sl_kernels_load: into the device's primary context, the one the CUDA runtime API and PyTorch
 * use), fill a params struct of params.h with device pointers, and launch on one of the
 * engine's streams of that context (a cudaStream_t is a CUstream). Launches are asynchronous,
 * allocate nothing and never synchronize: they can be captured into a CUDA graph. Every call
 * returns SL_OK or an SL_ERR_* code, with a message in sl_last_error(); nothing aborts the
 * process.
 *
 * Safety contract of every sl_launch_* (the caller's duty; violating it is undefined behaviour
 * on the device, as for any kernel launch):
 *   1. `kernels` is a live handle and `stream` is null (the legacy default stream) or a live
 *      stream of the context the kernels were loaded into;
 *   2. every non-null pointer in the params struct points into a live device allocation of that
 *      context holding at least the elements params.h documents for it (with the struct's
 *      counts and strides); nullable pointers are null or such a pointer;
 *   3. outputs are not read or written by other work until the launch completes on `stream`,
 *      and no output overlaps another buffer of the launch (unless params.h says it is updated
 *      in place);
 *   4. the kernel's own conditions (params.h, and src/cuda/raw.rs for each function), e.g. for
 *      attention: query tiles from sl_query_tiles, key tiles and summaries from sl_key_tiles
 *      on the same kv_tags, valid CSR offsets, every kv_indices entry below n_slots, n_heads a
 *      multiple of n_kv_heads, q/kv/o strides multiples of 8 and q/k/v/o 16-byte aligned,
 *      split workspaces [n_splits, n_rows, n_heads, (head_dim)] f32 when n_splits > 1.
 */
#ifndef SPARSE_LAVIDA_H
#define SPARSE_LAVIDA_H

#include <stdint.h>

#include "params.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA stream (cuda.h's CUstream; the runtime API's cudaStream_t is the same pointer). */
typedef struct CUstream_st *CUstream;

/* Error codes. */
#define SL_OK 0
#define SL_ERR_INVALID 1     /* a null pointer or an argument the launch refuses */
#define SL_ERR_UNAVAILABLE 2 /* no driver, no device, no kernels, or none for this device */
#define SL_ERR_CUDA 3        /* a CUDA driver call failed */
#define SL_ERR_INTERNAL 4    /* a bug of this library (a caught panic) */

/* The kernels loaded into one device's primary context. */
typedef struct SlKernels SlKernels;

/* This library's version, a static string. */
const char *sl_version(void);

/* The message of the last failed call on this thread ("" if none); valid until the next
 * failing call on this thread. */
const char *sl_last_error(void);

/* Loads the kernels into the primary context of `device`; *out is the handle (NULL on error). */
int sl_kernels_load(int device, SlKernels **out);

/* Frees a handle (NULL: nothing) and unloads its kernels; every launch made through it must
 * have completed. */
void sl_kernels_free(SlKernels *kernels);

/* The device's streaming multiprocessors (the `workers` of sl_choose_splits). */
int sl_kernels_sm_count(const SlKernels *kernels, uint32_t *out);

/* The attention CTAs that run at once for head_dim (CTAs per SM from the driver's occupancy
 * calculator, times the SMs): the `workers` of sl_choose_splits. */
int sl_kernels_attention_workers(const SlKernels *kernels, uint32_t head_dim, uint32_t *out);

/* Attention planning on the host (the values SlAttnParams needs besides the buffers).
 * sl_query_tiles: the query tiles of rows sorted by sequence (seq_indptr: n_seqs + 1 CSR
 * offsets), SL_ATTN_BLOCK_M rows of one sequence at most each; writes up to `capacity` tiles
 * to qtile_seq / qtile_row0 and their count to *n_qtiles (SL_ERR_INVALID, count written, when
 * they do not fit). sl_key_tiles: the key tiles of each sequence (kv_indptr: n_seqs + 1 CSR
 * offsets over kv_tags) and their summaries, SL_ATTN_SUMMARY_WORDS words per tile: writes
 * n_seqs + 1 offsets to ktile_indptr, up to `capacity` summaries to `summaries` and their
 * count to *n_ktiles (SL_ERR_INVALID, count written, when they do not fit); rebuild them
 * whenever kv_tags change. sl_choose_splits: the split count of the crate's heuristic. */
int sl_query_tiles(const uint32_t *seq_indptr, uint32_t n_seqs, uint32_t *qtile_seq,
                   uint32_t *qtile_row0, uint32_t capacity, uint32_t *n_qtiles);
int sl_key_tiles(const uint32_t *kv_indptr, uint32_t n_seqs, const uint32_t *kv_tags,
                 uint32_t *ktile_indptr, uint32_t *summaries, uint32_t capacity,
                 uint32_t *n_ktiles);
uint32_t sl_choose_splits(uint32_t n_qtiles, uint32_t n_heads, uint32_t max_keys,
                          uint32_t workers);

/* Launches, one per kernel (parameters and launch geometry: params.h). */
int sl_launch_attention(const SlKernels *kernels, const SlAttnParams *params, CUstream stream);
int sl_launch_attention_merge(const SlKernels *kernels, const SlAttnParams *params,
                              CUstream stream);
int sl_launch_masked_softmax(const SlKernels *kernels, const SlMaskedSoftmaxParams *params,
                             CUstream stream);
int sl_launch_sample(const SlKernels *kernels, const SlSampleParams *params, CUstream stream);
int sl_launch_embed(const SlKernels *kernels, const SlEmbedParams *params, CUstream stream);
int sl_launch_rmsnorm(const SlKernels *kernels, const SlRmsNormParams *params, CUstream stream);
int sl_launch_rope_kv(const SlKernels *kernels, const SlRopeKvParams *params, CUstream stream);
int sl_launch_swiglu(const SlKernels *kernels, const SlSwigluParams *params, CUstream stream);
int sl_launch_aggregate_sparse(const SlKernels *kernels, const SlAggregateParams *params,
                               CUstream stream);
int sl_launch_init_uniform(const SlKernels *kernels, const SlInitParams *params,
                           CUstream stream);
int sl_launch_resolve_plan(const SlKernels *kernels, const SlResolveParams *params,
                           CUstream stream);
int sl_launch_commit(const SlKernels *kernels, const SlCommitParams *params, CUstream stream);
int sl_launch_gather_rows(const SlKernels *kernels, const SlGatherParams *params,
                          CUstream stream);
int sl_launch_fill_u32(const SlKernels *kernels, const SlFillParams *params, CUstream stream);

#ifdef __cplusplus
}
#endif

#endif /* SPARSE_LAVIDA_H */

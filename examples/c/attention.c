/*
 * A C engine calling sparse-lavida's gathered-token attention through the C ABI
 * (include/sparse_lavida.h): the engine allocates its device memory and its stream itself
 * (here with the CUDA driver API, loaded with dlopen so that no CUDA header or SDK is needed to
 * build), fills an SlAttnParams with its device pointers and launches on its stream. The result
 * is checked against a naive double-precision attention under the SPEC §3 rule computed here;
 * the program exits 1 on a mismatch, 2 when no CUDA device is there.
 *
 * Build and run (capi/tests/c_abi.rs does this in CI, on the emulated device):
 *   cargo build --release -p sparse-lavida-capi
 *   cc -std=c11 -O2 -I include -I kernels examples/c/attention.c -o attention \
 *      -L target/release -lsparse_lavida_capi -ldl -lm
 *   LD_LIBRARY_PATH=target/release:$LD_LIBRARY_PATH ./attention
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparse_lavida.h"

/* --- The few driver calls an engine makes (cuda.h's declarations, resolved at run time) --- */

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(int *, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, int);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemFree)(CUdeviceptr);
static CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
static CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
static CUresult (*cuStreamCreate)(CUstream *, unsigned);
static CUresult (*cuStreamSynchronize)(CUstream);
static CUresult (*cuStreamDestroy)(CUstream);

static void *sym(void *lib, const char *name) {
    void *f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "libcuda.so.1 lacks %s\n", name);
        exit(2);
    }
    return f;
}

#define CU(call)                                                                   \
    do {                                                                           \
        CUresult r_ = (call);                                                      \
        if (r_ != 0) {                                                             \
            fprintf(stderr, "%s:%d: %s failed (%d)\n", __FILE__, __LINE__, #call, r_); \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

static CUdeviceptr upload(const void *host, size_t bytes) {
    CUdeviceptr d;
    CU(cuMemAlloc(&d, bytes ? bytes : 1));
    if (bytes) CU(cuMemcpyHtoD(d, host, bytes));
    return d;
}

/* --- bf16 as the kernels store it: the high 16 bits of an f32, rounded to nearest even --- */

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* --- The problem: 2 sequences, GQA (4 query heads over 2 K/V heads), head_dim 64 --- */

enum { N_HEADS = 4, N_KV = 2, HD = 64, N_SLOTS = 160, N_SPLITS = 2 };
enum { Q_DIM = N_HEADS * HD, KV_DIM = N_KV * HD };

static uint32_t tag(int image, uint32_t block, int masked) {
    return (block << 2) | ((uint32_t)image << 1) | (uint32_t)masked;
}

/* SPEC §3 on packed tags. */
static int visible(uint32_t q, uint32_t k, int joint) {
    int branch_ok = joint || ((q >> 1) & 1) == ((k >> 1) & 1);
    int qm = q & 1, km = k & 1;
    uint32_t qb = q >> 2, kb = k >> 2;
    int step_ok = qm ? (!km || kb == qb) : (!km && kb <= qb);
    return branch_ok && step_ok;
}

static uint32_t rng_state = 12345u;
static float uniform(void) { /* xorshift32 on [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

int main(void) {
    /* The engine's device and stream. */
    void *libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!libcuda) {
        fprintf(stderr, "no CUDA driver (libcuda.so.1): %s\n", dlerror());
        return 2;
    }
    *(void **)&cuInit = sym(libcuda, "cuInit");
    *(void **)&cuDeviceGet = sym(libcuda, "cuDeviceGet");
    *(void **)&cuDevicePrimaryCtxRetain = sym(libcuda, "cuDevicePrimaryCtxRetain");
    *(void **)&cuCtxSetCurrent = sym(libcuda, "cuCtxSetCurrent");
    *(void **)&cuMemAlloc = sym(libcuda, "cuMemAlloc_v2");
    *(void **)&cuMemFree = sym(libcuda, "cuMemFree_v2");
    *(void **)&cuMemcpyHtoD = sym(libcuda, "cuMemcpyHtoD_v2");
    *(void **)&cuMemcpyDtoH = sym(libcuda, "cuMemcpyDtoH_v2");
    *(void **)&cuStreamCreate = sym(libcuda, "cuStreamCreate");
    *(void **)&cuStreamSynchronize = sym(libcuda, "cuStreamSynchronize");
    *(void **)&cuStreamDestroy = sym(libcuda, "cuStreamDestroy_v2");
    int dev;
    CUcontext ctx;
    if (cuInit(0) != 0 || cuDeviceGet(&dev, 0) != 0) {
        fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    CU(cuDevicePrimaryCtxRetain(&ctx, dev));
    CU(cuCtxSetCurrent(ctx));
    CUstream stream;
    CU(cuStreamCreate(&stream, 1 /* CU_STREAM_NON_BLOCKING */));

    printf("sparse-lavida %s\n", sl_version());
    SlKernels *kernels = NULL;
    if (sl_kernels_load(0, &kernels) != SL_OK) {
        fprintf(stderr, "sl_kernels_load: %s\n", sl_last_error());
        return 2;
    }

    /* An error is a code and a message, not a crash. */
    if (sl_launch_attention(kernels, NULL, stream) != SL_ERR_INVALID || !*sl_last_error()) {
        fprintf(stderr, "a null params struct must be SL_ERR_INVALID with a message\n");
        return 1;
    }

    /* Rows: sequence 0 has 70 rows (one query tile, two m-blocks per warp), sequence 1 has 25. */
    const uint32_t seq_indptr[3] = {0, 70, 95};
    const uint32_t n_rows = 95;
    uint32_t row_tags[95];
    for (uint32_t r = 0; r < n_rows; r++) {
        int masked = (r % 3) == 0;
        row_tags[r] = masked ? tag(r % 2, 5 + r % 2, 1) : tag(r % 2, 1 + r % 4, 0);
    }
    /* Keys: each sequence gathers its own pool slots (a page size of one token), in any order. */
    uint32_t kv_indptr[3] = {0, 0, 0};
    uint32_t kv_indices[N_SLOTS], kv_tags[N_SLOTS];
    uint32_t n_keys = 0;
    for (int s = 0; s < 2; s++) {
        for (uint32_t slot = (uint32_t)s; slot < N_SLOTS; slot += 2) {
            kv_indices[n_keys] = (slot * 7u) % N_SLOTS;
            uint32_t i = n_keys;
            kv_tags[n_keys] = (i % 5 == 0) ? tag(i % 2, 5 + i % 2, 1) : tag(i % 2, i % 4, 0);
            n_keys++;
        }
        kv_indptr[s + 1] = n_keys;
    }
    float *q = malloc(sizeof(float) * n_rows * Q_DIM);
    float *k = malloc(sizeof(float) * N_SLOTS * KV_DIM);
    float *v = malloc(sizeof(float) * N_SLOTS * KV_DIM);
    uint16_t *qh = malloc(2 * n_rows * Q_DIM), *kh = malloc(2 * N_SLOTS * KV_DIM);
    uint16_t *vh = malloc(2 * N_SLOTS * KV_DIM);
    for (uint32_t i = 0; i < n_rows * Q_DIM; i++) q[i] = from_bf16(qh[i] = to_bf16(uniform()));
    for (uint32_t i = 0; i < N_SLOTS * KV_DIM; i++) {
        k[i] = from_bf16(kh[i] = to_bf16(uniform()));
        v[i] = from_bf16(vh[i] = to_bf16(uniform()));
    }

    /* Host planning: query tiles and the split count (forced to 2 here, to use the merge). */
    uint32_t qtile_seq[8], qtile_row0[8], n_qtiles = 0;
    if (sl_query_tiles(seq_indptr, 2, qtile_seq, qtile_row0, 8, &n_qtiles) != SL_OK) {
        fprintf(stderr, "sl_query_tiles: %s\n", sl_last_error());
        return 1;
    }
    /* The key tiles and their summaries (the kernel's tile classes come from them). */
    uint32_t ktile_indptr[3], summaries[8 * SL_ATTN_SUMMARY_WORDS], n_ktiles = 0;
    if (sl_key_tiles(kv_indptr, 2, kv_tags, ktile_indptr, summaries, 8, &n_ktiles) != SL_OK) {
        fprintf(stderr, "sl_key_tiles: %s\n", sl_last_error());
        return 1;
    }
    uint32_t sms = 0, workers = 0;
    if (sl_kernels_sm_count(kernels, &sms) != SL_OK) return 1;
    if (sl_kernels_attention_workers(kernels, HD, &workers) != SL_OK) return 1;
    printf("%u query tiles, %u key tiles; the heuristic would split the keys %u way(s) on %u "
           "concurrent CTAs (%u SMs); using %d\n",
           n_qtiles, n_ktiles, sl_choose_splits(n_qtiles, N_HEADS, 80, workers), workers, sms,
           N_SPLITS);

    /* The engine's device buffers. */
    CUdeviceptr d_q = upload(qh, 2u * n_rows * Q_DIM), d_k = upload(kh, 2u * N_SLOTS * KV_DIM);
    CUdeviceptr d_v = upload(vh, 2u * N_SLOTS * KV_DIM), d_o, d_lse, d_po, d_plse;
    CU(cuMemAlloc(&d_o, 2u * n_rows * Q_DIM));
    CU(cuMemAlloc(&d_lse, 4u * n_rows * N_HEADS));
    CU(cuMemAlloc(&d_po, 4u * N_SPLITS * n_rows * Q_DIM));
    CU(cuMemAlloc(&d_plse, 4u * N_SPLITS * n_rows * N_HEADS));
    CUdeviceptr d_row_tags = upload(row_tags, sizeof row_tags);
    CUdeviceptr d_qseq = upload(qtile_seq, 4u * n_qtiles), d_qrow0 = upload(qtile_row0, 4u * n_qtiles);
    CUdeviceptr d_seq_indptr = upload(seq_indptr, sizeof seq_indptr);
    CUdeviceptr d_kv_indptr = upload(kv_indptr, sizeof kv_indptr);
    CUdeviceptr d_kv_indices = upload(kv_indices, 4u * n_keys);
    CUdeviceptr d_kv_tags = upload(kv_tags, 4u * n_keys);
    CUdeviceptr d_ktile_indptr = upload(ktile_indptr, sizeof ktile_indptr);
    CUdeviceptr d_summaries = upload(summaries, 4u * SL_ATTN_SUMMARY_WORDS * n_ktiles);

    SlAttnParams p;
    memset(&p, 0, sizeof p);
    p.q = (const sl_bf16 *)(uintptr_t)d_q;
    p.k_pool = (const sl_bf16 *)(uintptr_t)d_k;
    p.v_pool = (const sl_bf16 *)(uintptr_t)d_v;
    p.o = (sl_bf16 *)(uintptr_t)d_o;
    p.lse = (float *)(uintptr_t)d_lse;
    p.partial_o = (float *)(uintptr_t)d_po;
    p.partial_lse = (float *)(uintptr_t)d_plse;
    p.row_tags = (const uint32_t *)(uintptr_t)d_row_tags;
    p.qtile_seq = (const uint32_t *)(uintptr_t)d_qseq;
    p.qtile_row0 = (const uint32_t *)(uintptr_t)d_qrow0;
    p.seq_indptr = (const uint32_t *)(uintptr_t)d_seq_indptr;
    p.kv_indptr = (const uint32_t *)(uintptr_t)d_kv_indptr;
    p.kv_indices = (const uint32_t *)(uintptr_t)d_kv_indices;
    p.kv_tags = (const uint32_t *)(uintptr_t)d_kv_tags;
    p.ktile_indptr = (const uint32_t *)(uintptr_t)d_ktile_indptr;
    p.kv_summary = (const uint32_t *)(uintptr_t)d_summaries;
    p.n_rows = n_rows;
    p.n_qtiles = n_qtiles;
    p.n_seqs = 2;
    p.n_slots = N_SLOTS;
    p.q_stride = Q_DIM;
    p.kv_stride = KV_DIM;
    p.o_stride = Q_DIM;
    p.n_heads = N_HEADS;
    p.n_kv_heads = N_KV;
    p.head_dim = HD;
    p.n_splits = N_SPLITS;
    p.joint = 1;
    p.scale_log2 = 1.4426950408889634f / sqrtf((float)HD);
    if (sl_launch_attention(kernels, &p, stream) != SL_OK) {
        fprintf(stderr, "sl_launch_attention: %s\n", sl_last_error());
        return 1;
    }
    CU(cuStreamSynchronize(stream));
    uint16_t *oh = malloc(2 * n_rows * Q_DIM);
    CU(cuMemcpyDtoH(oh, d_o, 2u * n_rows * Q_DIM));

    /* The oracle: naive attention in double under the SPEC §3 rule; no visible key → zeros. */
    double num = 0, den = 0;
    int nan = 0;
    for (int s = 0; s < 2; s++) {
        for (uint32_t r = seq_indptr[s]; r < seq_indptr[s + 1]; r++) {
            for (int h = 0; h < N_HEADS; h++) {
                int g = h / (N_HEADS / N_KV);
                double m = -INFINITY, l = 0, acc[HD] = {0};
                double scores[N_SLOTS];
                for (uint32_t j = kv_indptr[s]; j < kv_indptr[s + 1]; j++) {
                    scores[j] = -INFINITY;
                    if (!visible(row_tags[r], kv_tags[j], 1)) continue;
                    double dot = 0;
                    for (int d = 0; d < HD; d++)
                        dot += (double)q[r * Q_DIM + h * HD + d] *
                               k[kv_indices[j] * KV_DIM + g * HD + d];
                    scores[j] = dot / sqrt((double)HD);
                    if (scores[j] > m) m = scores[j];
                }
                for (uint32_t j = kv_indptr[s]; j < kv_indptr[s + 1]; j++) {
                    if (scores[j] == -INFINITY) continue;
                    double w = exp(scores[j] - m);
                    l += w;
                    for (int d = 0; d < HD; d++) acc[d] += w * v[kv_indices[j] * KV_DIM + g * HD + d];
                }
                for (int d = 0; d < HD; d++) {
                    double want = l > 0 ? acc[d] / l : 0.0;
                    double got = from_bf16(oh[r * Q_DIM + h * HD + d]);
                    if (isnan(got)) nan++;
                    num += (got - want) * (got - want);
                    den += want * want;
                }
            }
        }
    }
    double rel = sqrt(num / (den > 0 ? den : 1e-300));
    printf("attention of %u rows over %u gathered keys: relative L2 error %.2e vs naive f64\n",
           n_rows, n_keys, rel);

    CU(cuMemFree(d_q));
    CU(cuMemFree(d_k));
    CU(cuMemFree(d_v));
    CU(cuMemFree(d_o));
    CU(cuMemFree(d_lse));
    CU(cuMemFree(d_po));
    CU(cuMemFree(d_plse));
    CU(cuMemFree(d_row_tags));
    CU(cuMemFree(d_qseq));
    CU(cuMemFree(d_qrow0));
    CU(cuMemFree(d_seq_indptr));
    CU(cuMemFree(d_kv_indptr));
    CU(cuMemFree(d_kv_indices));
    CU(cuMemFree(d_kv_tags));
    CU(cuMemFree(d_ktile_indptr));
    CU(cuMemFree(d_summaries));
    sl_kernels_free(kernels);
    CU(cuStreamDestroy(stream));
    free(q), free(k), free(v), free(qh), free(kh), free(vh), free(oh);
    if (nan || !(rel <= 1e-2)) {
        fprintf(stderr, "MISMATCH: %d NaN, relative L2 error %.3e (bound 1e-2)\n", nan, rel);
        return 1;
    }
    printf("ok\n");
    return 0;
}

// Emulated cuBLASLt (built as libcublasLt.so.13) for the CPU emulation of the CUDA device.
//
// cudarc (`dynamic-loading`, `cuda-13000`) dlopens this library instead of NVIDIA's and calls it
// with the CUDA 13 cuBLASLt ABI: enum values, attribute sizes and struct layouts below are those of
// cudarc's `cublaslt/sys` bindings for cuda-13000 (there is no cublasLt.h on the build machines).
//
// What is emulated: D = alpha · op(A) · op(B) + beta · C with f32 compute and scale, host alpha and
// beta, op = N or T, A and B bf16 or f32, C and D bf16 or f32 (C and D the same type),
// column-major, one matrix per layout, default epilogue. Anything else is refused with
// CUBLAS_STATUS_NOT_SUPPORTED (a valid request the emulator does not implement) or
// CUBLAS_STATUS_INVALID_VALUE (a malformed one), and a message through slEmuReportError. Every
// other entry point cudarc declares exists as a stub returning NOT_SUPPORTED, so that no call can
// crash on a missing symbol.
//
// The product is validated completely at the call (descriptors, types, shapes, device ranges;
// alpha and beta are read then, as cuBLAS reads host scalars), copied into a self-contained
// operation and queued with slEmuEnqueue, which runs it in stream order or records it into a
// graph (then it runs at every replay, so running never consumes the operation).
//
// Arithmetic, per element of D (all in f32, IEEE, no fused multiply-add when built with
// -ffp-contract=off):
//   acc     = (((0 + a[i,0]·b[0,j]) + a[i,1]·b[1,j]) + ...) + a[i,k-1]·b[k-1,j]
//             (one accumulator, l in increasing order; inputs widened exactly from bf16)
//   D[i, j] = alpha · acc                      when beta == 0 (C is not read, as in cuBLAS)
//   D[i, j] = alpha · acc + beta · C[i, j]     otherwise
// and D is stored as f32 or rounded to bf16 (round to nearest even, NaN stays NaN). When alpha is
// 0 or k is 0 the product is not formed (BLAS convention): D = beta · C, or 0 when beta is 0.
// The order is the same whatever the tiling or the number of threads, so results are bitwise
// deterministic.

#include <cuda.h>

#include "api.h"

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <unordered_set>

// ------------------------------------------------------------------------------------------
// The public ABI (CUDA 13 cuBLASLt), declared here since no cublasLt.h is available.
// Enumerations have a fixed 32-bit underlying type, as cudarc's `#[repr(u32)]`, so that any value
// a caller passes is a valid value of the type (it is then checked, not trusted).
// ------------------------------------------------------------------------------------------

#define SL_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" {

enum cublasStatus_t : uint32_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};

enum cublasComputeType_t : uint32_t {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_64F_PEDANTIC = 71,
    CUBLAS_COMPUTE_32I = 72,
    CUBLAS_COMPUTE_32I_PEDANTIC = 73,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_32F_EMULATED_16BFX9 = 78,
    CUBLAS_COMPUTE_64F_EMULATED_FIXEDPOINT = 79,
};

// Only the values the emulator names; others are refused by number.
enum cudaDataType_t : uint32_t {
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14,
    CUDA_R_8F_E4M3 = 28,
    CUDA_R_8F_E5M2 = 29,
};

enum libraryPropertyType_t : uint32_t {
    MAJOR_VERSION = 0,
    MINOR_VERSION = 1,
    PATCH_LEVEL = 2,
};

// Attribute selectors are plain 32-bit values here; their numbers are in the tables below.
typedef uint32_t cublasLtMatmulDescAttributes_t;
typedef uint32_t cublasLtMatrixLayoutAttribute_t;
typedef uint32_t cublasLtMatmulPreferenceAttributes_t;

// The opaque objects behind the handles. NVIDIA's headers give some of them a fixed size for the
// *_Init_internal functions; those are not emulated, so the contents here are the emulator's own.
struct cublasLtContext;
struct cublasLtMatmulDescOpaque_t;
struct cublasLtMatrixLayoutOpaque_t;
struct cublasLtMatmulPreferenceOpaque_t;
typedef cublasLtContext *cublasLtHandle_t;
typedef cublasLtMatmulDescOpaque_t *cublasLtMatmulDesc_t;
typedef cublasLtMatrixLayoutOpaque_t *cublasLtMatrixLayout_t;
typedef cublasLtMatmulPreferenceOpaque_t *cublasLtMatmulPreference_t;

// Semi-opaque, passed by value between heuristic and matmul: layout is ABI.
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};

struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};

}  // extern "C"

static_assert(sizeof(cublasLtMatmulAlgo_t) == 64, "cublasLtMatmulAlgo_t is 8 u64 words");
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "heuristic result layout");
static_assert(sizeof(cublasStatus_t) == 4, "cublasStatus_t is a 32-bit enum");

namespace {

// ------------------------------------------------------------------------------------------
// Attribute numbers (cuda-13000) and the byte size of each attribute's value.
// ------------------------------------------------------------------------------------------

enum : uint32_t {
    CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,
    CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,
    CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_TRANSC = 5,
    CUBLASLT_MATMUL_DESC_FILL_MODE = 6,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE = 10,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,
    CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE = 14,
    CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET = 15,
    CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17,
    CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18,
    CUBLASLT_MATMUL_DESC_C_SCALE_POINTER = 19,
    CUBLASLT_MATMUL_DESC_D_SCALE_POINTER = 20,
    CUBLASLT_MATMUL_DESC_AMAX_D_POINTER = 21,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE = 22,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER = 23,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER = 24,
    CUBLASLT_MATMUL_DESC_FAST_ACCUM = 25,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
    CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31,
    CUBLASLT_MATMUL_DESC_B_SCALE_MODE = 32,
    CUBLASLT_MATMUL_DESC_C_SCALE_MODE = 33,
    CUBLASLT_MATMUL_DESC_D_SCALE_MODE = 34,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE = 35,
    CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER = 36,
    CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE = 37,
    CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR = 38,
};

enum : uint32_t {
    CUBLASLT_MATRIX_LAYOUT_TYPE = 0,
    CUBLASLT_MATRIX_LAYOUT_ORDER = 1,
    CUBLASLT_MATRIX_LAYOUT_ROWS = 2,
    CUBLASLT_MATRIX_LAYOUT_COLS = 3,
    CUBLASLT_MATRIX_LAYOUT_LD = 4,
    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,
    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,
    CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET = 7,
    CUBLASLT_MATRIX_LAYOUT_BATCH_MODE = 8,
};

enum : uint32_t {
    CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
    CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT = 9,
    CUBLASLT_MATMUL_PREF_IMPL_MASK = 12,
};

// Values of the attributes the emulator interprets.
constexpr int32_t CUBLAS_OP_N = 0;
constexpr int32_t CUBLAS_OP_T = 1;
constexpr int32_t CUBLAS_OP_C = 2;
constexpr int32_t CUBLAS_FILL_MODE_FULL = 2;
constexpr int32_t CUBLASLT_POINTER_MODE_HOST = 0;
constexpr uint32_t CUBLASLT_EPILOGUE_DEFAULT = 1;
constexpr int32_t CUBLASLT_ORDER_COL = 0;
constexpr int32_t CUBLASLT_ORDER_COL32_2R_4R4 = 4;  // the last order cuBLASLt defines
constexpr uint32_t CUBLASLT_SEARCH_BEST_FIT = 0;
constexpr uint32_t CUBLASLT_REDUCTION_SCHEME_MASK = 7;

struct AttributeSpec {
    uint32_t id;
    uint32_t size;  // bytes of the value; Set/Get must pass exactly this many
    const char *name;
};

template <size_t N>
struct AttributeTable {
    AttributeSpec specs[N];
    const AttributeSpec *find(uint32_t id) const {
        for (const AttributeSpec &spec : specs) {
            if (spec.id == id) return &spec;
        }
        return nullptr;
    }
};

constexpr AttributeTable<33> kMatmulDescAttributes{{
    {CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, 4, "CUBLASLT_MATMUL_DESC_COMPUTE_TYPE"},
    {CUBLASLT_MATMUL_DESC_SCALE_TYPE, 4, "CUBLASLT_MATMUL_DESC_SCALE_TYPE"},
    {CUBLASLT_MATMUL_DESC_POINTER_MODE, 4, "CUBLASLT_MATMUL_DESC_POINTER_MODE"},
    {CUBLASLT_MATMUL_DESC_TRANSA, 4, "CUBLASLT_MATMUL_DESC_TRANSA"},
    {CUBLASLT_MATMUL_DESC_TRANSB, 4, "CUBLASLT_MATMUL_DESC_TRANSB"},
    {CUBLASLT_MATMUL_DESC_TRANSC, 4, "CUBLASLT_MATMUL_DESC_TRANSC"},
    {CUBLASLT_MATMUL_DESC_FILL_MODE, 4, "CUBLASLT_MATMUL_DESC_FILL_MODE"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE, 4, "CUBLASLT_MATMUL_DESC_EPILOGUE"},
    {CUBLASLT_MATMUL_DESC_BIAS_POINTER, 8, "CUBLASLT_MATMUL_DESC_BIAS_POINTER"},
    {CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, 8, "CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, 8, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, 8, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, 8,
     "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE"},
    {CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE, 8,
     "CUBLASLT_MATMUL_DESC_ALPHA_VECTOR_BATCH_STRIDE"},
    {CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, 4, "CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET"},
    {CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, 8, "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, 8, "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_C_SCALE_POINTER, 8, "CUBLASLT_MATMUL_DESC_C_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, 8, "CUBLASLT_MATMUL_DESC_D_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, 8, "CUBLASLT_MATMUL_DESC_AMAX_D_POINTER"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, 4, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER, 8,
     "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER, 8,
     "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_AMAX_POINTER"},
    {CUBLASLT_MATMUL_DESC_FAST_ACCUM, 1, "CUBLASLT_MATMUL_DESC_FAST_ACCUM"},
    {CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, 4, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE"},
    {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, 4, "CUBLASLT_MATMUL_DESC_A_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_B_SCALE_MODE, 4, "CUBLASLT_MATMUL_DESC_B_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_C_SCALE_MODE, 4, "CUBLASLT_MATMUL_DESC_C_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_D_SCALE_MODE, 4, "CUBLASLT_MATMUL_DESC_D_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE, 4,
     "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER, 8, "CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER"},
    {CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE, 4, "CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE"},
    {CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR, 8, "CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR"},
}};

constexpr AttributeTable<9> kLayoutAttributes{{
    {CUBLASLT_MATRIX_LAYOUT_TYPE, 4, "CUBLASLT_MATRIX_LAYOUT_TYPE"},
    {CUBLASLT_MATRIX_LAYOUT_ORDER, 4, "CUBLASLT_MATRIX_LAYOUT_ORDER"},
    {CUBLASLT_MATRIX_LAYOUT_ROWS, 8, "CUBLASLT_MATRIX_LAYOUT_ROWS"},
    {CUBLASLT_MATRIX_LAYOUT_COLS, 8, "CUBLASLT_MATRIX_LAYOUT_COLS"},
    {CUBLASLT_MATRIX_LAYOUT_LD, 8, "CUBLASLT_MATRIX_LAYOUT_LD"},
    {CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 4, "CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT"},
    {CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, 8, "CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET"},
    {CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, 8, "CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET"},
    {CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, 4, "CUBLASLT_MATRIX_LAYOUT_BATCH_MODE"},
}};

constexpr AttributeTable<9> kPreferenceAttributes{{
    {CUBLASLT_MATMUL_PREF_SEARCH_MODE, 4, "CUBLASLT_MATMUL_PREF_SEARCH_MODE"},
    {CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, 8, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"},
    {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, 4, "CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK"},
    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, 4, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES"},
    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, 4, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES"},
    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, 4, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES"},
    {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, 4, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES"},
    {CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT, 4, "CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT"},
    {CUBLASLT_MATMUL_PREF_IMPL_MASK, 8, "CUBLASLT_MATMUL_PREF_IMPL_MASK"},
}};

// Attribute values of one descriptor, indexed by attribute number; each value sits in the low
// bytes of its word (little-endian), as Set wrote it.
constexpr uint32_t kAttributeSlots = 40;

struct AttributeValues {
    uint64_t raw[kAttributeSlots] = {};

    template <typename T>
    T get(uint32_t id) const {
        static_assert(sizeof(T) <= sizeof(uint64_t), "attribute values fit a word");
        T value;
        std::memcpy(&value, &raw[id], sizeof value);
        return value;
    }
    template <typename T>
    void put(uint32_t id, T value) {
        static_assert(sizeof(T) <= sizeof(uint64_t), "attribute values fit a word");
        raw[id] = 0;
        std::memcpy(&raw[id], &value, sizeof value);
    }
};

// ------------------------------------------------------------------------------------------
// Error reporting
// ------------------------------------------------------------------------------------------

// Reports a message through the emulator (stderr and slEmuLastError). Never allocates, so it is
// safe anywhere, including in a worker that ran out of memory.
__attribute__((format(printf, 1, 0))) void report_v(const char *fmt, va_list args) {
    char message[512];
    std::vsnprintf(message, sizeof message, fmt, args);
    slEmuReportError(message);
}

__attribute__((format(printf, 1, 2))) void report(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    report_v(fmt, args);
    va_end(args);
}

// Reports and returns `status`, so that a refusal is one line: `return fail(STATUS, "...", ...)`.
__attribute__((format(printf, 2, 3))) cublasStatus_t fail(cublasStatus_t status, const char *fmt,
                                                          ...) {
    va_list args;
    va_start(args, fmt);
    report_v(fmt, args);
    va_end(args);
    return status;
}

const char *data_type_name(uint32_t type) {
    switch (type) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_8I: return "CUDA_R_8I";
    case CUDA_R_32I: return "CUDA_R_32I";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    case CUDA_R_8F_E4M3: return "CUDA_R_8F_E4M3";
    case CUDA_R_8F_E5M2: return "CUDA_R_8F_E5M2";
    default: return "another type";
    }
}

// ------------------------------------------------------------------------------------------
// Live objects
// ------------------------------------------------------------------------------------------

enum class ObjectKind { Handle, MatmulDesc, Layout, Preference };

// Every handle and descriptor is registered while it lives, so that a stale or foreign pointer is
// refused with a message instead of being dereferenced. The one mutex also serialises attribute
// reads and writes, which makes descriptors safe to share between threads.
//
// The containers are keyed with a hash type of this file (internal linkage), which keeps their
// template code internal too, so that the library exports nothing but the cuBLASLt API.
struct AddressHash {
    size_t operator()(const void *address) const {
        return std::hash<uintptr_t>()(reinterpret_cast<uintptr_t>(address));
    }
};

struct Registry {
    std::mutex mutex;
    std::unordered_map<const void *, ObjectKind, AddressHash> live;
    std::unordered_set<const void *, AddressHash> stubs_reported;  // names, by address
};

Registry &registry() {
    // Never destroyed: library calls may still arrive from other threads during process exit.
    static Registry *instance = new Registry;
    return *instance;
}

// Caller holds registry().mutex.
bool is_live(const void *object, ObjectKind kind) {
    if (object == nullptr) return false;
    auto found = registry().live.find(object);
    return found != registry().live.end() && found->second == kind;
}

const char *kind_name(ObjectKind kind) {
    switch (kind) {
    case ObjectKind::Handle: return "cuBLASLt handle";
    case ObjectKind::MatmulDesc: return "matmul descriptor";
    case ObjectKind::Layout: return "matrix layout";
    case ObjectKind::Preference: return "matmul preference";
    }
    return "object";
}

}  // namespace

// The objects themselves (the opaque types of the public handles).
struct cublasLtContext {
    static constexpr ObjectKind kKind = ObjectKind::Handle;
    // No other state: work goes to the stream given to each call.
};
struct cublasLtMatmulDescOpaque_t {
    static constexpr ObjectKind kKind = ObjectKind::MatmulDesc;
    AttributeValues attributes;
};
struct cublasLtMatrixLayoutOpaque_t {
    static constexpr ObjectKind kKind = ObjectKind::Layout;
    AttributeValues attributes;
};
struct cublasLtMatmulPreferenceOpaque_t {
    static constexpr ObjectKind kKind = ObjectKind::Preference;
    AttributeValues attributes;
};

namespace {

template <typename Object>
cublasStatus_t create_object(const char *function, Object **out, Object *object) {
    if (object == nullptr) {
        return fail(CUBLAS_STATUS_ALLOC_FAILED, "%s: out of host memory", function);
    }
    try {
        std::lock_guard<std::mutex> lock(registry().mutex);
        registry().live.emplace(object, Object::kKind);
    } catch (const std::exception &) {
        delete object;
        return fail(CUBLAS_STATUS_ALLOC_FAILED, "%s: out of host memory", function);
    }
    *out = object;
    return CUBLAS_STATUS_SUCCESS;
}

template <typename Object>
cublasStatus_t destroy_object(const char *function, Object *object) {
    if (object == nullptr) return CUBLAS_STATUS_SUCCESS;  // like free(NULL)
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        if (is_live(object, Object::kKind)) {
            registry().live.erase(object);
            delete object;
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return fail(CUBLAS_STATUS_INVALID_VALUE,
                "%s: %p is not a live %s (never created, or destroyed already)", function,
                static_cast<const void *>(object), kind_name(Object::kKind));
}

// Checks one attribute value before it is stored (e.g. a negative leading dimension).
typedef cublasStatus_t (*ValueCheck)(const char *function, const AttributeSpec &spec,
                                     const void *value);

cublasStatus_t accept_any_value(const char *, const AttributeSpec &, const void *) {
    return CUBLAS_STATUS_SUCCESS;
}

template <typename Object, size_t N>
cublasStatus_t set_attribute(const char *function, Object *object, const AttributeTable<N> &table,
                             uint32_t attribute, const void *buf, size_t size,
                             ValueCheck check = accept_any_value) {
    const AttributeSpec *spec = table.find(attribute);
    if (spec == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: unknown attribute %u", function, attribute);
    }
    if (buf == nullptr || size != spec->size) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: %s takes a %u-byte value, got %zu bytes at %p", function, spec->name,
                    spec->size, size, buf);
    }
    cublasStatus_t status = check(function, *spec, buf);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        if (is_live(object, Object::kKind)) {
            object->attributes.raw[spec->id] = 0;
            std::memcpy(&object->attributes.raw[spec->id], buf, spec->size);
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: %p is not a live %s", function,
                static_cast<const void *>(object), kind_name(Object::kKind));
}

// sizeInBytes == 0 asks for the size only (written to sizeWritten), as cuBLASLt documents.
template <typename Object, size_t N>
cublasStatus_t get_attribute(const char *function, const Object *object,
                             const AttributeTable<N> &table, uint32_t attribute, void *buf,
                             size_t size, size_t *size_written) {
    const AttributeSpec *spec = table.find(attribute);
    if (spec == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: unknown attribute %u", function, attribute);
    }
    if (size == 0 && size_written == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: %s: sizeInBytes is 0 and sizeWritten null",
                    function, spec->name);
    }
    if (size != 0 && (buf == nullptr || size != spec->size)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: %s has a %u-byte value, asked for %zu bytes at %p", function, spec->name,
                    spec->size, size, buf);
    }
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        if (is_live(object, Object::kKind)) {
            if (size != 0) std::memcpy(buf, &object->attributes.raw[spec->id], spec->size);
            if (size_written != nullptr) *size_written = spec->size;
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: %p is not a live %s", function,
                static_cast<const void *>(object), kind_name(Object::kKind));
}

cublasStatus_t check_layout_value(const char *function, const AttributeSpec &spec,
                                  const void *value) {
    if (spec.id == CUBLASLT_MATRIX_LAYOUT_LD) {
        int64_t ld;
        std::memcpy(&ld, value, sizeof ld);
        if (ld < 0) {
            return fail(CUBLAS_STATUS_INVALID_VALUE,
                        "%s: negative leading dimension %" PRId64 " (not supported by cuBLASLt)",
                        function, ld);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

// ------------------------------------------------------------------------------------------
// Validation of a product: descriptors → Problem
// ------------------------------------------------------------------------------------------

// One stored matrix as its layout describes it (before op).
struct Matrix {
    uint32_t type;
    uint64_t rows;
    uint64_t cols;
    int64_t ld;
};

// Everything the arithmetic needs besides pointers and scalars.
struct Problem {
    uint64_t m, n, k;
    bool trans_a, trans_b;
    Matrix a, b, c, d;
};

// Copies of the descriptors taken under the registry lock, so that validation and the product
// see one consistent state even if another thread changes or destroys them meanwhile.
struct Snapshot {
    AttributeValues desc;
    AttributeValues layout[4];  // A, B, C, D
    AttributeValues preference;
};

constexpr const char *kMatrixNames[4] = {"A", "B", "C", "D"};

size_t element_bytes(uint32_t type) { return type == CUDA_R_16BF ? 2 : 4; }

// Takes the snapshot, or reports which object is not live. `preference` may be absent (matmul).
cublasStatus_t take_snapshot(const char *function, cublasLtHandle_t handle,
                             cublasLtMatmulDesc_t desc, const cublasLtMatrixLayout_t layouts[4],
                             cublasLtMatmulPreference_t preference, bool with_preference,
                             Snapshot *out) {
    const char *missing = nullptr;  // what is not live, for the message
    const void *object = nullptr;
    cublasStatus_t status = CUBLAS_STATUS_INVALID_VALUE;
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        if (!is_live(handle, ObjectKind::Handle)) {
            missing = "the handle";
            object = handle;
            status = CUBLAS_STATUS_NOT_INITIALIZED;
        } else if (!is_live(desc, ObjectKind::MatmulDesc)) {
            missing = "the matmul descriptor";
            object = desc;
        } else if (with_preference && !is_live(preference, ObjectKind::Preference)) {
            missing = "the preference";
            object = preference;
        } else {
            static const char *const layout_names[4] = {"the layout of A", "the layout of B",
                                                        "the layout of C", "the layout of D"};
            for (int i = 0; i < 4 && missing == nullptr; ++i) {
                if (!is_live(layouts[i], ObjectKind::Layout)) {
                    missing = layout_names[i];
                    object = layouts[i];
                }
            }
        }
        if (missing == nullptr) {
            out->desc = desc->attributes;
            for (int i = 0; i < 4; ++i) out->layout[i] = layouts[i]->attributes;
            if (with_preference) out->preference = preference->attributes;
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return fail(status, "%s: %s (%p) is not live (never created, or destroyed already)", function,
                missing, object);
}

cublasStatus_t check_matmul_desc(const char *function, const AttributeValues &desc) {
    const uint32_t compute = desc.get<uint32_t>(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE);
    switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
    case CUBLAS_COMPUTE_32F_FAST_TF32:
        break;  // all computed in plain f32, which each of them allows
    default:
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: compute type %u is not emulated (only CUBLAS_COMPUTE_32F and its "
                    "_PEDANTIC and _FAST_* variants)",
                    function, compute);
    }
    const uint32_t scale = desc.get<uint32_t>(CUBLASLT_MATMUL_DESC_SCALE_TYPE);
    if (scale != CUDA_R_32F) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: scale type %u (%s) is not emulated (only CUDA_R_32F)", function, scale,
                    data_type_name(scale));
    }
    const int32_t pointer_mode = desc.get<int32_t>(CUBLASLT_MATMUL_DESC_POINTER_MODE);
    if (pointer_mode != CUBLASLT_POINTER_MODE_HOST) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: pointer mode %d is not emulated (only CUBLASLT_POINTER_MODE_HOST)",
                    function, pointer_mode);
    }
    const uint32_t trans_ids[2] = {CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB};
    for (int i = 0; i < 2; ++i) {
        const int32_t op = desc.get<int32_t>(trans_ids[i]);
        if (op == CUBLAS_OP_C) {
            return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                        "%s: TRANS%c = CUBLAS_OP_C is not emulated (only N and T)", function,
                        "AB"[i]);
        }
        if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) {
            return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: TRANS%c = %d is not an operation",
                        function, "AB"[i], op);
        }
    }
    const int32_t trans_c = desc.get<int32_t>(CUBLASLT_MATMUL_DESC_TRANSC);
    if (trans_c != CUBLAS_OP_N) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, "%s: TRANSC = %d is not supported (only N)",
                    function, trans_c);
    }
    const int32_t fill = desc.get<int32_t>(CUBLASLT_MATMUL_DESC_FILL_MODE);
    if (fill != CUBLAS_FILL_MODE_FULL) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: fill mode %d is not emulated (only CUBLAS_FILL_MODE_FULL)", function,
                    fill);
    }
    const uint32_t epilogue = desc.get<uint32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE);
    if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: epilogue %u is not emulated (only CUBLASLT_EPILOGUE_DEFAULT)", function,
                    epilogue);
    }
    // Bias and auxiliary pointers only matter to other epilogues, so they are ignored here as
    // cuBLASLt ignores them; the scaling attributes would change the result, so they are refused.
    const uint32_t refused_if_set[] = {
        CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,        CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_C_SCALE_POINTER,        CUBLASLT_MATMUL_DESC_D_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_AMAX_D_POINTER,         CUBLASLT_MATMUL_DESC_D_OUT_SCALE_POINTER,
        CUBLASLT_MATMUL_DESC_EMULATION_DESCRIPTOR,   CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_B_SCALE_MODE,           CUBLASLT_MATMUL_DESC_C_SCALE_MODE,
        CUBLASLT_MATMUL_DESC_D_SCALE_MODE,           CUBLASLT_MATMUL_DESC_D_OUT_SCALE_MODE,
    };
    for (uint32_t id : refused_if_set) {
        if (desc.raw[id] != 0) {
            return fail(CUBLAS_STATUS_NOT_SUPPORTED, "%s: %s is set, which is not emulated",
                        function, kMatmulDescAttributes.find(id)->name);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t read_layout(const char *function, const char *name, const AttributeValues &layout,
                           Matrix *out) {
    const uint32_t type = layout.get<uint32_t>(CUBLASLT_MATRIX_LAYOUT_TYPE);
    if (type != CUDA_R_16BF && type != CUDA_R_32F) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: %s has type %u (%s), not emulated (only CUDA_R_16BF and CUDA_R_32F)",
                    function, name, type, data_type_name(type));
    }
    const int32_t order = layout.get<int32_t>(CUBLASLT_MATRIX_LAYOUT_ORDER);
    if (order != CUBLASLT_ORDER_COL) {
        return fail(order > 0 && order <= CUBLASLT_ORDER_COL32_2R_4R4 ? CUBLAS_STATUS_NOT_SUPPORTED
                                                                     : CUBLAS_STATUS_INVALID_VALUE,
                    "%s: %s has order %d, not emulated (only CUBLASLT_ORDER_COL)", function, name,
                    order);
    }
    const int32_t batch = layout.get<int32_t>(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT);
    if (batch != 1) {
        return fail(batch > 1 ? CUBLAS_STATUS_NOT_SUPPORTED : CUBLAS_STATUS_INVALID_VALUE,
                    "%s: %s has batch count %d, not emulated (only 1)", function, name, batch);
    }
    if (layout.get<int64_t>(CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET) != 0) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: %s has a planar-complex plane offset, not emulated", function, name);
    }
    Matrix matrix{type, layout.get<uint64_t>(CUBLASLT_MATRIX_LAYOUT_ROWS),
                  layout.get<uint64_t>(CUBLASLT_MATRIX_LAYOUT_COLS),
                  layout.get<int64_t>(CUBLASLT_MATRIX_LAYOUT_LD)};
    // cuBLASLt supports dimensions that fit an int32; the limit also keeps offsets from
    // overflowing.
    if (matrix.rows > INT32_MAX || matrix.cols > INT32_MAX) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: %s is %" PRIu64 " x %" PRIu64 ", beyond the int32 dimensions emulated",
                    function, name, matrix.rows, matrix.cols);
    }
    if (matrix.ld < 0 || static_cast<uint64_t>(matrix.ld) < matrix.rows) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: %s has leading dimension %" PRId64 " below its %" PRIu64
                    " rows (column-major)",
                    function, name, matrix.ld, matrix.rows);
    }
    *out = matrix;
    return CUBLAS_STATUS_SUCCESS;
}

// Validates the descriptor and the four layouts together and derives m, n, k.
cublasStatus_t check_problem(const char *function, const Snapshot &snapshot, Problem *out) {
    cublasStatus_t status = check_matmul_desc(function, snapshot.desc);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    Matrix matrices[4];
    for (int i = 0; i < 4; ++i) {
        status = read_layout(function, kMatrixNames[i], snapshot.layout[i], &matrices[i]);
        if (status != CUBLAS_STATUS_SUCCESS) return status;
    }
    Problem p{};
    p.a = matrices[0];
    p.b = matrices[1];
    p.c = matrices[2];
    p.d = matrices[3];
    p.trans_a = snapshot.desc.get<int32_t>(CUBLASLT_MATMUL_DESC_TRANSA) == CUBLAS_OP_T;
    p.trans_b = snapshot.desc.get<int32_t>(CUBLASLT_MATMUL_DESC_TRANSB) == CUBLAS_OP_T;
    if (p.c.type != p.d.type) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: C is %s but D is %s; the emulator needs them of one type", function,
                    data_type_name(p.c.type), data_type_name(p.d.type));
    }
    p.m = p.d.rows;
    p.n = p.d.cols;
    const uint64_t a_rows = p.trans_a ? p.a.cols : p.a.rows;  // op(A) is a_rows x k
    p.k = p.trans_a ? p.a.rows : p.a.cols;
    const uint64_t b_rows = p.trans_b ? p.b.cols : p.b.rows;  // op(B) is b_rows x b_cols
    const uint64_t b_cols = p.trans_b ? p.b.rows : p.b.cols;
    if (a_rows != p.m || b_rows != p.k || b_cols != p.n || p.c.rows != p.m || p.c.cols != p.n) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: shapes do not agree: op(A) is %" PRIu64 " x %" PRIu64 ", op(B) %" PRIu64
                    " x %" PRIu64 ", C %" PRIu64 " x %" PRIu64 ", D %" PRIu64 " x %" PRIu64
                    " (TRANSA %c, TRANSB %c)",
                    function, a_rows, p.k, b_rows, b_cols, p.c.rows, p.c.cols, p.m, p.n,
                    p.trans_a ? 'T' : 'N', p.trans_b ? 'T' : 'N');
    }
    *out = p;
    return CUBLAS_STATUS_SUCCESS;
}

// The algorithm blob the heuristic hands out and the product recognises ("slEmuLt1").
constexpr uint64_t kAlgoMagic = 0x31744c756d456c73ull;

// ------------------------------------------------------------------------------------------
// The product on the CPU
// ------------------------------------------------------------------------------------------

float bf16_to_float(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
}

uint16_t float_to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN: keep it a (quiet) NaN
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return static_cast<uint16_t>(bits >> 16);
}

inline float widen(float value) { return value; }
inline float widen(uint16_t bf16) { return bf16_to_float(bf16); }

// Register block of the micro-kernel: kMr rows by kNr columns of D. Eight by six is twelve SSE
// accumulators (six AVX ones) plus the A column and a broadcast B value: it fits the sixteen
// vector registers of x86-64 without spilling.
constexpr size_t kMr = 8;
constexpr size_t kNr = 6;
// Cache block: a tile of D is at most kMc x kNc, computed in slices of kKc terms of the sum, so
// that the packed op(A) slice (kMc x kKc, 128 KiB) and op(B) slice (kKc x kNc, 96 KiB) stay in
// the L2 cache while one micro-panel of each sits in L1.
constexpr size_t kKc = 256;
constexpr size_t kMcMax = 128;
constexpr size_t kNcMax = 96;

// The micro-kernel's vectors are as wide as the target's registers (GCC lowers wider generic
// vectors through memory): 4 floats on baseline x86-64 (SSE), 8 when built with AVX.
#ifdef __AVX__
constexpr size_t kLanes = 8;
#else
constexpr size_t kLanes = 4;
#endif
constexpr size_t kVectorsPerColumn = kMr / kLanes;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

size_t round_up(size_t value, size_t step) { return (value + step - 1) / step * step; }

// Packs op(A)[i0 .. i0+rows, l0 .. l0+kc] into micro-panels of kMr rows, each stored l-major
// (kMr consecutive values per l), rows past the tile zero-filled:
//   panel[(p * kc + l) * kMr + r] = op(A)[i0 + p * kMr + r, l0 + l].
template <typename T>
void pack_a(const T *a, size_t lda, bool trans, size_t i0, size_t rows, size_t l0, size_t kc,
            float *panel) {
    for (size_t p = 0; p * kMr < rows; ++p) {
        float *out = panel + p * kc * kMr;
        const size_t valid = std::min(kMr, rows - p * kMr);
        for (size_t r = 0; r < kMr; ++r) {
            const size_t i = i0 + p * kMr + r;
            if (r >= valid) {
                for (size_t l = 0; l < kc; ++l) out[l * kMr + r] = 0.0f;
            } else if (trans) {  // op(A)[i, l] = A[l, i]: contiguous in l
                const T *src = a + i * lda + l0;
                for (size_t l = 0; l < kc; ++l) out[l * kMr + r] = widen(src[l]);
            } else {  // op(A)[i, l] = A[i, l]: stride lda in l
                const T *src = a + l0 * lda + i;
                for (size_t l = 0; l < kc; ++l) out[l * kMr + r] = widen(src[l * lda]);
            }
        }
    }
}

// Packs op(B)[l0 .. l0+kc, j0 .. j0+cols] into micro-panels of kNr columns, l-major, columns past
// the tile zero-filled: panel[(q * kc + l) * kNr + c] = op(B)[l0 + l, j0 + q * kNr + c].
template <typename T>
void pack_b(const T *b, size_t ldb, bool trans, size_t j0, size_t cols, size_t l0, size_t kc,
            float *panel) {
    for (size_t q = 0; q * kNr < cols; ++q) {
        float *out = panel + q * kc * kNr;
        const size_t valid = std::min(kNr, cols - q * kNr);
        for (size_t c = 0; c < kNr; ++c) {
            const size_t j = j0 + q * kNr + c;
            if (c >= valid) {
                for (size_t l = 0; l < kc; ++l) out[l * kNr + c] = 0.0f;
            } else if (trans) {  // op(B)[l, j] = B[j, l]: stride ldb in l
                const T *src = b + l0 * ldb + j;
                for (size_t l = 0; l < kc; ++l) out[l * kNr + c] = widen(src[l * ldb]);
            } else {  // op(B)[l, j] = B[l, j]: contiguous in l
                const T *src = b + j * ldb + l0;
                for (size_t l = 0; l < kc; ++l) out[l * kNr + c] = widen(src[l]);
            }
        }
    }
}

// acc[kMr x kNr] (column-major, leading dimension ld) += the product of one packed A micro-panel
// and one packed B micro-panel over kc terms, each term added in increasing l to the element's
// single running sum (which starts at 0 when `first`). The kMr x kNr sums are independent, which
// hides the latency of the adds; the order of each one is fixed. The loops are unrolled so that
// the sums live in registers rather than in a stack array.
void micro_kernel(const float *a, const float *b, size_t kc, float *acc, size_t ld, bool first) {
    Vec sum[kNr][kVectorsPerColumn];
#pragma GCC unroll 6
    for (size_t c = 0; c < kNr; ++c) {
#pragma GCC unroll 2
        for (size_t v = 0; v < kVectorsPerColumn; ++v) {
            if (first) {
                sum[c][v] = Vec{};
            } else {
                std::memcpy(&sum[c][v], acc + c * ld + v * kLanes, sizeof(Vec));
            }
        }
    }
    for (size_t l = 0; l < kc; ++l) {
        Vec column[kVectorsPerColumn];
        std::memcpy(&column, a + l * kMr, sizeof column);
        const float *row = b + l * kNr;
#pragma GCC unroll 6
        for (size_t c = 0; c < kNr; ++c) {
#pragma GCC unroll 2
            for (size_t v = 0; v < kVectorsPerColumn; ++v) sum[c][v] += column[v] * row[c];
        }
    }
#pragma GCC unroll 6
    for (size_t c = 0; c < kNr; ++c) {
        std::memcpy(acc + c * ld, &sum[c], sizeof sum[c]);
    }
}

// A queued product: everything copied at the call, so it can run (or re-run from a graph) later.
struct MatmulOp {
    Problem p;
    uintptr_t a, b, c, d;  // device addresses (host addresses in the emulator)
    float alpha, beta;
    bool has_product;  // k > 0 and alpha != 0
    bool reads_c;      // beta != 0
    size_t tile_rows, tile_cols, tiles_m, tiles_n;
};

struct Extent {
    uintptr_t begin;
    size_t bytes;
};

// The bytes a column-major matrix addresses: its last element is at (cols-1)*ld + rows-1.
bool matrix_extent(const Matrix &matrix, uintptr_t base, Extent *out) {
    out->begin = base;
    out->bytes = 0;
    if (matrix.rows == 0 || matrix.cols == 0) return true;
    uint64_t elements;
    if (__builtin_mul_overflow(matrix.cols - 1, static_cast<uint64_t>(matrix.ld), &elements) ||
        __builtin_add_overflow(elements, matrix.rows, &elements) ||
        __builtin_mul_overflow(elements, element_bytes(matrix.type), &out->bytes)) {
        return false;
    }
    return true;
}

bool overlaps(const Extent &x, const Extent &y) {
    return x.bytes != 0 && y.bytes != 0 && x.begin < y.begin + y.bytes &&
           y.begin < x.begin + x.bytes;
}

// Scratch of one worker: packed slices of op(A) and op(B) and the f32 sums of one tile of D.
struct TileScratch {
    std::unique_ptr<float[]> a_panel, b_panel, sums;
};

template <typename T>
void pack_a_slice(const MatmulOp &op, size_t i0, size_t rows, size_t l0, size_t kc, float *out) {
    pack_a(reinterpret_cast<const T *>(op.a), static_cast<size_t>(op.p.a.ld), op.p.trans_a, i0,
           rows, l0, kc, out);
}

template <typename T>
void pack_b_slice(const MatmulOp &op, size_t j0, size_t cols, size_t l0, size_t kc, float *out) {
    pack_b(reinterpret_cast<const T *>(op.b), static_cast<size_t>(op.p.b.ld), op.p.trans_b, j0,
           cols, l0, kc, out);
}

// D[i0.., j0..] = alpha · sums + beta · C, converted to D's type. C is read before D is written,
// element by element, so C == D (in place) is safe.
template <typename T>
void store_tile(const MatmulOp &op, size_t i0, size_t rows, size_t j0, size_t cols,
                const float *sums, size_t ld_sums) {
    const T *c = reinterpret_cast<const T *>(op.c);
    T *d = reinterpret_cast<T *>(op.d);
    const size_t ldc = static_cast<size_t>(op.p.c.ld), ldd = static_cast<size_t>(op.p.d.ld);
    for (size_t jj = 0; jj < cols; ++jj) {
        const size_t j = j0 + jj;
        for (size_t ii = 0; ii < rows; ++ii) {
            const size_t i = i0 + ii;
            float value = 0.0f;
            if (op.has_product) {
                value = op.alpha * sums[jj * ld_sums + ii];
                if (op.reads_c) value += op.beta * widen(c[i + j * ldc]);
            } else if (op.reads_c) {
                value = op.beta * widen(c[i + j * ldc]);
            }
            if constexpr (sizeof(T) == 2) {
                d[i + j * ldd] = float_to_bf16(value);
            } else {
                d[i + j * ldd] = value;
            }
        }
    }
}

void compute_tile(const MatmulOp &op, size_t tile, TileScratch &scratch) {
    const size_t ti = tile % op.tiles_m, tj = tile / op.tiles_m;
    const size_t i0 = ti * op.tile_rows, j0 = tj * op.tile_cols;
    const size_t rows = std::min<size_t>(op.tile_rows, op.p.m - i0);
    const size_t cols = std::min<size_t>(op.tile_cols, op.p.n - j0);
    const size_t rows_padded = round_up(rows, kMr), cols_padded = round_up(cols, kNr);
    if (op.has_product) {
        for (size_t l0 = 0; l0 < op.p.k; l0 += kKc) {
            const size_t kc = std::min<size_t>(kKc, op.p.k - l0);
            float *a_panel = scratch.a_panel.get(), *b_panel = scratch.b_panel.get();
            if (op.p.a.type == CUDA_R_16BF) {
                pack_a_slice<uint16_t>(op, i0, rows, l0, kc, a_panel);
            } else {
                pack_a_slice<float>(op, i0, rows, l0, kc, a_panel);
            }
            if (op.p.b.type == CUDA_R_16BF) {
                pack_b_slice<uint16_t>(op, j0, cols, l0, kc, b_panel);
            } else {
                pack_b_slice<float>(op, j0, cols, l0, kc, b_panel);
            }
            for (size_t q = 0; q < cols_padded / kNr; ++q) {
                for (size_t p = 0; p < rows_padded / kMr; ++p) {
                    micro_kernel(a_panel + p * kc * kMr, b_panel + q * kc * kNr, kc,
                                 scratch.sums.get() + q * kNr * rows_padded + p * kMr,
                                 rows_padded, l0 == 0);
                }
            }
        }
    }
    if (op.p.d.type == CUDA_R_16BF) {
        store_tile<uint16_t>(op, i0, rows, j0, cols, scratch.sums.get(), rows_padded);
    } else {
        store_tile<float>(op, i0, rows, j0, cols, scratch.sums.get(), rows_padded);
    }
}

struct ParallelRun {
    const MatmulOp *op;
    std::atomic<bool> out_of_memory{false};
};

// slEmuParallelFor body: tiles [begin, end) of D. Tiles are disjoint, so workers share nothing
// but the read-only inputs.
void run_tiles(void *context, size_t begin, size_t end) {
    ParallelRun &run = *static_cast<ParallelRun *>(context);
    const MatmulOp &op = *run.op;
    try {
        TileScratch scratch;
        const size_t kc = std::min<size_t>(kKc, op.p.k);
        if (op.has_product) {
            scratch.a_panel.reset(new float[op.tile_rows * kc]);
            scratch.b_panel.reset(new float[op.tile_cols * kc]);
        }
        scratch.sums.reset(new float[op.tile_rows * op.tile_cols]);
        for (size_t tile = begin; tile < end; ++tile) compute_tile(op, tile, scratch);
    } catch (const std::exception &) {
        run.out_of_memory = true;
    }
}

// Runs a queued product (on the stream's turn, or at every graph replay).
CUresult run_matmul(void *data) {
    const MatmulOp &op = *static_cast<const MatmulOp *>(data);
    // The buffers were live when the product was queued; a graph may be replayed after one was
    // freed, which on a GPU is a fault: report it rather than touch freed memory.
    const struct {
        const char *name;
        const Matrix &matrix;
        uintptr_t base;
        bool used;
    } operands[4] = {{"A", op.p.a, op.a, op.has_product},
                     {"B", op.p.b, op.b, op.has_product},
                     {"C", op.p.c, op.c, op.reads_c},
                     {"D", op.p.d, op.d, true}};
    for (const auto &operand : operands) {
        Extent extent;
        if (!operand.used || !matrix_extent(operand.matrix, operand.base, &extent) ||
            extent.bytes == 0) {
            continue;
        }
        if (!slEmuIsDeviceRange(static_cast<CUdeviceptr>(extent.begin), extent.bytes)) {
            report("cublasLtMatmul: %s (%zu bytes at 0x%" PRIxPTR
                   ") is no longer inside a live device allocation when the product runs",
                   operand.name, extent.bytes, extent.begin);
            return CUDA_ERROR_ILLEGAL_ADDRESS;
        }
    }
    ParallelRun run;
    run.op = &op;
    slEmuParallelFor(op.tiles_m * op.tiles_n, run_tiles, &run);
    if (run.out_of_memory) {
        report("cublasLtMatmul: out of host memory for scratch");
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    return CUDA_SUCCESS;
}

void drop_matmul(void *data) { delete static_cast<MatmulOp *>(data); }

// Tile size of D: the cache block, shrunk for small products so that there are enough tiles to
// keep the emulator's workers busy (a tile is the unit of parallel work).
void choose_tiles(MatmulOp *op) {
    static const size_t workers = std::max(1u, std::thread::hardware_concurrency());
    const size_t wanted = 4 * workers;
    const size_t min_rows = 4 * kMr, min_cols = 4 * kNr;
    size_t rows = kMcMax, cols = kNcMax;
    while (((op->p.m + rows - 1) / rows) * ((op->p.n + cols - 1) / cols) < wanted) {
        if (rows > min_rows && (rows >= cols || cols <= min_cols)) {
            rows /= 2;
        } else if (cols > min_cols) {
            cols /= 2;
        } else {
            break;
        }
    }
    // A tile never needs to be larger than the (padded) matrix.
    op->tile_rows = std::min(rows, round_up(op->p.m, kMr));
    op->tile_cols = std::min(cols, round_up(op->p.n, kNr));
    op->tiles_m = (op->p.m + op->tile_rows - 1) / op->tile_rows;
    op->tiles_n = (op->p.n + op->tile_cols - 1) / op->tile_cols;
}

// Checks that a matrix's pointer is usable for the bytes its layout addresses.
cublasStatus_t check_operand(const char *name, const Matrix &matrix, const void *pointer,
                             Extent *extent) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(pointer);
    if (!matrix_extent(matrix, base, extent)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "cublasLtMatmul: the extent of %s (%" PRIu64 " x %" PRIu64 ", ld %" PRId64
                    ") overflows",
                    name, matrix.rows, matrix.cols, matrix.ld);
    }
    if (extent->bytes == 0) return CUBLAS_STATUS_SUCCESS;  // an empty matrix is not read
    if (pointer == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmul: %s is a null pointer", name);
    }
    if (base % element_bytes(matrix.type) != 0) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "cublasLtMatmul: %s (%p) is not aligned to its %zu-byte %s elements", name,
                    pointer, element_bytes(matrix.type), data_type_name(matrix.type));
    }
    uintptr_t end;
    if (__builtin_add_overflow(base, extent->bytes, &end) ||
        !slEmuIsDeviceRange(static_cast<CUdeviceptr>(base), extent->bytes)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "cublasLtMatmul: %s (%" PRIu64 " x %" PRIu64 " %s, ld %" PRId64
                    ") addresses %zu bytes at %p, which do not lie inside one live device "
                    "allocation",
                    name, matrix.rows, matrix.cols, data_type_name(matrix.type), matrix.ld,
                    extent->bytes, pointer);
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Library information
// ------------------------------------------------------------------------------------------

// cuBLAS 13.1.0, built for CUDA 13.0 (the versions cudarc's cuda-13000 feature expects).
namespace {
constexpr int kVersionMajor = 13, kVersionMinor = 1, kVersionPatch = 0;
}

SL_EXPORT size_t cublasLtGetVersion(void) {
    return kVersionMajor * 10000 + kVersionMinor * 100 + kVersionPatch;
}

SL_EXPORT size_t cublasLtGetCudartVersion(void) { return 13000; }

SL_EXPORT cublasStatus_t cublasLtGetProperty(libraryPropertyType_t type, int *value) {
    if (value == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtGetProperty: value is null");
    }
    switch (type) {
    case MAJOR_VERSION: *value = kVersionMajor; return CUBLAS_STATUS_SUCCESS;
    case MINOR_VERSION: *value = kVersionMinor; return CUBLAS_STATUS_SUCCESS;
    case PATCH_LEVEL: *value = kVersionPatch; return CUBLAS_STATUS_SUCCESS;
    }
    return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtGetProperty: unknown property %u",
                static_cast<unsigned>(type));
}

SL_EXPORT const char *cublasLtGetStatusName(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

SL_EXPORT const char *cublasLtGetStatusString(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "the functionality requested requires a license";
    }
    return "unknown cuBLAS status";
}

// ------------------------------------------------------------------------------------------
// Handle and descriptors
// ------------------------------------------------------------------------------------------

SL_EXPORT cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    if (handle == nullptr) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtCreate: null output");
    return create_object("cublasLtCreate", handle, new (std::nothrow) cublasLtContext);
}

SL_EXPORT cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        if (is_live(handle, ObjectKind::Handle)) {
            registry().live.erase(handle);
            delete handle;
            return CUBLAS_STATUS_SUCCESS;
        }
    }
    return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasLtDestroy: %p is not a live cuBLASLt handle",
                static_cast<const void *>(handle));
}

SL_EXPORT cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc,
                                                  cublasComputeType_t compute_type,
                                                  cudaDataType_t scale_type) {
    if (desc == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulDescCreate: null output");
    }
    cublasLtMatmulDescOpaque_t *object = new (std::nothrow) cublasLtMatmulDescOpaque_t;
    if (object != nullptr) {
        AttributeValues &values = object->attributes;
        values.put<uint32_t>(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, compute_type);
        values.put<uint32_t>(CUBLASLT_MATMUL_DESC_SCALE_TYPE, scale_type);
        values.put<int32_t>(CUBLASLT_MATMUL_DESC_FILL_MODE, CUBLAS_FILL_MODE_FULL);
        values.put<uint32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_DEFAULT);
        // -1: "the type of D" (cuBLASLt's documented defaults).
        values.put<int32_t>(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, -1);
        values.put<int32_t>(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, -1);
    }
    return create_object("cublasLtMatmulDescCreate", desc, object);
}

SL_EXPORT cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    return destroy_object("cublasLtMatmulDescDestroy", desc);
}

SL_EXPORT cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                        cublasLtMatmulDescAttributes_t attribute,
                                                        const void *buf, size_t size) {
    return set_attribute("cublasLtMatmulDescSetAttribute", desc, kMatmulDescAttributes, attribute,
                         buf, size);
}

SL_EXPORT cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t desc,
                                                        cublasLtMatmulDescAttributes_t attribute,
                                                        void *buf, size_t size,
                                                        size_t *size_written) {
    return get_attribute("cublasLtMatmulDescGetAttribute", desc, kMatmulDescAttributes, attribute,
                         buf, size, size_written);
}

SL_EXPORT cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout,
                                                    cudaDataType_t type, uint64_t rows,
                                                    uint64_t cols, int64_t ld) {
    if (layout == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatrixLayoutCreate: null output");
    }
    if (ld < 0 || static_cast<uint64_t>(ld) < rows) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "cublasLtMatrixLayoutCreate: leading dimension %" PRId64
                    " is below the %" PRIu64 " rows of a column-major matrix",
                    ld, rows);
    }
    cublasLtMatrixLayoutOpaque_t *object = new (std::nothrow) cublasLtMatrixLayoutOpaque_t;
    if (object != nullptr) {
        AttributeValues &values = object->attributes;
        values.put<uint32_t>(CUBLASLT_MATRIX_LAYOUT_TYPE, type);
        values.put<int32_t>(CUBLASLT_MATRIX_LAYOUT_ORDER, CUBLASLT_ORDER_COL);
        values.put<uint64_t>(CUBLASLT_MATRIX_LAYOUT_ROWS, rows);
        values.put<uint64_t>(CUBLASLT_MATRIX_LAYOUT_COLS, cols);
        values.put<int64_t>(CUBLASLT_MATRIX_LAYOUT_LD, ld);
        values.put<int32_t>(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, 1);
    }
    return create_object("cublasLtMatrixLayoutCreate", layout, object);
}

SL_EXPORT cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    return destroy_object("cublasLtMatrixLayoutDestroy", layout);
}

// Values are checked one by one here (a negative ld); whether rows, cols and ld agree is checked
// when the layout is used, since a caller may legitimately pass through an inconsistent state
// while setting them one at a time.
SL_EXPORT cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                          cublasLtMatrixLayoutAttribute_t attribute,
                                                          const void *buf, size_t size) {
    return set_attribute("cublasLtMatrixLayoutSetAttribute", layout, kLayoutAttributes, attribute,
                         buf, size, check_layout_value);
}

SL_EXPORT cublasStatus_t cublasLtMatrixLayoutGetAttribute(cublasLtMatrixLayout_t layout,
                                                          cublasLtMatrixLayoutAttribute_t attribute,
                                                          void *buf, size_t size,
                                                          size_t *size_written) {
    return get_attribute("cublasLtMatrixLayoutGetAttribute", layout, kLayoutAttributes, attribute,
                         buf, size, size_written);
}

SL_EXPORT cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *preference) {
    if (preference == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmulPreferenceCreate: null output");
    }
    cublasLtMatmulPreferenceOpaque_t *object = new (std::nothrow) cublasLtMatmulPreferenceOpaque_t;
    if (object != nullptr) {
        AttributeValues &values = object->attributes;
        values.put<uint32_t>(CUBLASLT_MATMUL_PREF_SEARCH_MODE, CUBLASLT_SEARCH_BEST_FIT);
        values.put<uint32_t>(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                             CUBLASLT_REDUCTION_SCHEME_MASK);
        for (uint32_t id : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
            values.put<uint32_t>(id, 256);
        }
        values.put<uint64_t>(CUBLASLT_MATMUL_PREF_IMPL_MASK, ~0ull);
    }
    return create_object("cublasLtMatmulPreferenceCreate", preference, object);
}

SL_EXPORT cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t preference) {
    return destroy_object("cublasLtMatmulPreferenceDestroy", preference);
}

SL_EXPORT cublasStatus_t cublasLtMatmulPreferenceSetAttribute(
    cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute,
    const void *buf, size_t size) {
    return set_attribute("cublasLtMatmulPreferenceSetAttribute", preference,
                         kPreferenceAttributes, attribute, buf, size);
}

SL_EXPORT cublasStatus_t cublasLtMatmulPreferenceGetAttribute(
    cublasLtMatmulPreference_t preference, cublasLtMatmulPreferenceAttributes_t attribute,
    void *buf, size_t size, size_t *size_written) {
    return get_attribute("cublasLtMatmulPreferenceGetAttribute", preference,
                         kPreferenceAttributes, attribute, buf, size, size_written);
}

// ------------------------------------------------------------------------------------------
// Heuristic and product
// ------------------------------------------------------------------------------------------

// One algorithm: the CPU product above. It needs no workspace and only element alignment.
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_desc,
    cublasLtMatrixLayout_t b_desc, cublasLtMatrixLayout_t c_desc, cublasLtMatrixLayout_t d_desc,
    cublasLtMatmulPreference_t preference, int requested, cublasLtMatmulHeuristicResult_t *results,
    int *returned) {
    const char *function = "cublasLtMatmulAlgoGetHeuristic";
    if (returned != nullptr) *returned = 0;
    if (requested <= 0 || results == nullptr || returned == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: requestedAlgoCount %d, results %p, returnAlgoCount %p", function,
                    requested, static_cast<void *>(results), static_cast<void *>(returned));
    }
    const cublasLtMatrixLayout_t layouts[4] = {a_desc, b_desc, c_desc, d_desc};
    Snapshot snapshot;
    cublasStatus_t status =
        take_snapshot(function, handle, desc, layouts, preference, true, &snapshot);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    Problem problem;
    status = check_problem(function, snapshot, &problem);
    if (status != CUBLAS_STATUS_SUCCESS) return status;

    const AttributeValues &pref = snapshot.preference;
    const uint32_t search = pref.get<uint32_t>(CUBLASLT_MATMUL_PREF_SEARCH_MODE);
    if (search != CUBLASLT_SEARCH_BEST_FIT) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                    "%s: search mode %u is not emulated (only CUBLASLT_SEARCH_BEST_FIT)", function,
                    search);
    }
    const uint32_t alignment_ids[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    const Matrix *matrices[4] = {&problem.a, &problem.b, &problem.c, &problem.d};
    for (int i = 0; i < 4; ++i) {
        const uint32_t alignment = pref.get<uint32_t>(alignment_ids[i]);
        if (alignment < element_bytes(matrices[i]->type)) {
            return fail(CUBLAS_STATUS_NOT_SUPPORTED,
                        "%s: %s is promised only %u-byte alignment; the emulated algorithm needs "
                        "its %zu-byte elements aligned",
                        function, kMatrixNames[i], alignment, element_bytes(matrices[i]->type));
        }
    }
    // Workspace limits, waves, reduction and implementation masks cannot exclude the one
    // algorithm: it uses no workspace, no split-k reduction and reports one wave.

    cublasLtMatmulHeuristicResult_t &result = results[0];
    std::memset(&result, 0, sizeof result);
    result.algo.data[0] = kAlgoMagic;
    result.workspaceSize = 0;
    result.state = CUBLAS_STATUS_SUCCESS;
    result.wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

SL_EXPORT cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                        const void *alpha, const void *a,
                                        cublasLtMatrixLayout_t a_desc, const void *b,
                                        cublasLtMatrixLayout_t b_desc, const void *beta,
                                        const void *c, cublasLtMatrixLayout_t c_desc, void *d,
                                        cublasLtMatrixLayout_t d_desc,
                                        const cublasLtMatmulAlgo_t *algo, void *workspace,
                                        size_t workspace_bytes, CUstream stream) {
    const char *function = "cublasLtMatmul";
    // The workspace is not needed (the algorithm asks for none).
    (void)workspace;
    (void)workspace_bytes;
    const cublasLtMatrixLayout_t layouts[4] = {a_desc, b_desc, c_desc, d_desc};
    Snapshot snapshot;
    cublasStatus_t status =
        take_snapshot(function, handle, desc, layouts, nullptr, false, &snapshot);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    MatmulOp op{};
    status = check_problem(function, snapshot, &op.p);
    if (status != CUBLAS_STATUS_SUCCESS) return status;
    // A null algo asks cuBLASLt for its own heuristic choice, which is the same one algorithm.
    if (algo != nullptr && algo->data[0] != kAlgoMagic) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: the algo was not produced by this library's "
                    "cublasLtMatmulAlgoGetHeuristic",
                    function);
    }
    if (alpha == nullptr || beta == nullptr) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: alpha (%p) or beta (%p) is null", function,
                    alpha, beta);
    }
    // Host pointer mode: the scalars are read now, at the call, as cuBLAS does.
    std::memcpy(&op.alpha, alpha, sizeof op.alpha);
    std::memcpy(&op.beta, beta, sizeof op.beta);
    op.has_product = op.p.k > 0 && op.alpha != 0.0f;
    op.reads_c = op.beta != 0.0f;
    if (op.p.m == 0 || op.p.n == 0) return CUBLAS_STATUS_SUCCESS;  // D is empty: nothing to do

    // A and B are checked whenever the layouts address them (even if alpha is 0, which would be
    // a latent bug on a GPU), C only when it is read (beta != 0), D always.
    Extent a_extent{}, b_extent{}, c_extent{}, d_extent{};
    if (op.p.k > 0) {
        if ((status = check_operand("A", op.p.a, a, &a_extent)) != CUBLAS_STATUS_SUCCESS ||
            (status = check_operand("B", op.p.b, b, &b_extent)) != CUBLAS_STATUS_SUCCESS) {
            return status;
        }
    }
    if (op.reads_c) {
        if ((status = check_operand("C", op.p.c, c, &c_extent)) != CUBLAS_STATUS_SUCCESS) {
            return status;
        }
    }
    if ((status = check_operand("D", op.p.d, d, &d_extent)) != CUBLAS_STATUS_SUCCESS) return status;
    // Workers write D while others still read A, B and C: D may only coincide with C exactly (in
    // place, each element read before it is written), never overlap an input otherwise.
    if (overlaps(d_extent, a_extent) || overlaps(d_extent, b_extent)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "%s: D overlaps the input %c", function,
                    overlaps(d_extent, a_extent) ? 'A' : 'B');
    }
    if (overlaps(d_extent, c_extent) && (c != d || op.p.c.ld != op.p.d.ld)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE,
                    "%s: C and D overlap without being the same matrix (in place needs C == D "
                    "and equal leading dimensions)",
                    function);
    }
    op.a = reinterpret_cast<uintptr_t>(a);
    op.b = reinterpret_cast<uintptr_t>(b);
    op.c = reinterpret_cast<uintptr_t>(c);
    op.d = reinterpret_cast<uintptr_t>(d);
    choose_tiles(&op);

    MatmulOp *queued = new (std::nothrow) MatmulOp(op);
    if (queued == nullptr) {
        return fail(CUBLAS_STATUS_ALLOC_FAILED, "%s: out of host memory", function);
    }
    char what[128];
    std::snprintf(what, sizeof what, "cublasLtMatmul [%" PRIu64 ", %" PRIu64 "] x [%" PRIu64
                  ", %" PRIu64 "]", op.p.m, op.p.k, op.p.k, op.p.n);
    // The driver owns the operation from here on, and frees it with drop_matmul even when it
    // fails to queue it (or, on the legacy stream, runs it at once and it fails).
    const CUresult queued_status = slEmuEnqueue(stream, what, run_matmul, drop_matmul, queued);
    if (queued_status != CUDA_SUCCESS) {
        return fail(CUBLAS_STATUS_EXECUTION_FAILED,
                    "%s: the stream refused or failed the product (CUresult %d)", function,
                    static_cast<int>(queued_status));
    }
    return CUBLAS_STATUS_SUCCESS;
}

// ------------------------------------------------------------------------------------------
// Entry points cudarc declares that the emulator does not implement.
// ------------------------------------------------------------------------------------------

namespace {
// Declared without parameters: on x86-64 SysV the caller's arguments are simply ignored.
cublasStatus_t not_emulated(const char *function) {
    bool first = false;
    {
        std::lock_guard<std::mutex> lock(registry().mutex);
        try {
            first = registry().stubs_reported.insert(function).second;
        } catch (const std::exception &) {
            first = true;
        }
    }
    if (first) report("%s is not emulated", function);
    return CUBLAS_STATUS_NOT_SUPPORTED;
}
}  // namespace

SL_EXPORT cublasStatus_t cublasLtEmulationDescCreate() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtEmulationDescDestroy() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtEmulationDescGetAttribute() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtEmulationDescInit_internal() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtEmulationDescSetAttribute() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtGroupedMatrixLayoutCreate() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtGroupedMatrixLayoutInit_internal() {
    return not_emulated(__func__);
}
SL_EXPORT cublasStatus_t cublasLtHeuristicsCacheGetCapacity() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtHeuristicsCacheSetCapacity() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerForceDisable() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerOpenFile() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerSetCallback() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerSetFile() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerSetLevel() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtLoggerSetMask() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoCapGetAttribute() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoCheck() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoCheckForStream() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoConfigGetAttribute() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoConfigSetAttribute() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristicForStream() {
    return not_emulated(__func__);
}
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoGetIds() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulAlgoInit() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulDescInit_internal() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatmulPreferenceInit_internal() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatrixLayoutInit_internal() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatrixTransform() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatrixTransformDescCreate() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatrixTransformDescDestroy() { return not_emulated(__func__); }
SL_EXPORT cublasStatus_t cublasLtMatrixTransformDescGetAttribute() {
    return not_emulated(__func__);
}
SL_EXPORT cublasStatus_t cublasLtMatrixTransformDescInit_internal() {
    return not_emulated(__func__);
}
SL_EXPORT cublasStatus_t cublasLtMatrixTransformDescSetAttribute() {
    return not_emulated(__func__);
}

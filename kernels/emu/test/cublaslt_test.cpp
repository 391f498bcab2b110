// Test of the emulated cuBLASLt (kernels/emu/cublaslt.cpp): loads the built library with dlopen,
// as cudarc does, calls it through function types written from cudarc's cuda-13000 bindings, and
// checks every product against a double-precision reference. The emulated driver is replaced by
// a fake of the api.h functions defined here (exported from this executable with -rdynamic, so
// the library's undefined slEmu* symbols bind to them): enqueue runs the operation at once (or
// twice, as a graph replay; or later; or refuses it), parallel-for runs on a chosen number of
// std::threads, and device ranges are the buffers this test registers.

/* Build and run, from the repository root:

   I=.tools/cuda/lib/python3.11/site-packages/nvidia/cu13/include
   B=/tmp/sl-emu-cublaslt; mkdir -p $B
   F="-std=c++17 -O2 -Wall -Wextra -Werror -ffp-contract=off"
   g++ $F -fPIC -shared -fvisibility=hidden -I$I -Ikernels/emu kernels/emu/cublaslt.cpp \
       -Wl,-soname,libcublasLt.so.13 -o $B/libcublasLt.so.13
   g++ $F -I$I -Ikernels/emu kernels/emu/test/cublaslt_test.cpp -rdynamic -ldl -pthread \
       -o $B/cublaslt_test
   $B/cublaslt_test $B/libcublasLt.so.13

   and again with the sanitizers, the same three commands after
   F="$F -g -fsanitize=address,undefined -fno-sanitize-recover=all"

   `cublaslt_test LIB --bench` also times the model's [2176 x 256] x [256 x 768] product;
   SL_TEST_VERBOSE=1 prints every message the library reports. */

#include <cuda.h>

#include "api.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

// ------------------------------------------------------------------------------------------
// Fake of the emulated driver's extension API
// ------------------------------------------------------------------------------------------

namespace fake {

enum class Enqueue {
    RunNow,    // a stream that is idle: run, then drop
    RunTwice,  // a graph replayed twice, then destroyed
    Defer,     // kept in `deferred` until the test runs it
    Refuse,    // the queueing fails (e.g. a sticky error): drop is called, run is not
};

struct Deferred {
    CUresult (*run)(void *);
    void (*drop)(void *);
    void *data;
};

std::mutex mutex;
std::vector<std::pair<uintptr_t, size_t>> ranges;  // registered "device allocations"
std::string last_error;
int error_count = 0;
int enqueued = 0;
std::string last_what;
CUresult last_run_result = CUDA_SUCCESS;
Enqueue mode = Enqueue::RunNow;
std::vector<Deferred> deferred;
unsigned parallel_threads = 2;
bool verbose = false;

void add_range(const void *p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    ranges.emplace_back(reinterpret_cast<uintptr_t>(p), bytes);
}

void remove_range(const void *p) {
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < ranges.size(); ++i) {
        if (ranges[i].first == reinterpret_cast<uintptr_t>(p)) {
            ranges.erase(ranges.begin() + static_cast<long>(i));
            return;
        }
    }
}

}  // namespace fake

extern "C" CUresult slEmuEnqueue(CUstream, const char *what, CUresult (*run)(void *),
                                 void (*drop)(void *), void *data) {
    fake::Enqueue mode;
    {
        std::lock_guard<std::mutex> lock(fake::mutex);
        mode = fake::mode;
        if (mode != fake::Enqueue::Refuse) {
            ++fake::enqueued;
            fake::last_what = what;
        }
    }
    switch (mode) {
    case fake::Enqueue::Refuse:
        if (drop) drop(data);  // the driver owns the operation even when it refuses it
        return CUDA_ERROR_INVALID_HANDLE;
    case fake::Enqueue::Defer: {
        std::lock_guard<std::mutex> lock(fake::mutex);
        fake::deferred.push_back({run, drop, data});
        return CUDA_SUCCESS;
    }
    case fake::Enqueue::RunTwice: {
        CUresult first = run(data);
        CUresult second = run(data);
        {
            std::lock_guard<std::mutex> lock(fake::mutex);
            fake::last_run_result = first != CUDA_SUCCESS ? first : second;
        }
        if (drop) drop(data);
        return CUDA_SUCCESS;
    }
    case fake::Enqueue::RunNow: break;
    }
    CUresult result = run(data);
    {
        std::lock_guard<std::mutex> lock(fake::mutex);
        fake::last_run_result = result;
    }
    if (drop) drop(data);
    return CUDA_SUCCESS;
}

extern "C" void slEmuParallelFor(size_t n, void (*body)(void *ctx, size_t begin, size_t end),
                                 void *ctx) {
    const size_t parts = std::max<size_t>(1, std::min<size_t>(fake::parallel_threads, n));
    std::vector<std::thread> threads;
    for (size_t part = 1; part < parts; ++part) {
        threads.emplace_back(body, ctx, n * part / parts, n * (part + 1) / parts);
    }
    if (n > 0) body(ctx, 0, n / parts);
    for (std::thread &t : threads) t.join();
}

extern "C" int slEmuIsDeviceRange(CUdeviceptr ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(fake::mutex);
    for (const auto &range : fake::ranges) {
        if (ptr >= range.first && bytes <= range.second &&
            ptr - range.first <= range.second - bytes) {
            return 1;
        }
    }
    return 0;
}

extern "C" void slEmuReportError(const char *message) {
    std::lock_guard<std::mutex> lock(fake::mutex);
    fake::last_error = message;
    ++fake::error_count;
    if (fake::verbose) std::fprintf(stderr, "  [reported] %s\n", message);
}

extern "C" const char *slEmuLastError(void) {
    std::lock_guard<std::mutex> lock(fake::mutex);
    return fake::last_error.c_str();
}

// ------------------------------------------------------------------------------------------
// The library as cudarc sees it (cuda-13000 bindings)
// ------------------------------------------------------------------------------------------

namespace {

typedef uint32_t Status;
typedef void *Handle;
typedef void *Desc;
typedef void *Layout;
typedef void *Pref;
struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    size_t workspaceSize;
    Status state;
    float wavesCount;
    int reserved[4];
};

constexpr Status SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13,
                 NOT_SUPPORTED = 15;
constexpr uint32_t R_32F = 0, R_16F = 2, R_16BF = 14;
constexpr uint32_t COMPUTE_16F = 64, COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77;
constexpr int32_t OP_N = 0, OP_T = 1;
// Matmul descriptor attributes.
constexpr uint32_t DESC_COMPUTE_TYPE = 0, DESC_SCALE_TYPE = 1, DESC_POINTER_MODE = 2,
                   DESC_TRANSA = 3, DESC_TRANSB = 4, DESC_TRANSC = 5, DESC_EPILOGUE = 7,
                   DESC_BIAS_POINTER = 8, DESC_A_SCALE_POINTER = 17, DESC_FAST_ACCUM = 25;
// Layout attributes.
constexpr uint32_t LAYOUT_TYPE = 0, LAYOUT_ORDER = 1, LAYOUT_ROWS = 2, LAYOUT_LD = 4,
                   LAYOUT_BATCH_COUNT = 5;
// Preference attributes.
constexpr uint32_t PREF_SEARCH_MODE = 0, PREF_MAX_WORKSPACE_BYTES = 1,
                   PREF_MIN_ALIGNMENT_A_BYTES = 5, PREF_MIN_ALIGNMENT_B_BYTES = 6,
                   PREF_MIN_ALIGNMENT_C_BYTES = 7, PREF_MIN_ALIGNMENT_D_BYTES = 8;
constexpr uint32_t EPILOGUE_DEFAULT = 1, EPILOGUE_BIAS = 4;

struct Lt {
    void *library = nullptr;
    Status (*Create)(Handle *);
    Status (*Destroy)(Handle);
    size_t (*GetVersion)();
    size_t (*GetCudartVersion)();
    Status (*GetProperty)(uint32_t, int *);
    const char *(*GetStatusName)(Status);
    const char *(*GetStatusString)(Status);
    Status (*MatmulDescCreate)(Desc *, uint32_t, uint32_t);
    Status (*MatmulDescDestroy)(Desc);
    Status (*MatmulDescSetAttribute)(Desc, uint32_t, const void *, size_t);
    Status (*MatmulDescGetAttribute)(Desc, uint32_t, void *, size_t, size_t *);
    Status (*MatrixLayoutCreate)(Layout *, uint32_t, uint64_t, uint64_t, int64_t);
    Status (*MatrixLayoutDestroy)(Layout);
    Status (*MatrixLayoutSetAttribute)(Layout, uint32_t, const void *, size_t);
    Status (*MatrixLayoutGetAttribute)(Layout, uint32_t, void *, size_t, size_t *);
    Status (*MatmulPreferenceCreate)(Pref *);
    Status (*MatmulPreferenceDestroy)(Pref);
    Status (*MatmulPreferenceSetAttribute)(Pref, uint32_t, const void *, size_t);
    Status (*MatmulPreferenceGetAttribute)(Pref, uint32_t, void *, size_t, size_t *);
    Status (*MatmulAlgoGetHeuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Pref, int,
                                     HeuristicResult *, int *);
    Status (*Matmul)(Handle, Desc, const void *, const void *, Layout, const void *, Layout,
                     const void *, const void *, Layout, void *, Layout, const Algo *, void *,
                     size_t, CUstream);
    Status (*MatrixTransform)(Handle, void *, const void *, const void *, Layout, const void *,
                              const void *, Layout, void *, Layout, CUstream);
    Status (*MatmulAlgoGetIds)(Handle, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t,
                               int, int *, int *);
};

Lt lt;

// Every name cudarc's cuda-13000 bindings load (`load::<_F>("...")` in cublaslt/sys/mod.rs).
const char *const kCudarcNames[] = {
    "cublasLtCreate", "cublasLtDestroy", "cublasLtEmulationDescCreate",
    "cublasLtEmulationDescDestroy", "cublasLtEmulationDescGetAttribute",
    "cublasLtEmulationDescInit_internal", "cublasLtEmulationDescSetAttribute",
    "cublasLtGetCudartVersion", "cublasLtGetProperty", "cublasLtGetStatusName",
    "cublasLtGetStatusString", "cublasLtGetVersion", "cublasLtGroupedMatrixLayoutCreate",
    "cublasLtGroupedMatrixLayoutInit_internal", "cublasLtHeuristicsCacheGetCapacity",
    "cublasLtHeuristicsCacheSetCapacity", "cublasLtLoggerForceDisable", "cublasLtLoggerOpenFile",
    "cublasLtLoggerSetCallback", "cublasLtLoggerSetFile", "cublasLtLoggerSetLevel",
    "cublasLtLoggerSetMask", "cublasLtMatmul", "cublasLtMatmulAlgoCapGetAttribute",
    "cublasLtMatmulAlgoCheck", "cublasLtMatmulAlgoCheckForStream",
    "cublasLtMatmulAlgoConfigGetAttribute", "cublasLtMatmulAlgoConfigSetAttribute",
    "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmulAlgoGetHeuristicForStream",
    "cublasLtMatmulAlgoGetIds", "cublasLtMatmulAlgoInit", "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy", "cublasLtMatmulDescGetAttribute",
    "cublasLtMatmulDescInit_internal", "cublasLtMatmulDescSetAttribute",
    "cublasLtMatmulPreferenceCreate", "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceGetAttribute", "cublasLtMatmulPreferenceInit_internal",
    "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy", "cublasLtMatrixLayoutGetAttribute",
    "cublasLtMatrixLayoutInit_internal", "cublasLtMatrixLayoutSetAttribute",
    "cublasLtMatrixTransform", "cublasLtMatrixTransformDescCreate",
    "cublasLtMatrixTransformDescDestroy", "cublasLtMatrixTransformDescGetAttribute",
    "cublasLtMatrixTransformDescInit_internal", "cublasLtMatrixTransformDescSetAttribute",
};

// ------------------------------------------------------------------------------------------
// Test plumbing
// ------------------------------------------------------------------------------------------

std::atomic<int> failures{0};
std::atomic<int> checks{0};

__attribute__((format(printf, 3, 4))) void expect(bool ok, int line, const char *fmt, ...) {
    ++checks;
    if (ok) return;
    ++failures;
    std::fprintf(stderr, "FAIL (line %d): ", line);
    va_list args;
    va_start(args, fmt);
    std::vfprintf(stderr, fmt, args);
    va_end(args);
    std::fprintf(stderr, "\n");
    if (failures > 30) {
        std::fprintf(stderr, "too many failures\n");
        std::exit(1);
    }
}
#define EXPECT(cond, ...) expect((cond), __LINE__, __VA_ARGS__)

template <typename F>
void load(F &fn, const char *name) {
    fn = reinterpret_cast<F>(dlsym(lt.library, name));
    if (fn == nullptr) {
        std::fprintf(stderr, "missing symbol %s\n", name);
        std::exit(1);
    }
}

int errors_reported() {
    std::lock_guard<std::mutex> lock(fake::mutex);
    return fake::error_count;
}

std::string last_error() {
    std::lock_guard<std::mutex> lock(fake::mutex);
    return fake::last_error;
}

CUresult last_run_result() {
    std::lock_guard<std::mutex> lock(fake::mutex);
    return fake::last_run_result;
}

bool last_error_mentions(const char *text) { return last_error().find(text) != std::string::npos; }

// An independent f32 → bf16 rounding (remainder comparison rather than the library's add-and-
// truncate), round to nearest even, NaN kept NaN.
uint16_t to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);
    uint32_t upper = bits >> 16, remainder = bits & 0xffff;
    if (remainder > 0x8000 || (remainder == 0x8000 && (upper & 1))) ++upper;
    return static_cast<uint16_t>(upper);
}

float from_bf16(uint16_t bits) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof value);
    return value;
}

size_t type_bytes(uint32_t type) { return type == R_16BF ? 2 : 4; }

// Host memory registered as a device allocation with the fake.
struct DeviceBuffer {
    std::unique_ptr<unsigned char[]> bytes;
    size_t size = 0;
    explicit DeviceBuffer(size_t n) : bytes(new unsigned char[std::max<size_t>(n, 1)]), size(n) {
        std::memset(bytes.get(), 0, std::max<size_t>(n, 1));
        fake::add_range(bytes.get(), n);
    }
    ~DeviceBuffer() { fake::remove_range(bytes.get()); }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    void *data() { return bytes.get(); }
};

// A column-major matrix in a device buffer, elements of `type`.
struct DeviceMatrix {
    uint32_t type;
    uint64_t rows, cols;
    int64_t ld;
    std::unique_ptr<DeviceBuffer> buffer;

    DeviceMatrix(uint32_t t, uint64_t r, uint64_t c, int64_t l)
        : type(t), rows(r), cols(c), ld(l),
          buffer(new DeviceBuffer(static_cast<size_t>(std::max<int64_t>(l, 1)) *
                                  std::max<uint64_t>(c, 1) * type_bytes(t))) {}
    size_t slots() const { return buffer->size / type_bytes(type); }
    float get_slot(size_t slot) const {
        if (type == R_16BF) {
            uint16_t bits;
            std::memcpy(&bits, buffer->bytes.get() + 2 * slot, 2);
            return from_bf16(bits);
        }
        float v;
        std::memcpy(&v, buffer->bytes.get() + 4 * slot, 4);
        return v;
    }
    void set_slot(size_t slot, float v) {
        if (type == R_16BF) {
            uint16_t bits = to_bf16(v);
            std::memcpy(buffer->bytes.get() + 2 * slot, &bits, 2);
        } else {
            std::memcpy(buffer->bytes.get() + 4 * slot, &v, 4);
        }
    }
    float get(uint64_t i, uint64_t j) const { return get_slot(i + j * static_cast<size_t>(ld)); }
    void set(uint64_t i, uint64_t j, float v) { set_slot(i + j * static_cast<size_t>(ld), v); }
    void *data() { return buffer->data(); }
};

// Descriptors of one problem, destroyed at scope exit.
struct Descriptors {
    Desc desc = nullptr;
    Layout a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    Pref pref = nullptr;
    ~Descriptors() {
        if (a) lt.MatrixLayoutDestroy(a);
        if (b) lt.MatrixLayoutDestroy(b);
        if (c) lt.MatrixLayoutDestroy(c);
        if (d) lt.MatrixLayoutDestroy(d);
        if (pref) lt.MatmulPreferenceDestroy(pref);
        if (desc) lt.MatmulDescDestroy(desc);
    }
};

template <typename T>
Status set_desc(Desc desc, uint32_t attribute, T value) {
    return lt.MatmulDescSetAttribute(desc, attribute, &value, sizeof value);
}

template <typename T>
Status set_layout(Layout layout, uint32_t attribute, T value) {
    return lt.MatrixLayoutSetAttribute(layout, attribute, &value, sizeof value);
}

template <typename T>
Status set_pref(Pref pref, uint32_t attribute, T value) {
    return lt.MatmulPreferenceSetAttribute(pref, attribute, &value, sizeof value);
}

const CUstream kStream = reinterpret_cast<CUstream>(uintptr_t{0x5000});

// ------------------------------------------------------------------------------------------
// Random products against the reference
// ------------------------------------------------------------------------------------------

struct Case {
    uint64_t m, n, k;
    bool trans_a, trans_b;
    uint32_t a_type, b_type, out_type;
    int64_t pad_a, pad_b, pad_c, pad_d;  // leading dimension minus rows
    float alpha, beta;
    bool in_place;  // C is D
};

std::string describe(const Case &c) {
    char text[256];
    std::snprintf(text, sizeof text,
                  "m %" PRIu64 " n %" PRIu64 " k %" PRIu64 " op %c%c types %s/%s -> %s pads "
                  "%" PRId64 "/%" PRId64 "/%" PRId64 "/%" PRId64 " alpha %g beta %g%s",
                  c.m, c.n, c.k, c.trans_a ? 'T' : 'N', c.trans_b ? 'T' : 'N',
                  c.a_type == R_16BF ? "bf16" : "f32", c.b_type == R_16BF ? "bf16" : "f32",
                  c.out_type == R_16BF ? "bf16" : "f32", c.pad_a, c.pad_b, c.pad_c, c.pad_d,
                  static_cast<double>(c.alpha), static_cast<double>(c.beta),
                  c.in_place ? " in place" : "");
    return text;
}

// Runs one case through heuristic + matmul and returns D's buffer contents (for determinism
// comparisons); checks every element against the double reference.
std::vector<unsigned char> run_case(Handle handle, const Case &c, std::mt19937_64 &rng) {
    const uint64_t a_rows = c.trans_a ? c.k : c.m, a_cols = c.trans_a ? c.m : c.k;
    const uint64_t b_rows = c.trans_b ? c.n : c.k, b_cols = c.trans_b ? c.k : c.n;
    DeviceMatrix a(c.a_type, a_rows, a_cols, static_cast<int64_t>(a_rows) + c.pad_a);
    DeviceMatrix b(c.b_type, b_rows, b_cols, static_cast<int64_t>(b_rows) + c.pad_b);
    DeviceMatrix d(c.out_type, c.m, c.n, static_cast<int64_t>(c.m) + c.pad_d);
    std::unique_ptr<DeviceMatrix> separate_c;
    if (!c.in_place) {
        separate_c.reset(
            new DeviceMatrix(c.out_type, c.m, c.n, static_cast<int64_t>(c.m) + c.pad_c));
    }
    DeviceMatrix &cm = c.in_place ? d : *separate_c;
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // Every slot (padding included) of the inputs gets a value; padding of D a sentinel.
    for (size_t s = 0; s < a.slots(); ++s) a.set_slot(s, uniform(rng));
    for (size_t s = 0; s < b.slots(); ++s) b.set_slot(s, uniform(rng));
    const float sentinel = -1024.0f;  // exact in bf16 too
    for (size_t s = 0; s < d.slots(); ++s) d.set_slot(s, sentinel);
    // C: random when read; NaN when beta == 0 (it must not leak into D).
    for (uint64_t j = 0; j < c.n; ++j) {
        for (uint64_t i = 0; i < c.m; ++i) cm.set(i, j, c.beta == 0.0f ? nan : uniform(rng));
    }
    if (!c.in_place) {
        // D is fully overwritten: start it as NaN so an unwritten element shows.
        for (uint64_t j = 0; j < c.n; ++j) {
            for (uint64_t i = 0; i < c.m; ++i) d.set(i, j, nan);
        }
    }
    // Reference, in double, from the values as stored (bf16 already rounded).
    std::vector<double> reference(c.m * c.n), bound(c.m * c.n);
    for (uint64_t j = 0; j < c.n; ++j) {
        for (uint64_t i = 0; i < c.m; ++i) {
            double sum = 0.0, sum_abs = 0.0;
            for (uint64_t l = 0; l < c.k; ++l) {
                const double x = c.trans_a ? a.get(l, i) : a.get(i, l);
                const double y = c.trans_b ? b.get(j, l) : b.get(l, j);
                sum += x * y;
                sum_abs += std::fabs(x * y);
            }
            const double cv = c.beta == 0.0f ? 0.0 : static_cast<double>(cm.get(i, j));
            const double ref = c.alpha * sum + c.beta * cv;
            // f32 sequential accumulation of k terms, the alpha and beta products and the final
            // add: at most (k + 3) unit roundoffs of the magnitudes involved.
            double err = (static_cast<double>(c.k) + 3.0) * std::ldexp(1.0, -24) *
                         (std::fabs(c.alpha) * sum_abs + std::fabs(c.beta * cv));
            if (c.out_type == R_16BF) err += std::ldexp(1.0, -8) * (std::fabs(ref) + err);
            reference[i + j * c.m] = ref;
            bound[i + j * c.m] = err + 1e-30;
        }
    }

    Descriptors ds;
    EXPECT(lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F) == SUCCESS, "desc create");
    EXPECT(set_desc<int32_t>(ds.desc, DESC_TRANSA, c.trans_a ? OP_T : OP_N) == SUCCESS, "transa");
    EXPECT(set_desc<int32_t>(ds.desc, DESC_TRANSB, c.trans_b ? OP_T : OP_N) == SUCCESS, "transb");
    EXPECT(lt.MatrixLayoutCreate(&ds.a, a.type, a.rows, a.cols, a.ld) == SUCCESS, "layout A");
    EXPECT(lt.MatrixLayoutCreate(&ds.b, b.type, b.rows, b.cols, b.ld) == SUCCESS, "layout B");
    EXPECT(lt.MatrixLayoutCreate(&ds.c, cm.type, cm.rows, cm.cols, cm.ld) == SUCCESS, "layout C");
    EXPECT(lt.MatrixLayoutCreate(&ds.d, d.type, d.rows, d.cols, d.ld) == SUCCESS, "layout D");
    EXPECT(lt.MatmulPreferenceCreate(&ds.pref) == SUCCESS, "pref create");
    HeuristicResult result[2];
    int returned = -1;
    Status status = lt.MatmulAlgoGetHeuristic(handle, ds.desc, ds.a, ds.b, ds.c, ds.d, ds.pref, 2,
                                              result, &returned);
    EXPECT(status == SUCCESS && returned == 1 && result[0].state == SUCCESS,
           "heuristic %u returned %d (%s): %s", status, returned, describe(c).c_str(),
           last_error().c_str());
    status = lt.Matmul(handle, ds.desc, &c.alpha, a.data(), ds.a, b.data(), ds.b, &c.beta,
                       cm.data(), ds.c, d.data(), ds.d, &result[0].algo, nullptr, 0, kStream);
    EXPECT(status == SUCCESS, "matmul %u (%s): %s", status, describe(c).c_str(),
           last_error().c_str());
    EXPECT(last_run_result() == CUDA_SUCCESS, "run failed: %s", last_error().c_str());

    int bad = 0;
    for (uint64_t j = 0; j < c.n && bad < 3; ++j) {
        for (uint64_t i = 0; i < c.m && bad < 3; ++i) {
            const double got = d.get(i, j), ref = reference[i + j * c.m];
            const double err = std::fabs(got - ref);
            if (!(err <= bound[i + j * c.m])) {
                ++bad;
                EXPECT(false,
                       "D[%" PRIu64 ", %" PRIu64 "] = %.9g, reference %.9g, error %.3g > %.3g (%s)",
                       i, j, got, ref, err, bound[i + j * c.m], describe(c).c_str());
            }
        }
    }
    // Padding rows between D's columns are never written.
    for (uint64_t j = 0; j < c.n && bad < 3; ++j) {
        for (int64_t i = static_cast<int64_t>(c.m); i < d.ld; ++i) {
            if (d.get(static_cast<uint64_t>(i), j) != sentinel) {
                ++bad;
                EXPECT(false, "padding of D written at row %" PRId64 " col %" PRIu64 " (%s)", i, j,
                       describe(c).c_str());
                break;
            }
        }
    }
    const unsigned char *bytes = d.buffer->bytes.get();
    return std::vector<unsigned char>(bytes, bytes + d.buffer->size);
}

void test_random_products(Handle handle) {
    std::mt19937_64 rng(20260107);
    auto pick = [&](uint64_t lo, uint64_t hi) {
        return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
    };
    const float alphas[] = {1.0f, 0.5f, -1.25f};
    const float betas[] = {0.0f, 1.0f, 0.75f};
    int cases = 0;
    for (int round = 0; round < 160; ++round) {
        Case c{};
        // Mostly small, some up to ~300, with odd sizes and k = 1 (and k past one 256-term slice).
        auto dim = [&]() {
            switch (pick(0, 5)) {
            case 0: return pick(1, 9);
            case 1: return pick(10, 40);
            case 2: return pick(41, 140);
            default: return pick(1, 300);
            }
        };
        c.m = dim();
        c.n = dim();
        c.k = round % 7 == 0 ? 1 : (round % 11 == 0 ? pick(257, 600) : dim());
        c.trans_a = round & 1;
        c.trans_b = (round >> 1) & 1;
        c.a_type = pick(0, 1) ? R_16BF : R_32F;
        c.b_type = pick(0, 1) ? R_16BF : R_32F;
        c.out_type = pick(0, 1) ? R_16BF : R_32F;
        c.pad_a = pick(0, 2) == 0 ? static_cast<int64_t>(pick(1, 7)) : 0;
        c.pad_b = pick(0, 2) == 0 ? static_cast<int64_t>(pick(1, 7)) : 0;
        c.pad_c = pick(0, 2) == 0 ? static_cast<int64_t>(pick(1, 7)) : 0;
        c.pad_d = pick(0, 2) == 0 ? static_cast<int64_t>(pick(1, 7)) : 0;
        c.alpha = alphas[pick(0, 2)];
        c.beta = betas[pick(0, 2)];
        c.in_place = pick(0, 2) == 0;
        if (c.in_place) c.pad_c = c.pad_d;
        // Keep the double reference affordable.
        while (c.m * c.n * c.k > 12'000'000) c.k = std::max<uint64_t>(1, c.k / 2);
        run_case(handle, c, rng);
        ++cases;
    }
    std::printf("random products: %d cases\n", cases);
}

// The same product, the same bits, whatever the number of threads, the tiling (a block of rows
// computed alone), or a graph replay.
void test_determinism(Handle handle) {
    const Case c{123, 77, 301, true, false, R_16BF, R_16BF, R_32F, 3, 0, 0, 2, 1.0f, 1.0f, true};
    auto run_with = [&](unsigned threads, fake::Enqueue mode, const Case &problem) {
        std::mt19937_64 rng(99);  // the same inputs every time
        fake::parallel_threads = threads;
        fake::mode = mode;
        std::vector<unsigned char> result = run_case(handle, problem, rng);
        fake::parallel_threads = 2;
        fake::mode = fake::Enqueue::RunNow;
        return result;
    };
    const std::vector<unsigned char> one_thread = run_with(1, fake::Enqueue::RunNow, c);
    EXPECT(one_thread == run_with(2, fake::Enqueue::RunNow, c), "1 and 2 threads differ");
    EXPECT(one_thread == run_with(3, fake::Enqueue::RunNow, c), "1 and 3 threads differ");
    Case overwrite = c;
    overwrite.beta = 0.0f;  // a replay then recomputes the same D
    EXPECT(run_with(2, fake::Enqueue::RunNow, overwrite) ==
               run_with(2, fake::Enqueue::RunTwice, overwrite),
           "a replayed graph differs from one run");

    // Rows 5..17 of a 200-row product, computed as a 13-row product of their own (other tiles).
    const uint64_t m = 200, n = 50, k = 300, first = 5, rows = 13;
    DeviceMatrix a(R_32F, m, k, m), b(R_16BF, k, n, k);
    DeviceMatrix d(R_32F, m, n, m), part(R_32F, rows, n, rows);
    std::mt19937_64 rng(5);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (size_t i = 0; i < a.slots(); ++i) a.set_slot(i, uniform(rng));
    for (size_t i = 0; i < b.slots(); ++i) b.set_slot(i, uniform(rng));
    Descriptors whole, block;
    const float alpha = 0.75f, beta = 0.0f;
    for (Descriptors *ds : {&whole, &block}) {
        const uint64_t r = ds == &whole ? m : rows;
        lt.MatmulDescCreate(&ds->desc, COMPUTE_32F, R_32F);
        lt.MatrixLayoutCreate(&ds->a, R_32F, r, k, m);  // a block of A keeps A's ld
        lt.MatrixLayoutCreate(&ds->b, R_16BF, k, n, k);
        lt.MatrixLayoutCreate(&ds->d, R_32F, r, n, r);
    }
    EXPECT(lt.Matmul(handle, whole.desc, &alpha, a.data(), whole.a, b.data(), whole.b, &beta,
                     nullptr, whole.d, d.data(), whole.d, nullptr, nullptr, 0, kStream) == SUCCESS,
           "whole: %s", last_error().c_str());
    EXPECT(lt.Matmul(handle, block.desc, &alpha, static_cast<float *>(a.data()) + first, block.a,
                     b.data(), block.b, &beta, nullptr, block.d, part.data(), block.d, nullptr,
                     nullptr, 0, kStream) == SUCCESS,
           "block: %s", last_error().c_str());
    bool same = true;
    for (uint64_t j = 0; j < n; ++j) {
        for (uint64_t i = 0; i < rows; ++i) {
            const float x = d.get(first + i, j), y = part.get(i, j);
            same = same && std::memcmp(&x, &y, sizeof x) == 0;
        }
    }
    EXPECT(same, "a block of rows computed alone differs from the same rows of the whole");
    std::printf("determinism: checked\n");
}

// ------------------------------------------------------------------------------------------
// Exact rounding, NaN, alpha = 0, k = 0, m = 0
// ------------------------------------------------------------------------------------------

// Runs D = alpha · A · B + beta · C with f32 A (m x k), f32 B (k x n), out type `out`.
Status small_product(Handle handle, uint64_t m, uint64_t n, uint64_t k, const float *a_values,
                     const float *b_values, float alpha, float beta, uint32_t out,
                     DeviceMatrix &d) {
    DeviceMatrix a(R_32F, m, k, static_cast<int64_t>(m));
    DeviceMatrix b(R_32F, k, n, static_cast<int64_t>(k));
    for (uint64_t s = 0; s < m * k; ++s) a.set_slot(s, a_values[s]);
    for (uint64_t s = 0; s < k * n; ++s) b.set_slot(s, b_values[s]);
    Descriptors ds;
    lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F);
    lt.MatrixLayoutCreate(&ds.a, R_32F, m, k, static_cast<int64_t>(m));
    lt.MatrixLayoutCreate(&ds.b, R_32F, k, n, static_cast<int64_t>(k));
    lt.MatrixLayoutCreate(&ds.d, out, m, n, d.ld);
    return lt.Matmul(handle, ds.desc, &alpha, k ? a.data() : nullptr, ds.a, k ? b.data() : nullptr,
                     ds.b, &beta, d.data(), ds.d, d.data(), ds.d, nullptr, nullptr, 0, kStream);
}

void test_rounding_and_special_values(Handle handle) {
    // D = 1 · b through k = 1: the bf16 output is the rounding of b.
    const float inf = std::numeric_limits<float>::infinity();
    const float values[] = {1.0f + std::ldexp(1.0f, -8),       // tie: to even (1.0)
                            1.0f + 3 * std::ldexp(1.0f, -8),   // tie: to even (up)
                            1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20),  // above tie
                            -2.5f,
                            std::numeric_limits<float>::max(),  // rounds to inf
                            inf,
                            -inf,
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            -0.0f};
    const uint64_t n = sizeof values / sizeof values[0];
    const float one = 1.0f;
    DeviceMatrix d(R_16BF, 1, n, 1);
    EXPECT(small_product(handle, 1, n, 1, &one, values, 1.0f, 0.0f, R_16BF, d) == SUCCESS,
           "rounding product: %s", last_error().c_str());
    for (uint64_t j = 0; j < n; ++j) {
        uint16_t got;
        std::memcpy(&got, static_cast<unsigned char *>(d.data()) + 2 * j, 2);
        const uint16_t want = to_bf16(values[j] * 1.0f + 0.0f);
        if (std::isnan(values[j])) {
            EXPECT(std::isnan(from_bf16(got)), "NaN became %#x", got);
        } else {
            EXPECT(got == want, "bf16 of %.9g: got %#x want %#x", static_cast<double>(values[j]),
                   got, want);
        }
    }
    // Spot checks of the independent rounding itself.
    EXPECT(to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80, "tie to even (down)");
    EXPECT(to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82, "tie to even (up)");
    EXPECT(to_bf16(std::numeric_limits<float>::max()) == 0x7f80, "overflow to inf");

    // Exact arithmetic: multiples of 1/4 up to 4 in bf16, so that every product and partial sum
    // is exact in f32; D must equal the reference exactly (catches any inexact widening).
    {
        const uint64_t m = 33, n = 21, k = 300;
        DeviceMatrix a(R_16BF, k, m, k), b(R_16BF, k, n, k), d(R_32F, m, n, m);
        std::mt19937_64 rng(3);
        std::uniform_int_distribution<int> quarter(-16, 16);
        for (size_t s = 0; s < a.slots(); ++s) a.set_slot(s, quarter(rng) / 4.0f);
        for (size_t s = 0; s < b.slots(); ++s) b.set_slot(s, quarter(rng) / 4.0f);
        Descriptors ds;
        lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F);
        set_desc<int32_t>(ds.desc, DESC_TRANSA, OP_T);
        lt.MatrixLayoutCreate(&ds.a, R_16BF, k, m, k);
        lt.MatrixLayoutCreate(&ds.b, R_16BF, k, n, k);
        lt.MatrixLayoutCreate(&ds.d, R_32F, m, n, m);
        const float alpha = 1.0f, beta = 0.0f;
        EXPECT(lt.Matmul(handle, ds.desc, &alpha, a.data(), ds.a, b.data(), ds.b, &beta, nullptr,
                         ds.d, d.data(), ds.d, nullptr, nullptr, 0, kStream) == SUCCESS,
               "exact product: %s", last_error().c_str());
        int inexact = 0;
        for (uint64_t j = 0; j < n; ++j) {
            for (uint64_t i = 0; i < m; ++i) {
                double sum = 0.0;
                for (uint64_t l = 0; l < k; ++l) {
                    sum += static_cast<double>(a.get(l, i)) * b.get(l, j);
                }
                if (static_cast<double>(d.get(i, j)) != sum) ++inexact;
            }
        }
        EXPECT(inexact == 0, "%d elements of an exactly representable product differ", inexact);
    }
    // alpha = 0: the product is not formed, so NaN in A does not reach D; D = beta · C.
    {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        const float a_values[4] = {nan, nan, nan, nan}, b_values[4] = {1, 2, 3, 4};
        DeviceMatrix dd(R_32F, 2, 2, 2);
        for (size_t s = 0; s < 4; ++s) dd.set_slot(s, static_cast<float>(s) + 1.0f);
        EXPECT(small_product(handle, 2, 2, 2, a_values, b_values, 0.0f, 2.0f, R_32F, dd) == SUCCESS,
               "alpha 0 product");
        for (size_t s = 0; s < 4; ++s) {
            EXPECT(dd.get_slot(s) == 2.0f * (static_cast<float>(s) + 1.0f), "alpha 0: D[%zu] = %g",
                   s, static_cast<double>(dd.get_slot(s)));
        }
    }
    // k = 0: D = beta · C (in place), and with beta = 0, zeros.
    {
        DeviceMatrix dd(R_16BF, 3, 2, 4);
        for (size_t s = 0; s < dd.slots(); ++s) dd.set_slot(s, 3.0f);
        EXPECT(small_product(handle, 3, 2, 0, nullptr, nullptr, 1.0f, 0.5f, R_16BF, dd) == SUCCESS,
               "k 0 product: %s", last_error().c_str());
        EXPECT(dd.get(2, 1) == 1.5f && dd.get(0, 0) == 1.5f && dd.get(3, 0) == 3.0f,
               "k 0 with beta 0.5");
        EXPECT(small_product(handle, 3, 2, 0, nullptr, nullptr, 1.0f, 0.0f, R_16BF, dd) == SUCCESS,
               "k 0 product, beta 0");
        EXPECT(dd.get(2, 1) == 0.0f && dd.get(3, 1) == 3.0f, "k 0 with beta 0");
    }
    // m = 0: nothing is queued.
    {
        const int before = fake::enqueued;
        DeviceMatrix dd(R_32F, 1, 1, 1);
        Descriptors ds;
        lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F);
        lt.MatrixLayoutCreate(&ds.a, R_32F, 0, 5, 0);
        lt.MatrixLayoutCreate(&ds.b, R_32F, 5, 4, 5);
        lt.MatrixLayoutCreate(&ds.d, R_32F, 0, 4, 0);
        const float alpha = 1, beta = 0;
        EXPECT(lt.Matmul(handle, ds.desc, &alpha, nullptr, ds.a, dd.data(), ds.b, &beta, nullptr,
                         ds.d, nullptr, ds.d, nullptr, nullptr, 0, kStream) == SUCCESS,
               "m = 0: %s", last_error().c_str());
        EXPECT(fake::enqueued == before, "m = 0 queued work");
    }
}

// ------------------------------------------------------------------------------------------
// The calls src/cuda/blas.rs makes, exactly
// ------------------------------------------------------------------------------------------

// out[m, n] (+)= x[m, k] · w[n, k]ᵀ, row-major bf16 x and w, as blas.rs sets it up: A = w
// (k x n, ld k, TRANSA = T), B = x (k x m, ld k, TRANSB = N), C = D = out (n x m, ld n).
void blas_rs_product(Handle handle, uint64_t m, uint64_t n, uint64_t k, uint32_t out_type,
                     bool accumulate, std::mt19937_64 &rng, bool check_all) {
    const size_t workspace_bytes = 32u << 20;
    DeviceBuffer workspace(workspace_bytes);
    DeviceMatrix w(R_16BF, k, n, static_cast<int64_t>(k));
    DeviceMatrix x(R_16BF, k, m, static_cast<int64_t>(k));
    DeviceMatrix out(out_type, n, m, static_cast<int64_t>(n));
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (size_t s = 0; s < w.slots(); ++s) w.set_slot(s, uniform(rng));
    for (size_t s = 0; s < x.slots(); ++s) x.set_slot(s, uniform(rng));
    for (size_t s = 0; s < out.slots(); ++s) out.set_slot(s, uniform(rng));
    std::vector<float> before(out.slots());
    for (size_t s = 0; s < out.slots(); ++s) before[s] = out.get_slot(s);

    Descriptors ds;
    EXPECT(lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F) == SUCCESS, "desc");
    EXPECT(set_desc<int32_t>(ds.desc, DESC_TRANSA, OP_T) == SUCCESS, "TRANSA");
    EXPECT(set_desc<int32_t>(ds.desc, DESC_TRANSB, OP_N) == SUCCESS, "TRANSB");
    EXPECT(lt.MatrixLayoutCreate(&ds.a, R_16BF, k, n, static_cast<int64_t>(k)) == SUCCESS, "w");
    EXPECT(lt.MatrixLayoutCreate(&ds.b, R_16BF, k, m, static_cast<int64_t>(k)) == SUCCESS, "x");
    EXPECT(lt.MatrixLayoutCreate(&ds.d, out_type, n, m, static_cast<int64_t>(n)) == SUCCESS, "out");
    EXPECT(lt.MatmulPreferenceCreate(&ds.pref) == SUCCESS, "pref");
    EXPECT(set_pref<uint64_t>(ds.pref, PREF_MAX_WORKSPACE_BYTES, workspace_bytes) == SUCCESS, "ws");
    for (uint32_t attribute : {PREF_MIN_ALIGNMENT_A_BYTES, PREF_MIN_ALIGNMENT_B_BYTES,
                               PREF_MIN_ALIGNMENT_C_BYTES, PREF_MIN_ALIGNMENT_D_BYTES}) {
        EXPECT(set_pref<uint32_t>(ds.pref, attribute, 256) == SUCCESS, "alignment");
    }
    HeuristicResult heuristic;
    int count = 0;
    EXPECT(lt.MatmulAlgoGetHeuristic(handle, ds.desc, ds.a, ds.b, ds.d, ds.d, ds.pref, 1,
                                     &heuristic, &count) == SUCCESS &&
               count == 1 && heuristic.state == SUCCESS && heuristic.workspaceSize == 0 &&
               heuristic.wavesCount == 1.0f,
           "blas.rs heuristic: %s", last_error().c_str());
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    EXPECT(lt.Matmul(handle, ds.desc, &alpha, w.data(), ds.a, x.data(), ds.b, &beta, out.data(),
                     ds.d, out.data(), ds.d, &heuristic.algo, workspace.data(), workspace_bytes,
                     kStream) == SUCCESS,
           "blas.rs matmul: %s", last_error().c_str());
    char what[96];
    std::snprintf(what, sizeof what, "cublasLtMatmul [%" PRIu64 ", %" PRIu64 "] x [%" PRIu64
                  ", %" PRIu64 "]", n, k, k, m);
    EXPECT(fake::last_what == what, "operation named '%s'", fake::last_what.c_str());

    int bad = 0;
    const uint64_t step = check_all ? 1 : 97;  // the large case is sampled
    for (uint64_t e = 0; e < m * n && bad < 3; e += step) {
        const uint64_t i = e / n, j = e % n;  // out[i, j], row-major
        double sum = 0.0, sum_abs = 0.0;
        for (uint64_t l = 0; l < k; ++l) {
            const double p = static_cast<double>(x.get(l, i)) * w.get(l, j);
            sum += p;
            sum_abs += std::fabs(p);
        }
        const double c = accumulate ? before[j + i * n] : 0.0;
        const double ref = sum + c;
        double bound =
            (static_cast<double>(k) + 3) * std::ldexp(1.0, -24) * (sum_abs + std::fabs(c));
        if (out_type == R_16BF) bound += std::ldexp(1.0, -8) * (std::fabs(ref) + bound);
        const double got = out.get_slot(j + i * n);
        if (!(std::fabs(got - ref) <= bound)) {
            ++bad;
            EXPECT(false, "blas.rs out[%" PRIu64 ", %" PRIu64 "] = %.9g, reference %.9g (m %" PRIu64
                          " n %" PRIu64 " k %" PRIu64 " %s%s)",
                   i, j, got, ref, m, n, k, out_type == R_16BF ? "bf16" : "f32",
                   accumulate ? " accumulate" : "");
        }
    }
}

void test_blas_rs_calls(Handle handle) {
    std::mt19937_64 rng(7);
    for (uint32_t out_type : {R_32F, R_16BF}) {
        for (bool accumulate : {false, true}) {
            blas_rs_product(handle, 37, 50, 64, out_type, accumulate, rng, true);
            blas_rs_product(handle, 1, 768, 256, out_type, accumulate, rng, true);
            blas_rs_product(handle, 130, 9, 300, out_type, accumulate, rng, true);
        }
    }
    blas_rs_product(handle, 2176, 768, 256, R_32F, true, rng, false);
    blas_rs_product(handle, 2176, 768, 256, R_16BF, false, rng, false);
    std::printf("blas.rs calls: checked\n");
}

// ------------------------------------------------------------------------------------------
// Refusals
// ------------------------------------------------------------------------------------------

// A valid bf16 problem D[m x n] = A[m x k] · B[k x n] with all buffers, to be broken one way at
// a time.
struct Setup {
    DeviceMatrix a{R_16BF, 8, 16, 8}, b{R_16BF, 16, 4, 16}, d{R_32F, 8, 4, 8};
    Descriptors ds;
    float alpha = 1.0f, beta = 0.0f;
    Setup() {
        lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F);
        lt.MatrixLayoutCreate(&ds.a, R_16BF, 8, 16, 8);
        lt.MatrixLayoutCreate(&ds.b, R_16BF, 16, 4, 16);
        lt.MatrixLayoutCreate(&ds.c, R_32F, 8, 4, 8);
        lt.MatrixLayoutCreate(&ds.d, R_32F, 8, 4, 8);
        lt.MatmulPreferenceCreate(&ds.pref);
    }
    Status matmul(Handle handle, const void *a_ptr, const void *b_ptr, const void *c_ptr,
                  void *d_ptr, const Algo *algo = nullptr) {
        return lt.Matmul(handle, ds.desc, &alpha, a_ptr, ds.a, b_ptr, ds.b, &beta, c_ptr, ds.c,
                         d_ptr, ds.d, algo, nullptr, 0, kStream);
    }
    Status matmul(Handle handle) { return matmul(handle, a.data(), b.data(), d.data(), d.data()); }
    Status heuristic(Handle handle, int *count) {
        HeuristicResult result;
        return lt.MatmulAlgoGetHeuristic(handle, ds.desc, ds.a, ds.b, ds.c, ds.d, ds.pref, 1,
                                         &result, count);
    }
};

// Expects `status` and a newly reported message containing `text`.
void expect_refused(Status status, Status want, int errors_before, const char *text, int line) {
    expect(status == want, line, "status %u, want %u (last message: %s)", status, want,
           last_error().c_str());
    expect(errors_reported() > errors_before && last_error_mentions(text), line,
           "message should mention '%s', got '%s'", text, last_error().c_str());
}
#define EXPECT_REFUSED(call, want, text)                                                          \
    do {                                                                                          \
        const int errors_before_ = errors_reported();                                             \
        expect_refused((call), (want), errors_before_, (text), __LINE__);                         \
    } while (0)

void test_refusals(Handle handle) {
    {
        Setup s;
        EXPECT(s.matmul(handle) == SUCCESS, "the valid setup runs: %s", last_error().c_str());
        int count = -1;
        EXPECT(s.heuristic(handle, &count) == SUCCESS && count == 1, "valid heuristic");
    }
    // Unsupported type: f16 A.
    {
        Setup s;
        EXPECT(set_layout<uint32_t>(s.ds.a, LAYOUT_TYPE, R_16F) == SUCCESS, "set type");
        int count = -1;
        EXPECT_REFUSED(s.heuristic(handle, &count), NOT_SUPPORTED, "CUDA_R_16F");
        EXPECT(count == 0, "no algorithm for f16");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "CUDA_R_16F");
    }
    // C and D of different types.
    {
        Setup s;
        EXPECT(set_layout<uint32_t>(s.ds.c, LAYOUT_TYPE, R_16BF) == SUCCESS, "set type");
        int count = -1;
        EXPECT_REFUSED(s.heuristic(handle, &count), NOT_SUPPORTED, "C is CUDA_R_16BF");
    }
    // Compute, scale, pointer mode, epilogue, transposes, scaling pointers.
    {
        Setup s;
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_COMPUTE_TYPE, COMPUTE_16F) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "compute type 64");
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_COMPUTE_TYPE, COMPUTE_32F_FAST_TF32) == SUCCESS,
               "set");
        EXPECT(s.matmul(handle) == SUCCESS, "FAST_TF32 is accepted");
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_SCALE_TYPE, R_16BF) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "scale type");
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_SCALE_TYPE, R_32F) == SUCCESS, "set");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_POINTER_MODE, 1) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "pointer mode");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_POINTER_MODE, 0) == SUCCESS, "set");
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_EPILOGUE, EPILOGUE_BIAS) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "epilogue 4");
        EXPECT(set_desc<uint32_t>(s.ds.desc, DESC_EPILOGUE, EPILOGUE_DEFAULT) == SUCCESS, "set");
        // A bias pointer without a bias epilogue is ignored, as by cuBLASLt.
        EXPECT(set_desc<const void *>(s.ds.desc, DESC_BIAS_POINTER, s.a.data()) == SUCCESS, "set");
        EXPECT(s.matmul(handle) == SUCCESS, "bias pointer ignored: %s", last_error().c_str());
        EXPECT(set_desc<const void *>(s.ds.desc, DESC_A_SCALE_POINTER, s.a.data()) == SUCCESS,
               "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "A_SCALE_POINTER");
        EXPECT(set_desc<const void *>(s.ds.desc, DESC_A_SCALE_POINTER, nullptr) == SUCCESS, "set");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSA, 5) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), INVALID_VALUE, "TRANSA = 5");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSA, 2) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "CUBLAS_OP_C");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSA, OP_N) == SUCCESS, "set");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSC, OP_T) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "TRANSC");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSC, OP_N) == SUCCESS, "set");
        EXPECT(set_desc<int8_t>(s.ds.desc, DESC_FAST_ACCUM, 1) == SUCCESS, "fast accum is 1 byte");
        EXPECT(s.matmul(handle) == SUCCESS, "restored: %s", last_error().c_str());
    }
    // Layout order, batch, shapes, leading dimensions.
    {
        Setup s;
        EXPECT(set_layout<int32_t>(s.ds.b, LAYOUT_ORDER, 1) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "order 1");
        EXPECT(set_layout<int32_t>(s.ds.b, LAYOUT_ORDER, 0) == SUCCESS, "set");
        EXPECT(set_layout<int32_t>(s.ds.b, LAYOUT_BATCH_COUNT, 2) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), NOT_SUPPORTED, "batch count 2");
        EXPECT(set_layout<int32_t>(s.ds.b, LAYOUT_BATCH_COUNT, 1) == SUCCESS, "set");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSB, OP_T) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), INVALID_VALUE, "shapes do not agree");
        EXPECT(set_desc<int32_t>(s.ds.desc, DESC_TRANSB, OP_N) == SUCCESS, "set");
        EXPECT(set_layout<int64_t>(s.ds.a, LAYOUT_LD, 7) == SUCCESS, "ld set (checked on use)");
        EXPECT_REFUSED(s.matmul(handle), INVALID_VALUE, "leading dimension 7");
        EXPECT_REFUSED(set_layout<int64_t>(s.ds.a, LAYOUT_LD, -8), INVALID_VALUE, "negative");
        EXPECT(set_layout<int64_t>(s.ds.a, LAYOUT_LD, 8) == SUCCESS, "set");
        EXPECT(set_layout<uint64_t>(s.ds.a, LAYOUT_ROWS, 9) == SUCCESS, "set");
        EXPECT_REFUSED(s.matmul(handle), INVALID_VALUE, "below its 9 rows");
        Layout bad = nullptr;
        EXPECT_REFUSED(lt.MatrixLayoutCreate(&bad, R_16BF, 10, 3, 9), INVALID_VALUE,
                       "leading dimension 9");
        EXPECT(bad == nullptr, "no layout made");
    }
    // Pointers: null, misaligned, outside a registered buffer, overlapping.
    {
        Setup s;
        EXPECT_REFUSED(s.matmul(handle, nullptr, s.b.data(), s.d.data(), s.d.data()), INVALID_VALUE,
                       "A is a null pointer");
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), static_cast<char *>(s.b.data()) + 1,
                                s.d.data(), s.d.data()),
                       INVALID_VALUE, "not aligned");
        // B shifted by 2 elements: its last element lies past the registered buffer.
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), static_cast<char *>(s.b.data()) + 4,
                                s.d.data(), s.d.data()),
                       INVALID_VALUE, "live device allocation");
        float host_only[32] = {};
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), s.b.data(), host_only, host_only),
                       INVALID_VALUE, "D (8 x 4");
        // D inside A's buffer.
        DeviceBuffer shared(4096);
        EXPECT_REFUSED(s.matmul(handle, shared.data(), s.b.data(), nullptr,
                                static_cast<char *>(shared.data()) + 64),
                       INVALID_VALUE, "D overlaps the input A");
        // Beta = 0: C is not read, so a null C is fine; with beta != 0 it is not.
        EXPECT(s.matmul(handle, s.a.data(), s.b.data(), nullptr, s.d.data()) == SUCCESS,
               "null C with beta 0: %s", last_error().c_str());
        s.beta = 1.0f;
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), s.b.data(), nullptr, s.d.data()),
                       INVALID_VALUE, "C is a null pointer");
        // C overlapping D without being the same matrix.
        DeviceBuffer cd(4096);
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), s.b.data(), static_cast<char *>(cd.data()) + 8,
                                cd.data()),
                       INVALID_VALUE, "C and D overlap");
        EXPECT(s.matmul(handle, s.a.data(), s.b.data(), cd.data(), cd.data()) == SUCCESS,
               "in place: %s", last_error().c_str());
        // Null alpha.
        EXPECT_REFUSED(lt.Matmul(handle, s.ds.desc, nullptr, s.a.data(), s.ds.a, s.b.data(),
                                 s.ds.b, &s.beta, s.d.data(), s.ds.c, s.d.data(), s.ds.d, nullptr,
                                 nullptr, 0, kStream),
                       INVALID_VALUE, "alpha");
        // A foreign algorithm blob.
        Algo foreign{};
        foreign.data[0] = 42;
        EXPECT_REFUSED(s.matmul(handle, s.a.data(), s.b.data(), s.d.data(), s.d.data(), &foreign),
                       INVALID_VALUE, "algo");
    }
    // Dead objects.
    {
        Setup s;
        Layout dead = nullptr;
        lt.MatrixLayoutCreate(&dead, R_32F, 8, 4, 8);
        EXPECT(lt.MatrixLayoutDestroy(dead) == SUCCESS, "destroy");
        EXPECT_REFUSED(lt.MatrixLayoutDestroy(dead), INVALID_VALUE, "not a live matrix layout");
        EXPECT_REFUSED(lt.Matmul(handle, s.ds.desc, &s.alpha, s.a.data(), s.ds.a, s.b.data(),
                                 s.ds.b, &s.beta, s.d.data(), dead, s.d.data(), s.ds.d, nullptr,
                                 nullptr, 0, kStream),
                       INVALID_VALUE, "the layout of C");
        Handle gone = nullptr;
        lt.Create(&gone);
        lt.Destroy(gone);
        EXPECT_REFUSED(s.matmul(gone), NOT_INITIALIZED, "the handle");
        EXPECT_REFUSED(lt.Destroy(gone), NOT_INITIALIZED, "not a live cuBLASLt handle");
        int marker = 0;
        EXPECT_REFUSED(set_desc<int32_t>(&marker, DESC_TRANSA, OP_T), INVALID_VALUE,
                       "not a live matmul descriptor");
    }
    // Attribute sizes and queries.
    {
        Setup s;
        int64_t wide = 1;
        EXPECT_REFUSED(lt.MatmulDescSetAttribute(s.ds.desc, DESC_TRANSA, &wide, sizeof wide),
                       INVALID_VALUE, "4-byte value");
        EXPECT_REFUSED(lt.MatmulDescSetAttribute(s.ds.desc, 99, &wide, 4), INVALID_VALUE,
                       "unknown attribute 99");
        size_t written = 0;
        EXPECT(lt.MatrixLayoutGetAttribute(s.ds.a, LAYOUT_LD, nullptr, 0, &written) == SUCCESS &&
                   written == 8,
               "size query");
        int64_t ld = 0;
        EXPECT(lt.MatrixLayoutGetAttribute(s.ds.a, LAYOUT_LD, &ld, sizeof ld, &written) ==
                       SUCCESS &&
                   ld == 8,
               "ld read back");
        uint32_t epilogue = 0;
        EXPECT(lt.MatmulDescGetAttribute(s.ds.desc, DESC_EPILOGUE, &epilogue, 4, nullptr) ==
                       SUCCESS &&
                   epilogue == EPILOGUE_DEFAULT,
               "default epilogue");
        uint32_t alignment = 0;
        EXPECT(lt.MatmulPreferenceGetAttribute(s.ds.pref, PREF_MIN_ALIGNMENT_B_BYTES, &alignment, 4,
                                               &written) == SUCCESS &&
                   alignment == 256,
               "default alignment");
        EXPECT_REFUSED(lt.MatrixLayoutGetAttribute(s.ds.a, LAYOUT_LD, nullptr, 0, nullptr),
                       INVALID_VALUE, "sizeWritten null");
    }
    // Heuristic preferences and counts.
    {
        Setup s;
        EXPECT(set_pref<uint32_t>(s.ds.pref, PREF_MIN_ALIGNMENT_A_BYTES, 1) == SUCCESS, "set");
        int count = -1;
        EXPECT_REFUSED(s.heuristic(handle, &count), NOT_SUPPORTED, "1-byte alignment");
        EXPECT(count == 0, "no algorithm for 1-byte alignment");
        EXPECT(set_pref<uint32_t>(s.ds.pref, PREF_MIN_ALIGNMENT_A_BYTES, 2) == SUCCESS, "set");
        EXPECT(s.heuristic(handle, &count) == SUCCESS && count == 1, "2-byte alignment is enough");
        EXPECT(set_pref<uint32_t>(s.ds.pref, PREF_SEARCH_MODE, 1) == SUCCESS, "set");
        EXPECT_REFUSED(s.heuristic(handle, &count), NOT_SUPPORTED, "search mode 1");
        EXPECT(set_pref<uint32_t>(s.ds.pref, PREF_SEARCH_MODE, 0) == SUCCESS, "set");
        HeuristicResult results[3];
        std::memset(results, 0xab, sizeof results);
        EXPECT(lt.MatmulAlgoGetHeuristic(handle, s.ds.desc, s.ds.a, s.ds.b, s.ds.c, s.ds.d,
                                         s.ds.pref, 3, results, &count) == SUCCESS &&
                   count == 1 && results[0].state == SUCCESS,
               "three requested, one returned");
        EXPECT_REFUSED(lt.MatmulAlgoGetHeuristic(handle, s.ds.desc, s.ds.a, s.ds.b, s.ds.c, s.ds.d,
                                                 s.ds.pref, 0, results, &count),
                       INVALID_VALUE, "requestedAlgoCount 0");
        // The heuristic's algo is accepted by matmul.
        EXPECT(s.matmul(handle, s.a.data(), s.b.data(), s.d.data(), s.d.data(), &results[0].algo) ==
                   SUCCESS,
               "heuristic algo");
    }
    // The stream refuses the product: EXECUTION_FAILED, and the operation is freed (ASan).
    {
        Setup s;
        fake::mode = fake::Enqueue::Refuse;
        EXPECT_REFUSED(s.matmul(handle), EXECUTION_FAILED, "refused");
        fake::mode = fake::Enqueue::RunNow;
    }
    // A product queued, then a buffer freed before it runs: the run reports, nothing is touched.
    {
        Setup s;
        std::unique_ptr<DeviceMatrix> b(new DeviceMatrix(R_16BF, 16, 4, 16));
        fake::mode = fake::Enqueue::Defer;
        EXPECT(s.matmul(handle, s.a.data(), b->data(), s.d.data(), s.d.data()) == SUCCESS,
               "queued");
        fake::mode = fake::Enqueue::RunNow;
        fake::remove_range(b->data());  // "freed" (the host memory stays valid for ASan)
        const int before = errors_reported();
        EXPECT(fake::deferred.size() == 1, "one deferred");
        for (const fake::Deferred &op : fake::deferred) {
            EXPECT(op.run(op.data) == CUDA_ERROR_ILLEGAL_ADDRESS, "run of a freed B");
            op.drop(op.data);
        }
        fake::deferred.clear();
        EXPECT(errors_reported() > before && last_error_mentions("no longer inside"),
               "freed B reported: %s", last_error().c_str());
        fake::add_range(b->data(), b->buffer->size);  // so that its destructor's removal matches
    }
    // Stubs: NOT_SUPPORTED, reported once per name.
    {
        const int before = errors_reported();
        EXPECT(lt.MatrixTransform(handle, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, kStream) == NOT_SUPPORTED,
               "stub status");
        EXPECT(errors_reported() == before + 1 &&
                   last_error_mentions("cublasLtMatrixTransform is not emulated"),
               "stub message: %s", last_error().c_str());
        int ids[4], count = -1;
        EXPECT(lt.MatrixTransform(handle, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, kStream) == NOT_SUPPORTED &&
                   errors_reported() == before + 1,
               "stub reported once");
        EXPECT(lt.MatmulAlgoGetIds(handle, COMPUTE_32F, R_32F, R_16BF, R_16BF, R_32F, R_32F, 4, ids,
                                   &count) == NOT_SUPPORTED &&
                   last_error_mentions("cublasLtMatmulAlgoGetIds is not emulated"),
               "second stub");
        // Every stub answers (without arguments: the stubs ignore them).
        for (const char *name : kCudarcNames) {
            void *symbol = dlsym(lt.library, name);
            EXPECT(symbol != nullptr, "missing %s", name);
        }
        const char *stubs[] = {"cublasLtLoggerSetLevel", "cublasLtMatmulAlgoInit",
                               "cublasLtMatmulDescInit_internal",
                               "cublasLtHeuristicsCacheGetCapacity"};
        for (const char *name : stubs) {
            auto stub = reinterpret_cast<Status (*)()>(dlsym(lt.library, name));
            EXPECT(stub != nullptr && stub() == NOT_SUPPORTED, "stub %s", name);
        }
    }
    std::printf("refusals: checked\n");
}

void test_information() {
    EXPECT(lt.GetVersion() == 130100, "version %zu", lt.GetVersion());
    EXPECT(lt.GetCudartVersion() == 13000, "cudart version %zu", lt.GetCudartVersion());
    int major = 0, minor = -1, patch = -1;
    EXPECT(lt.GetProperty(0, &major) == SUCCESS && lt.GetProperty(1, &minor) == SUCCESS &&
               lt.GetProperty(2, &patch) == SUCCESS && major == 13 && minor == 1 && patch == 0,
           "properties %d.%d.%d", major, minor, patch);
    EXPECT(std::strcmp(lt.GetStatusName(NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED") == 0,
           "status name");
    EXPECT(std::strlen(lt.GetStatusString(INVALID_VALUE)) > 0, "status string");
    EXPECT(lt.GetStatusName(12345) != nullptr && lt.GetStatusString(12345) != nullptr,
           "unknown status");
}

// Several threads share the handle (and one descriptor set) while each also makes its own.
void test_threads(Handle handle) {
    std::atomic<int> bad{0};
    Setup shared;
    auto worker = [&](int seed) {
        std::mt19937_64 rng(static_cast<uint64_t>(seed));
        for (int round = 0; round < 12; ++round) {
            Case c{static_cast<uint64_t>(5 + seed * 3 + round), 17, 33, round % 2 == 1, false,
                   R_16BF, R_32F, R_16BF, 1, 0, 0, 0, 1.0f, 1.0f, true};
            const int before = failures.load();
            run_case(handle, c, rng);
            DeviceMatrix d(R_32F, 8, 4, 8);
            if (shared.matmul(handle, shared.a.data(), shared.b.data(), d.data(), d.data()) !=
                SUCCESS) {
                ++bad;
            }
            if (failures != before) ++bad;
        }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
    for (std::thread &t : threads) t.join();
    EXPECT(bad == 0, "%d failures with threads", bad.load());
    std::printf("threads: checked\n");
}

void benchmark(Handle handle) {
    const uint64_t m = 2176, n = 768, k = 256;
    fake::parallel_threads = std::max(1u, std::thread::hardware_concurrency());
    DeviceMatrix w(R_16BF, k, n, k), x(R_16BF, k, m, k), out(R_32F, n, m, n);
    Descriptors ds;
    lt.MatmulDescCreate(&ds.desc, COMPUTE_32F, R_32F);
    set_desc<int32_t>(ds.desc, DESC_TRANSA, OP_T);
    lt.MatrixLayoutCreate(&ds.a, R_16BF, k, n, k);
    lt.MatrixLayoutCreate(&ds.b, R_16BF, k, m, k);
    lt.MatrixLayoutCreate(&ds.d, R_32F, n, m, n);
    const float alpha = 1.0f, beta = 1.0f;
    auto once = [&] {
        lt.Matmul(handle, ds.desc, &alpha, w.data(), ds.a, x.data(), ds.b, &beta, out.data(), ds.d,
                  out.data(), ds.d, nullptr, nullptr, 0, kStream);
    };
    once();
    const int runs = 10;
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < runs; ++r) once();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / runs;
    std::printf("benchmark: [%" PRIu64 " x %" PRIu64 "] x [%" PRIu64 " x %" PRIu64
                "] bf16 -> f32 += on %u threads: %.2f ms, %.1f GFLOP/s\n",
                m, k, k, n, fake::parallel_threads, seconds * 1e3, 2.0 * m * n * k / seconds / 1e9);
    fake::parallel_threads = 2;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s path/to/libcublasLt.so.13 [--bench]\n", argv[0]);
        return 2;
    }
    fake::verbose = std::getenv("SL_TEST_VERBOSE") != nullptr;
    lt.library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lt.library == nullptr) {
        std::fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    load(lt.Create, "cublasLtCreate");
    load(lt.Destroy, "cublasLtDestroy");
    load(lt.GetVersion, "cublasLtGetVersion");
    load(lt.GetCudartVersion, "cublasLtGetCudartVersion");
    load(lt.GetProperty, "cublasLtGetProperty");
    load(lt.GetStatusName, "cublasLtGetStatusName");
    load(lt.GetStatusString, "cublasLtGetStatusString");
    load(lt.MatmulDescCreate, "cublasLtMatmulDescCreate");
    load(lt.MatmulDescDestroy, "cublasLtMatmulDescDestroy");
    load(lt.MatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute");
    load(lt.MatmulDescGetAttribute, "cublasLtMatmulDescGetAttribute");
    load(lt.MatrixLayoutCreate, "cublasLtMatrixLayoutCreate");
    load(lt.MatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy");
    load(lt.MatrixLayoutSetAttribute, "cublasLtMatrixLayoutSetAttribute");
    load(lt.MatrixLayoutGetAttribute, "cublasLtMatrixLayoutGetAttribute");
    load(lt.MatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate");
    load(lt.MatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy");
    load(lt.MatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
    load(lt.MatmulPreferenceGetAttribute, "cublasLtMatmulPreferenceGetAttribute");
    load(lt.MatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic");
    load(lt.Matmul, "cublasLtMatmul");
    load(lt.MatrixTransform, "cublasLtMatrixTransform");
    load(lt.MatmulAlgoGetIds, "cublasLtMatmulAlgoGetIds");

    Handle handle = nullptr;
    if (lt.Create(&handle) != SUCCESS || handle == nullptr) {
        std::fprintf(stderr, "cublasLtCreate failed\n");
        return 1;
    }
    test_information();
    test_random_products(handle);
    test_determinism(handle);
    test_rounding_and_special_values(handle);
    test_blas_rs_calls(handle);
    test_refusals(handle);
    test_threads(handle);
    if (argc > 2 && std::strcmp(argv[2], "--bench") == 0) benchmark(handle);
    EXPECT(lt.Destroy(handle) == SUCCESS, "destroy handle");
    // No dlclose: cudarc keeps the library loaded for the life of the process, and the library's
    // registry is deliberately never freed (calls may arrive during exit).

    std::printf("%d checks, %d failures\n", checks.load(), failures.load());
    if (failures == 0) std::printf("PASS\n");
    return failures == 0 ? 0 : 1;
}

// The emulator's kernel runtime as the emulated driver (driver.cpp) sees it: the registry of
// emulated kernels and a call that runs a whole grid. Kernel code never includes this file; the
// generated registration units (build.rs) and the driver do.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <type_traits>
#include <utility>

namespace sl_emu {

// One `extern "C" __global__` function of kernels/*.cu, compiled for the host.
struct KernelEntry {
    const char *name;             // its extern "C" name, as a module lists it
    const char *file;             // the kernel file, e.g. "attention.cu"
    unsigned max_threads;         // __launch_bounds__ maximum threads per block (0: none given)
    unsigned n_params;            // parameters of the kernel
    const size_t *param_sizes;    // their sizes in bytes (cuLaunchKernel copies that many)
    void (*invoke)(void *const *args);  // calls the kernel with *args[i] as parameter i
};

// Adds entries to the registry (static initialisers of the registration units call it).
void register_kernels(const KernelEntry *entries, size_t n);
// The registered kernel of that name, or null.
const KernelEntry *find_kernel(const char *name);

struct Dim3 {
    unsigned x, y, z;
};

// A kernel launch: grid and block shape, dynamic shared memory, and the parameter values.
struct GridLaunch {
    const KernelEntry *kernel;
    Dim3 grid;
    Dim3 block;
    size_t dynamic_shared;
    void *const *args;
};

// Runs every block of the launch (in parallel on the worker threads) and returns when all are
// done: true, or false with *error saying which kernel, block and thread failed and why (the
// remaining blocks are then skipped).
bool run_grid(const GridLaunch &launch, std::string *error);

// body(ctx, begin, end) over a partition of [0, n), on the worker threads.
void parallel_for(size_t n, void (*body)(void *ctx, size_t begin, size_t end), void *ctx);

// The registration units' helper: an entry for kernel `f` (its parameter types deduced).
template <class F, F f>
struct Invoker;

template <class... P, void (*f)(P...)>
struct Invoker<void (*)(P...), f> {
    static constexpr size_t sizes[sizeof...(P) + 1] = {sizeof(P)..., 0};
    template <size_t... I>
    static void call(void *const *args, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<P> *>(args[I])...);
    }
    static void invoke(void *const *args) { call(args, std::index_sequence_for<P...>{}); }
    static KernelEntry entry(const char *name, const char *file, unsigned max_threads) {
        return KernelEntry{name,  file, max_threads, static_cast<unsigned>(sizeof...(P)),
                           sizes, &invoke};
    }
};

}  // namespace sl_emu

// In a registration unit: SL_EMU_KERNEL(sl_embed, "support.cu", SL_ROW_THREADS).
#define SL_EMU_KERNEL(fn, file, max_threads) \
    ::sl_emu::Invoker<decltype(&fn), &fn>::entry(#fn, file, max_threads)

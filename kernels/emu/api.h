// Extension entry points of the emulated CUDA driver (libcuda.so.1), for the emulated
// cuBLASLt (libcublasLt.so.13) and for tools. They are not part of NVIDIA's driver API; a
// real driver does not export them, so code that calls them must look them up with dlsym and
// treat their absence as "not the emulated device".
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

// Queues `run(data)` on `stream` as one device operation, in stream order (or records it into
// the stream's graph while the stream is capturing; every replay then calls `run(data)`
// again). `drop(data)` (may be null) is called exactly once, when the operation can never run
// again: after it ran on a stream, when the graph that holds it is destroyed, or at once when
// the call fails (the caller must not free `data` itself). `what` names the
// operation in error messages (copied). `run` returns CUDA_SUCCESS, or an error code after
// reporting the problem with slEmuReportError; an error makes the context's error sticky, as a
// kernel fault does. Returns the queueing error (invalid stream, sticky error, capture rules).
CUresult slEmuEnqueue(CUstream stream, const char *what, CUresult (*run)(void *data),
                      void (*drop)(void *data), void *data);

// Calls body(ctx, begin, end) over a partition of [0, n) into contiguous ranges, on the
// emulator's worker threads, and returns when every range is done.
void slEmuParallelFor(size_t n, void (*body)(void *ctx, size_t begin, size_t end), void *ctx);

// 1 when [ptr, ptr + bytes) lies inside one live device allocation, else 0.
int slEmuIsDeviceRange(CUdeviceptr ptr, size_t bytes);

// Prints "sparse-lavida emulated device: <message>" on stderr and keeps it as the last error
// message (slEmuLastError).
void slEmuReportError(const char *message);

// The last message given to slEmuReportError (or reported by the emulator itself: a kernel
// fault, an unimplemented API function), or "" when there is none. Valid until the next error.
const char *slEmuLastError(void);

#ifdef __cplusplus
}
#endif

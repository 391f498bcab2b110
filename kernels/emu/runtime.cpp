// The emulator's kernel runtime: CUDA threads as fibers, blocks on worker threads, and the
// device instructions of device.h (barriers, warp collectives, cp.async, ldmatrix, mma).
//
// A block runs on one OS thread (a "worker"): each CUDA thread is a fiber with its own stack.
// A fiber runs until it reaches a synchronisation point; it then posts what it brings (its
// value for a shuffle, its address for ldmatrix, ...) and switches directly to the next ready
// fiber. The fiber that completes a rendezvous (the last lane of a warp collective, the last
// thread at a barrier) computes the result for every participant, marks them ready and goes
// on. When no fiber is ready the worker's own context (the "scheduler") regains control: either
// every thread has finished, or the block can never finish, which is reported as an error that
// lists where each thread waits.
//
// This library keeps no thread_local variables of its own (only the kernels' __shared__
// variables live in its TLS block, which is filled with garbage when a block starts): the
// per-OS-thread state is found through a pthread key.

#include "runtime.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "device.h"

#if defined(__SANITIZE_ADDRESS__)
#define SL_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define SL_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the emulator's fiber switch (runtime.cpp) is written for x86-64"
#endif

// ---------------------------------------------------------------------------------------------
// Fiber switch (x86-64 System V): saves the callee-saved registers on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is `next`. (MXCSR and
// the x87 control word are not switched: nothing in the emulator or the kernels changes them.) A new context starts in sl_emu_fiber_start with r12 = its argument,
// r13 = its entry function and r14 = its exit function (which never returns).
// ---------------------------------------------------------------------------------------------

extern "C" void sl_emu_switch(void **save, void *next);
extern "C" void sl_emu_fiber_start();

asm(R"(
    .text
    .globl sl_emu_switch
    .hidden sl_emu_switch
    .type sl_emu_switch, @function
sl_emu_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size sl_emu_switch, .-sl_emu_switch

    .globl sl_emu_fiber_start
    .hidden sl_emu_fiber_start
    .type sl_emu_fiber_start, @function
sl_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    movq %r12, %rdi
    callq *%r14
    ud2
    .cfi_endproc
    .size sl_emu_fiber_start, .-sl_emu_fiber_start
)");

// The one thread_local of the runtime: an anchor whose address makes the C library allocate
// this thread's TLS block of the library (see TlsBlock).
static __thread char tls_anchor;

namespace sl_emu {
namespace {

constexpr uint32_t kFullWarp = 0xffffffffu;
constexpr unsigned char kGarbage = 0xff;  // every f32/bf16 reads as NaN, every index as ~0

#if SL_EMU_ASAN
constexpr size_t kStackBytes = 1 << 20;
#else
constexpr size_t kStackBytes = 256 << 10;
#endif
constexpr size_t kGuardBytes = 4096;

// A misuse of the emulator itself (a bad setting, an intrinsic called outside a kernel, no
// memory for a stack): reported, then the process stops.
[[noreturn]] void die(const std::string &what) {
    fprintf(stderr, "sparse-lavida emulated device: %s\n", what.c_str());
    abort();
}

// --- Configuration (environment, read once) ---------------------------------------------------

struct Config {
    bool random_schedule = false;
    uint64_t seed = 0;
    unsigned workers = 1;
};

const Config &config() {
    static const Config cfg = [] {
        Config c;
        c.workers = std::max(1u, std::thread::hardware_concurrency());
        if (const char *w = getenv("SL_EMU_WORKERS"); w && *w) {
            char *end = nullptr;
            const unsigned long n = strtoul(w, &end, 10);
            if (*end != 0 || n == 0 || n > 1024) die(std::string("SL_EMU_WORKERS=") + w + ": expected 1..1024");
            c.workers = static_cast<unsigned>(n);
        }
        if (const char *s = getenv("SL_EMU_SCHEDULE"); s && *s && strcmp(s, "in-order") != 0) {
            if (strncmp(s, "random:", 7) != 0) {
                die(std::string("SL_EMU_SCHEDULE=") + s + ": expected in-order or random:SEED");
            }
            char *end = nullptr;
            c.seed = strtoull(s + 7, &end, 10);
            if (*end != 0 || end == s + 7) die(std::string("SL_EMU_SCHEDULE=") + s + ": SEED is not a number");
            c.random_schedule = true;
        }
        return c;
    }();
    return cfg;
}

// --- The kernel registry ----------------------------------------------------------------------

std::unordered_map<std::string, const KernelEntry *> &registry() {
    static std::unordered_map<std::string, const KernelEntry *> r;
    return r;
}

// --- Stacks -----------------------------------------------------------------------------------

struct Stack {
    unsigned char *lo = nullptr;  // lowest usable byte (above the guard page)
    size_t size = 0;
    bool dirty = false;  // abandoned mid-call (an error): its ASan shadow may be stale

    Stack() = default;
    Stack(const Stack &) = delete;  // owns its mapping
    Stack &operator=(const Stack &) = delete;

    void allocate() {
        void *p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) die("cannot map a fiber stack");
        mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
        lo = static_cast<unsigned char *>(p) + kGuardBytes;
        size = kStackBytes;
    }
    ~Stack() {
        if (lo) munmap(lo - kGuardBytes, size + kGuardBytes);
    }
    unsigned char *top() const { return lo + size; }
};

// --- Per-block state --------------------------------------------------------------------------

enum class State : uint8_t { Ready, Running, AtBarrier, AtWarp, Done };

enum class Coll : uint8_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Syncwarp, LdMatrix, LdMatrixT, Mma };

const char *coll_name(Coll c) {
    switch (c) {
        case Coll::Shfl: return "__shfl_sync";
        case Coll::ShflUp: return "__shfl_up_sync";
        case Coll::ShflDown: return "__shfl_down_sync";
        case Coll::ShflXor: return "__shfl_xor_sync";
        case Coll::Ballot: return "__ballot_sync";
        case Coll::Any: return "__any_sync";
        case Coll::All: return "__all_sync";
        case Coll::Syncwarp: return "__syncwarp";
        case Coll::LdMatrix: return "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
        case Coll::LdMatrixT: return "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
        case Coll::Mma: return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    }
    return "?";
}

const char *barrier_name(Barrier b) {
    switch (b) {
        case Barrier::Sync: return "__syncthreads";
        case Barrier::Or: return "__syncthreads_or";
        case Barrier::And: return "__syncthreads_and";
        case Barrier::Count: return "__syncthreads_count";
    }
    return "?";
}

// One pending cp.async: `size` (4 or 16) bytes read at issue, written to `dst` when its group
// completes.
struct AsyncCopy {
    unsigned char *dst;
    unsigned char data[16];
    uint32_t group;
    uint32_t size;
};

struct Block;

// One CUDA thread.
struct Lane {
    void *sp = nullptr;  // saved stack pointer while suspended
    Stack *stack = nullptr;
    Block *block = nullptr;
    ThreadInfo info{};
    uint32_t linear = 0, warp = 0, lane = 0;
    State state = State::Ready;
    // What the lane brings to (and takes from) its current rendezvous.
    Coll coll = Coll::Shfl;
    uint32_t mask = 0;
    int arg = 0, width = 32;
    uint64_t value = 0;
    uint32_t in[10] = {};
    uint32_t out[4] = {};
    Barrier barrier_kind = Barrier::Sync;
    int predicate = 0;
    // cp.async: copies in issue order, and the number of committed groups.
    std::vector<AsyncCopy> copies;
    uint32_t committed = 0;
#if SL_EMU_ASAN
    void *fake_stack = nullptr;
#endif
};

struct Warp {
    uint32_t exists = 0;      // lanes that exist (a partial last warp has fewer)
    uint32_t waiting = 0;     // lanes waiting at a collective
    uint32_t done = 0;        // lanes that have exited
    uint32_t at_barrier = 0;  // lanes waiting at a barrier
    // While every waiting lane waits at the same collective (the usual case), which one: an
    // arriving lane then checks itself against it in O(1) instead of against every lane.
    bool uniform = true;
    Coll coll = Coll::Shfl;
    uint32_t mask = 0;
};

struct Block {
    const GridLaunch *launch = nullptr;
    uint3 block_idx{};
    uint32_t n_threads = 0;
    Lane *lanes = nullptr;
    Warp *warps = nullptr;
    uint32_t n_warps = 0;
    unsigned char *smem = nullptr;  // dynamic shared memory
    size_t smem_bytes = 0;
    // Ready fibers: a ring of lane indices (capacity a power of two, `ready_mask` = capacity - 1).
    std::vector<uint32_t> ready;
    size_t ready_mask = 0, ready_head = 0, ready_len = 0;
    // Barrier in progress.
    uint32_t at_barrier = 0;
    Barrier barrier_kind = Barrier::Sync;
    int barrier_acc = 0;
    uint32_t n_done = 0;
    Lane *current = nullptr;
    bool failed = false;
    std::string error;
    std::mt19937_64 rng;
    bool random = false;
};

// Per OS thread that runs blocks.
struct Worker {
    void *sched_sp = nullptr;
    const void *sched_stack_lo = nullptr;  // for ASan's fiber switch annotations
    size_t sched_stack_size = 0;
    std::vector<std::unique_ptr<Stack>> stacks;  // fixed addresses: lanes point at them
    std::vector<Lane> lanes;
    std::vector<Warp> warps;
    Block block;
    std::vector<unsigned char> smem;
    unsigned char *tls_block = nullptr;
    size_t tls_bytes = 0;
#if SL_EMU_ASAN
    void *sched_fake_stack = nullptr;
#endif
};

void delete_worker(void *w) { delete static_cast<Worker *>(w); }

// The per-OS-thread Worker, made when the library is loaded (before any thread can ask).
pthread_key_t worker_key;
__attribute__((constructor)) void make_worker_key() { pthread_key_create(&worker_key, delete_worker); }

// The TLS segment of this library (the kernels' __shared__ variables): its size, from the
// program headers.
size_t tls_segment_bytes() {
    static const size_t bytes = [] {
        Dl_info info{};
        if (!dladdr(reinterpret_cast<void *>(&tls_segment_bytes), &info)) return size_t{0};
        struct Find {
            const void *base;
            size_t bytes;
        } find{info.dli_fbase, 0};
        dl_iterate_phdr(
            [](dl_phdr_info *i, size_t, void *data) {
                auto *f = static_cast<Find *>(data);
                if (reinterpret_cast<const void *>(i->dlpi_addr) != f->base) return 0;
                for (int k = 0; k < i->dlpi_phnum; ++k) {
                    if (i->dlpi_phdr[k].p_type == PT_TLS) f->bytes = i->dlpi_phdr[k].p_memsz;
                }
                return 1;
            },
            &find);
        return find.bytes;
    }();
    return bytes;
}

// This OS thread's TLS block of the library (allocated on first use of a variable in it).
unsigned char *tls_block_of_this_thread() {
    volatile char *anchor = &tls_anchor;  // makes the C library allocate the block
    (void)*anchor;
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void *>(&tls_block_of_this_thread), &info)) return nullptr;
    void *handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) return nullptr;
    void *block = nullptr;
    const int rc = dlinfo(handle, RTLD_DI_TLS_DATA, &block);
    dlclose(handle);
    if (rc != 0 || !block) return nullptr;
    auto *b = static_cast<unsigned char *>(block);
    const auto *a = reinterpret_cast<const unsigned char *>(&tls_anchor);
    if (a < b || a >= b + tls_segment_bytes()) return nullptr;  // not the block we think
    return b;
}

Worker &worker() {
    auto *w = static_cast<Worker *>(pthread_getspecific(worker_key));
    if (!w) {
        w = new Worker;
        pthread_setspecific(worker_key, w);
        w->tls_block = tls_block_of_this_thread();
        w->tls_bytes = w->tls_block ? tls_segment_bytes() : 0;
        if (!w->tls_block) die("cannot locate this thread's TLS block of the emulator (its __shared__ memory)");
#if !SL_EMU_ASAN
        // The fault handler must run on its own stack: a fiber that overflows its stack faults
        // on the guard page with no stack left.
        stack_t alt{};
        if (sigaltstack(nullptr, &alt) == 0 && (alt.ss_flags & SS_DISABLE)) {
            alt.ss_size = 64 << 10;
            alt.ss_sp = malloc(alt.ss_size);
            alt.ss_flags = 0;
            if (alt.ss_sp) sigaltstack(&alt, nullptr);
        }
#endif
        pthread_attr_t attr;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            void *lo = nullptr;
            size_t size = 0;
            pthread_attr_getstack(&attr, &lo, &size);
            w->sched_stack_lo = lo;
            w->sched_stack_size = size;
            pthread_attr_destroy(&attr);
        }
    }
    return *w;
}

Worker *worker_if_any() {
    return static_cast<Worker *>(pthread_getspecific(worker_key));
}

// --- Context switches (with AddressSanitizer's fiber annotations) ------------------------------

extern "C" void lane_entry(Lane *lane);
extern "C" void lane_exit(Lane *lane);

void init_fiber(Lane &lane) {
    Stack &s = *lane.stack;
#if SL_EMU_ASAN
    // Frames that returned normally cleaned their shadow; the top of the stack holds the
    // never-returning exit frame, and an abandoned stack everything.
    if (s.dirty) {
        __asan_unpoison_memory_region(s.lo, s.size);
    } else {
        __asan_unpoison_memory_region(s.top() - (16 << 10), 16 << 10);
    }
#endif
    s.dirty = false;
    // What sl_emu_switch pops: r15, r14, r13, r12, rbx, rbp, then the return address, which
    // sits right below the (16-byte aligned) top, so sl_emu_fiber_start runs with rsp = top and
    // its calls see the ABI's alignment.
    auto *sp = reinterpret_cast<uint64_t *>(s.top()) - 7;
    sp[0] = 0;                                                // r15
    sp[1] = reinterpret_cast<uint64_t>(&lane_exit);           // r14
    sp[2] = reinterpret_cast<uint64_t>(&lane_entry);          // r13
    sp[3] = reinterpret_cast<uint64_t>(&lane);                // r12
    sp[4] = 0;                                                // rbx
    sp[5] = 0;                                                // rbp
    sp[6] = reinterpret_cast<uint64_t>(&sl_emu_fiber_start);  // return address
    lane.sp = sp;
}

// Switches from the running lane (or the scheduler, from == null) to `to` (or the scheduler).
// `from_exits`: the running fiber will never be resumed.
void switch_context(Lane *from, Lane *to, bool from_exits = false) {
    Worker &w = worker();
    void **save = from ? &from->sp : &w.sched_sp;
    void *next = to ? to->sp : w.sched_sp;
#if SL_EMU_ASAN
    void **fake = from_exits ? nullptr : (from ? &from->fake_stack : &w.sched_fake_stack);
    const void *lo = to ? static_cast<const void *>(to->stack->lo) : w.sched_stack_lo;
    const size_t size = to ? to->stack->size : w.sched_stack_size;
    __sanitizer_start_switch_fiber(fake, lo, size);
#else
    (void)from_exits;
#endif
    w.block.current = to;
    sl_emu_switch(save, next);
    // Resumed.
#if SL_EMU_ASAN
    __sanitizer_finish_switch_fiber(from ? from->fake_stack : w.sched_fake_stack, nullptr,
                                    nullptr);
#endif
}

// --- Scheduling within a block ----------------------------------------------------------------

void push_ready(Block &b, Lane &l) {
    l.state = State::Ready;
    b.ready[(b.ready_head + b.ready_len) & b.ready_mask] = l.linear;
    ++b.ready_len;
}

Lane *pop_ready(Block &b) {
    if (b.ready_len == 0) return nullptr;
    if (b.random && b.ready_len > 1) {
        // Swap a random entry to the head.
        const size_t k = b.rng() % b.ready_len;
        std::swap(b.ready[b.ready_head], b.ready[(b.ready_head + k) & b.ready_mask]);
    }
    Lane *l = &b.lanes[b.ready[b.ready_head]];
    b.ready_head = (b.ready_head + 1) & b.ready_mask;
    --b.ready_len;
    return l;
}

// The running lane waits: run the next ready lane (or return to the scheduler when none is).
void suspend(Lane &self) {
    Block &b = *self.block;
    Lane *next = pop_ready(b);
    if (next == &self) {  // a yielding lane picked itself (random schedule): just go on
        self.state = State::Running;
        return;
    }
    if (next) next->state = State::Running;
    switch_context(&self, next);
    self.state = State::Running;
}

// In the random schedule, a lane that completed a rendezvous also lets others go first.
void maybe_yield(Lane &self) {
    Block &b = *self.block;
    if (!b.random || b.ready_len == 0) return;
    push_ready(b, self);
    suspend(self);
}

std::string describe_thread(const Block &b, const Lane *l) {
    char buf[256];
    const GridLaunch &g = *b.launch;
    if (l) {
        snprintf(buf, sizeof buf, "%s block (%u,%u,%u) thread (%u,%u,%u)", g.kernel->name,
                 b.block_idx.x, b.block_idx.y, b.block_idx.z, l->info.thread_idx.x,
                 l->info.thread_idx.y, l->info.thread_idx.z);
    } else {
        snprintf(buf, sizeof buf, "%s block (%u,%u,%u)", g.kernel->name, b.block_idx.x,
                 b.block_idx.y, b.block_idx.z);
    }
    return buf;
}

// Ends the block with an error (never returns to the caller's fiber).
[[noreturn]] void fail_block(Lane &self, const std::string &what) {
    Block &b = *self.block;
    b.failed = true;
    b.error = describe_thread(b, &self) + ": " + what;
    self.stack->dirty = true;
    switch_context(&self, nullptr, true);
    abort();  // unreachable: a failed block is never resumed
}

Lane &current_lane(const char *what) {
    Worker *w = worker_if_any();
    if (!w || !w->block.current) die(std::string(what) + " called outside a kernel");
    return *w->block.current;
}

std::string hex(uint32_t v) {
    char buf[16];
    snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

// --- Barriers ---------------------------------------------------------------------------------

int do_barrier(Barrier kind, int predicate) {
    Lane &self = current_lane("__syncthreads");
    Block &b = *self.block;
    Warp &w = b.warps[self.warp];
    if (b.n_done > 0) {
        for (uint32_t i = 0; i < b.n_threads; ++i) {
            if (b.lanes[i].state == State::Done) {
                const ThreadInfo &t = b.lanes[i].info;
                char buf[160];
                snprintf(buf, sizeof buf,
                         "%s reached while thread (%u,%u,%u) has exited: a barrier must be "
                         "reached by every thread of the block",
                         barrier_name(kind), t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
                fail_block(self, buf);
            }
        }
    }
    const uint32_t bit = 1u << self.lane;
    if (w.waiting) {
        for (uint32_t l = 0; l < 32; ++l) {
            const Lane &o = b.lanes[self.warp * 32 + l];
            if (((w.waiting >> l) & 1u) && (o.mask & bit)) {
                fail_block(self, std::string("barrier ") + barrier_name(kind) + " reached while lane " +
                                     std::to_string(l) + " of its warp waits for it at " +
                                     coll_name(o.coll) + " (mask " + hex(o.mask) + ")");
            }
        }
    }
    if (b.at_barrier == 0) {
        b.barrier_kind = kind;
        b.barrier_acc = kind == Barrier::And ? 1 : 0;
    } else if (b.barrier_kind != kind) {
        fail_block(self, std::string(barrier_name(kind)) + " reached while other threads wait at " +
                             barrier_name(b.barrier_kind));
    }
    switch (kind) {
        case Barrier::Sync: break;
        case Barrier::Or: b.barrier_acc |= predicate != 0; break;
        case Barrier::And: b.barrier_acc &= predicate != 0; break;
        case Barrier::Count: b.barrier_acc += predicate != 0; break;
    }
    ++b.at_barrier;
    if (b.at_barrier == b.n_threads) {
        const int result = b.barrier_acc;
        b.at_barrier = 0;
        for (uint32_t i = 0; i < b.n_warps; ++i) b.warps[i].at_barrier = 0;
        // Release in thread order (the random schedule picks from the ready set anyway).
        for (uint32_t i = 0; i < b.n_threads; ++i) {
            Lane &o = b.lanes[i];
            if (&o != &self && o.state == State::AtBarrier) {
                o.predicate = result;
                push_ready(b, o);
            }
        }
        maybe_yield(self);
        return result;
    }
    self.state = State::AtBarrier;
    w.at_barrier |= bit;
    suspend(self);
    return self.predicate;
}

// --- Warp collectives -------------------------------------------------------------------------

uint32_t warp_size_of(const Block &b, uint32_t warp) {
    return std::min<uint32_t>(32, b.n_threads - warp * 32);
}

// Completes a rendezvous: every lane of `mask` has posted; compute every lane's result.
void complete(Lane &self, Coll coll, uint32_t mask);

// Posts the running lane's part of a collective and waits for the rest of `mask`.
void rendezvous(Lane &self, Coll coll, uint32_t mask) {
    Block &b = *self.block;
    Warp &w = b.warps[self.warp];
    const uint32_t bit = 1u << self.lane;
    if (!(mask & bit)) {
        fail_block(self, std::string(coll_name(coll)) + " with mask " + hex(mask) +
                             ", which does not name the calling lane " +
                             std::to_string(self.lane));
    }
    if (mask & ~w.exists) {
        fail_block(self, std::string(coll_name(coll)) + " with mask " + hex(mask) +
                             " names lanes that do not exist (a warp of " +
                             std::to_string(__builtin_popcount(w.exists)) + " threads)");
    }
    if (mask & w.done) {
        fail_block(self, std::string(coll_name(coll)) + " (mask " + hex(mask) + "): lane " +
                             std::to_string(__builtin_ctz(mask & w.done)) +
                             " of the mask has exited");
    }
    if (mask & w.at_barrier) {
        fail_block(self, std::string(coll_name(coll)) + " (mask " + hex(mask) + "): lane " +
                             std::to_string(__builtin_ctz(mask & w.at_barrier)) +
                             " of the mask waits at a block barrier");
    }
    // Every waiting lane whose mask meets ours must be at this very collective.
    if (w.waiting == 0) {
        w.uniform = true;
        w.coll = coll;
        w.mask = mask;
    } else if (w.uniform && w.coll == coll && w.mask == mask) {
        // Same collective as every waiting lane.
    } else {
        for (uint32_t pend = w.waiting; pend; pend &= pend - 1) {
            const Lane &o = b.lanes[self.warp * 32 + __builtin_ctz(pend)];
            if ((o.mask & mask) && (o.mask != mask || o.coll != coll)) {
                fail_block(self, std::string("lanes of one warp reached different collectives: ") +
                                     coll_name(coll) + " (mask " + hex(mask) + ") here, " +
                                     coll_name(o.coll) + " (mask " + hex(o.mask) + ") at lane " +
                                     std::to_string(o.lane));
            }
        }
        w.uniform = false;  // disjoint groups wait at once
    }
    self.coll = coll;
    self.mask = mask;
    if (((w.waiting | bit) & mask) == mask) {
        w.waiting &= ~mask;
        complete(self, coll, mask);
        for (uint32_t rest = mask & ~bit; rest; rest &= rest - 1) {
            push_ready(b, b.lanes[self.warp * 32 + __builtin_ctz(rest)]);
        }
        maybe_yield(self);
        return;
    }
    w.waiting |= bit;
    self.state = State::AtWarp;
    suspend(self);
}

Lane &lane_of(Lane &self, uint32_t l) { return self.block->lanes[self.warp * 32 + l]; }

// Shared memory at window address `addr` (`bytes` of it), or an error naming `what`.
unsigned char *shared_at(Lane &self, uint32_t addr, uint32_t bytes, const char *what,
                         uint32_t align = 16) {
    Block &b = *self.block;
    if (addr % align != 0) {
        fail_block(self, std::string(what) + ": shared address " + hex(addr) + " is not " +
                             std::to_string(align) + "-byte aligned");
    }
    if (static_cast<uint64_t>(addr) + bytes > b.smem_bytes) {
        fail_block(self, std::string(what) + ": shared address " + hex(addr) + " + " +
                             std::to_string(bytes) + " bytes lies outside the block's " +
                             std::to_string(b.smem_bytes) + " bytes of dynamic shared memory");
    }
    return b.smem + addr;
}

uint16_t load_u16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

float bf16_to_f32(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void complete(Lane &self, Coll coll, uint32_t mask) {
    switch (coll) {
        case Coll::Shfl:
        case Coll::ShflUp:
        case Coll::ShflDown:
        case Coll::ShflXor: {
            uint64_t result[32];
            for (uint32_t m = mask; m; m &= m - 1) {
                const uint32_t l = __builtin_ctz(m);
                const Lane &me = lane_of(self, l);
                const int width = me.width;
                if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
                    fail_block(self, std::string(coll_name(coll)) + ": width " +
                                         std::to_string(width) + " (lane " + std::to_string(l) +
                                         ") is not a power of two in 1..32");
                }
                const uint32_t seg = l & ~static_cast<uint32_t>(width - 1);
                int src = static_cast<int>(l);
                switch (coll) {
                    case Coll::Shfl: src = static_cast<int>(seg) + (me.arg & (width - 1)); break;
                    case Coll::ShflUp:
                        src = static_cast<int>(l) - me.arg;
                        if (src < static_cast<int>(seg)) src = static_cast<int>(l);
                        break;
                    case Coll::ShflDown:
                        src = static_cast<int>(l) + me.arg;
                        if (src >= static_cast<int>(seg) + width) src = static_cast<int>(l);
                        break;
                    default:  // Xor: a lane of a later segment gives the caller its own value
                        src = static_cast<int>(l ^ static_cast<uint32_t>(me.arg));
                        if (src >= static_cast<int>(seg) + width) src = static_cast<int>(l);
                        break;
                }
                if (src < 0 || src > 31 || !((mask >> src) & 1u)) {
                    fail_block(self, std::string(coll_name(coll)) + ": lane " +
                                         std::to_string(l) + " reads lane " +
                                         std::to_string(src) + ", outside the mask " + hex(mask));
                }
                result[l] = lane_of(self, static_cast<uint32_t>(src)).value;
            }
            for (uint32_t m = mask; m; m &= m - 1) {
                const uint32_t l = __builtin_ctz(m);
                lane_of(self, l).value = result[l];
            }
            return;
        }
        case Coll::Ballot:
        case Coll::Any:
        case Coll::All: {
            uint32_t ballot = 0;
            for (uint32_t m = mask; m; m &= m - 1) {
                const uint32_t l = __builtin_ctz(m);
                if (lane_of(self, l).value) ballot |= 1u << l;
            }
            const uint64_t r = coll == Coll::Ballot ? ballot
                               : coll == Coll::Any  ? (ballot != 0)
                                                    : (ballot == mask);
            for (uint32_t m = mask; m; m &= m - 1) lane_of(self, __builtin_ctz(m)).value = r;
            return;
        }
        case Coll::Syncwarp: return;
        case Coll::LdMatrix:
        case Coll::LdMatrixT: {
            if (mask != kFullWarp) {
                fail_block(self, std::string(coll_name(coll)) +
                                     " is .aligned: every lane of the warp must execute it");
            }
            // Lanes 8m .. 8m+7 give the addresses of rows 0..7 of matrix m.
            const unsigned char *row[4][8];
            for (uint32_t l = 0; l < 32; ++l) {
                row[l / 8][l % 8] = shared_at(self, lane_of(self, l).in[0], 16, coll_name(coll));
            }
            for (uint32_t l = 0; l < 32; ++l) {
                Lane &me = lane_of(self, l);
                for (int m = 0; m < 4; ++m) {
                    uint16_t lo, hi;
                    if (coll == Coll::LdMatrix) {  // row l/4, elements 2(l%4), 2(l%4)+1
                        lo = load_u16(row[m][l / 4] + 4 * (l % 4));
                        hi = load_u16(row[m][l / 4] + 4 * (l % 4) + 2);
                    } else {  // rows 2(l%4), 2(l%4)+1 of column l/4
                        lo = load_u16(row[m][2 * (l % 4)] + 2 * (l / 4));
                        hi = load_u16(row[m][2 * (l % 4) + 1] + 2 * (l / 4));
                    }
                    me.out[m] = lo | (static_cast<uint32_t>(hi) << 16);
                }
            }
            return;
        }
        case Coll::Mma: {
            if (mask != kFullWarp) {
                fail_block(self, std::string(coll_name(coll)) +
                                     " is .aligned: every lane of the warp must execute it");
            }
            // Fragments (PTX ISA, m16n8k16, .bf16): lane l, g = l/4, t = l%4.
            // A (16x16): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
            // B (16x8):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
            // C (16x8):  c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
            float A[16][16], B[16][8], C[16][8];
            for (uint32_t l = 0; l < 32; ++l) {
                const Lane &me = lane_of(self, l);
                const uint32_t g = l / 4, t = l % 4;
                const uint32_t *a = me.in;  // a0..a3, b0, b1, c0..c3 (as f32 bits)
                auto lo = [](uint32_t v) { return bf16_to_f32(static_cast<uint16_t>(v)); };
                auto hi = [](uint32_t v) { return bf16_to_f32(static_cast<uint16_t>(v >> 16)); };
                A[g][2 * t] = lo(a[0]), A[g][2 * t + 1] = hi(a[0]);
                A[g + 8][2 * t] = lo(a[1]), A[g + 8][2 * t + 1] = hi(a[1]);
                A[g][2 * t + 8] = lo(a[2]), A[g][2 * t + 9] = hi(a[2]);
                A[g + 8][2 * t + 8] = lo(a[3]), A[g + 8][2 * t + 9] = hi(a[3]);
                B[2 * t][g] = lo(a[4]), B[2 * t + 1][g] = hi(a[4]);
                B[2 * t + 8][g] = lo(a[5]), B[2 * t + 9][g] = hi(a[5]);
                float c[4];
                memcpy(c, a + 6, 16);
                C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1];
                C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
            }
            // D = A·B + C in f32 (each bf16 product is exact in f32), summed over k in order.
            float D[16][8];
            for (int i = 0; i < 16; ++i) {
                for (int j = 0; j < 8; ++j) {
                    float acc = C[i][j];
                    for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
                    D[i][j] = acc;
                }
            }
            for (uint32_t l = 0; l < 32; ++l) {
                Lane &me = lane_of(self, l);
                const uint32_t g = l / 4, t = l % 4;
                const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t],
                                    D[g + 8][2 * t + 1]};
                memcpy(me.out, d, 16);
            }
            return;
        }
    }
}

// --- Running blocks ---------------------------------------------------------------------------

extern "C" void lane_entry(Lane *lane) {
#if SL_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    lane->state = State::Running;
    lane->block->launch->kernel->invoke(lane->block->launch->args);
}

// Lands every cp.async copy of groups below `limit` (in issue order).
void land_copies(Lane &l, uint32_t limit) {
    size_t kept = 0;
    for (size_t i = 0; i < l.copies.size(); ++i) {
        AsyncCopy &c = l.copies[i];
        if (c.group < limit) {
            memcpy(c.dst, c.data, c.size);
        } else {
            l.copies[kept++] = c;
        }
    }
    l.copies.resize(kept);
}

extern "C" void lane_exit(Lane *lane) {
    Lane &self = *lane;
    Block &b = *self.block;
    Warp &w = b.warps[self.warp];
    land_copies(self, UINT32_MAX);  // copies in flight complete eventually
    if (b.at_barrier > 0) {
        fail_block(self, std::string("exited while other threads wait at ") +
                             barrier_name(b.barrier_kind) +
                             ": a barrier must be reached by every thread of the block");
    }
    const uint32_t bit = 1u << self.lane;
    for (uint32_t pend = w.waiting; pend; pend &= pend - 1) {
        const Lane &o = b.lanes[self.warp * 32 + __builtin_ctz(pend)];
        if (o.mask & bit) {
            fail_block(self, std::string("exited while lane ") + std::to_string(o.lane) +
                                 " waits for it at " + coll_name(o.coll) + " (mask " +
                                 hex(o.mask) + ")");
        }
    }
    self.state = State::Done;
    w.done |= bit;
    ++b.n_done;
    Lane *next = pop_ready(b);
    if (next) next->state = State::Running;
    switch_context(&self, next, true);
    abort();  // a finished fiber is never resumed
}

// Where every unfinished thread of a stuck block waits, for the error message.
std::string stuck_report(const Block &b) {
    std::string out;
    auto where = [&](const Lane &l) -> std::string {
        switch (l.state) {
            case State::AtBarrier: return barrier_name(b.barrier_kind);
            case State::AtWarp: return std::string(coll_name(l.coll)) + " (mask " + hex(l.mask) + ")";
            case State::Done: return "exited";
            default: return "ready";
        }
    };
    uint32_t i = 0;
    while (i < b.n_threads) {
        const std::string w = where(b.lanes[i]);
        uint32_t j = i + 1;
        while (j < b.n_threads && where(b.lanes[j]) == w) ++j;
        if (!out.empty()) out += "; ";
        out += "threads " + std::to_string(i) + ".." + std::to_string(j - 1) + ": " + w;
        i = j;
    }
    return out;
}

void poison(void *p, size_t n) { memset(p, kGarbage, n); }

// Runs block `linear` of `g` on this OS thread. Returns false with `error` on failure.
bool run_block(const GridLaunch &g, uint64_t linear, uint64_t launch_seq, std::string &error) {
    Worker &w = worker();
    Block &b = w.block;
    const uint32_t n = g.block.x * g.block.y * g.block.z;
    b.launch = &g;
    b.block_idx = uint3{static_cast<unsigned>(linear % g.grid.x),
                        static_cast<unsigned>((linear / g.grid.x) % g.grid.y),
                        static_cast<unsigned>(linear / (static_cast<uint64_t>(g.grid.x) * g.grid.y))};
    b.n_threads = n;
    b.n_warps = (n + 31) / 32;
    b.at_barrier = 0;
    b.n_done = 0;
    b.failed = false;
    b.error.clear();
    b.current = nullptr;
    b.random = config().random_schedule;
    if (b.random) {
        b.rng.seed(config().seed * 0x9E3779B97F4A7C15ull ^ (launch_seq << 32) ^ linear);
    }
    if (w.stacks.size() < n) w.stacks.resize(n);
    if (w.lanes.size() < n) w.lanes.resize(n);
    if (w.warps.size() < b.n_warps) w.warps.resize(b.n_warps);
    b.lanes = w.lanes.data();
    b.warps = w.warps.data();
    size_t capacity = 1;
    while (capacity < n) capacity *= 2;
    if (b.ready.size() < capacity) b.ready.resize(capacity);
    b.ready_mask = capacity - 1;
    b.ready_head = 0;
    b.ready_len = 0;

    // Shared memory starts as garbage: the static __shared__ variables (this thread's TLS block
    // of the library) and the dynamic buffer.
    poison(w.tls_block, w.tls_bytes);
    b.smem_bytes = g.dynamic_shared;
#if SL_EMU_ASAN
    // An exact-size heap buffer: ASan reports any access past its end.
    unsigned char *heap_smem = static_cast<unsigned char *>(aligned_alloc(16, (g.dynamic_shared + 15) / 16 * 16 + 16));
    b.smem = heap_smem;
    __asan_poison_memory_region(b.smem + g.dynamic_shared, (g.dynamic_shared + 15) / 16 * 16 + 16 - g.dynamic_shared);
#else
    if (w.smem.size() < g.dynamic_shared + 16) w.smem.resize(g.dynamic_shared + 16);
    b.smem = w.smem.data() + ((16 - reinterpret_cast<uintptr_t>(w.smem.data()) % 16) % 16);
#endif
    poison(b.smem, g.dynamic_shared);

    for (uint32_t i = 0; i < b.n_warps; ++i) {
        const uint32_t size = warp_size_of(b, i);
        b.warps[i] = Warp{size == 32 ? kFullWarp : ((1u << size) - 1), 0, 0, 0};
    }
    for (uint32_t i = 0; i < n; ++i) {
        Lane &l = b.lanes[i];
        if (!w.stacks[i]) {
            w.stacks[i] = std::make_unique<Stack>();
            w.stacks[i]->allocate();
        }
        l.stack = w.stacks[i].get();
        l.block = &b;
        l.linear = i;
        l.warp = i / 32;
        l.lane = i % 32;
        l.info.thread_idx = uint3{i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y)};
        l.info.block_idx = b.block_idx;
        l.info.block_dim = dim3(g.block.x, g.block.y, g.block.z);
        l.info.grid_dim = dim3(g.grid.x, g.grid.y, g.grid.z);
        l.copies.clear();
        l.committed = 0;
        l.mask = 0;
        init_fiber(l);
        push_ready(b, l);
    }

    while (Lane *next = pop_ready(b)) {
        next->state = State::Running;
        switch_context(nullptr, next);
        if (b.failed) break;
    }
    bool ok = true;
    if (b.failed) {
        error = b.error;
        ok = false;
        for (uint32_t i = 0; i < n; ++i) b.lanes[i].stack->dirty = true;
    } else if (b.n_done != n) {
        error = describe_thread(b, nullptr) +
                ": a collective or barrier reached by only part of its warp/block (" +
                stuck_report(b) + ")";
        ok = false;
        for (uint32_t i = 0; i < n; ++i) b.lanes[i].stack->dirty = true;
    }
#if SL_EMU_ASAN
    free(heap_smem);
#endif
    b.smem = nullptr;
    b.launch = nullptr;
    return ok;
}

// --- The worker pool --------------------------------------------------------------------------

// Work split in `n` items that any worker may run: the blocks of a grid, or the ranges of a
// parallel_for.
struct Job {
    uint64_t n = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<uint64_t> finished{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::condition_variable cv;
    std::string error;  // the first failure
    virtual ~Job() = default;
    virtual bool run(uint64_t item, std::string &error) = 0;

    // Runs items until none is left; true when this call finished the last one.
    void work() {
        for (;;) {
            const uint64_t i = next.fetch_add(1);
            if (i >= n) return;
            if (!failed.load(std::memory_order_relaxed)) {
                std::string e;
                if (!run(i, e)) {
                    std::lock_guard<std::mutex> lock(mu);
                    if (!failed.exchange(true)) error = e;
                }
            }
            if (finished.fetch_add(1) + 1 == n) {
                std::lock_guard<std::mutex> lock(mu);
                cv.notify_all();
            }
        }
    }
    void wait() {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return finished.load() == n; });
    }
};

struct Pool {
    std::mutex mu;
    std::condition_variable work_cv;  // a job was queued
    std::condition_variable idle_cv;  // a pool thread let go of a job
    std::deque<Job *> jobs;
    std::unordered_map<Job *, unsigned> users;  // pool threads inside Job::work
    unsigned n_threads = 0;

    Pool() {
        n_threads = config().workers - 1;  // the caller of a job works too
        for (unsigned i = 0; i < n_threads; ++i) std::thread([this] { loop(); }).detach();
    }
    void loop() {
        for (;;) {
            Job *job;
            {
                std::unique_lock<std::mutex> lock(mu);
                work_cv.wait(lock, [&] { return !jobs.empty(); });
                job = jobs.front();
                if (job->next.load() >= job->n) {
                    jobs.pop_front();
                    continue;
                }
                ++users[job];
            }
            job->work();
            std::lock_guard<std::mutex> lock(mu);
            if (--users[job] == 0) users.erase(job);
            idle_cv.notify_all();
        }
    }
    // Runs `job` on the pool and the calling thread; returns when it is finished and no pool
    // thread holds it any more (it lives on the caller's stack).
    void run(Job &job) {
        if (job.n == 0) return;
        if (n_threads > 0) {
            std::lock_guard<std::mutex> lock(mu);
            jobs.push_back(&job);
            work_cv.notify_all();
        }
        job.work();
        job.wait();
        if (n_threads > 0) {
            std::unique_lock<std::mutex> lock(mu);
            jobs.erase(std::remove(jobs.begin(), jobs.end(), &job), jobs.end());
            idle_cv.wait(lock, [&] { return users.find(&job) == users.end(); });
        }
    }
};

Pool &pool() {
    static Pool *p = new Pool;  // never destroyed: its threads are detached
    return *p;
}

std::atomic<uint64_t> launch_counter{0};

struct GridJob : Job {
    const GridLaunch *launch;
    uint64_t seq;
    bool run(uint64_t item, std::string &error) override {
        return run_block(*launch, item, seq, error);
    }
};

struct RangeJob : Job {
    size_t total = 0, chunk = 1;
    void (*body)(void *, size_t, size_t) = nullptr;
    void *ctx = nullptr;
    bool run(uint64_t item, std::string &) override {
        const size_t begin = item * chunk;
        body(ctx, begin, std::min(total, begin + chunk));
        return true;
    }
};

// --- Memory faults inside a kernel --------------------------------------------------------------

#if !SL_EMU_ASAN  // AddressSanitizer reports faults itself, with the kernel's source line
struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t *info, void *uctx) {
    Worker *w = worker_if_any();
    if (w && w->block.launch) {  // running a block: a kernel thread, or the emulator itself
        const std::string who = describe_thread(w->block, w->block.current);
        char buf[512];
        snprintf(buf, sizeof buf,
                 "sparse-lavida emulated device: %s: memory fault (%s) at address %p: an access "
                 "outside any allocation, or a misaligned vector access\n",
                 who.c_str(), sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr);
        (void)!write(2, buf, strlen(buf));
        _exit(134);
    }
    // Not in a kernel: whoever handled the signal before (Rust's stack-overflow guard) decides.
    const struct sigaction &prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, info, uctx);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

#endif

void install_fault_handler() {
#if !SL_EMU_ASAN
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
#endif
}

}  // namespace

// --- The runtime's interface (runtime.h) -------------------------------------------------------

void register_kernels(const KernelEntry *entries, size_t n) {
    for (size_t i = 0; i < n; ++i) registry()[entries[i].name] = &entries[i];
}

const KernelEntry *find_kernel(const char *name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : it->second;
}

bool run_grid(const GridLaunch &launch, std::string *error) {
    install_fault_handler();
    GridJob job;
    job.launch = &launch;
    job.seq = launch_counter.fetch_add(1);
    job.n = static_cast<uint64_t>(launch.grid.x) * launch.grid.y * launch.grid.z;
    pool().run(job);
    if (job.failed) {
        if (error) *error = job.error;
        return false;
    }
    return true;
}

void parallel_for(size_t n, void (*body)(void *, size_t, size_t), void *ctx) {
    if (n == 0) return;
    RangeJob job;
    job.total = n;
    const size_t parts = std::min<size_t>(n, static_cast<size_t>(config().workers) * 4);
    job.chunk = (n + parts - 1) / parts;
    job.n = (n + job.chunk - 1) / job.chunk;
    job.body = body;
    job.ctx = ctx;
    pool().run(job);
}

// --- The device side (device.h) ----------------------------------------------------------------

const ThreadInfo &self() { return current_lane("threadIdx").info; }

int barrier(Barrier kind, int predicate) { return do_barrier(kind, predicate); }

uint64_t shuffle(Shuffle kind, uint32_t mask, uint64_t value, int arg, int width) {
    Lane &l = current_lane("__shfl_sync");
    static constexpr Coll colls[] = {Coll::Shfl, Coll::ShflUp, Coll::ShflDown, Coll::ShflXor};
    l.value = value;
    l.arg = arg;
    l.width = width;
    rendezvous(l, colls[static_cast<int>(kind)], mask);
    return l.value;
}

uint32_t vote(Vote kind, uint32_t mask, int predicate) {
    Lane &l = current_lane("__ballot_sync");
    static constexpr Coll colls[] = {Coll::Ballot, Coll::Any, Coll::All};
    l.value = predicate != 0;
    rendezvous(l, colls[static_cast<int>(kind)], mask);
    return static_cast<uint32_t>(l.value);
}

void syncwarp(uint32_t mask) { rendezvous(current_lane("__syncwarp"), Coll::Syncwarp, mask); }

unsigned char *dynamic_shared() { return current_lane("dynamic shared memory").block->smem; }

uint32_t shared_address(const void *p) {
    Lane &l = current_lane("__cvta_generic_to_shared");
    const Block &b = *l.block;
    const auto *c = static_cast<const unsigned char *>(p);
    if (c < b.smem || c > b.smem + b.smem_bytes) {
        fail_block(l, "__cvta_generic_to_shared of a pointer outside the block's dynamic shared "
                      "memory");
    }
    return static_cast<uint32_t>(c - b.smem);
}

void cp_async_16(uint32_t shared_dst, const void *global_src) {
    Lane &l = current_lane("cp.async");
    unsigned char *dst = shared_at(l, shared_dst, 16, "cp.async.cg.shared.global");
    if (reinterpret_cast<uintptr_t>(global_src) % 16 != 0) {
        fail_block(l, "cp.async.cg.shared.global: global source is not 16-byte aligned");
    }
    AsyncCopy c;
    c.dst = dst;
    memcpy(c.data, global_src, 16);  // the source is read now ...
    c.group = l.committed;
    c.size = 16;
    l.copies.push_back(c);
    poison(dst, 16);  // ... and the destination holds garbage until the group completes
}

void cp_async_4(uint32_t shared_dst, const void *global_src) {
    Lane &l = current_lane("cp.async");
    unsigned char *dst = shared_at(l, shared_dst, 4, "cp.async.ca.shared.global", 4);
    if (reinterpret_cast<uintptr_t>(global_src) % 4 != 0) {
        fail_block(l, "cp.async.ca.shared.global: global source is not 4-byte aligned");
    }
    AsyncCopy c;
    c.dst = dst;
    memcpy(c.data, global_src, 4);  // as cp_async_16: read now, garbage until the group lands
    c.group = l.committed;
    c.size = 4;
    l.copies.push_back(c);
    poison(dst, 4);
}

void cp_async_commit() { ++current_lane("cp.async.commit_group").committed; }

void cp_async_wait(int n) {
    Lane &l = current_lane("cp.async.wait_group");
    // Groups 0 .. committed-1 are committed; all but the newest n must have landed.
    const uint32_t limit = l.committed > static_cast<uint32_t>(n) ? l.committed - n : 0;
    land_copies(l, limit);
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_addr, bool trans) {
    Lane &l = current_lane("ldmatrix");
    l.in[0] = shared_addr;
    rendezvous(l, trans ? Coll::LdMatrixT : Coll::LdMatrix, kFullWarp);
    memcpy(r, l.out, 16);
}

void mma_m16n8k16_bf16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    Lane &l = current_lane("mma.sync");
    memcpy(l.in, a, 16);
    l.in[4] = b0;
    l.in[5] = b1;
    memcpy(l.in + 6, d, 16);
    rendezvous(l, Coll::Mma, kFullWarp);
    memcpy(d, l.out, 16);
}

void fail(const char *what) { fail_block(current_lane("a kernel error"), what); }

}  // namespace sl_emu

// The emulator's engine: fibers, the block scheduler, barriers and warp exchanges, shared
// memory, mutations and diagnostics. See cuda_emulator.h for the execution model.
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

// Fibers switch with a few instructions on x86-64; elsewhere (or with
// -DCUSTOM_BN_EMULATOR_UCONTEXT) through ucontext, whose swapcontext costs a system call.
#if defined(__x86_64__) && !defined(CUSTOM_BN_EMULATOR_UCONTEXT)
#define CBN_EMU_ASM_SWITCH 1
#else
#define CBN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// Under AddressSanitizer (make test-sanitize) every switch between the scheduler's stack and a
// fiber's is announced to it: otherwise it takes fiber frames for wild accesses to the thread's
// stack, an exception thrown on a fiber unpoisons the wrong stack, and the redzones of a kernel
// abandoned half-way stay poisoned when its fiber is reused.
#if defined(__SANITIZE_ADDRESS__)
#define CBN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CBN_EMU_ASAN 1
#endif
#endif
#ifndef CBN_EMU_ASAN
#define CBN_EMU_ASAN 0
#endif
#if CBN_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace custom_bn {
namespace dev {
namespace emu {

const char* primitive_name(Primitive p) {
  switch (p) {
    case Primitive::kSyncThreads: return "__syncthreads";
    case Primitive::kSyncWarp: return "__syncwarp";
    case Primitive::kShuffleXor: return "__shfl_xor_sync";
    case Primitive::kShuffleDown: return "__shfl_down_sync";
    case Primitive::kThreadFence: return "__threadfence";
    case Primitive::kAtomicAdd: return "atomicAdd";
    case Primitive::kThreadIdxX: return "threadIdx.x";
    case Primitive::kThreadIdxY: return "threadIdx.y";
  }
  return "?";
}

namespace {

// ---------------------------------------------------------------------------------------------
// Fibers.

#if CBN_EMU_ASM_SWITCH
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores
// the stack pointer to *save_sp, and resumes the context whose stack pointer is load_sp.
extern "C" void cbn_emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl cbn_emu_switch_context
    .hidden cbn_emu_switch_context
    .type cbn_emu_switch_context, @function
cbn_emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cbn_emu_switch_context, .-cbn_emu_switch_context
)");
#endif

struct Context {
#if CBN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
#if CBN_EMU_ASAN
  // The stack this context runs on (the scheduler's is learned at every switch to a fiber: a
  // launch may come from any host thread) and ASan's fake stack while it is switched out.
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;
#endif
};

// Kernel frames are shallow; the generous size costs only address space, and the guard page
// below it turns an overflow into a crash instead of a silent corruption.
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] void fiber_main();

#if !CBN_EMU_ASM_SWITCH
void fiber_main_ucontext() { fiber_main(); }
#endif

struct Fiber {
  Context context;
  unsigned char* mapping = nullptr;
  size_t mapping_bytes = 0;

  Fiber() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapping_bytes = kStackBytes + page;
    void* m = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mapping = static_cast<unsigned char*>(m);
    mprotect(mapping, page, PROT_NONE);
#if CBN_EMU_ASAN
    context.stack_bottom = mapping + page;
    context.stack_size = kStackBytes;
#endif
    reset();
  }
  ~Fiber() { munmap(mapping, mapping_bytes); }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Makes the next switch to this fiber start fiber_main afresh (also abandons a kernel that
  // was stopped half-way; kernel frames own no resources).
  void reset() {
#if CBN_EMU_ASAN
    const size_t stack_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    ASAN_UNPOISON_MEMORY_REGION(mapping + stack_page, kStackBytes);
    context.fake_stack = nullptr;
#endif
#if CBN_EMU_ASM_SWITCH
    auto top = reinterpret_cast<uintptr_t>(mapping + mapping_bytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                  // fiber_main's return address: never used
    *--sp = reinterpret_cast<void*>(&fiber_main);    // where the switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
    --sp;
    auto* control = reinterpret_cast<uint32_t*>(sp);
    control[0] = 0x1F80;  // MXCSR: all exceptions masked, round to nearest
    control[1] = 0x037F;  // x87 control word: the same
    context.sp = sp;
#else
    getcontext(&context.uc);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    context.uc.uc_stack.ss_sp = mapping + page;
    context.uc.uc_stack.ss_size = kStackBytes;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, &fiber_main_ucontext, 0);
#endif
  }
};

#if CBN_EMU_ASAN
// On arrival in `here`: completes the switch for ASan, which tells the bounds of the stack left,
// `from`'s (the only context that ever switches to a fiber is the scheduler and the reverse).
void arrived(Context& here, Context& from) {
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(here.fake_stack, &bottom, &size);
  from.stack_bottom = bottom;
  from.stack_size = size;
}
#endif

void switch_context(Context& save, Context& load) {
#if CBN_EMU_ASAN
  __sanitizer_start_switch_fiber(&save.fake_stack, load.stack_bottom, load.stack_size);
#endif
#if CBN_EMU_ASM_SWITCH
  cbn_emu_switch_context(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
#if CBN_EMU_ASAN
  arrived(save, load);
#endif
}

// ---------------------------------------------------------------------------------------------
// Engine state.

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Block;

struct EmulatedThread {
  ThreadState visible{};  // what the inline primitives read
  Block* block = nullptr;
  Fiber* fiber = nullptr;
  int linear = 0;
  bool lagger = false;
  int stall = 0;  // rounds this thread still sits out
  State state = State::kReady;
  // The pending barrier or warp operation.
  Primitive op = Primitive::kSyncThreads;
  std::source_location site;
  unsigned mask = 0;
  int operand = 0;
  size_t bytes = 0;
  alignas(16) unsigned char value[16];
  alignas(16) unsigned char result[16];
};

// Poison of fresh shared memory: all-ones bytes are NaN as float and double, -1 as integers.
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kGuardBytes = 256;

struct Block {
  int x = 0, y = 0;
  bool active = false;
  std::vector<EmulatedThread> threads;
  std::vector<int> order;  // resume order of this round
  int done = 0;
  int at_barrier = 0;
  std::source_location barrier_site;
  std::vector<unsigned> warp_waiting;  // per warp: lanes waiting in a warp operation
  std::unique_ptr<unsigned char[]> shared;
  size_t shared_bytes = 0;  // dynamic, without the guard
  std::vector<std::pair<const void*, std::unique_ptr<unsigned char[]>>> statics;
};

static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "shared memory needs 16-byte alignment");

struct MutationState {
  int id;
  Mutation mutation;
  int64_t hits = 0;
};

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string short_file(const char* path) {
  const std::string_view p(path);
  const size_t slash = p.rfind('/');
  return std::string(slash == std::string_view::npos ? p : p.substr(slash + 1));
}

// "threadfence in column_reduce (batch_norm_kernel.cuh:140)"
std::string describe_site(Primitive p, const std::source_location& site) {
  std::string function = site.function_name();
  // Keep the bare name of the function: drop the return type, parameters and template list.
  const size_t paren = function.find('(');
  if (paren != std::string::npos) function.resize(paren);
  const size_t space = function.rfind(' ');
  if (space != std::string::npos) function = function.substr(space + 1);
  const size_t scope = function.rfind("::");
  if (scope != std::string::npos) function = function.substr(scope + 2);
  std::ostringstream os;
  os << primitive_name(p) << " in " << function << " (" << short_file(site.file_name()) << ":"
     << site.line() << ")";
  return os.str();
}

// Aborts the process when kernel code runs past the time limit without reaching a point where
// the scheduler could stop it (an infinite loop without synchronization).
class Watchdog {
 public:
  static Watchdog& instance() {
    // Leaked on purpose: the detached thread may outlive static destruction.
    static Watchdog* w = new Watchdog();
    return *w;
  }
  void enter(const std::string* kernel, double limit_s) {
    kernel_.store(kernel);
    limit_ms_.store(static_cast<int64_t>(limit_s * 1000.0));
    started_ms_.store(now_ms());
  }
  void leave() { started_ms_.store(0); }

 private:
  Watchdog() {
    std::thread([this] {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        const int64_t started = started_ms_.load();
        if (started != 0 && now_ms() - started > limit_ms_.load()) {
          const std::string* kernel = kernel_.load();
          std::fprintf(stderr,
                       "custom_bn CUDA emulator: kernel %s ran for more than %.1f s without "
                       "reaching a synchronization point (an endless loop?); aborting\n",
                       kernel ? kernel->c_str() : "?", limit_ms_.load() / 1000.0);
          std::fflush(stderr);
          std::abort();
        }
      }
    }).detach();
  }
  static int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  std::atomic<const std::string*> kernel_{nullptr};
  std::atomic<int64_t> limit_ms_{0};
  std::atomic<int64_t> started_ms_{0};
};

struct Engine {
  std::mutex launch_mutex;  // one launch at a time in the process

  // Settings and records, guarded by settings_mutex.
  std::mutex settings_mutex;
  Schedule schedule;
  std::vector<MutationState> mutations;
  int next_mutation_id = 0;
  std::atomic<int> catalogs{0};  // live ScopedSiteCatalogs
  std::set<CallSite> catalog;
  std::vector<LaunchRecord> log;
  std::map<std::string, int64_t> launch_counts;

  // The launch in progress.
  Context scheduler;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<Block> blocks;  // resident slots
  EmulatedThread* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr thread_error;
  std::string kernel;
  Dim2 grid, block_dim;
};

Engine& engine() {
  static Engine e;
  return e;
}

EmulatedThread& current(const char* primitive) {
  Engine& e = engine();
  if (current_thread == nullptr || e.running == nullptr) outside_kernel(primitive);
  return *e.running;
}

std::string thread_name(const EmulatedThread& t) {
  std::ostringstream os;
  os << "thread (" << t.visible.thread_x << "," << t.visible.thread_y << ") of block ("
     << t.visible.block_x << "," << t.visible.block_y << ")";
  return os.str();
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void suspend(EmulatedThread& t) {
  Engine& e = engine();
  switch_context(t.fiber->context, e.scheduler);
}

[[noreturn]] void fiber_main() {
#if CBN_EMU_ASAN
  arrived(engine().running->fiber->context, engine().scheduler);  // a fresh start
#endif
  for (;;) {
    Engine& e = engine();
    EmulatedThread* t = e.running;
    try {
      (*e.body)();
    } catch (...) {
      e.thread_error = std::current_exception();
    }
    t->state = State::kDone;
    ++t->block->done;
    switch_context(t->fiber->context, e.scheduler);
  }
}

void record_site(Primitive p, const std::source_location& site) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  if (e.catalogs > 0) {
    e.catalog.insert(CallSite{p, site.function_name(), site.file_name(), site.line()});
  }
}

// Whether an active mutation alters this call (and counts it).
bool mutated(Primitive p, const std::source_location& site) {
  if (!mutations_active.load(std::memory_order_relaxed)) return false;
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  for (MutationState& m : e.mutations) {
    if (m.mutation.primitive == p && (m.mutation.line == 0 || m.mutation.line == site.line()) &&
        std::strstr(site.function_name(), m.mutation.function.c_str()) != nullptr) {
      ++m.hits;
      return true;
    }
  }
  return false;
}

bool cataloguing() { return engine().catalogs.load(std::memory_order_relaxed) > 0; }

// ---------------------------------------------------------------------------------------------
// Diagnostics of a block in which no thread can move.

std::string describe_stuck_block(const Block& b) {
  // Group threads by what they wait for; list a few of each group.
  std::map<std::string, std::vector<const EmulatedThread*>> groups;
  for (const EmulatedThread& t : b.threads) {
    std::string what;
    switch (t.state) {
      case State::kDone: what = "have exited"; break;
      case State::kReady: what = "are runnable"; break;
      case State::kBarrier:
        what = "wait at " + describe_site(Primitive::kSyncThreads, t.site);
        break;
      case State::kWarp: {
        std::ostringstream os;
        os << "wait at " << describe_site(t.op, t.site) << " with mask 0x" << std::hex << t.mask;
        what = os.str();
        break;
      }
    }
    groups[what].push_back(&t);
  }
  std::ostringstream os;
  os << "block (" << b.x << "," << b.y << ") cannot make progress: its threads diverged around a "
     << "barrier or warp operation:";
  for (const auto& [what, threads] : groups) {
    os << "\n  " << threads.size() << " thread(s) " << what << ", e.g.";
    for (size_t i = 0; i < threads.size() && i < 3; ++i) {
      os << " (" << threads[i]->visible.thread_x << "," << threads[i]->visible.thread_y << ")";
    }
  }
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// The scheduler.

void check_launch(std::string_view kernel, Dim2 grid, Dim2 block, int64_t shared_bytes) {
  std::ostringstream problem;
  if (grid.x < 1 || grid.y < 1) {
    problem << "grid (" << grid.x << "," << grid.y << ") is empty";
  } else if (grid.x > 2147483647) {
    problem << "grid.x = " << grid.x << " exceeds 2^31 - 1";
  } else if (grid.y > 65535) {
    problem << "grid.y = " << grid.y << " exceeds 65535";
  } else if (block.x < 1 || block.y < 1) {
    problem << "block (" << block.x << "," << block.y << ") is empty";
  } else if (block.x > 1024 || block.y > 1024 || block.x * block.y > 1024) {
    problem << "block (" << block.x << "," << block.y << ") exceeds 1024 threads";
  } else if (shared_bytes < 0 || shared_bytes > 48 * 1024) {
    problem << shared_bytes << " bytes of dynamic shared memory exceed the 48 KiB a kernel gets "
            << "without cudaFuncSetAttribute";
  }
  const std::string p = problem.str();
  if (!p.empty()) {
    throw EmulatorError("invalid launch of " + std::string(kernel) + ": " + p);
  }
}

void admit(Engine& e, Block& b, int slot, int64_t linear_block, int threads_per_block,
           int laggers, std::mt19937_64& rng) {
  const Dim2 grid = e.grid, dim = e.block_dim;
  b.x = static_cast<int>(linear_block % grid.x);
  b.y = static_cast<int>(linear_block / grid.x);
  b.active = true;
  b.done = 0;
  b.at_barrier = 0;
  std::fill(b.warp_waiting.begin(), b.warp_waiting.end(), 0u);
  std::memset(b.shared.get(), kPoison, b.shared_bytes + kGuardBytes);
  b.statics.clear();
  for (int i = 0; i < threads_per_block; ++i) {
    EmulatedThread& t = b.threads[i];
    t.visible = ThreadState{static_cast<int>(i % dim.x),
                            static_cast<int>(i / dim.x),
                            b.x,
                            b.y,
                            static_cast<int>(dim.x),
                            static_cast<int>(dim.y),
                            static_cast<int>(grid.x),
                            static_cast<int>(grid.y),
                            b.shared.get()};
    t.block = &b;
    t.fiber = e.fibers[static_cast<size_t>(slot) * threads_per_block + i].get();
    t.linear = i;
    t.lagger = false;
    t.stall = 0;
    t.state = State::kReady;
  }
  for (int k = 0; k < std::min(laggers, threads_per_block); ++k) {
    b.threads[std::uniform_int_distribution<int>(0, threads_per_block - 1)(rng)].lagger = true;
  }
}

void retire(const Engine& e, Block& b) {
  for (size_t i = b.shared_bytes; i < b.shared_bytes + kGuardBytes; ++i) {
    if (b.shared[i] != kPoison) {
      std::ostringstream os;
      os << e.kernel << ": block (" << b.x << "," << b.y << ") wrote past the " << b.shared_bytes
         << " bytes of dynamic shared memory it was launched with (byte " << i << ")";
      throw EmulatorError(os.str());
    }
  }
  b.active = false;
}

void resume(Engine& e, EmulatedThread& t) {
  e.running = &t;
  current_thread = &t.visible;
  switch_context(e.scheduler, t.fiber->context);
  current_thread = nullptr;
  e.running = nullptr;
  if (e.thread_error) {
    std::string what = "?";
    try {
      std::rethrow_exception(e.thread_error);
    } catch (const std::exception& ex) {
      what = ex.what();
    } catch (...) {
    }
    throw EmulatorError(e.kernel + ", " + thread_name(t) + ": " + what);
  }
}

void run_launch(Engine& e, int64_t shared_bytes, const Schedule& s) {
  const int64_t threads_per_block = e.block_dim.x * e.block_dim.y;
  const int64_t total_blocks = e.grid.x * e.grid.y;
  const int slots = static_cast<int>(std::clamp<int64_t>(s.resident_blocks, 1, total_blocks));
  const int64_t warps = (threads_per_block + kWarpSize - 1) / kWarpSize;

  while (e.fibers.size() < static_cast<size_t>(slots * threads_per_block)) {
    e.fibers.push_back(std::make_unique<Fiber>());
  }
  e.blocks.resize(slots);
  for (Block& b : e.blocks) {
    b.threads.assign(threads_per_block, EmulatedThread{});
    b.order.resize(threads_per_block);
    b.warp_waiting.assign(warps, 0u);
    b.shared_bytes = static_cast<size_t>(shared_bytes);
    b.shared = std::make_unique<unsigned char[]>(b.shared_bytes + kGuardBytes);
    b.active = false;
  }

  std::mt19937_64 rng(s.seed);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::vector<int64_t> block_order(total_blocks);
  std::iota(block_order.begin(), block_order.end(), 0);
  if (s.shuffle_blocks) std::shuffle(block_order.begin(), block_order.end(), rng);

  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(s.time_limit_s));
  std::vector<EmulatedThread*> held_back;
  // Stall lengths: geometric, so that now and then a thread falls far behind.
  std::geometric_distribution<int> stall_length(1.0 / std::max(1.0, s.stall_rounds));
  int64_t next = 0;
  for (;;) {
    bool any_active = false;
    for (int slot = 0; slot < slots; ++slot) {
      Block& b = e.blocks[slot];
      if (!b.active && next < total_blocks) {
        admit(e, b, slot, block_order[next++], static_cast<int>(threads_per_block), s.laggers,
              rng);
      }
      any_active = any_active || b.active;
    }
    if (!any_active) return;

    // One round: every runnable thread runs to its next synchronization point, unless it is
    // a lagger or stalls this round.
    bool ran = false;
    held_back.clear();
    for (Block& b : e.blocks) {
      if (!b.active) continue;
      std::iota(b.order.begin(), b.order.end(), 0);
      if (s.order == ThreadOrder::kReverse) std::reverse(b.order.begin(), b.order.end());
      if (s.order == ThreadOrder::kRandom) std::shuffle(b.order.begin(), b.order.end(), rng);
      for (int i : b.order) {
        EmulatedThread& t = b.threads[i];
        if (t.state != State::kReady) continue;
        if (t.stall == 0 && s.stall_probability > 0 && coin(rng) < s.stall_probability) {
          t.stall = 1 + stall_length(rng);
        }
        if (t.lagger || t.stall > 0) {
          if (t.stall > 0) --t.stall;
          held_back.push_back(&t);
          continue;
        }
        resume(e, t);
        ran = true;
      }
    }
    // Nothing else could run: one of the held-back threads takes a step.
    if (!ran && !held_back.empty()) {
      resume(e, *held_back[std::uniform_int_distribution<size_t>(0, held_back.size() - 1)(rng)]);
    }

    for (Block& b : e.blocks) {
      if (!b.active) continue;
      if (b.done == static_cast<int>(b.threads.size())) {
        retire(e, b);
      } else if (std::none_of(b.threads.begin(), b.threads.end(),
                              [](const EmulatedThread& t) { return t.state == State::kReady; })) {
        throw EmulatorError(e.kernel + ": " + describe_stuck_block(b));
      }
    }

    if (std::chrono::steady_clock::now() > deadline) {
      std::ostringstream os;
      os << e.kernel << " did not finish within " << s.time_limit_s
         << " s (does a block wait for another block?); blocks in flight:";
      for (const Block& b : e.blocks) {
        if (b.active) os << " (" << b.x << "," << b.y << ")";
      }
      throw EmulatorError(os.str());
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Host API.

void run_grid(std::string_view kernel_name, Dim2 grid, Dim2 block, int64_t dynamic_shared_bytes,
              const std::function<void()>& thread_body) {
  Engine& e = engine();
  if (current_thread != nullptr) {
    throw EmulatorError("a kernel launched " + std::string(kernel_name) +
                        " (dynamic parallelism is not emulated)");
  }
  check_launch(kernel_name, grid, block, dynamic_shared_bytes);
  std::lock_guard<std::mutex> launch_lock(e.launch_mutex);
  Schedule s;
  {
    std::lock_guard<std::mutex> lock(e.settings_mutex);
    s = e.schedule;
    e.log.push_back(LaunchRecord{std::string(kernel_name), grid, block, dynamic_shared_bytes});
    ++e.launch_counts[std::string(kernel_name)];
  }
  e.kernel = std::string(kernel_name);
  e.grid = grid;
  e.block_dim = block;
  e.body = &thread_body;
  e.thread_error = nullptr;

  Watchdog& watchdog = Watchdog::instance();
  watchdog.enter(&e.kernel, s.time_limit_s + 30.0);
  try {
    run_launch(e, dynamic_shared_bytes, s);
  } catch (...) {
    watchdog.leave();
    // Threads stopped half-way through the kernel start afresh in the next launch.
    for (Block& b : e.blocks) {
      for (EmulatedThread& t : b.threads) {
        if (b.active && t.state != State::kDone && t.fiber != nullptr) t.fiber->reset();
      }
      b.active = false;
    }
    e.thread_error = nullptr;
    e.body = nullptr;
    throw;
  }
  watchdog.leave();
  e.body = nullptr;
}

const Schedule& schedule() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  return e.schedule;
}

void set_schedule(const Schedule& s) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  e.schedule = s;
}

ScopedMutation::ScopedMutation(Mutation m) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  id_ = e.next_mutation_id++;
  e.mutations.push_back(MutationState{id_, std::move(m), 0});
  mutations_active.store(true);
}

ScopedMutation::~ScopedMutation() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  std::erase_if(e.mutations, [&](const MutationState& m) { return m.id == id_; });
  mutations_active.store(!e.mutations.empty());
}

int64_t ScopedMutation::hits() const {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  for (const MutationState& m : e.mutations) {
    if (m.id == id_) return m.hits;
  }
  return 0;
}

ScopedSiteCatalog::ScopedSiteCatalog() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  if (e.catalogs++ == 0) e.catalog.clear();
}

ScopedSiteCatalog::~ScopedSiteCatalog() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  --e.catalogs;
}

std::vector<CallSite> ScopedSiteCatalog::sites() const {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  std::vector<CallSite> out(e.catalog.begin(), e.catalog.end());
  std::sort(out.begin(), out.end(), [](const CallSite& a, const CallSite& b) {
    return std::tie(a.file, a.line, a.primitive) < std::tie(b.file, b.line, b.primitive);
  });
  return out;
}

std::vector<LaunchRecord> launch_log() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  return e.log;
}

void clear_launch_log() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  e.log.clear();
}

std::vector<std::pair<std::string, int64_t>> kernel_launch_counts() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.settings_mutex);
  return {e.launch_counts.begin(), e.launch_counts.end()};
}

// ---------------------------------------------------------------------------------------------
// Primitives.

void outside_kernel(const char* primitive) {
  throw EmulatorError(std::string(primitive) +
                      " used outside a kernel launched through the emulator");
}

int mutated_thread_idx(Primitive p, const std::source_location& site) {
  const EmulatedThread& t = current(primitive_name(p));
  if (cataloguing()) record_site(p, site);
  const bool x = p == Primitive::kThreadIdxX;
  if (mutated(p, site)) return x ? t.visible.thread_y : t.visible.thread_x;
  return x ? t.visible.thread_x : t.visible.thread_y;
}

void barrier(const std::source_location& site) {
  EmulatedThread& t = current("__syncthreads");
  if (cataloguing()) record_site(Primitive::kSyncThreads, site);
  if (mutated(Primitive::kSyncThreads, site)) return;
  Block& b = *t.block;
  if (b.at_barrier > 0 && !same_site(b.barrier_site, site)) {
    throw EmulatorError("divergent __syncthreads: this thread reached " +
                        describe_site(Primitive::kSyncThreads, site) +
                        " while other threads of its block wait at " +
                        describe_site(Primitive::kSyncThreads, b.barrier_site));
  }
  if (b.at_barrier == 0) b.barrier_site = site;
  t.site = site;
  if (++b.at_barrier == static_cast<int>(b.threads.size())) {
    b.at_barrier = 0;
    for (EmulatedThread& other : b.threads) {
      if (other.state == State::kBarrier) other.state = State::kReady;
    }
  } else {
    t.state = State::kBarrier;
  }
  // The thread completing the barrier yields too: which thread goes on first after a barrier
  // is the schedule's choice, not the arrival order's.
  suspend(t);
}

void warp_op(Primitive p, unsigned mask, const void* in, void* out, size_t bytes, int operand,
             const std::source_location& site) {
  EmulatedThread& t = current(primitive_name(p));
  if (cataloguing()) record_site(p, site);
  Block& b = *t.block;
  const int warp = t.linear / kWarpSize;
  const int lane = t.linear % kWarpSize;
  const int lanes = std::min<int>(kWarpSize, static_cast<int>(b.threads.size()) - warp * kWarpSize);
  const unsigned existing = lanes == kWarpSize ? kFullWarpMask : (1u << lanes) - 1u;
  std::ostringstream problem;
  if (((mask >> lane) & 1u) == 0) {
    problem << "lane " << lane << " calls " << describe_site(p, site) << " with mask 0x"
            << std::hex << mask << ", which excludes the calling lane";
  } else if ((mask & ~existing) != 0) {
    problem << describe_site(p, site) << " with mask 0x" << std::hex << mask
            << " names lanes that do not exist: the block has " << std::dec << b.threads.size()
            << " threads, not whole warps";
  }
  if (!problem.str().empty()) throw EmulatorError(problem.str());

  t.op = p;
  t.site = site;
  t.mask = mask;
  t.operand = operand;
  t.bytes = bytes;
  if (bytes > 0) std::memcpy(t.value, in, bytes);
  unsigned& waiting = b.warp_waiting[warp];
  waiting |= 1u << lane;
  if ((waiting & mask) != mask) {
    t.state = State::kWarp;
    suspend(t);
    if (bytes > 0) std::memcpy(out, t.result, bytes);
    return;
  }

  // Every lane named by the mask is here: they must all be in this same operation.
  EmulatedThread* first = &b.threads[warp * kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) {
    if (((mask >> l) & 1u) == 0) continue;
    const EmulatedThread& o = first[l];
    if (o.op != p || !same_site(o.site, site) || o.mask != mask || o.bytes != bytes) {
      std::ostringstream os;
      os << "divergent warp operation in warp " << warp << ": lane " << lane << " is at "
         << describe_site(p, site) << " with mask 0x" << std::hex << mask << " but lane "
         << std::dec << l << " is at " << describe_site(o.op, o.site) << " with mask 0x"
         << std::hex << o.mask;
      throw EmulatorError(os.str());
    }
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (((mask >> l) & 1u) == 0) continue;
    EmulatedThread& o = first[l];
    if (bytes > 0) {
      int source = l;
      if (p == Primitive::kShuffleXor) {
        source = l ^ operand;
      } else if (p == Primitive::kShuffleDown) {
        source = l + operand < kWarpSize ? l + operand : l;  // beyond the warp: own value
      }
      if (source < 0 || source >= kWarpSize || ((mask >> source) & 1u) == 0) {
        std::ostringstream os;
        os << "lane " << l << " of warp " << warp << " reads lane " << source << " in "
           << describe_site(p, site) << ", which is not in the mask 0x" << std::hex << mask
           << " (undefined on the hardware)";
        throw EmulatorError(os.str());
      }
      std::memcpy(o.result, first[source].value, bytes);
    }
    o.state = State::kReady;
  }
  waiting &= ~mask;
  suspend(t);  // as after a barrier, the schedule picks which lane goes on first
  if (bytes > 0) std::memcpy(out, t.result, bytes);
}

void yield_point(Primitive p, const std::source_location& site) {
  EmulatedThread& t = current(primitive_name(p));
  if (cataloguing()) record_site(p, site);
  suspend(t);  // stays kReady: runs again later in this round or in the next
}

void* static_shared(const void* key, size_t bytes, size_t align) {
  EmulatedThread& t = current("__shared__ memory");
  Block& b = *t.block;
  for (auto& [k, storage] : b.statics) {
    if (k == key) return storage.get();
  }
  if (align > 16) throw EmulatorError("static shared memory aligned beyond 16 bytes");
  auto storage = std::make_unique<unsigned char[]>(std::max<size_t>(bytes, 1));
  std::memset(storage.get(), kPoison, bytes);
  void* p = storage.get();
  b.statics.emplace_back(key, std::move(storage));
  return p;
}

}  // namespace emu
}  // namespace dev
}  // namespace custom_bn

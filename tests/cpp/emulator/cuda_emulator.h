#pragma once
// CPU emulator of the CUDA device primitives of kernels/cuda/device_primitives.cuh: with
// CUSTOM_BN_CUDA_EMULATOR defined, the real kernel bodies of kernels/cuda/*.cuh compile as
// ordinary C++ and run here, on a machine without a GPU.
//
// Execution model (cuda_emulator.cpp). Each thread of a block is a fiber with its own stack; a
// single OS thread runs them round-robin and switches only where CUDA threads synchronize or
// communicate: __syncthreads, warp shuffles and __syncwarp, fences and atomics. So every run is
// deterministic for a given Schedule, and synchronization errors are exact rather than timing
// dependent:
//  - __syncthreads releases only when every thread of the block waits at the same call site;
//    a shuffle or __syncwarp only when every lane named by the mask is at the same call site.
//    A waiting thread is simply not resumed, so no wait can hang: when no thread of a block
//    can move (some exited or wait elsewhere), which is what a timeout on the wait would
//    approximate, the launch fails at once with an EmulatorError listing where each group of
//    threads waits, with kernel file and line.
//  - Every launch is bounded in time: past Schedule::time_limit_s (for instance a block
//    spin-waiting for another block) it fails at the next synchronization point; kernel code
//    that never reaches one again is caught by a watchdog, which aborts the process naming the
//    kernel.
//  - Shared memory (static and dynamic) is per block and filled with 0xFF bytes (NaN as float
//    and double) at block start, so reading a slot nobody wrote poisons the result; dynamic
//    shared memory is followed by a guard zone that is checked when the block finishes.
//  - Launch configurations are checked against the hardware limits (block <= 1024 threads,
//    grid.y <= 65535, dynamic shared memory <= 48 KiB).
// Blocks of a grid run `resident_blocks` at a time, their threads interleaved, in linear or
// seeded random order. The order of threads within a round, threads stalling for some rounds and
// threads held back as long as anything else can run are Schedule choices as well, so a missing
// barrier shows up as a result that depends on the schedule. Every synchronization point is a
// scheduling point for every thread, the one that completes a barrier included.
//
// For tests of the harness itself, a Mutation alters one call site of a real kernel at run
// time: skip a __syncthreads, or let threadIdx.x and threadIdx.y trade places. Call sites are
// identified by std::source_location, passed as a defaulted argument of every primitive.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace custom_bn {
namespace dev {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

namespace emu {

enum class Primitive : uint8_t {
  kSyncThreads,
  kSyncWarp,
  kShuffleXor,
  kShuffleDown,
  kThreadFence,
  kAtomicAdd,
  kThreadIdxX,
  kThreadIdxY,
};
const char* primitive_name(Primitive p);

// A misused primitive, a divergent barrier or shuffle, an invalid launch configuration, an
// overrun of shared memory or a launch over its time limit.
class EmulatorError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Dim2 {
  int64_t x = 1;
  int64_t y = 1;
};

enum class ThreadOrder : uint8_t {
  kForward,  // threads of a block in linear order in every round
  kReverse,
  kRandom,  // a fresh seeded permutation every round
};

struct Schedule {
  ThreadOrder order = ThreadOrder::kForward;
  int resident_blocks = 2;      // blocks whose threads interleave
  bool shuffle_blocks = true;   // start blocks in a seeded random order, not linear order
  // Each round, a runnable thread starts to stall with this probability and then sits out a
  // geometrically distributed number of rounds (mean stall_rounds) unless nothing else can run:
  // threads drift apart by several synchronization points, as warps of a real block do when
  // one of them is descheduled.
  double stall_probability = 0.0;
  double stall_rounds = 1.0;
  // Threads per block (chosen at random) that run only when no other thread of the grid can:
  // the adversary of every "wait until the others are done" assumption, such as a block
  // signalling arrival before all of its threads stored their partial results.
  int laggers = 0;
  uint64_t seed = 0x5eed;
  double time_limit_s = 120.0;  // per launch
};

// Alters every call of `primitive` whose call site lies in a function whose name contains
// `function` (and is on `line`, unless 0): kSyncThreads is skipped, kThreadIdxX / kThreadIdxY
// return the other axis.
struct Mutation {
  Primitive primitive = Primitive::kSyncThreads;
  std::string function;
  unsigned line = 0;
};

struct CallSite {
  Primitive primitive;
  std::string function;  // as std::source_location::function_name() spells it
  std::string file;
  unsigned line;

  auto operator<=>(const CallSite&) const = default;
};

struct LaunchRecord {
  std::string kernel;
  Dim2 grid;
  Dim2 block;
  int64_t dynamic_shared_bytes;
};

// ---------------------------------------------------------------------------------------------
// Host API (cuda_emulator.cpp). Launches run on the calling OS thread, one at a time.

// Runs thread_body once per thread of the grid, as the body of a kernel.
void run_grid(std::string_view kernel_name, Dim2 grid, Dim2 block, int64_t dynamic_shared_bytes,
              const std::function<void()>& thread_body);

// The launch of the contract: kernel(args...) on every thread of the grid.
template <typename Kernel, typename... Args>
void launch(Dim2 grid, Dim2 block, int64_t dynamic_shared_bytes, Kernel kernel,
            const Args&... args) {
  run_grid("kernel", grid, block, dynamic_shared_bytes, [&] { kernel(args...); });
}

const Schedule& schedule();
void set_schedule(const Schedule& s);

class ScopedSchedule {
 public:
  explicit ScopedSchedule(const Schedule& s) : saved_(schedule()) { set_schedule(s); }
  ~ScopedSchedule() { set_schedule(saved_); }
  ScopedSchedule(const ScopedSchedule&) = delete;
  ScopedSchedule& operator=(const ScopedSchedule&) = delete;

 private:
  Schedule saved_;
};

// Applies a mutation while alive; hits() counts the calls it altered, so a test can tell a
// mutation that was caught from one that never ran.
class ScopedMutation {
 public:
  explicit ScopedMutation(Mutation m);
  ~ScopedMutation();
  ScopedMutation(const ScopedMutation&) = delete;
  ScopedMutation& operator=(const ScopedMutation&) = delete;
  int64_t hits() const;

 private:
  int id_;
};

// Records the call sites of synchronization and index primitives reached while alive.
class ScopedSiteCatalog {
 public:
  ScopedSiteCatalog();
  ~ScopedSiteCatalog();
  ScopedSiteCatalog(const ScopedSiteCatalog&) = delete;
  ScopedSiteCatalog& operator=(const ScopedSiteCatalog&) = delete;
  std::vector<CallSite> sites() const;  // sorted by file, line
};

// Every launch since the last clear, and how often each kernel name was launched this process.
std::vector<LaunchRecord> launch_log();
void clear_launch_log();
std::vector<std::pair<std::string, int64_t>> kernel_launch_counts();

// ---------------------------------------------------------------------------------------------
// What the inline primitives below need from the engine.

struct ThreadState {
  int thread_x, thread_y;
  int block_x, block_y;
  int block_dim_x, block_dim_y;
  int grid_dim_x, grid_dim_y;
  unsigned char* dynamic_shared;
};

// The emulated thread whose fiber is running on this OS thread; null outside kernels.
inline thread_local const ThreadState* current_thread = nullptr;
// True while a ScopedMutation is alive: index accessors then take the slow path.
inline std::atomic<bool> mutations_active{false};

[[noreturn]] void outside_kernel(const char* primitive);
int mutated_thread_idx(Primitive p, const std::source_location& site);
void barrier(const std::source_location& site);
void warp_op(Primitive p, unsigned mask, const void* in, void* out, size_t bytes, int operand,
             const std::source_location& site);
void yield_point(Primitive p, const std::source_location& site);
void* static_shared(const void* key, size_t bytes, size_t align);

inline const ThreadState& self(const char* primitive) {
  const ThreadState* t = current_thread;
  if (t == nullptr) outside_kernel(primitive);
  return *t;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The primitives of device_primitives.cuh. The trailing std::source_location defaults to the
// caller's position, which names the kernel line in diagnostics and mutations.

inline int thread_idx_x(std::source_location site = std::source_location::current()) {
  const emu::ThreadState& t = emu::self("threadIdx.x");
  if (emu::mutations_active.load(std::memory_order_relaxed)) [[unlikely]] {
    return emu::mutated_thread_idx(emu::Primitive::kThreadIdxX, site);
  }
  return t.thread_x;
}
inline int thread_idx_y(std::source_location site = std::source_location::current()) {
  const emu::ThreadState& t = emu::self("threadIdx.y");
  if (emu::mutations_active.load(std::memory_order_relaxed)) [[unlikely]] {
    return emu::mutated_thread_idx(emu::Primitive::kThreadIdxY, site);
  }
  return t.thread_y;
}
inline int block_idx_x() { return emu::self("blockIdx.x").block_x; }
inline int block_idx_y() { return emu::self("blockIdx.y").block_y; }
inline int block_dim_x() { return emu::self("blockDim.x").block_dim_x; }
inline int block_dim_y() { return emu::self("blockDim.y").block_dim_y; }
inline int grid_dim_x() { return emu::self("gridDim.x").grid_dim_x; }
inline int grid_dim_y() { return emu::self("gridDim.y").grid_dim_y; }

inline void sync_threads(std::source_location site = std::source_location::current()) {
  emu::barrier(site);
}

inline void sync_warp(unsigned mask, std::source_location site = std::source_location::current()) {
  emu::warp_op(emu::Primitive::kSyncWarp, mask, nullptr, nullptr, 0, 0, site);
}

// Every thread of the emulator shares one address space and runs on one OS thread, so a fence
// has nothing to order; it is a point where other blocks' threads may run, which is what lets
// the last-block-done handshake interleave with other blocks.
inline void thread_fence(std::source_location site = std::source_location::current()) {
  emu::yield_point(emu::Primitive::kThreadFence, site);
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask,
           std::source_location site = std::source_location::current()) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16,
                "warp shuffles move trivially copyable values of at most 16 bytes");
  T out;
  emu::warp_op(emu::Primitive::kShuffleXor, mask, &value, &out, sizeof(T), lane_mask, site);
  return out;
}

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta,
            std::source_location site = std::source_location::current()) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16,
                "warp shuffles move trivially copyable values of at most 16 bytes");
  T out;
  emu::warp_op(emu::Primitive::kShuffleDown, mask, &value, &out, sizeof(T),
               static_cast<int>(delta), site);
  return out;
}

template <typename T>
inline T emulated_atomic_add(T* address, T value, const std::source_location& site) {
  emu::yield_point(emu::Primitive::kAtomicAdd, site);
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline float atomic_add(float* address, float value,
                        std::source_location site = std::source_location::current()) {
  return emulated_atomic_add(address, value, site);
}
inline double atomic_add(double* address, double value,
                         std::source_location site = std::source_location::current()) {
  return emulated_atomic_add(address, value, site);
}
inline int atomic_add(int* address, int value,
                      std::source_location site = std::source_location::current()) {
  return emulated_atomic_add(address, value, site);
}
inline unsigned atomic_add(unsigned* address, unsigned value,
                           std::source_location site = std::source_location::current()) {
  return emulated_atomic_add(address, value, site);
}

template <typename T>
T* dynamic_shared() {
  static_assert(alignof(T) <= 16, "dynamic shared memory is 16-byte aligned");
  return reinterpret_cast<T*>(emu::self("dynamic shared memory").dynamic_shared);
}

inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline double sqrt(double x) { return std::sqrt(x); }

}  // namespace dev
}  // namespace custom_bn

// One storage per declaration (the address of a function-local static tells them apart, per
// template instantiation as in CUDA) and per block, created on first use in the block.
#define CBN_STATIC_SHARED(type, name, count)                                                  \
  static_assert(std::is_trivially_default_constructible_v<type>,                              \
                "shared memory holds trivially constructible values, as __shared__ requires"); \
  static constexpr char name##_cbn_shared_key = 0;                                             \
  type* const name = static_cast<type*>(::custom_bn::dev::emu::static_shared(                  \
      &name##_cbn_shared_key, sizeof(type) * (count), alignof(type)))

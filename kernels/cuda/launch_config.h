#pragma once
// Grid, block and shared-memory sizes of the CUDA batch-norm kernels. Plain host C++ with no
// CUDA headers, used by the launch sequence of batch_norm_launch.h, which the real launchers
// (batch_norm_kernel.cu) and the emulated kernel tests (tests/cpp/emulator) share, so every
// kernel runs with the same configurations in both.
//
// Two layouts (see batch_norm_kernel.cuh):
//  - contiguous: channel c is N runs of HW contiguous values. grid.x = C (one channel per
//    block), block = (bx threads along HW, by along N); grid.y = splits_n * splits_s blocks share
//    a channel, splits_n of them along N and splits_s along HW.
//  - channels-last (also any input with HW == 1): rows of C contiguous values. grid.x = tiles of
//    bx channels (threads along x read consecutive channels: coalesced), block.y threads and
//    grid.y blocks walk the rows.
// Reductions merge the grid.y partial results of a channel in the last block to finish, so they
// need a workspace of partial_slots() values per field and counters() zeroed counters.
#include <algorithm>
#include <cstdint>

#include "../common/geometry.h"

namespace custom_bn {
namespace cuda_launch {

using custom_bn::choose_layout;
using custom_bn::Geometry;
using custom_bn::Layout;

// Knobs of the heuristics. The launchers use the defaults; emulated tests may shrink them to
// reach multi-block reductions on small shapes.
struct Tuning {
  int threads = 256;                   // per block; rounded down to a power of two in [32, 1024]
  int reduce_blocks_per_sm = 8;        // 8 x 256 threads fill an SM of 2048 threads
  int elementwise_blocks_per_sm = 16;  // more blocks hide the latency of streaming kernels
  int reduce_items_per_thread = 16;    // a split must give each thread at least this much work
  int elementwise_items_per_thread = 4;
  // Inputs with fewer elements use 32-bit indices in the kernels. Grid-stride loops overshoot
  // their bound by up to one stride (< 2^27 with grid.y <= 65535 and <= 1024 threads), so stay
  // clear of INT32_MAX; tests lower it to reach the 64-bit kernels on small shapes.
  int64_t max_numel_32bit_index = int64_t(1) << 30;
};

struct LaunchConfig {
  int64_t grid_x = 1;
  int64_t grid_y = 1;
  int block_x = 1;
  int block_y = 1;
  int64_t shared_bytes = 0;  // dynamic shared memory
  int splits_n = 1;          // contiguous layout: how many of the grid.y blocks split along N

  int threads() const { return block_x * block_y; }
};

constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridY = 65535;
// Contiguous splits come as splits_n * splits_s <= 2 * wanted, which must stay within grid.y.
constexpr int64_t kMaxSplits = kMaxGridY / 2;
constexpr int64_t kPerChannelMaxBlocks = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= v, clamped to [1, cap] (cap a power of two).
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < cap && p < v) p *= 2;
  return p;
}

inline int block_threads(const Tuning& t) {
  const int wanted = std::clamp(t.threads, kWarpSize, 1024);
  int p = kWarpSize;
  while (p * 2 <= wanted) p *= 2;
  return p;
}

// Block shape and grid for either layout. Blocks always hold a power-of-two number of threads
// >= 32 (whole warps, as the warp-shuffle reductions require) and block.y is a power of two.
// target_blocks: how many blocks fill the device; the split count along the reduced dimension
// grows towards it but stops where a thread would get fewer than items_per_thread values.
inline LaunchConfig tile(const Geometry& g, int64_t target_blocks, int items_per_thread,
                         const Tuning& t) {
  const int threads = block_threads(t);
  LaunchConfig cfg;
  if (g.layout == Layout::kContiguous) {
    cfg.block_x = pow2_at_least(g.hw, threads);
    cfg.block_y = pow2_at_least(g.n, threads / cfg.block_x);
    if (cfg.threads() < kWarpSize) cfg.block_y = kWarpSize / cfg.block_x;
    cfg.grid_x = std::max<int64_t>(g.c, 1);
  } else {
    cfg.block_x = pow2_at_least(g.c, std::min(kWarpSize, threads));
    cfg.block_y = pow2_at_least(g.rows(), threads / cfg.block_x);
    if (cfg.threads() < kWarpSize) cfg.block_y = kWarpSize / cfg.block_x;
    cfg.grid_x = std::max<int64_t>(ceil_div(g.c, cfg.block_x), 1);
  }

  int64_t wanted = std::clamp<int64_t>(ceil_div(target_blocks, cfg.grid_x), 1, kMaxSplits);
  const int64_t enough_work =
      ceil_div(g.count(), int64_t(cfg.threads()) * std::max(items_per_thread, 1));
  wanted = std::max<int64_t>(std::min(wanted, enough_work), 1);

  if (g.layout == Layout::kContiguous) {
    const int64_t splits_n =
        std::clamp<int64_t>(ceil_div(g.n, cfg.block_y), 1, wanted);  // N first: whole runs
    const int64_t splits_s =
        std::clamp<int64_t>(ceil_div(g.hw, cfg.block_x), 1, ceil_div(wanted, splits_n));
    cfg.splits_n = static_cast<int>(splits_n);
    cfg.grid_y = splits_n * splits_s;
  } else {
    cfg.grid_y = std::clamp<int64_t>(ceil_div(g.rows(), cfg.block_y), 1, wanted);
  }
  return cfg;
}

// Scratch of a block reduction carrying `fields` values of acc_bytes each per thread: one
// entry per warp (contiguous: shuffles then shared memory) or per thread (channels-last: a tree
// over block.y in shared memory).
inline int64_t reduce_shared_bytes(const LaunchConfig& cfg, Layout layout, int fields,
                                   int acc_bytes) {
  const int64_t entries =
      layout == Layout::kContiguous ? cfg.threads() / kWarpSize : int64_t(cfg.threads());
  return entries * fields * acc_bytes;
}

inline LaunchConfig reduce_launch(const Geometry& g, int fields, int acc_bytes, int num_sms,
                                  const Tuning& t) {
  LaunchConfig cfg = tile(g, int64_t(std::max(num_sms, 1)) * t.reduce_blocks_per_sm,
                          t.reduce_items_per_thread, t);
  cfg.shared_bytes = reduce_shared_bytes(cfg, g.layout, fields, acc_bytes);
  return cfg;
}

// batch_norm_collect_stats_*_kernel: Welford (mean, m2, count) per thread.
inline LaunchConfig collect_stats_launch(const Geometry& g, int acc_bytes, int num_sms,
                                         const Tuning& t = Tuning{}) {
  return reduce_launch(g, 3, acc_bytes, num_sms, t);
}

// batch_norm_backward_reduce_*_kernel: (sum_dy, sum_dy_xmu) per thread.
inline LaunchConfig backward_reduce_launch(const Geometry& g, int acc_bytes, int num_sms,
                                           const Tuning& t = Tuning{}) {
  return reduce_launch(g, 2, acc_bytes, num_sms, t);
}

// batch_norm_transform_*_kernel and batch_norm_backward_elementwise_*_kernel.
inline LaunchConfig elementwise_launch(const Geometry& g, int num_sms,
                                       const Tuning& t = Tuning{}) {
  return tile(g, int64_t(std::max(num_sms, 1)) * t.elementwise_blocks_per_sm,
              t.elementwise_items_per_thread, t);
}

// batch_norm_eval_stats_kernel: one thread per channel, grid-stride beyond the cap.
inline LaunchConfig per_channel_launch(int64_t c, const Tuning& t = Tuning{}) {
  LaunchConfig cfg;
  cfg.block_x = block_threads(t);
  cfg.grid_x = std::clamp<int64_t>(ceil_div(c, cfg.block_x), 1, kPerChannelMaxBlocks);
  return cfg;
}

// Workspace of a reduction launched with cfg: partial results per field (grid.y per channel)
// and the per-block-column arrival counters, which must start at zero.
inline int64_t partial_slots(const LaunchConfig& cfg, const Geometry& g) {
  return g.c * cfg.grid_y;
}
inline int64_t counters(const LaunchConfig& cfg) { return cfg.grid_x; }

}  // namespace cuda_launch
}  // namespace custom_bn

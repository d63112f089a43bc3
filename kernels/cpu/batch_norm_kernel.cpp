// Arithmetic of the CPU batch-norm kernels. The build compiles this file once per
// instruction-set level (kernels/cpu/cpu_capabilities.txt): CPU_CAPABILITY names the level, its
// flags make at::vec use that vector width, and everything lands in
// custom_bn::cpu::<CPU_CAPABILITY>. The operator (batch_norm_cpu.cpp) picks one at run time.
//
// Layouts (kernels/common/geometry.h):
//  - contiguous (N, C, *): N*C runs of hw contiguous values; run r holds channel r % C.
//  - channels-last (and any input with hw == 1): R = N*hw rows of C contiguous values.
//
// Memory traffic is what these kernels spend, so the passes over the tensor are counted:
//  - contiguous, training: when the tensors exceed the cache and the channels spread evenly
//    over the threads, one task owns whole channels and normalizes (or, backward, computes dx
//    for) each channel right after its reduction, while the channel is still cached: one pass
//    from memory. Otherwise (tensors that fit in the cache; C = 1, 3, ... with large planes)
//    the runs are cut into pieces so that every thread has work; the pieces' partial results
//    are merged, then a second, elementwise pass follows, both in memory order.
//  - channels-last, training: a reduction pass over (row range x channel block) tiles, whose
//    partial results are merged per channel, then an elementwise pass: the statistics need
//    every row before the first output can be written.
//  - evaluation: one elementwise pass.
// Elementwise passes split the flat element range evenly over the threads, whatever the shape.
// Reductions accumulate cache-sized chunks in the accumulation type with the corrected two-pass
// formula and merge chunks in double with Chan's formula (kernels/common/welford.h), so long or
// large-mean channels neither lose precision nor form E[x^2] - E[x]^2. Partial results are
// indexed by task, not by thread, so a result does not depend on which thread ran what.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "batch_norm_kernel.h"
#include "common/batch_norm_math.h"
#include "common/welford.h"

#ifndef CPU_CAPABILITY
#error "batch_norm_kernel.cpp is compiled once per CPU_CAPABILITY (see kernels/cpu/cpu_capabilities.txt)"
#endif
#define CUSTOM_BN_STRINGIFY_(x) #x
#define CUSTOM_BN_STRINGIFY(x) CUSTOM_BN_STRINGIFY_(x)

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Values of a contiguous statistics chunk: its two passes run while it sits in L1.
constexpr int64_t kChunk = 4096;
// Channels-last chunks: about this many values (their second pass hits L2), and at most
// kMaxChunkRows rows, so that a channel's float accumulator sums few enough terms to keep
// float32 accuracy.
constexpr int64_t kRowChunk = 32768;
constexpr int64_t kMaxChunkRows = 512;
// Widest channel block of a channels-last reduction task.
constexpr int64_t kMaxBlockChannels = 1024;
// Fewer elements per task cost more in threading than they save.
constexpr int64_t kGrain = 32768;
// Split reductions aim at this many tasks per thread, for load balance.
constexpr int64_t kTasksPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Loads and stores of scalar_t values as pairs of vectors of the accumulation type: a step is
// 2 vectors' worth of values, which is one vector of float16/bfloat16 (converted in one go) and
// gives the reductions two independent accumulator chains.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using Pair = std::pair<Vec, Vec>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kStep = 2 * kWidth;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kStep);

  static Pair load2(const scalar_t* p) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      return {lo, hi};
    } else {
      return {Vec::loadu(p), Vec::loadu(p + kWidth)};
    }
  }
  // The first `count` < kStep values; the other lanes are unspecified.
  static Pair load2(const scalar_t* p, int64_t count) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
      return {lo, hi};
    } else {
      return load_acc2(p, count);
    }
  }
  static void store2(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kWidth);
    }
  }
  static void store2(scalar_t* p, const Vec& lo, const Vec& hi, int64_t count) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p, count);
    } else {
      lo.store(p, std::min(count, kWidth));
      if (count > kWidth) hi.store(p + kWidth, count - kWidth);
    }
  }
  // Per-channel coefficients (acc_t arrays), whole or the first `count` values.
  static Pair load_acc2(const acc_t* p) { return {Vec::loadu(p), Vec::loadu(p + kWidth)}; }
  static Pair load_acc2(const acc_t* p, int64_t count) {
    return {Vec::loadu(p, std::min(count, kWidth)),
            count > kWidth ? Vec::loadu(p + kWidth, count - kWidth) : Vec(acc_t(0))};
  }
  static void store_acc2(acc_t* p, const Pair& v, int64_t count = kStep) {
    v.first.store(p, std::min(count, kWidth));
    if (count > kWidth) v.second.store(p + kWidth, count - kWidth);
  }

  // The same for a step of `count` values, count being std::true_type for a whole step (no
  // masking) or an int64_t below kStep.
  template <typename Count>
  static Pair load(const scalar_t* p, Count count) {
    if constexpr (std::is_same_v<Count, std::true_type>) return load2(p);
    else return load2(p, count);
  }
  template <typename Count>
  static Pair load_acc(const acc_t* p, Count count) {
    if constexpr (std::is_same_v<Count, std::true_type>) return load_acc2(p);
    else return load_acc2(p, count);
  }
  template <typename Count>
  static void store(scalar_t* p, const Pair& v, Count count) {
    if constexpr (std::is_same_v<Count, std::true_type>) store2(p, v.first, v.second);
    else store2(p, v.first, v.second, count);
  }
  template <typename Count>
  static void store_acc(acc_t* p, const Pair& v, Count count) {
    if constexpr (std::is_same_v<Count, std::true_type>) store_acc2(p, v);
    else store_acc2(p, v, count);
  }
};

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// ------------------------------------------------------------------ contiguous runs

// Corrected two-pass statistics of n <= kChunk contiguous values: the second pass also sums the
// deviations, and subtracting (sum d)^2 / n removes the effect of the first-pass mean's
// rounding error on M2.
template <typename scalar_t>
WelfordStats<double> chunk_stats(const scalar_t* x, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    const auto [a, b] = IO::load2(x + i);
    s0 += a;
    s1 += b;
  }
  acc_t sum = horizontal_sum(s0 + s1);
  for (int64_t j = i; j < n; ++j) sum += acc_t(x[j]);
  const acc_t mean = sum / acc_t(n);

  const Vec vmean(mean);
  Vec dev0(acc_t(0)), dev1(acc_t(0)), m0(acc_t(0)), m1(acc_t(0));
  for (int64_t j = 0; j < i; j += IO::kStep) {
    const auto [a, b] = IO::load2(x + j);
    const Vec d0 = a - vmean, d1 = b - vmean;
    dev0 += d0;
    dev1 += d1;
    m0 = at::vec::fmadd(d0, d0, m0);
    m1 = at::vec::fmadd(d1, d1, m1);
  }
  acc_t m2 = horizontal_sum(m0 + m1), dev = horizontal_sum(dev0 + dev1);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - mean;
    dev += d;
    m2 += d * d;
  }
  const double dev_mean = double(dev) / double(n);
  // No clamp at 0: a NaN or Inf in the data must reach the variance, as in torch.
  return {double(mean) + dev_mean, double(m2) - double(dev) * dev_mean, double(n)};
}

template <typename scalar_t>
WelfordStats<double> run_stats(const scalar_t* x, int64_t n) {
  WelfordStats<double> s;
  for (int64_t off = 0; off < n; off += kChunk) {
    s = welford_merge(s, chunk_stats(x + off, std::min(kChunk, n - off)));
  }
  return s;
}

struct GradSums {
  double dy = 0;   // sum(dy)
  double dot = 0;  // sum(dy * (x - mean))

  void add(const GradSums& o) {
    dy += o.dy;
    dot += o.dot;
  }
};

template <typename scalar_t>
GradSums run_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n,
                       at::opmath_type<scalar_t> mean) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const Vec vmean(mean);
  GradSums total;
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t end = std::min(n, off + kChunk);
    Vec s0(acc_t(0)), s1(acc_t(0)), d0(acc_t(0)), d1(acc_t(0));
    int64_t i = off;
    for (; i + IO::kStep <= end; i += IO::kStep) {
      const auto [g0, g1] = IO::load2(dy + i);
      const auto [x0, x1] = IO::load2(x + i);
      s0 += g0;
      s1 += g1;
      d0 = at::vec::fmadd(g0, x0 - vmean, d0);
      d1 = at::vec::fmadd(g1, x1 - vmean, d1);
    }
    acc_t sum = horizontal_sum(s0 + s1), dot = horizontal_sum(d0 + d1);
    for (; i < end; ++i) {
      const acc_t g = acc_t(dy[i]);
      sum += g;
      dot += g * (acc_t(x[i]) - mean);
    }
    total.add({double(sum), double(dot)});
  }
  return total;
}

// ------------------------------------------------------------------ elementwise passes

// out = a * ka + (b - shift) * kb + kc, with the b term only when b is given: the normalize pass
// (a = x; ka = alpha, kc = beta) and the grad_input pass (a = dy, b = x, shift = mean). The
// coefficients are per channel.
template <typename acc_t>
struct Coeffs {
  const acc_t* ka;
  const acc_t* kc;
  const acc_t* shift = nullptr;
  const acc_t* kb = nullptr;
};

// out[i] = a[i] * ka + (b[i] - shift) * kb + kc for i < n: one channel's values (contiguous
// layout), the b term only when b is given.
template <typename scalar_t, typename acc_t>
void affine_run(scalar_t* out, const scalar_t* a, const scalar_t* b, acc_t ka, acc_t kc,
                acc_t shift, acc_t kb, int64_t n) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const Vec vka(ka), vkb(kb), vkc(kc), vshift(shift);
  const auto step = [&](int64_t i, auto count) {
    const Pair x = IO::load(a + i, count);
    Vec t0 = vkc, t1 = vkc;
    if (b) {
      const Pair y = IO::load(b + i, count);
      t0 = at::vec::fmadd(y.first - vshift, vkb, vkc);
      t1 = at::vec::fmadd(y.second - vshift, vkb, vkc);
    }
    IO::store(out + i, Pair{at::vec::fmadd(x.first, vka, t0), at::vec::fmadd(x.second, vka, t1)},
              count);
  };
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) step(i, std::true_type{});
  if (i < n) step(i, n - i);
}

// Channels-last loops walk rows in blocks of kBlockRows and, within a block, one channel step
// (kStep channels, or the last few) at a time: the step's coefficients or accumulators stay in
// registers while the block's rows go by, and a block of rows (a few KiB) stays in L1 until
// its last step.
constexpr int64_t kBlockRows = 16;

// Calls f(row_begin, row_end, c, count) for each block of rows in [r0, r1) and each channel step
// in [c0, c1); count is std::true_type for a whole step, else the number of channels left.
template <typename scalar_t, typename F>
void for_each_block_step(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const F& f) {
  constexpr int64_t kStep = VecIO<scalar_t>::kStep;
  for (int64_t rb = r0; rb < r1; rb += kBlockRows) {
    const int64_t re = std::min(r1, rb + kBlockRows);
    int64_t c = c0;
    for (; c + kStep <= c1; c += kStep) f(rb, re, c, std::true_type{});
    if (c < c1) f(rb, re, c, c1 - c);
  }
}

// out = a * ka[c] + (b - shift[c]) * kb[c] + kc[c] over rows [r0, r1) x channels [c0, c1) of a
// channels-last tensor (b term only when b is given), row after row: a streaming pass reads
// and writes memory in order, and the coefficients come from L1.
template <typename scalar_t, typename acc_t>
void affine_tile(scalar_t* out, const scalar_t* a, const scalar_t* b, const Coeffs<acc_t>& k,
                 int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const auto step = [&](int64_t p, int64_t c, auto count) {
    const Pair x = IO::load(a + p, count);
    const Pair ka = IO::load_acc(k.ka + c, count), kc = IO::load_acc(k.kc + c, count);
    Vec t0 = kc.first, t1 = kc.second;
    if (b) {
      const Pair y = IO::load(b + p, count);
      const Pair shift = IO::load_acc(k.shift + c, count), kb = IO::load_acc(k.kb + c, count);
      t0 = at::vec::fmadd(y.first - shift.first, kb.first, t0);
      t1 = at::vec::fmadd(y.second - shift.second, kb.second, t1);
    }
    IO::store(out + p,
              Pair{at::vec::fmadd(x.first, ka.first, t0), at::vec::fmadd(x.second, ka.second, t1)},
              count);
  };
  for (int64_t r = r0; r < r1; ++r) {
    int64_t c = c0;
    for (; c + IO::kStep <= c1; c += IO::kStep) step(r * C + c, c, std::true_type{});
    if (c < c1) step(r * C + c, c, c1 - c);
  }
}

// Calls f(run, offset, length) for each piece of the flat range [begin, end) cut at the
// boundaries of runs of run_length values.
template <typename F>
void for_each_run_piece(int64_t begin, int64_t end, int64_t run_length, const F& f) {
  int64_t run = begin / run_length;  // one division per call: runs may be a single row
  int64_t offset = begin - run * run_length;
  while (begin < end) {
    const int64_t length = std::min(run_length - offset, end - begin);
    f(run, offset, length);
    begin += length;
    ++run;
    offset = 0;
  }
}

// out = a * ka + (b - shift) * kb + kc over the whole tensor, the flat range split evenly.
template <typename scalar_t, typename acc_t>
void elementwise(const Geometry& g, scalar_t* out, const scalar_t* a, const scalar_t* b,
                 const Coeffs<acc_t>& k) {
  const int64_t numel = g.n * g.c * g.hw;
  if (g.layout == Layout::kChannelsLast) {
    // Tasks: blocks of kBlockRows rows x blocks of at most kMaxBlockChannels channels.
    const int64_t col_blocks = ceil_div(g.c, kMaxBlockChannels);
    const int64_t block_channels = ceil_div(g.c, col_blocks);
    const int64_t row_blocks = ceil_div(g.rows(), kBlockRows);
    const int64_t grain = std::max<int64_t>(1, kGrain / (kBlockRows * block_channels));
    at::parallel_for(0, row_blocks * col_blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t / col_blocks) * kBlockRows;
        const int64_t c0 = (t % col_blocks) * block_channels;
        affine_tile(out, a, b, k, g.c, r0, std::min(g.rows(), r0 + kBlockRows), c0,
                    std::min(g.c, c0 + block_channels));
      }
    });
  } else {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      // Runs follow each other channel by channel: count c along instead of dividing per run.
      int64_t c = (begin / g.hw) % g.c;
      for_each_run_piece(begin, end, g.hw, [&](int64_t run, int64_t off, int64_t len) {
        const int64_t p = run * g.hw + off;
        affine_run(out + p, a + p, b ? b + p : nullptr, k.ka[c], k.kc[c],
                   k.shift ? k.shift[c] : acc_t(0), k.kb ? k.kb[c] : acc_t(0), len);
        if (off + len == g.hw && ++c == g.c) c = 0;
      });
    });
  }
}

// ------------------------------------------------------------------ contiguous reductions

// Whole channels per task when the channels spread evenly over the threads; else split runs.
// Bytes of cache that a second pass over a tensor can hit: the environment variable
// CUSTOM_BN_CPU_CACHE_BYTES, else the last-level cache (L3, else L2) that the C library reports.
int64_t cache_bytes() {
  if (const char* env = std::getenv("CUSTOM_BN_CPU_CACHE_BYTES")) return std::atoll(env);
  static const int64_t reported = [] {
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
      const long bytes = sysconf(name);
      if (bytes > 0) return int64_t(bytes);
    }
#endif
    return int64_t(8) << 20;
  }();
  return reported;
}

// Whole channels per task, each channel's second pass (normalize, grad_input) right after its
// reduction while it is cached, when the channels spread evenly over the threads and the
// tensors read (`bytes`) do not fit in the cache. Otherwise the split mode's two passes in
// memory order are faster: they stream, and the second one hits the cache; whole-channel
// tasks hop between N runs of hw values, which the hardware prefetchers follow poorly.
bool whole_channel_tasks(const Geometry& g, int64_t bytes) {
  const int64_t threads = at::get_num_threads();
  const bool balanced = g.c >= threads && (g.c % threads == 0 || g.c >= 8 * threads);
  return balanced && bytes > cache_bytes();
}

int64_t channel_grain(const Geometry& g) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.count()));
}

// The split mode: each of the N*C runs is cut into `parts` pieces of at most `length` values;
// task t covers piece t % parts of run t / parts.
struct RunPieces {
  int64_t parts;
  int64_t length;
  int64_t tasks;
};

RunPieces run_pieces(const Geometry& g) {
  const int64_t runs = g.n * g.c;
  const int64_t wanted = ceil_div(kTasksPerThread * at::get_num_threads(), runs);
  const int64_t parts = std::clamp<int64_t>(wanted, 1, ceil_div(g.hw, kChunk));
  const int64_t length = ceil_div(g.hw, parts);
  return {parts, length, runs * parts};
}

// Calls f(task, offset, length, channel) for every task of the split mode, in parallel; f
// stores its partial result by task index.
template <typename F>
void for_each_piece(const Geometry& g, const RunPieces& p, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / p.length);
  at::parallel_for(0, p.tasks, grain, [&](int64_t begin, int64_t end) {
    // Divisions once per call, then counted along (a piece can be as short as one plane).
    int64_t run = begin / p.parts, part = begin % p.parts, channel = run % g.c;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = part * p.length;
      const int64_t len = std::min(p.length, g.hw - off);
      if (len > 0) f(t, run * g.hw + off, len, channel);
      if (++part == p.parts) {
        part = 0;
        ++run;
        if (++channel == g.c) channel = 0;
      }
    }
  });
}

// Pieces of channel c, in a fixed order: piece k of run (n, c) is task (n * C + c) * parts + k.
template <typename T, typename F>
void for_channel_pieces(const Geometry& g, const RunPieces& p, const std::vector<T>& partial,
                        int64_t c, const F& f) {
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t k = 0; k < p.parts; ++k) f(partial[(n * g.c + c) * p.parts + k]);
  }
}

// ------------------------------------------------------------------ channels-last reductions

// Tasks of a channels-last reduction: `ranges` row ranges x `blocks` channel blocks.
struct RowTiles {
  int64_t ranges;
  int64_t range_rows;
  int64_t blocks;
  int64_t block_channels;
};

RowTiles row_tiles(const Geometry& g) {
  const int64_t rows = g.rows();
  const int64_t blocks = ceil_div(g.c, kMaxBlockChannels);
  const int64_t block_channels = ceil_div(g.c, blocks);
  const int64_t numel = rows * g.c;
  // Enough tasks for every thread, none smaller than the grain, none shorter than 8 rows
  // (shorter ones would spend more on merging than on reading).
  const int64_t wanted = std::min(kTasksPerThread * at::get_num_threads(),
                                  std::max<int64_t>(1, numel / kGrain));
  const int64_t ranges =
      std::clamp<int64_t>(ceil_div(wanted, blocks), 1, std::max<int64_t>(1, rows / 8));
  return {ranges, ceil_div(rows, ranges), blocks, block_channels};
}

// Calls f(row_begin, row_end, c0, c1, range) for every tile, in parallel.
template <typename F>
void for_each_tile(const Geometry& g, const RowTiles& t, const F& f) {
  at::parallel_for(0, t.ranges * t.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t range = task / t.blocks, block = task % t.blocks;
      const int64_t r0 = range * t.range_rows, r1 = std::min(g.rows(), r0 + t.range_rows);
      const int64_t c0 = block * t.block_channels, c1 = std::min(g.c, c0 + t.block_channels);
      if (r0 < r1 && c0 < c1) f(r0, r1, c0, c1, range);
    }
  });
}

// Statistics of rows [r0, r1) x channels [c0, c1), written to out[c0, c1), in one pass over
// the data. Each chunk of rows sums d = x - shift and d^2 per channel in the accumulation type,
// where the shift is the tile's first row for the first chunk and the tile's mean so far after
// that; the chunk's (mean, M2) = (shift + sum d / n, sum d^2 - (sum d)^2 / n) is then merged in
// double with Chan's formula. With the shift near the mean the subtraction does not cancel,
// whatever the mean's size (a plain E[x^2] - E[x]^2 would). Every channel of a tile has the
// same count, so the merge weight is computed once per chunk.
template <typename scalar_t>
void tile_stats(const scalar_t* x, const Geometry& g, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1, WelfordStats<double>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  // Indexed by channel - c0.
  std::vector<acc_t> shift(width), sum(width), sum_sq(width);
  std::vector<double> total_mean(width, 0.0), total_m2(width, 0.0);
  double total_count = 0;
  for (int64_t c = 0; c < width; ++c) shift[c] = acc_t(x[r0 * g.c + c0 + c]);
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(sum_sq.begin(), sum_sq.end(), acc_t(0));
    for_each_block_step<scalar_t>(r, r + nr, 0, width, [&](int64_t rb, int64_t re, int64_t c,
                                                           auto count) {
      const Pair k = IO::load_acc(shift.data() + c, count);
      Pair s1 = IO::load_acc(sum.data() + c, count), s2 = IO::load_acc(sum_sq.data() + c, count);
      for (int64_t i = rb; i < re; ++i) {
        const Pair v = IO::load(x + i * g.c + c0 + c, count);
        const Vec d0 = v.first - k.first, d1 = v.second - k.second;
        s1 = {s1.first + d0, s1.second + d1};
        s2 = {at::vec::fmadd(d0, d0, s2.first), at::vec::fmadd(d1, d1, s2.second)};
      }
      IO::store_acc(sum.data() + c, s1, count);
      IO::store_acc(sum_sq.data() + c, s2, count);
    });
    // Chan's merge of (total_count, total) with (nr, chunk), the weight shared by all channels.
    const double share = double(nr) / (total_count + double(nr));
    const double cross = total_count * share;
    for (int64_t c = 0; c < width; ++c) {
      const double d_mean = double(sum[c]) / double(nr);
      const double chunk_mean = double(shift[c]) + d_mean;
      const double chunk_m2 = double(sum_sq[c]) - double(sum[c]) * d_mean;
      const double delta = chunk_mean - total_mean[c];
      total_mean[c] += delta * share;
      total_m2[c] += chunk_m2 + delta * delta * cross;
      shift[c] = acc_t(total_mean[c]);
    }
    total_count += double(nr);
  }
  for (int64_t c = 0; c < width; ++c) out[c0 + c] = {total_mean[c], total_m2[c], total_count};
}

// sum(dy) and sum(dy * (x - mean)) of rows [r0, r1) x channels [c0, c1), written to out[c0, c1).
template <typename scalar_t>
void tile_grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                    const at::opmath_type<scalar_t>* mean, int64_t r0, int64_t r1, int64_t c0,
                    int64_t c1, GradSums* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Pair = typename IO::Pair;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  std::vector<acc_t> sum(width), dot(width);  // indexed by channel - c0
  for (int64_t c = c0; c < c1; ++c) out[c] = GradSums{};
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(dot.begin(), dot.end(), acc_t(0));
    for_each_block_step<scalar_t>(r, r + nr, 0, width, [&](int64_t rb, int64_t re, int64_t c,
                                                           auto count) {
      const Pair m = IO::load_acc(mean + c0 + c, count);
      Pair s = IO::load_acc(sum.data() + c, count), t = IO::load_acc(dot.data() + c, count);
      for (int64_t i = rb; i < re; ++i) {
        const Pair gv = IO::load(dy + i * g.c + c0 + c, count);
        const Pair xv = IO::load(x + i * g.c + c0 + c, count);
        s = {s.first + gv.first, s.second + gv.second};
        t = {at::vec::fmadd(gv.first, xv.first - m.first, t.first),
             at::vec::fmadd(gv.second, xv.second - m.second, t.second)};
      }
      IO::store_acc(sum.data() + c, s, count);
      IO::store_acc(dot.data() + c, t, count);
    });
    for (int64_t c = 0; c < width; ++c) out[c0 + c].add({double(sum[c]), double(dot[c])});
  }
}

// ------------------------------------------------------------------ operators

template <typename acc_t>
void fold_forward_coeffs(const ForwardArgs& a, int64_t c, acc_t* alpha, acc_t* beta) {
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t* b = static_cast<const acc_t*>(a.bias);
  const auto k = fold_affine(static_cast<const acc_t*>(a.mean)[c],
                             static_cast<const acc_t*>(a.invstd)[c], w ? w[c] : acc_t(1),
                             b ? b[c] : acc_t(0));
  alpha[c] = k.alpha;
  beta[c] = k.beta;
}

template <typename acc_t>
void store_batch_stats(const ForwardArgs& a, int64_t c, const WelfordStats<double>& s) {
  // Rounding can leave a constant channel's M2 a hair below 0; NaN must stay NaN, as in torch.
  const double var = s.m2 < 0 ? 0.0 : s.m2 / s.count;
  a.var[c] = var;
  static_cast<acc_t*>(a.mean)[c] = acc_t(s.mean);
  static_cast<acc_t*>(a.invstd)[c] = acc_t(1.0 / std::sqrt(var + a.eps));
}

template <typename scalar_t>
void forward_typed(const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* y = static_cast<scalar_t*>(a.y);
  std::vector<acc_t> alpha(g.c), beta(g.c);
  const Coeffs<acc_t> k{alpha.data(), beta.data()};

  if (!a.training) {
    const auto* rm = static_cast<const acc_t*>(a.running_mean);
    const auto* rv = static_cast<const acc_t*>(a.running_var);
    for (int64_t c = 0; c < g.c; ++c) {
      static_cast<acc_t*>(a.mean)[c] = rm[c];
      static_cast<acc_t*>(a.invstd)[c] = acc_t(1) / std::sqrt(rv[c] + acc_t(a.eps));
      fold_forward_coeffs(a, c, alpha.data(), beta.data());
    }
  } else if (g.layout == Layout::kChannelsLast) {
    const RowTiles t = row_tiles(g);
    std::vector<WelfordStats<double>> partial(t.ranges * g.c);
    for_each_tile(g, t, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t range) {
      tile_stats(x, g, r0, r1, c0, c1, partial.data() + range * g.c);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      WelfordStats<double> s;
      for (int64_t range = 0; range < t.ranges; ++range) {
        s = welford_merge(s, partial[range * g.c + c]);
      }
      store_batch_stats<acc_t>(a, c, s);
      fold_forward_coeffs(a, c, alpha.data(), beta.data());
    }
  } else if (whole_channel_tasks(g, g.n * g.c * g.hw * int64_t(sizeof(scalar_t)))) {
    at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        WelfordStats<double> s;
        for (int64_t n = 0; n < g.n; ++n) {
          s = welford_merge(s, run_stats(x + (n * g.c + c) * g.hw, g.hw));
        }
        store_batch_stats<acc_t>(a, c, s);
        fold_forward_coeffs(a, c, alpha.data(), beta.data());
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          affine_run(y + p, x + p, static_cast<const scalar_t*>(nullptr), alpha[c], beta[c],
                     acc_t(0), acc_t(0), g.hw);
        }
      }
    });
    return;
  } else {
    const RunPieces p = run_pieces(g);
    std::vector<WelfordStats<double>> partial(p.tasks);
    for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len, int64_t) {
      partial[task] = run_stats(x + off, len);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      WelfordStats<double> s;
      for_channel_pieces(g, p, partial, c, [&](const auto& part) { s = welford_merge(s, part); });
      store_batch_stats<acc_t>(a, c, s);
      fold_forward_coeffs(a, c, alpha.data(), beta.data());
    }
  }
  elementwise(g, y, x, static_cast<const scalar_t*>(nullptr), k);
}

// Per-channel sums of the backward.
using ChannelSums = std::vector<GradSums>;

template <typename acc_t>
BackwardCoeffs<acc_t> fold_backward_coeffs(const BackwardArgs& a, const ChannelSums& sums,
                                           int64_t c) {
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  return fold_backward(static_cast<const acc_t*>(a.mean)[c],
                       static_cast<const acc_t*>(a.invstd)[c], w ? w[c] : acc_t(1),
                       acc_t(sums[c].dy), acc_t(sums[c].dot), acc_t(a.g.count()), a.training);
}

// The reductions of the backward into sums; when `fused`, also grad_input of each channel
// right after its sums (contiguous layout, whole channels per task). Returns whether grad_input
// was written.
template <typename scalar_t>
bool backward_sums(const BackwardArgs& a, ChannelSums& sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  auto* dx = static_cast<scalar_t*>(a.dx);
  const auto* mean = static_cast<const acc_t*>(a.mean);

  if (g.layout == Layout::kChannelsLast) {
    const RowTiles t = row_tiles(g);
    std::vector<GradSums> partial(t.ranges * g.c);
    for_each_tile(g, t, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t range) {
      tile_grad_sums(dy, x, g, mean, r0, r1, c0, c1, partial.data() + range * g.c);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      GradSums s;
      for (int64_t range = 0; range < t.ranges; ++range) s.add(partial[range * g.c + c]);
      sums[c] = s;
    }
    return false;
  }
  if (whole_channel_tasks(g, 2 * g.n * g.c * g.hw * int64_t(sizeof(scalar_t)))) {
    // Sums, then grad_input of the same channel while x and dy are cached.
    at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        GradSums s;
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          s.add(run_grad_sums(dy + p, x + p, g.hw, mean[c]));
        }
        sums[c] = s;
        if (!dx) continue;
        const auto k = fold_backward_coeffs<acc_t>(a, sums, c);
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          affine_run(dx + p, dy + p, a.training ? x + p : nullptr, k.k_dy, k.k_c, k.mean, k.k_x,
                     g.hw);
        }
      }
    });
    return dx != nullptr;
  }
  const RunPieces p = run_pieces(g);
  std::vector<GradSums> partial(p.tasks);
  for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len, int64_t c) {
    partial[task] = run_grad_sums(dy + off, x + off, len, mean[c]);
  });
  for (int64_t c = 0; c < g.c; ++c) {
    GradSums s;
    for_channel_pieces(g, p, partial, c, [&](const GradSums& part) { s.add(part); });
    sums[c] = s;
  }
  return false;
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  auto* dx = static_cast<scalar_t*>(a.dx);
  // The sums feed grad_weight/grad_bias and, in training, grad_input.
  const bool need_sums = a.grad_weight || a.grad_bias || (a.training && dx);
  ChannelSums sums(g.c);  // zero unless computed
  const bool dx_done = need_sums && backward_sums<scalar_t>(a, sums);

  if (dx && !dx_done) {
    std::vector<acc_t> k_dy(g.c), k_x(g.c), k_c(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      const auto k = fold_backward_coeffs<acc_t>(a, sums, c);
      k_dy[c] = k.k_dy;
      k_x[c] = k.k_x;
      k_c[c] = k.k_c;
    }
    if (a.training) {
      elementwise(g, dx, dy, x,
                  Coeffs<acc_t>{k_dy.data(), k_c.data(), static_cast<const acc_t*>(a.mean),
                                k_x.data()});
    } else {
      elementwise(g, dx, dy, static_cast<const scalar_t*>(nullptr),
                  Coeffs<acc_t>{k_dy.data(), k_c.data()});
    }
  }
  const auto* invstd = static_cast<const acc_t*>(a.invstd);
  for (int64_t c = 0; c < g.c; ++c) {
    if (a.grad_weight) static_cast<acc_t*>(a.grad_weight)[c] = acc_t(sums[c].dot * invstd[c]);
    if (a.grad_bias) static_cast<acc_t*>(a.grad_bias)[c] = acc_t(sums[c].dy);
  }
}

void forward(const ForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "custom_bn_forward_cpu",
                                  [&] { forward_typed<scalar_t>(a); });
}

void backward(const BackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "custom_bn_backward_cpu",
                                  [&] { backward_typed<scalar_t>(a); });
}

}  // namespace

#ifdef _OPENMP
constexpr bool kOpenMP = true;
#else
constexpr bool kOpenMP = false;
#endif

const Kernels kernels = {&forward, &backward, CUSTOM_BN_STRINGIFY(CPU_CAPABILITY), kOpenMP};

}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu

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
//  - contiguous, training: when the channels spread evenly over the threads, one task owns
//    whole channels and normalizes (or, backward, computes dx for) each channel right after its
//    reduction, while the channel is still cached: one pass from memory. Otherwise (C = 1, 3,
//    ... with large planes) the runs are cut into pieces so that every thread has work; the
//    pieces' partial results are merged, then a second, elementwise pass follows.
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
#include <cmath>
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
// Channels-last chunks: about this many values, and at most kMaxChunkRows rows, so that a
// channel's float accumulator sums few enough terms to keep float32 accuracy.
constexpr int64_t kRowChunk = 8192;
constexpr int64_t kMaxChunkRows = 512;
// Widest channel block of a channels-last reduction task.
constexpr int64_t kMaxBlockChannels = 1024;
// Fewer elements per task cost more in threading than they save.
constexpr int64_t kGrain = 32768;
// Split reductions aim at this many tasks per thread, for load balance.
constexpr int64_t kTasksPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vector loads/stores of scalar_t values as vectors of the accumulation type.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kWidth);
    }
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
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) vsum += IO::load(x + i);
  acc_t sum = horizontal_sum(vsum);
  for (; i < n; ++i) sum += acc_t(x[i]);
  const acc_t mean = sum / acc_t(n);

  const Vec vmean(mean);
  Vec vm2(acc_t(0)), vdev(acc_t(0));
  i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    const Vec d = IO::load(x + i) - vmean;
    vdev += d;
    vm2 = at::vec::fmadd(d, d, vm2);
  }
  acc_t m2 = horizontal_sum(vm2), dev = horizontal_sum(vdev);
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
    Vec vsum(acc_t(0)), vdot(acc_t(0));
    int64_t i = off;
    for (; i + IO::kWidth <= end; i += IO::kWidth) {
      const Vec g = IO::load(dy + i);
      vsum += g;
      vdot = at::vec::fmadd(g, IO::load(x + i) - vmean, vdot);
    }
    acc_t sum = horizontal_sum(vsum), dot = horizontal_sum(vdot);
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

// n values of one channel (contiguous layout): scalar coefficients.
template <typename scalar_t, typename acc_t>
void affine_run(scalar_t* out, const scalar_t* a, const scalar_t* b, acc_t ka, acc_t kc,
                acc_t shift, acc_t kb, int64_t n) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec vka(ka), vkb(kb), vkc(kc), vshift(shift);
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), vka, vkc));
    }
    for (; i < n; ++i) out[i] = scalar_t(acc_t(a[i]) * ka + kc);
  } else {
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      const Vec t = at::vec::fmadd(IO::load(b + i) - vshift, vkb, vkc);
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), vka, t));
    }
    for (; i < n; ++i) out[i] = scalar_t(acc_t(a[i]) * ka + ((acc_t(b[i]) - shift) * kb + kc));
  }
}

// n consecutive channels of one row (channels-last layout): coefficient arrays, already offset
// to the first channel.
template <typename scalar_t, typename acc_t>
void affine_row(scalar_t* out, const scalar_t* a, const scalar_t* b, const Coeffs<acc_t>& k,
                int64_t c0, int64_t n) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const acc_t* ka = k.ka + c0;
  const acc_t* kc = k.kc + c0;
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), Vec::loadu(ka + i), Vec::loadu(kc + i)));
    }
    for (; i < n; ++i) out[i] = scalar_t(acc_t(a[i]) * ka[i] + kc[i]);
  } else {
    const acc_t* shift = k.shift + c0;
    const acc_t* kb = k.kb + c0;
    for (; i + IO::kWidth <= n; i += IO::kWidth) {
      const Vec t = at::vec::fmadd(IO::load(b + i) - Vec::loadu(shift + i), Vec::loadu(kb + i),
                                   Vec::loadu(kc + i));
      IO::store(out + i, at::vec::fmadd(IO::load(a + i), Vec::loadu(ka + i), t));
    }
    for (; i < n; ++i) {
      out[i] = scalar_t(acc_t(a[i]) * ka[i] + ((acc_t(b[i]) - shift[i]) * kb[i] + kc[i]));
    }
  }
}

// Calls f(run, offset, length) for each piece of the flat range [begin, end) cut at the
// boundaries of runs of run_length values.
template <typename F>
void for_each_run_piece(int64_t begin, int64_t end, int64_t run_length, const F& f) {
  while (begin < end) {
    const int64_t run = begin / run_length;
    const int64_t offset = begin - run * run_length;
    const int64_t length = std::min(run_length - offset, end - begin);
    f(run, offset, length);
    begin += length;
  }
}

// out = a * ka + (b - shift) * kb + kc over the whole tensor, the flat range split evenly.
template <typename scalar_t, typename acc_t>
void elementwise(const Geometry& g, scalar_t* out, const scalar_t* a, const scalar_t* b,
                 const Coeffs<acc_t>& k) {
  const int64_t numel = g.n * g.c * g.hw;
  if (g.layout == Layout::kChannelsLast) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_run_piece(begin, end, g.c, [&](int64_t row, int64_t c0, int64_t len) {
        const int64_t p = row * g.c + c0;
        affine_row(out + p, a + p, b ? b + p : nullptr, k, c0, len);
      });
    });
  } else {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_run_piece(begin, end, g.hw, [&](int64_t run, int64_t off, int64_t len) {
        const int64_t c = run % g.c;
        const int64_t p = run * g.hw + off;
        affine_run(out + p, a + p, b ? b + p : nullptr, k.ka[c], k.kc[c],
                   k.shift ? k.shift[c] : acc_t(0), k.kb ? k.kb[c] : acc_t(0), len);
      });
    });
  }
}

// ------------------------------------------------------------------ contiguous reductions

// Whole channels per task when the channels spread evenly over the threads; else split runs.
bool whole_channel_tasks(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  return g.c >= threads && (g.c % threads == 0 || g.c >= 8 * threads);
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

// Calls f(task, pointer offset, length) for every task of the split mode, in parallel, and
// returns nothing: f stores its partial result by task index.
template <typename F>
void for_each_piece(const Geometry& g, const RunPieces& p, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / p.length);
  at::parallel_for(0, p.tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t run = t / p.parts;
      const int64_t off = (t % p.parts) * p.length;
      const int64_t len = std::min(p.length, g.hw - off);
      if (len > 0) f(t, run * g.hw + off, len);
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

// col[i] += row[i] for i < n.
template <typename scalar_t, typename acc_t>
void add_row(acc_t* col, const scalar_t* row, int64_t n) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    (Vec::loadu(col + i) + IO::load(row + i)).store(col + i);
  }
  for (; i < n; ++i) col[i] += acc_t(row[i]);
}

// Statistics of rows [r0, r1) x channels [c0, c1), written to out[c0, c1). Chunks of rows get
// the corrected two-pass treatment of chunk_stats, per channel.
template <typename scalar_t>
void tile_stats(const scalar_t* x, const Geometry& g, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1, WelfordStats<double>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  std::vector<acc_t> mean(width), dev(width), m2(width);
  for (int64_t c = c0; c < c1; ++c) out[c] = WelfordStats<double>{};
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    const scalar_t* base = x + r * g.c + c0;
    std::fill(mean.begin(), mean.end(), acc_t(0));
    for (int64_t i = 0; i < nr; ++i) add_row(mean.data(), base + i * g.c, width);
    const acc_t inv_nr = acc_t(1) / acc_t(nr);
    for (auto& m : mean) m *= inv_nr;
    std::fill(dev.begin(), dev.end(), acc_t(0));
    std::fill(m2.begin(), m2.end(), acc_t(0));
    for (int64_t i = 0; i < nr; ++i) {
      const scalar_t* row = base + i * g.c;
      int64_t c = 0;
      for (; c + IO::kWidth <= width; c += IO::kWidth) {
        const Vec d = IO::load(row + c) - Vec::loadu(mean.data() + c);
        (Vec::loadu(dev.data() + c) + d).store(dev.data() + c);
        at::vec::fmadd(d, d, Vec::loadu(m2.data() + c)).store(m2.data() + c);
      }
      for (; c < width; ++c) {
        const acc_t d = acc_t(row[c]) - mean[c];
        dev[c] += d;
        m2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      const double dev_mean = double(dev[c]) / double(nr);
      out[c0 + c] = welford_merge(
          out[c0 + c], WelfordStats<double>{double(mean[c]) + dev_mean,
                                            double(m2[c]) - double(dev[c]) * dev_mean, double(nr)});
    }
  }
}

// sum(dy) and sum(dy * (x - mean)) of rows [r0, r1) x channels [c0, c1), written to out[c0, c1).
template <typename scalar_t>
void tile_grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                    const at::opmath_type<scalar_t>* mean, int64_t r0, int64_t r1, int64_t c0,
                    int64_t c1, GradSums* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  const acc_t* m = mean + c0;
  std::vector<acc_t> sum(width), dot(width);
  for (int64_t c = c0; c < c1; ++c) out[c] = GradSums{};
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(dot.begin(), dot.end(), acc_t(0));
    for (int64_t i = r; i < r + nr; ++i) {
      const scalar_t* g_row = dy + i * g.c + c0;
      const scalar_t* x_row = x + i * g.c + c0;
      int64_t c = 0;
      for (; c + IO::kWidth <= width; c += IO::kWidth) {
        const Vec gv = IO::load(g_row + c);
        (Vec::loadu(sum.data() + c) + gv).store(sum.data() + c);
        at::vec::fmadd(gv, IO::load(x_row + c) - Vec::loadu(m + c), Vec::loadu(dot.data() + c))
            .store(dot.data() + c);
      }
      for (; c < width; ++c) {
        const acc_t gv = acc_t(g_row[c]);
        sum[c] += gv;
        dot[c] += gv * (acc_t(x_row[c]) - m[c]);
      }
    }
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
    for (int64_t c = 0; c < g.c; ++c) fold_forward_coeffs(a, c, alpha.data(), beta.data());
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
  } else if (whole_channel_tasks(g)) {
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
    for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len) {
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

template <typename acc_t>
BackwardCoeffs<acc_t> fold_backward_coeffs(const BackwardArgs& a, int64_t c) {
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  return fold_backward(static_cast<const acc_t*>(a.mean)[c],
                       static_cast<const acc_t*>(a.invstd)[c], w ? w[c] : acc_t(1),
                       acc_t(a.sum_dy ? a.sum_dy[c] : 0.0), acc_t(a.sum_dot ? a.sum_dot[c] : 0.0),
                       acc_t(a.g.count()), a.training);
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  auto* dx = static_cast<scalar_t*>(a.dx);
  const auto* mean = static_cast<const acc_t*>(a.mean);

  if (a.need_sums) {
    if (g.layout == Layout::kChannelsLast) {
      const RowTiles t = row_tiles(g);
      std::vector<GradSums> partial(t.ranges * g.c);
      for_each_tile(g, t, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t range) {
        tile_grad_sums(dy, x, g, mean, r0, r1, c0, c1, partial.data() + range * g.c);
      });
      for (int64_t c = 0; c < g.c; ++c) {
        GradSums s;
        for (int64_t range = 0; range < t.ranges; ++range) s.add(partial[range * g.c + c]);
        a.sum_dy[c] = s.dy;
        a.sum_dot[c] = s.dot;
      }
    } else if (whole_channel_tasks(g)) {
      // Sums, then grad_input of the same channel while x and dy are cached.
      at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          GradSums s;
          for (int64_t n = 0; n < g.n; ++n) {
            const int64_t p = (n * g.c + c) * g.hw;
            s.add(run_grad_sums(dy + p, x + p, g.hw, mean[c]));
          }
          a.sum_dy[c] = s.dy;
          a.sum_dot[c] = s.dot;
          if (!dx) continue;
          const auto k = fold_backward_coeffs<acc_t>(a, c);
          for (int64_t n = 0; n < g.n; ++n) {
            const int64_t p = (n * g.c + c) * g.hw;
            affine_run(dx + p, dy + p, a.training ? x + p : nullptr, k.k_dy, k.k_c, k.mean,
                       k.k_x, g.hw);
          }
        }
      });
      return;
    } else {
      const RunPieces p = run_pieces(g);
      std::vector<GradSums> partial(p.tasks);
      for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len) {
        partial[task] = run_grad_sums(dy + off, x + off, len, mean[(off / g.hw) % g.c]);
      });
      for (int64_t c = 0; c < g.c; ++c) {
        GradSums s;
        for_channel_pieces(g, p, partial, c, [&](const GradSums& part) { s.add(part); });
        a.sum_dy[c] = s.dy;
        a.sum_dot[c] = s.dot;
      }
    }
  }
  if (!dx) return;
  std::vector<acc_t> k_dy(g.c), k_x(g.c), k_c(g.c);
  for (int64_t c = 0; c < g.c; ++c) {
    const auto k = fold_backward_coeffs<acc_t>(a, c);
    k_dy[c] = k.k_dy;
    k_x[c] = k.k_x;
    k_c[c] = k.k_c;
  }
  if (a.training) {
    elementwise(g, dx, dy, x, Coeffs<acc_t>{k_dy.data(), k_c.data(), mean, k_x.data()});
  } else {
    elementwise(g, dx, dy, static_cast<const scalar_t*>(nullptr),
                Coeffs<acc_t>{k_dy.data(), k_c.data()});
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
